"""The streaming writer against safetensors' own writer (the oracle): byte-identical files and per-tensor SHA-256,
for raw copies and casts, with direct I/O and without, with staging buffers small enough that tensors straddle
buffer and block boundaries at every alignment (including an element split across two buffers)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from pgconv.converter import out_file, write_path, writer
from pgconv.converter.dtypes import code_of
from pgconv.converter.plan import Step
from pgconv.converter.safetensors_io import read_safetensors
from pgconv.converter.sources import TensorMeta

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64]
FLOATS = ("F32", "BF16", "F16")


def _tensor(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(numel, generator=g) * 300).to(dtype)  # * 300: float16 casts of float32 stay finite
    return torch.randint(0, 100, (numel,), generator=g).to(dtype)


def _write(tmp: Path, tensors: dict[str, torch.Tensor], cast: str | None) -> tuple[Path, list, dict]:
    """Source file by safetensors; our output (cast to `cast` where a float) and the expected tensors."""
    src_file = tmp / "src.safetensors"
    save_file(tensors, src_file)
    _, sources = read_safetensors(src_file)
    steps, expected = [], {}
    for name, t in tensors.items():
        code = code_of(t.dtype)
        target = cast if cast and code in FLOATS else code
        steps.append(Step(TensorMeta(name, tuple(t.shape), target), (name,)))
        expected[name] = t.to(getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[target])) \
            if target != code else t
    out = tmp / "out.safetensors"
    records = writer.write_shard(out, steps, sources, lambda n: None)
    return out, records, expected


@pytest.fixture(params=["direct", "buffered", "no-o-direct", "measured"])
def io_mode(request, monkeypatch, tmp_path_factory):
    """Each write path: forced O_DIRECT, forced buffered + early writeback, a filesystem without O_DIRECT, and the
    plan a (fake-timed) probe picks, here buffered with a 3-block stage and 2 workers."""
    if request.param == "no-o-direct":
        monkeypatch.setattr(out_file, "USE_DIRECT_IO", False)
    elif request.param == "measured":
        monkeypatch.setenv("PGCONV_WRITER", "auto")
        monkeypatch.setenv("PGCONV_CACHE", str(tmp_path_factory.mktemp("cache")))
        monkeypatch.setattr(write_path, "CONFIGS", [write_path.Plan("direct", 2 * out_file.BLOCK, 3),
                                                    write_path.Plan("buffered", 3 * out_file.BLOCK, 3)])
        monkeypatch.setattr(write_path, "_time_write", lambda d, plan, **k: 1.0 if plan.mode == "buffered" else 3.0)
        write_path.reset()
    else:
        monkeypatch.setenv("PGCONV_WRITER", request.param)
    yield request.param
    write_path.reset()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.tuples(st.integers(0, 9000), st.sampled_from(range(len(DTYPES)))), min_size=1, max_size=6),
       cast=st.sampled_from([None, "F32", "BF16", "F16"]), stage_blocks=st.integers(1, 3), seed=st.integers(0, 99))
def test_output_equals_safetensors_writer(tmp_path_factory, io_mode, monkeypatch, sizes, cast, stage_blocks, seed):
    # A stage of 1-3 blocks: most tensors span several buffers; odd element counts put boundaries mid-element.
    monkeypatch.setattr(writer, "_STAGE_BYTES", stage_blocks * out_file.BLOCK)
    tmp = tmp_path_factory.mktemp("w")
    tensors = {f"t{i}": _tensor(n, DTYPES[d], seed + i) for i, (n, d) in enumerate(sizes)}
    out, records, expected = _write(tmp, tensors, cast)
    save_file(expected, tmp / "oracle.safetensors", metadata={"format": "pt"})
    assert out.read_bytes() == (tmp / "oracle.safetensors").read_bytes()
    for rec in records:
        t = expected[rec.target.name]
        assert rec.sha256 == hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        assert rec.copied == (rec.sources[0].dtype == rec.target.dtype)


def test_lossy_cast_reports_max_delta_and_overflow(tmp_path, io_mode):
    t = torch.tensor([1.0, 1e-3 + 1e-7, 70000.0, -1e6, float("inf")], dtype=torch.float32)
    _, records, _ = _write(tmp_path, {"w": t}, "F16")
    (rec,) = records
    assert rec.fp16_overflow == 2  # 70000 and -1e6; the source inf is not an overflow
    expected = (t[:2].to(torch.float16).to(torch.float32) - t[:2]).abs().max().item()
    assert rec.max_abs_diff == pytest.approx(expected, rel=0, abs=0)


def test_direct_io_falls_back_when_the_device_refuses(tmp_path, monkeypatch):
    """A direct write refused with EINVAL (stricter alignment than 4096 B) is redone buffered; the file is right."""
    import errno
    import os

    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fd not in refused and os.O_DIRECT & _flags(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(writer, "_STAGE_BYTES", 2 * out_file.BLOCK)
    monkeypatch.setattr(os, "pwrite", pwrite)
    tensors = {"a": _tensor(10000, torch.float32, 1), "b": _tensor(3001, torch.bfloat16, 2)}
    out, _, expected = _write(tmp_path, tensors, None)
    monkeypatch.undo()
    save_file(expected, tmp_path / "oracle.safetensors", metadata={"format": "pt"})
    assert out.read_bytes() == (tmp_path / "oracle.safetensors").read_bytes()
    assert refused, "no direct write was attempted (O_DIRECT unsupported here?)"


def _flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_a_failing_job_stops_the_others_and_raises(tmp_path, monkeypatch):
    calls = []
    real = writer._write_span

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_span", failing)
    with pytest.raises(OSError, match="No space"):
        _write(tmp_path, {f"t{i}": _tensor(5000, torch.float32, i) for i in range(60)}, None)
    assert len(calls) < 60  # the queued jobs were cancelled


def test_streamed_sources_are_never_loaded_whole(tmp_path, io_mode, monkeypatch):
    """A source without a byte span (e.g. big_vision's padded embedding) is cast from its chunks(), never load()ed:
    the 1 GB embedding must not be materialised."""
    import dataclasses

    from pgconv.converter.sources import SourceTensor

    t = _tensor(50_000, torch.bfloat16, 3)

    @dataclasses.dataclass(frozen=True, eq=False)
    class Streamed(SourceTensor):
        def chunks(self, max_bytes: int = 0):
            yield from t.split(7001)  # uneven pieces

        def load(self):
            raise AssertionError("loaded whole")

    monkeypatch.setattr(writer, "_STAGE_BYTES", 4 * out_file.BLOCK)
    src = Streamed(TensorMeta("e", (50_000,), "BF16"), tmp_path / "none")
    records = writer.write_shard(tmp_path / "o.safetensors", [Step(TensorMeta("e", (50_000,), "F32"), ("e",))],
                                 {"e": src}, lambda n: None)
    save_file({"e": t.float()}, tmp_path / "oracle.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "o.safetensors").read_bytes() == (tmp_path / "oracle.safetensors").read_bytes()
    assert records[0].sha256 == hashlib.sha256(t.float().numpy().tobytes()).hexdigest()


def test_tensors_held_whole_are_made_one_at_a_time(tmp_path, monkeypatch):
    """Sources that can only be loaded whole (loaders: transposed big_vision members, .bin tensors) never overlap,
    so peak memory is one whole tensor plus the streaming buffers whatever the number of workers."""
    import threading
    import time

    from pgconv.converter.sources import SourceTensor

    live, peak, lock = [0], [0], threading.Lock()

    def loader(t):
        def load():
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            time.sleep(0.02)
            return t

        return load

    tensors = {f"t{i}": _tensor(3000 + i, torch.float32, i) for i in range(12)}
    sources = {n: SourceTensor(TensorMeta(n, tuple(t.shape), "F32"), tmp_path / "none", loader=loader(t))
               for n, t in tensors.items()}
    real_close = writer._Values.close

    def close(self):  # the whole tensor is released when its job's producer closes
        real_close(self)
        with lock:
            live[0] -= 1

    monkeypatch.setattr(writer._Values, "close", close)
    steps = [Step(TensorMeta(n, tuple(t.shape), "BF16"), (n,)) for n, t in tensors.items()]
    writer.write_shard(tmp_path / "o.safetensors", steps, sources, lambda n: None)
    save_file({n: t.bfloat16() for n, t in tensors.items()}, tmp_path / "oracle.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "o.safetensors").read_bytes() == (tmp_path / "oracle.safetensors").read_bytes()
    assert peak[0] == 1


def test_every_mode_fsyncs_each_file_and_writes_blocks_through_its_path(tmp_path, io_mode, monkeypatch):
    """Durable in every mode (fsync before write_shard returns); buffered block writes start writeback at once."""
    import os

    synced, kicked = [], []
    real_fsync, real_kick = os.fsync, write_path.kick_writeback
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(write_path, "kick_writeback", lambda fd, o, n: kicked.append(n) or real_kick(fd, o, n))
    monkeypatch.setattr(writer, "_STAGE_BYTES", 2 * out_file.BLOCK)
    out, _, expected = _write(tmp_path, {"a": _tensor(20000, torch.float32, 1)}, None)
    assert os.path.realpath(out) in synced
    assert bool(kicked) == (io_mode != "direct")
    save_file(expected, tmp_path / "oracle.safetensors", metadata={"format": "pt"})
    assert out.read_bytes() == (tmp_path / "oracle.safetensors").read_bytes()


def _direct_supported(tmp_path: Path) -> bool:
    import os

    probe = tmp_path / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=8), stage_blocks=st.integers(1, 3),
       seed=st.integers(0, 99))
def test_a_direct_file_is_preallocated_and_written_in_whole_direct_blocks(tmp_path_factory, monkeypatch, sizes,
                                                                          stage_blocks, seed):
    """Partial blocks (tensor boundaries, the header) are gathered and written as whole direct blocks; the only
    buffered write is the file's short last block; the file is allocated to its final size before any data."""
    import os

    tmp = tmp_path_factory.mktemp("g")
    if not _direct_supported(tmp):
        pytest.skip("no O_DIRECT on this filesystem")
    monkeypatch.setenv("PGCONV_WRITER", "direct")
    monkeypatch.setattr(writer, "_STAGE_BYTES", stage_blocks * out_file.BLOCK)
    buffered, allocated = [], []
    real_pwrite, real_alloc = os.pwrite, write_path.preallocate

    def pwrite(fd, data, offset):
        if not os.O_DIRECT & _flags(fd):
            buffered.append((offset, len(data)))
        return real_pwrite(fd, data, offset)

    def preallocate(fd, size):
        allocated.append(size)
        assert os.fstat(fd).st_size == 0  # before the header and every tensor
        return real_alloc(fd, size)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(write_path, "preallocate", preallocate)
    tensors = {f"t{i}": _tensor(n, torch.bfloat16, seed + i) for i, n in enumerate(sizes)}
    out, _, expected = _write(tmp, tensors, None)
    monkeypatch.undo()
    save_file(expected, tmp / "oracle.safetensors", metadata={"format": "pt"})
    oracle = (tmp / "oracle.safetensors").read_bytes()
    assert out.read_bytes() == oracle
    assert allocated == [len(oracle)]
    size = len(oracle)
    tail = size % out_file.BLOCK
    assert buffered == ([(size - tail, tail)] if tail else [])


def test_preallocation_reports_a_full_disk_and_ignores_a_filesystem_that_cannot(tmp_path, monkeypatch):
    import ctypes
    import errno
    import os

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        if write_path._fallocate is not None and write_path.preallocate(fd, 3 * out_file.BLOCK):
            assert os.fstat(fd).st_size == 3 * out_file.BLOCK
        for err, raises in ((errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EOPNOTSUPP, False)):
            def failing(*a, err=err):
                ctypes.set_errno(err)
                return -1
            monkeypatch.setattr(write_path, "_fallocate", failing)
            if raises:
                with pytest.raises(OSError) as e:
                    write_path.preallocate(fd, 1 << 20)
                assert e.value.errno == err
            else:
                assert write_path.preallocate(fd, 1 << 20) is False
    finally:
        os.close(fd)


def test_a_disk_that_fills_at_preallocation_fails_the_conversion_in_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC from fallocate: `pgconv convert` fails with exit code 2 and a one-line error; no output is left."""
    import ctypes
    import errno

    from pgconv.converter.fixture import make_fixture
    from reliability_helpers import assert_one_line_error, run_cli

    src = make_fixture(tmp_path / "src", "tiny")
    if not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    monkeypatch.setenv("PGCONV_WRITER", "direct")

    def full(*a):
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(write_path, "_fallocate", full)
    res = run_cli(["convert", src, tmp_path / "dst", "--to", "native", "--quiet"], capsys)
    assert_one_line_error(res, "dst", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_incomplete_gathered_block_is_an_error_not_a_silent_hole(tmp_path):
    if not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    out = out_file.OutFile(tmp_path / "f", "direct", 2 * out_file.BLOCK)
    out.write_bytes(memoryview(b"x" * 100), 10)
    with pytest.raises(RuntimeError, match="never completed"):
        out.close(sync=True)


def test_preallocation_failing_closes_the_file_it_opened(tmp_path, monkeypatch):
    import ctypes
    import errno
    import os

    if not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")

    def full(*a):
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(write_path, "_fallocate", full)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(3):
        with pytest.raises(OSError):
            out_file.OutFile(tmp_path / f"f{i}", "direct", 1 << 20)
    assert len(os.listdir("/proc/self/fd")) == before


def test_many_boundary_blocks_and_a_header_of_several_blocks(tmp_path, monkeypatch):
    """More gathered blocks than one pool chunk holds, and a multi-block header (adjacent blocks: one write)."""
    monkeypatch.setenv("PGCONV_WRITER", "direct")
    monkeypatch.setattr(writer, "_STAGE_BYTES", 2 * out_file.BLOCK)
    tensors = {f"a.much.longer.tensor.name.to.grow.the.header.{i:04d}": _tensor(3 + 7 * i, torch.bfloat16, i)
               for i in range(3 * out_file._POOL_BLOCKS)}
    out, _, expected = _write(tmp_path, tensors, None)
    save_file(expected, tmp_path / "oracle.safetensors", metadata={"format": "pt"})
    oracle = (tmp_path / "oracle.safetensors").read_bytes()
    assert int.from_bytes(oracle[:8], "little") > 3 * out_file.BLOCK
    assert out.read_bytes() == oracle
