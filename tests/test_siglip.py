"""SigLIP vision tower against transformers 5.24 (eager), block by block and end to end."""

from __future__ import annotations

import pytest
import torch

from reference_models import CONFIGS, make_inputs, max_abs, pair


@pytest.fixture(scope="module")
def models():
    cfg = CONFIGS["tiny"]
    hf, ours = pair(cfg, seed=3)
    return cfg, hf, ours


@torch.no_grad()
def test_patch_and_position_embedding_match(models):
    cfg, hf, ours = models
    pv = make_inputs(cfg, [1, 1])["pixel_values"]
    assert max_abs(hf.model.vision_tower.embeddings(pv), ours.vision.embed(pv)) == 0.0


@torch.no_grad()
def test_each_block_standalone_matches(models):
    cfg, hf, ours = models
    x = torch.randn(2, cfg.num_image_tokens, cfg.vision.hidden_size)
    for theirs, block in zip(hf.model.vision_tower.encoder.layers, ours.vision.blocks, strict=True):
        assert max_abs(theirs(x, None), block(x)) <= 1e-5


@torch.no_grad()
def test_tower_output_matches_last_hidden_state(models):
    cfg, hf, ours = models
    pv = make_inputs(cfg, [1, 1], seed=1)["pixel_values"]
    ref = hf.model.vision_tower(pv).last_hidden_state  # after post_layernorm, no pooling head
    assert max_abs(ref, ours.vision(pv)) <= 1e-5


@torch.no_grad()
def test_pixels_are_cast_to_the_weight_dtype(models):
    cfg, _, ours = models
    vision = ours.vision.to(torch.bfloat16)
    try:
        pv = make_inputs(cfg, [1], seed=2)["pixel_values"]  # float32, as the processor returns
        out = vision(pv)
        assert out.dtype == torch.bfloat16 and torch.equal(out, vision(pv.bfloat16()))
    finally:
        ours.vision.float()


@torch.no_grad()
def test_attention_scale_is_head_dim_and_blocks_see_all_patches(models):
    cfg, _, ours = models
    attn = ours.vision.blocks[0].attn
    assert attn.scale == cfg.vision.head_dim**-0.5
    # Bidirectional: the first patch's output depends on the last patch.
    x = torch.randn(1, cfg.num_image_tokens, cfg.vision.hidden_size)
    y = x.clone()
    y[0, -1] += 1.0
    assert max_abs(attn(x)[0, 0], attn(y)[0, 0]) > 1e-4
