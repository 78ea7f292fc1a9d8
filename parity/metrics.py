"""Comparison metrics, all accumulated in float64 (Model Explorer's rule: the metric must not add rounding).

Tensor metrics (one dict per probe and position segment): `max_abs`, `mean_abs`, `max_rel`, `rmse`, `cosine`, plus
the two scale-free numbers the tolerance table budgets, `nrmse = rmse / rms(ref)` (relative L2) and
`nmax = max_abs / max|ref|` (HF's bf16 rule scales atol with max|out| the same way).
Logit metrics: KL(ref || ours), top-1 agreement and top-5 overlap at every position (llama-perplexity's set).
Shapes: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SEGMENTS",
    "tensor_metrics",
    "segment_masks",
    "segment_metrics",
    "within_budget",
    "logit_metrics",
    "summarise",
    "decisive",
    "top2_margin",
    "fp64_errors",
]

# Position segments of the text stream (vision probes have only image positions).
SEGMENTS = ("image", "prompt", "suffix")
_EMPTY = {"n": 0, "max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0, "rmse": 0.0, "cosine": 1.0,
          "ref_rms": 0.0, "ref_max": 0.0, "nrmse": 0.0, "nmax": 0.0}
_CHUNK = 1 << 20  # elements per float64 chunk: 3B logits (273 x 257216) never get a full float64 copy


def _stats(pairs: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> dict[str, float]:
    """Two streaming passes over (ours, ref) chunks: the reference's scale first (max_rel's floor needs it)."""
    n, sq_e, max_e, finite = 0, 0.0, 0.0, True
    for a, e in pairs():
        e = e.double()
        ok = torch.isfinite(e)
        finite = finite and bool(ok.all()) and bool(torch.isfinite(a).all())
        n += e.numel()
        sq_e += float(e[ok].pow(2).sum())
        max_e = max(max_e, float(e[ok].abs().max()) if bool(ok.any()) else 0.0)
    if n == 0:
        return dict(_EMPTY)
    ref_rms = math.sqrt(sq_e / n)
    if not finite:
        inf = math.inf
        return {"n": n, "max_abs": inf, "mean_abs": inf, "max_rel": inf, "rmse": inf, "cosine": -1.0,
                "ref_rms": ref_rms, "ref_max": max_e, "nrmse": inf, "nmax": inf}
    # Relative error with the denominator floored at 1e-3 of the tensor's RMS: elements far below the tensor's
    # scale (exact zeros after a ReLU-like op, near-zero logits) would otherwise dominate max_rel with noise.
    floor = max(ref_rms * 1e-3, 1e-300)
    sum_abs = sum_sq = max_abs = max_rel = dot = sq_a = 0.0
    for a, e in pairs():
        a, e = a.double(), e.double()
        d = (a - e).abs()
        sum_abs += float(d.sum())
        sum_sq += float(d.pow(2).sum())
        max_abs = max(max_abs, float(d.max()))
        max_rel = max(max_rel, float((d / e.abs().clamp_min(floor)).max()))
        dot += float((a * e).sum())
        sq_a += float(a.pow(2).sum())
    rmse = math.sqrt(sum_sq / n)
    na, ne = math.sqrt(sq_a), math.sqrt(sq_e)
    return {
        "n": n,
        "max_abs": max_abs,
        "mean_abs": sum_abs / n,
        "max_rel": max_rel,
        "rmse": rmse,
        "cosine": dot / (na * ne) if na > 0 and ne > 0 else (1.0 if na == ne else 0.0),
        "ref_rms": ref_rms,
        "ref_max": max_e,
        "nrmse": rmse / ref_rms if ref_rms > 0 else (0.0 if rmse == 0 else math.inf),
        "nmax": max_abs / max_e if max_e > 0 else (0.0 if rmse == 0 else math.inf),
    }


def tensor_metrics(ours: Tensor, ref: Tensor) -> dict[str, float]:
    """Error statistics of `ours` against `ref` (same shape); non-finite values make every error infinite."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    a, e = ours.detach().reshape(-1), ref.detach().reshape(-1)
    return _stats(lambda: zip(a.split(_CHUNK), e.split(_CHUNK)))


def segment_masks(input_ids: Tensor, token_type_ids: Tensor, image_token_id: int) -> dict[str, Tensor]:
    """Boolean (B, T) masks: image placeholders, the rest of the prefix (tti 0), the suffix (tti 1)."""
    image = input_ids == image_token_id
    return {"image": image, "prompt": (token_type_ids == 0) & ~image, "suffix": token_type_ids != 0}


def segment_metrics(ours: Tensor, ref: Tensor, masks: dict[str, Tensor] | None) -> dict[str, dict[str, float]]:
    """`tensor_metrics` over all elements and per non-empty segment of positions (dim 1 of a (B, T, ...) tensor)."""
    out = {"all": tensor_metrics(ours, ref)}
    if masks is None:
        return out
    a2, e2 = ours.detach().flatten(0, 1).flatten(1), ref.detach().flatten(0, 1).flatten(1)  # (B*T, rest)
    step = max(1, _CHUNK // max(a2.shape[1], 1))
    for name in SEGMENTS:
        m = masks[name]
        if m.shape != ours.shape[:2] or not bool(m.any()):
            continue
        rows = m.reshape(-1).nonzero().squeeze(1).to(a2.device)
        out[name] = _stats(lambda: ((a2[r], e2[r]) for r in rows.split(step)))
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


def logit_metrics(ours: Tensor, ref: Tensor, chunk: int = 8) -> dict[str, Any]:
    """Per-position KL(ref || ours) in nats, top-1 agreement, top-5 overlap and the reference's top-1/top-2
    log-prob margin for logits (..., V), plus their summary (`summarise`).

    Float64 over `chunk` positions at a time: a (T, 257216) float64 copy of 3B logits would not fit next to the model.
    """
    o2, r2 = ours.detach().reshape(-1, ours.shape[-1]), ref.detach().reshape(-1, ref.shape[-1])
    kls, top1s, overlaps, dps, margins = [], [], [], [], []
    k = min(5, o2.shape[-1])
    for start in range(0, o2.shape[0], chunk):
        lo = torch.log_softmax(o2[start:start + chunk].double(), -1)
        lr = torch.log_softmax(r2[start:start + chunk].double(), -1)
        kls.append((lr.exp() * (lr - lo)).sum(-1).clamp_min(0.0))  # clamp: float64 cancellation gives -1e-17
        top1s.append(lo.argmax(-1) == lr.argmax(-1))
        to, tr = lo.topk(k, -1), lr.topk(k, -1)
        overlaps.append((to.indices[:, :, None] == tr.indices[:, None, :]).any(-1).double().mean(-1))
        margins.append(tr.values[:, 0] - tr.values[:, min(1, k - 1)])
        dps.append((lo.exp() - lr.exp()).abs().amax(-1))
    cat = (lambda xs: torch.cat(xs).tolist()) if kls else (lambda xs: [])
    per = {"kl": cat(kls), "top1": cat(top1s), "top5": cat(overlaps), "margin": cat(margins), "dp": cat(dps)}
    return {**summarise(per), **per}


def summarise(per: dict[str, list], select: list[bool] | None = None) -> dict[str, Any]:
    """Summary of per-position logit metrics, over the positions where `select` is true (all by default)."""
    idx = [i for i in range(len(per["kl"])) if select is None or select[i]]
    if not idx:
        return {"positions": 0, "kl_mean": 0.0, "kl_max": 0.0, "top1_agreement": 1.0, "top5_overlap": 1.0,
                "top5_overlap_min": 1.0, "max_prob_diff": 0.0}
    kl = [per["kl"][i] for i in idx]
    top5 = [per["top5"][i] for i in idx]
    return {
        "positions": len(idx),
        "kl_mean": sum(kl) / len(kl),
        "kl_max": max(kl),
        "top1_agreement": sum(bool(per["top1"][i]) for i in idx) / len(idx),
        "top5_overlap": sum(top5) / len(top5),
        "top5_overlap_min": min(top5),
        "max_prob_diff": max(per["dp"][i] for i in idx),
    }


def decisive(per: dict[str, list], near_tie: float) -> dict[str, Any]:
    """Top-1 agreement where the reference's top-1/top-2 margin exceeds `near_tie` nats (others are coin tosses)."""
    dec = [i for i, m in enumerate(per["margin"]) if m > near_tie]
    return {"decisive_positions": len(dec), "near_ties": len(per["margin"]) - len(dec),
            "decisive_top1_agreement": sum(bool(per["top1"][i]) for i in dec) / len(dec) if dec else 1.0}


def top2_margin(logits: Tensor) -> tuple[int, int, float]:
    """(top-1 id, top-2 id, log-prob margin between them) for one position's logits (V,)."""
    lp = torch.log_softmax(logits.detach().double(), -1)
    vals, ids = lp.topk(2)
    return int(ids[0]), int(ids[1]), float(vals[0] - vals[1])
