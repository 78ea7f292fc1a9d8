"""pgconv's own one-row kernel (model/cpu_gemv.py, csrc/gemv.c): the numerics against float64 (no flush of
denormals, NaN/inf kept, one rounding), threads, the per-machine build cache, and its absence without a compiler."""

from __future__ import annotations

import errno
import os
import platform
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from pgconv import tuning
from pgconv.model import cpu_gemv, cpu_kernels

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache dir and a fresh build decision (restored afterwards for the rest of the suite)."""
    monkeypatch.setenv("PGCONV_CACHE", str(tmp_path))
    cpu_gemv._reset()
    yield tmp_path
    cpu_gemv._reset()


@needs_cc
def test_it_builds_once_per_machine_and_is_a_decode_candidate(fresh, monkeypatch):
    assert cpu_gemv.available(), cpu_gemv.unavailable_reason()
    (lib,) = (fresh / "kernels").glob("gemv-*.so")
    stamp = lib.stat().st_mtime_ns
    cpu_gemv._reset()
    assert cpu_gemv.available() and lib.stat().st_mtime_ns == stamp  # the second process loads, no rebuild
    assert "gemv" in cpu_kernels.candidates(torch.bfloat16, 1) and "gemv" in cpu_kernels.candidates(torch.float32, 1)
    assert "gemv" not in cpu_kernels.candidates(torch.bfloat16, 8)  # prefill: never
    assert "gemv" not in cpu_kernels.candidates(torch.float16, 1)
    # another CPU (same model string, another family) gets its own build: -march=native code never crosses CPUs
    monkeypatch.setattr(tuning, "cpu_label", lambda: "AMD EPYC (family 99 model 1 stepping 0)")
    assert cpu_gemv.library_path(shutil.which("cc") or "gcc") != lib
    if "avx512_bf16" in tuning.cpu_isa():
        assert cpu_gemv.isa() == "avx512_bf16"  # the vector path, not the portable loop
    elif "avx512f" in tuning.cpu_isa():
        assert cpu_gemv.isa() == "avx512f"


def test_without_a_compiler_or_when_turned_off_the_model_runs_on_torchs_kernels(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not cpu_gemv.available() and "no-such-cc" in cpu_gemv.unavailable_reason()
    assert "gemv" not in cpu_kernels.candidates(torch.bfloat16, 1)
    x, w = torch.randn(1, 64).bfloat16(), torch.randn(48, 64).bfloat16()
    with pytest.raises(NotImplementedError):
        cpu_gemv.gemv(x, w, None)
    cpu_kernels.reset()
    monkeypatch.setenv("PGCONV_KERNELS", "gemv")  # forced but absent: torch's kernel, same result
    assert torch.equal(cpu_kernels.linear(x, w), F.linear(x, w))
    cpu_kernels.reset()
    monkeypatch.delenv("CC")
    monkeypatch.undo()
    monkeypatch.setenv("PGCONV_CACHE", str(fresh))
    monkeypatch.setenv("PGCONV_GEMV", "0")
    cpu_gemv._reset()
    assert not cpu_gemv.available() and cpu_gemv.unavailable_reason() == "PGCONV_GEMV=0"


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_denormals_nan_and_inf_are_kept_and_the_bias_is_rounded_with_the_sum(dtype):
    assert cpu_gemv.available(), cpu_gemv.unavailable_reason()
    k = 64
    x = torch.zeros(1, k, dtype=dtype)
    w = torch.zeros(6, k, dtype=dtype)
    x[0, 0], w[0, 0] = 2.0 ** -30, 2.0 ** -100  # 2^-130: a denormal in bf16 and fp32 (a flushing kernel gives 0)
    w[1, 0] = float("nan")
    w[2, 0] = float("inf")
    # row 3: 1 + 2^-8, a tie halfway between the bf16 values 1 and 1 + 2^-7, plus the bias 2^-9: rounded once
    # that is 1 + 2^-7; rounding the sum first (tie to even: 1) and then adding the bias gives 1 again
    x[0, 1], w[3, 1], x[0, 2], w[3, 2] = 1.0, 1.0, 1.0, 2.0 ** -8
    b = torch.zeros(6, dtype=dtype)
    b[3] = 2.0 ** -9
    w[4, :] = 1.0
    x[0, 3:] = 0.5  # row 4: a plain sum, 0.5 * 61 + tiny
    got = cpu_gemv.gemv(x, w, b)
    exact = F.linear(x.double(), w.double(), b.double()).to(dtype)
    if dtype == torch.bfloat16 and cpu_gemv.isa() == "avx512_bf16":
        # vdpbf16ps flushes denormals, as oneDNN's bf16 kernels (torch's default bf16 product here) do
        assert got[0, 0].item() == 0.0
        if cpu_kernels._ONEDNN_LINEAR is not None:
            assert cpu_kernels.KERNELS["onednn"](x, w, b)[0, 0].item() == 0.0
    else:
        assert got[0, 0].item() == 2.0 ** -130
    assert torch.isnan(got[0, 1]) and got[0, 2].item() == float("inf")
    assert torch.equal(got[0, 3:], exact[0, 3:])
    assert got[0, 3].item() == 1.0 + 2.0 ** (-7 if dtype == torch.bfloat16 else -8) + (0 if dtype == torch.bfloat16
                                                                                         else 2.0 ** -9)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_threads_split_rows_without_changing_a_bit_and_concurrent_callers_are_safe(dtype):
    assert cpu_gemv.available(), cpu_gemv.unavailable_reason()
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 512, generator=g), torch.randn(1030, 512, generator=g), torch.randn(1030, generator=g)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(cpu_gemv.gemv(x, w, b))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # each row summed in the same order
    results: list[torch.Tensor] = []

    def call():
        for _ in range(20):
            results.append(cpu_gemv.gemv(x, w, b))

    workers = [threading.Thread(target=call) for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(results) == 60 and all(torch.equal(r, outs[0]) for r in results)


@needs_cc
def test_what_it_does_not_take_is_refused_for_torchs_kernel_to_run():
    assert cpu_gemv.available(), cpu_gemv.unavailable_reason()
    x, w = torch.randn(1, 64), torch.randn(48, 64)
    for args in ((torch.randn(2, 64), w, None),  # two rows: prefill
                 (x, torch.randn(64, 48).t(), None),  # a transposed (strided) weight
                 (x.bfloat16(), w, None),  # mixed dtypes
                 (x.half(), w.half(), None),
                 (x, w, torch.randn(47))):
        with pytest.raises(NotImplementedError):
            cpu_gemv.gemv(*args)
    wg = w.clone().requires_grad_()
    with pytest.raises(NotImplementedError):
        cpu_gemv.gemv(x, wg, None)
    # a strided row of x (a slice of a wider tensor) is fine: it is copied
    wide = torch.randn(1, 128)
    assert torch.allclose(cpu_gemv.gemv(wide[:, ::2], w, None), F.linear(wide[:, ::2], w), rtol=1e-5, atol=1e-5)


@needs_cc
@pytest.mark.parametrize("refusal", [errno.EACCES, errno.EROFS])
def test_a_read_only_cache_dir_builds_into_a_private_temp_dir(fresh, monkeypatch, tmp_path_factory, refusal):
    tmp = tmp_path_factory.mktemp("systmp")
    real = cpu_gemv.build

    def build(cc, out, flags=cpu_gemv.FLAGS):  # the cache dir refuses writes (simulated: root ignores chmod)
        if fresh in out.parents:
            raise OSError(refusal, os.strerror(refusal), str(out.parent))
        return real(cc, out, flags)
    monkeypatch.setattr(cpu_gemv, "build", build)
    monkeypatch.setattr(cpu_gemv.tempfile, "gettempdir", lambda: str(tmp))
    assert cpu_gemv.available(), cpu_gemv.unavailable_reason()
    (lib,) = tmp.glob("pgconv-kernels-*/gemv-*.so")
    assert lib.parent.stat().st_mode & 0o077 == 0 and not (fresh / "kernels").exists()  # private, not shared


@needs_cc
def test_a_damaged_build_is_built_again(fresh):
    assert cpu_gemv.available()
    (lib,) = (fresh / "kernels").glob("gemv-*.so")
    junk = lib.with_suffix(".junk")
    junk.write_bytes(b"not a shared object")
    os.replace(junk, lib)  # a new file (overwriting the loaded one in place would fault this very process)
    # A new process (this one would get its loaded copy back from dlopen, by name):
    code = "from pgconv.model import cpu_gemv; print(cpu_gemv.available(), cpu_gemv.unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PGCONV_CACHE": str(fresh)})
    assert out.stdout.split() == ["True", "None"], out.stderr[-2000:]
    assert lib.read_bytes()[:4] == b"\x7fELF"


def test_the_compiler_may_carry_arguments(monkeypatch):
    monkeypatch.setenv("CC", "ccache gcc -w")
    assert cpu_gemv._compiler() == ["ccache", "gcc", "-w"]
    monkeypatch.delenv("CC")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/cc" if name == "cc" else None)
    assert cpu_gemv._compiler() == ["/usr/bin/cc"]


@needs_cc
def test_tensors_whose_memory_is_not_their_values_are_refused():
    assert cpu_gemv.available()
    x, w = torch.randn(1, 64), torch.randn(48, 64)
    for args in ((torch._efficientzerotensor((1, 64)), w, None),  # no memory at all
                 (x, torch._efficientzerotensor((48, 64)), None),
                 (torch._neg_view(x), w, None),  # the sign is applied on read: raw memory has the other one
                 (x, torch._neg_view(w), None),
                 (x, w, torch._neg_view(torch.randn(48)))):
        with pytest.raises(NotImplementedError):
            cpu_gemv.gemv(*args)
        assert torch.allclose(cpu_kernels.linear(*args), F.linear(*args))  # the caller's fallback is right
    assert cpu_gemv.flusher(torch._efficientzerotensor((64,))) is None
    tiny = torch.randn(2)  # 8 bytes: the probe must not touch more than the tensor's own
    flush = cpu_gemv.flusher(tiny)
    if flush is not None:
        del tiny
        assert flush() == 0  # the function holds its tensor: flushing after the caller let go is safe


LONG = [(9, 4097), (130, 4127), (3, 16416), (1, 16384), (130, 4096), (7, 31), (4, 32), (2, 1)]


def _check(run, dtype, n, k, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed + n + k)
    x, w = torch.randn(1, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = run(x, w, b)
    magnitude = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - (7 if dtype == torch.bfloat16 else 23))
    bad = (got.double() - exact).abs() > 0.5 * spacing + (k + 1) * 2.0 ** -24 * magnitude
    assert not bad.any(), f"{dtype} n={n} k={k} bias={with_bias}: rows {bad.nonzero()[:5, 1].tolist()} wrong"


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threads", [1, 3])
def test_long_rows_row_and_column_tails_against_float64(dtype, threads):
    """The four-row block of long rows (k >= 4096) with its masked tail and bias, the one-row path, n below the
    thread count: every row within the fp32 summation bound of float64."""
    assert cpu_gemv.available()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for n, k in LONG:
            for with_bias in (False, True):
                _check(cpu_gemv.gemv, dtype, n, k, with_bias)
    finally:
        torch.set_num_threads(old)


@needs_cc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 code paths")
@pytest.mark.parametrize(("flags", "isa"), [(["-mno-avx512bf16"], "avx512f"), (["-march=x86-64-v3"], "portable")])
def test_the_other_code_paths_are_right_too(tmp_path, flags, isa):
    """This machine runs its best path; the builds a CPU without AVX512-BF16 (exact widening + FMA) or without
    AVX-512 (portable loops) would run are built here and checked the same way."""
    if "avx512f" not in tuning.cpu_isa() and isa == "avx512f":
        pytest.skip("this CPU cannot run AVX-512 code")
    cc = cpu_gemv._compiler()
    base = [f for f in cpu_gemv.FLAGS if not (isa == "portable" and f == "-march=native")]
    out = tmp_path / "gemv.so"
    cpu_gemv.build(cc, out, [*base, *flags])
    lib = cpu_gemv.open_library(out)
    assert cpu_gemv.ISA[lib.pgconv_gemv_isa()] == isa

    def run(x, w, b):
        y = torch.empty(1, w.shape[0], dtype=x.dtype)
        bp = None if b is None else b.data_ptr()
        if x.dtype == torch.bfloat16:
            scratch = torch.empty(max(w.shape[1], 1))
            lib.pgconv_gemv_bf16(x.data_ptr(), w.data_ptr(), bp, y.data_ptr(), w.shape[0], w.shape[1], 2,
                                 scratch.data_ptr())
        else:
            lib.pgconv_gemv_f32(x.data_ptr(), w.data_ptr(), bp, y.data_ptr(), w.shape[0], w.shape[1], 2)
        return y
    for dtype in (torch.bfloat16, torch.float32):
        for n, k in [*LONG, (1030, 512)]:
            for with_bias in (False, True):
                _check(run, dtype, n, k, with_bias)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    w = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, 0], w[0, 0] = 2.0 ** -30, 2.0 ** -100
    assert run(x, w, None)[0, 0].item() == 2.0 ** -130  # widened exactly: no flush of denormals


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, every NaN as one pattern (torch's own NaN bits differ between its vector and scalar paths)."""
    return torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t).view(torch.int16)


@needs_cc
def test_gelu_is_torchs_bit_for_bit_on_every_bf16_value():
    """All 65536 bf16 inputs, in one odd-sized tensor (a vector tail, several tasks, both threads)."""
    import numpy as np

    x = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
    x = torch.cat([x, x[:1001]])  # 66537 elements
    assert torch.equal(_bits(cpu_gemv.gelu_tanh(x)), _bits(torch.cat([F.gelu(c, approximate="tanh")
                                                                      for c in x.split(4096)])))


@needs_cc
@pytest.mark.parametrize("shape", [(1, 16384), (262, 16384), (3, 4099), (7,)])
def test_geglu_is_torchs_bit_for_bit_and_threads_change_nothing(shape):
    """`gelu(gate) * up` in one pass: the same bits as torch's two ops (wide values, so the tails for x << 0,
    where ATen's 1 + tanh(u) cancels, are covered too), on 1 and 2 threads."""
    g = torch.Generator().manual_seed(len(shape))
    gate, up = (torch.randn(shape, generator=g) * 6).bfloat16(), torch.randn(shape, generator=g).bfloat16()
    want = F.gelu(gate, approximate="tanh") * up
    got = cpu_gemv.gelu_tanh(gate, up)
    assert got.dtype == torch.bfloat16 and got.shape == gate.shape
    assert torch.equal(_bits(got), _bits(want))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_bits(cpu_gemv.gelu_tanh(gate, up)), _bits(got))
    finally:
        torch.set_num_threads(before)


@needs_cc
def test_gelu_edge_values_are_torchs():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -100.0, -1e13, 1e13, 0.0, -0.0, 1e-40, -1e-40, 88.0,
                      -9.0, 3.0]).bfloat16()
    up = torch.tensor([1.0, 2.0, float("inf"), 0.0, -1.0, 1e-40, float("nan"), 3.0, 1.0, 1.0, 1.0, 5.0, 0.5]).bfloat16()
    assert torch.equal(_bits(cpu_gemv.gelu_tanh(x)), _bits(F.gelu(x, approximate="tanh")))
    assert torch.equal(_bits(cpu_gemv.gelu_tanh(x, up)), _bits(F.gelu(x, approximate="tanh") * up))
    real = ~torch.isnan(F.gelu(x, approximate="tanh"))  # gelu(-inf) is NaN too
    assert torch.equal(torch.signbit(cpu_gemv.gelu_tanh(x)[real]), torch.signbit(F.gelu(x, approximate="tanh")[real]))


@needs_cc
def test_gelu_refuses_what_it_does_not_take_and_the_model_then_runs_torchs():
    x = torch.randn(8, 6).bfloat16()
    for args in [(x.float(),), (x.half(),), (x.t(),), (x, torch.randn(8, 5).bfloat16()), (x, x.float()),
                 (torch.randn(4).bfloat16().requires_grad_(),), (torch._neg_view(torch.randn(4).bfloat16()),)]:
        with pytest.raises(NotImplementedError):
            cpu_gemv.gelu_tanh(*args)
        if len(args) == 1 and not args[0].requires_grad:
            assert torch.equal(cpu_kernels.gelu_tanh(*args), F.gelu(args[0], approximate="tanh"))
    assert cpu_gemv.gelu_tanh(torch.empty(0, 3).bfloat16()).shape == (0, 3)
