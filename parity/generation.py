"""Generation-level parity: greedy decoding on both models, the first divergent token, cached vs uncached decode.

- The reference decodes with transformers' own `generate` (greedy, its KV cache); ours with `pgconv.generate` (our
  static cache), observed through a forward hook on our model that records each step's last-position logits.
- At the first token where they differ, the top-1/top-2 log-prob margins of both are reported; when both models
  see a near tie (each one's margin between the two candidate tokens below the dtype's `near_tie_nats`), the
  divergence is rounding deciding a coin toss and is reported as such, not as a failure (vLLM's top-N rule and
  Model Explorer's margin, parity.md §6).
- Teacher-forced per-step KL / top-1 over the reference's tokens come from the full forward on prompt + reference
  tokens that the probes already ran (llama-perplexity's `--kl-divergence`, parity.md §5).
- Our cached decode is checked against our own uncached forward over the same tokens.
- Speculative reference tokens (`speculate`): our greedy tokens come first; the reference's uncached forward over
  prompt + our tokens (which the probes need anyway) predicts each of them. When its argmax is our token at every
  step (the EOS that ends ours included) and every step's top-1/top-2 margin is above `SPECULATION_MARGIN` x
  `near_tie_nats`, the reference's own greedy tokens are ours (by induction over the steps: each step's prefix is
  the same, so is its argmax), and its cached `generate` could only choose otherwise at a near tie, which the margin
  excludes; `generate` is then not run. Otherwise it is (`parity.case`). The proof holds under the reference's own
  generation config (`reference_settings`: what transformers' `generate` resolves, not pgconv's reading of the
  files): no token before the last is one of its eos ids, and the last is one or the length limit was reached;
  greedy-changing logits processors disable it.
- `config_check`: pgconv's generation settings (`pgconv.model.generation_config`) against transformers' resolved
  generation config: eos ids, pad id, logits processors. A difference means the two `generate`s stop or choose
  differently on the same logits, which the token comparison alone could miss (it is a failure).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pgconv.parity.metrics import decisive, logit_metrics, top2_margin

__all__ = ["speculate", "greedy_changers", "active_fields", "SPECULATION_MARGIN", "reference_greedy", "ours_greedy", "first_divergence",
           "decisive_top1", "compare_steps", "step_metrics", "reference_settings", "config_check"]


SPECULATION_MARGIN = 2.0  # x near_tie_nats: the reference's cached logits differ from its uncached ones far less


# Fields of transformers' resolved generation config that cannot change a greedy single-beam decode of a given
# length (ids, lengths, sampling and search options that verify overrides, outputs, caches, assistants). Every
# other field with a non-default value may change what `generate` returns: it disables the speculation, and
# `config_check` fails unless pgconv applies it too (`GREEDY_PROCESSORS`). Unknown fields count as changing.
_INERT = {
    "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "max_length", "max_new_tokens",
    "do_sample", "temperature", "top_k", "top_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_p", "top_h",
    "num_beams", "num_return_sequences", "early_stopping", "length_penalty", "diversity_penalty", "num_beam_groups",
    "use_cache", "cache_implementation", "cache_config", "return_dict_in_generate", "output_scores", "output_logits",
    "output_attentions", "output_hidden_states", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "prompt_lookup_num_tokens",
    "max_matching_ngram_size", "assistant_early_exit", "transformers_version", "compile_config", "disable_compile",
    "is_assistant", "generation_kwargs", "use_mtp",
}


def active_fields(generation_config: Any) -> dict[str, Any]:
    """transformers' generation config fields set to something else than `generate`'s global defaults (None,
    empty, or the value of `GenerationConfig._get_default_generation_params()` count as unset)."""
    defaults = type(generation_config)._get_default_generation_params()
    out = {}
    for k, v in generation_config.to_dict().items():
        if k.startswith("_") or v is None or (isinstance(v, (list, tuple, dict, set)) and not v):
            continue
        if k in defaults and v == defaults[k]:
            continue
        out[k] = v
    return out


def greedy_changers(generation_config: Any) -> list[str]:
    """The fields of transformers' generation config that may make its greedy `generate` differ from the argmax
    of the model's logits (any active field not in `_INERT`); speculation is not tried when there is any."""
    if generation_config is None:
        return []
    return sorted(k for k in active_fields(generation_config) if k not in _INERT)


def reference_settings(ref: nn.Module) -> dict[str, Any]:
    """What transformers' `generate()` on `ref` resolves from its generation config (its own code:
    `_prepare_generation_config` then the eos/pad rules of `_prepare_special_tokens`): {eos_token_ids, pad_token_id,
    processors (the `GREEDY_PROCESSORS` fields with non-neutral values), source}."""
    from pgconv.model.generation_config import GENERATE_DEFAULTS, GREEDY_PROCESSORS

    try:
        gc, _ = ref._prepare_generation_config(None)
        source = "transformers generate (_prepare_generation_config)"
    except (AttributeError, TypeError, ValueError):  # private API moved or refused: the stored config + defaults
        import copy

        gc = copy.deepcopy(ref.generation_config)
        for k, v in GENERATE_DEFAULTS.items():
            if getattr(gc, k, None) is None:
                setattr(gc, k, v)
        source = "model.generation_config + defaults"
    eos = gc.eos_token_id
    eos = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)])
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else None)
    processors = {}
    if gc.min_new_tokens is not None:  # `_prepare_generated_length` overwrites a stated min_length
        gc.min_length = None
    for k, neutral in GREEDY_PROCESSORS.items():
        v = getattr(gc, k, None)
        if v is None or v == neutral or (isinstance(v, (list, tuple)) and not v):
            continue
        processors[k] = list(v) if isinstance(v, (list, tuple)) else ([v] if k.startswith("forced_") else v)
    # Every field that may change a greedy decode, from transformers' config itself (not from pgconv's list).
    active = active_fields(gc)
    changing = {k: active[k] for k in greedy_changers(gc) if k not in GREEDY_PROCESSORS}
    return {"eos_token_ids": eos, "pad_token_id": pad, "processors": processors, "unapplied": changing,
            "source": source}


def config_check(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """pgconv's generation settings (`GenerationSettings.summary()`) against `reference_settings`."""
    diffs = [f"{k}: pgconv {ours[k]!r}, transformers {theirs[k]!r}" for k in ("eos_token_ids", "pad_token_id",
                                                                           "processors") if ours[k] != theirs[k]]
    diffs += [f"transformers' generation config sets {k}={v!r}, which pgconv's generate does not apply"
              for k, v in theirs.get("unapplied", {}).items()]
    return {"passed": not diffs, "differences": diffs, "pgconv": ours, "transformers": theirs}


@torch.no_grad()
def speculate(ref_steps: Tensor, tokens: list[int], near_tie: float, changers: list[str] = (),
              eos: list[int] = (), max_new_tokens: int | None = None) -> dict[str, Any]:
    """Whether `tokens` are provably the reference's greedy tokens, from its uncached logits (n, V) at the positions
    predicting them (see the module docstring): {accepted, reason, step (first failing step or None), min_margin,
    margin_needed}. `changers`: `greedy_changers` of the reference's generation config (any: not accepted).
    `eos`, `max_new_tokens`: the reference's eos ids (`reference_settings`) and length limit: its `generate` stops
    at the first of them, so `tokens` must hold none before the last and end on one or at the limit."""
    need = SPECULATION_MARGIN * near_tie
    if changers:
        return {"accepted": False, "reason": f"the reference's generation config changes greedy choices "
                                             f"({', '.join(changers)})", "step": None, "min_margin": None,
                "margin_needed": need}
    if ref_steps.shape[0] != len(tokens) or not tokens:
        return {"accepted": False, "reason": "no steps", "step": None, "min_margin": None, "margin_needed": need}
    vals, ids = torch.log_softmax(ref_steps.double(), -1).topk(2, -1)
    top1, margins = ids[:, 0].tolist(), (vals[:, 0] - vals[:, 1]).tolist()
    out: dict[str, Any] = {"accepted": True, "reason": None, "step": None, "min_margin": min(margins),
                           "margin_needed": need}
    for i, (a, b, m) in enumerate(zip(top1, tokens, margins)):
        if a != b:
            out.update(accepted=False, step=i, reason=f"the reference's argmax differs at step {i}")
            break
        if not m > need:
            out.update(accepted=False, step=i, reason=f"near tie at step {i} (margin {m:.3g} nats)")
            break
        if b in eos and i < len(tokens) - 1:
            out.update(accepted=False, step=i, reason=f"token {b} at step {i} is one of the reference's eos ids "
                                                      f"{list(eos)}: its generate stops there")
            break
    else:
        if max_new_tokens is not None and tokens[-1] not in eos and len(tokens) < max_new_tokens:
            out.update(accepted=False, step=len(tokens) - 1,
                       reason=f"the tokens end on {tokens[-1]}, not one of the reference's eos ids {list(eos)}, "
                              f"before the {max_new_tokens}-token limit")
    return out


@torch.no_grad()
def reference_greedy(ref: nn.Module, inputs: dict[str, Tensor], n: int) -> tuple[list[int], Tensor]:
    """(tokens, per-step logits (n, V)) from transformers' greedy `generate` under its own generation config (its
    eos and pad ids and logits processors: nothing of pgconv's reading is passed in; it stops after an EOS)."""
    out = ref.generate(
        **inputs, max_new_tokens=n, do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True,
        use_cache=True,
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, torch.stack([lg[0] for lg in out.logits]).float()


@torch.no_grad()
def ours_greedy(model: nn.Module, inputs: dict[str, Tensor], n: int, settings: Any) -> tuple[list[int], Tensor]:
    """(tokens, per-step cached logits (n, V)) from `pgconv.generate` under `settings` (`GenerationSettings`:
    eos, pad, logits processors), the logits read by a forward hook (raw, before the processors)."""
    from pgconv.model.generate import generate

    steps: list[Tensor] = []
    handle = model.register_forward_hook(lambda m, args, out: steps.append(out[0, -1].detach().float()))
    try:
        tokens = generate(
            model, inputs["input_ids"], inputs["pixel_values"], inputs["token_type_ids"], inputs["attention_mask"],
            max_new_tokens=n, settings=settings,
        )
    finally:
        handle.remove()
    return tokens[0].tolist(), torch.stack(steps)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (a shorter sequence diverges where it ends); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def decisive_top1(ours: Tensor, ref: Tensor, near_tie: float) -> dict[str, Any]:
    """Top-1 agreement where the reference's top-1/top-2 margin exceeds `near_tie` nats (others are coin tosses)."""
    return decisive(logit_metrics(ours, ref), near_tie)


def _margins(logits: Tensor, a: int, b: int) -> dict[str, Any]:
    top1, top2, margin = top2_margin(logits)
    lp = torch.log_softmax(logits.double(), -1)
    return {"top1": top1, "top2": top2, "top1_top2_margin": margin, "gap": float(lp[a] - lp[b])}


def compare_steps(
    ref_tokens: list[int], ref_steps: Tensor, ours_tokens: list[int], ours_steps: Tensor, near_tie: float,
    decode: Any,
) -> dict[str, Any]:
    """Generation summary: tokens, texts (via `decode`), first divergence with margins and its near-tie status."""
    j = first_divergence(ref_tokens, ours_tokens)
    summary: dict[str, Any] = {
        "reference_tokens": ref_tokens, "candidate_tokens": ours_tokens,
        "reference_text": decode(ref_tokens), "candidate_text": decode(ours_tokens),
        "tokens_equal": j is None, "first_divergence": None, "passed": True,
    }
    if j is None:
        return summary
    if j >= min(len(ref_tokens), len(ours_tokens)):  # one side stopped (EOS) earlier: not a token choice to weigh
        summary["first_divergence"] = {"step": j, "reference_token": _at(ref_tokens, j),
                                       "candidate_token": _at(ours_tokens, j), "near_tie": False,
                                       "reason": "lengths differ"}
        summary["passed"] = False
        return summary
    r, o = ref_tokens[j], ours_tokens[j]
    ref_m, ours_m = _margins(ref_steps[j], r, o), _margins(ours_steps[j], o, r)
    # Both models must see the two candidates within `near_tie` nats of each other for a coin toss.
    tie = ref_m["gap"] <= near_tie and ours_m["gap"] <= near_tie
    summary["first_divergence"] = {
        "step": j, "reference_token": r, "candidate_token": o, "reference_piece": decode([r]),
        "candidate_piece": decode([o]), "reference": ref_m, "candidate": ours_m, "near_tie": tie,
        "near_tie_nats": near_tie,
    }
    summary["passed"] = tie
    return summary


def _at(tokens: list[int], j: int) -> int | None:
    return tokens[j] if j < len(tokens) else None


def step_metrics(ours: Tensor, ref: Tensor, near_tie: float) -> dict[str, Any]:
    """Per-step KL / top-1 / top-5 with the decisive top-1 agreement, for step logits (n, V)."""
    m = logit_metrics(ours, ref)
    keep = ("kl_mean", "kl_max", "top1_agreement", "top5_overlap", "kl", "top1")
    return {**{k: m[k] for k in keep}, **decisive(m, near_tie)}
