"""One output file of the streaming writer (`writer.py`): how its bytes reach the disk.

Whole aligned blocks go through an `O_DIRECT` descriptor (plan `direct`) or are buffered with early writeback
(`buffered`); a direct file is preallocated and the partial blocks at tensor boundaries (and the header) are
gathered in memory and written as whole direct blocks when the file is closed. Thread-safe: the writer's workers
write disjoint byte ranges of one file at once.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

from pgconv.converter import write_path
from pgconv.converter.write_path import BLOCK  # O_DIRECT alignment of memory, offsets and lengths
from pgconv.converter.write_path import pwrite_all as _pwrite_all

__all__ = ["OutFile", "write_stage", "BLOCK", "USE_DIRECT_IO"]

USE_DIRECT_IO = hasattr(os, "O_DIRECT")  # tests switch it off to cover the buffered path
_POOL_BLOCKS = 64  # gathered blocks per page-aligned chunk (a map per block would meet vm.max_map_count at ~65k)


class OutFile:
    """One output file of `size` bytes: whole aligned blocks through an O_DIRECT descriptor (plan `direct`) or
    buffered with early writeback (`buffered`).

    A direct file is preallocated and its partial blocks (tensor boundaries, the header) are gathered in memory
    and written as whole direct blocks at the end (`flush_gathered`; the file's last, short block buffered).
    Why: on ext4 a direct write into unallocated space, and every buffered write, takes the inode lock
    exclusively and holds it until its I/O is done, so writers of one file queue behind each other (timed on the
    AMD EPYC VM, 3B: ~900 boundary writes waited 6-8 s in total, 35 % of the workers' time); direct overwrites of
    preallocated blocks share the lock and run in parallel.
    """

    def __init__(self, path: Path, mode: str, size: int) -> None:
        self.path, self.size = path, size
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.direct: int | None = None
        self._lock = threading.Lock()
        self._blocks: dict[int, list] = {}  # block index -> [aligned block buffer, bytes of it still to come]
        self._ready: list[tuple[int, memoryview]] = []  # completed blocks (offset, buffer): flush_gathered
        self._pool: memoryview | None = None  # block buffers are cut from page-aligned chunks, not one mmap each
        self._pool_used = 0
        try:
            if USE_DIRECT_IO and mode == "direct":
                try:
                    self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
                except OSError:  # EINVAL where the filesystem has no direct I/O (tmpfs before Linux 6.6, some FUSE)
                    self.direct = None
            if self.direct is not None:
                write_path.preallocate(self.fd, size)  # ENOSPC here is the write's error, before any data
        except BaseException:
            self.close(sync=False)
            raise
        self.use_direct = self.direct is not None

    def _new_block(self) -> memoryview:
        """A zeroed, page-aligned block buffer (called under the lock)."""
        if self._pool is None or self._pool_used == len(self._pool):
            self._pool, self._pool_used = memoryview(mmap.mmap(-1, _POOL_BLOCKS * BLOCK)), 0
        self._pool_used += BLOCK
        return self._pool[self._pool_used - BLOCK:self._pool_used]

    def write_blocks(self, data: memoryview, offset: int) -> None:
        """`data` starts on an aligned address and `offset` and `len(data)` are multiples of `BLOCK`."""
        if self.direct is not None and self.use_direct:
            try:
                _pwrite_all(self.direct, data, offset)
                return
            except OSError as e:  # a device whose direct-I/O alignment is stricter than 4096 B: buffered from here
                if e.errno != errno.EINVAL:
                    raise
                # The descriptor stays open until close(): another worker may be writing through it right now,
                # and a closed number could be reused by a file opened meanwhile.
                self.use_direct = False
        _pwrite_all(self.fd, data, offset)
        write_path.kick_writeback(self.fd, offset, len(data))

    def write_bytes(self, data: memoryview, offset: int) -> None:
        """Bytes that need not fill whole blocks: written at once (buffered files), else gathered per block."""
        if self.direct is None:
            _pwrite_all(self.fd, data, offset)
            return
        pos, end = offset, offset + len(data)
        while pos < end:
            b = pos // BLOCK
            lo, hi = b * BLOCK, min(end, (b + 1) * BLOCK)
            with self._lock:
                slot = self._blocks.get(b)
                if slot is None:  # every byte of the file is written exactly once: a block knows how many to expect
                    slot = self._blocks[b] = [self._new_block(), min(self.size, lo + BLOCK) - lo]
                slot[0][pos - lo:hi - lo] = data[pos - offset:hi - offset]
                slot[1] -= hi - pos
                done = self._blocks.pop(b)[0] if slot[1] == 0 else None
                if done is not None:  # written by `flush_gathered`, not now: see there
                    self._ready.append((lo, done))
            pos = hi

    def flush_gathered(self) -> None:
        """Write the completed boundary blocks (one or two per tensor: a few MB), once every stage is written;
        runs of adjacent blocks (the header's) in one write. Written as each completed, every 4 KB write queued on
        the device behind the large ones and held its worker for ~4 ms (2.3 s summed over the workers at 3B, AMD
        EPYC VM)."""
        ready, self._ready = sorted(self._ready, key=lambda r: r[0]), []
        i = 0
        while i < len(ready):
            j = i + 1
            while j < len(ready) and ready[j][0] == ready[j - 1][0] + BLOCK:
                j += 1
            lo, run = ready[i][0], [block for _, block in ready[i:j]]
            if lo + len(run) * BLOCK > self.size:  # the file's short last block: a direct write would extend
                last = run.pop()  # the file past its size, so it is written buffered
                _pwrite_all(self.fd, last[:self.size - (lo + len(run) * BLOCK)], lo + len(run) * BLOCK)
            if len(run) == 1:
                self.write_blocks(run[0], lo)
            elif run:
                joined = memoryview(mmap.mmap(-1, len(run) * BLOCK))
                for k, block in enumerate(run):
                    joined[k * BLOCK:(k + 1) * BLOCK] = block
                self.write_blocks(joined, lo)
            i = j

    def close(self, sync: bool) -> None:
        try:
            if sync:
                if self._blocks:  # a bug, not bad input: some byte of these blocks was never produced
                    raise RuntimeError(f"{self.path}: blocks {sorted(self._blocks)[:5]} were never completed")
                self.flush_gathered()
                os.fsync(self.fd)  # also the direct writes' metadata and the device's write cache
        finally:
            if self.direct is not None:
                os.close(self.direct)
            os.close(self.fd)


def write_stage(out: OutFile, stage: memoryview, base: int, lead: int, n: int) -> None:
    """Write stage[lead:n] at file offset base + lead: whole blocks [first, last) through `write_blocks`, the
    partial ends through `write_bytes`."""
    first = -(-lead // BLOCK) * BLOCK
    last = n - n % BLOCK
    if first < last:
        if lead < first:
            out.write_bytes(stage[lead:first], base + lead)
        out.write_blocks(stage[first:last], base + first)
        if last < n:
            out.write_bytes(stage[last:n], base + last)
    else:
        out.write_bytes(stage[lead:n], base + lead)
