"""Heavy benchmark (not part of `make test`): peak memory of importing a 3B-shaped big_vision `.npz`.

1. Writes a `paligemma-3b-pt-224`-shaped big_vision checkpoint (bf16 stored as void V2 like the released
   `.bf16.npz`, or `--dtype float32`) with random values, streamed member by member in 16 MB pieces, so the
   generator itself never holds a tensor. Names and shapes come from the big_vision table for the preset.
2. Runs, each in a fresh process on a warm page cache, with dirty pages flushed in between:
   - `pgconv convert pt.npz out --to hf-legacy` (import: un-stack, transpose, split, vocabulary pad);
   - `pgconv convert out back.npz --to big-vision` (export), unless `--skip-export`;
   - with `--baseline`: `dict(np.load(pt.npz))` with every array touched (what big_vision's `npload` and the HF
     conversion scripts do), for comparison;
   - the imports `pgconv convert` needs before it reads a tensor (the interpreter + torch floor).
Peak RSS is the child's `ru_maxrss` from `os.wait4`: it counts file-backed pages a process maps (torch's shared
libraries, and any memory-mapped tensor data). The parent imports nothing heavy (the generator runs in its own
process too), because a forked child starts with the parent's resident pages. Target (issue 6): import peak RSS
<= 1.5 GB.

    python benchmarks/npz_import_3b.py [--dtype bfloat16|float32] [--baseline] [--skip-export] [--keep] [--preset P]

Files go to benchmarks/out/npz_import_3b/ and are deleted at the end unless `--keep`; results are printed and saved
to benchmarks/out/npz_import_3b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
PRESET = "paligemma-3b-pt-224"
PGCONV = [sys.executable, "-c", "from pgconv.cli import main; main()"]
CHUNK = 16 << 20

# What the convert command imports before touching a tensor (torch, transformers' config classes, pgconv).
FLOOR = "import pgconv.converter.convert, pgconv.converter.spec_write, pgconv.cmd_convert"

NAIVE_LOAD = """
import sys, numpy as np
arrays = dict(np.load(sys.argv[1]))
print(sum(int(a.view(np.uint8).reshape(-1)[::4096].sum()) for a in arrays.values()) >= 0)
"""


def write_npz(path: Path, dtype: str, preset: str = PRESET) -> int:
    """A big_vision tree for PRESET with random finite values, written one 16 MB piece at a time."""
    import numpy as np

    from pgconv.converter.big_vision import SPEC
    from pgconv.converter.npz import BFLOAT16, NpzWriter
    from pgconv.converter.spec_bind import bind
    from pgconv.model.config import PRESETS

    np_dtype = BFLOAT16 if dtype == "bfloat16" else np.dtype(np.float32)
    shapes = bind(SPEC, PRESETS[preset]).file_shapes
    rng = np.random.default_rng(0)
    total = 0

    def pieces(shape: tuple[int, ...]):
        n = int(np.prod(shape))
        step = CHUNK // np_dtype.itemsize
        for start in range(0, n, step):
            count = min(step, n - start)
            if np_dtype == BFLOAT16:
                # Random sign and mantissa, exponent fixed: values of magnitude [2^-7, 2^-6), never inf or NaN.
                bits = (rng.integers(0, 1 << 16, count, dtype=np.uint16) & 0x807F) | 0x3C00
                yield bits.view(BFLOAT16)
            else:
                yield (rng.standard_normal(count, dtype=np.float32) * 0.02)

    with NpzWriter(path) as w:
        for name, shape in shapes.items():
            w.add(name, shape, np_dtype, pieces(shape))
            total += int(np.prod(shape)) * np_dtype.itemsize
    return total


def _run(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one child process."""
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        err_f.seek(0)
        err = err_f.read()
    if code:
        raise SystemExit(f"{' '.join(map(str, cmd[:6]))} ... failed ({code}):\n{err[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def _warm(path: Path) -> None:
    for f in [path] if path.is_file() else sorted(path.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--baseline", action="store_true", help="also measure dict(np.load(...))")
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--preset", default=PRESET, help="another preset's shapes (e.g. tiny, to try the script)")
    ap.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # child mode: write the .npz and exit
    args = ap.parse_args()
    if args.generate:
        print(json.dumps({"npz_bytes": write_npz(args.generate, args.dtype, args.preset)}))
        return

    work = OUT / "npz_import_3b"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, hf, back = work / "pt.npz", work / "hf", work / "back.npz"
    results: dict = {"preset": args.preset, "dtype": args.dtype, "cpus": os.cpu_count()}
    try:
        gen = _run([sys.executable, __file__, "--generate", str(src), "--dtype", args.dtype, "--preset", args.preset])
        results["npz_bytes"], results["generate_s"] = src.stat().st_size, gen["wall_s"]
        print(f"wrote {src} ({src.stat().st_size / 1e9:.2f} GB) in {results['generate_s']} s", flush=True)
        results["floor"] = _run([sys.executable, "-c", FLOOR])
        os.sync()
        _warm(src)
        results["import"] = _run(PGCONV + ["convert", str(src), str(hf), "--to", "hf-legacy", "--quiet"])
        print(f"import: {results['import']}", flush=True)
        if not args.skip_export:
            os.sync()
            _warm(hf)
            results["export"] = _run(PGCONV + ["convert", str(hf), str(back), "--to", "big-vision", "--quiet"])
            print(f"export: {results['export']}", flush=True)
            results["export_identical"] = _same_members(src, back)
        if args.baseline:
            os.sync()
            _warm(src)
            results["np_load_all"] = _run([sys.executable, "-c", NAIVE_LOAD, str(src)])
            print(f"np.load all: {results['np_load_all']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["target_met"] = results.get("import", {}).get("peak_rss_mb", 1e9) <= 1536
    (OUT / "npz_import_3b.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _same_members(a: Path, b: Path) -> bool:
    """Export of the import gives the generated tensors back, byte for byte (data compared in 64 MB pieces)."""
    from pgconv.converter.npz import NpzReader

    with NpzReader(a) as ra, NpzReader(b) as rb, open(a, "rb") as fa, open(b, "rb") as fb:
        if list(ra.members) != list(rb.members):
            return False
        for name, m in ra.members.items():
            n = rb.members[name]
            if (n.shape, n.raw_dtype) != (m.shape, m.raw_dtype):
                return False
            for pos in range(0, m.nbytes, 64 << 20):
                size = min(64 << 20, m.nbytes - pos)
                if os.pread(fa.fileno(), size, m.data_offset + pos) != os.pread(fb.fileno(), size, n.data_offset + pos):
                    return False
    return True


if __name__ == "__main__":
    main()
