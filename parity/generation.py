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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pgconv.parity.metrics import decisive, logit_metrics, top2_margin

__all__ = ["reference_greedy", "ours_greedy", "first_divergence", "decisive_top1", "compare_steps", "step_metrics"]


@torch.no_grad()
def reference_greedy(ref: nn.Module, inputs: dict[str, Tensor], n: int, eos: list[int],
                     pad: int) -> tuple[list[int], Tensor]:
    """(tokens, per-step logits (n, V)) from transformers' greedy `generate` (stops after an EOS)."""
    out = ref.generate(
        **inputs, max_new_tokens=n, do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True,
        eos_token_id=eos, pad_token_id=pad, use_cache=True,
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, torch.stack([lg[0] for lg in out.logits]).float()


@torch.no_grad()
def ours_greedy(model: nn.Module, inputs: dict[str, Tensor], n: int, eos: list[int], pad: int,
                prefilled: Tensor | None = None) -> tuple[list[int], Tensor]:
    """(tokens, per-step cached logits (n, V)) from `pgconv.generate`, the logits read by a forward hook.

    `prefilled` (1, V): the prompt's last-position logits from a forward that already filled the KV cache with the
    prompt (`generate`'s `prefilled`); it is the first step's logits."""
    from pgconv.model.generate import generate

    steps: list[Tensor] = [] if prefilled is None else [prefilled[0].detach().float()]
    handle = model.register_forward_hook(lambda m, args, out: steps.append(out[0, -1].detach().float()))
    try:
        tokens = generate(
            model, inputs["input_ids"], inputs["pixel_values"], inputs["token_type_ids"], inputs["attention_mask"],
            max_new_tokens=n, eos_token_ids=eos, pad_token_id=pad, prefilled=prefilled,
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
