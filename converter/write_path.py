"""How the writer puts bytes on this destination's disk: chosen by a short measurement, once per filesystem (issue 16).

Which write path is fastest depends on the machine: on an AMD EPYC VM O_DIRECT writes won (the buffered path cost
~1 CPU-second per GB in page-cache copies), on an Intel Xeon VM buffered writeback ran at ~1.4 GB/s and
`dd oflag=direct` at 0.96 GB/s. So before the first conversion to a filesystem, `plan_for(directory)` writes a
few temporary files in `directory` (`PROBE_BYTES` each, at most `len(CONFIGS) + 1` of them) with each
candidate `Plan` - O_DIRECT or buffered with early writeback (`sync_file_range`), staging block size, worker
count - each ended by the fsync every conversion does, removes them, and keeps the fastest. Decisions are
cached per (device id, filesystem type, mount source) through `pgconv.tuning`; a candidate must beat the default
(`direct`, `DEFAULT_STAGE`, the default workers) by `MARGIN` to replace it: noise alone never switches paths.
`PGCONV_WRITER=direct|buffered` forces a path (default block size and workers); `auto` (unset) measures. Every
mode is equally durable: the writer fsyncs each file before the directory is renamed into place.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pgconv import tuning
from pgconv.errors import InputError

__all__ = ["Plan", "plan_for", "kick_writeback", "preallocate", "pwrite_all", "ENV", "CONFIGS", "PROBE_BYTES"]

ENV = "PGCONV_WRITER"
BLOCK = 4096
# More workers than cores: while some wait for their writes, the others read, cast and hash (SHA-256 at ~1.5 GB/s
# per core is a conversion's CPU cost). On 2 cores, 5 workers beat 3 by ~0.2 s of ~3.8 s at 3B (2026-11-28).
DEFAULT_WORKERS = max(3, min(8, (os.cpu_count() or 1) + 3))
# All workers' stages together: they are most of a same-dtype conversion's memory (target: peak RSS <= 256 MB;
# 5 x 32 MiB measured 203 MB at 3B on 2 cores), so more workers get smaller stages instead of more memory.
STAGING_BUDGET = 160 << 20


def stage_for(workers: int) -> int:
    """Bytes per worker's stage: 32 MiB (large enough that each direct write streams) within `STAGING_BUDGET`."""
    return max(BLOCK, min(32 << 20, STAGING_BUDGET // max(workers, 1) // BLOCK * BLOCK))


DEFAULT_STAGE = stage_for(DEFAULT_WORKERS)
# Per candidate. Large enough to leave the page cache's absorption behind: on an AMD EPYC VM (2026-12-03) buffered
# writes with early writeback ran at 1.78 GB/s for 48 MiB and 0.17 GB/s for 512 MiB (O_DIRECT: 1.8-2.4 GB/s at every
# size), and a 48 MiB probe chose buffered for a 3B conversion that then took 20-25 s instead of 4-6 s. A candidate
# more than `GIVE_UP` x slower than the best so far is stopped early, so the slow ones cost little.
# Even at 512 MiB the buffered rate depends on how much dirty page cache the kernel still absorbs (a second run on
# the same VM: buffered 2.8-3.5 GB/s, direct 1.6-1.8 GB/s, and that conversion then took 12-23 s buffered against
# 4-6 s direct). So a buffered plan must beat the direct default by `BUFFERED_MARGIN`, not `MARGIN`.
PROBE_BYTES = 512 << 20
GIVE_UP = 2.0
BUFFERED_MARGIN = 2.5
MARGIN = 1.05


@dataclass(frozen=True)
class Plan:
    mode: str  # direct | buffered
    stage: int = DEFAULT_STAGE  # bytes per worker buffer (and per write)
    workers: int = DEFAULT_WORKERS
    source: str = "default"  # default | forced | measured | cached
    rates: dict[str, float] = field(default_factory=dict, compare=False)  # bytes/s per candidate, when measured

    @property
    def name(self) -> str:
        size = f"{self.stage >> 20}MiB" if self.stage % (1 << 20) == 0 else f"{self.stage >> 10}KiB"
        return f"{self.mode} {size} x{self.workers}"


# Round one: path x block size at the default worker count; round two: the winner with 2 workers.
CONFIGS = [Plan("direct"), Plan("buffered"), Plan("direct", min(8 << 20, DEFAULT_STAGE)),
           Plan("buffered", min(8 << 20, DEFAULT_STAGE))]


def _fs_key(directory: Path) -> dict:
    """What a write-path decision depends on: the device, its filesystem type and what is mounted."""
    st_dev = os.stat(directory).st_dev
    fstype = source = "unknown"
    try:
        lines = Path("/proc/self/mountinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    want = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    real, longest = str(Path(directory).resolve()), -1
    for line in lines:  # "id parent maj:min root mountpoint opts [tags] - fstype source superopts"
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if len(f) < 5 or len(r) < 2:
            continue
        if f[2] == want:  # the mount of this very device
            fstype, source = r[0], r[1]
            break
        mount = f[4]  # else (btrfs subvolumes, overlays: anonymous device ids) the longest enclosing mount
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > longest:
            fstype, source, longest = r[0], r[1], len(mount)
    # `writer`: how the writer writes, for which a plan was measured (2: direct files preallocated, boundary blocks
    # gathered; a plan measured for the old path is measured again).
    return {"st_dev": st_dev, "fstype": fstype, "source": source, "writer": 2}


def _mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "direct", "buffered"):
        raise InputError(f"{ENV}={mode!r}: expected auto, direct or buffered")
    return mode


_lock = threading.Lock()
_plans: dict[tuple, Plan] = {}  # per process: filesystem key -> plan (auto mode)


def reset() -> None:
    """Forget this process's plans (tests; the cache files stay)."""
    with _lock:
        _plans.clear()


def plan_for(directory: Path, stage: int = DEFAULT_STAGE, workers: int = DEFAULT_WORKERS) -> Plan:
    """The write plan for new files in `directory` (measured there the first time on this filesystem); `stage`
    and `workers` are what a forced or default plan uses."""
    mode = _mode()
    if mode != "auto":
        return Plan(mode, stage, workers, "forced")
    if not hasattr(os, "O_DIRECT"):
        return Plan("buffered", stage, workers)
    key = _fs_key(directory)
    slot = tuple(sorted(key.items()))
    with _lock:
        if (hit := _plans.get(slot)) is not None:
            return hit
        cache = tuning.Decisions("writer", key)
        entry = cache.get("plan")
        try:
            plan = Plan(entry["mode"], int(entry["stage"]), int(entry["workers"]), "cached",  # type: ignore[index]
                        dict(entry.get("rates", {})))  # type: ignore[union-attr]
            if (plan.mode not in ("direct", "buffered") or plan.stage % BLOCK or plan.stage <= 0 or plan.workers < 1
                    or plan.stage * plan.workers > STAGING_BUDGET):
                raise ValueError(plan)
        except (TypeError, KeyError, ValueError, AttributeError):
            plan = _measure(directory) or Plan("direct", stage, workers)
            if plan.source == "measured":
                cache.put("plan", {**{k: v for k, v in asdict(plan).items() if k != "source"},
                                   "load_avg_1min": round(os.getloadavg()[0], 2)})
        _plans[slot] = plan
        return plan


def _measure(directory: Path) -> Plan | None:
    """Time every candidate in `directory`; None when the probe cannot run (a full disk, a read-only one)."""
    rates: dict[str, float] = {}
    try:
        for plan in CONFIGS:
            best = max(rates.values(), default=0.0)
            rates[plan.name] = _rate(directory, plan, GIVE_UP * PROBE_BYTES / best if best else None)
        best = _best(CONFIGS, rates)
        if best.workers != 2:
            fewer = Plan(best.mode, best.stage, 2)
            rates[fewer.name] = _rate(directory, fewer)
            best = _best([best, fewer], rates)
    except OSError:
        return None
    if not rates[best.name]:
        return None
    return Plan(best.mode, best.stage, best.workers, "measured", rates)


def _rate(directory: Path, plan: Plan, deadline: float | None = None) -> float:
    """Bytes/s of `plan` in `directory`; 0 where it cannot run there (O_DIRECT refused: tmpfs, some FUSE). Past
    `deadline` seconds the write stops and its rate so far is taken (it has lost anyway)."""
    try:
        return PROBE_BYTES / _time_write(directory, plan, deadline=deadline)
    except OSError as e:
        if e.errno == errno.EINVAL and plan.mode == "direct":
            return 0.0
        raise


def _best(plans: list[Plan], rates: dict[str, float]) -> Plan:
    """The fastest; the first listed (the default first) unless another is `MARGIN` faster."""
    first = plans[0]
    best = max(plans, key=lambda p: rates[p.name])
    margin = BUFFERED_MARGIN if best.mode == "buffered" and first.mode == "direct" and rates[first.name] else MARGIN
    return best if rates[best.name] > margin * rates[first.name] else first


def _time_write(directory: Path, plan: Plan, nbytes: int | None = None, deadline: float | None = None) -> float:
    """Seconds to write `nbytes` (default `PROBE_BYTES`) durably into a new file in `directory` the way `plan`
    writes (its workers in parallel, one stage-sized write at a time), fsync included. The file is removed
    afterwards. Also the benchmarks' disk reference (`benchmarks.common.disk_write_speeds`)."""
    total = PROBE_BYTES if nbytes is None else nbytes
    fd, name = _probe_file(directory)
    direct = -1
    try:
        if plan.mode == "direct":
            direct = os.open(name, os.O_WRONLY | os.O_DIRECT)
            preallocate(fd, total)  # as the writer does with a direct file
        stage = memoryview(mmap.mmap(-1, plan.stage))  # page-aligned, as O_DIRECT needs
        stage[:] = (os.urandom(1 << 20) * -(-plan.stage // (1 << 20)))[: plan.stage]  # incompressible
        offsets = list(range(0, total, plan.stage))
        errors: list[BaseException] = []
        written = [0] * plan.workers

        def worker(k: int, mine: list[int]) -> None:
            try:
                for off in mine:
                    if deadline is not None and tuning.clock() - start > deadline:
                        return
                    data = stage[: min(plan.stage, total - off)]
                    pwrite_all(direct if direct >= 0 else fd, data, off)
                    if direct < 0:
                        kick_writeback(fd, off, len(data))
                    written[k] += len(data)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(i, offsets[i::plan.workers])) for i in range(plan.workers)]
        start = tuning.clock()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        os.fsync(fd)
        elapsed = max(tuning.clock() - start, 1e-9)
        # Stopped at the deadline: the time the whole write would have taken at the rate reached.
        return elapsed * total / max(sum(written), 1) if sum(written) < total else elapsed
    finally:
        if direct >= 0:
            os.close(direct)
        os.close(fd)
        os.unlink(name)


def _probe_file(directory: Path) -> tuple[int, str]:
    for i in range(100):
        name = os.path.join(directory, f".pgconv-write-probe-{os.getpid()}-{i}")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(directory)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """`os.pwrite` until every byte of `data` is written (a write may be short)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages in the range; do not wait for it
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (OSError, AttributeError):  # not Linux: the final fsync writes everything back
    _sync_file_range = None


try:
    _fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate  # 64-bit offsets on 32-bit glibc too
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
except (NameError, AttributeError):
    _fallocate = None


def preallocate(fd: int, size: int) -> bool:
    """Allocate `size` bytes of `fd` (and set its size) before writing, as Linux `fallocate(2)`: direct writes into
    allocated blocks may run in parallel on ext4 (see writer._OutFile), and a full disk fails here, before any
    data is written. False where the filesystem cannot (the writes then allocate as they go); a full disk or
    quota raises OSError. Not `os.posix_fallocate`: glibc emulates that by writing a byte into every block."""
    if _fallocate is None or size <= 0:
        return False
    if _fallocate(fd, 0, 0, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise OSError(err, os.strerror(err))
    return False  # EOPNOTSUPP, ENOSYS, EINVAL, EINTR, ...: not worth failing a conversion for


def kick_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing bytes [offset, offset + length) of `fd` back to disk now, without waiting (Linux
    `sync_file_range`; os has no binding): the disk works while later tensors are produced, and the final fsync
    only waits for the tail. Durability still comes from that fsync. A no-op where unsupported."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
