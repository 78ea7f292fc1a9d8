"""transformers `config.json` <-> `PaliGemmaConfig`, strictly.

`from_hf_config` reads a transformers config dict the way transformers 5 reads it; every field that changes numerics
is either honoured or rejected with a clear error, types are JSON-strict and sizes bounded, so a malformed file is a
one-line error naming the key. References: transformers 5.24 `configuration_paligemma.py`,
`configuration_gemma(2).py`, `configuration_siglip.py`; `../shared/reference/paligemma.md` §5 and traps 10, 11, 20.
"""

from __future__ import annotations

import math
from typing import Any

from pgconv.model.config import (_TANH_GELU_ALIASES, TANH_GELU, ConfigError, PaliGemmaConfig, TextConfig,
                                 VisionConfig, gemma2_layer_types)
from pgconv.model.hf_defaults import CLASS_DEFAULTS, TEXT_CLASS, sub_config_defaults

__all__ = ["from_hf_config", "to_hf_config", "MAX_IMAGE_TOKENS"]

# Upper bounds for size fields, keyed by the config.json key (text and vision share them). Far above any released or
# plausible PaliGemma / Gemma / SigLIP (PG2-28b: hidden 4608, 46 layers, intermediate 36864, 32 heads; vocab 257216;
# SigLIP at 896 px), yet small enough that a typo or hostile value (num_hidden_layers=10**12) is refused here instead
# of making key maps, layer lists or buffers grow without end. Every size must also be > 0.
_SIZE_LIMITS: dict[str, int] = {
    "num_hidden_layers": 1024,
    "hidden_size": 65536,
    "intermediate_size": 1 << 20,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 21,
    "sliding_window": 1 << 21,
    "image_size": 8192,
    "patch_size": 8192,
    "num_channels": 64,
    "projection_dim": 65536,
}
# Image tokens per image: 896 px / 14 gives 4096; this allows e.g. 8192 px / 16 but not 8192 px / 1 (67M tokens).
MAX_IMAGE_TOKENS = 1 << 18
# The torch dtype names transformers writes as `dtype` / `torch_dtype` (str(torch.dtype) without "torch.") for the
# floating types a checkpoint can be stored in.
_HF_DTYPES = ("float32", "bfloat16", "float16", "float64")
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _shown(v: Any) -> str:
    # A whole list or object in the message would not be one readable line.
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _int_value(v: Any, name: str, lo: int, hi: int) -> int:
    # bool is an int subclass and JSON 72.0 / "72" are not integers: int() would accept all three silently.
    if type(v) is not int:
        raise ConfigError(f"{name}: expected an integer, got {_shown(v)}")
    if not lo <= v <= hi:
        raise ConfigError(f"{name}: {_shown(v)} is out of range (expected {lo}..{hi})")
    return v


def _size(d: dict, key: str, where: str, default: int) -> int:
    """A positive size no larger than `_SIZE_LIMITS[key]`; `default` when the key is absent (null is an error)."""
    return _int_value(d.get(key, default), _name(where, key), 1, _SIZE_LIMITS[key])


def _float(d: dict, key: str, where: str, default: float | None) -> float:
    """A finite number > 0 (every float in these configs is an eps, a theta, a scale or a cap); no bool, no string."""
    v = d.get(key, default)
    return _float_value(v, _name(where, key))


def _float_value(v: Any, name: str) -> float:
    if type(v) not in (int, float):
        raise ConfigError(f"{name}: expected a number, got {_shown(v)}")
    try:
        f = float(v)  # a huge JSON integer overflows here
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ConfigError(f"{name}: expected a finite number, got {_shown(v)}")
    if f <= 0:
        raise ConfigError(f"{name}: {v} must be > 0")
    return f


def _bool(d: dict, key: str, where: str, default: bool) -> bool:
    return _bool_value(d.get(key, default), _name(where, key))


def _bool_value(v: Any, name: str) -> bool:
    if type(v) is not bool:  # bool("no") is True
        raise ConfigError(f"{name}: expected true or false, got {_shown(v)}")
    return v


def _optional(d: dict, key: str, where: str, default: Any, read: Any) -> Any:
    """`read(d, key, where, default)`, or None when the key is stated as null (transformers: feature disabled)."""
    return None if key in d and d[key] is None else read(d, key, where, default)


def _object(d: dict, key: str, where: str = "") -> dict:
    """A sub-config: a JSON object, or {} when absent or null."""
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{_name(where, key)}: expected a JSON object, got {_shown(v)}")
    return v


def _first(key: str, *scopes: tuple[str, dict], skip_null: bool = False) -> tuple[Any, str] | None:
    """(value, name) from the first scope (where, dict) that states `key`; with `skip_null`, a null does not count
    (a 4.x `to_dict()` writes `"bos_token_id": null` at the top next to the text config's real id)."""
    for where, d in scopes:
        if key in d and not (skip_null and d[key] is None):
            return d[key], _name(where, key)
    return None


def _token_id(found: tuple[Any, str] | None, name: str, default: int, vocab: int) -> int:
    # An id indexes the embedding table, so it must lie inside it (a default too: the vocab may be small).
    v, name = found if found is not None else (default, f"{name} (default)")
    return _int_value(v, name, 0, vocab - 1)


def _check_dtypes(d: dict, where: str) -> None:
    for key in ("dtype", "torch_dtype"):
        v = d.get(key)
        if v is not None and (not isinstance(v, str) or v not in _HF_DTYPES):
            raise ConfigError(f"{_name(where, key)}: expected one of {', '.join(_HF_DTYPES)} or null, got {_shown(v)}")


def _rope_theta(tc: dict, default: float) -> float:
    # transformers 5 writes rope_parameters, 4.x rope_scaling (or nothing); an empty one falls through like `or` did.
    params, where = {}, "text_config"
    for key in ("rope_parameters", "rope_scaling"):
        p = _object(tc, key, "text_config")
        if p:
            params, where = p, f"text_config.{key}"
            break
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"text_config rope type {_shown(rope_type)} is not supported (PaliGemma uses default RoPE)")
    if any(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters (Gemma 3 style) would otherwise silently fall back to the default theta.
        raise ConfigError(f"{where}: per-layer-type rope parameters are not supported (PaliGemma uses one default RoPE)")
    if "rope_theta" in params:
        return _float(params, "rope_theta", where, None)
    return _float(tc, "rope_theta", "text_config", default)


def _activation(d: dict, keys: tuple[str, ...], where: str, legacy_gelu: bool = False) -> None:
    allowed = _TANH_GELU_ALIASES | ({"gelu"} if legacy_gelu else set())
    for key in keys:
        act = d.get(key)
        if act is not None and (not isinstance(act, str) or act not in allowed):
            raise ConfigError(f"{where}.{key}={_shown(act)} is not supported: PaliGemma uses {TANH_GELU}")


def from_hf_config(d: dict) -> PaliGemmaConfig:
    """Read a transformers PaliGemma `config.json` dict strictly.

    Honours every field that changes numerics and raises `ConfigError` on values pgconv cannot reproduce.
    The image-feature scale and the text width come from `text_config.hidden_size`, never the top-level
    `hidden_size` (trap 11). A missing key means what transformers puts in for it (`hf_defaults`: the sub-config
    class's default, e.g. GemmaConfig's hidden_size 3072, not PaliGemma-3B's), so sizes are transformers'. A SigLIP
    head (`vision_use_head` true, SiglipVisionConfig's default) is recorded in `VisionConfig.use_head`: transformers
    builds and loads it but PaliGemma never uses its output, so its weights are ignored.
    Types are JSON-strict (an integer is a JSON integer, a boolean a JSON boolean, a float finite) and sizes are
    bounded by `_SIZE_LIMITS`, so a malformed file is a one-line error naming the key, never a traceback or a hang.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"not a JSON object (got {type(d).__name__})")
    if d.get("model_type") not in (None, "paligemma"):
        raise ConfigError(f"model_type {_shown(d.get('model_type'))} is not a PaliGemma config (expected 'paligemma')")
    tc = dict(_object(d, "text_config"))
    vc = dict(_object(d, "vision_config"))
    # transformers fills a stated sub-config (even {}) from its class defaults, an absent or null one from
    # PaliGemmaConfig's 3B init kwargs on top of them (hf_defaults).
    text_present, vision_present = d.get("text_config") is not None, d.get("vision_config") is not None
    family = tc.get("model_type", "gemma")
    if family not in ("gemma", "gemma2"):
        raise ConfigError(f"text_config.model_type {_shown(family)} is not supported (expected 'gemma' or 'gemma2')")
    if vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ConfigError(f"vision_config.model_type {_shown(vc.get('model_type'))} is not supported (expected 'siglip_vision_model')")
    vdef = sub_config_defaults("vision_config", "SiglipVisionConfig", vision_present)
    tdef = sub_config_defaults("text_config", TEXT_CLASS[family], text_present)
    # v5 SiglipVisionConfig defaults vision_use_head=True (trap 10): transformers then builds the MAP head and loads
    # its weights, but PaliGemma takes the last hidden state, never the head's output (transformers' own tester
    # configs do this). Accepted; the head's weights are ignored (reported by inspect).
    use_head = _bool(vc, "vision_use_head", "vision_config", vdef["vision_use_head"])
    if _bool(tc, "attention_bias", "text_config", False):
        raise ConfigError("text_config.attention_bias=true is not supported (Gemma has no attention biases)")
    # What transformers 5 (the reference) runs: Gemma's MLP reads hidden_act (its config turns the official
    # releases' legacy "gelu" into the tanh approximation), Gemma2's only hidden_activation; the other key is ignored.
    if family == "gemma":
        _activation(tc, ("hidden_act",), "text_config", legacy_gelu=True)
    else:
        _activation(tc, ("hidden_activation",), "text_config")
    _activation(vc, ("hidden_act",), "vision_config")
    for where, sub in (("", d), ("text_config", tc), ("vision_config", vc)):
        _check_dtypes(sub, where)

    T = "text_config"
    gemma2 = family == "gemma2"
    # The model's vocabulary is text_config's (PaliGemmaConfig's top-level vocab_size is not read by the model).
    vocab = _size(tc, "vocab_size", T, tdef["vocab_size"])
    # Bounded before anything is built per layer (gemma2_layer_types below, key maps later).
    num_layers = _size(tc, "num_hidden_layers", T, tdef["num_hidden_layers"])
    heads = _size(tc, "num_attention_heads", T, tdef["num_attention_heads"])
    layer_types: tuple[str, ...] = ()
    if gemma2:
        raw_types = tc.get("layer_types")
        if raw_types is None or raw_types == []:
            layer_types = gemma2_layer_types(num_layers)
        elif not isinstance(raw_types, list) or not all(isinstance(t, str) and t in _LAYER_TYPES for t in raw_types):
            raise ConfigError(f"{T}.layer_types: expected a list of {' / '.join(_LAYER_TYPES)}, got {_shown(raw_types)}")
        else:
            layer_types = tuple(raw_types)
    text = TextConfig(
        family=family,
        vocab_size=vocab,
        hidden_size=_size(tc, "hidden_size", T, tdef["hidden_size"]),
        intermediate_size=_size(tc, "intermediate_size", T, tdef["intermediate_size"]),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=_size(tc, "num_key_value_heads", T, tdef["num_key_value_heads"]),
        # null means "the default" in transformers' GemmaConfig.
        head_dim=_size(tc, "head_dim", T, tdef["head_dim"]) if tc.get("head_dim") is not None else tdef["head_dim"],
        rms_norm_eps=_float(tc, "rms_norm_eps", T, tdef["rms_norm_eps"]),
        rope_theta=_rope_theta(tc, tdef["rope_theta"]),
        max_position_embeddings=_size(tc, "max_position_embeddings", T, tdef["max_position_embeddings"]),
        query_pre_attn_scalar=(_float(tc, "query_pre_attn_scalar", T, tdef["query_pre_attn_scalar"]) if gemma2 else None),
        # A null soft-cap or sliding window disables it, as in transformers' Gemma2.
        attn_logit_softcap=(_optional(tc, "attn_logit_softcapping", T, tdef["attn_logit_softcapping"], _float)
                            if gemma2 else None),
        final_logit_softcap=(_optional(tc, "final_logit_softcapping", T, tdef["final_logit_softcapping"], _float)
                             if gemma2 else None),
        sliding_window=(_optional(tc, "sliding_window", T, tdef["sliding_window"], _size) if gemma2 else None),
        layer_types=layer_types,
    )
    if text.num_heads % text.num_kv_heads:
        raise ConfigError(f"text_config: num_attention_heads={heads} is not a multiple of num_key_value_heads={text.num_kv_heads}")
    if text.layer_types and len(text.layer_types) != text.num_layers:
        raise ConfigError(f"text_config.layer_types has {len(text.layer_types)} entries for {text.num_layers} layers")
    V = "vision_config"
    vision = VisionConfig(
        image_size=_size(vc, "image_size", V, vdef["image_size"]),
        patch_size=_size(vc, "patch_size", V, vdef["patch_size"]),
        hidden_size=_size(vc, "hidden_size", V, vdef["hidden_size"]),
        # An absent vision_config gets PaliGemmaConfig's 4096 here though the real model is 4304 (trap 20), as in
        # transformers; a hub config always states it.
        intermediate_size=_size(vc, "intermediate_size", V, vdef["intermediate_size"]),
        num_layers=_size(vc, "num_hidden_layers", V, vdef["num_hidden_layers"]),
        num_heads=_size(vc, "num_attention_heads", V, vdef["num_attention_heads"]),
        num_channels=_size(vc, "num_channels", V, vdef["num_channels"]),
        layer_norm_eps=_float(vc, "layer_norm_eps", V, vdef["layer_norm_eps"]),
        use_head=use_head,
    )
    if vision.image_size % vision.patch_size:
        raise ConfigError(f"vision_config.image_size={vision.image_size} is not a multiple of patch_size={vision.patch_size}")
    if vision.num_patches > MAX_IMAGE_TOKENS:
        raise ConfigError(f"vision_config: image_size={vision.image_size} / patch_size={vision.patch_size} gives "
                          f"{vision.num_patches} image tokens (at most {MAX_IMAGE_TOKENS})")
    if vision.hidden_size % vision.num_heads:
        # SigLIP attention splits hidden_size evenly across heads; a remainder would silently drop channels.
        raise ConfigError(f"vision_config: hidden_size={vision.hidden_size} is not a multiple of num_attention_heads={vision.num_heads}")
    # transformers sizes the projector from the top-level projection_dim (default 2048 when absent) and copies it
    # over vision_config.projection_dim, so only the top-level value counts.
    found = _first("projection_dim", ("", d)) or (CLASS_DEFAULTS["PaliGemmaConfig"]["projection_dim"],
                                                   "projection_dim (absent, transformers' default)")
    projection_dim = _int_value(*found, 1, _SIZE_LIMITS["projection_dim"])
    if projection_dim != text.hidden_size:
        raise ConfigError(f"{found[1]}={projection_dim} does not match text_config.hidden_size={text.hidden_size}: "
                          "transformers would build a projector of the wrong size")
    eos = _first("eos_token_id", (T, tc), ("", d), skip_null=True)
    if eos is not None and isinstance(eos[0], list):
        if not eos[0]:
            raise ConfigError(f"{eos[1]}: expected an integer or a non-empty list of integers, got []")
        eos_ids = tuple(_token_id((e, eos[1]), "eos_token_id", 1, vocab) for e in eos[0])
    else:
        eos_ids = (_token_id(eos, "eos_token_id", 1, vocab),)
    pad = _first("pad_token_id", ("", d), (T, tc))
    if pad is not None and pad[0] is None:
        pad = None  # a null pad id (common in transformers configs) means 0, as before
    # PaliGemmaForConditionalGeneration ties lm_head by its own (top-level) flag only; text_config's is never read
    # (checked with transformers 5.24: text_config.tie_word_embeddings=false alone still ties).
    tie = _first("tie_word_embeddings", ("", d))
    image = _first("image_token_index", ("", d)) or _first("image_token_id", ("", d))
    return PaliGemmaConfig(
        vision=vision,
        text=text,
        # transformers swaps an image id past the vocabulary for 0 before the embedding lookup (so does
        # PaliGemma.embed): pi0/openpi-style configs put it at vocab_size.
        image_token_index=_token_id(image, "image_token_index", CLASS_DEFAULTS["PaliGemmaConfig"]["image_token_index"],
                                    _SIZE_LIMITS["vocab_size"]),
        pad_token_id=_token_id(pad, "pad_token_id", 0, vocab),
        bos_token_id=_token_id(_first("bos_token_id", ("", d), (T, tc), skip_null=True), "bos_token_id", 2, vocab),
        eos_token_ids=eos_ids,
        tie_word_embeddings=(CLASS_DEFAULTS["PaliGemmaConfig"]["tie_word_embeddings"] if tie is None
                             else _bool_value(*tie)),
    )


def to_hf_config(cfg: PaliGemmaConfig, dtype: str = "bfloat16") -> dict:
    """A transformers `config.json` dict in the hub's style (what `from_pretrained` reads)."""
    t, v = cfg.text, cfg.vision
    text: dict[str, Any] = {
        "model_type": t.family,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
        "max_position_embeddings": t.max_position_embeddings,
        "hidden_activation": TANH_GELU,
        "hidden_act": TANH_GELU,
        "num_image_tokens": cfg.num_image_tokens,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0],
        "dtype": dtype,
    }
    if t.family == "gemma2":
        text.update(
            query_pre_attn_scalar=t.query_pre_attn_scalar,
            attn_logit_softcapping=t.attn_logit_softcap,
            final_logit_softcapping=t.final_logit_softcap,
            sliding_window=t.sliding_window,
            layer_types=list(t.layer_types),
            cache_implementation="hybrid",
        )
    vision = {
        "model_type": "siglip_vision_model",
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": TANH_GELU,
        "num_image_tokens": cfg.num_image_tokens,
        "projection_dim": t.hidden_size,
        "projector_hidden_act": "gelu_fast",
        "vision_use_head": False,  # pgconv's model has no SigLIP head (an unused one is never written)
    }
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0],
        "pad_token_id": cfg.pad_token_id,
        "ignore_index": -100,
        "image_token_index": cfg.image_token_index,
        "projection_dim": t.hidden_size,
        "vocab_size": t.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": dtype,
        "text_config": text,
        "vision_config": vision,
    }
