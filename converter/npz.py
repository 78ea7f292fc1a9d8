"""Streaming `.npz` reader and writer (big_vision checkpoints).

An `.npz` is a zip of `.npy` members (`np.savez`). `np.load` + `dict(...)` (what big_vision's `npload` does)
materialises every array; here the zip central directory and each member's `.npy` header are parsed first, and
array data is read only on demand:

* stored (uncompressed) members are memory-mapped at their offset in the file, one tensor or one layer slice
  at a time, so the pages of an already-converted tensor are released (unmapped) before the next one is read;
* compressed members (`np.savez_compressed`) are inflated one at a time; the last one is kept so that the
  per-layer slices of a stacked member do not inflate it once per layer.

bfloat16: numpy has no bfloat16, so `np.save` of a jax/ml_dtypes bfloat16 array writes the descr `<V2` and
`np.load` returns 2-byte void; big_vision's `recover_dtype` re-views it as bfloat16, and so do we
(`ml_dtypes.bfloat16`; `paligemma.md` §6.3, big_vision #107). Only float32, float16 and bfloat16 members are
tensors pgconv can use; anything else is an `InputError` naming the file and member when it is used.

The writer streams member by member (header, then data chunks) into an uncompressed zip with fixed timestamps
and attributes, so the same tensors always give the same bytes. Provenance goes into the zip archive comment,
which `np.load` (and so big_vision) ignores.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from pgconv.errors import InputError

__all__ = ["BFLOAT16", "NpzMember", "NpzReader", "NpzWriter", "to_torch", "from_torch", "iter_rows"]

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# Descriptors np.save writes for the dtypes PaliGemma checkpoints use (little-endian; '|V2' is bfloat16, see above).
_FLOATS = {np.dtype("<f4"): np.dtype("<f4"), np.dtype("<f2"): np.dtype("<f2"), np.dtype("V2"): BFLOAT16}
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, APPNOTE 4.3.7
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: deterministic output


@dataclass(frozen=True)
class NpzMember:
    """One array of an `.npz`: name without `.npy`, raw numpy dtype from the header, shape and where its bytes are."""

    name: str
    raw_dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    compressed: bool
    data_offset: int | None  # absolute offset of the array data in the file (stored members only)

    @property
    def dtype(self) -> np.dtype:
        """Tensor dtype (void V2 read as bfloat16); only for supported members."""
        return _FLOATS[self.raw_dtype]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.raw_dtype.itemsize


class NpzReader:
    """Index an `.npz` without reading array data; read arrays (or slices along axis 0) on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._cache: tuple[str, np.ndarray] | None = None  # last inflated compressed member
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise InputError(f"{self.path}: cannot open ({e.strerror})") from None
        self._size = os.fstat(self._file.fileno()).st_size
        try:
            self._zip = zipfile.ZipFile(self._file)
        except zipfile.BadZipFile:
            self._file.seek(0)
            starts_like_zip = self._file.read(4) == b"PK\x03\x04"
            self._file.close()
            why = "truncated (the zip central directory at the end is missing)" if starts_like_zip else "not a zip archive"
            raise InputError(f"{self.path}: {why}; an .npz is a zip of .npy members") from None
        self.comment = self._zip.comment
        self.members: dict[str, NpzMember] = {}
        # Stored members: (offset of the .npy bytes, their length, zip CRC-32), checked once before first use.
        self._stored: dict[str, tuple[int, int, int]] = {}
        self._verified: set[str] = set()
        for info in self._zip.infolist():
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                raise InputError(f"{self.path}: member {info.filename!r} is not an .npy array")
            if info.filename[: -len(".npy")] in self.members:  # np.load (zipfile) would silently read the last copy
                raise InputError(f"{self.path}: member {info.filename[: -len('.npy')]!r} appears twice in the archive")
            member = self._index(info)
            self.members[member.name] = member

    # -- indexing -----------------------------------------------------------------------------------------------

    def _index(self, info: zipfile.ZipInfo) -> NpzMember:
        name = info.filename[: -len(".npy")]
        where = f"{self.path}: member {name!r}"
        if info.compress_type == zipfile.ZIP_STORED:
            if not 0 <= info.header_offset < self._size:  # zipfile derives it from a damaged central directory
                raise InputError(f"{where}: corrupt zip entry (offset {info.header_offset} is outside the file)")
            raw = os.pread(self._file.fileno(), _LOCAL_HEADER.size, info.header_offset)
            if len(raw) < _LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
                raise InputError(f"{where}: truncated or corrupt zip entry")
            *_, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
            local_name = os.pread(self._file.fileno(), name_len, info.header_offset + _LOCAL_HEADER.size)
            if local_name not in (info.orig_filename.encode("utf-8"), info.orig_filename.encode("cp437", "replace")):
                raise InputError(f"{where}: corrupt zip entry (its local header names {local_name[:80]!r})")
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            self._stored[name] = (start, info.file_size, info.CRC)
            self._file.seek(start)
            shape, fortran, dtype = _read_npy_header(self._file, where)
            header_len = self._file.tell() - start
            member = NpzMember(name, dtype, shape, fortran, False, start + header_len)
            if start + header_len + member.nbytes > self._size:
                raise InputError(f"{where}: truncated ({member.nbytes} data bytes expected at offset "
                                 f"{start + header_len}, the file has {self._size} bytes)")
        else:
            try:
                with self._zip.open(info) as fp:
                    shape, fortran, dtype = _read_npy_header(fp, where)
                    header_len = fp.tell()
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
                raise InputError(f"{where}: corrupt zip entry ({e})") from None
            member = NpzMember(name, dtype, shape, fortran, True, None)
        if info.file_size != header_len + member.nbytes:
            raise InputError(f"{where}: the zip entry holds {info.file_size - header_len} data bytes but the .npy "
                             f"header says {member.shape} {member.raw_dtype.str} ({member.nbytes} bytes)")
        return member

    def verify(self, name: str) -> None:
        """Check a stored member's zip CRC-32 (once): pgconv maps or copies its bytes directly, so without this a
        corrupted member would be converted silently where numpy (and big_vision) refuse it. Compressed members are
        checked by zipfile as they are inflated."""
        if name in self._verified or name not in self._stored:
            return
        start, size, want = self._stored[name]
        crc, pos = 0, start
        while pos < start + size:
            chunk = os.pread(self._file.fileno(), min(16 << 20, start + size - pos), pos)
            if not chunk:
                raise InputError(f"{self.path}: member {name!r} is truncated")
            crc, pos = zlib.crc32(chunk, crc), pos + len(chunk)
        if crc != want:
            raise InputError(f"{self.path}: member {name!r} is corrupt (CRC-32 {crc:08x}, the zip says {want:08x})")
        self._verified.add(name)

    def member(self, name: str) -> NpzMember:
        """The member `name`, checked to be a float tensor (float32, float16, or bfloat16 stored as void V2)."""
        try:
            m = self.members[name]
        except KeyError:
            raise InputError(f"{self.path}: no member {name!r}") from None
        if m.raw_dtype.kind == "V" and m.raw_dtype not in _FLOATS:
            raise InputError(f"{self.path}: member {name!r} has void dtype {m.raw_dtype.str} "
                             f"(itemsize {m.raw_dtype.itemsize}); only 2-byte void (bfloat16) is understood")
        if m.raw_dtype not in _FLOATS:
            raise InputError(f"{self.path}: member {name!r} has dtype {m.raw_dtype.str}; "
                             "expected float32, float16 or bfloat16 (stored as void V2)")
        return m

    # -- reading ------------------------------------------------------------------------------------------------

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """The array `name` (or `name[index]` along axis 0), read-only, with bfloat16 recovered.

        Stored members come back as a memory map of exactly the bytes needed; drop the array to unmap it.
        Compressed members are inflated whole (the last one stays cached for its other slices).
        """
        m = self.member(name)
        if index is not None and not (m.shape and 0 <= index < m.shape[0]):
            raise InputError(f"{self.path}: member {name!r} of shape {m.shape} has no index {index} on axis 0")
        if m.compressed:
            if self._cache is None or self._cache[0] != name:
                self._cache = None  # free the previous one before inflating the next
                try:
                    with self._zip.open(name + ".npy") as fp:
                        arr = np.lib.format.read_array(fp, allow_pickle=False)
                except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:  # bad CRC, broken deflate stream
                    raise InputError(f"{self.path}: member {name!r} is corrupt ({e})") from None
                self._cache = (name, arr.view(m.dtype))
            arr = self._cache[1]
            return arr if index is None else arr[index]
        self.verify(name)
        if m.fortran_order:
            # np.save of a transposed array: the bytes are the C-order array of the reversed shape. Map it whole
            # (an axis-0 slice is strided) and transpose the view back.
            arr = self._map(m.data_offset, m.shape[::-1], m.dtype).T
            return arr if index is None else arr[index]
        shape, offset = m.shape, m.data_offset
        if index is not None:
            shape = m.shape[1:]
            offset += index * (m.nbytes // m.shape[0])  # C order: slices along axis 0 are contiguous
        return self._map(offset, shape, m.dtype)

    def _map(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-order array of `shape` at `offset` in the file, memory-mapped (unmapped when the array is dropped)."""
        if 0 in shape:
            return np.zeros(shape, dtype)
        # mmap wants a page-aligned offset; map from the page below and view the array at the remainder.
        count = int(np.prod(shape, dtype=np.int64))
        page = offset - offset % mmap.ALLOCATIONGRANULARITY
        # ACCESS_COPY: a private copy-on-write map, writable for torch.from_numpy, never writing the file.
        buf = mmap.mmap(self._file.fileno(), offset - page + count * dtype.itemsize, access=mmap.ACCESS_COPY,
                        offset=page)
        return np.frombuffer(buf, dtype=dtype, count=count, offset=offset - page).reshape(shape)

    def close(self) -> None:
        self._cache = None
        self._zip.close()
        self._file.close()

    def __enter__(self) -> "NpzReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_npy_header(fp, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fp)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fp)
        raise ValueError(f"unsupported .npy format version {version}")
    except Exception as e:  # untrusted header text: numpy raises ValueError, SyntaxError, tokenize.TokenError, ...
        raise InputError(f"{where}: bad .npy header ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------------


class NpzWriter:
    """Write an uncompressed `.npz` one member at a time; each member's data comes as a stream of chunks.

    Output is deterministic: fixed timestamps and attributes, members in the order added, zip64 records always
    (a 3B float32 `gating_einsum` is 4.8 GB, past the 4 GiB zip limit).
    """

    def __init__(self, path: str | os.PathLike, comment: bytes = b""):
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._zip.comment = comment
        self._names: set[str] = set()

    def add(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterable[np.ndarray]) -> None:
        """Add member `name` (without `.npy`): C-order data for `shape`, `dtype`, given as consecutive chunks."""
        dtype = np.dtype(dtype)
        if name in self._names:
            raise ValueError(f"duplicate npz member {name!r}")
        self._names.add(name)
        info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_STORED
        info.create_system = 3  # unix, whatever the host
        info.external_attr = 0o644 << 16
        # np.save writes bfloat16 as '<V2' (dtype_to_descr falls back to dtype.str); big_vision expects exactly that.
        descr = "<V2" if dtype == BFLOAT16 else np.lib.format.dtype_to_descr(dtype)
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        written = 0
        with self._zip.open(info, "w", force_zip64=True) as fp:
            np.lib.format.write_array_header_1_0(fp, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk)
                if chunk.dtype != dtype:
                    raise ValueError(f"npz member {name!r}: chunk dtype {chunk.dtype} != {dtype}")
                fp.write(memoryview(chunk.reshape(-1).view(np.uint8)))
                written += chunk.nbytes
        if written != expected:
            raise ValueError(f"npz member {name!r}: wrote {written} bytes, shape {shape} {dtype} needs {expected}")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# numpy <-> torch without copies; torch has bfloat16 but numpy does not, so bfloat16 crosses as raw 16-bit words.


def to_torch(a: np.ndarray):
    import torch

    if a.dtype == BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def from_torch(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


def iter_rows(a: np.ndarray, chunk_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """Split an array into chunks of whole rows (axis 0) of about `chunk_bytes`, for streaming writes."""
    if a.ndim == 0 or a.shape[0] == 0:
        yield a
        return
    rows = max(1, chunk_bytes // max(1, a[0].nbytes))
    for start in range(0, a.shape[0], rows):
        yield a[start:start + rows]
