"""The math of PaliGemma as small pure functions.

Modules call these through the module namespace (`ops.rms_norm(...)`), never via `from ops import ...`, so a test
can monkeypatch one function (e.g. `rms_norm` without the `+1`) and see which probe breaks. Every line whose dtype
matters says why; the reference is transformers 5.24 eager (`modeling_gemma.py`, `modeling_gemma2.py`,
`modeling_siglip.py`, `masking_utils.py`) and `../shared/reference/paligemma.md` §1.

Shapes: B batch, T query length, S key/value length, H heads, K kv heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "rms_norm",
    "gelu_tanh",
    "embed_scale",
    "softcap",
    "rope_inv_freq",
    "rope_cos_sin",
    "rotate_half",
    "apply_rope",
    "rope_positions",
    "padded_index",
    "attention",
    "prefix_lm_mask",
    "additive_mask",
]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Gemma RMSNorm: `x * rsqrt(mean(x²) + eps) * (1 + w)`; the weight is stored zero-centred."""
    # Computed in fp32 and cast back once at the end: Gemma does (x * w).to(dtype), Llama x.to(dtype) * w (HF #29402).
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


def gelu_tanh(x: Tensor, up: Tensor | None = None) -> Tensor:
    """`gelu_pytorch_tanh`: the tanh approximation used by both SigLIP and Gemma (exact GELU differs by ~1e-3);
    times `up` where given (Gemma's GeGLU `gelu(gate) * up`, one pass). On CPU in bf16 it runs on torch's `F.gelu`
    or pgconv's table of torch's own results, whichever is faster here (`cpu_kernels.gelu_tanh`: the same bits);
    elsewhere, and as the definition: `F.gelu(x, approximate="tanh")` (* up)."""
    from pgconv.model import cpu_kernels  # here, not at the top: ops stays importable without the kernels

    return cpu_kernels.gelu_tanh(x, up)


def embed_scale(hidden: int, dtype: torch.dtype) -> Tensor:
    """Gemma's embedding normaliser sqrt(hidden) rounded to the activation dtype (bf16 sqrt(2048) = 45.25, not 45.2548).

    transformers keeps it as an fp32 buffer `torch.tensor(hidden ** 0.5)` and casts it to the embedding weight dtype
    at use (`GemmaTextScaledWordEmbedding`); going through fp32 first reproduces that double rounding.
    """
    return torch.tensor(hidden**0.5, dtype=torch.float32).to(dtype)


def softcap(x: Tensor, cap: float) -> Tensor:
    """Gemma 2 soft-capping `tanh(x / cap) * cap` (division, not multiplication by 1/cap, as transformers does)."""
    return torch.tanh(x / cap) * cap


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> Tensor:
    """`1 / theta^(2i/D)` for i < D/2, in fp32 (the default RoPE of transformers)."""
    # fp32 on purpose: a bf16 inv_freq loses the high frequencies' precision.
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables (B, T, D) for integer `positions` (B, T), half-split layout `cat(freqs, freqs)`."""
    inv_freq = rope_inv_freq(head_dim, theta, positions.device)
    # Angles in fp32 (positions up to 8k times inv_freq), then cos/sin cast to the activation dtype like transformers.
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """`cat(-x2, x1)` over the two halves of the last dim (half-split, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by the tables (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rope_positions(index: Tensor) -> Tensor:
    """RoPE positions of tokens at 0-based `index`: transformers' PaliGemma positions are 1-indexed.

    big_vision uses 0-indexed positions; RoPE is relative so both agree up to rounding, but bit-level parity with
    transformers needs the +1 (`position_ids = cache_position + 1`).
    """
    return index + 1


def padded_index(attention_mask: Tensor) -> Tensor:
    """0-based index of each token among the real (unpadded) tokens of its row; padding gets 0.

    This is what `generate` in transformers uses as positions for left-padded batches (`cumsum - 1`, pads filled
    with 0) before PaliGemma adds its +1.
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, cap: float | None = None
) -> Tensor:
    """Eager attention: q (B, H, T, D), k/v (B, K, S, D), additive mask (B, 1, T, S) -> (B, H, T, D).

    Order as transformers eager: scores * scale, soft-cap (Gemma 2; before the mask), + mask, softmax.
    Query head h uses kv head h // (H / K), as transformers' `repeat_kv`, but k/v are never repeated: the H / K
    query heads of a group are stacked along the query axis, (B, K, H / K * T, D), and share one matmul with
    their kv head. Same dot products without copying the (S_max-long) cache every step (bf16 decode: 4x faster).
    """
    b, h, t, d = q.shape
    groups = k.shape[1]
    scores = torch.matmul(q.reshape(b, groups, h // groups * t, d), k.transpose(2, 3)).view(b, h, t, -1) * scale
    if cap is not None:
        scores = softcap(scores, cap)
    if mask is not None:
        scores = scores + mask
    # Softmax in fp32, probabilities cast back to the query dtype before the value matmul (transformers eager).
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs.view(b, groups, h // groups * t, -1), v).view(b, h, t, d)


def prefix_lm_mask(
    q_pos: Tensor,
    kv_len: int,
    token_type_ids: Tensor | None = None,
    padding_mask: Tensor | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Boolean "may attend" mask (B, 1, T, S) for queries at cache positions `q_pos` (T,) over keys 0..kv_len-1.

    As transformers 5.24 (`create_causal_mask` / `create_sliding_window_causal_mask` with `block_sequence_ids`):
    `((causal [and window]) or (both tokens in the prefix block)) and key not padding`.
    - causal: key index <= query index; sliding window (Gemma 2): key index > query index - window.
    - prefix block: `token_type_ids` (B, T) of *these* queries; 0 = prefix (bidirectional among the chunk's own
      prefix tokens, also past the sliding window: the overlay is OR-ed on top), 1 = causal suffix. None = causal.
    - padding_mask (B, L) with L <= kv_len: 1 = real token, 0 = padding; positions past L are masked.
    """
    device = q_pos.device
    kv = torch.arange(kv_len, device=device)
    allowed = kv[None, :] <= q_pos[:, None]  # (T, S)
    if sliding_window is not None:
        allowed = allowed & (kv[None, :] > q_pos[:, None] - sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if token_type_ids is not None:
        q_group = torch.where(token_type_ids == 0, 0, -1)  # (B, T)
        kv_group = q_group.new_full((q_group.shape[0], kv_len), -1).index_copy(1, q_pos, q_group)
        same_block = (q_group[:, :, None] == kv_group[:, None, :]) & (q_group[:, :, None] >= 0)
        allowed = allowed | same_block[:, None]
    if padding_mask is not None:
        pad = F.pad(padding_mask.to(device=device, dtype=torch.bool), (0, kv_len - padding_mask.shape[-1]))
        allowed = allowed & pad[:, None, None, :]
    return allowed


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where allowed, the dtype's most negative finite value elsewhere (transformers' eager mask, not -inf:
    a fully masked padding row then gives uniform weights instead of NaN)."""
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min)

