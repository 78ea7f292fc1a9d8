"""mlx-vlm's PaliGemma as a `pgconv verify --candidate mlx-vlm.py`-style candidate (the `parity.candidates` protocol).

mlx-vlm (MLX; `mlx[cpu]` on Linux) loads the checkpoint with its own loader (`mlx_vlm.utils.load_model`: its key
sanitiser reads the `hf-legacy` layout, so the checkpoint is first converted to it with `pgconv.convert`, in the
run dtype). MLX modules have no forward hooks, so each probe is the output of mlx-vlm's own module called on the
same input its forward gives it (a block on the previous block's output, a norm on the block input, ...), and
teacher forcing calls that module on the golden input instead.

What mlx-vlm 0.7.10's PaliGemma does differently (read from its code, measured on tiny checkpoints; each one that
applies is listed in `notes`, printed as a `pgconv: warning:` line):
- Gemma (PaliGemma 1) attention uses head_dim = hidden_size / num_heads, ignoring the config's head_dim: a
  checkpoint where they differ does not load (a shape error); refused here with that reason.
- image features are divided by sqrt(config `hidden_size`, the top-level one, default 2048) before the merge and
  the merged sequence multiplied by sqrt(text width): the features reach the decoder scaled by
  sqrt(text width / hidden_size), 1 only when the config's top-level hidden_size is the text width.
- the vision tower's final LayerNorm uses MLX's default epsilon 1e-5 (the config's layer_norm_eps ignored), and
  its encoder keeps only the first image of a batch (`h = x[0]`).
- it reads `text_config.rope_theta` only, which transformers 5 writes as `rope_parameters`: RoPE base 10000
  whatever the checkpoint's; PaliGemma 2's sliding window is not applied (full attention in every layer).
- RoPE positions start at 0 (transformers' PaliGemma: 1), so `text.rope` is not compared; no greedy tokens (its
  generation goes through a processor and sampler of its own, not wired here).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pgconv.errors import InputError, PgconvWarning

__all__ = ["MlxVlmCandidate", "EXTRA", "mlx_notes", "import_mlx", "load"]

EXTRA = "pip install 'mlx[cpu]' && pip install --no-deps mlx-vlm (its declared dependencies are ~1 GB and unused here)"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def mlx_notes(hf: dict[str, Any]) -> list[str]:
    """What mlx-vlm's PaliGemma changes or ignores in this config.json (module docstring)."""
    text, vision = hf.get("text_config", {}), hf.get("vision_config", {})
    notes = []
    top = hf.get("hidden_size", 2048)
    if top != text["hidden_size"]:
        notes.append(f"mlx-vlm scales the image features by sqrt(text width / config hidden_size) = "
                     f"sqrt({text['hidden_size']} / {top}) (the config has "
                     f"{'no top-level hidden_size, its default 2048' if 'hidden_size' not in hf else 'hidden_size ' + str(top)})")
    theta = text.get("rope_theta") or (text.get("rope_parameters") or {}).get("rope_theta", 10_000.0)
    if "rope_theta" not in text and float(theta) != 10_000.0:
        notes.append(f"mlx-vlm reads text_config.rope_theta only (transformers 5 writes rope_parameters): RoPE base "
                     f"10000, the checkpoint's {float(theta):g}")
    if text.get("model_type") == "gemma2":
        notes.append(f"mlx-vlm's PaliGemma 2 attention has no sliding window (the checkpoint's: "
                     f"{text.get('sliding_window')} tokens): differs on longer prompts")
    if float(vision.get("layer_norm_eps", 1e-6)) != 1e-5:
        notes.append(f"mlx-vlm's vision post-LayerNorm uses epsilon 1e-05, the checkpoint layer_norm_eps "
                     f"{float(vision.get('layer_norm_eps', 1e-6)):g}")
    return notes


@contextlib.contextmanager
def _keep_auto_processor():
    """mlx-vlm's model modules replace transformers' `AutoProcessor.from_pretrained` for their model types when
    imported (`install_auto_processor_patch`; its PaliGemma processor returns MLX arrays), which would turn every
    later reference run in this process into an MLX one: the original is put back."""
    from transformers import AutoProcessor

    saved = AutoProcessor.__dict__["from_pretrained"]
    try:
        yield
    finally:
        AutoProcessor.from_pretrained = saved


def import_mlx() -> tuple[Any, Any]:
    """(mlx.core, mlx_vlm.utils.load_model), transformers left as it was; a one-line InputError without them."""
    with _keep_auto_processor():
        try:
            import mlx.core as mx
            from mlx_vlm.models import paligemma  # noqa: F401  (imported here, so its patch is undone)
            from mlx_vlm.utils import load_model
        except ImportError as e:
            raise InputError(f"the mlx-vlm candidate needs mlx and mlx-vlm ({e.name or e} is missing): {EXTRA}") \
                from None
    return mx, load_model


def _mx(t: Tensor, dtype: str) -> Any:
    import mlx.core as mx

    return mx.array(t.detach().cpu().float().numpy()).astype(getattr(mx, dtype))


def _torch(a: Any) -> Tensor:
    import mlx.core as mx

    return torch.from_numpy(np.array(a.astype(mx.float32)))


class MlxVlmCandidate:
    """mlx-vlm's PaliGemma (MLX on the CPU), weights from mlx-vlm's own loader."""

    name = "mlx-vlm"

    def __init__(self, checkpoint: Path, dtype: torch.dtype, device: str) -> None:
        import pgconv
        from pgconv.parity.models import read_config

        mx, load_model = import_mlx()
        if dtype not in _DTYPES:
            raise InputError(f"mlx-vlm candidate: dtype {dtype} is not one of {', '.join(_DTYPES.values())}")
        if device != "cpu":
            raise InputError(f"mlx-vlm candidate: device {device!r}: MLX runs on the CPU here (Apple GPUs only)")
        cfg = read_config(Path(checkpoint))
        if cfg.family == "gemma" and cfg.text.head_dim * cfg.text.num_heads != cfg.text.hidden_size:
            raise InputError(f"{checkpoint}: mlx-vlm's Gemma attention takes head_dim = hidden_size / num_heads "
                             f"({cfg.text.hidden_size // cfg.text.num_heads}), this checkpoint's is "
                             f"{cfg.text.head_dim}: its weights do not load")
        self.cfg, self.dtype, self.mx_dtype, self.mx = cfg, dtype, _DTYPES[dtype], mx
        with tempfile.TemporaryDirectory(prefix="pgconv-mlx-") as tmp:
            legacy = Path(tmp) / "hf-legacy"
            pgconv.convert(checkpoint, legacy, to="hf-legacy", dtype=self.mx_dtype, quiet=True)
            hf = json.loads((legacy / "config.json").read_text(encoding="utf-8"))
            with _keep_auto_processor():
                self.model = load_model(legacy)  # lazy=False: every weight is read before the directory goes
        self.notes = mlx_notes(hf)
        for note in self.notes:
            warnings.warn(note, PgconvWarning, stacklevel=2)

    def _prep(self, inputs: dict[str, Tensor]) -> None:
        if inputs["input_ids"].shape[0] != 1:
            raise InputError("mlx-vlm candidate: one prompt at a time (its vision encoder keeps the first image only)")
        mx = self.mx
        self.ids = mx.array(inputs["input_ids"].numpy())
        self.mask = mx.array(inputs["attention_mask"].numpy())
        self.pixels = _mx(inputs["pixel_values"], self.mx_dtype)

    def _embed(self, features: Any) -> Any:
        """The decoder input from projector outputs, as mlx-vlm's `get_input_embeddings` + GemmaModel build it."""
        m, mx = self.model, self.mx
        emb = m.language_model.model.embed_tokens(self.ids)
        merged, self.mask4 = m._prepare_inputs_for_multimodal(features, emb, self.ids, self.mask)
        return merged * mx.array(m.config.text_config.hidden_size ** 0.5, dtype=merged.dtype)

    def _logits(self, z: Any) -> Any:
        """mlx-vlm's LanguageModel head: the tied embedding, then Gemma 2's final soft-cap."""
        lm, mx = self.model.language_model, self.mx
        out = lm.model.embed_tokens.as_linear(z)
        if lm.model_type == "gemma2":
            out = mx.tanh(out / lm.final_logit_softcapping) * lm.final_logit_softcapping
        return out

    def run(self, inputs: dict[str, Tensor], probes: list[str]) -> dict[str, Any]:
        self._prep(inputs)
        m, want = self.model, set(probes)
        vm = m.vision_tower.vision_model
        out: dict[str, Any] = {}
        x = out["vision.embed"] = vm.embeddings(self.pixels.transpose(0, 2, 3, 1))
        for i, layer in enumerate(vm.encoder.layers):
            n1 = out[f"vision.blocks.{i}.norm1"] = layer.layer_norm1(x)
            a = out[f"vision.blocks.{i}.attn"] = layer.self_attn(n1, None)
            n2 = out[f"vision.blocks.{i}.norm2"] = layer.layer_norm2(x + a)
            out[f"vision.blocks.{i}.mlp"] = layer.mlp(n2)
            x = out[f"vision.blocks.{i}"] = layer(x)
        v = out["vision.norm"] = vm.post_layernorm(x)
        p = out["projector"] = m.multi_modal_projector(v)
        h = out["text.embed"] = self._embed(p)
        out["text.mask.full"] = self.mask4.reshape(1, *self.mask4.shape[:1], *self.mask4.shape[2:])
        lm = m.language_model.model
        gemma2 = self.cfg.family == "gemma2"
        if gemma2:  # the mask every layer gets: no sliding window (module docstring)
            out["text.mask.sliding"] = out["text.mask.full"]
        for i, layer in enumerate(lm.layers):
            t = f"text.blocks.{i}"
            n = out[f"{t}.attn_norm"] = layer.input_layernorm(h)
            a = out[f"{t}.attn"] = layer.self_attn(n, self.mask4, None)
            if gemma2:  # TransformerBlock.__call__'s Gemma 2 branch, step by step
                a = out[f"{t}.post_attn_norm"] = layer.post_attention_layernorm(a)
                n2 = out[f"{t}.mlp_norm"] = layer.pre_feedforward_layernorm(h + a)
                out[f"{t}.post_mlp_norm"] = layer.post_feedforward_layernorm(layer.mlp(n2))
            else:
                n2 = out[f"{t}.mlp_norm"] = layer.post_attention_layernorm(h + a)
            out[f"{t}.mlp"] = layer.mlp(n2)
            h = out[t] = layer(h, self.mask4, None)
        z = out["text.norm"] = lm.norm(h)
        out["logits"] = self._logits(z)
        got = {k: _torch(v) for k, v in out.items() if k in want or k == "text.embed"}
        if "image_features" in want:  # what the decoder sees at the <image> positions (the merge's scaling shows)
            is_image = inputs["input_ids"] == self.cfg.image_token_index
            got["image_features"] = got["text.embed"][is_image].reshape(1, -1, got["text.embed"].shape[-1])
        return {k: v for k, v in got.items() if k in want}

    def teacher(self, probe: str, x: Tensor, inputs: dict[str, Tensor]) -> Tensor | None:
        m = self.model
        vm, lm = m.vision_tower.vision_model, m.language_model.model
        y = _mx(x, self.mx_dtype)
        parts = probe.split(".")
        if probe == "vision.norm":
            r = vm.post_layernorm(y)
        elif probe == "projector":
            r = m.multi_modal_projector(y)
        elif probe == "image_features":  # the merge's scaling of the projector output, alone
            is_image = inputs["input_ids"] == self.cfg.image_token_index
            merged = _torch(self._embed(y))
            return merged[is_image].reshape(1, -1, merged.shape[-1])
        elif probe == "text.embed":
            r = self._embed(y)
        elif probe == "text.norm":
            r = lm.norm(y)
        elif probe == "logits":
            r = self._logits(y)
        elif parts[1] == "blocks" and parts[0] in ("vision", "text"):
            layer = (vm.encoder.layers if parts[0] == "vision" else lm.layers)[int(parts[2])]
            mask = self.mask4 if parts[0] == "text" else None
            sub = parts[3] if len(parts) > 3 else ""
            steps = {"": lambda: layer(y, mask, None) if mask is not None else layer(y),
                     "norm1": lambda: layer.layer_norm1(y), "attn_norm": lambda: layer.input_layernorm(y),
                     "attn": lambda: layer.self_attn(y, mask, None) if mask is not None else layer.self_attn(y, None),
                     "mlp": lambda: layer.mlp(y)}
            if self.cfg.family == "gemma2":
                steps.update(post_attn_norm=lambda: layer.post_attention_layernorm(y),
                             post_mlp_norm=lambda: layer.post_feedforward_layernorm(y))
            if sub not in steps:
                return None
            r = steps[sub]()
        else:
            return None
        return _torch(r)


def load(checkpoint: Path, dtype: torch.dtype, device: str) -> MlxVlmCandidate:
    """The adapter-file entry point: `pgconv verify CKPT --candidate path/to/parity/mlx_vlm.py` works as it is."""
    return MlxVlmCandidate(checkpoint, dtype, device)
