"""Float64 arbitration: recompute one reference step in float64 from the reference's own captured input.

The float64 value is the *reference's* semantics without rounding (a float64 copy of the reference's module), so a
bug in our model cannot leak into its own judge. Dtype-dependent constants that are part of the model's definition
stay rounded to the run dtype (Gemma's embedding normaliser, paligemma.md trap 13); RoPE tables are recomputed
exactly from the reference's position ids. Each recipe returns the relative RMSE of ours and of the reference
against float64 (`metrics.fp64_errors`), chunked where a float64 copy would not fit next to a 3B model (logits).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pgconv.parity.capture import Recorder, primary
from pgconv.parity.metrics import fp64_errors
from pgconv.parity.offload import materialised_copy
from pgconv.parity.probes import Probe

__all__ = ["arbitrate", "logits_errors", "rope_fp64", "to_fp64"]

T = "model.language_model."


def to_fp64(value: Any) -> Any:
    """Floating tensors (also inside tuples, lists and dicts) upcast to float64; everything else as is."""
    if isinstance(value, Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(to_fp64(v) for v in value)
    if isinstance(value, list):
        return [to_fp64(v) for v in value]
    if isinstance(value, dict):
        return {k: to_fp64(v) for k, v in value.items()}
    return value


def rope_fp64(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Exact RoPE tables (B, T, D) for the given (1-indexed) positions, half-split layout."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim))
    freqs = position_ids.double()[..., None] * inv
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


def _text_rope(ref_model) -> tuple[int, float]:
    tc = ref_model.config.text_config
    params = getattr(tc, "rope_parameters", None) or {}
    return int(tc.head_dim), float(params.get("rope_theta", getattr(tc, "rope_theta", 10000.0)))


@torch.no_grad()
def _module(probe: Probe, ref_model, rec: Recorder) -> Tensor:
    call = rec.call(probe.ref)
    # An offloaded module (accelerate, verify --max-memory) is copied with its weights gathered and no hooks.
    module = materialised_copy(ref_model.get_submodule(probe.ref)).double()
    args, kwargs = to_fp64(call.args), to_fp64(call.kwargs)
    if "position_embeddings" in kwargs and kwargs.get("position_ids") is not None:
        kwargs["position_embeddings"] = rope_fp64(kwargs["position_ids"], *_text_rope(ref_model))
    try:
        return primary(module(*args, **kwargs))
    finally:
        del module


def _merge(ref_model, rec: Recorder, input_ids: Tensor) -> Tensor:
    emb = ref_model.get_submodule(T + "embed_tokens")
    image_id = ref_model.config.image_token_id
    is_image = input_ids == image_id
    # The normaliser is defined rounded to the activation dtype (what HF's `embed_scale.to(weight.dtype)` does).
    scale = float(emb.embed_scale.to(emb.weight.dtype))
    x = emb.weight[input_ids.masked_fill(is_image, 0)].double() * scale
    feats = rec.get("model.multi_modal_projector", "output")
    return x.masked_scatter(is_image[..., None], feats.double())


@torch.no_grad()
def logits_errors(ours_model, ref_model, rec: Recorder, rows: int = 32, chunk: int = 8192) -> tuple[float, float]:
    """(error of ours, error of the reference) for the logits step, position chunk by position chunk (no full logit
    tensor exists): our head on the reference's final hidden states (teacher forced) and the reference's head, each
    against the reference's head in float64 (vocabulary chunk by vocabulary chunk)."""
    from pgconv.parity.logits import reference_head

    h = rec.get(T + "norm", "output")
    weight = ref_model.lm_head.weight
    cap = getattr(ref_model.config.get_text_config(), "final_logit_softcapping", None)
    sq_o = sq_r = sq_x = 0.0
    finite = True
    for p0 in range(0, h.shape[1], rows):
        hc = h[:, p0:p0 + rows]
        ours, ref, h64 = ours_model.logits(hc), reference_head(ref_model, hc), hc.double()
        finite = finite and bool(torch.isfinite(ours).all())
        for start in range(0, weight.shape[0], chunk):
            x = h64 @ weight[start:start + chunk].double().T
            if cap is not None:
                x = torch.tanh(x / cap) * cap
            sq_x += float(x.pow(2).sum())
            sq_o += float((ours[..., start:start + chunk].double() - x).pow(2).sum())
            sq_r += float((ref[..., start:start + chunk].double() - x).pow(2).sum())
    if not finite:
        return math.inf, math.sqrt(sq_r / sq_x) if sq_x else 0.0
    scale = math.sqrt(sq_x) or 1.0
    return math.sqrt(sq_o) / scale, math.sqrt(sq_r) / scale


def arbitrate(probe: Probe, ours: Tensor, ref: Tensor, ref_model, rec: Recorder,
              input_ids: Tensor) -> tuple[float, float]:
    """(error of ours, error of the reference) against the float64 recompute of `probe`'s step.

    `ours` should be our teacher-forced output (same input as the reference), so both are judged on equal terms.
    """
    if probe.oracle == "exact":  # the reference's value has no rounding (masks): any difference is ours
        return (0.0 if torch.equal(ours, ref) else math.inf), 0.0
    if probe.oracle == "logits":  # logits are never materialised whole: see `logits_errors`
        raise ValueError("the logits probe is arbitrated by logits_errors(ours_model, ref_model, rec)")
    if probe.oracle == "rope":
        position_ids = rec.call(probe.ref).kwargs.get("position_ids")
        if position_ids is None:
            position_ids = rec.call(probe.ref).args[1]
        cos, sin = rope_fp64(position_ids, *_text_rope(ref_model))
        exact = torch.cat((cos, sin), -1)
    elif probe.oracle == "merge":
        exact = _merge(ref_model, rec, input_ids)
    elif probe.oracle == "module":
        exact = _module(probe, ref_model, rec)
    else:
        raise ValueError(f"probe {probe.name}: unknown oracle {probe.oracle!r}")
    return fp64_errors(ours, ref, exact.expand_as(ref) if exact.shape != ref.shape else exact)
