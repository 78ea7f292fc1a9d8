"""Conversion round trips, interop with transformers, sharding, casts, tied embeddings, manifest and --check."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PaliGemmaForConditionalGeneration

from convert_helpers import TORCH_DTYPES, hf_model, random_state, read_tensors, tiny_inputs, tree_digest, write_checkpoint
from pgconv.converter.convert import convert
from pgconv.converter.layouts import LAYOUTS
from pgconv.converter.manifest import check_output
from pgconv.converter.checkpoint import open_checkpoint
from pgconv.converter.plan import expected_shapes, plan_conversion
from pgconv.errors import InputError
from pgconv.model.config import PRESETS
from pgconv.model.hf_config import to_hf_config

LAYOUT_NAMES = list(LAYOUTS)


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


def _tiny_configs():
    def build(base, layers, text_layers, tie, kv):
        cfg = PRESETS[base]
        text = dataclasses.replace(cfg.text, num_layers=text_layers, num_kv_heads=kv,
                                   layer_types=cfg.text.layer_types and tuple(["sliding_attention", "full_attention"] * 2)[:text_layers])
        return cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=layers), text=text, tie_word_embeddings=tie)
    return st.builds(build, st.sampled_from(["tiny", "tiny-pg2"]), st.integers(1, 2), st.integers(1, 3), st.booleans(),
                     st.sampled_from([1, 2, 4]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(cfg=_tiny_configs(), src=st.sampled_from(LAYOUT_NAMES), dst=st.sampled_from(LAYOUT_NAMES),
       dtype=st.sampled_from(["F32", "BF16", "F16"]), shard=st.sampled_from(["5GB", "20KB", 3000, "60KB"]),
       shard_back=st.sampled_from(["5GB", "30KB"]))
def test_every_layout_pair_round_trips_bit_identically(tmp_path_factory, cfg, src, dst, dtype, shard, shard_back):
    base = tmp_path_factory.mktemp("rt")
    sd = random_state(cfg, src, dtype, seed=7)  # arbitrary bit patterns, NaN payloads included
    write_checkpoint(base / "a", cfg, sd, shard_size="40KB")
    convert(base / "a", base / "b", to=dst, shard_size=shard, quiet=True)
    mid = read_tensors(base / "b")
    assert {k: tuple(v.shape) for k, v in mid.items()} == expected_shapes(cfg, dst)
    convert(base / "b", base / "c", to=src, shard_size=shard_back, quiet=True, check=True)
    assert _bitwise_equal(read_tensors(base / "c"), sd)


@pytest.mark.parametrize("name", ["tiny", "tiny-pg2"])
@pytest.mark.parametrize("layout", ["hf-legacy", "hf-v5-save", "hf-5.6"])
@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_our_output_with_identical_logits(tmp_path, name, layout, tie):
    cfg = PRESETS[name].replace(tie_word_embeddings=tie)
    model = hf_model(cfg)
    model.save_pretrained(tmp_path / "src", max_shard_size="150KB")
    convert(tmp_path / "src", tmp_path / "native", to="native", quiet=True)
    convert(tmp_path / "native", tmp_path / "out", to=layout, quiet=True, check=True)
    loaded, info = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True,
                                                                     attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    inputs = tiny_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("shard", [None, "100KB"])
@pytest.mark.parametrize("name", ["tiny", "tiny-pg2"])
def test_transformers_saves_are_read_correctly(tmp_path, shard, name):
    """save_pretrained (fresh: hf-v5-save; re-saved after from_pretrained) converts to exactly its state dict."""
    cfg = PRESETS[name]
    model = hf_model(cfg)
    model.save_pretrained(tmp_path / "src", **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "src" / "model.safetensors.index.json").exists() == bool(shard)
    summary = convert(tmp_path / "src", tmp_path / "out", to="hf-5.6", quiet=True)
    assert summary.src_layout == "hf-v5-save"
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert _bitwise_equal(read_tensors(tmp_path / "out"), want)


def test_output_is_deterministic_and_source_untouched(tmp_path):
    cfg = PRESETS["tiny"]
    write_checkpoint(tmp_path / "src", cfg, random_state(cfg, "hf-legacy", "BF16"), shard_size="30KB",
                     extra_files={"tokenizer.json": "{}", "preprocessor_config.json": "{}"})
    before = tree_digest(tmp_path / "src")
    for out in ("x", "y"):
        convert(tmp_path / "src", tmp_path / out, to="native", shard_size="50KB", quiet=True)
    assert tree_digest(tmp_path / "x") == tree_digest(tmp_path / "y")
    assert tree_digest(tmp_path / "src") == before
    assert (tmp_path / "x" / "config.json").read_bytes() == (tmp_path / "src" / "config.json").read_bytes()
    assert {"tokenizer.json", "preprocessor_config.json", "pgconv-manifest.json"} <= set(tree_digest(tmp_path / "x"))


def test_sharding_and_index(tmp_path):
    cfg = PRESETS["tiny"]
    sd = random_state(cfg, "hf-legacy", "F32")
    write_checkpoint(tmp_path / "src", cfg, sd)
    limit = 100_000
    summary = convert(tmp_path / "src", tmp_path / "out", to="hf-legacy", shard_size="100KB", quiet=True)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    n = len(summary.files)
    assert summary.files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] and n > 1
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(summary.files)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    embed = "language_model.model.embed_tokens.weight"
    for f in summary.files:
        names = [k for k, v in index["weight_map"].items() if v == f]
        size = sum(sd[k].numel() * sd[k].element_size() for k in names)
        assert size <= limit or names == [embed]  # only an oversize tensor may exceed the limit, alone
    single = convert(tmp_path / "src", tmp_path / "one", to="hf-legacy", quiet=True)
    assert single.files == ["model.safetensors"] and not (tmp_path / "one" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("src_dtype, dst_dtype", [("F32", "bfloat16"), ("F32", "float16"), ("BF16", "float32"),
                                                  ("BF16", "float16"), ("F16", "bfloat16")])
def test_casts_match_torch_and_report_loss(tmp_path, src_dtype, dst_dtype):
    cfg = PRESETS["tiny"]
    sd = random_state(cfg, "hf-legacy", src_dtype, bits=False)
    big = "language_model.model.norm.weight"
    sd[big] = sd[big].float().mul(1e5).to(TORCH_DTYPES[src_dtype]) if src_dtype != "F16" else sd[big]
    write_checkpoint(tmp_path / "src", cfg, sd, shard_size="60KB", dtype={"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[src_dtype])
    summary = convert(tmp_path / "src", tmp_path / "out", to="hf-legacy", dtype=dst_dtype, quiet=True, check=True)
    target = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dst_dtype]
    out = read_tensors(tmp_path / "out")
    assert _bitwise_equal(out, {k: v.to(target) for k, v in sd.items()})
    manifest = json.loads((tmp_path / "out" / "pgconv-manifest.json").read_text())
    rows = {t["name"]: t for t in manifest["tensors"]}
    for k, v in sd.items():
        exact = torch.equal(out[k].double(), v.double())
        if (src_dtype, dst_dtype) in {("BF16", "float32")}:
            assert "max_abs_diff" not in rows[k] and exact  # widening: nothing to measure
            continue
        finite = torch.isfinite(out[k].double())
        delta = float((out[k].double() - v.double())[finite].abs().max())
        assert rows[k]["max_abs_diff"] == pytest.approx(delta, rel=1e-6)
        assert rows[k]["fp16_overflow"] == (int((~finite).sum()) if dst_dtype == "float16" else 0)
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_out["dtype"] == dst_dtype
    if dst_dtype == "float16" and src_dtype != "F16":
        assert rows[big]["fp16_overflow"] > 0 and "float16 overflow" in str(summary)
    if (src_dtype, dst_dtype) != ("BF16", "float32"):
        assert summary.lossy and "lossy cast" in str(summary)


def _tied_source(tmp_path, head_equal: bool):
    cfg = PRESETS["tiny"]
    sd = random_state(cfg, "hf-legacy", "F32")
    embed = sd["language_model.model.embed_tokens.weight"]
    sd["language_model.lm_head.weight"] = embed.clone() if head_equal else torch.randn_like(embed)
    return cfg, sd, write_checkpoint(tmp_path / "src", cfg, sd)


def test_tied_head_identical_is_dropped(tmp_path):
    cfg, sd, src = _tied_source(tmp_path, head_equal=True)
    summary = convert(src, tmp_path / "out", to="hf-v5-save", quiet=True, check=True)
    assert summary.dropped == ["language_model.lm_head.weight"]
    assert "language_model.lm_head.weight" not in read_tensors(tmp_path / "out")


def test_tied_head_differing_is_an_error_unless_untie(tmp_path):
    cfg, sd, src = _tied_source(tmp_path, head_equal=False)
    with pytest.raises(InputError, match="--untie"):
        convert(src, tmp_path / "out", to="hf-legacy", quiet=True)
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "out", to="hf-5.6", untie=True, quiet=True, check=True)
    out = read_tensors(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], sd["language_model.lm_head.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded, info = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and torch.equal(loaded.lm_head.weight, sd["language_model.lm_head.weight"])


def test_untie_without_stored_head_copies_the_embedding(tmp_path):
    cfg = PRESETS["tiny-pg2"]
    sd = random_state(cfg, "hf-legacy", "BF16")
    write_checkpoint(tmp_path / "src", cfg, sd)
    convert(tmp_path / "src", tmp_path / "out", to="native", untie=True, quiet=True, check=True)
    out = read_tensors(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"].view(torch.int16), out["text.embed.weight"].view(torch.int16))


def test_manifest_hashes_and_check_catches_corruption(tmp_path):
    cfg = PRESETS["tiny"]
    write_checkpoint(tmp_path / "src", cfg, random_state(cfg, "hf-v5-save", "F16"))
    summary = convert(tmp_path / "src", tmp_path / "out", to="hf-legacy", quiet=True, check=True)
    assert "bit for bit" in summary.check
    manifest = json.loads((tmp_path / "out" / "pgconv-manifest.json").read_text())
    assert (manifest["source_layout"], manifest["target_layout"], manifest["tool"]) == ("hf-v5-save", "hf-legacy", "pgconv")
    out = read_tensors(tmp_path / "out")
    for row in manifest["tensors"]:
        t = out[row["name"]]
        assert row["sha256"] == hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        assert row["bytes"] == t.numel() * 2 and row["sources"][0]["dtype"] == "F16"
    src = open_checkpoint(tmp_path / "src")
    plan = plan_conversion(src.metas(), src.pg_config(), "hf-legacy")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "out", bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-3] ^= 0x01  # flip one bit of the last tensor
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="sha256 differs"):
        check_output(bad, src, plan)


def test_bin_source_converts(tmp_path):
    cfg = PRESETS["tiny"]
    sd = random_state(cfg, "hf-legacy", "BF16")
    (tmp_path / "src").mkdir()
    torch.save(sd, tmp_path / "src" / "pytorch_model.bin")
    (tmp_path / "src" / "config.json").write_text(json.dumps(to_hf_config(cfg, "bfloat16")))
    convert(tmp_path / "src", tmp_path / "out", to="hf-legacy", quiet=True, check=True)
    assert _bitwise_equal(read_tensors(tmp_path / "out"), sd)


@pytest.mark.parametrize("layout", ["hf-v5-save", "native"])
def test_source_without_config_json_takes_config_or_the_matching_preset(tmp_path, layout):
    """No config.json: read through the layout's spec with --config, or the one preset the shapes match; the output
    gets the preset's config.json and the tensors bit for bit. --config next to a config.json is refused."""
    cfg = PRESETS["tiny-pg2"]
    sd = random_state(cfg, layout, "F32")
    write_checkpoint(tmp_path / "src", cfg, sd, extra_files={"tokenizer.json": "{}"})
    (tmp_path / "src" / "config.json").unlink()
    for name, kwargs in (("inferred", {}), ("given", {"config": "tiny-pg2"})):
        summary = convert(tmp_path / "src", tmp_path / name, to=layout, quiet=True, check=True, **kwargs)
        assert summary.check and "bit for bit" in summary.check
        assert _bitwise_equal(read_tensors(tmp_path / name), sd)
        written = json.loads((tmp_path / name / "config.json").read_text())
        assert written["text_config"]["num_hidden_layers"] == cfg.text.num_layers
        assert (tmp_path / name / "tokenizer.json").is_file()
    with pytest.raises(InputError, match="does not match spec"):  # a preset whose shapes differ (Gemma vs Gemma 2)
        convert(tmp_path / "src", tmp_path / "wrong", to=layout, quiet=True, config="tiny")
    assert not (tmp_path / "wrong").exists()
    with pytest.raises(InputError, match="config.json exists; --config is only for sources without one"):
        convert(tmp_path / "given", tmp_path / "again", to="hf-legacy", quiet=True, config="tiny-pg2")
