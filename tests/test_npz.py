"""`.npz` reader and writer: against numpy's own `np.savez`/`np.load`, byte for byte, and on broken files."""

from __future__ import annotations

import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgconv.converter.npz import BFLOAT16, NpzReader, NpzWriter, from_torch, iter_rows, to_torch
from pgconv.errors import InputError

DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BFLOAT16]


def random_array(shape, dtype, seed=0) -> np.ndarray:
    # Arbitrary bit patterns (NaN payloads, -0, subnormals): reads and writes must keep every bit.
    bits = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return bits.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compressed", [False, True])
def test_reads_numpy_savez_bit_exactly(tmp_path, dtype, compressed):
    a, b = random_array((3, 4, 5), dtype, 1), random_array((7,), dtype, 2)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "x.npz", **{"params/a": a, "b": b})
    with NpzReader(tmp_path / "x.npz") as r:
        assert set(r.members) == {"params/a", "b"}
        m = r.member("params/a")
        assert m.shape == (3, 4, 5) and m.dtype == dtype and m.compressed == compressed
        assert r.read("params/a").tobytes() == a.tobytes()
        for k in range(3):
            assert r.read("params/a", k).tobytes() == a[k].tobytes()
        assert r.read("b").dtype == dtype


def test_stored_members_are_mapped_at_their_zip_offset(tmp_path):
    a = random_array((64, 32), np.dtype(np.float32))
    np.savez(tmp_path / "x.npz", a=a)
    with NpzReader(tmp_path / "x.npz") as r:
        m = r.member("a")
        raw = (tmp_path / "x.npz").read_bytes()
        assert raw[m.data_offset:m.data_offset + m.nbytes] == a.tobytes()
        view = r.read("a", 5)
        assert not view.flags.owndata and view.nbytes == 32 * 4  # a view of a map of this row, not a copy
        assert view.tobytes() == a[5].tobytes()


def test_bfloat16_void_becomes_torch_bfloat16(tmp_path):
    t = torch.randn(4, 6).to(torch.bfloat16)
    np.savez(tmp_path / "x.npz", w=from_torch(t))
    assert np.load(tmp_path / "x.npz")["w"].dtype == np.dtype("V2")  # what big_vision files hold
    with NpzReader(tmp_path / "x.npz") as r:
        back = to_torch(r.read("w"))
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), t.view(torch.int16))


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=4),
       dtype=st.sampled_from(DTYPES), chunk=st.integers(1, 64))
def test_writer_round_trips_and_numpy_reads_it(tmp_path_factory, shapes, dtype, chunk):
    path = tmp_path_factory.mktemp("w") / "x.npz"
    arrays = {f"params/t{i}": random_array(tuple(s), dtype, i) for i, s in enumerate(shapes)}
    with NpzWriter(path, comment=b'{"pgconv.format": "x"}') as w:
        for name, a in arrays.items():
            w.add(name, a.shape, a.dtype, iter_rows(a, chunk))
    with np.load(path) as z:
        for name, a in arrays.items():
            got = z[name]
            assert got.shape == a.shape and got.tobytes() == a.tobytes()
            assert got.dtype == (np.dtype("V2") if dtype == BFLOAT16 else dtype)
    with NpzReader(path) as r:
        assert r.comment == b'{"pgconv.format": "x"}'
        for name, a in arrays.items():
            assert r.read(name).tobytes() == a.tobytes()


def test_writer_is_deterministic_and_streams_chunks(tmp_path):
    a = random_array((10, 3), BFLOAT16)
    for name in ("one.npz", "two.npz"):
        with NpzWriter(tmp_path / name) as w:
            w.add("a", a.shape, a.dtype, iter_rows(a, 7))
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    info = zipfile.ZipFile(tmp_path / "one.npz").infolist()[0]
    assert info.compress_type == zipfile.ZIP_STORED and info.date_time == (1980, 1, 1, 0, 0, 0)
    with NpzWriter(tmp_path / "bad.npz") as w, pytest.raises(ValueError, match="wrote 12 bytes"):
        w.add("a", (10, 3), BFLOAT16, [a[:2]])


def test_not_a_zip(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"\x93NUMPY not a zip at all")
    with pytest.raises(InputError, match=r"x.npz: not a zip archive"):
        NpzReader(tmp_path / "x.npz")


def test_truncated(tmp_path):
    np.savez(tmp_path / "x.npz", a=random_array((100,), np.dtype(np.float32)))
    raw = (tmp_path / "x.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"cut.npz: truncated"):
        NpzReader(tmp_path / "cut.npz")


def test_member_data_past_the_end(tmp_path):
    np.savez(tmp_path / "x.npz", a=random_array((100,), np.dtype(np.float32)))
    with zipfile.ZipFile(tmp_path / "x.npz") as z:
        offset = z.infolist()[0].header_offset
    raw = bytearray((tmp_path / "x.npz").read_bytes())
    # Claim a bigger array in the .npy header (same header length): the data would run past the member.
    raw[offset:] = raw[offset:].replace(b"(100,)", b"(900,)", 1)
    (tmp_path / "y.npz").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"member 'a': (truncated|the zip entry holds 400 data bytes)"):
        NpzReader(tmp_path / "y.npz")


@pytest.mark.parametrize("array,message", [
    (np.arange(4, dtype=np.int64), r"member 'w' has dtype <i8; expected float32, float16 or bfloat16"),
    (np.zeros(4, dtype="V4"), r"member 'w' has void dtype \|V4 \(itemsize 4\); only 2-byte void \(bfloat16\)"),
    (np.zeros(4, dtype=">f4"), r"member 'w' has dtype >f4"),
])
def test_wrong_dtypes_name_file_and_member(tmp_path, array, message):
    np.savez(tmp_path / "x.npz", w=array, ok=np.zeros(2, np.float32))
    with NpzReader(tmp_path / "x.npz") as r:  # indexing works; using the member fails
        assert r.read("ok").shape == (2,)
        with pytest.raises(InputError, match=r"x.npz: " + message):
            r.read("w")


def test_non_npy_member(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.npz", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(InputError, match=r"member 'readme.txt' is not an .npy array"):
        NpzReader(tmp_path / "x.npz")


def test_fortran_order_members_read_correctly(tmp_path):
    a = random_array((4, 6), np.dtype(np.float32))
    np.savez(tmp_path / "x.npz", t=a.T)  # a transposed array is saved in Fortran order
    with NpzReader(tmp_path / "x.npz") as r:
        assert r.member("t").fortran_order
        assert r.read("t").tobytes() == a.T.tobytes() and r.read("t", 2).tobytes() == a.T[2].tobytes()


def test_index_out_of_range(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros((2, 3), np.float32))
    with NpzReader(tmp_path / "x.npz") as r, pytest.raises(InputError, match="has no index 2"):
        r.read("a", 2)
