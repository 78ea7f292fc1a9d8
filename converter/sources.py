"""Lazy tensor sources: what a reader knows about a tensor before any of its bytes are read.

Every reader (safetensors, torch `.bin`, later big_vision `.npz`) turns a file into `SourceTensor`s:
metadata (`TensorMeta`: name, shape, dtype code) plus either a byte `span` (absolute `[begin, end)` offsets of
raw little-endian C-order data inside `file`, which a writer can copy without materialising the tensor) or a
`loader` that materialises it (memory-mapped where the format allows). A source may have both: an `.npz`
member stored uncompressed has a span *and* a loader.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pgconv.converter.dtypes import itemsize, torch_dtype
from pgconv.errors import InputError

if TYPE_CHECKING:  # torch is imported only where values are needed (see dtypes.py)
    import torch

__all__ = ["TensorMeta", "SourceTensor", "CHUNK_BYTES", "sha256_of", "tensors_equal"]

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
    loader: Callable[[], "torch.Tensor"] | None = None

    @property
    def name(self) -> str:
        return self.meta.name

    def load(self) -> "torch.Tensor":
        """The whole tensor in memory (a fresh tensor for spans: no mmap pages stay mapped)."""
        import torch

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

    def raw_chunks(self, max_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
        """The tensor's raw little-endian C-order bytes in pieces of at most `max_bytes` (whole elements).

        Pieces read from a span share one buffer that the next piece reuses: consume or copy each one before
        asking for the next. Needs no torch for span sources.
        """
        step = max(1, max_bytes // itemsize(self.meta.dtype)) * itemsize(self.meta.dtype)
        if self.span is None:
            import torch

            data = memoryview(self.load().contiguous().reshape(-1).view(torch.uint8).numpy())
            for pos in range(0, len(data), step):
                yield data[pos:pos + step]
            return
        begin, end = self.span
        view = memoryview(bytearray(min(step, end - begin)))
        for pos in range(begin, end, step):
            piece = view[: min(step, end - pos)]
            _read_into(self, piece, pos - begin)
            yield piece

    def chunks(self, max_bytes: int = CHUNK_BYTES) -> Iterator["torch.Tensor"]:
        """The tensor's elements in C order as flat 1-D pieces of at most `max_bytes` (bounded memory for spans).

        Like `raw_chunks`, a piece read from a span lives in a buffer that the next piece reuses.
        """
        import torch

        if self.span is None:
            flat = self.load().reshape(-1)
            per = max(1, max_bytes // itemsize(self.meta.dtype))
            for i in range(0, flat.numel(), per):
                yield flat[i:i + per]
            return
        dtype = torch_dtype(self.meta.dtype)
        for piece in self.raw_chunks(max_bytes):
            yield torch.frombuffer(piece, dtype=dtype)


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


def sha256_of(src: SourceTensor) -> str:
    h = hashlib.sha256()
    for piece in src.raw_chunks():
        h.update(piece)
    return h.hexdigest()


def tensors_equal(a: SourceTensor, b: SourceTensor) -> bool:
    """Bit-identical contents (same dtype and shape), compared chunk by chunk."""
    if a.meta.dtype != b.meta.dtype or a.meta.shape != b.meta.shape:
        return False
    return all(x == y for x, y in zip(a.raw_chunks(), b.raw_chunks()))
