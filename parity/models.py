"""Load the reference (transformers, eager) and build our model on the *same* weight storage, then check the map.

Our parameters are the reference's tensors (renamed by `converter.layouts.to_native`, loaded with
`load_state_dict(assign=True)` into a model built on the meta device), so verifying the 3B model in fp32 costs one
copy of the weights, not two. Weight parity then checks every mapped tensor: same shape and dtype, shared storage,
bit-identical values; the map itself goes into the report.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgconv.converter.layouts import from_native, head_shapes, key_map, to_native
from pgconv.errors import InputError
from pgconv.model.config import PaliGemmaConfig
from pgconv.model.hf_config import from_hf_config

__all__ = [
    "REF_LAYOUT", "read_config", "load_reference", "cast_state_dict", "build_candidate", "weight_parity",
    "nonfinite_counts",
]

REF_LAYOUT = "hf-5.6"  # transformers >= 5.6 in-memory parameter names


def read_config(path: Path) -> PaliGemmaConfig:
    from pgconv.converter.checkpoint import read_json

    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise InputError(f"{path}: no config.json (expected a transformers PaliGemma checkpoint directory)")
    raw = read_json(cfg_path)  # duplicate keys, deep nesting, non-regular files: one-line errors
    if not isinstance(raw, dict):
        raise InputError(f"{cfg_path}: not a JSON object")
    try:
        return from_hf_config(raw)
    except InputError as e:
        raise type(e)(f"{cfg_path}: {e}") from None


def load_reference(path: Path, dtype: torch.dtype, device: str, max_memory: dict | None = None) -> nn.Module:
    """transformers' PaliGemmaForConditionalGeneration with eager attention (SDPA skips Gemma 2's soft-cap and
    ignores the prefix without token_type_ids, paligemma.md traps 3, 6). Missing or unexpected tensors are an
    input error: transformers v5 would silently re-initialise missing ones (trap 21).

    When the checkpoint's tensors are stored in another dtype (the hub's bf16 read as fp32), the tensors are cast
    one at a time by `cast_state_dict` and handed to `from_pretrained(state_dict=...)`, which adopts them without a
    copy: transformers' own cast path holds the memory-mapped source pages next to the cast copies (~1.5x the
    weights at 3B). The result is the same model (parameters, buffers, configs: tests/test_parity.py).

    `max_memory` (accelerate's: `{"cpu": bytes}`, GPUs first on several devices): a model that does not fit is
    loaded through transformers' big-model inference instead, placed and offloaded by accelerate
    (`parity.offload.load_offloaded`)."""
    if max_memory is not None:
        from pgconv.parity.offload import load_offloaded

        model, info = load_offloaded(path, dtype, max_memory)
        _check_loading_info(path, info)
        return model.eval()
    from transformers import PaliGemmaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our report is the output; restored below
    try:
        state = cast_state_dict(path, dtype)
        if state is None:
            model, info = PaliGemmaForConditionalGeneration.from_pretrained(
                path, dtype=dtype, attn_implementation="eager", output_loading_info=True
            )
        else:
            model, info = _from_state_dict(path, state, dtype)
            del state
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: transformers cannot load the checkpoint ({e})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    _check_loading_info(path, info)
    # requires_grad stays True (everything runs under no_grad): with it False, torch's matmul stops folding the
    # strided `hidden[:, -1:]` that transformers feeds lm_head at prefill and copies the whole transposed head
    # weight instead (+1 GiB for 3B bf16, +2 GiB fp32; measured with torch 2.13).
    return model.to(device).eval()


def _check_loading_info(path: Path, info: dict) -> None:
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    # A SigLIP head (vision_use_head true) that the checkpoint does not store: transformers initialises it and
    # warns, and PaliGemma never uses its output, so that is not a problem here (pgconv's reader ignores it too).
    unused_head = head_shapes(read_config(path), REF_LAYOUT)
    problems["missing_keys"] = [k for k in problems["missing_keys"] if k not in unused_head]
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}{' ...' if len(v) > 3 else ''}"
                           for k, v in problems.items())
        raise InputError(f"{path}: transformers does not load the checkpoint cleanly ({detail})")


_CAST_CHUNK = 16 << 20  # bytes read per piece when a stored tensor cannot be cast straight from the mapping
_CAST_THREADS = 4  # casts release the GIL; faulting in fresh memory goes faster in parallel too


def cast_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The checkpoint's tensors (stored names; a `native`-layout checkpoint's renamed to transformers' in-memory
    names, which transformers cannot derive from ours) with floating ones cast to `dtype`; None when every floating
    tensor is already stored in `dtype` and the names are transformers' (it then maps the files without any copy). A
    stored tied `lm_head` equal to the embedding is left out (transformers ties it); one that differs is kept, so
    that transformers unties it as `from_pretrained(path)` does.

    Each tensor is cast straight from a private memory map of its file (no copy of the source), and its source
    pages are unmapped right after (`MADV_DONTNEED`: they stay in the page cache, not in our resident set), so peak
    memory is the result plus the few tensors being cast. 3B bf16 -> fp32, 2 cores: 3.2-3.6 s against 4.9-5.8 s
    reading pieces into a buffer first (`_cast_pieces`, kept for files that cannot be mapped and bytes not aligned
    to their dtype). Sizes are checked against the headers before; a file truncated *during* the cast would fault
    the mapping (as it would transformers' own memory-mapped load)."""
    from concurrent.futures import ThreadPoolExecutor

    from pgconv.converter.checkpoint import open_checkpoint
    from pgconv.converter.dtypes import torch_dtype
    from pgconv.converter.plan import plan_conversion
    from pgconv.converter.sources import tensors_equal

    ckpt = open_checkpoint(path)  # a hub snapshot's files link into the repo's blobs/: trusted by default
    # transformers loads every HF layout by itself; pgconv's own names it cannot map, so those are renamed here.
    plan = plan_conversion(ckpt.metas(), ckpt.pg_config(), "native")
    rename = plan.src_layout == "native"
    floating = [t for t in ckpt.tensors.values() if torch_dtype(t.meta.dtype).is_floating_point]
    if not rename and all(torch_dtype(t.meta.dtype) == dtype for t in floating):
        return None
    drops = {d.source for d in plan.drops if tensors_equal(ckpt.tensors[d.source], ckpt.tensors[d.equals])}
    names = [n for n in ckpt.tensors if n not in drops]
    # One private mapping per file (ACCESS_COPY: torch may view it as writable; never written, so no page is copied).
    # None: the file is empty or cannot be mapped (some network filesystems): its tensors are read into a buffer.
    # The mappings are never closed explicitly: every view of one holds it, and only `.to(dtype)` copies of them
    # leave this function, so each is unmapped once its last view is gone.
    maps: dict[Path, mmap.mmap | None] = {}
    for src in (ckpt.tensors[n] for n in names):
        if src.span is not None and src.file not in maps:
            with open(src.file, "rb") as f:
                try:
                    maps[src.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError):  # ValueError: an empty file
                    maps[src.file] = None
    def one(src) -> torch.Tensor:
        stored = torch_dtype(src.meta.dtype)
        if not stored.is_floating_point or stored == dtype:
            return src.load()
        if src.span is None:  # not a plain byte range (.bin): whole tensor, then cast
            return src.load().to(dtype)
        begin, end = src.span
        numel = math.prod(src.meta.shape)
        if end - begin != numel * stored.itemsize:
            raise InputError(f"{src.file}: tensor {src.name!r} spans {end - begin} bytes, its header implies "
                             f"{numel * stored.itemsize}")
        if numel == 0:
            return torch.empty(src.meta.shape, dtype=dtype)
        mapped = maps[src.file]
        if mapped is None or begin % stored.itemsize:
            return _cast_pieces(src, dtype)
        if end > len(mapped):  # reading the mapping there would fault (SIGBUS)
            raise InputError(f"{src.file}: tensor {src.name!r} is truncated (file shorter than its header says)")
        out = torch.frombuffer(mapped, dtype=stored, count=numel, offset=begin).view(src.meta.shape).to(dtype)
        first = begin // mmap.PAGESIZE * mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, first, end - first)
        return out

    with ThreadPoolExecutor(_CAST_THREADS) as pool:
        state = dict(zip(names, pool.map(one, (ckpt.tensors[n] for n in names))))
    return from_native(state, ckpt.pg_config(), REF_LAYOUT) if rename else state


def _cast_pieces(src, dtype: torch.dtype, max_bytes: int = _CAST_CHUNK) -> torch.Tensor:
    """`src` cast to `dtype` from its stored bytes read a piece at a time (`SourceTensor.chunks`: any alignment)."""
    flat = torch.empty(math.prod(src.meta.shape), dtype=dtype)
    pos = 0
    for piece in src.chunks(max_bytes):
        flat[pos:pos + piece.numel()].copy_(piece)
        pos += piece.numel()
    return flat.view(src.meta.shape)


def _from_state_dict(path: Path, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """`from_pretrained(path, dtype=dtype)` with the tensors given (adopted without a copy when their dtype is the
    one transformers wants): config and generation config read from `path` as from_pretrained reads them."""
    from transformers import AutoConfig, GenerationConfig, PaliGemmaForConditionalGeneration

    config = AutoConfig.from_pretrained(path)
    model, info = PaliGemmaForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, attn_implementation="eager", output_loading_info=True
    )
    model.config._name_or_path = model.name_or_path = str(path)
    # As from_pretrained(path) sets it (`GenerationMixin.adjust_generation_fn`): generation_config.json, else a
    # generation config read from config.json's top level. Without a path, from_pretrained kept the one its
    # __init__ derived with `from_model_config`, which also reads text_config's eos: not what users get.
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    else:
        model.generation_config = GenerationConfig.from_pretrained(path, config_file_name="config.json",
                                                                   _from_model_config=True)
    return model, info


def build_candidate(ref: nn.Module, cfg: PaliGemmaConfig) -> nn.Module:
    """Our PaliGemma whose parameters *are* the reference's tensors (no copy).

    When the config ties the embeddings but transformers did not tie them (a stored lm_head that differs: it warns
    and keeps both), ours is built untied too, with the reference's lm_head (`weight_parity` reports it)."""
    from pgconv.model.paligemma import PaliGemma

    if cfg.tie_word_embeddings and not _ties(ref):
        cfg = cfg.replace(tie_word_embeddings=False)

    with torch.device("meta"):
        ours = PaliGemma(cfg)
    ours.load_state_dict(to_native(ref.state_dict(), cfg, REF_LAYOUT), strict=True, assign=True)
    return ours.eval().requires_grad_(False)


def _ties(ref: nn.Module) -> bool:
    """Whether the transformers model's lm_head is its embedding (what its loading decided, not the config)."""
    return ref.get_output_embeddings().weight is ref.get_input_embeddings().weight


def nonfinite_counts(state: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """{name: {"nan", "inf"}} for the tensors holding NaN/Inf: with such weights both models emit NaN/Inf and every
    metric is meaningless, so verify names the tensors instead of blaming a probe (issue 8).
    Chunked: no big temporaries."""
    out = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        # Fast path (~1 s for 3B parameters): min and max are both finite iff every value is (NaN propagates).
        lo, hi = torch.aminmax(t.detach().reshape(-1))
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            continue
        nan = inf = 0
        for chunk in t.detach().reshape(-1).split(1 << 22):
            if not bool(torch.isfinite(chunk).all()):
                nan, inf = nan + int(torch.isnan(chunk).sum()), inf + int(torch.isinf(chunk).sum())
        if nan or inf:
            out[name] = {"nan": nan, "inf": inf}
    return out


def weight_parity(ours: nn.Module, ref: nn.Module, cfg: PaliGemmaConfig) -> dict[str, Any]:
    """Every mapped tensor compared: shape, dtype, storage shared, values bit-identical.

    `untied_by_transformers`: the config ties lm_head to the embedding but the checkpoint stores a different one, so
    transformers (and, following it, ours) keeps both untied; None otherwise."""
    untied = None
    if cfg.tie_word_embeddings and not ours.cfg.tie_word_embeddings:
        untied = ("the stored lm_head differs from the embedding although the config ties them "
                  "(tie_word_embeddings=true): transformers keeps both untied, and so does pgconv")
        cfg = ours.cfg
    names = key_map(cfg, REF_LAYOUT)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    rows, bad = [], []
    for native, theirs in names.items():
        a, b = ours_sd.get(native), ref_sd.get(theirs)
        if a is None or b is None:
            rows.append({"native": native, "reference": theirs, "missing": "ours" if a is None else "reference"})
            bad.append(native)
            continue
        same_meta = a.shape == b.shape and a.dtype == b.dtype
        shared = same_meta and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
        equal = shared or (same_meta and bool(torch.equal(a, b)))
        rows.append({"native": native, "reference": theirs, "shape": list(a.shape),
                     "dtype": str(a.dtype).removeprefix("torch."), "shared": shared, "bit_identical": equal})
        if not equal:
            bad.append(native)
    tied = cfg.tie_word_embeddings
    return {
        "passed": not bad, "mapped": len(rows), "bit_identical": sum(bool(r.get("bit_identical")) for r in rows),
        "shared": sum(bool(r.get("shared")) for r in rows), "mismatched": bad, "layout": REF_LAYOUT,
        "tied_lm_head": tied, "untied_by_transformers": untied, "nonfinite": nonfinite_counts(ours_sd),
        "bytes": sum(t.numel() * t.element_size() for t in ours_sd.values()),
        "map": rows,
    }
