"""Every kernel keeps the numerics (against float64 and transformers); head logits of a sliced hidden state;
the choice by measurement: a fake timer picks the winner, the per-machine cache, PGCONV_KERNELS."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pgconv import tuning
from pgconv.errors import InputError
from pgconv.model import cpu_gemv, cpu_kernels
from pgconv.model.generate import generate
from reference_models import CONFIGS, make_inputs, pair


KERNEL_CASES = [(name, dtype, rows) for dtype in cpu_kernels.MEASURED for rows in (1, 33)
                for name in cpu_kernels.candidates(dtype, rows)]


@pytest.mark.parametrize(("kernel", "dtype", "rows"), KERNEL_CASES,
                         ids=[f"{k}-{str(d)[6:]}-rows{r}" for k, d, r in KERNEL_CASES])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n_k", [(1024, 2048), (37, 1007), (130, 4127)])  # odd shapes: row and column tails,
# and rows long enough (>= 4096) for pgconv gemv's four-row block
def test_every_candidate_accumulates_in_fp32_and_rounds_once(kernel, dtype, rows, with_bias, n_k):
    """Against float64: within the worst-case fp32 summation bound everywhere, and (bf16) the correctly rounded
    value almost everywhere. A second rounding (product, then bias) or a bf16 accumulation gets <= 75 % right."""
    n, k = n_k
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = cpu_kernels.KERNELS[kernel](x, w, b)
    assert got.dtype == dtype and got.shape == exact.shape
    u = 2.0 ** -24
    magnitude = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    final = 0.5 * _spacing(exact, dtype)  # the one rounding to the output dtype
    assert ((got.double() - exact).abs() <= final + (k + 1) * u * magnitude).all()
    if dtype == torch.bfloat16:
        assert (got == exact.to(dtype)).double().mean() > (0.99 if n * rows > 500 else 0.9)
    else:  # fp32: no bf16 shortcut (oneDNN's fpmath mode or AMX down-conversion would show here as ~1e-3)
        assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6


def _spacing(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |exact| (bf16: 8 significand bits; fp32: 24)."""
    bits = 8 if dtype == torch.bfloat16 else 24
    return torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - (bits - 1))


@pytest.mark.parametrize("kernel", ["default", *[k for k in cpu_kernels.KERNELS if k != "default"], "pgconv"])
@pytest.mark.parametrize("name", ["tiny", "tiny-pg2"])
def test_bf16_decode_matches_transformers_greedy_on_every_kernel(name, kernel, monkeypatch):
    """The whole model, every product forced onto one kernel (PGCONV_KERNELS=<kernel>; `pgconv`: pgconv's GELU,
    torch's products): transformers' tokens."""
    monkeypatch.setenv("PGCONV_KERNELS", kernel)
    cpu_kernels.reset()
    cfg = CONFIGS[name]
    hf, ours = pair(cfg, seed=2, dtype=torch.bfloat16)
    inp = make_inputs(cfg, [5], seed=7)
    with torch.no_grad():
        ref = hf.generate(**inp, do_sample=False, max_new_tokens=10, eos_token_id=[9999])[:, inp["input_ids"].shape[1]:]
    got = generate(ours, **inp, max_new_tokens=10, eos_token_ids=[9999])
    assert got.tolist() == ref.tolist()
    assert {c.kernel for c in cpu_kernels.choices()} <= {kernel, "default"}
    cpu_kernels.reset()


def test_head_of_a_sliced_hidden_state_equals_the_full_head():
    cfg = CONFIGS["tiny"]
    _, ours = pair(cfg, seed=1)
    hidden = torch.randn(2, 7, cfg.text.hidden_size)
    last = ours.logits(hidden[:, -1:])  # a strided slice: the head runs it as one 2-D GEMM
    assert last.shape == (2, 1, cfg.text.vocab_size)
    assert torch.allclose(last, ours.logits(hidden)[:, -1:], rtol=1e-5, atol=1e-5)


def test_fp32_gemm_rows_agree_with_f_linear_to_fp32_noise_and_keep_autograd():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 33, 512, generator=g), torch.randn(768, 512, generator=g), torch.randn(768, generator=g)
    exact = F.linear(x.double(), w.double(), b.double())
    got = cpu_kernels.linear(x, w, b)
    assert got.shape == (2, 33, 768) and got.dtype == torch.float32
    scale = exact.abs().max()
    assert (got.double() - exact).abs().max() / scale < 1e-6  # fp32 rounding noise, like MKL's
    assert (F.linear(x, w, b).double() - exact).abs().max() / scale < 1e-6
    # Gradients: a parameter that needs one takes F.linear (the oneDNN op has no backward).
    wg = w.clone().requires_grad_()
    cpu_kernels.linear(x, wg, b).sum().backward()
    assert torch.allclose(wg.grad, x.sum(0).sum(0).expand(768, 512), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-pg2"])
def test_prefill_with_logits_to_keep_skips_only_unread_work(name):
    """keep=1: the last block computes one query row; logits and every cache entry equal the full prefill's."""
    cfg = CONFIGS[name]
    _, ours = pair(cfg, seed=3)
    inp = make_inputs(cfg, [4, 7], suffix_len=2, seed=5)
    t = inp["input_ids"].shape[1]
    args = (inp["input_ids"], inp["pixel_values"], inp["token_type_ids"], inp["attention_mask"])
    with torch.no_grad():
        ours.setup_cache(2, t + 3)
        last = ours(*args, input_pos=torch.arange(t), logits_to_keep=1)
        kept = [(b.attn.cache.k.clone(), b.attn.cache.v.clone()) for b in ours.text.blocks]
        ours.reset_cache()
        full = ours(*args, input_pos=torch.arange(t))
    assert last.shape == (2, 1, cfg.text.vocab_size)
    assert torch.allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    for (k, v), b in zip(kept, ours.text.blocks):
        assert torch.equal(k, b.attn.cache.k) and torch.equal(v, b.attn.cache.v)


# -- the choice by measurement (fake timer, temporary cache dir) -------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """PGCONV_KERNELS=auto, an empty cache dir and a fake timer: each kernel call costs `costs[name]` seconds."""
    monkeypatch.setenv("PGCONV_CACHE", str(tmp_path))
    monkeypatch.setenv("PGCONV_KERNELS", "auto")
    clock = FakeClock()
    monkeypatch.setattr(tuning, "clock", clock)
    state = SimpleNamespace(costs={"default": 3e-3, "aten": 1e-3, "onednn": 2e-3, "gemv": 4e-3}, calls=[], probes=[],
                            root=tmp_path)
    for name, fn in list(cpu_kernels.KERNELS.items()):
        def timed(x, w, b, fn=fn, name=name):
            clock.now += state.costs[name]
            state.calls.append(name)
            return fn(x, w, b)
        monkeypatch.setitem(cpu_kernels.KERNELS, name, timed)
    real = tuning.measure
    monkeypatch.setattr(tuning, "measure", lambda c, **kw: state.probes.append(list(c)) or real(c, **kw))
    cpu_kernels.reset()
    yield state
    cpu_kernels.reset()


GEMV = ["gemv"] if cpu_gemv.available() else []  # one-row products only


def _product(rows: int = 1, dtype=torch.bfloat16, n: int = 48, k: int = 64):
    g = torch.Generator().manual_seed(rows)
    return torch.randn(1, rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)


@pytest.mark.skipif(cpu_kernels._ONEDNN_LINEAR is None, reason="torch built without oneDNN")
def test_a_fake_timer_picks_the_winner(measuring):
    x, w = _product(1)
    out = cpu_kernels.linear(x, w)
    assert torch.equal(out, F.linear(x, w)) or (out.float() - F.linear(x, w).float()).abs().max() < 0.05
    (c,) = cpu_kernels.choices()
    assert (c.kernel, c.source, c.key) == ("aten", "measured", "linear bfloat16 64->48 rows=1")
    assert c.times_s == pytest.approx(measuring.costs)
    measuring.calls.clear()
    cpu_kernels.linear(x, w)
    assert measuring.calls == ["aten"]  # decided: the winner only, no more timing
    measuring.costs["onednn"] = 0.5e-3
    cpu_kernels.linear(*_product(1, torch.float32))  # fp32: `aten` is MKL again, no candidate
    assert measuring.probes[-1] == ["default", "onednn", *GEMV] and cpu_kernels.choices()[-1].kernel == "onednn"
    measuring.costs.update(default=1.02e-3, onednn=1e-3)  # 2 % faster: within noise, torch's own pick stays
    cpu_kernels.linear(*_product(1, torch.float32, n=8))
    assert cpu_kernels.choices()[-1].kernel == "default"
    measuring.costs.update(default=1.05e-3)
    cpu_kernels.linear(*_product(1, torch.float32, n=9))
    assert cpu_kernels.choices()[-1].kernel == "onednn"


def test_a_cached_decision_is_measured_again_when_the_candidates_change(measuring, monkeypatch):
    x, w = _product(1)
    cpu_kernels.linear(x, w)
    assert cpu_kernels.choices()[0].source == "measured" and cpu_kernels.choices()[0].kernel == "aten"
    real = cpu_kernels.candidates
    # a new kernel on this machine (e.g. a C compiler installed since): the cached pick is not the last word
    monkeypatch.setattr(cpu_kernels, "candidates", lambda dtype, rows=1: [*real(dtype, rows), "faster"])
    monkeypatch.setitem(cpu_kernels.KERNELS, "faster", lambda x, w, b: (measuring.calls.append("faster"),
                                                                          F.linear(x, w, b))[1])
    measuring.costs["faster"] = 0.1e-3
    real_measure = tuning.measure

    def costed(c, **kw):
        def timed(fn, name):
            def run():
                if name == "faster":
                    tuning.clock.now += measuring.costs["faster"]
                return fn()
            return run
        return real_measure({n: timed(fn, n) for n, fn in c.items()}, **kw)
    monkeypatch.setattr(tuning, "measure", lambda c, **kw: measuring.probes.append(list(c)) or costed(c, **kw))
    cpu_kernels.reset()
    cpu_kernels.linear(x, w)
    assert cpu_kernels.choices()[0].source == "measured" and cpu_kernels.choices()[0].kernel == "faster"
    monkeypatch.setattr(cpu_kernels, "candidates", real)  # and gone again: measured among the rest
    cpu_kernels.reset()
    cpu_kernels.linear(x, w)
    assert cpu_kernels.choices()[0].source == "measured" and cpu_kernels.choices()[0].kernel == "aten"
    cpu_kernels.reset()
    cpu_kernels.linear(x, w)
    assert cpu_kernels.choices()[0].source == "cached"


def test_a_cached_decision_is_measured_again_after_pgconvs_kernel_is_rebuilt(measuring, monkeypatch):
    if not GEMV:
        pytest.skip("no C compiler: pgconv's kernel is no candidate")
    x, w = _product(1)
    cpu_kernels.linear(x, w)
    cpu_kernels.reset()
    cpu_kernels.linear(x, w)
    assert cpu_kernels.choices()[0].source == "cached"
    monkeypatch.setattr(cpu_gemv, "build_id", lambda: "gemv-0123456789abcdef")  # new source, compiler or CPU
    cpu_kernels.reset()
    cpu_kernels.linear(x, w)
    assert cpu_kernels.choices()[0].source == "measured"


def test_probe_runs_once_per_shape_per_process_and_not_with_a_warm_cache(measuring):
    for rows in (1, 1, 5, 7, 8, 9):  # buckets: 1, <=8 (5, 7, 8), <=16 (9)
        cpu_kernels.linear(*_product(rows))
    assert len(measuring.probes) == 3
    assert [c.key.split()[-1] for c in cpu_kernels.choices()] == ["rows=1", "rows<=8", "rows<=16"]
    assert len(list((measuring.root / "tuning").glob("kernels-*.json"))) == 1
    cpu_kernels.reset()  # a new process on the same machine
    for rows in (1, 5, 9):
        cpu_kernels.linear(*_product(rows))
    assert len(measuring.probes) == 3 and {c.source for c in cpu_kernels.choices()} == {"cached"}
    assert all(c.kernel == "aten" for c in cpu_kernels.choices())


def test_cache_is_invalidated_by_a_torch_version_cpu_model_or_thread_count_change(measuring, monkeypatch):
    x, w = _product(1)
    cpu_kernels.linear(x, w)
    assert len(measuring.probes) == 1
    for change in (lambda: monkeypatch.setattr(torch, "__version__", "9.9.9"),
                   lambda: monkeypatch.setattr(tuning, "cpu_model", lambda: "Some Other CPU"),
                   # same model string and flags, another CPU generation (two 'AMD EPYC' boxes here)
                   lambda: monkeypatch.setattr(tuning, "cpu_signature", lambda: "family 99 model 1 stepping 0"),
                   lambda: monkeypatch.setattr(tuning, "cpu_isa", lambda: ["amx_bf16"])):
        cpu_kernels.reset()
        cpu_kernels.linear(x, w)
        before = len(measuring.probes)
        change()
        cpu_kernels.reset()
        cpu_kernels.linear(x, w)
        assert len(measuring.probes) == before + 1 and cpu_kernels.choices()[0].source == "measured"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        cpu_kernels.linear(x, w)  # same process, other thread count: measured again
        assert cpu_kernels.choices()[-1].source == "measured"
    finally:
        torch.set_num_threads(threads)
    assert len(list((measuring.root / "tuning").glob("kernels-*.json"))) == 6  # base + 4 changes + threads


def test_pgconv_kernels_default_restores_torchs_picks_and_a_name_forces_one(measuring, monkeypatch):
    x, w = _product(3)
    monkeypatch.setenv("PGCONV_KERNELS", "default")
    out = cpu_kernels.linear(x, w)
    assert torch.equal(out, F.linear(x, w)) and measuring.calls == ["default"] and not measuring.probes
    assert cpu_kernels.choices()[-1].source == "default"
    assert not (measuring.root / "tuning").exists()  # nothing measured, nothing written
    monkeypatch.setenv("PGCONV_KERNELS", "aten")
    measuring.calls.clear()
    cpu_kernels.linear(x, w)
    cpu_kernels.linear(*_product(3, torch.float32))  # aten is no fp32 candidate: torch's pick
    cpu_kernels.linear(*_product(3, torch.float16))  # fp16 is never measured
    assert measuring.calls == ["aten", "default", "default"] and not measuring.probes
    monkeypatch.setenv("PGCONV_KERNELS", "fastest-please")
    with pytest.raises(InputError, match="PGCONV_KERNELS='fastest-please': expected auto, default, aten"):
        cpu_kernels.linear(x, w)


def test_a_corrupt_or_foreign_cache_file_is_ignored_and_rewritten(measuring):
    x, w = _product(1)
    path = tuning.Decisions("kernels", cpu_kernels._machine_key(torch.get_num_threads())).path
    path.parent.mkdir(parents=True)
    for junk in ("{not json", "[1, 2]", json.dumps({"key": {"cpu": "elsewhere"}, "decisions": {}}),
                 json.dumps({"key": tuning.Decisions("kernels", cpu_kernels._machine_key(
                     torch.get_num_threads())).key, "decisions": "nope"})):
        path.write_text(junk)
        cpu_kernels.reset()
        cpu_kernels.linear(x, w)
        assert cpu_kernels.choices()[0].source == "measured"
        data = json.loads(path.read_text())
        assert data["decisions"]["linear bfloat16 64->48 rows=1"]["kernel"] == "aten"
    data["decisions"]["linear bfloat16 64->48 rows=1"]["times_s"] = {"aten": "fast", "onednn": None}
    path.write_text(json.dumps(data))
    cpu_kernels.reset()
    cpu_kernels.linear(x, w)  # a usable decision with junk times: kept, the junk dropped (describe must not fail)
    assert cpu_kernels.choices()[0].source == "cached" and cpu_kernels.choices()[0].times_s == {}
    assert "aten (cached)" in cpu_kernels.describe(cpu_kernels.choices()[0])
    path.unlink()
    path.mkdir()  # unwritable in place: the decision holds for this process, no crash
    cpu_kernels.reset()
    cpu_kernels.linear(x, w)
    cpu_kernels.linear(x, w)
    assert len(cpu_kernels.choices()) == 1 and path.is_dir()


def test_describe_names_the_kernel_and_the_measured_times(measuring):
    cpu_kernels.linear(*_product(1))
    line = cpu_kernels.describe(cpu_kernels.choices()[0])
    assert line.startswith("linear bfloat16 64->48 rows=1: aten (measured: aten 1 ms, onednn 2 ms, default 3 ms")


def test_a_kernel_that_refuses_an_input_falls_back_to_f_linear(monkeypatch):
    def refuses(x, w, b):
        raise RuntimeError("mkldnn: unsupported layout")

    monkeypatch.setenv("PGCONV_KERNELS", "onednn")
    monkeypatch.setitem(cpu_kernels.KERNELS, "onednn", refuses)
    cpu_kernels.reset()
    x, w = _product(2, torch.float32)
    assert torch.equal(cpu_kernels.linear(x, w), F.linear(x, w))
    monkeypatch.setenv("PGCONV_KERNELS", "default")
    with pytest.raises(RuntimeError):  # torch's own error for a real mismatch
        cpu_kernels.linear(x, w[:, :5])
    cpu_kernels.reset()


def test_weights_that_fit_in_the_cache_are_timed_streamed_from_memory(monkeypatch):
    monkeypatch.setattr(tuning, "last_level_cache_bytes", lambda: 1 << 20)
    w = torch.randn(256, 2048).bfloat16()
    small = cpu_kernels._evictor(w)  # 1 MiB: fits, evicted between calls
    assert callable(small)
    before = w.clone()
    small()
    assert torch.equal(w, before)  # flushing the weight's lines leaves its values alone
    monkeypatch.setattr(cpu_gemv, "flusher", lambda t: None)  # no clflush: a buffer twice the cache is read
    assert cpu_kernels._evictor(w)().item() == (2 << 20) // 4
    assert cpu_kernels._evictor(torch.empty(1024, 2048, dtype=torch.bfloat16, device="meta")) is None  # 4 MiB


def test_the_gelu_kernel_is_chosen_by_measurement_and_default_restores_torchs(measuring, monkeypatch):
    """The MLPs' tanh GELU: the faster of torch's and pgconv's per (dtype, size bucket), cached like the products;
    PGCONV_KERNELS=default gives torch's bits exactly; a gradient always takes torch's."""
    costs = {"default": 3e-3, "pgconv": 1e-3}
    for name, fn in list(cpu_kernels.ACTIVATIONS.items()):
        def timed(x, up, fn=fn, name=name):
            tuning.clock.now += costs[name]
            measuring.calls.append(name)
            return fn(x, up)
        monkeypatch.setitem(cpu_kernels.ACTIVATIONS, name, timed)
    g, u = torch.randn(4, 300).bfloat16(), torch.randn(4, 300).bfloat16()
    torch_gelu = F.gelu(g, approximate="tanh") * u
    got = cpu_kernels.gelu_tanh(g, u)
    (c,) = cpu_kernels.choices()
    if not cpu_gemv.available():
        assert (c.kernel, c.source) == ("default", "only candidate") and torch.equal(got, torch_gelu)
        return
    assert (c.key, c.kernel, c.source) == ("gelu_tanh * up bfloat16 numel<=2048", "pgconv", "measured")
    assert c.times_s == pytest.approx(costs)
    measuring.calls.clear()
    cpu_kernels.gelu_tanh(g[:3], u[:3])  # 900 elements: another bucket, measured again
    cpu_kernels.gelu_tanh(g[:2, :260], u[:2, :260])  # 520: the same bucket as 900
    assert measuring.probes[-1] == ["default", "pgconv"] and len(measuring.probes) == 2
    cpu_kernels.reset()  # a new process: the cached decision, no probe
    cpu_kernels.gelu_tanh(g, u)
    assert cpu_kernels.choices()[-1].source == "cached" and len(measuring.probes) == 2
    costs["pgconv"] = 2.95e-3  # within the margin: torch's own stays
    cpu_kernels.gelu_tanh(torch.randn(5000).bfloat16())
    assert cpu_kernels.choices()[-1].kernel == "default"
    monkeypatch.setenv("PGCONV_KERNELS", "default")
    assert torch.equal(cpu_kernels.gelu_tanh(g, u), torch_gelu) and cpu_kernels.choices()[-1].source == "default"
    monkeypatch.setenv("PGCONV_KERNELS", "pgconv")
    assert cpu_kernels.gelu_tanh(g).dtype == torch.bfloat16 and cpu_kernels.choices()[-1].kernel == "pgconv"
    x = torch.randn(6, requires_grad=True)
    y = cpu_kernels.gelu_tanh(x)
    y.sum().backward()
    assert x.grad is not None


def test_pgconv_kernels_default_never_loads_pgconvs_library(tmp_path, monkeypatch):
    """`PGCONV_KERNELS=default`: torch's own picks, no measuring, and no build or load of pgconv's C library."""
    monkeypatch.setenv("PGCONV_KERNELS", "default")
    monkeypatch.setenv("PGCONV_CACHE", str(tmp_path))
    cpu_gemv._reset()
    cpu_kernels.reset()
    try:
        x, w = _product(1)
        cpu_kernels.linear(x, w)
        cpu_kernels.gelu_tanh(torch.randn(3, 5).bfloat16(), torch.randn(3, 5).bfloat16())
        assert not cpu_gemv._state and not (tmp_path / "kernels").exists()
    finally:
        cpu_gemv._reset()
        cpu_kernels.reset()


def test_torchs_geglu_keeps_the_bits_of_the_plain_product():
    g, u = torch.randn(7, 300).bfloat16(), torch.randn(7, 300).bfloat16()
    want = F.gelu(g, approximate="tanh") * u
    assert torch.equal(cpu_kernels.ACTIVATIONS["default"](g, u), want)
    gg = g.clone().requires_grad_()
    y = cpu_kernels.ACTIVATIONS["default"](gg, u)
    y.float().sum().backward()
    assert torch.equal(y.detach(), want) and gg.grad is not None


def test_fp32_gelu_stays_torchs():
    """Only bf16 has a table: an fp32 GELU is torch's, not measured."""
    cpu_kernels.reset()
    x = torch.randn(4, 300)
    assert torch.equal(cpu_kernels.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    assert cpu_kernels.choices()[-1].source in ("only candidate", "default")
    cpu_kernels.reset()


@torch.no_grad()
@pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler")
def test_the_model_with_pgconvs_gelu_gives_torchs_bits(monkeypatch):
    """The whole bf16 model with every GELU on pgconv's kernel gives the bits of torch's (gates scaled up so that
    many inputs lie in the tail x << 0, where a different GELU formula changed last bits and, at 3B, failed
    `pgconv verify`)."""
    from pgconv.model.paligemma import PaliGemma

    cfg = CONFIGS["tiny-pg2"]
    torch.manual_seed(0)
    model = PaliGemma(cfg).to(torch.bfloat16).eval()
    for block in model.text.blocks:
        block.mlp.gate.weight.mul_(8)
    inputs = make_inputs(cfg, [3], suffix_len=1)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    out = {}
    for mode in ("default", "pgconv"):
        monkeypatch.setenv("PGCONV_KERNELS", mode)
        cpu_kernels.reset()
        out[mode] = model(**inputs)
        assert any(c.kernel == mode for c in cpu_kernels.choices() if c.key.startswith("gelu_tanh")) or mode == "default"
    cpu_kernels.reset()
    assert torch.equal(out["default"], out["pgconv"])
