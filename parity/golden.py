"""`pgconv golden`: the reference's activations at every probe, written for a porter in any language.

    pgconv.golden("ckpt/", "golden/", images=["cat.png"], prompts=["caption en"], dtype="float32")

Output directory (`GOLDEN_SCHEMA` 1):
- `probes.json`: the schema (what every probe is, its shape with named axes, dtype, where it sits in transformers'
  and in pgconv's module tree, which probe's output is its input for teacher forcing), the cases with their
  prompt, images, `inputs_sha256`, greedy tokens and the top-k logits of each greedy step;
- `case<k>/inputs.safetensors`: the exact model inputs (`input_ids`, `pixel_values`, `attention_mask`,
  `token_type_ids`), what transformers' processor gave;
- `case<k>/activations.safetensors`: one tensor per probe, named as in the schema, in the run dtype.
The reference is transformers' PaliGemmaForConditionalGeneration (eager attention, token_type_ids passed), one
forward over the prompt (no generated tokens: a porter runs the same forward on the same inputs). Activations are
streamed to disk as each module finishes and dropped at once (`parity.capture.Recorder`), the logits a chunk of
positions at a time, so memory stays the model plus about one layer's activations.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgconv.errors import InputError
from pgconv.parity.probes import Probe

__all__ = ["golden", "GOLDEN_SCHEMA", "probe_schema", "inputs_sha256", "INPUT_NAMES", "TOPK", "reference_activations",
           "Collect"]

GOLDEN_SCHEMA = 1
INPUT_NAMES = ("input_ids", "pixel_values", "attention_mask", "token_type_ids")
TOPK = 10
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}

# What each probe is, by name pattern ({i}: the layer), and the axes of its tensor.
_ABOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "vision.embed": ("SigLIP patch embedding (conv) + learned position embeddings", ("image", "patch", "vision_width")),
    "vision.blocks.{i}.norm1": ("vision layer {i}: pre-attention LayerNorm output", ("image", "patch", "vision_width")),
    "vision.blocks.{i}.attn": ("vision layer {i}: self-attention output (after out_proj, before the residual add)",
                               ("image", "patch", "vision_width")),
    "vision.blocks.{i}.norm2": ("vision layer {i}: pre-MLP LayerNorm output", ("image", "patch", "vision_width")),
    "vision.blocks.{i}.mlp": ("vision layer {i}: MLP output (before the residual add)", ("image", "patch", "vision_width")),
    "vision.blocks.{i}": ("vision layer {i} output, residual stream", ("image", "patch", "vision_width")),
    "vision.norm": ("vision tower post-LayerNorm output (last_hidden_state)", ("image", "patch", "vision_width")),
    "projector": ("multi-modal projector output (linear to the text width)", ("image", "patch", "text_width")),
    "image_features": ("image features as merged into the token embeddings (transformers 5: the projector output "
                       "unchanged; no scaling)", ("image", "patch", "text_width")),
    "text.embed": ("decoder input: token embeddings x sqrt(text width) (the factor rounded to the run dtype) with "
                   "the image features at the <image> positions", ("batch", "token", "text_width")),
    "text.rope": ("RoPE tables at the positions used (1-based), cos and sin concatenated on the last axis",
                  ("batch", "token", "2*head_dim")),
    "text.mask.full": ("attention mask of the first full-attention layer: 1 = may attend, 0 = masked (prefix "
                       "bidirectional, suffix causal, padding masked)", ("1", "batch", "query", "key")),
    "text.mask.sliding": ("attention mask of the first sliding-window layer (Gemma 2), 1 = may attend",
                          ("1", "batch", "query", "key")),
    "text.blocks.{i}.attn_norm": ("decoder layer {i}: input RMSNorm output", ("batch", "token", "text_width")),
    "text.blocks.{i}.attn": ("decoder layer {i}: self-attention output (after o_proj, before any post-norm and the "
                             "residual add)", ("batch", "token", "text_width")),
    "text.blocks.{i}.post_attn_norm": ("decoder layer {i}: post-attention RMSNorm output (Gemma 2)",
                                       ("batch", "token", "text_width")),
    "text.blocks.{i}.mlp_norm": ("decoder layer {i}: pre-MLP RMSNorm output (Gemma: post_attention_layernorm, "
                                 "Gemma 2: pre_feedforward_layernorm)", ("batch", "token", "text_width")),
    "text.blocks.{i}.mlp": ("decoder layer {i}: GeGLU MLP output (before any post-norm and the residual add)",
                            ("batch", "token", "text_width")),
    "text.blocks.{i}.post_mlp_norm": ("decoder layer {i}: post-MLP RMSNorm output (Gemma 2)",
                                      ("batch", "token", "text_width")),
    "text.blocks.{i}": ("decoder layer {i} output, residual stream, before the final norm",
                        ("batch", "token", "text_width")),
    "text.norm": ("final RMSNorm output (the head's input)", ("batch", "token", "text_width")),
    "logits": ("vocabulary logits at every position (Gemma 2: after the final soft-cap)", ("batch", "token", "vocab")),
}


def _pattern(p: Probe) -> str:
    return p.name if p.layer < 0 else p.name.replace(f".{p.layer}", ".{i}", 1)


def _teacher_inputs(table: list[Probe]) -> dict[str, str]:
    """Probe -> the probe whose golden output is its main input (teacher forcing: run the step on that value).
    A block and its first norm read the previous block (or the embeddings); attention reads its norm, an MLP its
    norm, a post-norm its sub-layer; a pre-MLP norm reads the residual after attention, which is no probe."""
    names = {p.name for p in table}
    out: dict[str, str] = {"projector": "vision.norm", "image_features": "projector", "text.embed": "image_features",
                           "logits": "text.norm"}
    prev: dict[str, str] = {}
    for p in table:
        stack = p.name.split(".")[0]
        if p.stack:  # embed, blocks, final norm: a chain per stack (text.embed: the merged image features)
            if stack in prev and p.name not in out:
                out[p.name] = prev[stack]
            prev[stack] = p.name
        elif p.layer >= 0:
            block, sub = p.name.rsplit(".", 1)
            feeds = {"norm1": prev.get(stack), "attn_norm": prev.get(stack), "attn": None, "mlp": None,
                     "post_attn_norm": f"{block}.attn", "post_mlp_norm": f"{block}.mlp"}
            feeds["attn"] = f"{block}.norm1" if stack == "vision" else f"{block}.attn_norm"
            feeds["mlp"] = f"{block}.norm2" if stack == "vision" else f"{block}.mlp_norm"
            if feeds.get(sub):
                out[p.name] = feeds[sub]
    return {k: v for k, v in out.items() if k in names and v in names}


def probe_schema(table: list[Probe], shapes: dict[str, list[int]] | None = None,
                 dtype: str = "") -> list[dict[str, Any]]:
    """One documented entry per probe, in execution order (the first failing one is the first divergence)."""
    teacher = _teacher_inputs(table)
    out = []
    for p in table:
        about, axes = _ABOUT[_pattern(p)]
        entry = {
            "name": p.name, "description": about.replace("{i}", str(p.layer)), "axes": list(axes),
            "kind": p.kind, "stack": p.stack or None, "layer": p.layer if p.layer >= 0 else None,
            "transformers": {"module": p.ref or "lm_head (on model.language_model.norm's output)",
                             "side": p.ref_at if p.ref else "output"},
            "pgconv": {"module": p.ours or "logits()", "side": p.ours_at},
            "teacher_input": teacher.get(p.name),
        }
        if shapes is not None and p.name in shapes:
            entry.update(shape=shapes[p.name], dtype=dtype)
        out.append(entry)
    return out


def inputs_sha256(inputs: dict[str, Tensor]) -> str:
    """sha256 over each input's name, dtype, shape and bytes, in `INPUT_NAMES` order (what a dump must record)."""
    h = hashlib.sha256()
    for name in INPUT_NAMES:
        t = inputs[name].detach().cpu().contiguous()
        h.update(f"{name}:{str(t.dtype).removeprefix('torch.')}:{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Writer:
    """A safetensors file written tensor by tensor: data appended to a side file as it comes, the header (which
    must precede the data) written at the end, then header + data copied into place under a temporary name."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, path.with_name(path.name + ".data")
        self.f = open(self.data, "wb")
        self.entries: dict[str, dict[str, Any]] = {}
        self.pos = 0

    def add(self, name: str, t: Tensor) -> None:
        self.add_chunks(name, t.dtype, list(t.shape), [t])

    def add_chunks(self, name: str, dtype: torch.dtype, shape: list[int], chunks: Iterable[Tensor]) -> None:
        start = self.pos
        for c in chunks:
            b = c.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if c.numel() else b""
            self.f.write(b)
            self.pos += len(b)
        self.entries[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [start, self.pos]}

    def close(self, metadata: dict[str, str] | None = None) -> None:
        self.f.close()
        header = {"__metadata__": metadata, **self.entries} if metadata else dict(self.entries)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out, open(self.data, "rb") as data:
            out.write(len(raw).to_bytes(8, "little") + raw)
            shutil.copyfileobj(data, out, 16 << 20)
        os.replace(tmp, self.path)
        self.data.unlink()


def _save(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    w = _Writer(path)
    for name, t in tensors.items():
        w.add(name, t)
    w.close(metadata)


class Collect:
    """A sink for `reference_activations` keeping the tensors in memory (adapters, tests)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def add(self, name: str, t: Tensor) -> None:
        self.tensors[name] = t

    def add_chunks(self, name: str, dtype: torch.dtype, shape: list[int], chunks: Iterable[Tensor]) -> None:
        self.tensors[name] = torch.cat(list(chunks), 1)


@torch.no_grad()
def reference_activations(ref: torch.nn.Module, inputs: dict[str, Tensor], table: list[Probe], sink: Any) -> dict[str, list]:
    """One hooked forward of a transformers PaliGemma over `inputs`; every probe handed to `sink` (`add(name,
    tensor)`, `add_chunks(name, dtype, shape, chunks)`) as soon as its module has run, its capture dropped when no
    later probe reads it. Returns {probe: shape}."""
    from pgconv.parity.capture import Recorder, split_path
    from pgconv.parity.compare import value
    from pgconv.parity.logits import ROWS, reference_head

    norm = "model.language_model.norm"
    pending: dict[str, list[Probe]] = {}
    for p in table:
        pending.setdefault(split_path(p.ref)[0] if p.ref else norm, []).append(p)
    shapes: dict[str, list] = {}
    rec = Recorder(ref, [p.ref for p in table if p.ref] + [norm])

    def on_call(module: str) -> None:
        for p in pending.pop(module, []):
            if p.name == "logits":  # a chunk of positions at a time: no (T, V) tensor besides the sink's
                hidden = rec.get(norm, "output")
                t = hidden.shape[1]
                shape = [hidden.shape[0], t, ref.lm_head.out_features]
                chunks = (reference_head(ref, hidden[:, i:i + ROWS]) for i in range(0, t, ROWS))
                sink.add_chunks("logits", hidden.dtype, shape, chunks)
                shapes["logits"] = shape
                continue
            v = value(rec, p.ref, p.ref_at, p.kind)  # masks as 0/1 "may attend" (float32), RoPE as cat(cos, sin)
            sink.add(p.name, v)
            shapes[p.name] = list(v.shape)
        rec.drop({module})

    rec.on_call = on_call
    with rec:
        ref(**inputs, use_cache=False, logits_to_keep=1)
    missing = [p.name for ps in pending.values() for p in ps]
    if missing:
        raise RuntimeError(f"the reference never ran the module(s) of {', '.join(missing[:5])}")
    return shapes


def _activations(ref: torch.nn.Module, inputs: dict[str, Tensor], table: list[Probe], out: Path) -> dict[str, list]:
    w = _Writer(out)
    try:
        shapes = reference_activations(ref, inputs, table, w)
        w.close({"pgconv.golden_schema": str(GOLDEN_SCHEMA)})
    except BaseException:
        w.f.close()
        w.data.unlink(missing_ok=True)
        raise
    return shapes


def golden(
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    images: Sequence[str | Path] = (),
    prompts: Sequence[str] = (),
    dtype: str = "float32",
    device: str = "cpu",
    probes: str = "all",
    max_new_tokens: int = 10,
    force: bool = False,
    max_memory: str | int | None = None,
) -> dict[str, Any]:
    """Write the golden directory (module docstring) and return what probes.json holds. Every input is checked
    before the model loads; the directory is written under a temporary name and renamed at the end (no partial
    output); an existing non-empty `out_dir` is refused unless `force`. `max_memory` (a size, or bytes; default: what
    the machine can spare): a reference whose weights do not fit it is loaded through accelerate's big-model
    inference (CPU and disk offload, `parity.offload`), with the same activations."""
    from pgconv.parity.generation import reference_greedy
    from pgconv.parity.models import load_reference, read_config
    from pgconv.parity.probes import probes_for
    from pgconv.parity.verify import _cases, _check_args, _check_lengths, _resolve, _versions

    dtypes = _check_args(dtype, device, max_new_tokens, probes)
    from pgconv.model.budget import resolve_budget

    budget = resolve_budget(max_memory)
    if len(dtypes) != 1:
        raise InputError(f"dtype {dtype!r}: golden runs in one dtype (write one directory per dtype)")
    out = Path(out_dir).absolute()  # "-o ." has a name, its parent takes the temporary sibling
    if out.exists() and not force and (not out.is_dir() or out.is_symlink() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty directory (use --force to replace it)")
    path, layout, _ = _resolve(checkpoint)
    cfg = read_config(path)
    cases = _cases(images, prompts)
    from pgconv.converter.checkpoint import default_trusted_root, open_checkpoint, resolved
    from pgconv.converter.staging import check_destination, publish, temp_sibling
    from pgconv.model.processor import Processor, load_image

    # Never inside or over the checkpoint or an input image: --force would delete them (as convert refuses).
    replace = force or out.is_dir()  # an empty directory is taken over
    check_destination(out, open_checkpoint(path, trusted_root=default_trusted_root(path)), True, replace)
    for image in dict.fromkeys(i for imgs, _ in cases for i in imgs):  # before the (maybe minutes-long) load
        load_image(image)  # missing, not a regular file (a FIFO would block), not an image, truncated, a bomb
        if resolved(Path(image)).is_relative_to(resolved(out)):
            raise InputError(f"{out}: destination holds the input image {image}; choose another directory")

    _check_lengths(cases, Processor.from_pretrained(path, config=cfg) if (path / "tokenizer.json").is_file() else None,
                   cfg, max_new_tokens)
    from pgconv.parity.inputs import reference_inputs, reference_processors

    processors = reference_processors(path)  # transformers loads the image files itself, as for its users
    processor = processors[0]
    from pgconv.model.streaming import needs_streaming, weight_bytes

    run_dtype = getattr(torch, dtypes[0])
    offload = None
    if needs_streaming(weight_bytes(cfg, run_dtype), budget):  # accelerate places and offloads the layers
        from pgconv.parity.offload import max_memory_for

        offload = max_memory_for(budget, device)
    ref = load_reference(path, run_dtype, device, max_memory=offload)
    table = probes_for(cfg, probes)  # type: ignore[arg-type]
    from pgconv.parity.generation import reference_settings

    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        entries, shapes = [], {}
        for k, (imgs, prompt) in enumerate(cases):
            case_dir = tmp / f"case{k}"
            case_dir.mkdir()
            inputs, info = reference_inputs(processors, imgs, prompt, device)
            _save(case_dir / "inputs.safetensors", {n: inputs[n] for n in INPUT_NAMES})
            shapes = _activations(ref, inputs, table, case_dir / "activations.safetensors")
            tokens, steps = reference_greedy(ref, inputs, max_new_tokens)
            top = torch.topk(steps.float(), min(TOPK, steps.shape[-1]), dim=-1)
            entries.append({
                "case": k, "dir": f"case{k}", "prompt": prompt, "images": [str(i) for i in imgs], "processor": info,
                "inputs_sha256": inputs_sha256(inputs), "sequence_length": int(inputs["input_ids"].shape[1]),
                "shapes": shapes,
                # what transformers' generate() resolved (eos ids, processors): what explains the greedy tokens
                "generation": {"settings": reference_settings(ref), "tokens": tokens, "text": processor.tokenizer.decode(tokens, skip_special_tokens=False),
                               "topk_ids": top.indices.tolist(), "topk_logits": top.values.tolist()},
            })
        doc = {
            "golden_schema": GOLDEN_SCHEMA,
            "about": "Reference activations of transformers' PaliGemmaForConditionalGeneration (eager attention, "
                     "token_type_ids passed) over each case's prompt. Run your model on case<k>/inputs.safetensors, "
                     "save any subset of the probes below under their names (a probe 'X' run on the golden value of "
                     "its teacher_input goes under 'X@teacher'), record this case's inputs_sha256 as metadata "
                     "'pgconv.inputs_sha256' (or save the four inputs too), then `pgconv compare GOLDEN DUMP`.",
            "checkpoint": str(checkpoint) if checkpoint is not None else str(path), "family": cfg.family,
            "checkpoint_layout": layout, "image_token_id": cfg.image_token_index, "dtype": dtypes[0], "device": device,
            "probes_mode": probes,
            "versions": _versions(), "probes": probe_schema(table, shapes, dtypes[0]), "cases": entries,
        }
        (tmp / "probes.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        publish(tmp, out, replace)  # atomic: a concurrent golden to the same directory loses with exit 2
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return doc
