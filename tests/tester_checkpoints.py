"""transformers' own PaliGemma tester configs, and tiny checkpoints transformers itself saves from them.

`TESTER_TEXT` / `TESTER_VISION` / `TESTER_TOP` reproduce `PaliGemmaVisionText2TextModelTester` (transformers
tests/models/paligemma/test_modeling_paligemma.py) and `PaliGemma2VisionText2TextModelTester` (paligemma2): the two
differ only in `text_config.model_type`. They leave out most keys (no `vision_use_head`, so SiglipVisionConfig's
default True builds the unused MAP head; no eos/bos; no softcaps or query_pre_attn_scalar for Gemma 2), carry keys
no config class knows (`seq_length`, `is_training`, ...) and use vocab 99, hidden 32, `image_token_index` 0, pad 1.

`pg_tester_checkpoint` builds the model with transformers from that config, randomises every parameter
(`reference_models.randomize_`) and `save_pretrained`s it, next to a tokenizer whose 99 ids fit the vocabulary
(`<image>` is id 0 as the config says) and a preprocessor config for 20 px images. `hf_sizes` / `our_sizes` list
every size and numerics field pgconv reads, from transformers' built config and from ours, for comparison.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from reference_models import randomize_

__all__ = ["TESTER_TEXT", "TESTER_VISION", "TESTER_TOP", "pg_tester_dict", "pg_tester_hf_config",
           "pg_tester_checkpoint", "hf_sizes", "our_sizes"]

TESTER_TEXT = {
    "model_type": "gemma", "seq_length": 128, "is_training": True, "use_token_type_ids": False, "use_labels": True,
    "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 8, "intermediate_size": 37, "hidden_activation": "gelu_pytorch_tanh", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 16,
    "type_sequence_label_size": 2, "initializer_range": 0.02, "num_labels": 3, "num_choices": 4, "pad_token_id": 1,
}
TESTER_VISION = {
    "use_labels": True, "image_size": 20, "patch_size": 5, "num_image_tokens": 4, "num_channels": 3,
    "is_training": True, "hidden_size": 32, "projection_dim": 32, "num_key_value_heads": 1, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 37, "dropout": 0.1, "attention_dropout": 0.1,
    "initializer_range": 0.02,
}
# The keyword arguments `get_config()` passes to PaliGemmaConfig next to the two sub-configs.
TESTER_TOP = {
    "ignore_index": -100, "image_token_index": 0, "projector_hidden_act": "gelu", "projection_dim": 32,
    "vision_feature_select_strategy": "default", "vision_feature_layer": -1,
}


def pg_tester_dict(family: str = "gemma") -> dict:
    """The tester's PaliGemmaConfig arguments as a config dict (PG1: family "gemma", PG2: "gemma2")."""
    return {"model_type": "paligemma", **copy.deepcopy(TESTER_TOP),
            "text_config": {**copy.deepcopy(TESTER_TEXT), "model_type": family},
            "vision_config": copy.deepcopy(TESTER_VISION)}


def pg_tester_hf_config(family: str = "gemma"):
    """transformers' PaliGemmaConfig exactly as the tester's `get_config()` builds it."""
    from transformers import PaliGemmaConfig

    d = pg_tester_dict(family)
    return PaliGemmaConfig(text_config=d["text_config"], vision_config=d["vision_config"], **TESTER_TOP)


# Tokenizer ids: <image> 0 (the tester's image_token_index), <eos> 1 (GemmaConfig's default eos, also the pad: the
# tester's pad_token_id is 1), <bos> 2, <unk> 3, "\n" 4, then "▁" (space) and 93 visible ASCII characters: 99 in all.
_SPECIAL = ["<image>", "<eos>", "<bos>", "<unk>"]
_CHARS = ["\n", "▁"] + [chr(c) for c in range(0x21, 0x7E)][:93]


def _tokenizer_files() -> dict[str, str]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(_SPECIAL + _CHARS)}
    assert len(vocab) == 99
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in _SPECIAL])
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, t in enumerate(_SPECIAL)}
    config = {
        "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<image>"], "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<eos>",
        "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "processor_class": "PaliGemmaProcessor",
        "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
        "model_max_length": 1000000000000000019884624838656,
    }
    special = {"additional_special_tokens": ["<image>"], "bos_token": "<bos>", "eos_token": "<eos>",
               "pad_token": "<eos>", "unk_token": "<unk>"}
    return {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(special, indent=2)}


def pg_tester_checkpoint(path: Path, family: str = "gemma", seed: int = 0, *, tie: bool | None = None,
                      config_edit=None) -> Path:
    """A checkpoint transformers saves (`save_pretrained`) from the tester config with random weights, plus a
    tokenizer and preprocessor config, so pgconv verify/generate and transformers' processor can run on it.
    `tie` sets the top-level tie flag; `config_edit(dict)` edits the config before the model is built."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    d = pg_tester_dict(family)
    if tie is not None:
        d["tie_word_embeddings"] = tie
    if config_edit is not None:
        config_edit(d)
    cfg = PaliGemmaConfig(**d)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    for name, text in _tokenizer_files().items():
        (path / name).write_text(text, encoding="utf-8")
    v = cfg.vision_config
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": (v.image_size // v.patch_size) ** 2, "processor_class": "PaliGemmaProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"height": v.image_size, "width": v.image_size},
    }, indent=2))
    return path


def hf_sizes(hf) -> dict:
    """Every size and numerics field pgconv reads, as transformers' built config holds it."""
    t, v = hf.text_config, hf.vision_config
    gemma2 = t.model_type == "gemma2"
    return {
        "family": t.model_type, "vocab": t.vocab_size, "hidden": t.hidden_size, "intermediate": t.intermediate_size,
        "layers": t.num_hidden_layers, "heads": t.num_attention_heads, "kv": t.num_key_value_heads,
        "head_dim": t.head_dim, "eps": t.rms_norm_eps, "theta": t.rope_parameters["rope_theta"],
        "positions": t.max_position_embeddings,
        "qpas": t.query_pre_attn_scalar if gemma2 else None,
        "attn_cap": t.attn_logit_softcapping if gemma2 else None,
        "final_cap": t.final_logit_softcapping if gemma2 else None,
        "window": t.sliding_window if gemma2 else None,
        "layer_types": tuple(t.layer_types) if gemma2 else (),
        "v_image": v.image_size, "v_patch": v.patch_size, "v_hidden": v.hidden_size,
        "v_intermediate": v.intermediate_size, "v_layers": v.num_hidden_layers, "v_heads": v.num_attention_heads,
        "v_channels": v.num_channels, "v_eps": v.layer_norm_eps, "v_head": v.vision_use_head,
        "image_token": hf.image_token_index, "tie": hf.tie_word_embeddings, "projection": v.projection_dim,
        "image_tokens": t.num_image_tokens,
    }


def our_sizes(cfg) -> dict:
    t, v = cfg.text, cfg.vision
    return {
        "family": t.family, "vocab": t.vocab_size, "hidden": t.hidden_size, "intermediate": t.intermediate_size,
        "layers": t.num_layers, "heads": t.num_heads, "kv": t.num_kv_heads, "head_dim": t.head_dim,
        "eps": t.rms_norm_eps, "theta": t.rope_theta, "positions": t.max_position_embeddings,
        "qpas": t.query_pre_attn_scalar, "attn_cap": t.attn_logit_softcap, "final_cap": t.final_logit_softcap,
        "window": t.sliding_window, "layer_types": t.layer_types,
        "v_image": v.image_size, "v_patch": v.patch_size, "v_hidden": v.hidden_size,
        "v_intermediate": v.intermediate_size, "v_layers": v.num_layers, "v_heads": v.num_heads,
        "v_channels": v.num_channels, "v_eps": v.layer_norm_eps, "v_head": v.use_head,
        "image_token": cfg.image_token_index, "tie": cfg.tie_word_embeddings, "projection": t.hidden_size,
        "image_tokens": cfg.num_image_tokens,
    }
