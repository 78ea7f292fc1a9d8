"""Kernel benchmark: the evidence behind `pgconv.model.cpu_kernels` at the 3B decoder's shapes.

For each weight shape of the PaliGemma-3B decoder (and SigLIP's), the throughput of every kernel torch offers for
`F.linear`: one row (decode: GB/s of weights streamed) and a prompt's worth of rows (prefill: GFLOPS):
- bf16 one row: oneDNN brgemm (torch's default) vs ATen's GEMV (oneDNN off) vs pgconv's gemv (`model/cpu_gemv.py`)
  vs ours (`cpu_kernels.linear`, on its measured choice);
- fp32 rows: MKL SGEMM/SGEMV (torch's default) vs oneDNN (`mkldnn::_linear_pointwise`) vs pgconv's gemv (one row)
  vs ours;
plus the read bandwidth, the roofline's denominator: the fastest of a large `sum`, a `copy` (read + write bytes)
and every one-row GEMV in the table (which one set it is named), and the disk's durable write speeds. Best of
several repetitions.

    python -m benchmarks.kernels [--quick] [--threads 2] [--rows 262]

Writes benchmarks/out/kernels{,-quick}.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import OUT, disk_write_speeds, machine, machine_markdown

__all__ = ["main"]

QUICK_ARGS = ["--quick"]
# (name, out_features, in_features): Gemma-2B decoder, its tied head, SigLIP So400m.
SHAPES = [("gate/up", 16384, 2048), ("down", 2048, 16384), ("q/o", 2048, 2048), ("k/v", 256, 2048),
          ("head", 257216, 2048), ("siglip fc1", 4304, 1152), ("siglip fc2", 1152, 4304)]
QUICK_SHAPES = [("gate/up", 1024, 256), ("down", 256, 1024)]


def _best(fns: list, reps: int, between=None) -> list[float]:
    """Best time of each function, the functions interleaved so that a busy spell on the machine hits all alike;
    `between` (untimed) before each timed call: evicting a weight that fits in the caches, as the model streams it."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            if between is not None:
                between()
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _without_onednn(fn):
    import torch

    def run():
        torch._C._set_mkldnn_enabled(False)
        try:
            return fn()
        finally:
            torch._C._set_mkldnn_enabled(True)
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (seconds; for CI)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=262, help="prefill rows (the benchmark prompt: 256 image + 6 text)")
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from pgconv.model import cpu_gemv, cpu_kernels

    torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 10
    shapes = QUICK_SHAPES if args.quick else SHAPES
    onednn = torch.ops.mkldnn._linear_pointwise
    info = {**machine(args.threads), "disk_write": disk_write_speeds(OUT, (64 if args.quick else 512) << 20)}
    lines = ["## CPU kernels for `F.linear` at the model's shapes", "", machine_markdown(info)]
    x = torch.ones((16 << 20) if args.quick else (512 << 20))  # fp32: 64 MiB / 2 GiB, far beyond the caches
    y = torch.zeros_like(x)
    t_sum, t_copy = _best([lambda: x.sum(), lambda: y.copy_(x)], 3 if args.quick else 5)
    streams = {"sum": x.numel() * 4 / t_sum, "copy": 2 * x.numel() * 4 / t_copy}  # copy: bytes read + written
    gib = x.numel() * 4 / 2**30
    del x, y
    bandwidth_at = len(lines)
    gemv = cpu_gemv.available()
    lines += ["", "One row (decode), GB/s of weights streamed (weights that fit in the last-level cache are evicted "
              "before each call, as in the model); 'pgconv gemv' is `model/csrc/gemv.c`"
              + (f" ({cpu_gemv.isa()})" if gemv else f" (not available: {cpu_gemv.unavailable_reason()})")
              + ", 'ours' `cpu_kernels.linear` on its measured choice:", "",
              "| weight | bf16 oneDNN (torch default) | bf16 ATen GEMV | bf16 pgconv gemv | bf16 ours | "
              "fp32 MKL (torch default) | fp32 oneDNN | fp32 pgconv gemv | fp32 ours |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    prefill = ["", f"{args.rows} rows (prefill), GFLOPS:", "",
               "| weight | bf16 oneDNN (torch default) | bf16 ours | fp32 MKL (torch default) | fp32 oneDNN | "
               "fp32 ours |",
               "|---|---:|---:|---:|---:|---:|"]
    with torch.inference_mode():
        for name, n, k in shapes:
            cells, gemm = [], []
            for dtype in (torch.bfloat16, torch.float32):
                w = torch.randn(n, k).to(dtype)
                row, rows = torch.randn(1, k).to(dtype), torch.randn(args.rows, k).to(dtype)
                nbytes, flops = w.numel() * w.element_size(), 2 * args.rows * n * k
                if dtype == torch.bfloat16:
                    kinds = [lambda: F.linear(row, w), _without_onednn(lambda: F.linear(row, w))]
                else:
                    kinds = [lambda: F.linear(row, w), lambda: onednn(row, w, None, "none", [], "")]
                if gemv:
                    kinds.append(lambda: cpu_gemv.gemv(row, w, None))
                kinds.append(lambda: cpu_kernels.linear(row, w))
                rates = [nbytes / t for t in _best(kinds, reps, cpu_kernels._evictor(w))]
                if not gemv:
                    rates.insert(2, float("nan"))
                cells += ["-" if r != r else f"{r / 1e9:.1f}" for r in rates]
                streams[f"{name} {str(dtype)[6:]} GEMV"] = max(r for r in rates if r == r)
                if name == "head":  # a prompt's worth of head rows never runs (logits for the last position only)
                    gemm += ["-"] * (2 if dtype == torch.bfloat16 else 3)
                    continue
                kinds = [lambda: F.linear(rows, w)]
                if dtype == torch.float32:
                    kinds.append(lambda: onednn(rows, w, None, "none", [], ""))
                kinds.append(lambda: cpu_kernels.linear(rows, w))
                gemm += [f"{flops / t / 1e9:.0f}" for t in _best(kinds, max(2, reps // 3))]
                del w
            lines.append(f"| {name} ({n}x{k}) | " + " | ".join(cells) + " |")
            prefill.append(f"| {name} ({n}x{k}) | " + " | ".join(gemm) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    best = max(streams, key=streams.__getitem__)
    lines.insert(bandwidth_at, f"Read bandwidth, the fastest streaming kernel ({gib:.2f} GiB `sum` and `copy`, every "
                 f"one-row GEMV below): **{streams[best] / 1e9:.1f} GB/s**, set by {best}; `sum` "
                 f"{streams['sum'] / 1e9:.1f}, `copy` {streams['copy'] / 1e9:.1f} GB/s.")
    md = "\n".join(lines + prefill) + "\n"
    print(md)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("kernels-quick.md" if args.quick else "kernels.md")).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
