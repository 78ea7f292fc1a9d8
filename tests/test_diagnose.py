"""`converter.diagnose` and the cast rules of `converter.diff_weights` on random tensors (hypothesis): every move
a converter makes is named for any shape and seed, and the within-rounding rule is exactly round-to-nearest."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgconv.converter.diagnose import diagnose, rope_permutation
from pgconv.converter.diff_weights import compare_tensor, ulp_distance
from pgconv.model.config import PRESETS

CFG = PRESETS["tiny"]  # text: 4 heads, 2 kv heads, head_dim 24, width 72
NONE = lambda name: None  # noqa: E731  (no sibling tensors)


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), rows=st.integers(8, 60), cols=st.integers(1, 9), shift=st.integers(-3, 3))
def test_a_row_shift_is_named_with_its_amount(seed, rows, cols, shift):
    # (a shift is recognised while at least half of B's rows are found in A: rows >= 2 x |shift| + 2)
    a = _rand(seed, rows, cols)
    b = torch.roll(a, -shift, 0)
    if shift > 0:
        b[-shift:] = 0
    elif shift < 0:
        b[:-shift] = 0
    found = diagnose("text.embed.weight", a, b, CFG, NONE)
    if shift == 0:
        assert found is None
    else:
        assert found is not None and found.startswith(f"rows shifted by {shift:+d}"), found


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), perm=st.permutations(range(4)))
def test_permuted_heads_are_named_by_their_order(seed, perm):
    a = _rand(seed, 96, 72)
    b = a.view(4, 24, 72)[list(perm)].reshape(96, 72)
    found = diagnose("text.blocks.0.attn.q.weight", a, b, CFG, NONE)
    assert (found is None) == (list(perm) == [0, 1, 2, 3])
    if found is not None:
        assert found == f"heads permuted: B heads 0..3 = A heads {list(perm)}"


@given(half=st.integers(1, 64))
def test_the_rope_permutation_is_transformers_permute_and_its_inverse(half):
    hd = 2 * half
    w = torch.arange(hd, dtype=torch.float32)[:, None]  # one head, one column: row i holds i
    permuted = w.view(1, hd // 2, 2, 1).transpose(1, 2).reshape(hd, 1)  # convert_llama_weights' permute
    assert torch.equal(permuted[:, 0].long(), rope_permutation(hd))
    assert torch.equal(rope_permutation(hd)[rope_permutation(hd, False)], torch.arange(hd))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       scale=st.sampled_from([1e-6, 1.0, 300.0]))
def test_within_rounding_is_exactly_round_to_nearest(seed, dtype, scale):
    a = _rand(seed, 64) * scale
    rne = a.to(dtype)
    row = compare_tensor("text.norm.weight", a, rne, CFG, NONE)
    assert row["status"] == "rounding" and row["ulp_dtype"] == str(dtype)[6:], row
    # one value moved by one ulp the other way than rounding went: no longer a nearest value
    i = int((a - rne.double()).abs().argmax())
    off = rne.clone()
    off[i] = _next(rne[i], float(torch.sign(a[i] - rne[i].float())))  # the other neighbour of a[i]
    if ulp_distance(off[i:i + 1].float(), a[i:i + 1], dtype).item() == 0:
        return  # the nudge landed on the rounding (a tie)
    assert compare_tensor("text.norm.weight", a, off, CFG, NONE)["status"] == "differs"


def _next(x: torch.Tensor, direction: float) -> torch.Tensor:
    """The 16-bit neighbour of `x` one ulp towards +inf (direction > 0) or -inf, by its bits (sign-magnitude: a
    larger int16 pattern is a larger magnitude, for either sign)."""
    bits = x.view(torch.int16).item()
    up = (direction > 0) == (bits >= 0)  # larger magnitude when moving away from zero
    return torch.tensor([bits + (1 if up else -1)], dtype=torch.int16).view(x.dtype)[0]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), big=st.floats(65520, 1e30))
def test_fp16_overflow_is_counted(seed, big):
    a = _rand(seed, 16)
    a[3] = big
    row = compare_tensor("text.norm.weight", a, a.to(torch.float16), CFG, NONE)
    assert row["status"] == "differs" and "1 value(s) beyond +-65504 became inf" in row["diagnosis"]
