"""model/ops.py against independent oracles (closed forms, brute-force loops, torch reference ops)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pgconv.model import ops

dims = st.sampled_from([8, 24, 72, 256])


@settings(max_examples=30, deadline=None)
@given(dims, st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_rms_norm_zero_weight_is_normalize_times_sqrt_d(d, rows, seed):
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    got = ops.rms_norm(x, torch.zeros(d), eps=0.0)
    assert torch.allclose(got, F.normalize(x, dim=-1) * math.sqrt(d), atol=1e-10)


def test_rms_norm_weight_is_one_plus_w_and_casts_once():
    x = torch.randn(3, 72) * 4
    w = torch.randn(72)
    assert torch.allclose(ops.rms_norm(x, w, 1e-6), ops.rms_norm(x, torch.zeros(72), 1e-6) * (1 + w), atol=1e-6)
    # bf16: everything in fp32, a single rounding at the end ((x * w).to(bf16), not x.to(bf16) * w).
    xb, wb = x.bfloat16(), w.bfloat16()
    got = ops.rms_norm(xb, wb, 1e-6)
    xf = xb.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + wb.float())).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_rms_norm_eps_matters():
    x = torch.full((1, 4), 1e-3)
    assert not torch.allclose(ops.rms_norm(x, torch.zeros(4), 1e-6), ops.rms_norm(x, torch.zeros(4), 1e-5))


def test_gelu_tanh_closed_form_and_differs_from_exact():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    want = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert torch.allclose(ops.gelu_tanh(x), want, atol=1e-12)
    assert (ops.gelu_tanh(x) - F.gelu(x)).abs().max() > 1e-4


def test_embed_scale_rounds_to_the_activation_dtype():
    assert ops.embed_scale(72, torch.bfloat16).item() == 8.5 != math.sqrt(72)
    assert ops.embed_scale(2048, torch.bfloat16).item() == 45.25  # the hub model's normaliser in bf16
    assert ops.embed_scale(64, torch.bfloat16).item() == 8.0  # exact square: hides the trap
    assert ops.embed_scale(72, torch.float32).item() == torch.tensor(math.sqrt(72), dtype=torch.float32).item()


@settings(max_examples=30, deadline=None)
# Away from subnormals: v / cap would underflow and lose relative precision there (irrelevant for logits).
@given(st.floats(-1e4, 1e4, allow_nan=False).filter(lambda v: v == 0 or abs(v) > 1e-300), st.sampled_from([30.0, 50.0]))
def test_softcap_is_bounded_odd_and_near_identity_for_small_values(v, cap):
    x = torch.tensor([v, -v], dtype=torch.float64)
    y = ops.softcap(x, cap)
    assert (y.abs() <= cap).all() and y[0] == -y[1]
    if abs(v) < 1e-2 * cap:
        # tanh(u) = u - u^3/3 + ...; plus a few ulps of rounding (relative)
        assert abs(y[0].item() - v) <= abs(v) ** 3 / cap**2 + 1e-15 * abs(v)


def _rope_by_complex_rotation(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Half-split RoPE as a complex rotation: pair (x[i], x[i + D/2]) turned by angle pos * theta^(-2i/D)."""
    d = x.shape[-1]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    angle = positions.double()[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([8, 24, 256]), st.sampled_from([10000.0, 5000.0]), st.integers(0, 2**31 - 1))
def test_apply_rope_is_a_complex_rotation(d, theta, seed):
    g = torch.Generator().manual_seed(seed)
    t = 7
    x = torch.randn(1, 2, t, d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 4000, (t,), generator=g)
    cos, sin = ops.rope_cos_sin(pos[None], d, theta, torch.float64)
    got = ops.apply_rope(x, cos, sin)
    want = _rope_by_complex_rotation(x, pos, theta)
    # Angles are computed in fp32 like transformers, so agreement is limited by fp32 angles up to 4000 rad.
    assert torch.allclose(got, want, atol=2e-3)
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-9)  # a rotation keeps the norm


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 24, dtype=torch.float64), torch.randn(1, 1, 1, 24, dtype=torch.float64)

    def score(pq: int, pk: int) -> float:
        cq, sq = ops.rope_cos_sin(torch.tensor([[pq]]), 24, 10000.0, torch.float64)
        ck, sk = ops.rope_cos_sin(torch.tensor([[pk]]), 24, 10000.0, torch.float64)
        return (ops.apply_rope(q, cq, sq) * ops.apply_rope(k, ck, sk)).sum().item()

    assert score(10, 3) == pytest.approx(score(107, 100), abs=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


def test_rope_tables_are_fp32_then_cast():
    pos = torch.tensor([[1, 500, 4095]])
    cos, sin = ops.rope_cos_sin(pos, 256, 10000.0, torch.bfloat16)
    cos32, sin32 = ops.rope_cos_sin(pos, 256, 10000.0, torch.float32)
    assert cos.dtype == torch.bfloat16 and torch.equal(cos, cos32.bfloat16()) and torch.equal(sin, sin32.bfloat16())


def test_positions_are_one_indexed_and_skip_left_padding():
    assert ops.rope_positions(torch.arange(4)).tolist() == [1, 2, 3, 4]
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert ops.padded_index(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def _mask_by_loops(q_pos, kv_len, tti, pad, window):
    b, t = tti.shape
    out = torch.zeros(b, 1, t, kv_len, dtype=torch.bool)
    for bi in range(b):
        for i, qp in enumerate(q_pos.tolist()):
            for kp in range(kv_len):
                causal = kp <= qp and (window is None or kp > qp - window)
                chunk = q_pos.tolist()
                block = kp in chunk and tti[bi, i] == 0 and tti[bi, chunk.index(kp)] == 0
                real = kp < pad.shape[1] and bool(pad[bi, kp])
                out[bi, 0, i, kp] = (causal or block) and real
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 2), st.integers(1, 9), st.integers(0, 4), st.integers(0, 3), st.one_of(st.none(), st.integers(1, 6)),
    st.integers(0, 2**31 - 1),
)
def test_prefix_lm_mask_matches_brute_force(b, t, start, extra, window, seed):
    g = torch.Generator().manual_seed(seed)
    q_pos = torch.arange(start, start + t)
    kv_len = start + t + extra
    tti = (torch.rand(b, t, generator=g) < 0.4).long()
    pad = (torch.rand(b, start + t, generator=g) < 0.8).long()
    got = ops.prefix_lm_mask(q_pos, kv_len, tti, pad, window)
    assert torch.equal(got.expand(b, 1, t, kv_len), _mask_by_loops(q_pos, kv_len, tti, pad, window))


def test_prefix_block_overrides_the_sliding_window():
    tti = torch.tensor([[0] * 6 + [1] * 4])
    m = ops.prefix_lm_mask(torch.arange(10), 10, tti, None, sliding_window=2)[0, 0]
    assert m[0, 5] and m[5, 0]  # prefix: both ways, beyond the window
    assert not m[9, 0] and m[9, 8] and not m[8, 9]  # suffix: causal and windowed


def test_additive_mask_uses_the_dtype_minimum():
    allowed = torch.tensor([True, False])
    for dtype in (torch.float32, torch.bfloat16):
        m = ops.additive_mask(allowed, dtype)
        assert m.dtype == dtype and m.tolist() == [0.0, torch.finfo(dtype).min]


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(4, 4), (4, 2), (4, 1)]), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_attention_matches_sdpa_with_gqa(heads, t, seed):
    h, kvh = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, t, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kvh, t + 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = ops.prefix_lm_mask(torch.arange(2, t + 2), t + 2, torch.zeros(2, t, dtype=torch.long))
    got = ops.attention(q, k, v, ops.additive_mask(allowed, torch.float64), scale=0.3)
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1), attn_mask=allowed, scale=0.3
    )
    # The softmax runs in fp32 even for fp64 inputs (transformers eager), hence 1e-6.
    assert torch.allclose(got, want, atol=1e-6)


def test_attention_softcap_applies_before_the_mask():
    q, k, v = torch.ones(1, 1, 1, 4), torch.ones(1, 1, 2, 4) * 100, torch.tensor([[[[1.0] * 4, [2.0] * 4]]])
    mask = ops.additive_mask(torch.tensor([True, False]), torch.float32)
    # Capping after the mask would lift the masked score to -cap and leak value 2.
    out = ops.attention(q, k, v, mask, scale=1.0, cap=50.0)
    assert torch.equal(out, torch.ones(1, 1, 1, 4))
