"""`python -m benchmarks [--quick] [--only a,b] [--list] [--update-results]`: run every benchmark in this folder.

Each module `benchmarks/<name>.py` (besides this one, `__init__`, `common` and the `profile_inference` tool) is a
benchmark, run one after the other in its own process as `python -m benchmarks.<name>`, inference first. `--quick`
runs each one's quick mode: the arguments in its module-level `QUICK_ARGS` list, else `--quick` when its CLI has
that flag, else `--preset tiny` when it has a `--preset` option; a benchmark without a quick mode is skipped.
Exit status 1 when any benchmark failed.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["discover", "quick_args", "main"]

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"__init__", "__main__", "common", "profile_inference"}  # helpers and tools
FIRST = ("inference",)


def discover() -> list[str]:
    names = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("_"))
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def quick_args(name: str) -> list[str] | None:
    """The arguments of a benchmark's quick mode, read from its source without importing it; None if it has none."""
    source = (HERE / f"{name}.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "QUICK_ARGS" for t in node.targets):
            return [str(a) for a in ast.literal_eval(node.value)]
    if '"--quick"' in source:
        return ["--quick"]
    if '"--preset"' in source:
        return ["--preset", "tiny"]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="each benchmark's quick mode (tiny preset; CI)")
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--list", action="store_true", help="print the benchmarks and their quick arguments, then exit")
    ap.add_argument("--update-results", action="store_true", help="let inference rewrite its part of RESULTS.md")
    args = ap.parse_args(argv)
    names = discover()
    if args.only:
        wanted = args.only.split(",")
        if unknown := sorted(set(wanted) - set(names)):
            ap.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    if args.list:
        for n in names:
            q = quick_args(n)
            print(f"{n}\tquick: {' '.join(q) if q is not None else '(none: skipped by --quick)'}")
        return 0
    failed, ran = [], []
    for name in names:
        extra: list[str] = []
        if args.quick:
            q = quick_args(name)
            if q is None:
                print(f"== {name}: no quick mode, skipped", flush=True)
                continue
            extra = q
        if args.update_results and name == "inference":
            extra = [*extra, "--update-results"]
        print(f"== {name} {' '.join(extra)}".rstrip(), flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *extra], cwd=HERE.parent).returncode
        print(f"== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.perf_counter() - start:.0f} s",
              flush=True)
        (ran if code == 0 else failed).append(name)
    print(f"== benchmarks: {len(ran)} ok" + (f", failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
