"""Checkpoint key layouts, written as data.

A layout is where the three components live (vision tower, projector, language model) plus a name template per
tensor. Templates use `{i}` for the layer index and nothing else, so a key map is expanded exactly for a config
(no digit regexes that would also hit `fc1` or `layer_norm1`). Every layout maps onto pgconv's own names
(`native`), which are the parameter names of `pgconv.model.PaliGemma`; converting between two layouts goes
through native names. See `../shared/reference/paligemma.md` §3 for where each layout comes from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pgconv.errors import InputError
from pgconv.model.config import PaliGemmaConfig

__all__ = [
    "Layout",
    "LAYOUTS",
    "LayoutError",
    "native_shapes",
    "head_shapes",
    "key_map",
    "detect_layout",
    "to_native",
    "from_native",
]


class LayoutError(InputError):
    """Tensor names that do not fit a layout (missing, unexpected or ambiguous keys)."""


# Native (pgconv) name -> transformers name, relative to each component's prefix.
VISION_TENSORS: dict[str, str] = {
    "patch_embed.weight": "embeddings.patch_embedding.weight",
    "patch_embed.bias": "embeddings.patch_embedding.bias",
    "pos_embed.weight": "embeddings.position_embedding.weight",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
VISION_LAYER_TENSORS: dict[str, str] = {
    f"blocks.{{i}}.{ours}.{p}": f"encoder.layers.{{i}}.{theirs}.{p}"
    for ours, theirs in [
        ("norm1", "layer_norm1"),
        ("attn.q", "self_attn.q_proj"),
        ("attn.k", "self_attn.k_proj"),
        ("attn.v", "self_attn.v_proj"),
        ("attn.o", "self_attn.out_proj"),
        ("norm2", "layer_norm2"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
    ]
    for p in ("weight", "bias")
}
# SigLIP's attention-pooling (MAP) head, relative to the vision prefix: transformers builds it when
# vision_use_head is true (SiglipVisionConfig's default, e.g. its own PaliGemma tester configs) and loads these, but
# PaliGemma takes the last hidden state and never uses the head's output, so pgconv ignores them (`head_shapes`).
VISION_HEAD_TENSORS: tuple[str, ...] = (
    "head.probe", "head.attention.in_proj_weight", "head.attention.in_proj_bias", "head.attention.out_proj.weight",
    "head.attention.out_proj.bias", "head.layernorm.weight", "head.layernorm.bias", "head.mlp.fc1.weight",
    "head.mlp.fc1.bias", "head.mlp.fc2.weight", "head.mlp.fc2.bias",
)
PROJECTOR_TENSORS: dict[str, str] = {"weight": "weight", "bias": "bias"}
TEXT_TENSORS: dict[str, str] = {"embed.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
_TEXT_LAYER_COMMON: dict[str, str] = {
    "blocks.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.o.weight": "layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.mlp.gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.up.weight": "layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.down.weight": "layers.{i}.mlp.down_proj.weight",
}
# The norm-name trap (paligemma.md trap 12): Gemma 1's pre-MLP norm is called `post_attention_layernorm`;
# Gemma 2 uses that name for the norm *after* attention and calls the pre-MLP norm `pre_feedforward_layernorm`.
TEXT_LAYER_TENSORS: dict[str, dict[str, str]] = {
    "gemma": {**_TEXT_LAYER_COMMON, "blocks.{i}.mlp_norm.weight": "layers.{i}.post_attention_layernorm.weight"},
    "gemma2": {
        **_TEXT_LAYER_COMMON,
        "blocks.{i}.post_attn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
        "blocks.{i}.mlp_norm.weight": "layers.{i}.pre_feedforward_layernorm.weight",
        "blocks.{i}.post_mlp_norm.weight": "layers.{i}.post_feedforward_layernorm.weight",
    },
}


@dataclass(frozen=True)
class Layout:
    name: str
    vision: str  # prefix of the vision tower
    projector: str
    text: str  # prefix of the decoder (embeddings, layers, final norm)
    lm_head: str  # name of an untied output projection
    native_names: bool = False  # component-relative names are pgconv's, not transformers'
    description: str = ""


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        Layout(
            "hf-legacy", "vision_tower.vision_model.", "multi_modal_projector.linear.", "language_model.model.",
            "language_model.lm_head.weight",
            description="hub checkpoints, transformers <=4.51 in memory, 4.x and 5.x save_pretrained of a loaded model",
        ),
        Layout(
            "hf-v5-save", "vision_tower.", "multi_modal_projector.linear.", "language_model.model.",
            # save_pretrained reverts `lm_head` to the legacy name (checked with transformers 5.24, untied tiny model).
            "language_model.lm_head.weight",
            description="transformers >=5.6 save_pretrained of a model built from a config (no vision_model.)",
        ),
        Layout(
            "hf-4.52", "model.vision_tower.vision_model.", "model.multi_modal_projector.linear.",
            "model.language_model.", "lm_head.weight",
            description="transformers 4.52-5.5 in-memory names",
        ),
        Layout(
            "hf-5.6", "model.vision_tower.", "model.multi_modal_projector.linear.", "model.language_model.",
            "lm_head.weight",
            description="transformers >=5.6 in-memory names",
        ),
        Layout("native", "vision.", "projector.", "text.", "lm_head.weight", native_names=True,
               description="pgconv's own module names"),
    ]
}


def _expand(templates: Mapping[str, str], n: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for ours, theirs in templates.items():
        if "{i}" in ours:
            for i in range(n):
                out[ours.format(i=i)] = theirs.format(i=i)
        else:
            out[ours] = theirs
    return out


def key_map(cfg: PaliGemmaConfig, layout: str | Layout, *, with_lm_head: bool | None = None) -> dict[str, str]:
    """Native name -> name in `layout` for every tensor the config implies.

    `lm_head` is included only when the config is untied (or `with_lm_head` forces it).
    """
    lay = LAYOUTS[layout] if isinstance(layout, str) else layout
    parts = [
        (lay.vision, "vision.", {**VISION_TENSORS, **_expand(VISION_LAYER_TENSORS, cfg.vision.num_layers)}),
        (lay.projector, "projector.", PROJECTOR_TENSORS),
        (lay.text, "text.", {**TEXT_TENSORS, **_expand(TEXT_LAYER_TENSORS[cfg.text.family], cfg.text.num_layers)}),
    ]
    out: dict[str, str] = {}
    for prefix, native_prefix, table in parts:
        for ours, theirs in table.items():
            out[native_prefix + ours] = prefix + (ours if lay.native_names else theirs)
    if with_lm_head if with_lm_head is not None else not cfg.tie_word_embeddings:
        out["lm_head.weight"] = lay.lm_head
    return out


def native_shapes(cfg: PaliGemmaConfig, *, with_lm_head: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of `pgconv.model.PaliGemma` for `cfg` (buffers excluded)."""
    v, t = cfg.vision, cfg.text
    shapes: dict[str, tuple[int, ...]] = {
        "vision.patch_embed.weight": (v.hidden_size, v.num_channels, v.patch_size, v.patch_size),
        "vision.patch_embed.bias": (v.hidden_size,),
        "vision.pos_embed.weight": (v.num_patches, v.hidden_size),
        "vision.norm.weight": (v.hidden_size,),
        "vision.norm.bias": (v.hidden_size,),
        "projector.weight": (t.hidden_size, v.hidden_size),
        "projector.bias": (t.hidden_size,),
        "text.embed.weight": (t.vocab_size, t.hidden_size),
        "text.norm.weight": (t.hidden_size,),
    }
    vd, vi = v.hidden_size, v.intermediate_size
    for i in range(v.num_layers):
        b = f"vision.blocks.{i}."
        for name in ("norm1", "norm2"):
            shapes[b + name + ".weight"] = shapes[b + name + ".bias"] = (vd,)
        for name in ("q", "k", "v", "o"):
            shapes[b + f"attn.{name}.weight"] = (vd, vd)
            shapes[b + f"attn.{name}.bias"] = (vd,)
        shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (vi, vd), (vi,)
        shapes[b + "mlp.fc2.weight"], shapes[b + "mlp.fc2.bias"] = (vd, vi), (vd,)
    d, q, kv = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    norms = ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm") if t.has_post_norms else ("attn_norm", "mlp_norm")
    for i in range(t.num_layers):
        b = f"text.blocks.{i}."
        for name in norms:
            shapes[b + name + ".weight"] = (d,)
        shapes[b + "attn.q.weight"], shapes[b + "attn.o.weight"] = (q, d), (d, q)
        shapes[b + "attn.k.weight"] = shapes[b + "attn.v.weight"] = (kv, d)
        shapes[b + "mlp.gate.weight"] = shapes[b + "mlp.up.weight"] = (t.intermediate_size, d)
        shapes[b + "mlp.down.weight"] = (d, t.intermediate_size)
    if with_lm_head if with_lm_head is not None else not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, d)
    return shapes


def head_shapes(cfg: PaliGemmaConfig, layout: str | Layout) -> dict[str, tuple[int, ...]]:
    """Name in `layout` -> shape of each SigLIP head tensor transformers would load for `cfg` (none when the config
    has no head, or for pgconv's native names, which never hold one)."""
    lay = LAYOUTS[layout] if isinstance(layout, str) else layout
    if not cfg.vision.use_head or lay.native_names:
        return {}
    c, i = cfg.vision.hidden_size, cfg.vision.intermediate_size
    shapes = [(1, 1, c), (3 * c, c), (3 * c,), (c, c), (c,), (c,), (c,), (i, c), (i,), (c, i), (c,)]
    return {lay.vision + name: shape for name, shape in zip(VISION_HEAD_TENSORS, shapes)}


def detect_layout(keys: Iterable[str]) -> str:
    """Name of the layout whose prefixes the tensor names use; raises LayoutError when none or several fit."""
    keys = list(keys)

    def fits(lay: Layout) -> bool:
        vision_marker = lay.vision + ("patch_embed.weight" if lay.native_names else "embeddings.patch_embedding.weight")
        text_marker = lay.text + ("embed.weight" if lay.native_names else "embed_tokens.weight")
        return vision_marker in keys and text_marker in keys

    found = [name for name, lay in LAYOUTS.items() if fits(lay)]
    if len(found) != 1:
        sample = ", ".join(sorted(keys)[:3])
        why = "no known layout fits" if not found else f"several layouts fit ({', '.join(found)})"
        raise LayoutError(f"cannot detect the checkpoint layout: {why} (first tensors: {sample})")
    return found[0]


def _rename(names: Iterable[str], mapping: dict[str, str], direction: str) -> dict[str, str]:
    names = list(names)
    unexpected = sorted(set(names) - set(mapping))
    missing = sorted(set(mapping.values()) - {mapping[n] for n in names if n in mapping})
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise LayoutError(f"{direction}: " + "; ".join(parts))
    return {n: mapping[n] for n in names}


def to_native(sd: Mapping[str, object], cfg: PaliGemmaConfig, layout: str) -> dict[str, object]:
    """Rename a state dict from `layout` to native names (strict: every tensor used once, none missing).

    A tied `lm_head` present in the source is dropped only if it is the very same tensor as the embedding
    (a differing copy is an error: the tie would silently replace it).
    """
    mapping = {theirs: ours for ours, theirs in key_map(cfg, layout).items()}
    lay = LAYOUTS[layout]
    head = head_shapes(cfg, layout)  # the SigLIP head transformers builds and PaliGemma never uses
    sd = {k: v for k, v in sd.items() if k not in head}
    if cfg.tie_word_embeddings and lay.lm_head in sd:
        head, emb = sd.pop(lay.lm_head), sd.get(mapping_inv_embed(cfg, layout))
        if emb is not None and head is not emb and not _same_tensor(head, emb):
            raise LayoutError(f"{lay.lm_head} differs from the tied embedding; the config says tie_word_embeddings=true")
    renamed = _rename(sd, mapping, f"layout {layout}")
    return {renamed[k]: v for k, v in sd.items()}


def from_native(sd: Mapping[str, object], cfg: PaliGemmaConfig, layout: str) -> dict[str, object]:
    """Rename a native state dict into `layout` (strict)."""
    renamed = _rename(sd, key_map(cfg, layout), f"native -> {layout}")
    return {renamed[k]: v for k, v in sd.items()}


def mapping_inv_embed(cfg: PaliGemmaConfig, layout: str) -> str:
    return LAYOUTS[layout].text + ("embed.weight" if LAYOUTS[layout].native_names else "embed_tokens.weight")


def _same_tensor(a: object, b: object) -> bool:
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
            return True  # one storage (transformers ties by sharing)
        # Bitwise, not torch.equal: a tied embedding holding NaN equals itself (issue 8).
        return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    return False
