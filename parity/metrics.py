"""Comparison metrics, all accumulated in float64 (Model Explorer's rule: the metric must not add rounding).

Tensor metrics (one dict per probe and position segment): `max_abs`, `mean_abs`, `max_rel`, `rmse`, `cosine`, plus
the two scale-free numbers the tolerance table budgets, `nrmse = rmse / rms(ref)` (relative L2) and
`nmax = max_abs / max|ref|` (HF's bf16 rule scales atol with max|out| the same way).
Logit metrics: KL(ref || ours), top-1 agreement and top-5 overlap at every position (llama-perplexity's set).
Shapes: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.linalg import vector_norm

__all__ = [
    "SEGMENTS",
    "tensor_metrics",
    "segment_masks",
    "segment_metrics",
    "position_stats",
    "join_stats",
    "segment_summary",
    "within_budget",
    "logit_metrics",
    "logit_positions",
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


def _row_stats(a2: Tensor, e2: Tensor) -> dict[str, Tensor]:
    """Per-row sums of (R, F) tensors, a chunk of rows at a time, in one pass (segments are sets of rows).

    Arithmetic in float64, or float32 when both inputs are 16-bit (their difference is exact in float32 and the
    budgets are ~1e-2; it halves the memory traffic); totals over rows are float64. Bit-identical rows skip the
    difference altogether; reductions run without temporaries (vector norms, aminmax) and the dot product comes from
    the polarisation identity `a.e = (|a|^2 + |e|^2 - |a-e|^2) / 2`: on a memory-bound CPU every pass over 3B
    logits costs about a second.
    """
    wide = torch.float32 if a2.element_size() <= 2 and e2.element_size() <= 2 else torch.float64
    step = max(1, _CHUNK // max(a2.shape[1], 1))
    keys = ("sq_e", "max_e", "sum_abs", "sum_sq", "max_abs", "sq_a", "max_rel")
    parts: dict[str, list[Tensor]] = {k: [] for k in keys}
    for r in range(0, a2.shape[0], step):
        e = e2[r:r + step].to(wide)
        elo, ehi = torch.aminmax(e, dim=-1)
        sq_e = vector_norm(e, dim=-1).double().pow(2)
        stats = {"sq_e": sq_e, "max_e": torch.maximum(-elo, ehi)}
        if torch.equal(a2[r:r + step], e2[r:r + step]):  # bit-identical rows (the usual case): nothing to subtract
            zero = torch.zeros_like(sq_e)
            stats.update(sum_abs=zero, sum_sq=zero, max_abs=zero, sq_a=sq_e, max_rel=zero)
        else:
            a = a2[r:r + step].to(wide)
            d = a - e
            lo, hi = torch.aminmax(d, dim=-1)
            # max |d| / max(|e|, floor): the floor (1e-3 x the row's RMS) keeps elements far below the row's scale
            # (zeros, near-zero logits) from dominating max_rel with noise.
            floor = (sq_e / e.shape[-1]).sqrt().mul(1e-3).clamp_min(1e-300).to(wide)
            stats.update(sum_abs=vector_norm(d, 1, dim=-1), sum_sq=vector_norm(d, dim=-1).double().pow(2),
                         max_abs=torch.maximum(-lo, hi), sq_a=vector_norm(a, dim=-1).double().pow(2),
                         # e.abs(), not abs_(): `e` is the caller's tensor itself when it is already `wide`.
                         max_rel=d.abs_().div_(torch.maximum(e.abs(), floor[:, None])).amax(-1))
        for key, v in stats.items():
            parts[key].append(v.double())
    st = {k: torch.cat(v) for k, v in parts.items()}
    # A NaN or Inf anywhere in a row makes its sums of squares non-finite (values beyond 1e154 count as Inf too).
    st["finite"] = torch.isfinite(st["sq_e"]) & torch.isfinite(st["sq_a"])
    return st


def _summary(st: dict[str, Tensor], rows: Tensor, width: int) -> dict[str, float]:
    if rows.numel() == 0:
        return dict(_EMPTY)
    n = rows.numel() * width
    pick = {k: v[rows] for k, v in st.items()}
    ok = pick["finite"]
    sq_e = float(pick["sq_e"][ok].sum())
    ref_rms = math.sqrt(sq_e / n)
    max_e = float(pick["max_e"][ok].max()) if bool(ok.any()) else 0.0
    if not bool(ok.all()):
        inf = math.inf
        return {"n": n, "max_abs": inf, "mean_abs": inf, "max_rel": inf, "rmse": inf, "cosine": -1.0,
                "ref_rms": ref_rms, "ref_max": max_e, "nrmse": inf, "nmax": inf}
    sum_sq, sq_a = float(pick["sum_sq"].sum()), float(pick["sq_a"].sum())
    rmse = math.sqrt(sum_sq / n)
    max_abs = float(pick["max_abs"].max())
    na, ne = math.sqrt(sq_a), math.sqrt(sq_e)
    cosine = (sq_a + sq_e - sum_sq) / (2 * na * ne) if na > 0 and ne > 0 else (1.0 if na == ne else 0.0)
    return {
        "n": n,
        "max_abs": max_abs,
        "mean_abs": float(pick["sum_abs"].sum()) / n,
        "max_rel": float(pick["max_rel"].max()),
        "rmse": rmse,
        "cosine": min(1.0, max(-1.0, cosine)),
        "ref_rms": ref_rms,
        "ref_max": max_e,
        "nrmse": rmse / ref_rms if ref_rms > 0 else (0.0 if rmse == 0 else math.inf),
        "nmax": max_abs / max_e if max_e > 0 else (0.0 if rmse == 0 else math.inf),
    }


def _as_rows(t: Tensor, positions: bool) -> Tensor:
    t = t.detach()
    if positions:
        return t.reshape(t.shape[0] * t.shape[1], -1)  # (B*T, rest): one row per position
    return t.reshape(1, -1) if t.ndim < 2 else t.reshape(-1, t.shape[-1])


def tensor_metrics(ours: Tensor, ref: Tensor) -> dict[str, float]:
    """Error statistics of `ours` against `ref` (same shape); non-finite values make every error infinite."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    if ref.numel() == 0:
        return dict(_EMPTY)
    a2, e2 = _as_rows(ours, False), _as_rows(ref, False)
    return _summary(_row_stats(a2, e2), torch.arange(a2.shape[0], device=a2.device), a2.shape[1])


def segment_masks(input_ids: Tensor, token_type_ids: Tensor, image_token_id: int) -> dict[str, Tensor]:
    """Boolean (B, T) masks: image placeholders, the rest of the prefix (tti 0), the suffix (tti 1)."""
    image = input_ids == image_token_id
    return {"image": image, "prompt": (token_type_ids == 0) & ~image, "suffix": token_type_ids != 0}


def segment_metrics(ours: Tensor, ref: Tensor, masks: dict[str, Tensor] | None) -> dict[str, dict[str, float]]:
    """`tensor_metrics` over all elements and per non-empty segment of positions (dim 1 of a (B, T, ...) tensor);
    one pass of per-position sums serves every segment."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    usable = masks is not None and ours.ndim >= 2 and ours.numel() > 0
    usable = usable and all(m.shape == ours.shape[:2] for m in masks.values())
    if not usable:
        return {"all": tensor_metrics(ours, ref)}
    a2, e2 = _as_rows(ours, True), _as_rows(ref, True)
    return segment_summary(_row_stats(a2, e2), a2.shape[1], masks)


def position_stats(ours: Tensor, ref: Tensor) -> dict[str, Tensor]:
    """Per-position sums of (B, T, F) tensors (one row per position) for `segment_summary`. Rows are independent:
    the stats of consecutive position chunks, joined with `join_stats`, equal those of the whole tensor."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    return _row_stats(_as_rows(ours, True), _as_rows(ref, True))


def join_stats(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Row stats of consecutive row chunks as one."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def segment_summary(st: dict[str, Tensor], width: int, masks: dict[str, Tensor] | None) -> dict[str, dict[str, float]]:
    """`segment_metrics` from per-position row stats (`position_stats`) of rows `width` wide."""
    rows = st["sq_e"].shape[0]
    out = {"all": _summary(st, torch.arange(rows, device=st["sq_e"].device), width)}
    for name in SEGMENTS if masks is not None else ():
        sel = masks[name].reshape(-1).to(st["sq_e"].device).nonzero().squeeze(1)
        if sel.numel():
            out[name] = _summary(st, sel, width)
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

    `chunk` positions at a time, in float64 (float32 for 16-bit logits, whose KL budgets are ~1e-3): a (T, 257216)
    float64 copy of 3B logits would not fit next to the model. Bit-identical positions only need the reference's
    margin (log-softmax shifts a row, so it is the logits' top-1/top-2 gap).
    """
    per = logit_positions(ours, ref, chunk)
    return {**summarise(per), **per}


def logit_positions(ours: Tensor, ref: Tensor, chunk: int = 8) -> dict[str, list]:
    """The per-position lists of `logit_metrics` (`kl`, `top1`, `top5`, `margin`, `dp`). Positions are independent:
    the lists of consecutive position chunks, concatenated, equal those of the whole tensor."""
    o2, r2 = ours.detach().reshape(-1, ours.shape[-1]), ref.detach().reshape(-1, ref.shape[-1])
    wide = torch.float32 if o2.element_size() <= 2 and r2.element_size() <= 2 else torch.float64
    per: dict[str, list] = {"kl": [], "top1": [], "top5": [], "margin": [], "dp": []}
    k = min(5, o2.shape[-1])
    for start in range(0, o2.shape[0], chunk):
        o, r = o2[start:start + chunk], r2[start:start + chunk]
        if torch.equal(o, r):
            top2 = r.to(wide).topk(min(2, k), -1).values
            n = r.shape[0]
            per["kl"] += [0.0] * n
            per["top1"] += [True] * n
            per["top5"] += [1.0] * n
            per["dp"] += [0.0] * n
            per["margin"] += (top2[:, 0] - top2[:, -1]).double().tolist()
            continue
        lo, lr = torch.log_softmax(o.to(wide), -1), torch.log_softmax(r.to(wide), -1)
        pr = lr.exp()
        per["kl"] += (pr * (lr - lo)).sum(-1, dtype=torch.float64).clamp_min(0.0).tolist()  # clamp: -1e-17 noise
        per["top1"] += (lo.argmax(-1) == lr.argmax(-1)).tolist()
        to, tr = lo.topk(k, -1), lr.topk(k, -1)
        per["top5"] += (to.indices[:, :, None] == tr.indices[:, None, :]).any(-1).double().mean(-1).tolist()
        per["margin"] += (tr.values[:, 0] - tr.values[:, min(1, k - 1)]).double().tolist()
        per["dp"] += (lo.exp() - pr).abs().amax(-1).double().tolist()
    return per


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
