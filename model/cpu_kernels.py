"""Which CPU kernel runs a weight product: chosen by measurement on this machine, the same math on every path.

torch offers several kernels for `F.linear` on CPU and which is fastest depends on the CPU (measurements:
benchmarks/RESULTS.md, `python -m benchmarks.kernels`). On an AMD EPYC Zen 4 (AVX-512 + bf16, no AMX), one bf16
row streamed 17-29 GB/s through ATen's GEMV (oneDNN off) but 15-17 GB/s through torch's default (oneDNN brgemm),
and oneDNN's fp32 kernels beat MKL's; on an Intel Xeon with AMX torch's defaults won. So for each distinct
(dtype, weight shape, bias, rows bucket) the first product times every candidate in `KERNELS` on the real weight
and input (`pgconv.tuning.measure`: a warm-up, then the fastest of a few interleaved calls) and keeps the fastest
(torch's default unless another beats it by `MARGIN`), for this process and, cached per (CPU model and ISA, torch
version, thread count), for every later one.
`PGCONV_KERNELS=default` turns this off (torch's own picks); `PGCONV_KERNELS=<kernel>` forces one where it applies.

Candidates (only bf16 and fp32 products are measured; other dtypes, other devices and products that need a
gradient take `F.linear`):
- `default`: `F.linear` (bf16: oneDNN; fp32: MKL);
- `aten`: `F.linear` with oneDNN switched off (bf16: ATen's GEMV/GEMM; for fp32 this is `default` again, so it is
  not a candidate there). The switch is process-wide (torch has no per-call choice): another thread running a bf16
  product at the same time takes ATen too, with the same numerics;
- `onednn`: `mkldnn::_linear_pointwise`, what inductor uses on CPU (bf16 and fp32);
- `gemv`: pgconv's own one-row kernel (`model/cpu_gemv.py`, `csrc/gemv.c`: AVX-512 where the CPU has it, built
  once per machine with the system C compiler; absent without one), for decode products (one row) only. torch's
  one-row kernels reached 60-65 % of what `sum` streams on the EPYCs we run on; this one only streams.
Prepacked weights (`mkldnn::_reorder_linear_weight`, `mkl::_mkl_reorder_linear_weight`) are not candidates: the
packed copy would sit next to the parameter (the state dict and the tied head keep the plain one), doubling the
weights' memory.
Every candidate multiplies exactly (bf16 x bf16 is exact in fp32), accumulates in fp32 and rounds once
(tests/test_cpu_kernels.py checks each against float64), so they differ only in summation order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgconv import tuning
from pgconv.errors import InputError
from pgconv.model import cpu_gemv

__all__ = ["linear", "Linear", "gelu_tanh", "ACTIVATIONS", "KERNELS", "Choice", "candidates", "choices", "describe",
           "reset", "ENV"]

ENV = "PGCONV_KERNELS"  # auto (unset) | default | a name in KERNELS
PROBE_BUDGET_S = 60.0  # per process: past it, products not yet decided take `default` (and are measured next time)
MARGIN = 1.03  # another kernel must beat torch's default by 3 % to replace it

# Private op, present in CPU builds with oneDNN; without it `onednn` is no candidate.
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def _default(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x, w, b)


def _aten(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    if not torch._C._get_mkldnn_enabled():
        return F.linear(x, w, b)
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, w, b)
    finally:
        torch._C._set_mkldnn_enabled(True)


def _onednn(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return _ONEDNN_LINEAR(x, w, b, "none", [], "")


KERNELS = {"default": _default, "aten": _aten, "onednn": _onednn, "gemv": cpu_gemv.gemv}
MEASURED = (torch.bfloat16, torch.float32)


def candidates(dtype: torch.dtype, rows: int = 1) -> list[str]:
    """The kernels worth timing for a product in `dtype` with `rows` rows of x on this build (`default` first:
    it wins ties)."""
    if dtype not in MEASURED:
        return ["default"]
    names = ["default"]
    if dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        names.append("aten")
    if _ONEDNN_LINEAR is not None:
        names.append("onednn")
    if rows == 1 and cpu_gemv.available():
        names.append("gemv")
    return names


@dataclass
class Choice:
    """The kernel one kind of product runs, and where the decision came from."""

    key: str  # e.g. "linear bfloat16 2048->16384 rows=1"
    kernel: str
    source: str  # measured | cached | default (PGCONV_KERNELS=default) | forced | only candidate | over budget
    times_s: dict[str, float] = field(default_factory=dict)  # fastest call per candidate, when measured


_lock = threading.Lock()
_chosen: dict[tuple, Choice] = {}  # (threads, mode, dtypes, shape, bias, rows bucket) -> decision, this process
_decisions: dict[int, tuning.Decisions] = {}  # threads -> cache file
_spent = [0.0]  # probe seconds this process


def reset() -> None:
    """Forget this process's decisions (tests; the cache files stay)."""
    with _lock:
        _chosen.clear()
        _decisions.clear()
        _spent[0] = 0.0


def choices() -> list[Choice]:
    """This process's decisions, in the order the products first ran."""
    with _lock:
        return list(_chosen.values())


def describe(c: Choice) -> str:
    times = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in sorted(c.times_s.items(), key=lambda kv: kv[1]))
    return f"{c.key}: {c.kernel} ({c.source}{': ' + times if times else ''})"


def _machine_key(threads: int) -> dict:
    return {"cpu": tuning.cpu_model(), "cpu_signature": tuning.cpu_signature(), "isa": tuning.cpu_isa(),
            "torch": torch.__version__, "threads": threads}


def _rows_bucket(rows: int) -> int:
    """1 (decode) or the power of two at or above `rows`, capped at 4096: a prompt's few hundred rows and the
    vision tower's 256 per image each get their own measurement, without one per prompt length."""
    return 1 if rows <= 1 else min(1 << (rows - 1).bit_length(), 4096)


def _mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", *KERNELS, *ACTIVATIONS):
        raise InputError(f"{ENV}={mode!r}: expected auto, " + ", ".join({**KERNELS, **ACTIVATIONS}))
    return mode


def choose(x2: Tensor, weight: Tensor, bias: Tensor | None) -> Choice:
    """The kernel for `F.linear(x2, weight, bias)` (x2 2-D, on CPU, no gradient), measuring it if not yet known."""
    mode, threads = _mode(), torch.get_num_threads()
    n, k = weight.shape
    bucket = _rows_bucket(x2.shape[0])
    slot = (threads, mode, x2.dtype, weight.dtype, n, k, bias is not None, bucket)
    if (hit := _chosen.get(slot)) is not None:  # the per-call path: one dict lookup
        return hit

    return _decide(slot, mode, threads,
                   lambda: (f"linear {str(x2.dtype).removeprefix('torch.')} {k}->{n}"
                            f"{' +bias' if bias is not None else ''} rows{'=' if bucket == 1 else '<='}{bucket}"),
                   lambda: candidates(x2.dtype, bucket) if x2.dtype == weight.dtype else ["default"],
                   lambda names: ({name: partial(KERNELS[name], x2, weight, bias) for name in names},
                                  _evictor(weight)))


def _decide(slot: tuple, mode: str, threads: int, key: Callable[[], str], candidates: Callable[[], list[str]],
            calls: Callable[[list[str]], tuple[dict, Callable[[], object] | None]]) -> Choice:
    """The decision for `slot`, made once per process: `key()` names it in the cache, `candidates()` lists the
    kernels that apply (`default` first), `calls(names)` gives what `_measured` times (name -> no-argument call)
    and what runs before each timed call (or None)."""
    with _lock:
        if (hit := _chosen.get(slot)) is not None:
            return hit
        if mode == "default":  # torch's own picks: nothing measured, pgconv's library never loaded (or built)
            choice = Choice(key(), "default", "default")
        else:
            names = candidates()
            if names == ["default"]:
                choice = Choice(key(), "default", "only candidate")
            elif mode != "auto":
                choice = Choice(key(), mode if mode in names else "default", "forced")
            else:
                choice = _measured(key(), names, threads, *calls(names))
        _chosen[slot] = choice
        return choice


def _measured(key: str, names: list[str], threads: int, calls: dict, between) -> Choice:
    """The cached decision for `key` among `names`, else the fastest of `calls` (name -> no-argument call),
    timed with `between` run before each timed call, and cached."""
    cache = _decisions.setdefault(threads, tuning.Decisions("kernels", _machine_key(threads)))
    entry = cache.get(key)
    # A decision stands only among the same candidates and the same build of pgconv's kernel: a kernel that
    # became available (a compiler installed) or went away, or a rebuilt one (new source, compiler or CPU), is
    # measured against the others afresh.
    build = cpu_gemv.build_id() if {"gemv", "pgconv"} & set(names) else None
    if (entry is not None and entry.get("kernel") in names and entry.get("candidates") == names
            and entry.get("gemv_build") == build):
        times = entry.get("times_s")
        times = {k: v for k, v in times.items() if isinstance(v, (int, float))} if isinstance(times, dict) else {}
        return Choice(key, entry["kernel"], "cached", times)
    if _spent[0] > PROBE_BUDGET_S:
        return Choice(key, "default", "over budget")
    start = tuning.clock()
    with torch.no_grad():
        times = tuning.measure(calls, between=between)
    _spent[0] += tuning.clock() - start
    if not times:  # every candidate raised (bad input): F.linear raises its own error
        return Choice(key, "default", "no candidate ran")
    kernel = min(times, key=times.__getitem__)
    if "default" in times and times[kernel] * MARGIN > times["default"]:
        kernel = "default"  # a gap within noise keeps torch's own pick
    # The load average says, later, whether the machine was busy when this was decided (delete the file to redo it).
    cache.put(key, {"kernel": kernel, "times_s": times, "candidates": names, "gemv_build": build,
                    "load_avg_1min": round(os.getloadavg()[0], 2)})
    return Choice(key, kernel, "measured", times)


def _torch_gelu(x: Tensor, up: Tensor | None) -> Tensor:
    y = F.gelu(x, approximate="tanh")
    if up is None:
        return y
    # In place where no gradient flows: gate, up and one result alive at once, as before the fused call (the same
    # bits as `y * up`).
    grad = torch.is_grad_enabled() and (x.requires_grad or up.requires_grad)
    return y * up if grad or y.shape != up.shape or y.dtype != up.dtype else y.mul_(up)


# The tanh GELU of both MLPs (SigLIP: gelu(fc1 x); Gemma: the GeGLU product gelu(gate x) * up x): torch's, or, in
# bf16, pgconv's (`cpu_gemv.gelu_tanh`: torch's own result per bf16 value from a table, the product fused in;
# 3.9x faster for a bf16 prefill layer on the AMD EPYC Zen 4, where ATen's GELU was ~7 % of the first token),
# measured per size bucket like the products. Both give the same bits.
ACTIVATIONS = {"default": _torch_gelu, "pgconv": cpu_gemv.gelu_tanh}


def gelu_tanh(x: Tensor, up: Tensor | None = None) -> Tensor:
    """`F.gelu(x, approximate="tanh")`, times `up` where given, on this machine's faster kernel (ACTIVATIONS)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, up))
    kernel = "default"
    if not needs_grad and x.device.type == "cpu" and x.numel() > 0:
        kernel = _choose_activation(x, up).kernel
    if kernel != "default":
        try:
            return ACTIVATIONS[kernel](x, up)
        except NotImplementedError:  # a layout the probe never saw (a strided view): torch's
            pass
    return _torch_gelu(x, up)


def _choose_activation(x: Tensor, up: Tensor | None) -> Choice:
    mode, threads = _mode(), torch.get_num_threads()
    bucket = 1 << max(x.numel() - 1, 0).bit_length()  # sizes within 2x share a decision
    slot = (threads, mode, "gelu_tanh", x.dtype, up is not None, bucket)
    if (hit := _chosen.get(slot)) is not None:
        return hit

    def names() -> list[str]:
        pgconv = x.dtype == torch.bfloat16 and (up is None or up.dtype == x.dtype) and cpu_gemv.available()
        return ["default", "pgconv"] if pgconv else ["default"]

    def calls(names: list[str]) -> tuple[dict, None]:
        xc, uc = x.contiguous(), None if up is None else up.contiguous()
        return {name: partial(ACTIVATIONS[name], xc, uc) for name in names}, None

    return _decide(slot, mode, threads,
                   lambda: (f"gelu_tanh{' * up' if up is not None else ''} "
                            f"{str(x.dtype).removeprefix('torch.')} numel<={bucket}"),
                   names, calls)


def _evictor(weight: Tensor):
    """For a weight that fits in the last-level cache: a function that evicts it, so that each timed call streams
    the weight from memory, as in the model (where a decode step's 5 GB pass evicts everything). Timed from cache,
    a 2048 x 2048 bf16 product ran 6x faster than in the model and the ranking of kernels differed. The weight's
    own lines are flushed (x86 clflush, `cpu_gemv.flusher`); without that, a buffer twice the cache's size is
    read (64 MiB here, allocated for the probe only). None for larger weights (they stream anyway)."""
    llc = tuning.last_level_cache_bytes()
    if weight.numel() * weight.element_size() > 2 * llc:
        return None
    if (flush := cpu_gemv.flusher(weight)) is not None:
        return flush
    buf = torch.ones(2 * llc // 4)  # touched: reading untouched pages would read the shared zero page
    return lambda: buf.sum()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` on this machine's fastest kernel for its shape and dtype (module docstring)."""
    # Always as a 2-D product: a strided 3-D slice such as hidden[:, -1:] fails matmul's fold check and goes
    # through bmm, which copies the whole transposed weight (27 s for the 3B head in bf16).
    x2 = x.reshape(-1, x.shape[-1])
    # The oneDNN op has no autograd formula: measured kernels only when no gradient can flow.
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    kernel = "default"
    if not needs_grad and x2.device.type == "cpu" and x2.shape[0] > 0:
        kernel = choose(x2, weight, bias).kernel
    try:
        out = KERNELS[kernel](x2, weight, bias)
    except (RuntimeError, NotImplementedError):
        if kernel == "default":
            raise
        # An input the probe never saw (a layout or dtype mix the private op refuses): torch's own kernel.
        out = F.linear(x2, weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose product runs on `linear`'s kernel choice."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
