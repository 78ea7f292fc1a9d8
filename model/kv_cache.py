"""Static, preallocated KV cache (gpt-fast style).

One `KVCache` per decoder block holds keys and values as (B, K, S_max, D) buffers registered with
`persistent=False`, so a cache never enters a state dict and converted checkpoints compare 1:1. New entries are
written in place at their cache positions (`index_copy_`); nothing ever grows with `torch.cat`, so shapes stay
static (friendly to CUDA graphs / torch.compile) and attention always runs over the full S_max keys with the
unwritten tail masked out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["KVCache"]


class KVCache(nn.Module):
    def __init__(
        self,
        batch: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_seq_len, head_dim)
        # Zeros, not empty: masked keys still enter `0 * v` and `score + mask`, and garbage NaN/inf would leak.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, K, T, D) at cache positions `input_pos` (T,); return the whole (B, K, S_max, D) cache."""
        # The cache keeps its own dtype (normally the activation dtype); cast what is written, not what is stored.
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
