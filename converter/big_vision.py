"""big_vision PaliGemma checkpoints (`.npz`) as a spec: the transform table, written as data.

Source: `google-research/big_vision` `models/proj/paligemma/paligemma.py` (img = `models/vit.py` with
`scan=True`, llm = `models/ppp/gemma.py`); `../shared/reference/paligemma.md` §6.2 and `conversion.md` §5. Each row
is (big_vision name without `params/`, native name(s), big_vision shape, ops file -> native). Shapes are
expressions in the config's sizes (`spec.symbols`): they are asserted against the file and the ops' output against
`layouts.native_shapes`; no transform is ever chosen from a tensor's shape.

* Scan stacking: every ViT block tensor and every LLM `layers/...` tensor has the layer axis first
  (`layer_axis = 0`); a layer is a contiguous slice of the member, read on its own.
* Attention einsums: `q_einsum` (N,D,H) and `kv_einsum` (2,K,D,H) when K < N (every PaliGemma), `qkv_einsum`
  (3,N,D,H) when K == N. PaliGemma 1's `kv_einsum` is (2,1,D,H): the same expression with K = 1 (the HF PG1
  script's `[i,0,0].T`); PaliGemma 2's has K = 4/8/16. `attn_vec_einsum` (N,H,D) becomes (D, N*H), not
  (N*H, D) (the HF PG1 script's reshape works only because N*H == D there).
* Norms: `pre_attention_norm` -> attn_norm, `pre_ffw_norm` -> mlp_norm (the pre-MLP norm) in both generations;
  Gemma 2 adds `post_attention_norm`/`post_ffw_norm` -> post_attn_norm/post_mlp_norm. transformers names the
  pre-MLP norm `post_attention_layernorm` in PaliGemma 1 but `pre_feedforward_layernorm` in PaliGemma 2 (trap 12);
  that rename lives in layouts.py, so every layout follows. Both sides compute `x * (1 + scale)`: no offset.
* Vocabulary: big_vision's embedding has one row per token, 256000 + 1024 `<loc>` + 128 `<seg>` = 257152 (tiny:
  512 + 1024 + 128 = 1664). transformers appended `<image>` (id 257152, = `image_token_index`) and padded to a
  multiple of 64: 257216 rows (tiny: 1728). So big_vision's row count is `I` (image_token_index) and ours is `V`.
  - Import pads rows I..V-1 with zeros. Deterministic and exact in every dtype, and no value is invented: those
    rows are never an input (`<image>` positions are replaced by image features, the other ids are never
    produced by the tokenizer); as tied output rows they give logit 0 (they do not exist in big_vision).
    The HF conversion script samples them from N(mean, 1e-5 cov) instead, which no one can reproduce.
  - Export cuts back to I rows. It refuses when a cut row is *used*: a token id the config names for text
    (pad, bos, eos) is >= I, so big_vision would have no embedding for it (`<image>` is not such a use, as
    above; checked by `spec_bind.bind`). It also refuses when the cut rows are not the zero padding (e.g. the
    hub's random rows, or trained rows): dropping them must be asked for (`allow_cut`, `--allow-vocab-cut`).
* big_vision ties the output projection to the embedding (`decode` is `x @ E.T`): an untied config has no
  big_vision form (no rule makes `lm_head.weight`).
"""

from __future__ import annotations

from pgconv.converter.spec import Rule, Spec
from pgconv.converter.spec_ops import OpSpec

__all__ = ["SPEC", "TABLE", "RULES"]


def _t(*perm: int) -> OpSpec:
    return OpSpec("transpose", list(perm))


def _r(*shape: int | str) -> OpSpec:
    return OpSpec("reshape", list(shape))


_UNBIND = OpSpec("unbind", 0)
_BLOCK = "img/Transformer/encoderblock/"  # scanned ViT blocks (a non-scan tree would say encoderblock_{i})
_ATTN = _BLOCK + "MultiHeadDotProductAttention_0/"
_QKV = (("query", "q"), ("key", "k"), ("value", "v"))

# (big_vision name, native name(s), big_vision shape, ops file -> native, when)
TABLE: list[tuple[str, str | list[str], list[int | str], list[OpSpec], tuple[str, ...]]] = [
    ("img/embedding/kernel", "vision.patch_embed.weight", ["vP", "vP", "vC", "vD"], [_t(3, 2, 0, 1)], ()),  # HWIO->OIHW
    ("img/embedding/bias", "vision.patch_embed.bias", ["vD"], [], ()),
    ("img/pos_embedding", "vision.pos_embed.weight", [1, "vT", "vD"], [_r("vT", "vD")], ()),
    (_BLOCK + "LayerNorm_0/scale", "vision.blocks.{i}.norm1.weight", ["vL", "vD"], [], ()),
    (_BLOCK + "LayerNorm_0/bias", "vision.blocks.{i}.norm1.bias", ["vL", "vD"], [], ()),
    *[(_ATTN + f"{bv}/kernel", f"vision.blocks.{{i}}.attn.{ours}.weight", ["vL", "vD", "vN", "vH"],
       [_r("vD", "vN*vH"), _t(1, 0)], ()) for bv, ours in _QKV],
    *[(_ATTN + f"{bv}/bias", f"vision.blocks.{{i}}.attn.{ours}.bias", ["vL", "vN", "vH"], [_r("vN*vH")], ())
      for bv, ours in _QKV],
    (_ATTN + "out/kernel", "vision.blocks.{i}.attn.o.weight", ["vL", "vN", "vH", "vD"], [_r("vN*vH", "vD"), _t(1, 0)], ()),
    (_ATTN + "out/bias", "vision.blocks.{i}.attn.o.bias", ["vL", "vD"], [], ()),
    (_BLOCK + "LayerNorm_1/scale", "vision.blocks.{i}.norm2.weight", ["vL", "vD"], [], ()),
    (_BLOCK + "LayerNorm_1/bias", "vision.blocks.{i}.norm2.bias", ["vL", "vD"], [], ()),
    (_BLOCK + "MlpBlock_0/Dense_0/kernel", "vision.blocks.{i}.mlp.fc1.weight", ["vL", "vD", "vF"], [_t(1, 0)], ()),
    (_BLOCK + "MlpBlock_0/Dense_0/bias", "vision.blocks.{i}.mlp.fc1.bias", ["vL", "vF"], [], ()),
    (_BLOCK + "MlpBlock_0/Dense_1/kernel", "vision.blocks.{i}.mlp.fc2.weight", ["vL", "vF", "vD"], [_t(1, 0)], ()),
    (_BLOCK + "MlpBlock_0/Dense_1/bias", "vision.blocks.{i}.mlp.fc2.bias", ["vL", "vD"], [], ()),
    ("img/Transformer/encoder_norm/scale", "vision.norm.weight", ["vD"], [], ()),
    ("img/Transformer/encoder_norm/bias", "vision.norm.bias", ["vD"], [], ()),
    ("img/head/kernel", "projector.weight", ["vD", "D"], [_t(1, 0)], ()),  # the ViT head Dense is the projector
    ("img/head/bias", "projector.bias", ["D"], [], ()),
    ("llm/embedder/input_embedding", "text.embed.weight", ["I", "D"], [OpSpec("pad_rows", "V")], ()),  # vocab rule above
    ("llm/layers/pre_attention_norm/scale", "text.blocks.{i}.attn_norm.weight", ["L", "D"], [], ()),
    ("llm/layers/attn/q_einsum/w", "text.blocks.{i}.attn.q.weight", ["L", "N", "D", "H"], [_t(0, 2, 1), _r("N*H", "D")],
     ("gqa",)),
    ("llm/layers/attn/kv_einsum/w", ["text.blocks.{i}.attn.k.weight", "text.blocks.{i}.attn.v.weight"],
     ["L", 2, "K", "D", "H"], [_UNBIND, _t(0, 2, 1), _r("K*H", "D")], ("gqa",)),
    ("llm/layers/attn/qkv_einsum/w", [f"text.blocks.{{i}}.attn.{x}.weight" for x in "qkv"],
     ["L", 3, "N", "D", "H"], [_UNBIND, _t(0, 2, 1), _r("N*H", "D")], ("mha",)),
    ("llm/layers/attn/attn_vec_einsum/w", "text.blocks.{i}.attn.o.weight", ["L", "N", "H", "D"],
     [_t(2, 0, 1), _r("D", "N*H")], ()),
    ("llm/layers/post_attention_norm/scale", "text.blocks.{i}.post_attn_norm.weight", ["L", "D"], [], ("gemma2",)),
    ("llm/layers/pre_ffw_norm/scale", "text.blocks.{i}.mlp_norm.weight", ["L", "D"], [], ()),
    ("llm/layers/mlp/gating_einsum", ["text.blocks.{i}.mlp.gate.weight", "text.blocks.{i}.mlp.up.weight"],
     ["L", 2, "D", "F"], [_UNBIND, _t(1, 0)], ()),
    ("llm/layers/mlp/linear", "text.blocks.{i}.mlp.down.weight", ["L", "F", "D"], [_t(1, 0)], ()),
    ("llm/layers/post_ffw_norm/scale", "text.blocks.{i}.post_mlp_norm.weight", ["L", "D"], [], ("gemma2",)),
    ("llm/final_norm/scale", "text.norm.weight", ["D"], [], ()),
]


def _rule(file: str, native: str | list[str], shape: list, ops: list[OpSpec], when: tuple[str, ...]) -> Rule:
    natives = (native,) if isinstance(native, str) else tuple(native)
    stacked = "{i}" in natives[0]
    return Rule((file,), natives, tuple(ops), (tuple(shape),), 0 if stacked else None, when)


RULES = tuple(_rule(*row) for row in TABLE)

SPEC = Spec(
    name="big-vision",
    description="google-research/big_vision PaliGemma 1/2 .npz (scanned ViT, stacked Gemma layers, 257152-row vocab)",
    format="npz",
    prefix="params/",
    rules=RULES,
    metadata=(("source", "google-research/big_vision models/proj/paligemma"),),
)
