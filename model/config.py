"""PaliGemma configuration: one frozen dataclass per sub-model, named presets, strict HF config reading.

Derived values are properties so that no explicit field is ever overwritten (gpt-fast's `head_dim` trap).
`from_hf_config` reads a transformers `config.json` dict; every field that changes numerics is either honoured or
rejected with a clear error. References: transformers 5.24 `configuration_paligemma.py`, `configuration_gemma(2).py`,
`configuration_siglip.py`; `../shared/reference/paligemma.md` §5 and traps 10, 11, 20.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pgconv.errors import InputError

__all__ = [
    "VisionConfig",
    "TextConfig",
    "PaliGemmaConfig",
    "ConfigError",
    "PRESETS",
    "from_name",
    "from_hf_config",
    "to_hf_config",
]

TANH_GELU = "gelu_pytorch_tanh"
# Names transformers maps to the same tanh-approximated GELU (activations.py ACT2CLS).
_TANH_GELU_ALIASES = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh"}


class ConfigError(InputError):
    """A config value that pgconv cannot honour (it would change numerics)."""


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (So400m/14 by default)."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder."""

    family: Literal["gemma", "gemma2"] = "gemma"
    vocab_size: int = 257216
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    # Gemma 2 only (None for Gemma 1).
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    # Per-layer "sliding_attention" / "full_attention" (Gemma 2: even layers slide); empty for Gemma 1.
    layer_types: tuple[str, ...] = ()

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        # Gemma 2 scales queries by query_pre_attn_scalar**-0.5 (144 for 28b, whose head_dim is 128), Gemma by head_dim**-0.5.
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(base) ** -0.5

    @property
    def has_post_norms(self) -> bool:
        return self.family == "gemma2"

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"


def gemma2_layer_types(num_layers: int) -> tuple[str, ...]:
    """transformers Gemma2Config default: layer i slides when (i + 1) % 2 == 1, i.e. even layers."""
    return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers))


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 257152
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = True

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def family(self) -> str:
        return self.text.family

    def replace(self, **changes: Any) -> "PaliGemmaConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------------------
# Presets: exact official shapes (paligemma.md §5).

def _pg1(image_size: int) -> PaliGemmaConfig:
    return PaliGemmaConfig(vision=VisionConfig(image_size=image_size), text=TextConfig())


def _pg2(size: str, image_size: int) -> PaliGemmaConfig:
    hidden, layers, inter, heads, kv, head_dim, qpas = {
        "3b": (2304, 26, 9216, 8, 4, 256, 256),
        "10b": (3584, 42, 14336, 16, 8, 256, 256),
        "28b": (4608, 46, 36864, 32, 16, 128, 144),
    }[size]
    text = TextConfig(
        family="gemma2", hidden_size=hidden, num_layers=layers, intermediate_size=inter, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, query_pre_attn_scalar=qpas, attn_logit_softcap=50.0,
        final_logit_softcap=30.0, sliding_window=4096, layer_types=gemma2_layer_types(layers),
    )
    return PaliGemmaConfig(vision=VisionConfig(image_size=image_size), text=text, eos_token_ids=(1, 107))


# Tiny configs keep the traps visible: text hidden 72 has no exact square root (bf16 normaliser rounding shows),
# head_dim 24 != 72 / 4, two kv heads, non-default eps and rope theta.
# The tiny tokenizer (converter/fixture) mirrors the real id layout at small size: 512 base pieces (pad 0, eos 1,
# bos 2, unk 3, ...), then 1024 <locXXXX> (512..1535), 128 <segXXX> (1536..1663), <image> = 1664; the embedding is
# padded to a multiple of 64 like the hub's 257216.
TINY_BASE_VOCAB = 512
TINY_IMAGE_TOKEN = TINY_BASE_VOCAB + 1024 + 128
_TINY_VOCAB = 1728

TINY = PaliGemmaConfig(
    vision=VisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4),
    text=TextConfig(
        vocab_size=_TINY_VOCAB, hidden_size=72, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=24, rms_norm_eps=1e-5, rope_theta=5000.0, max_position_embeddings=512,
    ),
    image_token_index=TINY_IMAGE_TOKEN,
)

TINY_PG2 = PaliGemmaConfig(
    vision=TINY.vision,
    text=TextConfig(
        family="gemma2", vocab_size=_TINY_VOCAB, hidden_size=72, intermediate_size=96, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=24, rms_norm_eps=1e-5, rope_theta=5000.0, max_position_embeddings=512,
        query_pre_attn_scalar=32, attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=8,
        layer_types=gemma2_layer_types(3),
    ),
    image_token_index=TINY_IMAGE_TOKEN,
    eos_token_ids=(1, 107),
)

PRESETS: dict[str, PaliGemmaConfig] = {
    "tiny": TINY,
    "tiny-pg2": TINY_PG2,
    **{f"paligemma-3b-pt-{r}": _pg1(r) for r in (224, 448, 896)},
    **{f"paligemma2-{s}-pt-{r}": _pg2(s, r) for s in ("3b", "10b", "28b") for r in (224, 448, 896)},
}


def from_name(name: str, **overrides: Any) -> PaliGemmaConfig:
    """Exact preset lookup; `overrides` are top-level fields passed to `dataclasses.replace`."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# ---------------------------------------------------------------------------------------------------------------------
# transformers config.json <-> PaliGemmaConfig


def _rope_theta(tc: dict) -> float:
    params = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"text_config rope type {rope_type!r} is not supported (PaliGemma uses default RoPE)")
    return float(params.get("rope_theta", tc.get("rope_theta", 10000.0)))


def _activation(d: dict, keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        act = d.get(key)
        if act is not None and act not in _TANH_GELU_ALIASES:
            raise ConfigError(f"{where}.{key}={act!r} is not supported: PaliGemma uses {TANH_GELU}")


def from_hf_config(d: dict) -> PaliGemmaConfig:
    """Read a transformers PaliGemma `config.json` dict strictly.

    Honours every field that changes numerics and raises `ConfigError` on values pgconv cannot reproduce.
    The image-feature scale and the text width come from `text_config.hidden_size`, never the top-level
    `hidden_size` (trap 11). A missing `vision_use_head` is treated like transformers 4.x does (True) and rejected.
    """
    if d.get("model_type") not in (None, "paligemma"):
        raise ConfigError(f"model_type {d.get('model_type')!r} is not a PaliGemma config (expected 'paligemma')")
    tc = dict(d.get("text_config") or {})
    vc = dict(d.get("vision_config") or {})
    family = tc.get("model_type", "gemma")
    if family not in ("gemma", "gemma2"):
        raise ConfigError(f"text_config.model_type {family!r} is not supported (expected 'gemma' or 'gemma2')")
    if vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ConfigError(f"vision_config.model_type {vc.get('model_type')!r} is not supported (expected 'siglip_vision_model')")
    # v5 SiglipVisionConfig defaults vision_use_head=True and 4.x treats a missing attribute as True (trap 10).
    if vc.get("vision_use_head", True):
        raise ConfigError("vision_config.vision_use_head must be false for PaliGemma (the MAP head is not part of the model)")
    if tc.get("attention_bias", False):
        raise ConfigError("text_config.attention_bias=true is not supported (Gemma has no attention biases)")
    _activation(tc, ("hidden_act", "hidden_activation"), "text_config")
    _activation(vc, ("hidden_act",), "vision_config")

    defaults = TextConfig(family=family)
    hidden = int(tc.get("hidden_size", defaults.hidden_size))
    heads = int(tc.get("num_attention_heads", defaults.num_heads))
    gemma2 = family == "gemma2"
    text = TextConfig(
        family=family,
        vocab_size=int(tc.get("vocab_size", d.get("vocab_size", defaults.vocab_size))),
        hidden_size=hidden,
        intermediate_size=int(tc.get("intermediate_size", defaults.intermediate_size)),
        num_layers=int(tc.get("num_hidden_layers", defaults.num_layers)),
        num_heads=heads,
        num_kv_heads=int(tc.get("num_key_value_heads", defaults.num_kv_heads)),
        head_dim=int(tc.get("head_dim") or defaults.head_dim),
        rms_norm_eps=float(tc.get("rms_norm_eps", defaults.rms_norm_eps)),
        rope_theta=_rope_theta(tc),
        max_position_embeddings=int(tc.get("max_position_embeddings", defaults.max_position_embeddings)),
        query_pre_attn_scalar=(float(tc.get("query_pre_attn_scalar", 256)) if gemma2 else None),
        attn_logit_softcap=(tc.get("attn_logit_softcapping", 50.0) if gemma2 else None),
        final_logit_softcap=(tc.get("final_logit_softcapping", 30.0) if gemma2 else None),
        sliding_window=(tc.get("sliding_window", 4096) if gemma2 else None),
        layer_types=(tuple(tc.get("layer_types") or gemma2_layer_types(int(tc.get("num_hidden_layers", defaults.num_layers))))
                     if gemma2 else ()),
    )
    if text.num_heads % text.num_kv_heads:
        raise ConfigError(f"text_config: num_attention_heads={heads} is not a multiple of num_key_value_heads={text.num_kv_heads}")
    if text.layer_types and len(text.layer_types) != text.num_layers:
        raise ConfigError(f"text_config.layer_types has {len(text.layer_types)} entries for {text.num_layers} layers")
    vdef = VisionConfig()
    vision = VisionConfig(
        image_size=int(vc.get("image_size", vdef.image_size)),
        patch_size=int(vc.get("patch_size", vdef.patch_size)),
        hidden_size=int(vc.get("hidden_size", vdef.hidden_size)),
        # PaliGemmaConfig() defaults to 4096 here but the real model is 4304 (trap 20); a hub config always states it.
        intermediate_size=int(vc.get("intermediate_size", vdef.intermediate_size)),
        num_layers=int(vc.get("num_hidden_layers", vdef.num_layers)),
        num_heads=int(vc.get("num_attention_heads", vdef.num_heads)),
        num_channels=int(vc.get("num_channels", vdef.num_channels)),
        layer_norm_eps=float(vc.get("layer_norm_eps", vdef.layer_norm_eps)),
    )
    if vision.image_size % vision.patch_size:
        raise ConfigError(f"vision_config.image_size={vision.image_size} is not a multiple of patch_size={vision.patch_size}")
    projection_dim = d.get("projection_dim", vc.get("projection_dim"))
    if projection_dim is not None and int(projection_dim) != text.hidden_size:
        raise ConfigError(f"projection_dim={projection_dim} does not match text_config.hidden_size={text.hidden_size}")
    eos = tc.get("eos_token_id", d.get("eos_token_id", 1))
    tie = d.get("tie_word_embeddings", tc.get("tie_word_embeddings", True))
    return PaliGemmaConfig(
        vision=vision,
        text=text,
        image_token_index=int(d.get("image_token_index", d.get("image_token_id", 257152))),
        pad_token_id=int(d.get("pad_token_id", tc.get("pad_token_id", 0)) or 0),
        bos_token_id=int(d.get("bos_token_id", tc.get("bos_token_id", 2))),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),),
        tie_word_embeddings=bool(tie),
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
        "vision_use_head": False,
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
