"""Shared benchmark helpers: child processes with their own peak RSS, memory readings, the machine description.

Benchmarks measure heavy work in fresh child processes, one at a time, so that each reports its own peak RSS
(`ru_maxrss` of the child from `os.wait4`; exec starts a new address space, so the parent's pages never count) and
no model's memory outlives its measurement. This module imports neither torch nor transformers: a parent that
stays small keeps the machine's memory for the children.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

__all__ = [
    "OUT",
    "ChildError",
    "run_child",
    "peak_rss_bytes",
    "current_rss_bytes",
    "available_memory_bytes",
    "machine",
    "machine_markdown",
    "disk_write_speeds",
    "fixture_path",
    "ensure_fixture",
    "warm_files",
]

OUT = Path(__file__).resolve().parent / "out"  # git-ignored; fixtures and JSON results live here


class ChildError(RuntimeError):
    """A benchmark child process failed; the message carries the end of its stderr."""


def run_child(argv: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run `argv` to completion; its last stdout line must be a JSON object, returned with `wall_s` and
    `peak_rss` (bytes, the child's `ru_maxrss`) added."""
    full_env = {**os.environ, **(env or {})}
    # Files, not pipes: a chatty child can never block on a full pipe while we sit in wait4.
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out_f, stderr=err_f, text=True, env=full_env)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        wall = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out_f.seek(0), err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise ChildError(f"{' '.join(argv[:6])} ... exited with {code}:\n{err[-4000:]}")
    result = json.loads(lines[-1])
    result.update(wall_s=wall, peak_rss=usage.ru_maxrss * 1024)  # Linux reports KiB
    return result


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident set of this process now (from /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def available_memory_bytes() -> int:
    return _meminfo("MemAvailable")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> tuple[str, list[str]]:
    from pgconv import tuning  # torch-free: the same CPU identity the kernel cache is keyed by

    return tuning.cpu_label(), tuning.cpu_isa()


def machine(threads: int | None = None) -> dict:
    """What the numbers were measured on: CPU, cores, memory, versions, thread count and the load at the time."""
    model, flags = _cpu()
    return {
        "cpu": model,
        "isa": flags,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gb": round(_meminfo("MemTotal") / 1e9, 1),
        "available_memory_gb": round(available_memory_bytes() / 1e9, 1),
        "threads": threads,
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "pgconv": _version("pgconv"),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def disk_write_speeds(directory: Path, nbytes: int = 1 << 30, runs: int = 2) -> dict:
    """The disk's own durable write rate where `directory` lives (bytes/s, best of `runs`), written as pgconv's
    writer does (write_path: 32 MiB stages, its default workers, fsync at the end): O_DIRECT, and buffered with
    early writeback; None for a path the filesystem refuses (tmpfs: no O_DIRECT). Also the plan `pgconv convert`
    picks there (measured once per filesystem, or PGCONV_WRITER)."""
    from pgconv.converter import write_path

    out: dict = {"bytes": nbytes, "directory": str(directory)}
    directory.mkdir(parents=True, exist_ok=True)
    for mode in ("direct", "buffered"):
        try:
            out[mode] = max(nbytes / write_path._time_write(directory, write_path.Plan(mode), nbytes)
                            for _ in range(runs))
        except OSError:
            out[mode] = None
    plan = write_path.plan_for(directory)
    out["plan"], out["plan_source"] = plan.name, plan.source
    return out


def _disk_line(d: dict) -> str:
    rate = {m: "refused" if d.get(m) is None else f"{d[m] / 1e9:.2f} GB/s" for m in ("direct", "buffered")}
    return (f"- Disk write (durable: fsync included; {d['bytes'] / 2**30:.2g} GiB, best of 2, under "
            f"{d['directory']}): O_DIRECT {rate['direct']}, buffered + writeback {rate['buffered']}; "
            f"pgconv convert writes {d['plan']} ({d['plan_source']})\n")


def machine_markdown(info: dict) -> str:
    """The machine lines under every results table, with the disk's write speeds when `info["disk_write"]` holds
    them (`disk_write_speeds`)."""
    isa = ", ".join(info["isa"]) or "none of note"
    load = ", ".join(str(x) for x in info["load_avg_1_5_15"])
    return (
        f"- CPU: {info['cpu']} ({info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs; ISA: {isa})\n"
        f"- Memory: {info['memory_gb']} GB ({info['available_memory_gb']} GB available at the start)\n"
        + (f"- Threads: {info['threads']} (torch.set_num_threads and OMP_NUM_THREADS in every child)\n"
           if info.get("threads") is not None else "")
        + f"- Versions: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"pgconv {info['pgconv']}; {info['os']}\n"
        f"- Load average (1, 5, 15 min) at the start: {load}; measured {info['date']}\n"
    ) + (_disk_line(info["disk_write"]) if info.get("disk_write") else "")


def fixture_path(preset: str) -> Path:
    """Where a preset's random fixture lives by default (shared by all benchmarks)."""
    return OUT / "fixtures" / preset


def ensure_fixture(path: Path, preset: str) -> Path:
    """Write the random-weight fixture for `preset` at `path` once (bf16 for full-size presets, fp32 for tiny)."""
    if not (path / "config.json").is_file():
        print(f"writing the {preset} random fixture to {path} (once) ...", file=sys.stderr, flush=True)
        # In a child: generating 3B random weights allocates, and the parent should stay small.
        code = ("import sys; from pgconv.converter.fixture import make_fixture; "
                "make_fixture(sys.argv[1], sys.argv[2], force=True)")
        subprocess.run([sys.executable, "-c", code, str(path), preset], check=True)
    return path


def warm_files(directory: Path) -> int:
    """Read every file under `directory` once, so that each loader starts from the same warm page cache."""
    total = 0
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
    return total


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (the lower median for an even count), with every run's wall time
    alongside (`runs_wall_s`)."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_wall_s": [r["wall_s"] for r in runs]}
