"""Fixture checkpoints: transformers loads them with no missing/unexpected keys, the tokenizer agrees with
transformers' tokenizer classes, writes are deterministic and atomic, and the full-size plan matches the hub layout."""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from pgconv.converter import fixture as fx
from pgconv.converter.layouts import key_map, native_shapes
from pgconv.converter.tokenizer_fixture import build_tokenizer
from pgconv.errors import InputError
from pgconv.model.config import PRESETS

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    return {preset: fx.make_fixture(root / preset, preset) for preset in fx.TINY_PRESETS}


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("preset", fx.TINY_PRESETS)
def test_transformers_loads_fixture_strictly(fixtures, preset):
    model, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        fixtures[preset], output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.float32
    # Values really come from the file (transformers would silently re-initialise a missing tensor).
    with safe_open(fixtures[preset] / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        name = "language_model.model.embed_tokens.weight"
        assert torch.equal(model.get_input_embeddings().weight, f.get_tensor(name))


def test_files_and_config(fixtures):
    d = fixtures["tiny"]
    assert sorted(p.name for p in d.iterdir()) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    from pgconv.model.hf_config import from_hf_config

    assert from_hf_config(json.loads((d / "config.json").read_text())) == PRESETS["tiny"]
    assert json.loads((d / "preprocessor_config.json").read_text())["image_seq_length"] == 16
    assert not any(p.name.startswith(".") for p in d.parent.iterdir())  # no temporary directories left behind


def test_deterministic_and_seeded(tmp_path, fixtures):
    again = fx.make_fixture(tmp_path / "again", "tiny")
    assert _digests(again) == _digests(fixtures["tiny"])
    other = fx.make_fixture(tmp_path / "seed1", "tiny", seed=1)
    a, b = _digests(other), _digests(fixtures["tiny"])
    assert a["model.safetensors"] != b["model.safetensors"] and a["tokenizer.json"] == b["tokenizer.json"]


def test_values_do_not_depend_on_chunking(tmp_path, monkeypatch, fixtures):
    # Full-size tensors are streamed in many chunks; tiny ones fit in one. Both must draw the same stream.
    monkeypatch.setattr(fx, "_CHUNK", 12)
    chunked = fx.make_fixture(tmp_path / "chunked", "tiny")
    assert _digests(chunked) == _digests(fixtures["tiny"])


def test_init_scales(fixtures):
    with safe_open(fixtures["tiny"] / "model.safetensors", "pt") as f:
        names = {fx.key_map(PRESETS["tiny"], "hf-legacy")[n]: n for n in native_shapes(PRESETS["tiny"])}
        for name in f.keys():
            t = f.get_tensor(name)
            mean, std = fx._init(names[name], tuple(t.shape))
            assert torch.isfinite(t).all() and t.unique().numel() > min(0.5 * t.numel(), 1000), name
            if t.numel() >= 2000:  # sample statistics are only meaningful for larger tensors
                assert abs(t.mean().item() - mean) < 0.1 * std + 1e-3, name
                assert abs(t.std().item() / std - 1) < 0.1, name


def test_tiny_model_output_is_varied_and_well_separated(fixtures):
    """Greedy decoding depends on the prompt and is not one repeated token (the scales in INIT are for this)."""
    from PIL import Image

    d = fixtures["tiny"]
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(d, attn_implementation="eager")
    proc = transformers.PaliGemmaProcessor.from_pretrained(d)
    image = Image.open(fx.default_image())
    outputs, gaps = [], []
    for prompt in ["caption en", "answer en where is the cow standing?", "detect cat", ""]:
        inputs = proc(images=image, text=prompt, return_tensors="pt")
        inputs.pop("labels")
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        outputs.append(tuple(out.sequences[0, inputs["input_ids"].shape[1]:].tolist()))
        gaps += [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    assert len(set(outputs)) == len(outputs)
    assert all(len(set(o)) >= 3 for o in outputs), outputs
    assert np.median(gaps) > 0.5 and min(gaps) > 1e-3  # far above fp32 noise: greedy parity is meaningful


# -- tokenizer ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", fx.TINY_PRESETS)
def test_transformers_tokenizer_matches_tokenizers(fixtures, preset):
    d = fixtures[preset]
    auto = transformers.AutoTokenizer.from_pretrained(d)
    assert type(auto).__name__ == "GemmaTokenizer"  # rebuilds the pipeline from vocab + merges (5.x)
    bos = [2] if preset == "tiny" else []  # hub: PG1 tokenizers add <bos>, PG2 ones do not (trap 14)
    assert auto("caption en")["input_ids"] == bos + build_tokenizer().encode("caption en", add_special_tokens=False).ids
    raw = build_tokenizer()
    for text in ["caption en", " leading and  double spaces ", "ünï 🐄\n\nx", "<loc0001> cat ; <seg003>", "<image><bos>"]:
        ids = raw.encode(text, add_special_tokens=False).ids
        assert auto(text, add_special_tokens=False)["input_ids"] == ids
        assert auto.decode(ids) == raw.decode(ids, skip_special_tokens=False)


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_fuzzed_text_same_ids_in_transformers(fixtures_dir_cache, text):
    auto, raw = fixtures_dir_cache
    assert auto(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def fixtures_dir_cache(fixtures):
    return transformers.AutoTokenizer.from_pretrained(fixtures["tiny"]), build_tokenizer()


def test_tokenizer_layout():
    tok = build_tokenizer()
    assert [tok.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "\n", "<end_of_turn>")] == [0, 1, 2, 3, 108, 107]
    assert tok.token_to_id("<loc0000>") == 512 and tok.token_to_id("<loc1023>") == 1535
    assert tok.token_to_id("<seg000>") == 1536 and tok.token_to_id("<seg127>") == 1663
    assert tok.token_to_id("<image>") == PRESETS["tiny"].image_token_index == 1664
    assert tok.get_vocab_size() == 1665 <= PRESETS["tiny"].text.vocab_size
    big = build_tokenizer(256000)
    assert big.token_to_id("<loc0000>") == 256000 and big.token_to_id("<image>") == 257152
    assert big.encode("caption en").ids == tok.encode("caption en").ids  # same pieces below 512


# -- atomic writes, default checkpoint ----------------------------------------------------------------------------


def test_refuses_non_empty_dir_and_force_replaces(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="not empty"):
        fx.make_fixture(out)
    assert (out / "keep.txt").exists()
    fx.make_fixture(out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        fx.make_fixture(tmp_path / "file")


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    fx.make_fixture(out)
    before = _digests(out)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fx, "_write_shard", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        fx.make_fixture(out, seed=5, force=True)
    assert _digests(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_bad_arguments():
    with pytest.raises(InputError, match="valid presets: tiny, tiny-pg2, paligemma-3b-pt-224"):
        fx.plan_fixture("paligemma-3b")
    with pytest.raises(InputError, match="dtype"):
        fx.plan_fixture("tiny", "int8")
    assert fx.plan_fixture("tiny", torch.bfloat16).dtype == "bfloat16"


def test_bf16_tiny_loads_in_transformers(tmp_path):
    d = fx.make_fixture(tmp_path / "bf16", "tiny", dtype="bfloat16")
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(d)
    assert model.dtype == torch.bfloat16
    with safe_open(d / "model.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())


def test_default_checkpoint_is_cached_and_race_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("PGCONV_CACHE", str(tmp_path / "cache"))
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: fx.default_checkpoint(), range(4)))
    assert len(set(paths)) == 1 and paths[0].parent == tmp_path / "cache"
    assert "pgconv" in paths[0].name and f"v{fx.FIXTURE_FORMAT}" in paths[0].name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [paths[0].name]
    stamp = (paths[0] / "model.safetensors").stat().st_mtime_ns
    assert fx.default_checkpoint() == paths[0] and (paths[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert _digests(paths[0]) == _digests(fx.make_fixture(tmp_path / "same", "tiny"))


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("PGCONV_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fx.cache_dir() == tmp_path / "xdg" / "pgconv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fx.cache_dir() == tmp_path / ".cache" / "pgconv"


def test_tiny_fixture_is_fast(tmp_path):
    start = time.perf_counter()
    fx.make_fixture(tmp_path / "t", "tiny")
    assert time.perf_counter() - start < 2.0


# -- full-size plan (no 6 GB write) ---------------------------------------------------------------------------------


def test_full_size_plan_matches_hub_layout():
    cfg = PRESETS["paligemma-3b-pt-224"]
    plan = fx.plan_fixture("paligemma-3b-pt-224")
    assert plan.dtype == "bfloat16"
    assert [s.filename for s in plan.shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    names, shapes = key_map(cfg, "hf-legacy"), native_shapes(cfg)
    planned = {t.name: t.shape for s in plan.shards for t in s.tensors}
    assert planned == {names[n]: s for n, s in shapes.items()}
    assert "language_model.lm_head.weight" not in planned  # tied, like the hub (trap 9)
    assert planned["language_model.model.embed_tokens.weight"] == (257216, 2048)
    assert plan.total_parameters == 2_923_466_480  # PaliGemma-3B-224 without the tied head
    for s in plan.shards:
        assert sum(t.numel * 2 for t in s.tensors) <= fx.MAX_SHARD_BYTES
    index = plan.index()
    assert index["metadata"] == {"total_parameters": plan.total_parameters, "total_size": 2 * plan.total_parameters}
    assert set(index["weight_map"]) == set(planned) and set(index["weight_map"].values()) == {s.filename for s in plan.shards}
    assert fx.plan_fixture("tiny").index() is None


@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in fx.TINY_PRESETS])
def test_every_preset_plans(preset):
    plan = fx.plan_fixture(preset)
    assert len({t.name for s in plan.shards for t in s.tensors}) == len(native_shapes(PRESETS[preset]))
    assert all(s.filename.endswith(f"-of-{len(plan.shards):05d}.safetensors") for s in plan.shards)


@pytest.mark.slow
def test_full_size_write(tmp_path):
    start = time.perf_counter()
    d = fx.make_fixture(tmp_path / "3b", "paligemma-3b-pt-224")
    seconds = time.perf_counter() - start
    plan = fx.plan_fixture("paligemma-3b-pt-224")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index == plan.index()
    for shard in plan.shards:
        with safe_open(d / shard.filename, "pt") as f:
            assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {t.name: t.shape for t in shard.tensors}
        assert os.path.getsize(d / shard.filename) > sum(t.numel * 2 for t in shard.tensors)
    with safe_open(d / plan.shards[0].filename, "pt") as f:
        w = f.get_tensor("language_model.model.layers.0.mlp.down_proj.weight").float()
    assert abs(w.std().item() * 16384**0.5 / 4.0 - 1) < 0.01
    print(f"3B fixture: {seconds:.1f} s, {sum(p.stat().st_size for p in d.iterdir()) / 1e9:.2f} GB")
