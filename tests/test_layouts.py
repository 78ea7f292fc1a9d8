"""Key layouts (data) against transformers 5.24's own names, and full-size conversion plans on the meta device."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors import safe_open
from transformers import PaliGemmaConfig as HFConfig
from transformers import PaliGemmaForConditionalGeneration

from convert_helpers import hf_model
from pgconv.converter.layouts import LAYOUTS, LayoutError, detect_layout, from_native, key_map, native_shapes, to_native
from pgconv.converter.plan import expected_shapes, plan_conversion
from pgconv.converter.sources import TensorMeta
from pgconv.model.config import PRESETS
from pgconv.model.hf_config import to_hf_config
from pgconv.model.paligemma import PaliGemma

SMALL = ["tiny", "tiny-pg2", "paligemma-3b-pt-224", "paligemma2-3b-pt-224"]
FULL = [n for n in PRESETS if not n.startswith("tiny")]


@pytest.mark.parametrize("name, layout, tie", list(itertools.product(SMALL, LAYOUTS, [True, False])))
def test_key_map_is_injective_and_inverts(name, layout, tie):
    cfg = PRESETS[name].replace(tie_word_embeddings=tie)
    km = key_map(cfg, layout)
    assert len(set(km.values())) == len(km)
    assert set(km) == set(native_shapes(cfg))
    sd = {n: object() for n in km}
    assert to_native(from_native(sd, cfg, layout), cfg, layout) == sd
    assert detect_layout(km.values()) == layout


def test_detect_layout_rejects_unknown_and_ambiguous():
    with pytest.raises(LayoutError, match="no known layout"):
        detect_layout(["foo.weight"])
    both = list(key_map(PRESETS["tiny"], "native").values()) + list(key_map(PRESETS["tiny"], "hf-5.6").values())
    with pytest.raises(LayoutError, match="several layouts"):
        detect_layout(both)


def _saved_keys(path) -> set[str]:
    keys = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            keys |= set(s.keys())
    return keys


@pytest.mark.parametrize("name, tie", list(itertools.product(["tiny", "tiny-pg2"], [True, False])))
def test_layouts_match_what_transformers_writes(tmp_path, name, tie):
    """hf-v5-save = fresh save_pretrained (and a re-save of it); hf-legacy = re-save of a legacy load;
    hf-5.6 = save_original_format=False. Untied lm_head names included."""
    cfg = PRESETS[name].replace(tie_word_embeddings=tie)
    model = hf_model(cfg)
    model.save_pretrained(tmp_path / "fresh")
    assert _saved_keys(tmp_path / "fresh") == set(expected_shapes(cfg, "hf-v5-save"))
    reloaded = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "fresh")
    reloaded.save_pretrained(tmp_path / "resaved", max_shard_size="100KB")
    assert _saved_keys(tmp_path / "resaved") == set(expected_shapes(cfg, "hf-v5-save"))
    model.save_pretrained(tmp_path / "inmem", save_original_format=False)
    assert _saved_keys(tmp_path / "inmem") == set(expected_shapes(cfg, "hf-5.6"))
    # A legacy-named checkpoint loaded and saved again keeps vision_model. and language_model.lm_head.
    sd = model.state_dict()
    legacy = {k: sd[v].contiguous() for k, v in
              zip(key_map(cfg, "hf-legacy").values(), key_map(cfg, "hf-5.6").values())}
    from safetensors.torch import save_file
    (tmp_path / "legacy").mkdir()
    save_file(legacy, tmp_path / "legacy" / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path / "legacy")
    PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "legacy").save_pretrained(tmp_path / "legacy2")
    assert _saved_keys(tmp_path / "legacy2") == set(legacy) == set(expected_shapes(cfg, "hf-legacy"))


@pytest.mark.parametrize("name", FULL)
def test_full_size_plans_on_meta(name):
    """Real-size key/shape plans, no memory: transformers' meta model -> every layout -> back, and native ==
    our model built on meta."""
    cfg = PRESETS[name]
    with torch.device("meta"):
        hf = PaliGemmaForConditionalGeneration(HFConfig(**to_hf_config(cfg)))
        ours = PaliGemma(cfg)
    theirs = {k: TensorMeta(k, tuple(v.shape), "BF16") for k, v in hf.state_dict().items()}
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    for layout in LAYOUTS:
        plan = plan_conversion(theirs, cfg, layout)
        assert [d.source for d in plan.drops] == ["lm_head.weight"]  # in-memory tied head: dropped, checked equal
        out = {t.name: t for t in plan.targets}
        assert {n: t.shape for n, t in out.items()} == expected_shapes(cfg, layout)
        if layout == "native":
            assert {n: t.shape for n, t in out.items()} == ours_shapes
        back = plan_conversion(out, cfg, "hf-5.6")
        assert {t.name: t.shape for t in back.targets} == {k: v.shape for k, v in theirs.items() if k != "lm_head.weight"}
        assert len(plan.steps) == len(native_shapes(cfg))
