"""Kernel choice for one-token (decode) steps on CPU: the only performance switch in the model.

A decode step multiplies one row (1, d) by every weight matrix, so it is bound by how fast a kernel streams the
weights from memory. For bf16, torch routes `F.linear` to oneDNN's brgemm, which streams a one-row product at
~11 GB/s per core (AMD EPYC Zen 4, torch 2.13); with oneDNN off, ATen's own vectorised dot-product GEMV streams
~22 GB/s and more. Both multiply bf16 exactly into fp32, accumulate in fp32 and round once (<= 0.54 ulp against
a float64 product, oneDNN 0.50), so parity is unaffected. For more than one row oneDNN's bf16 GEMM is ~9x faster
than ATen's, so prefill keeps it; so do the attention matmuls (ATen's bf16 `probs @ v` is 12x slower than
oneDNN's), which is why the switch wraps each weight product (`Linear`) and not a whole decode step.
Measurements: benchmarks/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["single_row_gemv", "Linear"]


@contextmanager
def single_row_gemv(x: Tensor) -> Iterator[None]:
    """Within the block, run the products of `x` on ATen's GEMV when `x` is one bf16 row on CPU; else no-op.

    The oneDNN switch is process-wide (torch has no per-call choice): another thread running a bf16 GEMM at the
    same time would take ATen's slower GEMM, with the same numerics. It is restored on exit.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    if rows != 1 or x.dtype != torch.bfloat16 or x.device.type != "cpu" or not torch._C._get_mkldnn_enabled():
        yield
        return
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose one-row bf16 products run on ATen's GEMV."""

    def forward(self, x: Tensor) -> Tensor:
        with single_row_gemv(x):
            return super().forward(x)
