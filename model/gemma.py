"""Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) decoder.

Gemma: RMSNorm with `(1 + w)` in fp32, GeGLU MLP with tanh-GELU, MQA/GQA attention with half-split RoPE, softmax in
fp32. Gemma 2 adds a norm after attention and after the MLP, attention-logit soft-capping, query scaling by
`query_pre_attn_scalar` and a sliding window on the layers its config marks as sliding. References: transformers
5.24 `models/gemma/modeling_gemma.py`, `models/gemma2/modeling_gemma2.py`; big_vision `models/ppp/gemma.py`.

A block is `forward(x, ctx)`: everything position-dependent (RoPE tables, masks, cache write positions) lives in
one `AttnContext` built once per forward (`PaliGemma.attn_context`), so a block can be run standalone on captured
inputs with the exact context the model used.
Shapes: B batch, T tokens, S key length, H heads, K kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pgconv.model import ops
from pgconv.model.config import TextConfig
from pgconv.model.cpu_kernels import Linear  # nn.Linear with a fast one-row (decode) bf16 kernel
from pgconv.model.kv_cache import KVCache

__all__ = ["AttnContext", "RMSNorm", "Attention", "MLP", "DecoderBlock", "GemmaDecoder"]


@dataclass
class AttnContext:
    """Everything a decoder block needs besides its input.

    cos, sin: RoPE tables (B or 1, T, D) in the activation dtype.
    mask: additive mask (B or 1, 1, T, S) for full-attention layers (0 = attend, dtype min = masked).
    sliding_mask: the same for sliding-window layers (Gemma 2), None when no layer slides.
    input_pos: (T,) cache positions to write k/v at, or None to attend only within the given tokens (no cache).
    keep: the last block computes queries, attention output and MLP only for the last `keep` tokens (a prefill
      whose other positions nobody reads: 1/num_layers of the decoder's FLOPs); it still writes all k/v.
    """

    cos: Tensor
    sin: Tensor
    mask: Tensor
    sliding_mask: Tensor | None = None
    input_pos: Tensor | None = None
    keep: int | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        # Zero-centred: the norm multiplies by (1 + weight), so zeros are the identity scale.
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale  # head_dim**-0.5 (Gemma) or query_pre_attn_scalar**-0.5 (Gemma 2)
        self.cap = cfg.attn_logit_softcap
        self.sliding = cfg.is_sliding(layer)
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q = Linear(cfg.hidden_size, q_dim, bias=False)
        self.k = Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v = Linear(cfg.hidden_size, kv_dim, bias=False)
        self.o = Linear(q_dim, cfg.hidden_size, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, ctx: AttnContext, keep: int | None = None) -> Tensor:
        """(B, T, d) -> (B, T, d); with `keep`, keys and values for all T but queries (and output) for the last
        `keep` tokens only (the last block of a prefill whose other positions nobody reads)."""
        b, t, _ = x.shape
        tq = t if keep is None else min(keep, t)
        cos_q, sin_q = ctx.cos[:, t - tq:], ctx.sin[:, t - tq:]
        q = self.q(x[:, t - tq:]).view(b, tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, D)
        k = self.k(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = ops.apply_rope(q, cos_q, sin_q), ops.apply_rope(k, ctx.cos, ctx.sin)
        if ctx.input_pos is not None:
            if self.cache is None:
                raise RuntimeError("input_pos given but no KV cache: call PaliGemma.setup_cache first")
            k, v = self.cache.update(ctx.input_pos, k, v)  # (B, K, S_max, D)
        mask = ctx.sliding_mask if self.sliding else ctx.mask
        out = ops.attention(q, k, v, mask[:, :, t - tq:], self.scale, self.cap)
        return self.o(out.transpose(1, 2).reshape(b, tq, -1))


class MLP(nn.Module):
    """GeGLU: `down(gelu_tanh(gate(x)) * up(x))`."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(ops.gelu_tanh(self.gate(x), self.up(x)))  # gelu_tanh(gate) * up, in one pass


class DecoderBlock(nn.Module):
    """Gemma: `x + attn(attn_norm(x))`, `+ mlp(mlp_norm(.))`. Gemma 2 normalises each branch output as well."""

    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(d, eps) if cfg.has_post_norms else None
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = MLP(cfg)
        self.post_mlp_norm = RMSNorm(d, eps) if cfg.has_post_norms else None

    def forward(self, x: Tensor, ctx: AttnContext, keep: int | None = None) -> Tensor:
        """(B, T, d) -> (B, T, d), or (B, keep, d) for the last `keep` tokens (see `Attention.forward`)."""
        h = self.attn(self.attn_norm(x), ctx, keep)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x[:, x.shape[1] - h.shape[1]:] + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class GemmaDecoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Token embeddings times sqrt(hidden), the normaliser rounded to the embedding dtype (Gemma, HF 5.4+)."""
        return self.embed(input_ids) * ops.embed_scale(self.cfg.hidden_size, self.embed.weight.dtype)

    def context(
        self,
        positions: Tensor,
        q_pos: Tensor,
        kv_len: int,
        *,
        token_type_ids: Tensor | None,
        padding_mask: Tensor | None,
        dtype: torch.dtype,
        cache_pos: Tensor | None,
    ) -> AttnContext:
        """Build the `AttnContext` for queries at cache indices `q_pos` (T,) with RoPE `positions` (B or 1, T)."""
        cfg = self.cfg
        cos, sin = ops.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)
        full = ops.prefix_lm_mask(q_pos, kv_len, token_type_ids, padding_mask)
        # The eager mask is additive in the activation dtype (transformers passes inputs_embeds.dtype).
        mask = ops.additive_mask(full, dtype)
        sliding = None
        if any(cfg.is_sliding(i) for i in range(cfg.num_layers)):
            win = ops.prefix_lm_mask(q_pos, kv_len, token_type_ids, padding_mask, cfg.sliding_window)
            sliding = ops.additive_mask(win, dtype)
        return AttnContext(cos, sin, mask, sliding, cache_pos)

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        """Embedded inputs (B, T, d) -> final-normed hidden states (B, T, d), or (B, ctx.keep, d)."""
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, ctx.keep if i == len(self.blocks) - 1 else None)
        return self.norm(x)
