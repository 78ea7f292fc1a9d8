"""The probe table: which activation of pgconv's model is paired with which of transformers', as data.

Nothing pairs two differently structured implementations automatically (parity.md §0.1), so the pairing is written
down here once. Each row names a module on each side (`{i}` = layer index), which side of the call is captured
(a module's `output`, or its `input` through a forward pre-hook), and two recipes used by the harness:
- `replay`: how our side is re-run on the reference's captured input (teacher forcing, so the report can separate
  the error a layer *contributes* from the error it *inherits*): `call` = call our module with the reference's
  input in place of its first tensor argument (other arguments, e.g. our AttnContext, kept); `none` = the
  inputs are identical by construction (pixels, positions), so contributed = end-to-end; or the name of a special
  recipe in `parity.replay` (`merge`, `logits`).
- `oracle`: how the reference's step is recomputed in float64 from the same input for arbitration: `module` =
  a float64 copy of the reference's module; `exact` = the reference's value is exact by construction (masks);
  or a special recipe in `parity.oracle` (`merge`, `rope`, `logits`).

Reference paths are transformers >= 5.6 in-memory names (converter.layouts `hf-5.6`). Our paths are the native
names of `pgconv.model.PaliGemma`; `@ctx.<attr>` reads an attribute of the AttnContext our block was called with;
`name()` (with `ours_at="call"`) is a method of ours recomputed on the same inputs (`parity.replay.OWN`).
Order is execution order: the first probe where ours is worse is the first divergence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pgconv.model.config import PaliGemmaConfig

__all__ = ["Probe", "PROBES", "probes_for"]

At = Literal["input", "output", "call"]


@dataclass(frozen=True)
class Probe:
    name: str
    kind: str  # tolerance kind (parity/tolerances.json)
    ours: str
    ref: str
    ours_at: At = "output"
    ref_at: At = "output"
    replay: str = "call"
    oracle: str = "module"
    stack: Literal["vision", "text", ""] = ""  # depth axis of the error-vs-depth plot
    layers: Literal["vision", "text", ""] = ""  # expand {i} over this stack's layers
    coarse: bool = True  # kept by `--probes coarse`
    family: Literal["gemma", "gemma2", ""] = ""  # only for this decoder family
    first_of: Literal["full", "sliding", ""] = ""  # {i} = the first decoder layer of this attention type
    layer: int = -1  # filled in by probes_for


V, T = "model.vision_tower.", "model.language_model."

PROBES: tuple[Probe, ...] = (
    # Patch embedding + learned positions. Ours is a method, not a module: `ours_at="call"` recomputes it from the
    # same pixels (`replay.OWN`); the next block's input is then checked to be exactly this value.
    Probe("vision.embed", "vision_embed", "vision.embed()", V + "embeddings", ours_at="call", replay="none",
          stack="vision"),
    Probe("vision.blocks.{i}.norm1", "vision_sub", "vision.blocks.{i}.norm1", V + "encoder.layers.{i}.layer_norm1",
          layers="vision", coarse=False),
    Probe("vision.blocks.{i}.attn", "vision_sub", "vision.blocks.{i}.attn", V + "encoder.layers.{i}.self_attn",
          layers="vision", coarse=False),
    Probe("vision.blocks.{i}.norm2", "vision_sub", "vision.blocks.{i}.norm2", V + "encoder.layers.{i}.layer_norm2",
          layers="vision", coarse=False),
    Probe("vision.blocks.{i}.mlp", "vision_sub", "vision.blocks.{i}.mlp", V + "encoder.layers.{i}.mlp",
          layers="vision", coarse=False),
    Probe("vision.blocks.{i}", "vision_block", "vision.blocks.{i}", V + "encoder.layers.{i}", layers="vision",
          stack="vision"),
    Probe("vision.norm", "vision_norm", "vision.norm", V + "post_layernorm", stack="vision"),
    Probe("projector", "projector", "projector", "model.multi_modal_projector"),
    # The features our forward hands to `embed` (`image_tap`) against the reference's projector output, which
    # transformers 5 scatters unchanged: a rescaling between projector and merge (e.g. / sqrt(vision width), seen in
    # real ports) enters here. Teacher forcing (`features`): what our step changes, added to the reference's input.
    Probe("image_features", "projector", "image_tap", "model.multi_modal_projector", replay="features"),
    # Embedded prompt with the image features scattered in (and Gemma's normaliser applied to the text tokens).
    Probe("text.embed", "merged_embed", "embed()", T.rstrip("."), ours_at="call", ref_at="input",
          replay="merge", oracle="merge", stack="text"),
    # Inputs every decoder block shares: RoPE tables of the positions used, and the attention mask per layer type.
    Probe("text.rope", "rope", "text.blocks.0@ctx.cos,ctx.sin", T + "rotary_emb", ours_at="input", replay="none",
          oracle="rope"),
    Probe("text.mask.full", "mask", "text.blocks.{i}@ctx.mask", T + "layers.{i}@attention_mask", ours_at="input",
          ref_at="input", replay="none", oracle="exact", first_of="full"),
    Probe("text.mask.sliding", "mask", "text.blocks.{i}@ctx.sliding_mask", T + "layers.{i}@attention_mask",
          ours_at="input", ref_at="input", replay="none", oracle="exact", first_of="sliding", family="gemma2"),
    Probe("text.blocks.{i}.attn_norm", "text_sub", "text.blocks.{i}.attn_norm", T + "layers.{i}.input_layernorm",
          layers="text", coarse=False),
    Probe("text.blocks.{i}.attn", "text_sub", "text.blocks.{i}.attn", T + "layers.{i}.self_attn", layers="text",
          coarse=False),
    Probe("text.blocks.{i}.post_attn_norm", "text_sub", "text.blocks.{i}.post_attn_norm",
          T + "layers.{i}.post_attention_layernorm", layers="text", coarse=False, family="gemma2"),
    # The norm-name trap (paligemma.md 12): Gemma's pre-MLP norm is `post_attention_layernorm`, Gemma 2's is not.
    Probe("text.blocks.{i}.mlp_norm", "text_sub", "text.blocks.{i}.mlp_norm", T + "layers.{i}.post_attention_layernorm",
          layers="text", coarse=False, family="gemma"),
    Probe("text.blocks.{i}.mlp_norm", "text_sub", "text.blocks.{i}.mlp_norm",
          T + "layers.{i}.pre_feedforward_layernorm", layers="text", coarse=False, family="gemma2"),
    Probe("text.blocks.{i}.mlp", "text_sub", "text.blocks.{i}.mlp", T + "layers.{i}.mlp", layers="text",
          coarse=False),
    Probe("text.blocks.{i}.post_mlp_norm", "text_sub", "text.blocks.{i}.post_mlp_norm",
          T + "layers.{i}.post_feedforward_layernorm", layers="text", coarse=False, family="gemma2"),
    Probe("text.blocks.{i}", "text_block", "text.blocks.{i}", T + "layers.{i}", layers="text", stack="text"),
    Probe("text.norm", "text_norm", "text.norm", T + "norm", stack="text"),
    # Final logits (after Gemma 2's final soft-cap): the models' return values.
    Probe("logits", "logits", "", "", replay="logits", oracle="logits"),
)


def _first_layer(cfg: PaliGemmaConfig, kind: str) -> int | None:
    for i in range(cfg.text.num_layers):
        if cfg.text.is_sliding(i) == (kind == "sliding"):
            return i
    return None


def probes_for(cfg: PaliGemmaConfig, mode: Literal["all", "coarse"] = "all") -> list[Probe]:
    """The table expanded for a config, in execution order: a block's sub-layer rows come right before its row."""
    out: list[Probe] = []
    group: list[Probe] = []  # sub-layer rows waiting for their block-level row
    for p in PROBES:
        if (p.family and p.family != cfg.family) or (mode == "coarse" and not p.coarse):
            continue
        if p.first_of:
            if (i := _first_layer(cfg, p.first_of)) is not None:
                out.append(_at(p, i))
        elif not p.layers:
            assert not group, f"sub-layer rows before {p.name} have no block row"
            out.append(p)
        elif not p.coarse:
            group.append(p)
        else:
            n = cfg.vision.num_layers if p.layers == "vision" else cfg.text.num_layers
            out.extend(_at(r, i) for i in range(n) for r in (*group, p))
            group = []
    return out


def _at(p: Probe, i: int) -> Probe:
    def fill(s: str) -> str:
        return s.replace("{i}", str(i))

    return replace(p, name=fill(p.name), ours=fill(p.ours), ref=fill(p.ref), layer=i)
