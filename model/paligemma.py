"""PaliGemma 1 and 2: SigLIP vision tower -> linear projector -> Gemma / Gemma 2 decoder, with a static KV cache.

Numerics follow transformers 5.24 `PaliGemmaForConditionalGeneration` with eager attention and `token_type_ids`
passed (`../shared/reference/paligemma.md` traps 2-5, 13):
- image features are projected and *not* rescaled; only text embeddings get the sqrt(hidden) normaliser (5.4+);
- positions are 1-indexed (`cache index + 1`);
- prefill mask: image + prompt prefix (token_type_ids 0) bidirectional, suffix (1) causal, padding masked; the
  prefix block is also OR-ed onto Gemma 2's sliding-window mask;
- Gemma 2 logits are soft-capped at the end (re-applied by transformers from 5.23).

Typical use (see `pgconv.model.generate` for the full loop):

    model.setup_cache(batch, max_seq_len)
    logits = model(ids, pixel_values, tti, mask, input_pos=torch.arange(T), logits_to_keep=1)   # prefill
    logits = model(next_ids, None, ones, mask_so_far, input_pos=torch.tensor([T]))              # decode step
Shapes: B batch, T tokens, N image tokens, S cache length.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgconv.errors import InputError
from pgconv.model import cpu_kernels, ops
from pgconv.model.config import PaliGemmaConfig
from pgconv.model.gemma import AttnContext, GemmaDecoder
from pgconv.model.kv_cache import KVCache
from pgconv.model.siglip import SiglipVision

__all__ = ["PaliGemma"]


class PaliGemma(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = SiglipVision(cfg.vision)
        self.projector = cpu_kernels.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
        # The features `forward` hands to `embed`, as a module (no weights) so a hook sees them whatever computed
        # them: the parity probe `image_features` sits here, between the projector and the merged embeddings (a
        # port that rescales its features after the projector is caught there, not only in the generated text).
        self.image_tap = nn.Identity()
        self.text = GemmaDecoder(cfg.text)
        # Tied by default: logits use text.embed.weight (hub checkpoints carry no lm_head tensor).
        self.lm_head: nn.Linear | None = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    # -- pieces -----------------------------------------------------------------------------------------------------

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(I, 3, H, W) -> (I, N, d_text) for I images: vision tower + projector, no scaling (transformers >= 5.4)."""
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids: Tensor, image_features: Tensor | None = None) -> Tensor:
        """Scaled token embeddings with the image features scattered in at the `<image>` positions, in reading order:
        image i's N features fill the i-th block of N `<image>` tokens over the batch (several images per prompt
        take consecutive blocks), exactly as transformers' `masked_scatter`."""
        is_image = input_ids == self.cfg.image_token_index
        # <image> rows are overwritten below; looking up id 0 there keeps an out-of-vocab image id safe.
        x = self.text.embed_tokens(input_ids.masked_fill(is_image, 0))
        if image_features is None:
            return x
        n_tokens, n_features = int(is_image.sum()), image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise InputError(
                f"image features and <image> tokens do not match: input_ids hold {n_tokens} <image> tokens "
                f"(id {self.cfg.image_token_index}) but the images give {n_features} features "
                f"({image_features.shape[0]} x {image_features.shape[1]})"
            )
        # Features come out in the vision dtype; transformers casts them to the embedding dtype before the scatter.
        return x.masked_scatter(is_image[..., None], image_features.to(x.dtype))

    def attn_context(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        input_pos: Tensor | None = None,
        position_ids: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> AttnContext:
        """The `AttnContext` that `forward` gives every decoder block for these arguments.

        Call it with the same arguments as `forward` (only the shape and device of `input_ids` are used), then run
        a block standalone: `model.text.blocks[i](x, model.attn_context(ids, tti, mask))`. Without a cache
        (`input_pos=None`) keys span the T given tokens; with one they span the whole cache (S = max_seq_len) and
        `attention_mask` (B, <= S) covers every cached position so far. `position_ids` (B or 1, T) are the RoPE
        positions exactly as transformers takes them (already 1-indexed); by default `ops.rope_positions` of the
        cache index. dtype defaults to the embedding dtype (the activation dtype).
        """
        t = input_ids.shape[1]
        device = input_ids.device
        dtype = dtype or self.text.embed.weight.dtype
        if input_pos is None:
            q_pos, kv_len = torch.arange(t, device=device), t
        else:
            q_pos, kv_len = input_pos.to(device), self.cache_len
        covered = None if attention_mask is None else attention_mask.shape[-1]
        if covered is not None and (covered > kv_len or (input_pos is None and covered != t)):
            raise InputError(f"attention_mask covers {covered} positions but the keys span {kv_len}")
        if position_ids is None:
            position_ids = ops.rope_positions(q_pos)[None]
        if token_type_ids is not None:
            token_type_ids = token_type_ids.to(device)
        cache_pos = None if input_pos is None else q_pos
        return self.text.context(
            position_ids.to(device), q_pos, kv_len,
            token_type_ids=token_type_ids, padding_mask=attention_mask, dtype=dtype, cache_pos=cache_pos,
        )

    def logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states -> vocabulary logits (tied head; Gemma 2 final soft-cap)."""
        weight = self.text.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = cpu_kernels.linear(hidden, weight)
        if self.cfg.text.final_logit_softcap is not None:
            logits = ops.softcap(logits, self.cfg.text.final_logit_softcap)
        return logits

    # -- forward ----------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        input_pos: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int | None = None,
        return_hidden: bool = False,
        image_features: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T or logits_to_keep, vocab); with `return_hidden`, the final-norm hidden states (B, T, d)
        instead, so a caller can compute `logits(hidden)` for the positions it needs, a few at a time.

        Without `input_pos` this is a plain full forward (no cache). With `input_pos` (T,) the k/v are written into
        the cache at those positions and attention spans the cache; decode steps pass `pixel_values=None`, so the
        vision tower runs only at prefill. `token_type_ids` None means purely causal (transformers 5.24 eager
        without them); PaliGemma prompts want zeros over the prefix. `logits_to_keep=k` computes logits only for
        the last k positions (1 at prefill). `image_features` (B, image tokens, d), what `image_features(pixel_values)`
        returned for the same pixels, stands in for `pixel_values` (the vision tower does not run again).
        """
        if image_features is not None and pixel_values is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        features = image_features
        if features is None and pixel_values is not None:
            features = self.image_tap(self.image_features(pixel_values))
        x = self.embed(input_ids, features)
        ctx = self.attn_context(
            input_ids, token_type_ids, attention_mask, input_pos=input_pos, position_ids=position_ids, dtype=x.dtype
        )
        ctx.keep = logits_to_keep or None  # the last block skips the positions whose logits are not kept
        hidden = self.text(x, ctx)
        if return_hidden:
            return hidden
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.logits(hidden)

    # -- cache ------------------------------------------------------------------------------------------------------

    def setup_cache(
        self,
        batch: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Preallocate a (B, K, max_seq_len, D) key/value cache per decoder block (non-persistent buffers)."""
        t = self.cfg.text
        dtype = dtype or self.text.embed.weight.dtype
        device = device or self.text.embed.weight.device
        for block in self.text.blocks:
            block.attn.cache = KVCache(batch, t.num_kv_heads, max_seq_len, t.head_dim, dtype, device)

    def reset_cache(self) -> None:
        for block in self.text.blocks:
            if block.attn.cache is not None:
                block.attn.cache.reset()

    def remove_cache(self) -> None:
        for block in self.text.blocks:
            block.attn.cache = None

    @property
    def cache_len(self) -> int:
        cache = self.text.blocks[0].attn.cache if len(self.text.blocks) else None
        if cache is None:
            raise RuntimeError("no KV cache: call setup_cache(batch, max_seq_len) first")
        return cache.max_seq_len

    def ensure_cache(self, batch: int, min_seq_len: int) -> None:
        """Reuse the cache (zeroed) when it fits this batch, length, dtype and device; otherwise allocate one."""
        cache = self.text.blocks[0].attn.cache if len(self.text.blocks) else None
        weight = self.text.embed.weight
        fits = (
            cache is not None and cache.k.shape[0] == batch and cache.max_seq_len >= min_seq_len
            and cache.k.dtype == weight.dtype and cache.k.device == weight.device
        )
        if fits:
            self.reset_cache()
        else:
            self.setup_cache(batch, min_seq_len)
