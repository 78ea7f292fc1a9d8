"""Lazy tensor sources: what a reader knows about a tensor before any of its bytes are read.

Every reader (safetensors, torch `.bin`, later big_vision `.npz`) turns a file into `SourceTensor`s:
metadata (`TensorMeta`: name, shape, dtype code) plus either a byte `span` (absolute `[begin, end)` offsets of
raw little-endian C-order data inside `file`, which a writer can copy without materialising the tensor) or a
`loader` that materialises it (memory-mapped where the format allows). A source may have both: an `.npz`
member stored uncompressed has a span *and* a loader.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pgconv.converter.dtypes import itemsize, torch_dtype
from pgconv.errors import InputError

__all__ = ["TensorMeta", "SourceTensor", "CHUNK_BYTES"]

# Copy/cast granularity: large enough for full disk throughput, small enough to keep peak memory flat.
CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, see converter/dtypes.py

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True, eq=False)
class SourceTensor:
    meta: TensorMeta
    file: Path
    span: tuple[int, int] | None = None  # absolute byte range of the raw data in `file`
    loader: Callable[[], torch.Tensor] | None = None

    @property
    def name(self) -> str:
        return self.meta.name

    def load(self) -> torch.Tensor:
        """The whole tensor in memory (a fresh tensor for spans: no mmap pages stay mapped)."""
        if self.loader is not None:
            t = self.loader()
        else:
            t = torch.empty(self.meta.shape, dtype=torch_dtype(self.meta.dtype))
            if t.numel():
                _read_into(self, memoryview(t.reshape(-1).view(torch.uint8).numpy()), 0)
        if tuple(t.shape) != self.meta.shape or t.dtype != torch_dtype(self.meta.dtype):
            raise InputError(f"{self.file}: tensor {self.name!r} loaded as {t.dtype} {tuple(t.shape)}, "
                             f"its header says {self.meta.dtype} {list(self.meta.shape)}")
        return t

    def chunks(self, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """The tensor's elements in C order as flat 1-D pieces of at most `max_bytes` (bounded memory for spans).

        A piece read from a span lives in a buffer that the next piece reuses: consume or clone it before asking
        for the next one.
        """
        size = itemsize(self.meta.dtype)
        step = max(1, max_bytes // size) * size
        if self.span is None:
            flat = self.load().reshape(-1)
            per = step // size
            for i in range(0, flat.numel(), per):
                yield flat[i:i + per]
            return
        begin, end = self.span
        buf = torch.empty(min(step, end - begin), dtype=torch.uint8)
        for pos in range(begin, end, step):
            n = min(step, end - pos)
            view = buf[:n]
            _read_into(self, memoryview(view.numpy()), pos - begin)
            yield view.view(torch_dtype(self.meta.dtype))


def _read_into(src: SourceTensor, out: memoryview, rel: int) -> None:
    """Fill `out` with the bytes at `span[0] + rel`; a short read means the file changed under us."""
    assert src.span is not None
    with open(src.file, "rb", buffering=0) as f:
        fd, done = f.fileno(), 0
        while done < len(out):
            n = os.preadv(fd, [out[done:]], src.span[0] + rel + done)
            if n <= 0:
                raise InputError(f"{src.file}: tensor {src.name!r} is truncated (file shorter than its header says)")
            done += n
