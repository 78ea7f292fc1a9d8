"""Config presets and the strict transformers config reader, checked against transformers' own config classes."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import pytest
import torch
from transformers import PaliGemmaConfig as HFConfig
from transformers import PaliGemmaForConditionalGeneration

from pgconv.converter.layouts import key_map, native_shapes
from pgconv.errors import InputError
from pgconv.model.config import PRESETS, ConfigError, from_name
from pgconv.model.hf_config import from_hf_config, to_hf_config


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
        (lambda d: d["text_config"].update(hidden_act="relu"), "hidden_act"),
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


@pytest.mark.parametrize("edit", [lambda d: d["vision_config"].pop("vision_use_head"),
                                  lambda d: d["vision_config"].update(vision_use_head=True)])
def test_siglip_head_is_accepted_like_transformers(edit):
    """transformers builds the SigLIP head (vision_use_head true, SiglipVisionConfig's default) and never uses its
    output; the config is the preset's with the head recorded (its weights are ignored when reading)."""
    d = _hub_pg1()
    edit(d)
    cfg = from_hf_config(d)
    assert cfg.vision.use_head and HFConfig(**d).vision_config.vision_use_head
    preset = PRESETS["paligemma-3b-pt-224"]
    assert cfg == preset.replace(vision=dataclasses.replace(preset.vision, use_head=True))


@pytest.mark.parametrize("top, text", [(None, False), (False, None), (None, None), (True, False), (False, True)])
def test_tie_flag_is_the_top_level_one_as_in_transformers(top, text):
    """PaliGemmaForConditionalGeneration ties lm_head by the top-level flag (default true) only: text_config's alone
    does not untie it (transformers 5.24, built on meta)."""
    d = to_hf_config(PRESETS["tiny"], "float32")
    d.pop("tie_word_embeddings")
    d["text_config"].pop("tie_word_embeddings", None)
    if top is not None:
        d["tie_word_embeddings"] = top
    if text is not None:
        d["text_config"]["tie_word_embeddings"] = text
    with torch.device("meta"):
        hf = PaliGemmaForConditionalGeneration(HFConfig(**d))
    tied = hf.lm_head.weight is hf.get_input_embeddings().weight
    assert from_hf_config(d).tie_word_embeddings is tied is (top is not False)


def test_honours_numerics_fields():
    d = _hub_pg1()
    d["text_config"].update(rms_norm_eps=1e-5, rope_theta=5000.0, head_dim=128, num_key_value_heads=2)
    d["vision_config"].update(image_size=448, layer_norm_eps=1e-5)
    cfg = from_hf_config(d)
    assert (cfg.text.rms_norm_eps, cfg.text.rope_theta, cfg.text.head_dim, cfg.text.num_kv_heads) == (1e-5, 5000.0, 128, 2)
    assert (cfg.vision.image_size, cfg.vision.layer_norm_eps, cfg.num_image_tokens) == (448, 1e-5, 1024)


def _hub_pg2() -> dict:
    # As the hub's google/paligemma2-3b-pt-224 config.json states it (transformers 4.47 era: torch_dtype, no rope keys).
    return {
        "_vocab_size": 257152, "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2,
        "eos_token_id": 1, "hidden_size": 2048, "image_token_index": 257152, "model_type": "paligemma",
        "num_hidden_layers": 26, "pad_token_id": 0, "projection_dim": 2304, "torch_dtype": "bfloat16",
        "text_config": {"hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
                        "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
                        "num_image_tokens": 256, "num_key_value_heads": 4, "vocab_size": 257216},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                          "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                          "num_positions": 256, "patch_size": 14, "projection_dim": 2304, "torch_dtype": "bfloat16",
                          "vision_use_head": False},
    }


def test_hub_pg2_config_reads_as_preset():
    # The hub config states one eos id; the preset adds <end_of_turn> (107) from generation_config.json.
    assert from_hf_config(_hub_pg2()) == PRESETS["paligemma2-3b-pt-224"].replace(eos_token_ids=(1,))


@pytest.mark.parametrize("name", list(PRESETS))
def test_to_hf_config_round_trips_directly(name):
    """Our own writer's output (no transformers in between) passes the strict reader unchanged."""
    cfg = PRESETS[name]
    assert from_hf_config(to_hf_config(cfg)) == cfg
    assert from_hf_config(json.loads(json.dumps(to_hf_config(cfg, dtype="float32")))) == cfg


def _set(path: str, value):
    """An edit setting `a.b.c` (creating intermediate objects) in a config dict."""
    *parents, key = path.split(".")

    def edit(d):
        for p in parents:
            d = d.setdefault(p, {})
        d[key] = value
    return edit


_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "path, value, match",
    [
        # integers must be JSON integers: no float, string or bool, and inside their bounds
        ("text_config.hidden_size", 72.5, "expected an integer"),
        ("text_config.hidden_size", 2048.0, "expected an integer"),
        ("text_config.hidden_size", "2048", "expected an integer"),
        ("text_config.num_attention_heads", True, "expected an integer"),
        ("text_config.num_hidden_layers", None, "expected an integer"),
        ("text_config.num_hidden_layers", 0, "out of range"),
        ("text_config.num_hidden_layers", -3, "out of range"),
        ("text_config.intermediate_size", 10**30, "out of range"),
        ("text_config.vocab_size", 2**40, "out of range"),
        ("text_config.head_dim", 10**6, "out of range"),
        ("text_config.max_position_embeddings", 2**40, "out of range"),
        ("vision_config.num_hidden_layers", 10**12, "out of range"),
        ("vision_config.image_size", 10**9, "out of range"),
        ("vision_config.patch_size", "14", "expected an integer"),
        ("vision_config.num_channels", 0, "out of range"),
        ("projection_dim", 2048.0, "expected an integer"),
        ("image_token_index", "257152", "expected an integer"),
        ("image_token_index", 1 << 22, "out of range"),
        ("image_token_index", -1, "out of range"),
        ("bos_token_id", -1, "out of range"),
        ("text_config.eos_token_id", [1, "x"], "expected an integer"),
        ("text_config.eos_token_id", [], "non-empty"),
        # floats must be finite, positive JSON numbers
        ("text_config.rms_norm_eps", "x", "expected a number, got 'x'"),
        ("text_config.rms_norm_eps", _NAN, "finite"),
        ("text_config.rms_norm_eps", _INF, "finite"),
        ("text_config.rms_norm_eps", 0.0, "must be > 0"),
        ("text_config.rms_norm_eps", -1e-6, "must be > 0"),
        ("text_config.rms_norm_eps", True, "expected a number"),
        ("text_config.rope_parameters.rope_theta", "a", "expected a number"),
        ("text_config.rope_parameters.rope_theta", _NAN, "finite"),
        ("text_config.rope_theta", 10**400, "finite"),
        ("vision_config.layer_norm_eps", -_INF, "finite"),
        # booleans must be JSON booleans
        ("tie_word_embeddings", "yes", "expected true or false"),
        ("tie_word_embeddings", 1, "expected true or false"),
        ("vision_config.vision_use_head", "false", "expected true or false"),
        ("text_config.attention_bias", 0, "expected true or false"),
        # sub-configs must be objects
        ("text_config", [1], "expected a JSON object"),
        ("vision_config", "siglip", "expected a JSON object"),
        ("text_config.rope_parameters", [10000.0], "expected a JSON object"),
        ("text_config.rope_scaling", 2.0, "expected a JSON object"),
        # dtype names are the torch ones transformers writes
        ("dtype", "float99", "float32, bfloat16"),
        ("torch_dtype", "torch.bfloat16", "float32, bfloat16"),
        ("text_config.dtype", 16, "float32, bfloat16"),
        ("vision_config.torch_dtype", "int8", "float32, bfloat16"),
        # activations must be names, not other JSON values
        ("text_config.hidden_act", ["gelu_pytorch_tanh"], "hidden_act"),
    ],
)
def test_bad_value_types_and_ranges_are_input_errors_naming_the_key(path, value, match):
    d = _hub_pg1()
    _set(path, value)(d)
    with pytest.raises(InputError, match=re.escape(match)) as e:
        from_hf_config(d)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 200
    # The key is named by its full dotted path.
    assert path in msg


@pytest.mark.parametrize(
    "path, value, match",
    [
        ("text_config.query_pre_attn_scalar", _NAN, "text_config.query_pre_attn_scalar"),
        ("text_config.query_pre_attn_scalar", 0, "text_config.query_pre_attn_scalar"),
        ("text_config.attn_logit_softcapping", _INF, "text_config.attn_logit_softcapping"),
        ("text_config.final_logit_softcapping", "30", "text_config.final_logit_softcapping"),
        ("text_config.final_logit_softcapping", 0.0, "text_config.final_logit_softcapping"),
        ("text_config.sliding_window", 4096.0, "text_config.sliding_window"),
        ("text_config.sliding_window", 0, "text_config.sliding_window"),
        ("text_config.layer_types", "sliding_attention", "text_config.layer_types"),
        ("text_config.layer_types", ["local"] * 26, "text_config.layer_types"),
        ("text_config.rope_parameters", {"full_attention": {"rope_theta": 1e6, "rope_type": "default"}}, "per-layer"),
    ],
)
def test_bad_gemma2_values_are_input_errors_naming_the_key(path, value, match):
    d = _hub_pg2()
    _set(path, value)(d)
    with pytest.raises(InputError, match=re.escape(match)):
        from_hf_config(d)


def test_gemma2_nulls_disable_like_transformers():
    d = _hub_pg2()
    d["text_config"].update(attn_logit_softcapping=None, sliding_window=None, layer_types=None, head_dim=None,
                            dtype=None)
    d["pad_token_id"] = None
    cfg = from_hf_config(d)
    assert (cfg.text.attn_logit_softcap, cfg.text.sliding_window, cfg.text.head_dim, cfg.pad_token_id) == (None, None, 256, 0)
    assert cfg.text.final_logit_softcap == 30.0 and len(cfg.text.layer_types) == 26


def test_nan_literal_in_config_json_is_refused():
    # json.loads accepts the NaN / Infinity literals, so a config.json can really carry them.
    text = json.dumps(_hub_pg1()).replace('"num_key_value_heads": 1', '"num_key_value_heads": 1, "rms_norm_eps": NaN')
    with pytest.raises(InputError, match=r"text_config\.rms_norm_eps: expected a finite number, got nan"):
        from_hf_config(json.loads(text))


@pytest.mark.parametrize("path", ["text_config.num_hidden_layers", "vision_config.num_hidden_layers"])
def test_absurd_layer_count_fails_fast(path):
    d = _hub_pg2()
    _set(path, 10**12)(d)
    start = time.perf_counter()
    with pytest.raises(InputError, match=re.escape(path)):
        from_hf_config(d)
    assert time.perf_counter() - start < 1.0


def test_absurd_image_token_count_is_refused():
    d = _hub_pg1()
    d["vision_config"].update(image_size=8192, patch_size=1)
    with pytest.raises(InputError, match="image tokens"):
        from_hf_config(d)


def test_not_an_object_is_refused():
    with pytest.raises(InputError, match="not a JSON object"):
        from_hf_config([1, 2, 3])


def test_vision_hidden_must_split_across_heads():
    d = _hub_pg1()
    d["vision_config"]["num_attention_heads"] = 7
    with pytest.raises(InputError, match="num_attention_heads=7"):
        from_hf_config(d)


def test_accepted_dtypes_and_bounds_edges():
    d = _hub_pg1()
    d.update(dtype="float16", torch_dtype="float64")
    d["text_config"].update(dtype="float32", num_hidden_layers=1024, rms_norm_eps=1, rope_theta=1e6)
    cfg = from_hf_config(d)
    assert (cfg.text.num_layers, cfg.text.rms_norm_eps, cfg.text.rope_theta) == (1024, 1.0, 1e6)


def test_values_transformers_accepts_are_read_like_transformers():
    """Found by a valid-input review: transformers reads each of these, so pgconv must too."""
    d = _hub_pg1()
    d["text_config"]["hidden_act"] = "gelu"  # Gemma's legacy value: transformers 5 maps it to the tanh form
    d["text_config"]["hidden_activation"] = "gelu"  # transformers 5's Gemma MLP reads only hidden_act
    d["bos_token_id"] = None  # a 4.x to_dict() writes top-level nulls next to the text config's real ids
    d["text_config"]["bos_token_id"] = 3
    d["eos_token_id"] = None
    d["text_config"]["eos_token_id"] = 5
    d["image_token_index"] = d["text_config"]["vocab_size"]  # pi0/openpi: swapped for 0 before the lookup
    cfg = from_hf_config(d)
    assert cfg.bos_token_id == 3 and cfg.eos_token_ids == (5,) and cfg.image_token_index == 257216
    pg2 = _hub_pg2()
    pg2["text_config"]["hidden_act"] = "gelu"  # Gemma2 reads only hidden_activation
    assert from_hf_config(pg2).text.family == "gemma2"
    pg2["text_config"]["hidden_activation"] = "relu"
    with pytest.raises(InputError, match="hidden_activation"):
        from_hf_config(pg2)
    strict = _hub_pg1()
    strict["tie_word_embeddings"] = None  # transformers' strict config refuses a null here, and so does pgconv
    with pytest.raises(InputError, match="tie_word_embeddings"):
        from_hf_config(strict)


def test_projection_dim_is_the_top_level_value_as_in_transformers():
    """transformers sizes the projector from the top-level projection_dim (2048 when absent) and overwrites the
    vision config's: a config whose text width differs and states none would not load there."""
    import dataclasses

    d = to_hf_config(PRESETS["tiny"], "float32")
    d.pop("projection_dim")
    with pytest.raises(InputError, match=r"projection_dim \(absent, transformers' default\)=2048 does not match"):
        from_hf_config(d)
    d["vision_config"]["projection_dim"] = 2048  # ignored by transformers: still the top level that counts
    d["projection_dim"] = PRESETS["tiny"].text.hidden_size
    assert dataclasses.asdict(from_hf_config(d)) == dataclasses.asdict(PRESETS["tiny"])
    hub = _hub_pg1()
    hub.pop("projection_dim", None)
    hub["vision_config"].pop("projection_dim", None)
    assert from_hf_config(hub).text.hidden_size == 2048  # the default fits PaliGemma 1 3B

