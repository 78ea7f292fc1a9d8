"""What transformers puts in for a key a PaliGemma `config.json` leaves out, kept as data (one table per config class).

transformers 5 builds each sub-config from its own class: a `text_config` object that is present (even `{}`) gets
`GemmaConfig` / `Gemma2Config` field defaults, a `vision_config` object gets `SiglipVisionConfig`'s; only a sub-config
that is absent (or null) is built from `PaliGemmaConfig.sub_configs_defaults`' `init_kwargs` on top of those (the 3B
shapes, vocab 257152, `vision_use_head` false). Top-level keys take `PaliGemmaConfig`'s own field defaults. So a
missing text `hidden_size` is 3072 (GemmaConfig), not PaliGemma-3B's 2048, and a missing vision `patch_size` is 16.

The values are those of the transformers versions pyproject allows (>=5.6,<6; read from 5.24's
`configuration_gemma.py`, `configuration_gemma2.py`, `configuration_siglip.py`, `configuration_paligemma.py`).
tests/test_hf_defaults.py compares every entry with the installed transformers' classes, so a release that changes a
default fails there instead of silently reading configs differently. Token ids (bos/eos/pad) are read elsewhere.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLASS_DEFAULTS", "ABSENT_SUB_CONFIG", "TEXT_CLASS", "sub_config_defaults"]

# Config class -> {config.json key: default}; only the keys pgconv reads for sizes and numerics.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "GemmaConfig": {
        "vocab_size": 256000,
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,  # rope_parameters' default
        "max_position_embeddings": 8192,
        "hidden_act": "gelu_pytorch_tanh",
        "attention_bias": False,
    },
    "Gemma2Config": {
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
    },
    "SiglipVisionConfig": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "vision_use_head": True,
    },
    "PaliGemmaConfig": {
        "image_token_index": 256000,
        "vocab_size": 257152,  # not read by the model: its vocabulary is text_config's
        "projection_dim": 2048,
        "hidden_size": 2048,  # not read by the model either (trap 11)
        "tie_word_embeddings": True,
    },
}

# `PaliGemmaConfig.sub_configs_defaults[key].init_kwargs`: used only when that sub-config is absent or null.
ABSENT_SUB_CONFIG: dict[str, dict[str, Any]] = {
    "text_config": {
        "model_type": "gemma",
        "hidden_size": 2048,
        "num_hidden_layers": 18,
        "intermediate_size": 16384,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "is_encoder_decoder": False,
        "vocab_size": 257152,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "intermediate_size": 4096,
        "hidden_size": 1152,
        "patch_size": 14,
        "image_size": 224,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "vocab_size": 257152,
        "vision_use_head": False,
    },
}

TEXT_CLASS = {"gemma": "GemmaConfig", "gemma2": "Gemma2Config"}


def sub_config_defaults(key: str, cls: str, present: bool) -> dict[str, Any]:
    """Defaults for the keys of sub-config `key` ("text_config" / "vision_config") built as class `cls`: the class's
    own when the sub-config is stated in config.json, with PaliGemma's init kwargs over them when it is not."""
    out = dict(CLASS_DEFAULTS[cls])
    if not present:
        out.update({k: v for k, v in ABSENT_SUB_CONFIG[key].items() if k in out})
    return out
