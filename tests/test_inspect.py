"""`pgconv inspect`: layout, preset, histogram, tie status, problems against the config, NaN/Inf scan, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_helpers import hf_model, random_state, write_checkpoint
from pgconv.cli import main
from pgconv.converter.inspect import inspect, matching_presets
from pgconv.converter.plan import expected_shapes
from pgconv.model.config import PRESETS


def test_report_on_a_transformers_save(tmp_path):
    cfg = PRESETS["tiny-pg2"]
    hf_model(cfg).save_pretrained(tmp_path / "ck", max_shard_size="100KB")
    r = inspect(tmp_path / "ck", scan=True)
    n = len(expected_shapes(cfg, "hf-v5-save"))
    assert (r.layout, r.presets, r.config, r.tensors, r.format) == ("hf-v5-save", ["tiny-pg2"], "ok", n, "safetensors")
    assert r.dtypes == {"F32": n} and r.total_bytes == sum(4 * torch.Size(s).numel() for s in expected_shapes(cfg, "hf-v5-save").values())
    assert r.tied.startswith("tied (lm_head not stored") and not r.problems and r.nonfinite == {}
    assert len(r.files) > 1 and "preset: tiny-pg2" in str(r)


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("tiny")] + ["tiny"])
def test_presets_are_recognised_from_shapes(name):
    for layout in ("hf-legacy", "native"):
        assert matching_presets(expected_shapes(PRESETS[name], layout), layout) == [name]


def test_problems_are_listed(tmp_path, capsys):
    cfg = PRESETS["tiny"]
    write_checkpoint(tmp_path / "ck", cfg, random_state(cfg, "hf-legacy", "BF16", bits=False), dtype="bfloat16")
    sd = load_file(tmp_path / "ck" / "model.safetensors")
    sd.pop("language_model.model.norm.weight")
    sd["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(31, dtype=torch.bfloat16)
    sd["language_model.model.layers.0.mlp.up_proj.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    sd["extra.thing"] = torch.zeros(2, dtype=torch.bfloat16)
    sd["language_model.lm_head.weight"] = torch.ones(1728, 72, dtype=torch.bfloat16)
    save_file(sd, tmp_path / "ck" / "model.safetensors")
    r = inspect(tmp_path / "ck", scan=True)
    assert r.missing == ["language_model.model.norm.weight"] and r.unexpected == ["extra.thing"]
    assert r.misshaped == [{"name": "vision_tower.vision_model.post_layernorm.bias", "shape": [31], "expected": [32]}]
    assert r.nonfinite == {"language_model.model.layers.0.mlp.up_proj.weight": {"nan": 1, "inf": 2}}
    assert "differs" in r.tied and r.presets == []
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "ck"), "--json", "--scan"])
    report = json.loads(capsys.readouterr().out)
    assert e.value.code == 1 and len(report["problems"]) == 5


def test_untied_and_unknown_layout(tmp_path, capsys):
    cfg = PRESETS["tiny"].replace(tie_word_embeddings=False)
    write_checkpoint(tmp_path / "ck", cfg, random_state(cfg, "hf-5.6", "F16"))
    r = inspect(tmp_path / "ck")
    assert r.layout == "hf-5.6" and r.tied.startswith("untied (lm_head stored") and r.nonfinite is None
    save_file({"foo": torch.zeros(2)}, tmp_path / "x.safetensors")
    r = inspect(tmp_path / "x.safetensors")
    assert r.layout is None and r.problems and r.config == "absent"
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "nope")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("pgconv: error:")


@pytest.mark.parametrize("preset", ["tiny", "tiny-pg2"])
def test_big_vision_npz_is_described_through_its_spec(tmp_path, capsys, preset):
    """A .npz written from big_vision's own module tree (test_big_vision's independent builder) is read through the
    big-vision spec: preset recognised, native tensor count, tie status, a NaN found by --scan."""
    import numpy as np

    from test_big_vision import big_vision_tree, save_tree
    from test_big_vision import hf_model as bv_model

    cfg, m = bv_model(preset, torch.float32)
    tree = big_vision_tree(m, cfg)
    src = save_tree(tmp_path / "pt.npz", tree)
    r = inspect(src, scan=True)
    n = len(expected_shapes(cfg, "native", with_lm_head=False))
    assert (r.layout, r.presets, r.tensors, r.dtypes) == ("big-vision", [preset], n, {"F32": n})
    assert r.format == "npz read through spec big-vision" and r.config.startswith("absent (preset inferred")
    assert r.tied.startswith("tied") and r.problems == [] and r.nonfinite == {}
    key = "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"
    tree[key] = np.array(tree[key])
    tree[key].flat[:2] = [np.nan, np.inf]
    save_tree(tmp_path / "bad.npz", tree)
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "bad.npz"), "--scan", "--json", "--config", preset])
    report = json.loads(capsys.readouterr().out)
    assert e.value.code == 1 and report["config"] == f"ok (--config {preset})"
    assert sum(v["nan"] for v in report["nonfinite"].values()) == 1
    assert sum(v["inf"] for v in report["nonfinite"].values()) == 1


def test_config_option_is_only_for_spec_sources(tmp_path, capsys):
    cfg = PRESETS["tiny"]
    write_checkpoint(tmp_path / "ck", cfg, random_state(cfg, "hf-legacy", "BF16", bits=False), dtype="bfloat16")
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "ck"), "--config", "tiny"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--config" in err


def test_checkpoint_without_config_is_a_problem_unless_config_is_given(tmp_path, capsys):
    cfg = PRESETS["tiny"]
    write_checkpoint(tmp_path / "ck", cfg, random_state(cfg, "hf-legacy", "F32", bits=False))
    (tmp_path / "ck" / "config.json").unlink()
    r = inspect(tmp_path / "ck")
    assert r.config == "absent" and r.presets == ["tiny"]
    assert any("config.json: missing" in p for p in r.problems)
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "ck")])
    assert e.value.code == 1
    given = inspect(tmp_path / "ck", config="tiny")
    assert given.config == "ok (--config tiny)" and not given.problems
    wrong = inspect(tmp_path / "ck", config="tiny-pg2")  # checked against the config named: its shapes differ
    assert wrong.misshaped or wrong.missing or wrong.unexpected


def test_spec_output_read_as_a_layout_is_a_problem(tmp_path):
    """A file a spec wrote with offsets looks like its layout by name; read as that layout an offset is skipped."""
    import dataclasses

    from pgconv.converter.spec import Spec, dumps, layout_spec
    from pgconv.converter.spec_ops import OpSpec
    from pgconv.converter.spec_write import convert_to_spec

    cfg = PRESETS["tiny"]
    write_checkpoint(tmp_path / "src", cfg, random_state(cfg, "hf-legacy", "F32", bits=False))
    rules = tuple(dataclasses.replace(r, ops=(OpSpec("add", 1.0),)) if r.native[0].endswith("attn_norm.weight") else r
                  for r in layout_spec("hf-legacy").rules)
    (tmp_path / "plus-one.toml").write_text(dumps(Spec("plus-one", rules)))
    convert_to_spec(tmp_path / "src", tmp_path / "out", tmp_path / "plus-one.toml", quiet=True)
    r = inspect(tmp_path / "out")
    assert r.layout == "hf-legacy" and any("written by pgconv as format 'plus-one'" in p for p in r.problems)
    assert not inspect(tmp_path / "out", from_=tmp_path / "plus-one.toml").problems
