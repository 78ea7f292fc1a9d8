"""The logits processors transformers' `generate` builds from a generation config, as small pure functions.

Each takes the sequence so far `ids` (B, L: prompt, image tokens included, + generated) and fp32 `scores` (B, V)
and returns new scores, exactly as transformers 5.24's `generation/logits_process.py` (same order:
`GenerationMixin._get_logits_processor`). They change greedy choices, so `generate` must apply them for its tokens
to be transformers' (tests/test_logits_processors.py runs transformers' `generate` with each).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["apply_processors"]

_NEG_INF = float("-inf")


def repetition_penalty(ids: Tensor, scores: Tensor, penalty: float, pad_lengths: Tensor) -> Tensor:
    """Seen tokens' logits divided by `penalty` (multiplied when negative); left padding is not 'seen'."""
    v = scores.shape[-1]
    positions = torch.arange(ids.shape[1], device=ids.device)
    # transformers masks padding with the id V (one past the vocabulary) and scatters into a padded row.
    ids = ids.masked_fill(positions[None, :] < pad_lengths[:, None], v).clamp(max=v)
    padded = torch.nn.functional.pad(scores, (0, 1))
    seen = torch.gather(padded, 1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[..., :v]


def encoder_repetition_penalty(prompt: Tensor, scores: Tensor, penalty: float) -> Tensor:
    """The prompt's tokens raised (transformers passes a decoder-only model's prompt ids as the "encoder" ids):
    logits multiplied by `penalty` (divided when negative), padding included."""
    p = 1 / penalty
    seen = torch.gather(scores, 1, prompt)
    return scores.scatter(1, prompt, torch.where(seen < 0, seen * p, seen / p))


def no_repeat_ngram(ids: Tensor, scores: Tensor, n: int) -> Tensor:
    """Ban every token that would repeat an n-gram already in the sequence."""
    length = ids.shape[1]
    if length + 1 < n:
        return scores
    scores = scores.clone()
    for row, seq in enumerate(ids.tolist()):
        seen: dict[tuple[int, ...], list[int]] = {}
        for gram in zip(*(seq[i:] for i in range(n))):
            seen.setdefault(tuple(gram[:-1]), []).append(gram[-1])
        banned = seen.get(tuple(seq[length + 1 - n:length]), [])
        scores[row, banned] = _NEG_INF
    return scores


def bad_words(ids: Tensor, scores: Tensor, words: Sequence[Sequence[int]], eos: Sequence[int]) -> Tensor:
    """A banned sequence's last token is banned where the sequence so far ends with the rest of it (a one-token
    sequence always); a one-token sequence that is an eos id is dropped, as transformers does."""
    scores = scores.clone()
    seqs = ids.tolist()
    for word in words:
        if len(word) == 1 and word[0] in eos:
            continue
        *prefix, last = word
        for row, seq in enumerate(seqs):
            if len(prefix) <= len(seq) and (not prefix or seq[len(seq) - len(prefix):] == prefix):
                scores[row, last] = _NEG_INF
    return scores


def suppress(scores: Tensor, tokens: Sequence[int]) -> Tensor:
    scores = scores.clone()
    scores[:, [t for t in tokens if t < scores.shape[-1]]] = _NEG_INF
    return scores


def force(scores: Tensor, tokens: Sequence[int]) -> Tensor:
    out = torch.full_like(scores, _NEG_INF)
    out[:, list(tokens)] = 0
    return out


def apply_processors(ids: Tensor, scores: Tensor, processors: Mapping[str, Any], *, prompt_length: int,
                     max_length: int, eos: Sequence[int], pad_lengths: Tensor) -> Tensor:
    """`scores` after every processor in `processors` (`GenerationSettings.processors`), in transformers' order.
    `max_length`: prompt + max new tokens; `pad_lengths` (B,): each row's left padding."""
    length = ids.shape[1]
    p = processors
    if "encoder_repetition_penalty" in p:
        scores = encoder_repetition_penalty(ids[:, :prompt_length], scores, p["encoder_repetition_penalty"])
    if "repetition_penalty" in p:
        scores = repetition_penalty(ids, scores, p["repetition_penalty"], pad_lengths)
    if "no_repeat_ngram_size" in p:
        scores = no_repeat_ngram(ids, scores, p["no_repeat_ngram_size"])
    if "bad_words_ids" in p:
        scores = bad_words(ids, scores, p["bad_words_ids"], eos)
    # Both length rules only act when there is an eos to hold back.
    if eos and "min_length" in p and length < p["min_length"]:
        scores = suppress(scores, eos)
    if eos and "min_new_tokens" in p and length - prompt_length < p["min_new_tokens"]:
        scores = suppress(scores, eos)
    if "forced_bos_token_id" in p and length == 1:
        scores = force(scores, p["forced_bos_token_id"])
    if "forced_eos_token_id" in p and length == max_length - 1:
        scores = force(scores, p["forced_eos_token_id"])
    if "suppress_tokens" in p:
        scores = suppress(scores, p["suppress_tokens"])
    if "begin_suppress_tokens" in p:
        begin = prompt_length + (1 if prompt_length == 1 and "forced_bos_token_id" in p else 0)
        if length == begin:
            scores = suppress(scores, p["begin_suppress_tokens"])
    return scores
