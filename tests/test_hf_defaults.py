"""Missing config keys read as transformers fills them: the default tables against the installed transformers'
config classes, and every key of real and tiny configs removed (one at a time, or random sets) giving the sizes
transformers' `PaliGemmaConfig(**d)` gives."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Gemma2Config, GemmaConfig, SiglipVisionConfig
from transformers import PaliGemmaConfig as HFConfig

from pgconv.model.config import PRESETS, ConfigError
from pgconv.model.hf_config import from_hf_config, to_hf_config
from pgconv.model.hf_defaults import ABSENT_SUB_CONFIG, CLASS_DEFAULTS
from tester_checkpoints import hf_sizes, our_sizes, pg_tester_dict

_CLASSES = {"GemmaConfig": GemmaConfig, "Gemma2Config": Gemma2Config, "SiglipVisionConfig": SiglipVisionConfig,
            "PaliGemmaConfig": HFConfig}


@pytest.mark.parametrize("name", list(CLASS_DEFAULTS))
def test_class_defaults_are_the_installed_transformers(name):
    """A transformers release that changes a default fails here (and the table is updated with it)."""
    built = _CLASSES[name]()
    for key, value in CLASS_DEFAULTS[name].items():
        theirs = built.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(built, key)
        if name == "PaliGemmaConfig" and key in ("vocab_size", "hidden_size"):
            theirs = next(f.default for f in HFConfig.__dataclass_fields__.values() if f.name == key)
        assert (theirs, type(theirs)) == (value, type(value)), (name, key)


def test_absent_sub_config_defaults_are_paligemmas_init_kwargs():
    specs = HFConfig.sub_configs_defaults
    assert set(specs) == set(ABSENT_SUB_CONFIG)
    for key, kwargs in ABSENT_SUB_CONFIG.items():
        assert {"model_type": specs[key].model_type, **specs[key].init_kwargs} == kwargs, key


def _unrunnable(hf) -> str | None:
    """Why transformers' model could not run this config although the config class builds it (pgconv refuses
    these up front): each reason is read off transformers' own config object."""
    t, v = hf.text_config, hf.vision_config
    if v.projection_dim != t.hidden_size:
        return "the projector's output is not the text width"
    if t.num_attention_heads % t.num_key_value_heads:
        return "query heads do not group over the kv heads"
    if v.hidden_size % v.num_attention_heads:
        return "the vision width does not split across heads"
    if v.image_size % v.patch_size:
        return "pgconv refuses a partial patch (transformers' conv drops the border pixels)"
    if t.model_type == "gemma2" and len(t.layer_types) != t.num_hidden_layers:
        return "layer_types does not cover the layers"
    return None


def _check(d: dict, what: str) -> None:
    try:
        hf = HFConfig(**copy.deepcopy(d))
    except Exception:  # transformers refuses the config itself: so must pgconv
        with pytest.raises(ConfigError):
            from_hf_config(d)
        return
    try:
        ours = from_hf_config(d)
    except ConfigError as e:
        assert _unrunnable(hf), f"{what}: pgconv refuses ({e}) a config transformers builds and runs"
        return
    assert our_sizes(ours) == hf_sizes(hf), what


_SOURCES = {
    "paligemma-3b-pt-224": lambda: to_hf_config(PRESETS["paligemma-3b-pt-224"]),
    "paligemma2-3b-pt-224": lambda: to_hf_config(PRESETS["paligemma2-3b-pt-224"]),
    "paligemma2-10b-pt-448": lambda: to_hf_config(PRESETS["paligemma2-10b-pt-448"]),
    "tiny": lambda: to_hf_config(PRESETS["tiny"]),
    "tiny-pg2": lambda: to_hf_config(PRESETS["tiny-pg2"]),
    "tester-pg1": lambda: pg_tester_dict("gemma"),
    "tester-pg2": lambda: pg_tester_dict("gemma2"),
}


def _paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _paths(v, prefix + (k,))
    return out


def _without(d: dict, paths) -> dict:
    d = copy.deepcopy(d)
    for path in sorted(paths, key=len, reverse=True):
        sub = d
        for k in path[:-1]:
            sub = sub.get(k) if isinstance(sub, dict) else None
        if isinstance(sub, dict):
            sub.pop(path[-1], None)
    return d


@pytest.mark.parametrize("source", list(_SOURCES))
def test_every_key_removed_gives_transformers_sizes(source):
    d = _SOURCES[source]()
    _check(d, f"{source} as is")
    for path in _paths(d):
        _check(_without(d, [path]), f"{source} without {'.'.join(path)}")


@pytest.mark.parametrize("source", ["paligemma-3b-pt-224", "tiny", "tiny-pg2"])
def test_removing_whole_sub_configs_uses_paligemmas_init_kwargs(source):
    """No text_config: GemmaConfig with PaliGemma's init kwargs (vocab 257152, not the hub's 257216)."""
    d = _SOURCES[source]()
    for key in ("text_config", "vision_config"):
        for absent in (_without(d, [(key,)]), {**d, key: None}):
            _check(absent, f"{source} with {key} absent")
    cfg = from_hf_config({**_without(d, [("text_config",)]), "projection_dim": 2048})
    assert (cfg.text.vocab_size, cfg.text.hidden_size, cfg.family) == (257152, 2048, "gemma")
    empty = from_hf_config({**d, "vision_config": {}, "projection_dim": d["text_config"]["hidden_size"]})
    assert (empty.vision.patch_size, empty.vision.hidden_size, empty.vision.use_head) == (16, 768, True)


@settings(max_examples=60, deadline=None)
@given(source=st.sampled_from(list(_SOURCES)), data=st.data())
def test_random_key_sets_removed_give_transformers_sizes(source, data):
    d = _SOURCES[source]()
    paths = data.draw(st.lists(st.sampled_from(_paths(d)), max_size=8, unique=True))
    _check(_without(d, paths), f"{source} without {paths}")
