"""Which CPU kernel runs a weight product: the model's only performance switch (same math, fp32 accumulation).

torch picks a kernel by dtype, and on this CPU (AMD EPYC Zen 4, AVX-512 + bf16, torch 2.13) two of its picks
leave much speed unused (measurements: benchmarks/RESULTS.md):
- One bf16 row (a decode step): `F.linear` goes to oneDNN's brgemm, which streams weights at 15-17 GB/s on 2
  threads; with oneDNN off, ATen's vectorised dot-product GEMV streams 17-29 GB/s (the 3B head and MLP: 29). For
  more rows oneDNN's bf16 GEMM is ~9x faster than ATen's, so prefill keeps it; so do the attention matmuls
  (ATen's bf16 `probs @ v` is 12x slower).
- fp32: `F.linear` goes to MKL, whose one-row SGEMV streams 17-18 GB/s on 2 threads and whose SGEMM runs
  91-149 GFLOPS; oneDNN's AVX-512 kernels (`mkldnn::_linear_pointwise`, what inductor uses on CPU) stream
  26-33 GB/s and run 101-203 GFLOPS at the same shapes.
Every path multiplies exactly (bf16 x bf16 is exact in fp32), accumulates in fp32 and rounds once, so results
differ from `F.linear` only in summation order (fp32 noise; <= 0.54 bf16 ulp against float64 for one bf16 row).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["single_row_gemv", "linear", "Linear"]

# Private op, present in CPU builds with oneDNN; without it fp32 products stay on F.linear.
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


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


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` on the fastest CPU kernel for its shape and dtype (see the module docstring)."""
    # Always as a 2-D product: a strided 3-D slice such as hidden[:, -1:] fails matmul's fold check and goes
    # through bmm, which copies the whole transposed weight (27 s for the 3B head in bf16).
    x2 = x.reshape(-1, x.shape[-1])
    fp32 = x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and _ONEDNN_LINEAR is not None
    # The oneDNN op has no autograd formula: only when no gradient can flow through it.
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if fp32 and not needs_grad:
        out = _ONEDNN_LINEAR(x2, weight, bias, "none", [], "")
    else:
        with single_row_gemv(x2):
            out = F.linear(x2, weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose product runs on `linear`'s kernel choice."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
