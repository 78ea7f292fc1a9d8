"""Streaming safetensors writer: every tensor is produced, hashed and written by a small pool of workers.

Memory stays flat whatever the model size: each worker owns one page-aligned staging buffer; a same-dtype rename
reads source bytes straight into it (`preadv`), a cast reads `CHUNK_BYTES` of source at a time and converts into
it, and only a non-byte-preserving transform materialises one tensor. The tensor's SHA-256 is taken from the
staging buffer (one pass, in order, on the worker that owns the tensor), then the buffer goes to disk.

Output offsets are all known from the header, so tensors are independent jobs written with `pwrite`. How they
reach the disk is the destination filesystem's measured `write_path.Plan` (PGCONV_WRITER to force one):
- `direct`: whole 4096-byte blocks through an `O_DIRECT` descriptor: no page-cache copy (on the AMD EPYC VM the
  buffered path cost about one CPU-second per GB), no dirty pages for the final `fsync` to wait for, and the
  source stays in the page cache instead of being evicted by gigabytes of output;
- `buffered`: ordinary writes, each followed by `sync_file_range` so that writeback starts at once (on the Intel
  Xeon VM buffered writeback outran O_DIRECT);
plus the plan's staging size and worker count. A direct file is preallocated (`fallocate`) and the partial blocks
at tensor boundaries (and the header) are gathered in memory until whole, then written direct too, at the end
(`out_file.OutFile`); filesystems without `O_DIRECT` (tmpfs before Linux 6.6, some FUSE) get buffered writes for
everything. Every file is fsynced in `finish` in every mode. torch is imported only for casts and transforms.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pgconv.converter import write_path
from pgconv.converter.out_file import OutFile, write_stage
from pgconv.converter.dtypes import is_widening, itemsize, torch_dtype
from pgconv.converter.plan import TRANSFORMS, Step
from pgconv.converter.safetensors_io import build_header
from pgconv.converter.sources import SourceTensor, TensorMeta
from pgconv.errors import InputError

if TYPE_CHECKING:  # torch only for casts and transforms: a same-dtype conversion never imports it
    import torch

__all__ = ["TensorRecord", "StreamWriter", "write_shard"]

# Staging bytes per worker and worker count of a forced plan (PGCONV_WRITER=direct|buffered; tests shrink the
# stage): a measured plan brings its own (write_path).
_STAGE_BYTES = write_path.DEFAULT_STAGE  # a multiple of write_path.BLOCK
_WORKERS = write_path.DEFAULT_WORKERS


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


class _Stage(threading.local):
    """Each worker thread's page-aligned staging buffer (anonymous mmap: aligned for O_DIRECT)."""

    view: memoryview | None = None

    def get(self, size: int) -> memoryview:
        if self.view is None:
            self.view = memoryview(mmap.mmap(-1, size))
        return self.view


class _Raw:
    """Source bytes as they are: read straight into the caller's buffer."""

    def __init__(self, src: SourceTensor) -> None:
        assert src.span is not None
        self.src, self.pos = src, src.span[0]
        self.f = open(src.file, "rb", buffering=0)

    def into(self, view: memoryview) -> int:
        end = self.src.span[1]  # type: ignore[index]
        n = os.preadv(self.f.fileno(), [view[: end - self.pos]], self.pos) if self.pos < end else 0
        if n <= 0:
            raise InputError(f"{self.src.file}: tensor {self.src.name!r} is truncated (file shorter than its header "
                             "says)")
        self.pos += n
        return n

    def close(self) -> None:
        self.f.close()


class _Values:
    """A step's values cast to the target dtype, written element by element into the caller's buffers.

    Identity steps stream the source's own `chunks()` (`CHUNK_BYTES` at a time; readers such as the vocabulary
    pad/cut of big_vision embeddings stream there too); a transform materialises its one target tensor. An
    element that does not fit at the end of a buffer is finished in the next one.
    """

    def __init__(self, step: Step, sources: Mapping[str, SourceTensor], rec: TensorRecord) -> None:
        import torch

        self.torch, self.rec = torch, rec
        self.dtype, self.size = torch_dtype(step.target.dtype), itemsize(step.target.dtype)
        srcs = [sources[s] for s in step.sources]
        self.exact = all(is_widening(s.meta.dtype, step.target.dtype) for s in srcs)
        self.code = step.target.dtype
        self.left = step.target.numel  # elements still to produce
        self.spill = b""  # bytes of an element split across two buffers
        if step.transform == "identity":
            self.chunks: Iterator[torch.Tensor] = srcs[0].chunks()
        else:
            out = TRANSFORMS[step.transform].apply([s.load() for s in srcs], step.args).contiguous().reshape(-1)
            self.chunks = iter([out])
        self.cur: torch.Tensor | None = None
        self.pos = 0

    def _take(self, k: int) -> "torch.Tensor":
        """Up to `k` (at least one) next source elements; valid until the next call (chunks share a buffer)."""
        while self.cur is None or self.pos >= self.cur.numel():
            try:
                self.cur, self.pos = next(self.chunks).reshape(-1), 0
            except StopIteration:
                raise InputError(f"{self.rec.sources[0].name!r}: source produced fewer values than its shape "
                                 "says") from None
        out = self.cur[self.pos:self.pos + k]
        self.pos += out.numel()
        self.left -= out.numel()
        return out

    def into(self, view: memoryview) -> int:
        if self.spill:
            n = min(len(view), len(self.spill))
            view[:n], self.spill = self.spill[:n], self.spill[n:]
            return n
        if self.left <= 0:
            raise InputError(f"{self.rec.file}: {self.rec.target.name!r} produced fewer values than its shape says")
        k = min(len(view) // self.size, self.left)
        if k == 0:  # less room than one element: cast one into `spill`, hand over its first bytes
            one = self._cast(self._take(1), self.torch.empty(1, dtype=self.dtype))
            self.spill = one.view(self.torch.uint8).numpy().tobytes()
            return self.into(view)
        x = self._take(k)
        self._cast(x, self.torch.frombuffer(view[: x.numel() * self.size], dtype=self.dtype))
        return x.numel() * self.size

    def _cast(self, x: "torch.Tensor", out: "torch.Tensor") -> "torch.Tensor":
        out.copy_(x)
        if not self.exact:
            diff, over = _cast_stats(x, out, self.code)
            self.rec.max_abs_diff = max(self.rec.max_abs_diff or 0.0, diff)
            self.rec.fp16_overflow += over
        return out

    def close(self) -> None:
        if not self.exact and self.rec.max_abs_diff is None:
            self.rec.max_abs_diff = 0.0
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


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


def _materialises(step: Step, sources: Mapping[str, SourceTensor]) -> bool:
    """True when producing `step` holds a whole tensor: a transform, or an identity whose source has neither a
    byte span nor a streaming `chunks()` of its own (e.g. a `.bin` tensor)."""
    if step.transform != "identity":
        return True
    src = sources[step.sources[0]]
    return src.span is None and type(src).chunks is SourceTensor.chunks


def _write_span(out: OutFile, begin: int, end: int, fill: Callable[[memoryview], int], h: "hashlib._Hash | None",
                stage: memoryview, progress: Callable[[int], None], cancelled: threading.Event,
                io: ThreadPoolExecutor | None = None) -> None:
    """Produce bytes [begin, end) of `out` through `stage`: fill, then hash (in order) while the same bytes are
    being written (both only read the stage); whole aligned blocks go direct, the partial ends buffered."""
    pos = begin
    while pos < end:
        if cancelled.is_set():
            return
        # The stage maps file bytes [base, base + len(stage)): addresses stay aligned.
        base = pos - pos % write_path.BLOCK
        lead = pos - base
        limit = min(len(stage), lead + end - pos)
        n = lead
        while n < limit:
            n += fill(stage[n:limit])
        pending = io.submit(write_stage, out, stage, base, lead, n) if io is not None else None
        if h is not None:
            h.update(stage[lead:n])
        if pending is not None:
            pending.result()
        else:
            write_stage(out, stage, base, lead, n)
        progress(n - lead)
        pos = base + n


class StreamWriter:
    """Writes shards through a worker pool; use as a context manager.

    `write_shard` opens one file, writes its header and queues its tensors; `finish` runs every queued tensor
    (largest first, across files), fsyncs and closes the files and returns the records (in file order) with
    their hashes. An error in any job stops the others (at their next buffer) and is raised by `finish`; after
    Ctrl-C, `__exit__` stops them the same way.
    """

    def __init__(self, sources: Mapping[str, SourceTensor], progress: Callable[[int], None]) -> None:
        self.sources = sources
        self._progress, self._lock = progress, threading.Lock()
        # Pools, staging size and write mode come with the first shard: the plan is the destination filesystem's.
        self.plan: write_path.Plan | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.io: ThreadPoolExecutor | None = None
        self.stage = _Stage()
        self.cancelled = threading.Event()
        self.materialising = threading.Lock()
        self.files: list[OutFile] = []
        self.queued: list[tuple] = []  # jobs of every shard, started by `finish`
        self.jobs: list[Future] = []
        self.hashes: list[tuple[TensorRecord, "hashlib._Hash"]] = []

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancelled.set()  # no-op after finish(); otherwise stop queued and running jobs at the next buffer
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.io is not None:
            self.io.shutdown(wait=True)
        for f in self.files:
            f.close(sync=False)
        self.files.clear()

    def progress(self, n: int) -> None:
        with self._lock:
            self._progress(n)

    def write_shard(self, path: Path, steps: list[Step]) -> None:
        header, offsets = build_header([s.target for s in steps], {"format": "pt"})
        if self.plan is None:
            self.plan = plan = write_path.plan_for(path.parent, _STAGE_BYTES, _WORKERS)
            self.pool = ThreadPoolExecutor(plan.workers, thread_name_prefix="pgconv-write")
            self.io = ThreadPoolExecutor(plan.workers, thread_name_prefix="pgconv-io")  # one write in flight each
        out = OutFile(path, self.plan.mode, len(header) + sum(s.target.nbytes for s in steps))
        self.files.append(out)
        out.write_bytes(memoryview(header), 0)
        by_name = {s.target.name: s for s in steps}
        for name in sorted(offsets, key=offsets.get):
            step = by_name[name]
            rec = TensorRecord(step.target, path.name, tuple(self.sources[s].meta for s in step.sources),
                               step.transform)
            h = hashlib.sha256()
            self.hashes.append((rec, h))
            start = offsets[name]
            self.queued.append((out, step, rec, h, start, start + step.target.nbytes))

    def _job(self, out: OutFile, step: Step, rec: TensorRecord, h: "hashlib._Hash", begin: int, end: int) -> None:
        if self.cancelled.is_set():
            return
        try:
            src = self.sources[step.sources[0]]
            # A job that holds a whole tensor in memory (a transform, or a source that cannot stream) runs one at a
            # time: peak memory stays one tensor plus the streaming buffers, as in a sequential writer, while the
            # other workers keep streaming.
            with self.materialising if _materialises(step, self.sources) else contextlib.nullcontext():
                if step.is_raw_copy and src.meta.dtype == step.target.dtype and src.span is not None:
                    producer: _Raw | _Values = _Raw(src)
                    rec.copied = True
                else:
                    producer = _Values(step, self.sources, rec)
                try:
                    _write_span(out, begin, end, producer.into, h, self.stage.get(self.plan.stage), self.progress,
                                self.cancelled, self.io)
                finally:
                    producer.close()
        except BaseException:
            self.cancelled.set()
            raise

    def finish(self) -> list[TensorRecord]:
        # Largest first: the run ends when the last worker does, so the 1 GB embedding must not start last.
        for args in sorted(self.queued, key=lambda a: a[5] - a[4], reverse=True):
            self.jobs.append(self.pool.submit(self._job, *args))  # type: ignore[union-attr]  # set with the shard
        self.queued.clear()
        for job in self.jobs:
            job.result()  # the first failure raises (the others stop at their next buffer)
        files, self.files = self.files, []
        try:
            for f in files:
                f.close(sync=True)
        except BaseException:
            for f in files[files.index(f) + 1:]:
                f.close(sync=False)
            raise
        for rec, h in self.hashes:
            rec.sha256 = h.hexdigest()
        return [rec for rec, _ in self.hashes]


def write_shard(path: Path, steps: list[Step], sources: Mapping[str, SourceTensor],
                progress: Callable[[int], None]) -> list[TensorRecord]:
    """Write one safetensors file for `steps` (header, then data in header order), fsynced."""
    with StreamWriter(sources, progress) as w:
        w.write_shard(path, steps)
        return w.finish()
