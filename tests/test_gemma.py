"""Gemma / Gemma 2 decoder pieces against transformers 5.24 (eager), including teacher-forced blocks.

The teacher-forcing test is the parity harness's use case: feed each of our blocks transformers' captured input
for that layer, with the `AttnContext` from `PaliGemma.attn_context(...)`, and compare with transformers' output.
"""

from __future__ import annotations

import pytest
import torch

from pgconv.model.gemma import AttnContext, RMSNorm
from reference_models import CONFIGS, make_inputs, max_abs, pair

FP32_TOL = 1e-5


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    cfg = CONFIGS[request.param]
    hf, ours = pair(cfg, seed=4)
    return cfg, hf, ours


def capture_hf_layers(hf, inp) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) hidden states of every transformers decoder layer for one forward."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(lambda _m, args, kwargs, out: seen.append((args[0], out)), with_kwargs=True)
        for layer in hf.model.language_model.layers
    ]
    try:
        with torch.no_grad():
            hf(**inp)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def test_teacher_forced_blocks_match(models):
    cfg, hf, ours = models
    inp = make_inputs(cfg, [2, 7], suffix_len=3, seed=8)
    ctx = ours.attn_context(inp["input_ids"], inp["token_type_ids"], inp["attention_mask"])
    real = inp["attention_mask"].bool()
    layers = capture_hf_layers(hf, inp)
    assert len(layers) == cfg.text.num_layers
    for i, ((x, ref), block) in enumerate(zip(layers, ours.text.blocks, strict=True)):
        assert max_abs(block(x, ctx)[real], ref[real]) <= FP32_TOL, f"layer {i}"


@torch.no_grad()
def test_attn_context_is_the_one_forward_uses(models):
    cfg, _, ours = models
    inp = make_inputs(cfg, [3, 5], suffix_len=2, seed=9)
    used: list[AttnContext] = []
    hook = ours.text.blocks[0].register_forward_pre_hook(lambda _m, args: used.append(args[1]))
    try:
        ours(**inp)
    finally:
        hook.remove()
    built = ours.attn_context(inp["input_ids"], inp["token_type_ids"], inp["attention_mask"])
    for field in ("cos", "sin", "mask", "sliding_mask"):
        a, b = getattr(used[0], field), getattr(built, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert used[0].input_pos is None and built.input_pos is None


@torch.no_grad()
def test_embeddings_scaled_like_transformers(models):
    cfg, hf, ours = models
    ids = torch.randint(0, cfg.text.vocab_size, (2, 11))
    assert torch.equal(hf.model.language_model.embed_tokens(ids), ours.text.embed_tokens(ids))


@torch.no_grad()
def test_rms_norm_module_matches_transformers(models):
    cfg, hf, ours = models
    theirs = hf.model.language_model.norm
    mine = RMSNorm(cfg.text.hidden_size, cfg.text.rms_norm_eps)
    mine.weight.copy_(theirs.weight)
    x = torch.randn(3, 5, cfg.text.hidden_size) * 3
    assert torch.equal(theirs(x), mine(x))
    assert torch.equal(theirs(x.bfloat16()), mine(x.bfloat16()))


def test_layer_flags_follow_the_config(models):
    cfg, hf, ours = models
    for i, (theirs, block) in enumerate(zip(hf.model.language_model.layers, ours.text.blocks, strict=True)):
        assert block.attn.sliding == (getattr(theirs.self_attn, "sliding_window", None) is not None), i
        assert block.attn.scale == pytest.approx(theirs.self_attn.scaling, rel=1e-12)
        assert block.attn.cap == getattr(theirs.self_attn, "attn_logit_softcapping", None)
        assert (block.post_attn_norm is not None) == (cfg.text.family == "gemma2")
