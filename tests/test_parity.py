"""Unit tests of the parity pieces: probe table, capture, metrics, tolerances, generation logic, report writers."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgconv.errors import InputError
from pgconv.model.config import PRESETS
from pgconv.model.hf_config import to_hf_config
from pgconv.parity.capture import Recorder, primary
from pgconv.parity.generation import compare_steps, decisive_top1, first_divergence
from pgconv.parity.metrics import logit_metrics, segment_masks, segment_metrics, tensor_metrics, within_budget
from pgconv.parity.oracle import rope_fp64
from pgconv.parity.probes import PROBES, probes_for
from pgconv.parity.report import finalise
from pgconv.parity.tolerances import load_tolerances


# -- probe table ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_probe_names_modules_that_exist_on_both_sides(preset):
    """Checked on the meta device for all presets, so a renamed module in either model breaks this, not a 3B run."""
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    from pgconv.model.paligemma import PaliGemma

    cfg = PRESETS[preset]
    with torch.device("meta"):
        ours = dict(PaliGemma(cfg).named_modules())
        ref = dict(PaliGemmaForConditionalGeneration(HFConfig(**to_hf_config(cfg))).named_modules())
    from pgconv.parity.replay import OWN, OWN_PATHS

    assert set(OWN_PATHS) <= set(ours)
    for p in probes_for(cfg, "all"):
        if p.name == "logits":
            continue
        if p.ours_at == "call":
            assert p.ours in OWN, p
        else:
            assert p.ours.partition("@")[0] in ours, p
        assert p.ref.partition("@")[0] in ref, p


def test_probe_table_order_and_pg2_norms():
    pg1, pg2 = PRESETS["paligemma-3b-pt-224"], PRESETS["paligemma2-3b-pt-224"]
    names = [p.name for p in probes_for(pg1, "all")]
    # Execution order: vision, projector, merged embeddings, shared inputs, decoder, final norm, logits.
    assert names[:2] == ["vision.embed", "vision.blocks.0.norm1"] and names[-2:] == ["text.norm", "logits"]
    order = [names.index(n) for n in ("vision.blocks.26", "projector", "image_features", "text.embed", "text.blocks.0")]
    assert order == sorted(order)
    assert names.index("text.blocks.3.mlp") < names.index("text.blocks.3") < names.index("text.blocks.4.attn_norm")
    assert len(names) == 1 + 27 * 5 + 1 + 1 + 1 + 1 + 1 + 1 + 18 * 5 + 2
    pg2_names = [p.name for p in probes_for(pg2, "all")]
    assert "text.blocks.25.post_mlp_norm" in pg2_names and "text.mask.sliding" in pg2_names
    assert not any("post_attn_norm" in n or "sliding" in n for n in names)
    coarse = [p.name for p in probes_for(pg2, "coarse")]
    # embed, 27 vision blocks, norm, projector, image features, text.embed, rope, 2 masks, 26 decoder blocks, final
    # norm, logits
    assert len(coarse) == 1 + 27 + 1 + 1 + 1 + 1 + 1 + 2 + 26 + 1 + 1
    # The norm-name trap: Gemma's pre-MLP norm is post_attention_layernorm, Gemma 2's is pre_feedforward_layernorm.
    mlp_norm = {p.family: p.ref for p in PROBES if p.name.endswith(".mlp_norm")}
    assert mlp_norm["gemma"].endswith("post_attention_layernorm")
    assert mlp_norm["gemma2"].endswith("pre_feedforward_layernorm")


# -- capture -------------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, ctx, *, scale=1.0):
        return self.lin(x) * scale + ctx.bias


def test_recorder_keeps_first_call_inputs_outputs_and_removes_hooks():
    class Ctx:
        bias = torch.ones(4)

    block = _Block()
    x = torch.randn(2, 4)
    with Recorder(block, ["lin", "@ctx.bias", "@scale"]) as rec:
        y = block(x, Ctx(), scale=2.0)
        block(x * 0, Ctx(), scale=3.0)  # a second call is not recorded
    assert torch.equal(rec.get("lin", "output"), block.lin(x))
    assert torch.equal(rec.get("", "output"), y)
    assert torch.equal(rec.get("", "input"), x)
    assert torch.equal(rec.get("@ctx.bias"), Ctx.bias) and rec.get("@scale") == 2.0
    assert not block._forward_hooks and not block._forward_pre_hooks and not block.lin._forward_hooks
    with pytest.raises(KeyError, match="no module"):
        Recorder(block, ["nope"])


def test_primary_picks_the_main_tensor():
    t = torch.ones(1)
    assert primary((t, None)) is t and primary({"logits": t, "x": torch.zeros(1)}) is t and primary([None]) is None


# -- metrics -------------------------------------------------------------------------------------------------------


def test_tensor_metrics_known_values():
    ref = torch.tensor([1.0, -2.0, 2.0, 0.0])
    ours = ref + torch.tensor([0.0, 0.5, 0.0, 0.0])
    m = tensor_metrics(ours, ref)
    assert m["max_abs"] == 0.5 and m["mean_abs"] == 0.125
    assert m["rmse"] == pytest.approx(0.25) and m["nrmse"] == pytest.approx(0.25 / 1.5)
    assert m["nmax"] == pytest.approx(0.25)
    assert m["cosine"] == pytest.approx(float(F.cosine_similarity(ours.double(), ref.double(), 0)), rel=1e-12)
    assert tensor_metrics(torch.tensor([math.nan]), torch.tensor([1.0]))["nrmse"] == math.inf
    assert tensor_metrics(ref, ref)["nrmse"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        tensor_metrics(ref, ref[:2])


def test_streaming_metrics_do_not_depend_on_the_chunk_size(monkeypatch):
    import pgconv.parity.metrics as metrics

    torch.manual_seed(2)
    ref = torch.randn(1, 9, 50)
    ours = ref + 1e-3 * torch.randn(1, 9, 50)
    masks = segment_masks(torch.tensor([[7] * 4 + [1] * 5]), torch.tensor([[0] * 7 + [1] * 2]), image_token_id=7)
    whole = segment_metrics(ours, ref, masks)
    monkeypatch.setattr(metrics, "_CHUNK", 7)
    chunked = segment_metrics(ours, ref, masks)
    assert whole.keys() == chunked.keys() == {"all", "image", "prompt", "suffix"}
    for seg in whole:
        for key in whole[seg]:
            assert chunked[seg][key] == pytest.approx(whole[seg][key], rel=1e-9, abs=1e-15), (seg, key)


def test_segments_split_image_prompt_suffix():
    ids = torch.tensor([[9, 9, 2, 5, 7, 8]])
    tti = torch.tensor([[0, 0, 0, 0, 1, 1]])
    masks = segment_masks(ids, tti, image_token_id=9)
    assert [int(m.sum()) for m in masks.values()] == [2, 2, 2]
    ref = torch.randn(1, 6, 3)
    ours = ref.clone()
    ours[0, 5] += 1.0  # only a suffix position is off
    stats = segment_metrics(ours, ref, masks)
    assert stats["image"]["max_abs"] == stats["prompt"]["max_abs"] == 0.0
    assert stats["suffix"]["max_abs"] == pytest.approx(1.0, rel=1e-6)
    assert not within_budget(stats, {"nrmse": 0.1, "nmax": 0.1})
    assert within_budget(segment_metrics(ref, ref, masks), {"nrmse": 0.0, "nmax": 0.0})


def test_logit_metrics_against_definitions():
    torch.manual_seed(1)
    ref, ours = torch.randn(7, 50), torch.randn(7, 50)
    m = logit_metrics(ours, ref, chunk=3)  # chunking must not change anything
    p, q = ref.double().softmax(-1), ours.double().softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1)
    assert m["kl"] == pytest.approx(kl.tolist(), rel=1e-9)
    assert m["top1_agreement"] == pytest.approx(float((ref.argmax(-1) == ours.argmax(-1)).double().mean()))
    same = logit_metrics(ref, ref)
    assert same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0 and same["top5_overlap"] == 1.0


# -- generation logic ----------------------------------------------------------------------------------------------


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def _step(top: int, other: int, margin: float, v: int = 10) -> torch.Tensor:
    logits = torch.zeros(v)
    logits[top], logits[other] = 5.0 + margin, 5.0
    return logits


def test_near_tie_divergence_is_reported_not_failed():
    ref_steps = torch.stack([_step(3, 4, 2.0), _step(6, 7, 0.01)])
    tie = compare_steps([3, 6], ref_steps, [3, 7], torch.stack([_step(3, 4, 2.0), _step(7, 6, 0.01)]), 0.1, str)
    assert tie["first_divergence"]["step"] == 1 and tie["first_divergence"]["near_tie"] and tie["passed"]
    clear = compare_steps([3, 6], torch.stack([_step(3, 4, 2.0), _step(6, 7, 1.0)]), [3, 7],
                          torch.stack([_step(3, 4, 2.0), _step(7, 6, 1.0)]), 0.1, str)
    assert not clear["first_divergence"]["near_tie"] and not clear["passed"]
    assert clear["first_divergence"]["reference"]["top1_top2_margin"] == pytest.approx(1.0)


def test_decisive_top1_ignores_near_ties():
    ref = torch.stack([_step(1, 2, 0.01), _step(3, 4, 3.0)])
    ours = torch.stack([_step(2, 1, 0.01), _step(3, 4, 3.0)])
    d = decisive_top1(ours, ref, near_tie=0.1)
    assert d == {"decisive_positions": 1, "near_ties": 1, "decisive_top1_agreement": 1.0}


# -- oracle --------------------------------------------------------------------------------------------------------


def test_fp64_rope_matches_transformers_rotary():
    from transformers import PaliGemmaConfig as HFConfig
    from transformers.models.gemma.modeling_gemma import GemmaRotaryEmbedding

    cfg = HFConfig(**to_hf_config(PRESETS["tiny"])).text_config
    rotary = GemmaRotaryEmbedding(cfg)
    pos = torch.arange(1, 40)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    cos64, sin64 = rope_fp64(pos, cfg.head_dim, cfg.rope_parameters["rope_theta"])
    assert (cos - cos64).abs().max() < 1e-5 and (sin - sin64).abs().max() < 1e-5


# -- tolerances ----------------------------------------------------------------------------------------------------


def test_tolerance_table_has_every_kind_and_dtype_with_reasons():
    tol = load_tolerances()
    kinds = {p.kind for p in PROBES}
    assert kinds <= set(tol.table["probes"])
    for kind in kinds:
        assert tol.table["probes"][kind]["why"]
        for dtype in ("float32", "bfloat16", "float16"):
            b = tol.probe(kind, dtype)
            assert b["k"] >= 1.0 and b["nrmse"] >= 0 and b["floor"] >= 0
    # Looser as precision drops; the exact kinds stay exact everywhere.
    block = [tol.probe("text_block", d)["nrmse"] for d in ("float32", "float16", "bfloat16")]
    assert block == sorted(block) and len(set(block)) == 3
    assert all(tol.probe(k, d)["nmax"] == 0.0 for k in ("mask", "merged_embed") for d in ("float32", "bfloat16"))
    for section in ("logits", "generation"):
        assert tol.section(section, "bfloat16")["near_tie_nats"] > tol.section(section, "float32")["near_tie_nats"]


def test_tolerance_override_merges_and_validates(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"probes": {"text_block": {"bfloat16": {"nrmse": 0.5}}}}))
    tol = load_tolerances(path)
    assert tol.probe("text_block", "bfloat16")["nrmse"] == 0.5
    assert tol.probe("text_block", "bfloat16")["nmax"] == load_tolerances().probe("text_block", "bfloat16")["nmax"]
    with pytest.raises(InputError, match="not found"):
        load_tolerances(tmp_path / "missing.json")
    path.write_text(json.dumps({"probes": {"text_block": {"bfloat16": 3}}}))
    with pytest.raises(InputError, match="text_block.bfloat16 must be an object, got an integer"):
        load_tolerances(path)


# -- reports -------------------------------------------------------------------------------------------------------


def test_finalise_makes_strict_json():
    out = finalise({"a": math.inf, "b": [(-math.inf, math.nan)], "c": 1.5})
    assert out == {"a": "inf", "b": [["-inf", "nan"]], "c": 1.5}
    json.dumps(out, allow_nan=False)


def test_depth_plot_and_junit_from_a_synthetic_report():
    from pgconv.parity.report import junit
    from pgconv.parity.report_html import depth_plot

    rows = [{"name": f"text.blocks.{i}", "stack": "text", "passed": i != 2, "verdict": "match",
             "nrmse": 10.0 ** -(6 - i), "contributed_nrmse": 0.0 if i != 2 else "inf", "budget": {"nrmse": 1e-5}}
            for i in range(4)]
    svg = depth_plot(rows, "text")
    assert svg.startswith("<svg") and svg.count("<circle") >= 8 and 'stroke="#c00"' in svg
    ET.fromstring(svg)  # well-formed XML
    assert depth_plot(rows, "vision") == ""
    report = {"dtype": "float32", "timing": {"total": 1.0}, "weights": {"passed": True, "mismatched": []},
              "probes": [{**r, "contributed_nrmse": 0.0, "fp64": None} for r in rows],
              "logits": {"passed": True, "kl_max": 0.0},
              "generation": {"passed": False, "reference_text": "a", "candidate_text": "b", "first_divergence": None,
                             "teacher_forced": {"kl_mean": 0.0, "kl_max": 0.0, "top1_agreement": 1.0},
                             "cache": {"kl_max": 0.0, "max_abs": 0.0, "steps": 1, "passed": True}}}
    root = ET.fromstring(junit(report))
    assert root.get("tests") == "7" and root.get("failures") == "2"


def test_calibration_measures_real_noise_below_the_budgets():
    """The tolerance table's premise: two correct transformers runs differ (so budgets of 0 would false-alarm) by
    less than the fp32 budgets (so the budgets are not the noise itself)."""
    from pgconv.parity.calibrate import measure

    noise = measure(PRESETS["tiny"], torch.float32)
    tol = load_tolerances()
    block = noise["eager_vs_sdpa"]["text_block"]
    assert 0 < block["nrmse"] < tol.probe("text_block", "float32")["nrmse"] / 3
    assert 0 < noise["contributed"]["vision_block"]["nmax"] < tol.probe("vision_block", "float32")["nmax"] / 3
    assert noise["logits"]["eager_vs_sdpa"]["kl_max"] < tol.section("logits", "float32")["kl_max"]


def test_metrics_leave_float64_inputs_unchanged():
    """The row statistics work in float64: a float64 reference must not be modified in place (abs_ on it)."""
    from pgconv.parity.metrics import segment_metrics

    ref = -torch.rand(3, 5, 7, dtype=torch.float64)
    ours, before = ref + 1e-3, ref.clone()
    segment_metrics(ours, ref, None)
    assert torch.equal(ref, before)
