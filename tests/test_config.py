"""Config presets and the strict transformers config reader, checked against transformers' own config classes."""

from __future__ import annotations

import pytest
import torch
from transformers import PaliGemmaConfig as HFConfig
from transformers import PaliGemmaForConditionalGeneration

from pgconv.converter.layouts import key_map, native_shapes
from pgconv.model.config import PRESETS, ConfigError, from_hf_config, from_name, to_hf_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trip(name):
    cfg = PRESETS[name]
    hf = HFConfig(**to_hf_config(cfg))
    assert from_hf_config(hf.to_dict()) == cfg


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_transformers_shapes_on_meta(name):
    """Every preset's parameter shapes equal transformers' model for the same config (built on meta, no memory)."""
    cfg = PRESETS[name]
    with torch.device("meta"):
        hf = PaliGemmaForConditionalGeneration(HFConfig(**to_hf_config(cfg)))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    names = key_map(cfg, "hf-5.6", with_lm_head=True)
    ours = {names[k]: s for k, s in native_shapes(cfg, with_lm_head=True).items()}
    assert ours == theirs


def test_official_pg1_counts():
    # 603 tensors on disk: SigLIP 437 + projector 2 + Gemma 164 (paligemma.md §3.1).
    assert len(native_shapes(PRESETS["paligemma-3b-pt-224"])) == 603
    assert PRESETS["paligemma-3b-pt-896"].num_image_tokens == 4096


def test_from_name_is_exact():
    with pytest.raises(KeyError, match="valid presets"):
        from_name("paligemma-3b")
    assert from_name("tiny", tie_word_embeddings=False).tie_word_embeddings is False


def _hub_pg1() -> dict:
    # As the hub's google/paligemma-3b-pt-224 config.json states it (defaults left out, no vision_use_head default).
    return {
        "model_type": "paligemma", "hidden_size": 2048, "image_token_index": 257152, "projection_dim": 2048,
        "vocab_size": 257216, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                        "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                        "num_key_value_heads": 1, "vocab_size": 257216},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                          "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                          "patch_size": 14, "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
                          "vision_use_head": False},
    }


def test_hub_pg1_config_reads_as_preset():
    assert from_hf_config(_hub_pg1()) == PRESETS["paligemma-3b-pt-224"]


def test_pg2_top_level_hidden_size_is_not_text_hidden():
    d = to_hf_config(PRESETS["paligemma2-10b-pt-224"])
    d["hidden_size"] = 2048  # left at the default in real PG2 configs (trap 11)
    assert from_hf_config(d).text.hidden_size == 3584


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["vision_config"].pop("vision_use_head"), "vision_use_head"),
        (lambda d: d["vision_config"].update(vision_use_head=True), "vision_use_head"),
        (lambda d: d["text_config"].update(hidden_act="gelu"), "hidden_act"),
        (lambda d: d["text_config"].update(hidden_activation="relu"), "hidden_activation"),
        (lambda d: d["text_config"].update(model_type="llama"), "model_type"),
        (lambda d: d.update(model_type="llava"), "model_type"),
        (lambda d: d["text_config"].update(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope"),
        (lambda d: d["text_config"].update(attention_bias=True), "attention_bias"),
        (lambda d: d["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
        (lambda d: d["vision_config"].update(image_size=225), "patch_size"),
        (lambda d: d.update(projection_dim=1024), "projection_dim"),
    ],
)
def test_numerics_changing_values_are_rejected(edit, match):
    d = _hub_pg1()
    edit(d)
    with pytest.raises(ConfigError, match=match):
        from_hf_config(d)


def test_honours_numerics_fields():
    d = _hub_pg1()
    d["text_config"].update(rms_norm_eps=1e-5, rope_theta=5000.0, head_dim=128, num_key_value_heads=2)
    d["vision_config"].update(image_size=448, layer_norm_eps=1e-5)
    cfg = from_hf_config(d)
    assert (cfg.text.rms_norm_eps, cfg.text.rope_theta, cfg.text.head_dim, cfg.text.num_kv_heads) == (1e-5, 5000.0, 128, 2)
    assert (cfg.vision.image_size, cfg.vision.layer_norm_eps, cfg.num_image_tokens) == (448, 1e-5, 1024)
