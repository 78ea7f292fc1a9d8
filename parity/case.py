"""One verification case (one image + prompt): probes, logits, generation, cache check.

Order of work, so every forward pass serves several checks:
1. the reference decodes greedily (`generate`) -> its tokens and per-step logits;
2. both models run one hooked, uncached forward over prompt + the reference's tokens (suffix, token_type_ids 1):
   every probe, logits at every position, and the teacher-forced per-step logits come from these two passes;
3. each probe is compared (teacher-forced replay and float64 arbitration only where needed, `compare`);
4. our model decodes greedily with its KV cache; its step logits are checked against the uncached pass.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pgconv.parity.capture import Recorder
from pgconv.parity.compare import OURS_WORSE, chained, evaluate_probe, failed_row, value
from pgconv.parity.generation import compare_steps, first_divergence, ours_greedy, reference_greedy, step_metrics
from pgconv.parity.metrics import decisive, logit_metrics, segment_masks, segment_metrics, summarise
from pgconv.parity.probes import Probe
from pgconv.parity.replay import OWN_PATHS, own_value
from pgconv.parity.tolerances import Tolerances

__all__ = ["run_case", "EXTRA_REF_PATHS"]

T = "model.language_model."
# Reference modules the replay / oracle recipes read besides the probes' own.
EXTRA_REF_PATHS = ("model.multi_modal_projector", T + "norm", T + "rotary_emb")


def _extend(inputs: dict[str, Tensor], tokens: list[int]) -> dict[str, Tensor]:
    """Prompt + `tokens` as causal suffix tokens (what greedy decoding feeds back)."""
    if not tokens:
        return dict(inputs)
    ids = inputs["input_ids"]
    extra = torch.tensor([tokens], dtype=ids.dtype, device=ids.device)
    ones = torch.ones_like(extra)
    return {
        "input_ids": torch.cat([ids, extra], 1),
        "pixel_values": inputs["pixel_values"],
        "token_type_ids": torch.cat([inputs["token_type_ids"], ones], 1),
        "attention_mask": torch.cat([inputs["attention_mask"], ones], 1),
    }


def _logits_section(ours: Tensor, ref: Tensor, masks: dict[str, Tensor], budget: dict[str, float]) -> dict[str, Any]:
    m = logit_metrics(ours, ref)  # per position, once; segments are summaries of the same lists
    d = decisive(m, budget["near_tie_nats"])
    seg = {}
    for name, mask in masks.items():
        if bool(mask.any()):
            s = summarise(m, mask.reshape(-1).tolist())
            seg[name] = {k: s[k] for k in ("kl_mean", "kl_max", "top1_agreement", "top5_overlap")}
    passed = (m["kl_mean"] <= budget["kl_mean"] and m["kl_max"] <= budget["kl_max"]
              and d["decisive_top1_agreement"] >= budget["decisive_top1_min"])
    per_position = {k: m[k] for k in ("kl", "top1", "top5", "margin")}
    summary = {k: v for k, v in m.items() if k not in ("kl", "top1", "top5", "margin", "dp")}
    return {**summary, **d, **per_position, "segments": seg, "passed": passed, "budget": budget}


def _cache_check(ours: nn.Module, inputs: dict[str, Tensor], ref_tokens: list[int], ours_tokens: list[int],
                 steps: Tensor, uncached: Tensor, budget: dict[str, float]) -> dict[str, Any]:
    """Our cached step logits against our uncached forward over the same tokens."""
    t = inputs["input_ids"].shape[1]
    d = first_divergence(ref_tokens, ours_tokens)
    valid = len(ours_tokens) if d is None else min(d + 1, len(ours_tokens))
    extra = False
    if valid < len(ours_tokens):  # our tokens left the reference's path: one more uncached pass over ours
        with torch.no_grad():
            seq = _extend(inputs, ours_tokens[:-1])
            uncached = ours(seq["input_ids"], seq["pixel_values"], seq["token_type_ids"], seq["attention_mask"])[0]
        valid, extra = len(ours_tokens), True
    a, b = steps[:valid], uncached[t - 1:t - 1 + valid].float()
    m = logit_metrics(a, b)
    d2 = decisive(m, budget["near_tie_nats"])
    diff = segment_metrics(a, b, None)["all"]
    passed = m["kl_max"] <= budget["cache_kl_max"] and d2["decisive_top1_agreement"] >= 1.0
    return {"steps": valid, "extra_forward": extra, "kl_max": m["kl_max"], "kl_mean": m["kl_mean"],
            "max_abs": diff["max_abs"], "nrmse": diff["nrmse"], "top1_agreement": m["top1_agreement"],
            **d2, "passed": passed}


def _probe_rows(probes: list[Probe], ours: nn.Module, ref: nn.Module, ours_rec: Recorder, ref_rec: Recorder,
                ours_logits: Tensor, ref_logits: Tensor, seq: dict[str, Tensor], masks: dict[str, Tensor],
                tol: Tolerances, dtype: str) -> list[dict[str, Any]]:
    rows = []
    prev: dict[str, tuple[Probe, Tensor, Tensor]] = {}  # last probe of each stack with its two values
    for p in probes:
        try:
            if p.name == "logits":
                ov, rv = ours_logits, ref_logits
            else:
                rv = value(ref_rec, p.ref, p.ref_at, p.kind)
                ov = (own_value(p, ours, ours_rec, seq) if p.ours_at == "call"
                      else value(ours_rec, p.ours, p.ours_at, p.kind))
        except KeyError as e:  # e.g. a block our forward never called
            rows.append(failed_row(p, tol.probe(p.kind, dtype), str(e).strip("'\"")))
            continue
        row = evaluate_probe(p, ours, ref, ours_rec, ref_rec, ov, rv, tol, dtype, masks, seq["input_ids"])
        if p.stack and p.replay == "call" and p.stack in prev:
            before, ours_prev, ref_prev = prev[p.stack]
            if chained(ref_rec, p.ref, ref_prev) and not chained(ours_rec, p.ours, ours_prev):
                row.update(verdict=OURS_WORSE, passed=False,
                           error=f"our {p.ours} was not fed the output of {before.ours} (a skipped, repeated or "
                                 f"reordered block)")
        if p.stack:
            prev[p.stack] = (p, ov, rv)
        rows.append(row)
    return rows


def _generation(ours: nn.Module, inputs: dict[str, Tensor], ref_tokens: list[int], ref_steps: Tensor,
                ours_tokens: list[int], ours_steps: Tensor, ours_logits: Tensor, ref_logits: Tensor,
                budget: dict[str, float], decode: Callable[[list[int]], str]) -> dict[str, Any]:
    t, n = inputs["input_ids"].shape[1], len(ref_tokens)
    generation = compare_steps(ref_tokens, ref_steps, ours_tokens, ours_steps, budget["near_tie_nats"], decode)
    # Logits at positions t-1 .. t+n-2 of the forward over prompt + reference tokens predict each reference token.
    a, b = ours_logits[0, t - 1:t - 1 + n], ref_logits[0, t - 1:t - 1 + n]
    tf = step_metrics(a, b, budget["near_tie_nats"])
    tf["passed"] = tf["kl_max"] <= budget["teacher_forced_kl_max"] and tf["decisive_top1_agreement"] >= 1.0
    generation["teacher_forced"] = tf
    generation["cache"] = _cache_check(ours, inputs, ref_tokens, ours_tokens, ours_steps, ours_logits[0], budget)
    generation["passed"] = bool(generation["passed"] and tf["passed"] and generation["cache"]["passed"])
    return generation


def run_case(
    ours: nn.Module, ref: nn.Module, inputs: dict[str, Tensor], probes: list[Probe], tol: Tolerances, dtype: str,
    max_new_tokens: int, eos: list[int], pad: int, image_token: int, decode: Callable[[list[int]], str],
) -> dict[str, Any]:
    timing: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timing[name] = round(now - clock, 4)
        clock = now

    ref_tokens, ref_steps = reference_greedy(ref, inputs, max_new_tokens, eos, pad)
    lap("reference_generate")
    seq = _extend(inputs, ref_tokens[:-1])
    ref_paths = {p.ref for p in probes if p.ref} | set(EXTRA_REF_PATHS)
    with Recorder(ref, ref_paths) as ref_rec, torch.no_grad():
        ref_logits = ref(**seq, use_cache=False).logits
    lap("reference_forward")
    ours_paths = {p.ours for p in probes if p.ours and p.ours_at != "call"} | set(OWN_PATHS)
    with Recorder(ours, ours_paths) as ours_rec, torch.no_grad():
        ours_logits = ours(seq["input_ids"], seq["pixel_values"], seq["token_type_ids"], seq["attention_mask"])
    lap("candidate_forward")

    masks = segment_masks(seq["input_ids"], seq["token_type_ids"], image_token)
    with torch.no_grad():
        rows = _probe_rows(probes, ours, ref, ours_rec, ref_rec, ours_logits, ref_logits, seq, masks, tol, dtype)
    logits = _logits_section(ours_logits, ref_logits, masks, tol.section("logits", dtype))
    del ref_rec, ours_rec  # captured activations are no longer needed
    lap("probes")

    ours_tokens, ours_steps = ours_greedy(ours, inputs, max_new_tokens, eos, pad)
    lap("candidate_generate")
    generation = _generation(ours, inputs, ref_tokens, ref_steps, ours_tokens, ours_steps, ours_logits, ref_logits,
                             tol.section("generation", dtype), decode)
    lap("cache_check")
    first = next((r for r in rows if r["verdict"] == OURS_WORSE), None)
    return {
        "passed": all(r["passed"] for r in rows) and logits["passed"] and generation["passed"],
        "first_divergence": _divergence(first),
        "probes": rows, "logits": logits, "generation": generation,
        "sequence_length": int(seq["input_ids"].shape[1]), "prompt_length": int(inputs["input_ids"].shape[1]),
        "timing": timing,
    }


def _divergence(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    keys = ("kind", "stack", "layer", "nrmse", "max_abs", "contributed_nrmse", "contributed_max_abs", "fp64", "error")
    return {"probe": row["name"], **{k: row.get(k) for k in keys}}
