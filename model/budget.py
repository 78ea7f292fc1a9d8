"""Memory budgets (`--max-memory 8GB`): parsing sizes, the default budget, and whether a model fits in one.

Sizes follow accelerate's `max_memory` convention, so one string means the same on both sides of `pgconv verify`:
`KB`/`MB`/`GB`/`TB` are powers of 1000, `KiB`/`MiB`/`GiB`/`TiB` powers of 1024; a bare `K`/`M`/`G`/`T` is read as
the binary unit (as `free -g` and `ulimit` count), a plain number is bytes. The default budget is what the machine can
spare now: `MemAvailable` (and the cgroup's limit minus its usage, when a container sets one) minus a margin.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from pgconv.errors import InputError

__all__ = ["parse_size", "default_budget", "resolve_budget", "format_size", "FIT_FACTOR"]

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")
# Left to the OS, the page cache and whatever else runs: a budget of every available byte would swap or OOM.
_MARGIN_FRACTION, _MARGIN_MIN = 0.10, 1 << 30
# A model runs in memory when weights x FIT_FACTOR fit the budget: verify holds one copy of the weights shared by
# both models plus activations and captures (1.09-1.13x measured at 3B, README "Memory and time").
FIT_FACTOR = 1.15


def parse_size(text: str | int, what: str = "--max-memory") -> int:
    """'8GB' -> 8_000_000_000, '512MiB' -> 536_870_912, '1.5G' -> 1.5 * 2**30, 1000 -> 1000 bytes."""
    if isinstance(text, bool):
        raise InputError(f"{what}: {text!r} is not a size")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise InputError(f"{what}: {text!r} is not a size (e.g. 8GB, 512MiB, 24G, or a number of bytes)")
        value = math.floor(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InputError(f"{what}: {text!r} must be more than 0 bytes")
    return value


def format_size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """cgroup v2 memory.max - memory.current for this process's cgroup (None: no limit or not readable)."""
    try:
        rel = next(line.split("::", 1)[1] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.startswith("0::"))
        base = Path("/sys/fs/cgroup") / rel.strip().lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, ValueError, StopIteration):
        return None


def default_budget() -> int | None:
    """What this machine can spare now, minus a margin (10 %, at least 1 GiB); None where it cannot be read
    (not Linux): then everything runs in memory, as before budgets existed."""
    rooms = [r for r in (_meminfo_available(), _cgroup_room()) if r is not None]
    if not rooms:
        return None
    room = min(rooms)
    return max(room - max(int(room * _MARGIN_FRACTION), _MARGIN_MIN), 1)


def resolve_budget(max_memory: str | int | None) -> int | None:
    """The budget in bytes for a `max_memory` argument (a size, or None for `default_budget()`)."""
    return default_budget() if max_memory is None else parse_size(max_memory)
