"""Streaming safetensors writer: header first, then tensor data one tensor (or chunk) at a time.

Memory stays flat whatever the model size: a same-dtype rename is a kernel-side byte-range copy
(`os.copy_file_range`, falling back to chunked pread/write), a cast reads, converts and writes
`CHUNK_BYTES` at a time, and only a non-byte-preserving transform materialises one tensor. SHA-256 of every
tensor runs on a worker thread (hashlib releases the GIL) so hashing overlaps the copy. torch is imported
only for casts and transforms.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pgconv.converter.dtypes import is_widening, torch_dtype
from pgconv.converter.plan import TRANSFORMS, Step
from pgconv.converter.safetensors_io import build_header
from pgconv.converter.sources import CHUNK_BYTES, SourceTensor, TensorMeta
from pgconv.errors import InputError

if TYPE_CHECKING:  # torch only for casts and transforms: a same-dtype conversion never imports it
    import torch

__all__ = ["TensorRecord", "StreamWriter", "parse_size", "shard_targets", "shard_file_names", "write_shard",
           "tensors_equal",
           "sha256_of"]

_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}  # decimal, like huggingface_hub
_COPY_BYTES = 64 << 20
_HASH_WINDOW = 16 << 20  # bytes mapped at a time per hash worker (mapped pages count as RSS)
# Hashing is the CPU cost of a same-dtype conversion (~1.7 GB/s per core with SHA-NI): spread whole tensors over cores.
_HASH_WORKERS = max(1, min(4, os.cpu_count() or 1))
_WRITEBACK_BYTES = 256 << 20  # start write-back of this much new data in the background (fsync at the end is short)


@dataclass
class TensorRecord:
    """One written tensor, as the manifest lists it."""

    target: TensorMeta
    file: str
    sources: tuple[TensorMeta, ...]
    transform: str
    sha256: str = ""
    max_abs_diff: float | None = None  # None: exact (same dtype or widening cast)
    fp16_overflow: int = 0  # finite values that became +-inf in a float16 cast
    copied: bool = False  # raw byte copy


def parse_size(size: str | int) -> int:
    """"5GB" -> 5_000_000_000 (decimal units, as huggingface_hub's max_shard_size); a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", str(size).upper())
    value = int(float(m.group(1)) * _UNITS[m.group(2) or "B"]) if m else 0
    if value <= 0:
        raise InputError(f"invalid shard size {size!r}; use e.g. 5GB, 500MB or a positive byte count")
    return value


def shard_targets(metas: list[TensorMeta], max_bytes: int) -> list[list[TensorMeta]]:
    """Greedy in plan order like huggingface_hub: a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    size = 0
    for m in metas:
        if m.nbytes > max_bytes:
            if current:
                shards.append(current)
            shards.append([m])
            current, size = [], 0
            continue
        if current and size + m.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(m)
        size += m.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


class _Hasher:
    """SHA-256 on worker threads. Whole byte ranges (raw copies) are hashed by a pool, one job per tensor;
    chunk updates of a streamed tensor go in order to one worker, with at most two buffers waiting."""

    def __init__(self, range_workers: int | None = None) -> None:
        workers = range_workers or _HASH_WORKERS
        self.ranges = ThreadPoolExecutor(workers, thread_name_prefix="pgconv-sha256")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pgconv-sha256-stream")
        self.pending: deque[Future] = deque()

    def update(self, h: "hashlib._Hash", data: object) -> None:
        self.pending.append(self.pool.submit(h.update, data))
        while sum(not f.done() for f in self.pending) > 2:
            self.pending.popleft().result()

    def update_from_file(self, h: "hashlib._Hash", path: Path, begin: int, end: int) -> None:
        self.pending.append(self.ranges.submit(_hash_range, h, path, begin, end))

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        self.ranges.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)


def _hash_range(h: "hashlib._Hash", path: Path, begin: int, end: int) -> None:
    """Hash a byte range straight from the page cache through a moving read-only mmap window (no copy)."""
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size < end:  # mapping past EOF would SIGBUS instead of raising
            raise InputError(f"{path}: truncated while hashing (file changed during the conversion)")
        pos = begin
        while pos < end:
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            length = min(end, base + _HASH_WINDOW) - base
            with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=base) as mm:
                view = memoryview(mm)
                try:
                    h.update(view[pos - base:])
                finally:
                    view.release()  # the map cannot close while a view is exported
            pos = base + length


def sha256_of(src: SourceTensor) -> str:
    h = hashlib.sha256()
    for piece in src.raw_chunks():
        h.update(piece)
    return h.hexdigest()


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _copy_range(src: SourceTensor, out_fd: int, progress: Callable[[int], None]) -> None:
    """Copy `src`'s byte span to the current position of `out_fd` without passing it through Python."""
    begin, end = src.span
    with open(src.file, "rb", buffering=0) as f:
        pos, kernel = begin, hasattr(os, "copy_file_range")
        while pos < end:
            want = min(_COPY_BYTES, end - pos)
            n = 0
            if kernel:
                try:
                    n = os.copy_file_range(f.fileno(), out_fd, want, pos)
                except OSError as e:  # other filesystem or kernel without support: copy through a buffer
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                        raise
                    kernel = False
            if not kernel:
                buf = bytearray(min(want, CHUNK_BYTES))
                n = os.preadv(f.fileno(), [buf], pos)
                _write_all(out_fd, memoryview(buf)[:n])
            if n <= 0:
                raise InputError(f"{src.file}: tensor {src.name!r} is truncated (file shorter than its header says)")
            pos += n
            progress(n)


def _values(step: Step, sources: Mapping[str, SourceTensor]) -> Iterator["torch.Tensor"]:
    """The target tensor's values in C order, as flat chunks in the source dtype."""
    srcs = [sources[s] for s in step.sources]
    if step.transform == "identity":
        yield from srcs[0].chunks()
        return
    out = TRANSFORMS[step.transform].apply([s.load() for s in srcs], step.args).contiguous().reshape(-1)
    per = max(1, CHUNK_BYTES // out.element_size())
    for i in range(0, out.numel(), per):
        yield out[i:i + per]


def _cast_stats(x: "torch.Tensor", y: "torch.Tensor", target: str) -> tuple[float, int]:
    """(max |y - x| over finite values, count of finite values that overflowed to inf)."""
    import torch

    wide = torch.float64 if x.dtype == torch.float64 else torch.float32  # exact for every source value
    xw, yw = x.to(wide), y.to(wide)
    finite = torch.isfinite(xw)
    overflow = int((finite & torch.isinf(yw)).sum()) if target == "F16" else 0
    ok = finite & torch.isfinite(yw)
    diff = float((yw - xw).abs().masked_fill(~ok, 0).max()) if x.numel() else 0.0
    return diff, overflow


def _emit(step: Step, sources: Mapping[str, SourceTensor], fd: int, hasher: _Hasher,
          progress: Callable[[int], None], rec: TensorRecord) -> "hashlib._Hash":
    h = hashlib.sha256()
    src = sources[step.sources[0]]
    if step.is_raw_copy and src.meta.dtype == step.target.dtype and src.span is not None:
        hasher.update_from_file(h, src.file, *src.span)
        _copy_range(src, fd, progress)
        rec.copied = True
        return h
    import torch

    target = step.target.dtype
    exact = all(is_widening(sources[s].meta.dtype, target) for s in step.sources)
    # Casts go into rotating preallocated buffers: a fresh allocation per chunk costs page faults on every
    # chunk. Three suffice because the hasher keeps at most two updates in flight (see _Hasher.update).
    bufs: list[torch.Tensor] = []
    for i, chunk in enumerate(_values(step, sources)):
        if len(bufs) < 3:
            bufs.append(torch.empty(chunk.numel(), dtype=torch_dtype(target)))  # first chunks are the largest
        out = bufs[i % 3][: chunk.numel()]
        out.copy_(chunk)
        if not exact:
            diff, over = _cast_stats(chunk, out, target)
            rec.max_abs_diff = max(rec.max_abs_diff or 0.0, diff)
            rec.fp16_overflow += over
        data = memoryview(out.contiguous().view(torch.uint8).numpy())
        hasher.update(h, data)
        _write_all(fd, data)
        progress(len(data))
    if not exact and rec.max_abs_diff is None:
        rec.max_abs_diff = 0.0
    return h


class StreamWriter:
    """Writes shards one after another; SHA-256 and disk write-back run on worker threads across shards.

    `write_shard` writes the header and data of one file; the file is fsynced and closed in the background
    (after periodic `fdatasync`s that start write-back early, so the copy and the disk overlap). `finish` waits
    for all of it and returns the records with their hashes. Use as a context manager.
    """

    def __init__(self, sources: Mapping[str, SourceTensor], progress: Callable[[int], None]) -> None:
        self.sources, self.progress = sources, progress
        self.hasher = _Hasher()
        self.flusher = ThreadPoolExecutor(1, thread_name_prefix="pgconv-fsync")
        self.flushes: list[Future] = []
        self.hashes: list[tuple[TensorRecord, "hashlib._Hash"]] = []

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.hasher.close()
        self.flusher.shutdown(wait=True)  # never cancel: the queued jobs close the shard files

    def write_shard(self, path: Path, steps: list[Step]) -> None:
        header, offsets = build_header([s.target for s in steps], {"format": "pt"})
        by_name = {s.target.name: s for s in steps}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        unsynced = 0
        try:
            _write_all(fd, memoryview(header))
            for name in sorted(offsets, key=offsets.get):
                step = by_name[name]
                assert os.lseek(fd, 0, os.SEEK_CUR) == offsets[name], f"writer out of step at {name}"
                rec = TensorRecord(step.target, path.name, tuple(self.sources[s].meta for s in step.sources),
                                   step.transform)
                self.hashes.append((rec, _emit(step, self.sources, fd, self.hasher, self.progress, rec)))
                unsynced += step.target.nbytes
                if unsynced >= _WRITEBACK_BYTES:
                    self.flushes.append(self.flusher.submit(os.fdatasync, fd))
                    unsynced = 0
        except BaseException:
            self.flushes.append(self.flusher.submit(os.close, fd))
            raise
        self.flushes.append(self.flusher.submit(_fsync_close, fd))

    def finish(self) -> list[TensorRecord]:
        self.hasher.drain()
        for f in self.flushes:
            f.result()
        for rec, h in self.hashes:
            rec.sha256 = h.hexdigest()
        return [rec for rec, _ in self.hashes]


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(path: Path, steps: list[Step], sources: Mapping[str, SourceTensor],
                progress: Callable[[int], None]) -> list[TensorRecord]:
    """Write one safetensors file for `steps` (header, then data in header order), fsynced."""
    with StreamWriter(sources, progress) as w:
        w.write_shard(path, steps)
        return w.finish()


def tensors_equal(a: SourceTensor, b: SourceTensor) -> bool:
    """Bit-identical contents (same dtype and shape), compared chunk by chunk."""
    if a.meta.dtype != b.meta.dtype or a.meta.shape != b.meta.shape:
        return False
    return all(x == y for x, y in zip(a.raw_chunks(), b.raw_chunks()))
