"""keras-hub's PaliGemma as a `pgconv verify --candidate keras-hub` (the `parity.candidates` protocol).

keras-hub's `PaliGemmaCausalLM` runs on the torch backend (KERAS_BACKEND=torch), its weights loaded by keras-hub's
*own* transformers converter (`keras_hub.src.utils.transformers.convert_pali_gemma`, through
`PaliGemmaBackbone.from_preset`), so a run tests that converter and keras-hub's modelling against transformers.
The converter reads the `hf-legacy` key layout (`vision_tower.vision_model.*`, `language_model.model.*`), so the
checkpoint is first converted to it with `pgconv.convert` in a temporary directory.

What keras-hub 0.32's converter does with a config (read from the converter, measured on tiny checkpoints; each one
that applies is listed in `notes` and by `pgconv verify`'s candidate line):
- `head_dim` := `text_config.num_image_tokens` (a bug that real 224 px checkpoints hide: both are 256 there). When
  they differ the weights do not fit (a reshape error); the adapter passes the true head_dim to `from_preset` (its
  own override keyword) so the rest can be measured.
- the vocabulary := `image_token_index` rows (the <image> token and any row past it are dropped), so the logits
  have fewer columns than transformers': no `logits` probe then (greedy tokens still are compared).
- RoPE: a fixed max_wavelength 10000 (`rope_theta` ignored); RMSNorm epsilon 1e-6 (`rms_norm_eps` ignored); vision
  LayerNorm epsilon 1e-6 (`layer_norm_eps` ignored). A checkpoint with other values diverges at its first decoder
  attention (RoPE) or first norm (epsilon): a real difference, reported as such.
- PaliGemma 1 (Gemma) only: a PaliGemma 2 checkpoint would load with its norms mismatched, so it is refused.
- keras-hub places the image embeddings before the text (no <image> scatter): prompts whose image tokens are not one
  leading block per image are refused. RoPE positions start at 0 (transformers' PaliGemma: 1); attention depends on
  position differences only, so `text.rope` is not compared.

Probes come from forward hooks on keras' layers (on the torch backend every keras layer is a `torch.nn.Module`, and
its `__call__` goes through `nn.Module.__call__`); teacher forcing calls the same layer on the golden input with the
other arguments its forward was given.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgconv.errors import InputError, PgconvWarning

__all__ = ["KerasHubCandidate", "EXTRA", "converter_notes"]

EXTRA = "pip install 'pgconv[keras]' (or the light route: pip install keras sentencepiece && pip install --no-deps " \
        "keras-hub)"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Values keras-hub 0.32's PaliGemma hard-codes (not read from the config by its converter).
KERAS_ROPE_WAVELENGTH = 10_000.0
KERAS_EPS = 1e-6


def _import() -> tuple[Any, Any]:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
        import keras_hub
        from keras_hub.src.utils.transformers import convert_pali_gemma  # noqa: F401  (the converter we test)
        from keras_hub.src.utils.transformers import preset_loader  # noqa: F401  (imports sentencepiece)
    except ImportError as e:
        raise InputError(f"--candidate keras-hub needs keras and keras-hub ({e.name or e} is missing): {EXTRA}") \
            from None
    if keras.backend.backend() != "torch":
        raise InputError(f"--candidate keras-hub runs keras on the torch backend; keras is on "
                         f"{keras.backend.backend()!r} (set KERAS_BACKEND=torch before anything imports keras)")
    return keras, keras_hub


def converter_notes(hf: dict[str, Any]) -> list[str]:
    """What keras-hub's converter changes or ignores in this hf-legacy config.json (module docstring)."""
    text, vision = hf.get("text_config", {}), hf.get("vision_config", {})
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    notes = []
    if text.get("num_image_tokens") != head_dim:
        notes.append(f"keras-hub's converter takes text_config.num_image_tokens ({text.get('num_image_tokens')}) as "
                     f"head_dim ({head_dim}); loaded with head_dim={head_dim} passed to from_preset")
    vocab = hf.get("vocab_size", text.get("vocab_size"))
    if hf["image_token_index"] != vocab:
        notes.append(f"keras-hub's converter keeps {hf['image_token_index']} of {vocab} vocabulary rows (up to "
                     f"image_token_index): no logits probe")
    theta = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta", 10_000.0))
    if float(theta) != KERAS_ROPE_WAVELENGTH:
        notes.append(f"keras-hub's Gemma attention uses RoPE wavelength {KERAS_ROPE_WAVELENGTH:g}, the checkpoint "
                     f"rope_theta {float(theta):g}")
    if float(text.get("rms_norm_eps", 1e-6)) != KERAS_EPS:
        notes.append(f"keras-hub's RMSNorms use epsilon {KERAS_EPS:g}, the checkpoint rms_norm_eps "
                     f"{float(text['rms_norm_eps']):g}")
    if float(vision.get("layer_norm_eps", 1e-6)) != KERAS_EPS:
        notes.append(f"keras-hub's vision LayerNorms use epsilon {KERAS_EPS:g}, the checkpoint layer_norm_eps "
                     f"{float(vision['layer_norm_eps']):g}")
    return notes


class _Taps:
    """Forward hooks on keras layers: each layer's last call (args, kwargs, output), by probe name."""

    def __init__(self, layers: dict[str, Any]) -> None:
        self.layers, self.calls, self.handles = layers, {}, []

    def __enter__(self) -> "_Taps":
        self.calls = {}
        for name, layer in self.layers.items():
            def hook(_m, args, kwargs, out, name=name):
                self.calls[name] = (args, kwargs, out)
            self.handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class KerasHubCandidate:
    """keras-hub's PaliGemmaCausalLM (torch backend), weights from keras-hub's transformers converter."""

    name = "keras-hub"

    def __init__(self, checkpoint: Path, dtype: torch.dtype, device: str) -> None:
        import pgconv
        from pgconv.parity.models import read_config

        keras, keras_hub = _import()
        if dtype not in _DTYPES:
            raise InputError(f"--candidate keras-hub: dtype {dtype} is not one of {', '.join(_DTYPES.values())}")
        cfg = read_config(Path(checkpoint))
        if cfg.family != "gemma":
            raise InputError(f"{checkpoint}: keras-hub's transformers converter handles PaliGemma 1 (Gemma) only; "
                             f"this checkpoint's decoder is {cfg.family}")
        if cfg.image_token_index <= 0:
            raise InputError(f"{checkpoint}: image_token_index {cfg.image_token_index}: keras-hub's converter makes "
                             f"the vocabulary image_token_index rows, none here")
        self.cfg, self.dtype, self.device, self.keras = cfg, dtype, device, keras
        with tempfile.TemporaryDirectory(prefix="pgconv-keras-") as tmp:
            legacy = Path(tmp) / "hf-legacy"
            pgconv.convert(checkpoint, legacy, to="hf-legacy", quiet=True)
            hf = json.loads((legacy / "config.json").read_text(encoding="utf-8"))
            self.notes = converter_notes(hf)
            for note in self.notes:  # on the terminal as `pgconv: warning: ...` (a finding, not a failure)
                warnings.warn(note, PgconvWarning, stacklevel=2)
            overrides = {}
            if hf["text_config"].get("num_image_tokens") != cfg.text.head_dim:
                overrides["head_dim"] = cfg.text.head_dim
            with keras.device(device):
                backbone = keras_hub.models.PaliGemmaBackbone.from_preset(str(legacy), dtype=_DTYPES[dtype],
                                                                          **overrides)
        self.model = keras_hub.models.PaliGemmaCausalLM(backbone=backbone, preprocessor=None)
        self.model.compile(sampler="greedy")
        self.backbone = backbone
        self.n_image = backbone.vit_encoder.image_sequence_length
        self.full_vocab = backbone.vocabulary_size == cfg.text.vocab_size
        enc = backbone.vit_encoder.get_layer("image_encoder")
        layers: dict[str, Any] = {"vision.embed": enc.vision_embeddings, "vision.norm": enc.encoder_layer_norm,
                                  "projector": backbone.vit_encoder.get_layer("image_classifier"),
                                  "text.norm": backbone.layer_norm}
        for i, b in enumerate(enc.resblocks):
            layers.update({f"vision.blocks.{i}": b, f"vision.blocks.{i}.norm1": b.layer_norm_1,
                           f"vision.blocks.{i}.attn": b.attn, f"vision.blocks.{i}.norm2": b.layer_norm_2,
                           f"vision.blocks.{i}.mlp": b.mlp_dense_2})
        for i, b in enumerate(backbone.transformer_layers):
            layers.update({f"text.blocks.{i}": b, f"text.blocks.{i}.attn_norm": b.pre_attention_norm,
                           f"text.blocks.{i}.attn": b.attention, f"text.blocks.{i}.mlp_norm": b.pre_ffw_norm,
                           f"text.blocks.{i}.mlp": b.ffw_linear})
        self.taps = _Taps(layers)

    def _keras_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """transformers' inputs as keras-hub's: the image separately (NHWC), the text tokens after the image
        block, the prompt/suffix split as its response mask."""
        ids, n = inputs["input_ids"], self.n_image
        is_image = ids == self.cfg.image_token_index
        if (inputs["pixel_values"].shape[0] != ids.shape[0] or not bool(is_image[:, :n].all())
                or bool(is_image[:, n:].any())):
            raise InputError(f"--candidate keras-hub: keras-hub's PaliGemma takes one image per prompt, its {n} "
                             f"<image> tokens first; these inputs are not laid out so")
        return {"images": inputs["pixel_values"].permute(0, 2, 3, 1).to(self.dtype),
                "token_ids": ids[:, n:].int(), "padding_mask": inputs["attention_mask"][:, n:].int(),
                "response_mask": inputs["token_type_ids"][:, n:].int()}

    @torch.no_grad()
    def run(self, inputs: dict[str, Tensor], probes: list[str]) -> dict[str, Tensor]:
        self.inputs = self._keras_inputs(inputs)
        with self.keras.device(self.device), self.taps:
            hidden = self.backbone(self.inputs)
        calls = self.calls = self.taps.calls
        out: dict[str, Tensor] = {}
        for name in probes:
            if name in calls:
                y = calls[name][2]
                out[name] = (y[0] if isinstance(y, tuple) else y).float()
        if "image_features" in probes:  # keras-hub concatenates the projector output unchanged
            out["image_features"] = out["projector"]
        if "text.embed" in probes:  # the first decoder block's input
            out["text.embed"] = calls["text.blocks.0"][0][0].float()
        if "text.mask.full" in probes:  # (batch, query, key) booleans, "may attend"
            mask = calls["text.blocks.0.attn"][1]["attention_mask"]
            out["text.mask.full"] = mask.bool().unsqueeze(0).float()
        if "logits" in probes and self.full_vocab:
            out["logits"] = self.backbone.token_embedding(hidden, reverse=True).float()
        return out

    @torch.no_grad()
    def teacher(self, probe: str, x: Tensor, inputs: dict[str, Tensor]) -> Tensor | None:
        """The probe's keras layer alone on the golden value of its teacher input (same other arguments)."""
        keras, calls, b = self.keras, self.calls, self.backbone
        x = x.to(self.dtype)
        with keras.device(self.device):
            if probe == "image_features":
                return x
            if probe == "text.embed":  # PaliGemmaBackbone's concatenation, on the golden features
                emb = b.token_embedding(self.inputs["token_ids"])
                emb = emb * keras.ops.cast(keras.ops.sqrt(b.hidden_dim), emb.dtype)
                return keras.ops.concatenate((x, emb), axis=1).float()
            if probe == "logits":
                return b.token_embedding(x, reverse=True).float() if self.full_vocab else None
            if probe.endswith(".mlp"):  # the MLP is three layers in the block's call: compose them as it does
                block = self.taps.layers[probe.rsplit(".", 1)[0]]
                if probe.startswith("vision."):
                    h = keras.activations.gelu(block.mlp_dense_1(x), approximate=True)
                    return block.mlp_dense_2(h).float()
                h = keras.activations.gelu(block.gating_ffw(x), approximate=True) * block.gating_ffw_2(x)
                return block.ffw_linear(h).float()
            if probe not in calls:
                return None
            args, kwargs, _ = calls[probe]
            y = self.taps.layers[probe](x, *args[1:], **kwargs)
            return (y[0] if isinstance(y, tuple) else y).float()

    @torch.no_grad()
    def generate(self, inputs: dict[str, Tensor], max_new_tokens: int) -> list[int]:
        """keras-hub's own greedy generation (KV cache, `generate_step`), stopping after an EOS as transformers'."""
        k = self._keras_inputs(inputs)
        ids, mask = k["token_ids"], k["padding_mask"]
        if ids.shape[0] != 1 or not bool(mask.all()):
            raise InputError("--candidate keras-hub: greedy tokens for one unpadded prompt at a time")
        n = ids.shape[1]
        pad = torch.zeros(1, max_new_tokens, dtype=ids.dtype)
        stop = tuple(self.cfg.eos_token_ids) if self.cfg.eos_token_ids else None
        with self.keras.device(self.device):
            out = self.model.generate_step({"token_ids": torch.cat([ids, pad], 1),
                                            "padding_mask": torch.cat([mask, pad], 1), "images": k["images"]},
                                           stop_token_ids=stop)
        tokens = [int(t) for t in out["token_ids"][0, n:].tolist()]
        if stop:
            end = next((i for i, t in enumerate(tokens) if t in stop), None)
            tokens = tokens if end is None else tokens[:end + 1]
        return tokens
