"""Load the reference (transformers, eager) and build our model on the *same* weight storage, then check the map.

Our parameters are the reference's tensors (renamed by `converter.layouts.to_native`, loaded with
`load_state_dict(assign=True)` into a model built on the meta device), so verifying the 3B model in fp32 costs one
copy of the weights, not two. Weight parity then checks every mapped tensor: same shape and dtype, shared storage,
bit-identical values; the map itself goes into the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgconv.converter.layouts import key_map, to_native
from pgconv.errors import InputError
from pgconv.model.config import PaliGemmaConfig, from_hf_config

__all__ = ["REF_LAYOUT", "read_config", "load_reference", "build_candidate", "weight_parity", "nonfinite_counts"]

REF_LAYOUT = "hf-5.6"  # transformers >= 5.6 in-memory parameter names


def read_config(path: Path) -> PaliGemmaConfig:
    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no config.json (expected a transformers PaliGemma checkpoint directory)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: cannot read ({e})") from None
    try:
        return from_hf_config(raw)
    except InputError as e:
        raise type(e)(f"{cfg_path}: {e}") from None


def load_reference(path: Path, dtype: torch.dtype, device: str) -> nn.Module:
    """transformers' PaliGemmaForConditionalGeneration with eager attention (SDPA skips Gemma 2's soft-cap and
    ignores the prefix without token_type_ids, paligemma.md traps 3, 6). Missing or unexpected tensors are an
    input error: transformers v5 would silently re-initialise missing ones (trap 21)."""
    from transformers import PaliGemmaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our report is the output; restored below
    try:
        model, info = PaliGemmaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation="eager", output_loading_info=True
        )
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: transformers cannot load the checkpoint ({e})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}{' ...' if len(v) > 3 else ''}"
                           for k, v in problems.items())
        raise InputError(f"{path}: transformers does not load the checkpoint cleanly ({detail})")
    # requires_grad stays True (everything runs under no_grad): with it False, torch's matmul stops folding the
    # strided `hidden[:, -1:]` that transformers feeds lm_head at prefill and copies the whole transposed head
    # weight instead (+1 GiB for 3B bf16, +2 GiB fp32; measured with torch 2.13).
    return model.to(device).eval()


def build_candidate(ref: nn.Module, cfg: PaliGemmaConfig) -> nn.Module:
    """Our PaliGemma whose parameters *are* the reference's tensors (no copy)."""
    from pgconv.model.paligemma import PaliGemma

    with torch.device("meta"):
        ours = PaliGemma(cfg)
    ours.load_state_dict(to_native(ref.state_dict(), cfg, REF_LAYOUT), strict=True, assign=True)
    return ours.eval().requires_grad_(False)


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
    """Every mapped tensor compared: shape, dtype, storage shared, values bit-identical."""
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
        "tied_lm_head": tied, "nonfinite": nonfinite_counts(ours_sd),
        "bytes": sum(t.numel() * t.element_size() for t in ours_sd.values()),
        "map": rows,
    }
