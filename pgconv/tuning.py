"""Per-machine performance choices made by measurement, once, and cached (issue 16). No torch import.

What is fastest differs between CPUs and disks (on an AMD EPYC Zen 4 ATen's bf16 GEMV beat oneDNN for one row and
O_DIRECT beat buffered writes; on an Intel Xeon with AMX both were the other way round), so pgconv times its
candidates on the machine it runs on (`measure`) and keeps the decisions in a small JSON file per machine key under
the user cache dir (`Decisions`): `$PGCONV_CACHE`, else `$XDG_CACHE_HOME/pgconv`, else `~/.cache/pgconv`, in
`tuning/`. The key names what the choice depends on (CPU model and ISA, torch version, thread count for kernels;
device id and filesystem type for the writer): any change gives another file, so a new torch or CPU is measured
afresh. A cache file that is missing, unreadable, corrupt or for another key is ignored and rewritten; a cache dir
that cannot be written only means measuring again next time. Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path

__all__ = ["cpu_model", "cpu_signature", "cpu_label", "cpu_flags", "cpu_isa", "last_level_cache_bytes",
           "Decisions", "measure", "clock"]

FORMAT = 1  # bump when the meaning of a cached decision changes
clock: Callable[[], float] = time.perf_counter  # tests swap in a fake timer (module attribute, read at each use)


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU model string (`lscpu`'s 'Model name'), or platform.processor() where /proc/cpuinfo has none."""
    if m := re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.M):
        return m.group(1).strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_signature() -> str:
    """'family F model M stepping S' from /proc/cpuinfo ('' where it has none). VMs often report only a vague
    model name: two different boxes here both said 'AMD EPYC' (family 25 model 17, a Zen 4; family 26 model 2, a
    Zen 5), with the same ISA flags of note, so the model name alone would share one cache and one results section."""
    fields = []
    for name, label in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping")):
        if m := re.search(rf"^{name}\s*:\s*(\S+)\s*$", _cpuinfo(), re.M):
            fields.append(f"{label} {m.group(1)}")
    return " ".join(fields)


def cpu_label() -> str:
    """The CPU as results are labelled: model name plus family/model/stepping, e.g. 'AMD EPYC (family 25 model 17
    stepping 1)'."""
    sig = cpu_signature()
    return f"{cpu_model()} ({sig})" if sig else cpu_model()


def cpu_flags() -> list[str]:
    """Every flag /proc/cpuinfo reports for the first CPU (what `-march=native` code may use)."""
    m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", _cpuinfo(), re.M)
    return m.group(1).split() if m else []


def cpu_isa() -> list[str]:
    """The ISA extensions that decide which GEMM/GEMV kernels oneDNN and MKL can use (VMs often report only a
    vague model name such as 'AMD EPYC', so the flags are part of the machine key too)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx512_fp16")
    have = set(cpu_flags())
    return [f for f in wanted if f in have]


@lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (sysfs), or 32 MiB where sysfs does not say."""
    best = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    return best or 32 << 20


def _cache_root() -> Path:
    from pgconv.converter.fixture import cache_dir  # the one definition of the user cache dir

    return cache_dir() / "tuning"


class Decisions:
    """Decisions of one kind (`kernels`, `writer`) for one machine key, in memory and in the cache file.

    Thread-safe. `get(name)` returns the stored value (a dict) or None; `put(name, value)` stores it and rewrites
    the file (re-read first, so that two processes measuring different shapes at the same time both keep theirs).
    """

    def __init__(self, kind: str, key: Mapping[str, object]) -> None:
        self.kind, self.key = kind, {"format": FORMAT, **key}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = _cache_root() / f"{kind}-{digest}.json"
        self._lock = threading.Lock()
        self._mem: dict[str, dict] | None = None

    def _read(self) -> dict[str, dict]:
        try:
            if not self.path.is_file():  # a FIFO or directory in its place is ignored, never opened
                return {}
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict) or data.get("key") != self.key or not isinstance(data.get("decisions"), dict):
            return {}
        return {k: v for k, v in data["decisions"].items() if isinstance(v, dict)}

    def get(self, name: str) -> dict | None:
        with self._lock:
            if self._mem is None:
                self._mem = self._read()
            return self._mem.get(name)

    def put(self, name: str, value: dict) -> None:
        with self._lock:
            merged = {**self._read(), **(self._mem or {}), name: value}
            self._mem = merged
            text = json.dumps({"key": self.key, "decisions": merged}, indent=1, sort_keys=True) + "\n"
            tmp = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, self.path)
                tmp = None
            except OSError:  # read-only or full cache dir: the decision holds for this process only
                pass
            finally:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)


def measure(candidates: Mapping[str, Callable[[], object]], reps: int = 5, warmup: int = 1,
            budget_s: float = 5.0, drop_factor: float = 2.0, max_reps: int = 31,
            min_time_s: float = 0.05, between: Callable[[], object] | None = None) -> dict[str, float]:
    """Seconds per call of each candidate: the fastest of its timed calls.

    The minimum, not the median: interference only ever adds time, and on a shared machine (2 cores, load 4) the
    median of every candidate came out as the 12 ms scheduler tick, deciding nothing. Each runs `warmup` untimed
    calls (first-call set-up, page faults), then the candidates take turns, one timed call each per round, so that
    a busy spell hits all of them alike. After each round a candidate slower than `drop_factor` x the best stops
    being timed (after fewer than 3 rounds only at 3 x that gap: one unlucky call must not drop a kernel, but one
    9x slower must not cost 9x the probe either). Rounds stop after `reps`, or once `budget_s` is spent (with at
    least one timed call each); calls of microseconds get more rounds (up to `max_reps`, until `min_time_s` has
    passed). A candidate that raises is left out (e.g. an op this build lacks for the dtype). `between`, if
    given, runs before every timed call, untimed (e.g. evicting the caches, so that a weight that fits in them is
    timed as it runs in the model: streamed from memory).
    """
    times: dict[str, list[float]] = {}
    live: dict[str, Callable[[], object]] = {}
    start = clock()
    for name, fn in candidates.items():
        try:
            for _ in range(warmup):
                fn()
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            continue
        live[name], times[name] = fn, []
    for rnd in range(max_reps):
        if rnd >= reps and clock() - start > min_time_s:
            break
        for name, fn in live.items():
            if between is not None:
                between()
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
        fastest = {n: min(t) for n, t in times.items() if t}
        best = min(fastest.values(), default=0.0)
        gap = drop_factor * (1 if rnd >= 2 else 3)
        live = {n: fn for n, fn in live.items() if fastest[n] <= gap * best}
        if clock() - start > budget_s:
            break
    return {n: min(t) for n, t in times.items() if t}
