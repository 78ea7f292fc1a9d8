"""Comparison metrics, all accumulated in float64 (Model Explorer's rule: the metric must not add rounding).

Tensor metrics (one dict per probe and position segment): `max_abs`, `mean_abs`, `max_rel`, `rmse`, `cosine`, plus
the two scale-free numbers the tolerance table budgets, `nrmse = rmse / rms(ref)` (relative L2) and
`nmax = max_abs / max|ref|` (HF's bf16 rule scales atol with max|out| the same way).
Logit metrics: KL(ref || ours), top-1 agreement and top-5 overlap at every position (llama-perplexity's set).
Shapes: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "SEGMENTS",
    "tensor_metrics",
    "segment_masks",
    "segment_metrics",
    "within_budget",
    "logit_metrics",
    "top2_margin",
    "fp64_errors",
]

# Position segments of the text stream (vision probes have only image positions).
SEGMENTS = ("image", "prompt", "suffix")
_EMPTY = {"n": 0, "max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0, "rmse": 0.0, "cosine": 1.0,
          "ref_rms": 0.0, "ref_max": 0.0, "nrmse": 0.0, "nmax": 0.0}


def tensor_metrics(ours: Tensor, ref: Tensor) -> dict[str, float]:
    """Error statistics of `ours` against `ref` (same shape); non-finite values make every error infinite."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    if ref.numel() == 0:
        return dict(_EMPTY)
    a, e = ours.detach().double().flatten(), ref.detach().double().flatten()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        inf = math.inf
        return {"n": a.numel(), "max_abs": inf, "mean_abs": inf, "max_rel": inf, "rmse": inf, "cosine": -1.0,
                "ref_rms": float(e[torch.isfinite(e)].pow(2).mean().sqrt()) if torch.isfinite(e).any() else inf,
                "ref_max": inf, "nrmse": inf, "nmax": inf}
    d = (a - e).abs()
    ref_rms = float(e.pow(2).mean().sqrt())
    ref_max = float(e.abs().max())
    rmse = float(d.pow(2).mean().sqrt())
    # Relative error with the denominator floored at 1e-3 of the tensor's RMS: elements far below the tensor's
    # scale (exact zeros after a ReLU-like op, near-zero logits) would otherwise dominate max_rel with noise.
    rel = d / e.abs().clamp_min(max(ref_rms * 1e-3, 1e-300))
    na, ne = a.norm(), e.norm()
    cosine = float((a @ e) / (na * ne)) if na > 0 and ne > 0 else (1.0 if na == ne else 0.0)
    return {
        "n": a.numel(),
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "max_rel": float(rel.max()),
        "rmse": rmse,
        "cosine": cosine,
        "ref_rms": ref_rms,
        "ref_max": ref_max,
        "nrmse": rmse / ref_rms if ref_rms > 0 else (0.0 if rmse == 0 else math.inf),
        "nmax": float(d.max()) / ref_max if ref_max > 0 else (0.0 if rmse == 0 else math.inf),
    }


def segment_masks(input_ids: Tensor, token_type_ids: Tensor, image_token_id: int) -> dict[str, Tensor]:
    """Boolean (B, T) masks: image placeholders, the rest of the prefix (tti 0), the suffix (tti 1)."""
    image = input_ids == image_token_id
    return {"image": image, "prompt": (token_type_ids == 0) & ~image, "suffix": token_type_ids != 0}


def segment_metrics(ours: Tensor, ref: Tensor, masks: dict[str, Tensor] | None) -> dict[str, dict[str, float]]:
    """`tensor_metrics` over all elements and per non-empty segment of positions (dim 1 of a (B, T, ...) tensor)."""
    out = {"all": tensor_metrics(ours, ref)}
    if masks is None:
        return out
    for name in SEGMENTS:
        m = masks[name]
        if m.shape != ours.shape[:2] or not bool(m.any()):
            continue
        out[name] = tensor_metrics(ours[m], ref[m])
    return out


def within_budget(stats: dict[str, dict[str, float]], budget: dict[str, float]) -> bool:
    """True when every segment (and the whole tensor) is within the budget's `nrmse` and `nmax`."""
    for seg in stats.values():
        if seg["n"] == 0:
            continue
        if not (seg["nrmse"] <= budget["nrmse"] and seg["nmax"] <= budget["nmax"]):
            return False
    return True


def fp64_errors(ours: Tensor, ref: Tensor, exact: Tensor) -> tuple[float, float]:
    """Relative RMSE of ours and of the reference against a float64 recompute (dynamo `same`'s arbitration)."""
    x = exact.detach().double()
    scale = float(x.pow(2).mean().sqrt()) or 1.0

    def err(t: Tensor) -> float:
        t = t.detach().double()
        if not torch.isfinite(t).all():
            return math.inf
        return float((t - x).pow(2).mean().sqrt()) / scale

    return err(ours), err(ref)


def logit_metrics(ours: Tensor, ref: Tensor, chunk: int = 32) -> dict[str, object]:
    """Per-position KL(ref || ours) in nats, top-1 agreement and top-5 overlap for logits (..., V).

    Float64 over `chunk` positions at a time: a (T, 257216) float64 copy of 3B logits would not fit next to the model.
    """
    o2, r2 = ours.detach().reshape(-1, ours.shape[-1]), ref.detach().reshape(-1, ref.shape[-1])
    kls, top1s, overlaps, dps = [], [], [], []
    k = min(5, o2.shape[-1])
    for start in range(0, o2.shape[0], chunk):
        lo = torch.log_softmax(o2[start:start + chunk].double(), -1)
        lr = torch.log_softmax(r2[start:start + chunk].double(), -1)
        kls.append((lr.exp() * (lr - lo)).sum(-1).clamp_min(0.0))  # clamp: float64 cancellation gives -1e-17
        top1s.append(lo.argmax(-1) == lr.argmax(-1))
        to, tr = lo.topk(k, -1).indices, lr.topk(k, -1).indices
        overlaps.append((to[:, :, None] == tr[:, None, :]).any(-1).double().mean(-1))
        dps.append((lo.exp() - lr.exp()).abs().amax(-1))
    if not kls:
        return {"positions": 0, "kl_mean": 0.0, "kl_max": 0.0, "top1_agreement": 1.0, "top5_overlap": 1.0,
                "top5_overlap_min": 1.0, "max_prob_diff": 0.0, "kl": [], "top1": [], "top5": []}
    kl, top1, overlap, dp = torch.cat(kls), torch.cat(top1s), torch.cat(overlaps), torch.cat(dps)
    return {
        "positions": kl.numel(),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float(top1.double().mean()),
        "top5_overlap": float(overlap.mean()),
        "top5_overlap_min": float(overlap.min()),
        "max_prob_diff": float(dp.max()),
        "kl": [float(v) for v in kl],
        "top1": [bool(v) for v in top1],
        "top5": [float(v) for v in overlap],
    }


def top2_margin(logits: Tensor) -> tuple[int, int, float]:
    """(top-1 id, top-2 id, log-prob margin between them) for one position's logits (V,)."""
    lp = torch.log_softmax(logits.detach().double(), -1)
    vals, ids = lp.topk(2)
    return int(ids[0]), int(ids[1]), float(vals[0] - vals[1])
