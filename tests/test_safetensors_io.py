"""Header-only safetensors reading (validation catalogue), the Rust-identical header writer, index and .bin readers."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from convert_helpers import random_bits
from pgconv.converter.checkpoint import open_checkpoint
from pgconv.converter.dtypes import DTYPES, code_of
from pgconv.converter.safetensors_io import build_header, read_safetensors
from pgconv.converter.sources import TensorMeta
from pgconv.errors import InputError

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _raw(header: dict | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.text("abcxyz._0123", min_size=1, max_size=8), st.sampled_from(_DTYPES),
                          st.lists(st.integers(0, 4), max_size=3)), max_size=6, unique_by=lambda t: t[0]),
       st.booleans())
def test_header_is_byte_identical_to_safetensors(tmp_path_factory, tensors, with_meta):
    """Our header + data in header order == safetensors' Rust writer, byte for byte."""
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    g = torch.Generator().manual_seed(0)
    sd = {name: torch.zeros(shape, dtype=dt) if dt == torch.bool else random_bits(tuple(shape), dt, g)
          for name, dt, shape in tensors}
    meta = {"format": "pt"} if with_meta else None
    save_file(sd, path, metadata=meta)
    header, offsets = build_header([TensorMeta(n, tuple(t.shape), code_of(t.dtype)) for n, t in sd.items()], meta)
    ours = bytearray(header)
    for name in sorted(offsets, key=offsets.get):
        assert len(ours) == offsets[name]
        ours += sd[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert bytes(ours) == path.read_bytes()


def test_reader_spans_match_safe_open(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {"a": random_bits((3, 5), torch.bfloat16, g), "b": torch.randn(7), "c": torch.zeros(0, 4)}
    save_file(sd, tmp_path / "m.safetensors", metadata={"format": "pt"})
    metadata, tensors = read_safetensors(tmp_path / "m.safetensors")
    assert metadata == {"format": "pt"}
    for name, t in sd.items():
        src = tensors[name]
        assert src.meta == TensorMeta(name, tuple(t.shape), code_of(t.dtype))
        assert torch.equal(src.load().view(torch.uint8), t.view(torch.uint8))
        chunks = [c.clone() for c in src.chunks(max_bytes=4)]  # pieces share one buffer
        assert all(c.numel() * c.element_size() <= 4 for c in chunks)
        assert torch.equal(torch.cat(chunks).view(torch.uint8) if chunks else torch.empty(0, dtype=torch.uint8),
                           t.reshape(-1).view(torch.uint8))


_GOOD = {"__metadata__": {"format": "pt"}, "w": _entry()}
BAD_FILES = {
    "zero-length": (b"", "shorter than the 8-byte header length"),
    "short": (b"\x01\x02\x03", "shorter than the 8-byte header length"),
    "header longer than file": (_raw(_GOOD, b"\0" * 8, declared=10_000), "larger than the file"),
    "header over 100 MB": (_raw(_GOOD, b"\0" * 8, declared=200_000_000), "100 MB"),
    "malformed json": (_raw(b'{"w": {"dtype": "F32",', b"\0" * 8), "not valid JSON"),
    "not an object": (_raw(b"[1, 2]   ", b""), "does not start with"),
    "duplicate key": (_raw(b'{"w":' + json.dumps(_entry()).encode() + b',"w":' + json.dumps(_entry()).encode() + b"}", b"\0" * 8),
                      "'w' twice"),
    "unknown dtype": (_raw({"w": _entry(dtype="Q4")}, b"\0" * 8), "unknown dtype 'Q4'"),
    "size mismatch": (_raw({"w": _entry(shape=(3,))}, b"\0" * 8), "needs 12"),
    "overlap": (_raw({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, b"\0" * 12), "overlaps"),
    "hole": (_raw({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}, b"\0" * 20), "hole"),
    "truncated data": (_raw(_GOOD, b"\0" * 5), "truncated"),
    "trailing bytes": (_raw(_GOOD, b"\0" * 12), "after the last tensor"),
    "bad metadata": (_raw({"__metadata__": {"format": 1}, "w": _entry()}, b"\0" * 8), "__metadata__"),
    "negative shape": (_raw({"w": _entry(shape=(-2,))}, b"\0" * 8), "shape"),
    "bad offsets": (_raw({"w": _entry(offsets=(8, 0))}, b"\0" * 8), "data_offsets"),
    "extra field": (_raw({"w": {**_entry(), "x": 1}}, b"\0" * 8), "exactly dtype"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_safetensors_raise_one_line_input_error(tmp_path, case):
    data, match = BAD_FILES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(InputError, match=match) as e:
        read_safetensors(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_bytes_never_crash_the_reader(tmp_path, data):
    """Any byte mutation of a valid file is either still a consistent file or an InputError, never another error."""
    sd = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2, dtype=torch.bfloat16)}
    path = tmp_path / "m.safetensors"
    save_file(sd, path, metadata={"format": "pt"})
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    path.write_bytes(bytes(raw[:cut]))
    try:
        _, tensors = read_safetensors(path)
    except InputError:
        return
    for t in tensors.values():  # accepted: every span is inside the file and loads
        assert t.span[1] <= cut and t.load().numel() == t.meta.numel


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, d / "s1.safetensors")
    save_file({"b": torch.ones(3)}, d / "s2.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    return d


def test_sharded_index_reads(tmp_path):
    ck = open_checkpoint(_sharded(tmp_path))
    assert sorted(ck.tensors) == ["a", "b"] and [p.name for p in ck.files] == ["s1.safetensors", "s2.safetensors"]


def _edit_index(d: Path, weight_map: dict) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("case, match", [
    ("missing shard", "shard 's3.safetensors' is missing"),
    ("tensor in two shards", "stored in both"),
    ("tensor not in index", "not listed"),
    ("listed but absent", "does not hold it"),
    ("traversal", "outside the checkpoint"),
    ("absolute", "outside the checkpoint"),
    ("escaping symlink", "resolves outside"),
    ("wrong shard", "listed in s1.safetensors but stored in s2.safetensors"),
])
def test_bad_index(tmp_path, case, match):
    d = _sharded(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"b": torch.ones(3)}, outside)
    if case == "missing shard":
        _edit_index(d, {"a": "s1.safetensors", "b": "s3.safetensors"})
    elif case == "tensor in two shards":
        save_file({"a": torch.zeros(2), "b": torch.ones(3)}, d / "s2.safetensors")
    elif case == "tensor not in index":
        save_file({"b": torch.ones(3), "c": torch.ones(1)}, d / "s2.safetensors")
    elif case == "listed but absent":
        _edit_index(d, {"a": "s1.safetensors", "b": "s2.safetensors", "z": "s2.safetensors"})
    elif case == "traversal":
        _edit_index(d, {"a": "s1.safetensors", "b": "../elsewhere.safetensors"})
    elif case == "absolute":
        _edit_index(d, {"a": "s1.safetensors", "b": str(outside)})
    elif case == "escaping symlink":
        (d / "s2.safetensors").unlink()
        (d / "s2.safetensors").symlink_to(outside)
    elif case == "wrong shard":
        _edit_index(d, {"a": "s2.safetensors", "b": "s1.safetensors"})
    with pytest.raises(InputError, match=match) as e:
        open_checkpoint(d)
    assert "\n" not in str(e.value)


def test_directory_without_weights_or_with_ambiguous_files(tmp_path):
    with pytest.raises(InputError, match="no weight files"):
        open_checkpoint(tmp_path)
    save_file({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(1)}, tmp_path / "y.safetensors")
    with pytest.raises(InputError, match="2 weight files and no index"):
        open_checkpoint(tmp_path)


def test_bin_reader_is_weights_only(tmp_path):
    sd = {"a": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ck = open_checkpoint(tmp_path)
    assert ck.format == "bin" and all(torch.equal(ck.tensors[k].load(), v) for k, v in sd.items())

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save(Evil(), tmp_path / "pytorch_model.bin")  # zip format whose pickle calls os.system on load
    with pytest.raises(InputError, match="weights-only"):
        open_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_dtype_table_matches_torch_itemsizes():
    for d in DTYPES.values():
        assert torch.empty((), dtype=d.torch).element_size() == d.itemsize
