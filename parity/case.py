"""One verification case (one image + prompt): probes, logits, generation, cache check.

Order of work, so every forward pass serves several checks and no full-vocabulary logits are ever held:
1. our model decodes greedily (`pgconv.generate`, its KV cache) -> our tokens and cached per-step logits; the
   vision tower's calls in its prefill are recorded (the vision probes read them: the tower runs once);
2. the reference runs one hooked forward over prompt + our tokens (suffix, token_type_ids 1), stopping at its final
   norm; the vision and projector rows are made while it runs (both sides' captures dropped as they go). Its logits
   at the positions predicting our tokens decide whether they are provably its own greedy tokens
   (`generation.speculate`: same argmax at every step, margins clear of a near tie). If not, the reference decodes
   with transformers' `generate` after all, and when its tokens differ from ours its forward is redone over prompt
   + its tokens; the sequence is always prompt + the reference's tokens;
3. our model runs one hooked forward (no cache) over the same sequence from the image features of step 1; each
   text probe is compared (teacher-forced replay and float64 arbitration only where needed, `compare`) while it
   runs, as soon as what it reads exists; captured activations are dropped once no later probe reads them;
4. `parity.logits` computes both heads position chunk by chunk from the final hidden states: the logits probe,
   per-position KL / top-1 / top-5, and the rows that predict the reference's tokens (teacher forcing, cache check:
   our cached step logits against our uncached forward's).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pgconv.parity.capture import Recorder, release_freed_memory, split_path
from pgconv.parity.compare import OURS_WORSE, chained, evaluate_logits, evaluate_probe, failed_row, value
from pgconv.parity.generation import (compare_steps, config_check, first_divergence, greedy_changers, ours_greedy,
                                      reference_greedy, reference_settings, speculate, step_metrics)
from pgconv.parity.logits import LogitsPass, logits_pass, reference_head
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


def _logits_section(per: dict[str, list], masks: dict[str, Tensor], budget: dict[str, float]) -> dict[str, Any]:
    m = {**summarise(per), **per}  # per position, once; segments are summaries of the same lists
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
                 steps: Tensor, uncached: Tensor, budget: dict[str, float], features: Tensor) -> dict[str, Any]:
    """Our cached step logits against our full-sequence forward over the same tokens (`uncached`: its logits from
    the prompt's last position on). `features`: our image features for the prompt's image."""
    t = inputs["input_ids"].shape[1]
    d = first_divergence(ref_tokens, ours_tokens)
    valid = len(ours_tokens) if d is None else min(d + 1, len(ours_tokens))
    extra = False
    if valid < len(ours_tokens) or valid > uncached.shape[0]:
        # Our tokens left the reference's path: one more forward (no cache) over ours, logits where needed.
        with torch.no_grad():
            seq = _extend(inputs, ours_tokens[:-1])
            hidden = ours(seq["input_ids"], None, seq["token_type_ids"], seq["attention_mask"], return_hidden=True,
                          image_features=features)
            uncached = ours.logits(hidden[:, t - 1:t - 1 + len(ours_tokens)])[0]
        valid, extra = len(ours_tokens), True
    a, b = steps[:valid], uncached[:valid].float()
    m = logit_metrics(a, b)
    d2 = decisive(m, budget["near_tie_nats"])
    diff = segment_metrics(a, b, None)["all"]
    passed = m["kl_max"] <= budget["cache_kl_max"] and d2["decisive_top1_agreement"] >= 1.0
    return {"steps": valid, "extra_forward": extra, "kl_max": m["kl_max"], "kl_mean": m["kl_mean"],
            "max_abs": diff["max_abs"], "nrmse": diff["nrmse"], "top1_agreement": m["top1_agreement"],
            **d2, "passed": passed}


def _cache_tail(ov: Tensor, rv: Tensor) -> tuple[Tensor, str | None]:
    """Our mask spans the whole KV cache (keys past the sequence, kept for our decode); those columns must be
    masked, and the rest is compared with the reference's mask over the sequence."""
    if ov.ndim != rv.ndim or ov.shape[:-1] != rv.shape[:-1] or ov.shape[-1] <= rv.shape[-1]:
        return ov, None
    if bool(ov[..., rv.shape[-1]:].any()):
        return ov, "our mask lets queries attend to cache positions past the sequence"
    return ov[..., :rv.shape[-1]], None


class _ProbeStream:
    """The probe rows, made in table order while the forwards run (`Recorder.on_call` after each first call, on
    either side): a probe is evaluated as soon as every module it reads has run on both sides, and the captured
    activations no later probe reads are dropped on both sides right away. Our vision calls were recorded in our
    decode's prefill, so the vision rows are made while the reference's vision tower runs; the text rows (which
    depend on the token sequence, final only once the reference's tokens are known: `sequence_ready`) while our
    forward runs, so at most about one layer of ours is held next to the reference's captures (which shrink as ours
    catches up) instead of both models' activations for every layer. Replays run inside the hooks (that forward is
    paused there); a replayed call records nothing (first calls only). `finish()` evaluates whatever is left after
    the forward (a module never called gives a failed row)."""

    def __init__(self, probes: list[Probe], ours: nn.Module, ref: nn.Module, ours_rec: Recorder,
                 ref_rec: Recorder | None, seq: dict[str, Tensor], masks: dict[str, Tensor], tol: Tolerances,
                 dtype: str) -> None:
        self.probes, self.ours, self.ref, self.ours_rec, self.ref_rec = probes, ours, ref, ours_rec, ref_rec
        self.seq, self.masks, self.tol, self.dtype = seq, masks, tol, dtype
        self.sequence_ready = False
        self.rows: list[dict[str, Any] | None] = []
        self.prev: dict[str, tuple[Probe, Tensor, Tensor]] = {}  # last probe of each stack with its two values
        self.busy = False
        self.needs = [self._needs(p) for p in probes]
        self.last_ours: dict[str, int] = {}
        self.last_ref: dict[str, int] = {}
        for i, p in enumerate(probes):
            for m in self.needs[i]:
                self.last_ours[m] = i
            if p.ref:
                self.last_ref[split_path(p.ref)[0]] = i

    @staticmethod
    def _needs(p: Probe) -> set[str]:
        """Our modules whose recorded call the probe's row reads (value, replay input, chain check)."""
        need = {split_path(p.ours)[0]} if p.ours and p.ours_at != "call" else set()
        if p.ours == "embed()" or p.replay == "merge":
            need.add("image_tap")
        if p.replay == "features":
            need.add("projector")
        return need

    def step(self, _module: str = "", final: bool = False) -> None:
        if self.busy:  # a replay inside a hook calls our modules again
            return
        self.busy = True
        try:
            while len(self.rows) < len(self.probes):
                i = len(self.rows)
                p = self.probes[i]
                if p.name == "logits":  # made from `parity.logits` after the forward
                    self.rows.append(None)
                    continue
                if not final and not self._ready(i, p):
                    break
                self.rows.append(self._row(p))
                self._release(i)
        finally:
            self.busy = False

    def _ready(self, i: int, p: Probe) -> bool:
        if p.name.startswith("text.") and not self.sequence_ready:
            return False
        done = self.ours_rec.calls
        if not all(m in done and done[m].done for m in self.needs[i]):
            return False
        if self.ref_rec is None:
            return False
        theirs = self.ref_rec.calls.get(split_path(p.ref)[0]) if p.ref else None
        return not p.ref or (theirs is not None and theirs.done)

    def remaining_ref_paths(self) -> set[str]:
        """Reference modules the rows not made yet read."""
        return {p.ref for p in self.probes[len(self.rows):] if p.ref}

    def finish(self) -> list[dict[str, Any] | None]:
        self.step(final=True)
        return self.rows

    def _release(self, i: int) -> None:
        self.ours_rec.drop({m for m, last in self.last_ours.items() if last == i} - set(OWN_PATHS))
        self.ref_rec.drop({m for m, last in self.last_ref.items() if last == i} - set(EXTRA_REF_PATHS))

    def _row(self, p: Probe) -> dict[str, Any]:
        ours, ref, ours_rec, ref_rec = self.ours, self.ref, self.ours_rec, self.ref_rec
        tol, dtype = self.tol, self.dtype
        try:
            rv = value(ref_rec, p.ref, p.ref_at, p.kind)
            ov = (own_value(p, ours, ours_rec, self.seq) if p.ours_at == "call"
                  else value(ours_rec, p.ours, p.ours_at, p.kind))
        except KeyError as e:  # e.g. a block our forward never called
            return failed_row(p, tol.probe(p.kind, dtype), str(e).strip("'\""))
        if p.kind == "mask":
            ov, problem = _cache_tail(ov, rv)
            if problem:
                return failed_row(p, tol.probe(p.kind, dtype), problem)
        row = evaluate_probe(p, ours, ref, ours_rec, ref_rec, ov, rv, tol, dtype, self.masks, self.seq["input_ids"])
        if p.stack and p.replay == "call" and p.stack in self.prev:
            before, ours_prev, ref_prev = self.prev[p.stack]
            if chained(ref_rec, p.ref, ref_prev) and not chained(ours_rec, p.ours, ours_prev):
                row.update(verdict=OURS_WORSE, passed=False,
                           error=f"our {p.ours} was not fed the output of {before.ours} (a skipped, repeated or "
                                 f"reordered block)")
        if p.stack:
            self.prev[p.stack] = (p, ov, rv)
        return row


def _generation(ours: nn.Module, inputs: dict[str, Tensor], ref_tokens: list[int], ref_steps: Tensor,
                ours_tokens: list[int], ours_steps: Tensor, lp: LogitsPass, budget: dict[str, float],
                decode: Callable[[list[int]], str], features: Tensor) -> dict[str, Any]:
    generation = compare_steps(ref_tokens, ref_steps, ours_tokens, ours_steps, budget["near_tie_nats"], decode)
    # Logits at positions t-1 .. t+n-2 of the forward over prompt + reference tokens predict each reference token.
    tf = step_metrics(lp.ours_rows, lp.ref_rows, budget["near_tie_nats"])
    tf["passed"] = tf["kl_max"] <= budget["teacher_forced_kl_max"] and tf["decisive_top1_agreement"] >= 1.0
    generation["teacher_forced"] = tf
    generation["cache"] = _cache_check(ours, inputs, ref_tokens, ours_tokens, ours_steps, lp.ours_rows, budget,
                                       features)
    generation["passed"] = bool(generation["passed"] and tf["passed"] and generation["cache"]["passed"])
    return generation


def run_case(
    ours: nn.Module, ref: nn.Module, inputs: dict[str, Tensor], probes: list[Probe], tol: Tolerances, dtype: str,
    max_new_tokens: int, settings: Any, image_token: int, decode: Callable[[list[int]], str],
) -> dict[str, Any]:
    """One case. `settings`: pgconv's generation settings for the checkpoint (`GenerationSettings`), which our
    decode runs under; the reference decodes under its own generation config, and the two are compared."""
    timing: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timing[name] = round(now - clock, 4)
        clock = now

    budget = tol.section("generation", dtype)
    ours_paths = {p.ours for p in probes if p.ours and p.ours_at != "call"} | set(OWN_PATHS)
    # Our vision tower runs once: its calls in our decode's prefill are the ones the probes read, and the features
    # that prefill handed to `embed` (`image_tap`) are fed to our hooked forward below as `image_features`.
    vision_paths = {m for m in ours_paths if m in ("projector", "image_tap") or m.startswith("vision.")}
    with Recorder(ours, vision_paths) as vision_rec:
        ours_tokens, ours_steps = ours_greedy(ours, inputs, max_new_tokens, settings)
    release_freed_memory()  # the decode's temporaries: the reference forward's captures come next
    lap("candidate_generate")
    t = inputs["input_ids"].shape[1]
    ours_rec = Recorder(ours, ours_paths - vision_paths)
    ours_rec.calls.update(vision_rec.calls)
    del vision_rec
    # What our prefill merged (not the projector's output: a port may change the features in between).
    features = ours_rec.get("image_tap", "output")
    # The vision rows read only the pixels; the sequence and its masks are set once the tokens are final.
    stream = _ProbeStream(probes, ours, ref, ours_rec, None, inputs, {}, tol, dtype)

    def ref_forward(tokens: list[int]) -> tuple[dict[str, Tensor], Recorder]:
        seq = _extend(inputs, tokens[:-1])
        rec = Recorder(ref, stream.remaining_ref_paths() | set(EXTRA_REF_PATHS))
        stream.ref_rec, rec.on_call = rec, stream.step  # the vision rows are made while its vision tower runs
        with rec, torch.no_grad():
            ref(**seq, use_cache=False, logits_to_keep=1)  # logits: from the final norm's output, step 4
        return seq, rec

    seq, ref_rec = ref_forward(ours_tokens)
    lap("reference_forward")
    with torch.no_grad():  # the reference's uncached logits predicting each of our tokens
        n = len(ours_tokens)
        spec_steps = reference_head(ref, ref_rec.get(T + "norm", "output")[:, t - 1:t - 1 + n])[0].float()
    ref_settings = reference_settings(ref)
    spec = speculate(spec_steps, ours_tokens, budget["near_tie_nats"],
                     greedy_changers(getattr(ref, "generation_config", None)), ref_settings["eos_token_ids"],
                     max_new_tokens)
    if spec["accepted"]:
        ref_tokens, ref_steps = ours_tokens, spec_steps
    else:
        del spec_steps
        ref_tokens, ref_steps = reference_greedy(ref, inputs, max_new_tokens)
        lap("reference_generate")
        if ref_tokens != ours_tokens:
            stream.ref_rec = None
            del ref_rec, seq
            seq, ref_rec = ref_forward(ref_tokens)
            lap("reference_forward_again")
    spec["reference_tokens_from"] = "teacher-forced argmax" if spec["accepted"] else "generate"
    n = len(ref_tokens)
    length = seq["input_ids"].shape[1]
    masks = segment_masks(seq["input_ids"], seq["token_type_ids"], image_token)
    stream.seq, stream.masks, stream.sequence_ready = seq, masks, True
    ours_rec.on_call = stream.step  # the text rows are compared while our forward runs
    with torch.no_grad():
        stream.step()  # rows whose inputs all exist already (text.embed: our projector output, the reference's)
    with ours_rec, torch.no_grad():  # no cache: the uncached forward the cache check compares our decode with
        ours_hidden = ours(seq["input_ids"], None, seq["token_type_ids"], seq["attention_mask"],
                           return_hidden=True, image_features=features)
    lap("candidate_forward")
    with torch.no_grad():
        rows = stream.finish()
    ref_rec.keep_only({T + "norm"})  # captured activations are no longer needed (the logits' oracle reads the norm)
    del ours_rec, stream
    release_freed_memory()  # the captures just dropped: the logit chunks come next
    lap("probes")

    lp = logits_pass(ours, ref, ours_hidden, ref_rec.get(T + "norm", "output"), slice(t - 1, t - 1 + n))
    with torch.no_grad():
        rows = [evaluate_logits(p, lp, ours, ref, ref_rec, tol, dtype, masks) if r is None else r
                for p, r in zip(probes, rows)]
    logits = _logits_section(lp.per, masks, tol.section("logits", dtype))
    del ref_rec
    lap("logits")

    del ours_hidden
    generation = _generation(ours, inputs, ref_tokens, ref_steps, ours_tokens, ours_steps, lp, budget, decode,
                             features)
    generation["reference_tokens_from"] = spec.pop("reference_tokens_from")
    generation["speculation"] = spec
    # The reference-token source must agree with transformers' generation config (eos, pad, processors).
    generation["config"] = config_check(settings.summary(), ref_settings)
    generation["passed"] = bool(generation["passed"] and generation["config"]["passed"])
    lap("cache_check")
    first_bad = next((r for r in rows if r["verdict"] == OURS_WORSE), None)
    return {
        "passed": all(r["passed"] for r in rows) and logits["passed"] and generation["passed"],
        "first_divergence": _divergence(first_bad),
        "probes": rows, "logits": logits, "generation": generation,
        "sequence_length": int(length), "prompt_length": int(t),
        "timing": timing,
    }


def _divergence(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    keys = ("kind", "stack", "layer", "nrmse", "max_abs", "contributed_nrmse", "contributed_max_abs", "fp64", "error")
    return {"probe": row["name"], **{k: row.get(k) for k in keys}}
