"""Injected bugs: each must make `pgconv verify` fail and name the probe where it enters as the first divergence.

Bugs are injected by monkeypatching our model's math (`pgconv.model.ops`, methods, the config's attention scale) inside
the test; the model has no flags for this. The same harness must stay quiet on the unpatched model (no false alarms)
in fp32 and bf16, for PaliGemma 1 and 2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgconv.model import ops
from pgconv.model.config import TextConfig
from pgconv.model.paligemma import PaliGemma
from pgconv.parity.verify import verify

from test_parity_fixtures import square_checkpoint, tiny_checkpoint  # noqa: F401  (pytest fixtures)


def _run(path, dtype="float32", probes="all"):
    return verify(str(path), dtype=dtype, max_new_tokens=3, probes=probes)


# -- the bugs ------------------------------------------------------------------------------------------------------


def rms_norm_without_plus_one(mp):
    def bad(x, weight, eps):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).type_as(x)

    mp.setattr(ops, "rms_norm", bad)


def rms_norm_in_bf16(mp):
    # The whole norm in bf16 (transformers computes it in fp32 and rounds once): invisible in a bf16 run.
    def bad(x, weight, eps):
        xb = x.to(torch.bfloat16)
        return (xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.to(torch.bfloat16))).to(x.dtype)

    mp.setattr(ops, "rms_norm", bad)


def exact_gelu(mp):
    mp.setattr(ops, "gelu_tanh", lambda x, up=None: F.gelu(x) if up is None else F.gelu(x) * up)


def image_scaled_by_wrong_hidden(mp):
    # mlx-vlm / hkproj: image features / sqrt(top-level hidden_size=2048) before the text normaliser sqrt(text hidden).
    orig = PaliGemma.embed

    def embed(self, input_ids, image_features=None):
        if image_features is not None:
            image_features = image_features * (self.cfg.text.hidden_size**0.5 / 2048**0.5)
        return orig(self, input_ids, image_features)

    mp.setattr(PaliGemma, "embed", embed)


def image_features_rescaled(mp):
    # A 4.x-style port: features / sqrt(vision width) before the text normaliser's sqrt(text width), i.e. x sqrt(72/32)
    # after the projector, outside `embed` (issue 14: no probe sat between projector and merge).
    orig = PaliGemma.image_features

    def image_features(self, pixel_values):
        return orig(self, pixel_values) * (self.cfg.text.hidden_size / self.cfg.vision.hidden_size) ** 0.5

    mp.setattr(PaliGemma, "image_features", image_features)


def _rotate_pairs(x):  # GPT-J style: rotate pairs (x0, x1), (x2, x3), ... instead of the two halves
    return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)


def interleaved_rotation(mp):
    # Only the rotation is interleaved; the tables stay half-split: the RoPE tables match, attention does not.
    mp.setattr(ops, "rotate_half", _rotate_pairs)


def interleaved_rope(mp):
    # Fully interleaved RoPE (tables and rotation, like gpt-fast / Meta llama): the tables already differ.
    def cos_sin(positions, head_dim, theta, dtype):
        freqs = positions[..., None].float() * ops.rope_inv_freq(head_dim, theta, positions.device)
        emb = freqs.repeat_interleave(2, -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    mp.setattr(ops, "rotate_half", _rotate_pairs)
    mp.setattr(ops, "rope_cos_sin", cos_sin)


def zero_indexed_positions(mp):
    mp.setattr(ops, "rope_positions", lambda index: index)


def causal_prefix(mp):
    orig = ops.prefix_lm_mask
    mp.setattr(ops, "prefix_lm_mask", lambda q, kv, tti=None, pad=None, win=None: orig(q, kv, None, pad, win))


def unrounded_normaliser(mp):
    mp.setattr(ops, "embed_scale", lambda hidden, dtype: torch.tensor(hidden**0.5, dtype=torch.float32))


class _TransposedLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight.T, self.bias)


def transposed_projector(mp):
    orig = PaliGemma.__init__

    def init(self, cfg):
        orig(self, cfg)
        self.projector.__class__ = _TransposedLinear

    mp.setattr(PaliGemma, "__init__", init)


def no_attention_softcap(mp):
    orig = ops.attention
    mp.setattr(ops, "attention", lambda q, k, v, mask, scale, cap=None: orig(q, k, v, mask, scale, None))


def no_final_softcap(mp):
    mp.setattr(PaliGemma, "logits", lambda self, hidden: F.linear(hidden, self.text.embed.weight))


def head_dim_scale(mp):
    mp.setattr(TextConfig, "attn_scale", property(lambda self: self.head_dim**-0.5))


def sliding_window_ignored(mp):
    orig = ops.prefix_lm_mask
    mp.setattr(ops, "prefix_lm_mask", lambda q, kv, tti=None, pad=None, win=None: orig(q, kv, tti, pad, None))


def last_block_skipped(mp):
    from pgconv.model.gemma import GemmaDecoder

    def forward(self, x, ctx):
        for block in self.blocks[:-1]:
            x = block(x, ctx)
        return self.norm(x)

    mp.setattr(GemmaDecoder, "forward", forward)


def vision_blocks_reversed(mp):
    # Every block is right on its own input (teacher forcing sees nothing); only the wiring between probes is wrong.
    from pgconv.model.siglip import SiglipVision

    def forward(self, pixel_values):
        x = self.embed(pixel_values)
        for block in reversed(self.blocks):
            x = block(x)
        return self.norm(x)

    mp.setattr(SiglipVision, "forward", forward)


# (bug, checkpoint, dtypes, first divergence with --probes all, with --probes coarse). bf16 is listed where the bug is
# larger than bf16 rounding; exact GELU (~1e-4) and a missing attention soft-cap (~2e-4 on these weights) are below
# it and are caught in fp32 only. The unrounded normaliser exists only in reduced precision.
F32, BOTH = ("float32",), ("float32", "bfloat16")
MUTATIONS = [
    (rms_norm_without_plus_one, "tiny", BOTH, "text.blocks.0.attn_norm", "text.blocks.0"),
    (exact_gelu, "tiny", F32, "vision.blocks.0.mlp", "vision.blocks.0"),
    (rms_norm_in_bf16, "tiny", F32, "text.blocks.0.attn_norm", "text.blocks.0"),
    (image_scaled_by_wrong_hidden, "tiny", BOTH, "text.embed", "text.embed"),
    (image_features_rescaled, "tiny", BOTH, "image_features", "image_features"),
    (interleaved_rotation, "tiny", BOTH, "text.blocks.0.attn", "text.blocks.0"),
    (interleaved_rope, "tiny", BOTH, "text.rope", "text.rope"),
    (zero_indexed_positions, "tiny", BOTH, "text.rope", "text.rope"),
    (causal_prefix, "tiny", BOTH, "text.mask.full", "text.mask.full"),
    (unrounded_normaliser, "tiny", ("bfloat16",), "text.embed", "text.embed"),
    (transposed_projector, "square", F32, "projector", "projector"),
    (no_attention_softcap, "tiny-pg2", F32, "text.blocks.0.attn", "text.blocks.0"),
    (no_final_softcap, "tiny-pg2", BOTH, "logits", "logits"),
    (head_dim_scale, "tiny-pg2", BOTH, "text.blocks.0.attn", "text.blocks.0"),
    (sliding_window_ignored, "tiny-pg2", BOTH, "text.mask.sliding", "text.mask.sliding"),
    (last_block_skipped, "tiny", F32, "text.blocks.1.attn_norm", "text.blocks.1"),
    (vision_blocks_reversed, "tiny", F32, "vision.blocks.0", "vision.blocks.0"),
]
COARSE_DTYPE = {unrounded_normaliser: "bfloat16"}  # the coarse table is checked once per bug, in this dtype
CASES = [(bug, ckpt, dtype, first_all, first_coarse) for bug, ckpt, dtypes, first_all, first_coarse in MUTATIONS
         for dtype in dtypes]


@pytest.mark.parametrize("bug,ckpt,dtype,first_all,first_coarse", CASES,
                         ids=[f"{c[0].__name__}-{c[2]}" for c in CASES])
def test_mutation_is_caught_at_the_right_probe(monkeypatch, tiny_checkpoint, square_checkpoint, bug, ckpt, dtype,
                                                first_all, first_coarse):
    path = square_checkpoint if ckpt == "square" else tiny_checkpoint(ckpt)
    bug(monkeypatch)
    report = _run(path, dtype)
    assert not report["passed"]
    assert report["first_divergence"]["probe"] == first_all, report["failures"]
    row = next(p for p in report["probes"] if p["name"] == first_all)
    assert row["verdict"] == "ours worse" and not row["passed"]
    # Everything upstream of the bug still matches.
    upstream = report["probes"][: report["probes"].index(row)]
    assert all(p["passed"] for p in upstream)
    if dtype == COARSE_DTYPE.get(bug, "float32"):  # the block-level table localises too
        assert _run(path, dtype, "coarse")["first_divergence"]["probe"] == first_coarse


@pytest.mark.parametrize("ckpt", ["tiny", "tiny-pg2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_false_alarm(tiny_checkpoint, ckpt, dtype):
    report = _run(tiny_checkpoint(ckpt), dtype)
    assert report["passed"], report["failures"]
    assert report["first_divergence"] is None
    assert all(p["verdict"] != "ours worse" for p in report["probes"])


def test_square_config_is_square(square_checkpoint):
    # The transposed-projector mutation is only shape-preserving when vision width == text width.
    from pgconv.parity.models import read_config

    cfg = read_config(square_checkpoint)
    assert cfg.vision.hidden_size == cfg.text.hidden_size


def test_one_run_over_float32_and_bfloat16_catches_bugs_of_either(monkeypatch, tiny_checkpoint):
    """`--dtype float32,bfloat16`: one report over both runs. An exact GELU (below bf16 rounding) fails only in the
    float32 run, an unrounded normaliser (exists only in reduced precision) only in the bf16 run; each failure
    names its run, and the first divergence is the first run's."""
    path = tiny_checkpoint("tiny")
    clean = verify(str(path), dtype="float32,bfloat16", max_new_tokens=3)
    assert clean["passed"] and clean["dtypes"] == ["float32", "bfloat16"]
    assert [c["dtype"] for c in clean["cases"]] == ["float32", "bfloat16"]
    exact_gelu(monkeypatch)
    unrounded_normaliser(monkeypatch)
    report = verify(str(path), dtype=["float32", "bfloat16"], max_new_tokens=3)
    assert not report["passed"]
    assert report["first_divergence"]["probe"] == "vision.blocks.0.mlp"
    assert report["first_divergence"]["dtype"] == "float32"
    f32, bf16 = report["cases"]
    assert f32["first_divergence"]["probe"] == "vision.blocks.0.mlp"
    # In bf16 the GELU difference is rounding; the normaliser's is not.
    assert bf16["first_divergence"]["probe"] == "text.embed"
    assert any(f.endswith("(bfloat16)") and "text.embed" in f for f in report["failures"])
    # Every failure line of a multi-dtype report names its run.
    assert all(f.endswith(("(float32)", "(bfloat16)")) for f in report["failures"]), report["failures"]
