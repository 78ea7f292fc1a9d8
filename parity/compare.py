"""Evaluate one probe: end-to-end and contributed error, budgets, float64 verdict.

Verdicts (parity.md §11.3):
- `match`: the error the step contributes (teacher forced) is within the probe kind's budget;
- otherwise the step is recomputed in float64 from the reference's input (`oracle.arbitrate`) and our teacher-forced
  output is judged against the reference's: `rounding noise` (ours no worse than k x the reference + floor),
  `reference worse` (the reference is k x further from float64 than ours), else `ours worse`.
Only `ours worse` fails a probe; the first such probe in execution order is the first divergence. A probe whose
end-to-end error is over budget while its own contribution is not is marked `inherited`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pgconv.parity.capture import Recorder, primary, split_path, tensor_of
from pgconv.parity.metrics import segment_metrics, segment_summary, within_budget
from pgconv.parity.oracle import arbitrate, logits_errors
from pgconv.parity.probes import Probe
from pgconv.parity.replay import replay, same_input
from pgconv.parity.tolerances import Tolerances

__all__ = ["value", "evaluate_probe", "evaluate_logits", "failed_row", "chained", "MATCH", "NOISE", "OURS_WORSE", "REF_WORSE"]

MATCH, NOISE, OURS_WORSE, REF_WORSE = "match", "rounding noise", "ours worse", "reference worse"


def value(rec: Recorder, path: str, at: str, kind: str) -> Tensor:
    """The probe's tensor, normalised for comparison: RoPE tables as cat(cos, sin); masks as 0/1 "may attend"."""
    module, attr = split_path(path)
    call = rec.call(module)
    if "," in attr:  # "@ctx.cos,ctx.sin"
        v: Any = tuple(tensor_of(call, at, a) for a in attr.split(","))
    elif attr:
        v = tensor_of(call, at, attr)
    else:
        v = call.output if at == "output" else tensor_of(call, at)
    if isinstance(v, tuple):  # RoPE tables (cos, sin) side by side; other tuples: HF attention's (out, weights)
        v = torch.cat(v, -1) if kind == "rope" else primary(v)
    if kind == "mask":
        # Additive masks hold 0 (attend) or the dtype's most negative value; boolean masks say "may attend".
        allowed = v if v.dtype == torch.bool else v > torch.finfo(v.dtype).min / 2
        return allowed.flatten(0, 1).unsqueeze(0).float() if allowed.ndim == 4 else allowed.float()
    return v


def _summary(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    a = stats["all"]
    return {k: a[k] for k in ("max_abs", "mean_abs", "max_rel", "rmse", "cosine", "nrmse", "nmax")}


def evaluate_probe(
    probe: Probe,
    ours_model: nn.Module,
    ref_model: nn.Module,
    ours_rec: Recorder,
    ref_rec: Recorder,
    ours_value: Tensor,
    ref_value: Tensor,
    tol: Tolerances,
    dtype: str,
    masks: dict[str, Tensor] | None,
    input_ids: Tensor,
) -> dict[str, Any]:
    """One report row for `probe` (see module docstring)."""
    budget = tol.probe(probe.kind, dtype)
    segs = masks if probe.name.startswith(("text.", "logits")) else None
    if ours_value.shape != ref_value.shape:
        return failed_row(probe, budget, f"shape mismatch: ours {tuple(ours_value.shape)} vs reference "
                                         f"{tuple(ref_value.shape)}")
    e2e = segment_metrics(ours_value, ref_value, segs)
    if probe.replay == "none":
        replayed, tf, how = False, ours_value, "none (same input by construction)"
    elif same_input(probe, ours_rec, ref_rec):
        replayed, tf, how = False, ours_value, "skipped (our input is bitwise the reference's)"
    else:
        tf = replay(probe, ours_model, ours_rec, ref_rec, input_ids)
        replayed, how = True, "ran"
    contrib = e2e if not replayed else segment_metrics(tf, ref_value, segs)
    return _row(probe, budget, e2e, contrib, how,
                lambda: arbitrate(probe, tf, ref_value, ref_model, ref_rec, input_ids))


def evaluate_logits(probe: Probe, lp: Any, ours_model: nn.Module, ref_model: nn.Module, ref_rec: Recorder,
                    tol: Tolerances, dtype: str, masks: dict[str, Tensor] | None) -> dict[str, Any]:
    """The `logits` probe's row from the stats of `parity.logits.logits_pass` (no full logit tensor exists): the
    same row `evaluate_probe` makes from whole tensors."""
    budget = tol.probe(probe.kind, dtype)
    e2e = segment_summary(lp.e2e, lp.width, masks)
    if lp.contrib is None:
        contrib, how = e2e, "skipped (our input is bitwise the reference's)"
    else:
        contrib, how = segment_summary(lp.contrib, lp.width, masks), "ran"
    return _row(probe, budget, e2e, contrib, how, lambda: logits_errors(ours_model, ref_model, ref_rec))


def _row(probe: Probe, budget: dict[str, float], e2e: dict[str, dict[str, float]],
         contrib: dict[str, dict[str, float]], how: str, fp64: Callable[[], tuple[float, float]]) -> dict[str, Any]:
    e2e_ok, contrib_ok = within_budget(e2e, budget), within_budget(contrib, budget)
    row: dict[str, Any] = {
        "name": probe.name, "kind": probe.kind, "stack": probe.stack, "layer": probe.layer,
        **_summary(e2e),
        "contributed_max_abs": contrib["all"]["max_abs"], "contributed_nrmse": contrib["all"]["nrmse"],
        "contributed_nmax": contrib["all"]["nmax"], "contributed_cosine": contrib["all"]["cosine"],
        "within_budget": e2e_ok, "contributed_within_budget": contrib_ok,
        "inherited": (not e2e_ok) and contrib_ok, "replay": how,
        "budget": budget, "segments": {k: _summary({"all": v}) for k, v in e2e.items() if k != "all"},
        "ours": probe.ours or "<forward output>", "reference": probe.ref or "<forward output>",
    }
    if contrib_ok:  # the step adds nothing over budget; any end-to-end excess is inherited from upstream
        row.update(verdict=MATCH, passed=True, fp64=None)
        return row
    err_ours, err_ref = fp64()
    k, floor = budget["k"], budget["floor"]
    if err_ours <= k * err_ref + floor:
        verdict = NOISE
    elif err_ref > k * err_ours + floor:
        verdict = REF_WORSE
    else:
        verdict = OURS_WORSE
    row.update(verdict=verdict, passed=verdict != OURS_WORSE,
               fp64={"ours": _finite(err_ours), "reference": _finite(err_ref), "k": k, "floor": floor})
    return row


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def failed_row(probe: Probe, budget: dict, error: str) -> dict[str, Any]:
    """A probe that cannot be compared at all (shape mismatch, module never called): ours worse, with the reason."""
    inf = math.inf
    return {
        "name": probe.name, "kind": probe.kind, "stack": probe.stack, "layer": probe.layer, "passed": False,
        "verdict": OURS_WORSE, "max_abs": inf, "mean_abs": inf, "max_rel": inf, "rmse": inf, "cosine": -1.0,
        "nrmse": inf, "nmax": inf, "contributed_max_abs": inf, "contributed_nrmse": inf, "contributed_nmax": inf,
        "contributed_cosine": -1.0, "within_budget": False, "contributed_within_budget": False, "inherited": False,
        "replay": "none", "budget": budget, "segments": {}, "fp64": None,
        "ours": probe.ours, "reference": probe.ref, "error": error,
    }


def chained(rec: Recorder, path: str, prev_value: Tensor) -> bool:
    """Whether the module at `path` was fed exactly `prev_value` (the previous probe of its stack): a skipped,
    repeated or reordered block leaves every block correct on its own, so only this structural check sees it."""
    x = primary((*rec.call(path).args, rec.call(path).kwargs))
    return (x is not None and x.shape == prev_value.shape and x.dtype == prev_value.dtype
            and bool(torch.equal(x, prev_value)))
