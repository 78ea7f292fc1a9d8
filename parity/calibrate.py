"""Measure the noise floor the tolerance table is calibrated on: transformers against itself.

Two runs of the *same* reference model that are mathematically identical but round differently:
- `eager_vs_sdpa`: eager attention against SDPA (a different attention kernel, end to end);
- `batched_vs_single`: the sample alone against the same sample as row 0 of a batch of 2 (different GEMM blocking);
- `contributed`: each module of the SDPA run fed the eager run's captured input (per-layer noise, teacher forced).
For every probe kind the worst `nrmse` / `nmax` over probes, configs and modes is reported, per dtype, plus the
logits' KL / top-1 noise. Configs: the tiny presets and two "wide" ones with real hub widths (2 layers each) so the
reduction lengths that drive rounding (hidden 2048/2304, head dim 256, MLP 16384/9216, 256 patches) are covered.

    python -m pgconv.parity.calibrate [CONFIG ...] [DTYPE ...]   # prints JSON; numbers go into tolerances.json
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from pgconv.model.config import PRESETS, PaliGemmaConfig, VisionConfig
from pgconv.model.hf_config import to_hf_config
from pgconv.parity.capture import Recorder, primary
from pgconv.parity.metrics import logit_metrics, segment_masks, segment_metrics
from pgconv.parity.probes import probes_for

__all__ = ["CONFIGS", "randomize_", "build_reference", "sample_inputs", "measure", "main"]


def _wide(family: str) -> PaliGemmaConfig:
    base = PRESETS["paligemma-3b-pt-224" if family == "gemma" else "paligemma2-3b-pt-224"]
    vision = dataclasses.replace(VisionConfig(), num_layers=2)
    text = dataclasses.replace(base.text, num_layers=2, vocab_size=1728,
                               layer_types=base.text.layer_types[:2] if base.text.layer_types else ())
    return dataclasses.replace(base, vision=vision, text=text, image_token_index=1664)


CONFIGS: dict[str, PaliGemmaConfig] = {
    "tiny": PRESETS["tiny"], "tiny-pg2": PRESETS["tiny-pg2"], "wide-pg1": _wide("gemma"), "wide-pg2": _wide("gemma2"),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Trained-like scales: unit-variance activations, norm gains spread around 1 (Gemma stores w, scales by 1+w)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "norm" in name and name.endswith("weight"):
            p.copy_(0.3 * r if "language_model" in name else 1.0 + 0.2 * r)
        elif name.endswith("bias"):
            p.copy_(0.05 * r)
        elif "embed_tokens" in name:
            p.copy_(r / p.shape[-1] ** 0.5)
        else:
            p.copy_(r * (1.5 / p[0].numel() ** 0.5))


def build_reference(cfg: PaliGemmaConfig, dtype: torch.dtype, seed: int = 0):
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    def build(dt: torch.dtype):
        hf_cfg = HFConfig(**to_hf_config(cfg, dtype=str(dt).removeprefix("torch.")))
        return PaliGemmaForConditionalGeneration._from_config(hf_cfg, attn_implementation="eager", dtype=dt).eval()

    model = build(torch.float32)
    randomize_(model, seed)
    if dtype != torch.float32:  # built in dtype like from_pretrained (keeps RoPE inv_freq in fp32), then loaded
        low = build(dtype)
        low.load_state_dict(model.state_dict())
        model = low
    return model


def sample_inputs(cfg: PaliGemmaConfig, batch: int, seed: int = 0, prompt: int = 8, suffix: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = cfg.num_image_tokens
    ids = torch.randint(4, 500, (batch, prompt + suffix + 2), generator=g)
    ids[:, 0], ids[:, prompt + 1] = cfg.bos_token_id, 108
    ids = torch.cat([torch.full((batch, n), cfg.image_token_index), ids], 1)
    tti = torch.zeros_like(ids)
    tti[:, -suffix:] = 1
    v = cfg.vision
    px = torch.rand((batch, v.num_channels, v.image_size, v.image_size), generator=g) * 2 - 1
    return {"input_ids": ids, "pixel_values": px, "token_type_ids": tti, "attention_mask": torch.ones_like(ids)}


def _run(model, inputs: dict, paths: list[str]):
    with Recorder(model, paths) as rec, torch.no_grad():
        out = model(**inputs, use_cache=False)
    return rec, out.logits


def _logit_noise(other: torch.Tensor, ref: torch.Tensor) -> dict:
    """KL / top-1 noise, and the largest reference top-1/top-2 margin (nats) at which top-1 still flipped."""
    m = logit_metrics(other, ref)
    out = {k: m[k] for k in ("kl_mean", "kl_max", "top1_agreement", "max_prob_diff")}
    lr = torch.log_softmax(ref.double().reshape(-1, ref.shape[-1]), -1)
    top2 = lr.topk(2, -1).values
    flipped = other.reshape(-1, other.shape[-1]).argmax(-1) != lr.argmax(-1)
    out["max_flip_margin"] = float((top2[:, 0] - top2[:, 1])[flipped].max()) if bool(flipped.any()) else 0.0
    return out


def _worst(acc: dict, key: str, stats: dict) -> None:
    cur = acc.setdefault(key, {"nrmse": 0.0, "nmax": 0.0})
    for seg in stats.values():
        cur["nrmse"], cur["nmax"] = max(cur["nrmse"], seg["nrmse"]), max(cur["nmax"], seg["nmax"])


def measure(cfg: PaliGemmaConfig, dtype: torch.dtype) -> dict:
    """Worst noise per probe kind and mode for one config and dtype."""
    model = build_reference(cfg, dtype)
    threads = torch.get_num_threads()
    probes = [p for p in probes_for(cfg, "all") if p.oracle in ("module", "merge") and p.ref]
    paths = sorted({p.ref for p in probes})
    inputs = sample_inputs(cfg, 2)
    single = {k: v[:1] for k, v in inputs.items()}
    masks = segment_masks(single["input_ids"], single["token_type_ids"], cfg.image_token_index)
    eager, logits_e = _run(model, single, paths)
    batched, logits_b = _run(model, inputs, paths)
    # transformers 5.24 has no SDPA for Gemma 2 (softcapping, trap 6): PG2 switches only its vision tower.
    _set_attention(model, cfg, "sdpa")
    sdpa, logits_s = _run(model, single, paths)
    out: dict = {"eager_vs_sdpa": {}, "batched_vs_single": {}, "contributed": {}, "logits": {}}
    for p in probes:
        ref = eager.get(p.ref, p.ref_at)
        seg = masks if ref.shape[:2] == masks["image"].shape else None
        _worst(out["eager_vs_sdpa"], p.kind, segment_metrics(sdpa.get(p.ref, p.ref_at), ref, seg))
        _worst(out["batched_vs_single"], p.kind, segment_metrics(batched.get(p.ref, p.ref_at)[:1], ref, seg))
        if p.ref_at == "output":  # teacher forcing: the sdpa module on the eager run's input
            call = eager.call(p.ref)
            module = model.get_submodule(p.ref)
            with torch.no_grad():
                tf = primary(module(*call.args, **call.kwargs))
            _worst(out["contributed"], p.kind, segment_metrics(tf, ref, seg))
    for name, other in (("eager_vs_sdpa", logits_s), ("batched_vs_single", logits_b[:1])):
        out["logits"][name] = _logit_noise(other, logits_e)
        _worst(out[name], "logits", segment_metrics(other, logits_e, masks))
    _set_attention(model, cfg, "eager")
    torch.set_num_threads(1)  # a different split of every reduction across threads
    one, logits_1 = _run(model, single, paths)
    torch.set_num_threads(threads)
    out["threads_1_vs_n"] = {}
    for p in probes:
        ref = eager.get(p.ref, p.ref_at)
        seg = masks if ref.shape[:2] == masks["image"].shape else None
        _worst(out["threads_1_vs_n"], p.kind, segment_metrics(one.get(p.ref, p.ref_at), ref, seg))
    out["logits"]["threads_1_vs_n"] = _logit_noise(logits_1, logits_e)
    _worst(out["threads_1_vs_n"], "logits", segment_metrics(logits_1, logits_e, masks))
    return out


def _set_attention(model, cfg: PaliGemmaConfig, impl: str) -> None:
    if cfg.family == "gemma":
        model.set_attn_implementation(impl)
    else:
        model.set_attn_implementation({"vision_config": impl, "text_config": "eager"})


def main(argv: list[str] | None = None) -> None:
    """Arguments: config names (default: all) and optionally dtypes (float32 / bfloat16 / float16; default: all)."""
    args = argv if argv is not None else sys.argv[1:]
    names = [a for a in args if a in CONFIGS] or list(CONFIGS)
    dtypes = [getattr(torch, a) for a in args if a in ("float32", "bfloat16", "float16")] or [
        torch.float32, torch.bfloat16, torch.float16]
    result: dict = {}
    for dtype in dtypes:
        for name in names:
            key = f"{name}/{str(dtype).removeprefix('torch.')}"
            result[key] = measure(CONFIGS[name], dtype)
            print(key, json.dumps(result[key]), file=sys.stderr, flush=True)
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
