"""Test helpers: a randomised transformers PaliGemma (eager) and our model loaded from its weights, plus inputs.

Every parameter of the reference is randomised (norm weights too, so a missing `1 +` or a swapped norm shows), then
converted with the real key map (`converter.layouts.to_native`, layout hf-5.6) and loaded strictly into ours.
Inputs are built by hand as the processor lays them out: `<image>` x N, `<bos>`, prompt, `\\n` (id 108), optional
suffix (token_type_ids 1); batches are left-padded like transformers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from pgconv.converter.layouts import to_native
from pgconv.model.config import PRESETS, PaliGemmaConfig
from pgconv.model.hf_config import to_hf_config
from pgconv.model.paligemma import PaliGemma

NEWLINE = 108  # "\n" in the Gemma vocabulary; a plain base piece in the tiny vocabulary too


def variant(name: str, **text_changes) -> PaliGemmaConfig:
    cfg = PRESETS[name]
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text_changes)) if text_changes else cfg


# The tiny configurations the tests run on (hidden 72 has no exact sqrt; head_dim 24 != 72/4; eps 1e-5, theta 5000).
CONFIGS: dict[str, PaliGemmaConfig] = {
    "tiny": variant("tiny"),
    "tiny-mqa": variant("tiny", num_kv_heads=1),
    "tiny-pg2": variant("tiny-pg2"),  # query_pre_attn_scalar 32 != head_dim 24, sliding window 8, 2 kv heads
    "tiny-pg2-kv4": variant("tiny-pg2", num_kv_heads=4),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter of a transformers PaliGemma, scaled so that greedy decoding of the random
    model does not just repeat one token (the branches outweigh the tied-embedding echo of the input token)."""
    g = torch.Generator().manual_seed(seed)
    gemma2 = model.config.text_config.model_type == "gemma2"
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "layernorm" in name or "layer_norm" in name or name.endswith("norm.weight"):
            if "language_model" in name:  # Gemma RMSNorm: zero-centred (1 + w)
                post = gemma2 and ("post_attention" in name or "post_feedforward" in name)
                p.copy_(0.3 * r + (1.0 if post else 0.0))
            elif name.endswith("weight"):  # SigLIP LayerNorm
                p.copy_(1.0 + 0.2 * r)
            else:
                p.copy_(0.1 * r)
        elif name.endswith("bias"):
            p.copy_(0.05 * r)
        elif "embed_tokens" in name:
            p.copy_(0.5 * r / p.shape[-1] ** 0.5)  # x sqrt(hidden) at lookup -> scale 0.5
        else:
            branch_out = name.endswith(("o_proj.weight", "down_proj.weight"))
            p.copy_(r * ((4.5 if branch_out else 1.5) / p[0].numel() ** 0.5))


def _build_hf(cfg: PaliGemmaConfig, dtype: torch.dtype):
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    hf_cfg = HFConfig(**to_hf_config(cfg, dtype=str(dtype).removeprefix("torch.")))
    hf = PaliGemmaForConditionalGeneration._from_config(hf_cfg, attn_implementation="eager", dtype=dtype)
    assert hf.config.text_config._attn_implementation == "eager"
    assert hf.config.vision_config._attn_implementation == "eager"
    return hf.eval()


def hf_model(cfg: PaliGemmaConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomised transformers model in `dtype`.

    Low precision models are built in that dtype (as `from_pretrained(dtype=...)` does), not `.to(dtype)`-ed:
    `.to` would also cast transformers' RoPE `inv_freq` buffer to bf16, which a loaded model keeps in fp32.
    """
    hf = _build_hf(cfg, torch.float32)
    randomize_(hf, seed)
    if dtype != torch.float32:
        low = _build_hf(cfg, dtype)
        low.load_state_dict(hf.state_dict(), strict=True)
        hf = low
    return hf


def ours_from(hf, cfg: PaliGemmaConfig) -> PaliGemma:
    model = PaliGemma(cfg)
    model.load_state_dict(to_native(hf.state_dict(), cfg, "hf-5.6"), strict=True)
    return model.eval()


def pair(cfg: PaliGemmaConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    hf = hf_model(cfg, seed, dtype)
    return hf, ours_from(hf, cfg).to(dtype)


def make_inputs(
    cfg: PaliGemmaConfig,
    prompt_lens: list[int],
    suffix_len: int = 0,
    seed: int = 0,
    images: int = 1,
) -> dict[str, Tensor]:
    """Left-padded batch: input_ids, token_type_ids, attention_mask (B, L) and pixel_values (B * images, 3, H, W);
    with several `images` per row, one block of image tokens per image (transformers' nlvr2 layout)."""
    g = torch.Generator().manual_seed(seed)
    n, base = cfg.num_image_tokens, 512 if cfg.text.vocab_size < 4096 else 256000
    rows = []
    for plen in prompt_lens:
        prompt = torch.randint(4, base, (plen,), generator=g).tolist()
        suffix = torch.randint(4, base, (suffix_len,), generator=g).tolist()
        ids = [cfg.image_token_index] * n * images + [cfg.bos_token_id] + prompt + [NEWLINE]
        rows.append((ids + suffix, [0] * len(ids) + [1] * len(suffix)))
    width = max(len(ids) for ids, _ in rows)
    pad = [width - len(ids) for ids, _ in rows]
    input_ids = torch.tensor([[cfg.pad_token_id] * p + ids for p, (ids, _) in zip(pad, rows)])
    token_type_ids = torch.tensor([[0] * p + tti for p, (_, tti) in zip(pad, rows)])
    attention_mask = torch.tensor([[0] * p + [1] * len(ids) for p, (ids, _) in zip(pad, rows)])
    v = cfg.vision
    pixel_values = torch.rand((len(rows) * images, v.num_channels, v.image_size, v.image_size), generator=g) * 2 - 1
    return {
        "input_ids": input_ids,
        "pixel_values": pixel_values,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
    }


def max_abs(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
