"""Autoregressive generation with the static KV cache: greedy, temperature, top-k, top-p; batched, streaming.

Matches transformers' `generate` token for token under greedy decoding, left padding included:
- positions come from the attention mask (`cumsum - 1`, padding 0) plus PaliGemma's +1 (`ops.rope_positions`);
- prefill sees the prefix bidirectionally (token_type_ids 0), generated tokens are causal suffix tokens (1);
- the attention mask grows by one 1 per step for every row; finished rows emit `pad_token_id`;
- the vision tower runs once, at prefill; prefill computes logits only for the last position.
The sampling order is the one transformers' logits warpers use: temperature, then top-k, then top-p.
EOS, pad and the greedy-changing logits processors come from the checkpoint's generation settings as transformers
resolves them (`generation_config.GenerationSettings`: generation_config.json, else config.json's top level).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pgconv.errors import InputError
from pgconv.model import ops
from pgconv.model.generation_config import GenerationSettings, resolve_generation
from pgconv.model.logits_processors import apply_processors
from pgconv.model.paligemma import PaliGemma

__all__ = ["generate", "sample_next", "check_length", "settings_of"]



def check_length(prompt_tokens: int, max_new_tokens: int, max_positions: int, prompt: str = "--prompt",
                 new: str = "--max-new-tokens") -> None:
    """The prompt plus every new token must fit the text model's positions (max_position_embeddings): a larger
    max_new_tokens would only size the KV cache for it (terabytes for 10**11 tokens) and then fail. `prompt` and
    `new` name the inputs in the error (options for the CLI)."""
    if prompt_tokens >= max_positions:
        raise InputError(f"{prompt}: the prompt is {prompt_tokens} tokens (image tokens included) but the model "
                         f"has only {max_positions} positions (max_position_embeddings)")
    if prompt_tokens + max_new_tokens > max_positions:
        raise InputError(f"{new} {max_new_tokens}: the prompt is {prompt_tokens} tokens and the model has "
                         f"{max_positions} positions (max_position_embeddings), so at most "
                         f"{max_positions - prompt_tokens} new tokens fit")

def _filter_top_k(logits: Tensor, k: int) -> Tensor:
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: Tensor, p: float) -> Tensor:
    # As transformers' TopPLogitsWarper: drop the low tail whose total mass is <= 1 - p, keep at least one token.
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V); temperature 0 is greedy (argmax)."""
    # fp32 like transformers (`next_token_logits.to(torch.float32)`): bf16 ties and softmax would differ otherwise.
    logits = logits.float()
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        logits = _filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = _filter_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    # A NaN or +inf logit makes the distribution NaN, and torch.multinomial raises a bare RuntimeError (transformers
    # does). Greedy argmax still picks a token from such scores (as transformers' does), so only sampling stops here.
    if not bool(torch.isfinite(probs).all()):
        raise InputError("cannot sample the next token: the model's scores are NaN or infinite (the checkpoint holds "
                         "NaN/Inf weights, see `pgconv inspect --scan`, or float16 activations overflowed: use "
                         "--dtype bfloat16 or float32)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def settings_of(model: PaliGemma) -> GenerationSettings:
    """The generation settings `generate` uses by default: those `pgconv.load` read from the checkpoint's files
    (`model.generation`), else what transformers derives from the config.json this config writes."""
    settings = getattr(model, "generation", None)
    if settings is None:
        from pgconv.model.hf_config import to_hf_config

        settings = resolve_generation(to_hf_config(model.cfg), None, config_name="the model config")
    return settings


def _check_processor_ids(processors: dict, vocab: int, source: str) -> None:
    for key, v in processors.items():
        if key in ("suppress_tokens", "begin_suppress_tokens"):
            continue  # transformers ignores ids past the vocabulary there (isin over the vocabulary's ids)
        flat = [t for s in v for t in s] if key == "bad_words_ids" else (v if isinstance(v, list) else [])
        if any(not 0 <= t < vocab for t in flat):
            raise InputError(f"{source}: {key} holds a token id outside the vocabulary (0..{vocab - 1})")


@torch.no_grad()  # not inference_mode: cache buffers made here must stay writable by later plain forwards
def generate(
    model: PaliGemma,
    input_ids: Tensor,
    pixel_values: Tensor | None,
    token_type_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    on_token: Callable[[Tensor], None] | None = None,
    settings: GenerationSettings | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """New tokens (B, n) with n <= max_new_tokens (fewer when every row hit an EOS).

    `labels` (the processor's training labels) is accepted and unused, so `generate(model, **processor(...))` works.

    `input_ids` (B, T) left-padded, `attention_mask` (B, T) 1 for real tokens (default all ones),
    `token_type_ids` (B, T) 0 for the prefix (default: all prefix, what the processor gives a prompt).
    `on_token(tokens)` receives the (B,) tokens of each step as soon as they are chosen (pad for finished rows).
    `settings` (default `settings_of(model)`): eos and pad ids and the logits processors, as transformers'
    generation config has them; `eos_token_ids` / `pad_token_id` override its ids (() = never stop on a token).
    `seed` seeds a private torch.Generator (sampling only).
    """
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.text.embed.weight.device
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    tti = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.to(device)
    settings = settings_of(model) if settings is None else settings
    settings.check_supported(greedy=temperature <= 0.0)
    eos_ids = list(settings.eos_token_ids if eos_token_ids is None else eos_token_ids)
    pad = settings.pad_token_id if pad_token_id is None else pad_token_id
    pad = 0 if pad is None else pad  # no eos and no pad: rows never finish early, the value is never emitted
    processors = settings.processors
    _check_processor_ids(processors, model.cfg.text.vocab_size, settings.source)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    model.ensure_cache(b, t + max_new_tokens)
    # Room for every step's mask column, preallocated (0 = not a key yet).
    full_mask = torch.zeros((b, model.cache_len), dtype=torch.long, device=device)
    full_mask[:, :t] = mask

    index = ops.padded_index(mask)  # 0-based index among real tokens, as transformers' generate
    logits = model(
        input_ids, pixel_values, tti, full_mask[:, :t],
        input_pos=torch.arange(t, device=device), position_ids=ops.rope_positions(index), logits_to_keep=1,
    )[:, -1]
    next_index = index[:, -1:] + 1
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    pad_lengths = (mask != 0).int().argmax(dim=1)  # left padding, which transformers' repetition penalty skips
    seq = input_ids  # what transformers' logits processors see: prompt (image tokens included) + new tokens
    out: list[Tensor] = []
    suffix = torch.ones((b, 1), dtype=tti.dtype, device=device)  # generated tokens are causal suffix tokens
    for step in range(max_new_tokens):
        if processors:  # on fp32 scores, before the warpers, as transformers
            logits = apply_processors(seq, logits.float(), processors, prompt_length=t, max_length=t + max_new_tokens,
                                      eos=eos_ids, pad_lengths=pad_lengths)
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        out.append(token)
        if processors:
            seq = torch.cat([seq, token[:, None]], 1)
        if on_token is not None:
            on_token(token)
        finished = finished | torch.isin(token, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        pos = t + step
        full_mask[:, pos] = 1
        logits = model(
            token[:, None], None, suffix, full_mask[:, : pos + 1],
            input_pos=torch.tensor([pos], device=device), position_ids=ops.rope_positions(next_index),
        )[:, -1]
        next_index = next_index + 1
    return torch.stack(out, dim=1)
