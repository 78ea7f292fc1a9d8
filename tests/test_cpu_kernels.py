"""Decode-speed paths keep the numerics: the single-row GEMV switch, and head logits of a sliced hidden state."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from pgconv.model import cpu_kernels
from pgconv.model.generate import generate
from reference_models import CONFIGS, make_inputs, pair


def _mkldnn_inside(x: torch.Tensor) -> bool:
    with cpu_kernels.single_row_gemv(x):
        return torch._C._get_mkldnn_enabled()


@pytest.mark.skipif(not torch._C._get_mkldnn_enabled(), reason="torch built without oneDNN")
def test_switch_applies_to_one_bf16_row_only_and_is_restored():
    assert not _mkldnn_inside(torch.zeros(1, 1, 8, dtype=torch.bfloat16))
    assert _mkldnn_inside(torch.zeros(1, 2, 8, dtype=torch.bfloat16))  # prefill: oneDNN's GEMM is faster
    assert _mkldnn_inside(torch.zeros(2, 1, 8, dtype=torch.bfloat16))  # batched decode: more than one row
    assert _mkldnn_inside(torch.zeros(1, 1, 8))  # fp32 goes to MKL either way
    with pytest.raises(ValueError), cpu_kernels.single_row_gemv(torch.zeros(1, 8, dtype=torch.bfloat16)):
        raise ValueError
    assert torch._C._get_mkldnn_enabled()


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of the bf16 spacing at `exact`."""
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    return (got.double() - exact).abs() / spacing


def test_single_row_bf16_product_rounds_the_fp32_sum_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 2048, generator=g).bfloat16()
    w = torch.randn(4096, 2048, generator=g).bfloat16()
    exact = F.linear(x.double(), w.double())
    with cpu_kernels.single_row_gemv(x):
        fast = F.linear(x, w)
    default = F.linear(x, w)
    # fp32 accumulation then one rounding: within ~half a bf16 ulp of the exact product, like oneDNN.
    assert _ulps(fast, exact).max() < 0.6 and _ulps(default, exact).max() < 0.6
    assert _ulps(fast, exact).mean().item() == pytest.approx(_ulps(default, exact).mean().item(), rel=0.05)


@pytest.mark.parametrize("name", ["tiny", "tiny-pg2"])
def test_bf16_decode_matches_transformers_greedy_and_the_onednn_logits(name, monkeypatch):
    cfg = CONFIGS[name]
    hf, ours = pair(cfg, seed=2, dtype=torch.bfloat16)
    inp = make_inputs(cfg, [5], seed=7)
    with torch.no_grad():
        ref = hf.generate(**inp, do_sample=False, max_new_tokens=10, eos_token_id=[9999])[:, inp["input_ids"].shape[1]:]
    steps: list[torch.Tensor] = []
    orig_logits = type(ours).logits
    monkeypatch.setattr(type(ours), "logits", lambda self, h: steps.append(orig_logits(self, h)) or steps[-1])
    got = generate(ours, **inp, max_new_tokens=10, eos_token_ids=[9999])
    assert got.tolist() == ref.tolist()
    # The same decode with oneDNN everywhere: the per-step logits agree to bf16 rounding.
    fast = steps[:]
    steps.clear()
    monkeypatch.setattr(cpu_kernels, "single_row_gemv", lambda x: contextlib.nullcontext())
    assert generate(ours, **inp, max_new_tokens=10, eos_token_ids=[9999]).tolist() == got.tolist()
    for a, b in zip(fast, steps):
        assert (a.float() - b.float()).abs().max() <= 0.05 * b.float().abs().max()


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
