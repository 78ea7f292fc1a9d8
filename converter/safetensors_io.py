"""safetensors headers, read and written by hand so that planning never touches tensor bytes.

File layout (huggingface/safetensors README): 8-byte little-endian header length N, N bytes of JSON mapping each
name to `{"dtype", "shape", "data_offsets": [begin, end]}` (relative to the data buffer) plus an optional
string->string `__metadata__`, then the data buffer. The reader enforces the format's rules (header <= 100 MB,
starts with `{`, valid JSON without duplicate keys, known dtypes, sizes that match shapes, a buffer without
holes or overlaps that ends exactly at EOF) and raises `InputError` naming the file and tensor. The writer
reproduces the Rust writer byte for byte: tensors by descending dtype then name, compact JSON, header padded
with spaces to 8 bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

from pgconv.converter.dtypes import DTYPES, RUST_ORDER
from pgconv.converter.sources import SourceTensor, TensorMeta
from pgconv.errors import InputError, json_type, json_value_error

__all__ = ["MAX_HEADER_BYTES", "read_safetensors", "rust_order", "build_header"]

MAX_HEADER_BYTES = 100_000_000  # safetensors MAX_HEADER_SIZE


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _Duplicate(Exception):
    pass


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, SourceTensor]]:
    """Parse and validate the header of `path`: (`__metadata__`, tensors in data-offset order). Reads no data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise InputError(f"{path}: safetensors header of {n} bytes exceeds the 100 MB limit")
            if 8 + n > size:
                raise InputError(f"{path}: safetensors header length {n} is larger than the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw.startswith(b"{"):
        raise InputError(f"{path}: safetensors header does not start with '{{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise InputError(f"{path}: safetensors header lists {e.args[0]!r} twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: safetensors header is not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: safetensors header JSON is nested too deeply") from None
    except ValueError as e:  # an integer literal past Python's int-from-string limit (4300 digits)
        raise InputError(f"{path}: safetensors header is not valid JSON ({json_value_error(e)})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + n
    tensors = [_tensor(path, name, entry, data_start) for name, entry in header.items()]
    tensors.sort(key=lambda t: t.span)
    pos = data_start
    for t in tensors:
        begin, end = t.span
        if begin < pos:
            raise InputError(f"{path}: tensor {t.name!r} overlaps the previous tensor's data")
        if begin > pos:
            raise InputError(f"{path}: {begin - pos} unused bytes (a hole) before tensor {t.name!r}")
        pos = end
    if pos > size:
        raise InputError(f"{path}: tensor data extends beyond the end of the file (truncated: needs {pos} bytes, has {size})")
    if pos < size:
        raise InputError(f"{path}: {size - pos} bytes after the last tensor are not described by the header")
    return metadata, {t.name: t for t in tensors}


def _tensor(path: Path, name: str, entry: object, data_start: int) -> SourceTensor:
    where = f"{path}: tensor {name!r}"
    if not name:
        raise InputError(f"{path}: a tensor has an empty name")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{where}: header entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):  # a list or object is not even hashable
        raise InputError(f"{where}: dtype must be a string, got {json_type(dtype)}")
    if dtype not in DTYPES:
        raise InputError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise InputError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair")
    meta = TensorMeta(name, tuple(shape), dtype)
    if offsets[1] - offsets[0] != meta.nbytes:
        raise InputError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes but {dtype} {shape} needs {meta.nbytes}")
    return SourceTensor(meta, path, span=(data_start + offsets[0], data_start + offsets[1]))


def rust_order(metas: Sequence[TensorMeta]) -> list[TensorMeta]:
    """The safetensors Rust writer's order: descending dtype, then name."""
    return sorted(metas, key=lambda m: (-RUST_ORDER[m.dtype], m.name))


def build_header(metas: Sequence[TensorMeta], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """(8-byte length + padded JSON header, absolute file offset of each tensor's data) in Rust order.

    Byte-identical to `safetensors.torch.save_file(tensors, metadata=metadata)` for the same tensors.
    """
    ordered = rust_order(metas)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    pos, rel = 0, {}
    for m in ordered:
        header[m.name] = {"dtype": m.dtype, "shape": list(m.shape), "data_offsets": [pos, pos + m.nbytes]}
        rel[m.name] = pos
        pos += m.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the Rust writer pads with spaces so the data buffer starts 8-byte aligned
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {name: len(prefix) + off for name, off in rel.items()}
