"""big_vision `.npz` import/export against an independently built big_vision tree.

`big_vision_tree` below is the test's own oracle: it writes the big_vision parameter tree from a transformers
model's in-memory weights, following big_vision's module definitions (ViT `Conv` HWIO kernels, `Dense` (in, out)
kernels, `MultiHeadDotProductAttention` (D, N, H) / (N, H, D) kernels, Gemma einsums `q_einsum` (N, D, H),
`kv_einsum` (2, K, D, H), `attn_vec_einsum` (N, H, D), `gating_einsum` (2, D, F), `linear` (F, D), layers
stacked on axis 0, 257152-row embedding) with plain numpy and `np.savez`, as big_vision does. It never calls
pgconv's table, so the import is checked against a separate reading of the same description.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import PaliGemmaConfig as HFConfig
from transformers import PaliGemmaForConditionalGeneration

from pgconv.converter.custom import open_spec_checkpoint
from pgconv.converter.layouts import from_native, to_native
from pgconv.converter.npz import NpzReader
from pgconv.converter.spec_write import convert_to_spec
from pgconv.errors import InputError
from pgconv.model.config import PRESETS
from pgconv.model.hf_config import to_hf_config

HF_NAMES = "hf-5.6"  # transformers 5.24 in-memory names


def hf_model(preset: str, dtype: torch.dtype, *, zero_extra_rows: bool = True, seed: int = 0, cfg=None):
    cfg = cfg or PRESETS[preset]
    torch.manual_seed(seed)
    m = PaliGemmaForConditionalGeneration(HFConfig(**to_hf_config(cfg, dtype="float32"))).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        if zero_extra_rows:  # rows big_vision does not have (see converter/big_vision.py): the import pads zeros
            m.model.language_model.embed_tokens.weight[cfg.image_token_index:] = 0
    return cfg, m.to(dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def big_vision_tree(m: PaliGemmaForConditionalGeneration, cfg) -> dict[str, np.ndarray]:
    """The big_vision tree (without `params/`) of a transformers PaliGemma, written from big_vision's modules."""
    sd = {k: _np(v.detach().contiguous()) for k, v in m.state_dict().items()}
    v, t = cfg.vision, cfg.text
    vt, lm = "model.vision_tower.", "model.language_model."

    def stack(n: int, name: str, f=lambda x: x) -> np.ndarray:
        return np.stack([f(sd[name.format(i)]) for i in range(n)])

    enc, tree = vt + "encoder.layers.{}.", {}
    tree["img/embedding/kernel"] = sd[vt + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)  # OIHW->HWIO
    tree["img/embedding/bias"] = sd[vt + "embeddings.patch_embedding.bias"]
    tree["img/pos_embedding"] = sd[vt + "embeddings.position_embedding.weight"][None]
    blk = "img/Transformer/encoderblock/"
    for j, ln in (("0", "layer_norm1"), ("1", "layer_norm2")):
        tree[blk + f"LayerNorm_{j}/scale"] = stack(v.num_layers, enc + ln + ".weight")
        tree[blk + f"LayerNorm_{j}/bias"] = stack(v.num_layers, enc + ln + ".bias")
    mha = blk + "MultiHeadDotProductAttention_0/"
    for bv, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        # Dense over (D) -> (N, H): y = x @ kernel, HF y = x @ W.T
        tree[mha + f"{bv}/kernel"] = stack(v.num_layers, enc + f"self_attn.{hf}.weight",
                                           lambda w: w.T.reshape(v.hidden_size, v.num_heads, v.head_dim))
        tree[mha + f"{bv}/bias"] = stack(v.num_layers, enc + f"self_attn.{hf}.bias",
                                         lambda b: b.reshape(v.num_heads, v.head_dim))
    tree[mha + "out/kernel"] = stack(v.num_layers, enc + "self_attn.out_proj.weight",
                                     lambda w: w.T.reshape(v.num_heads, v.head_dim, v.hidden_size))
    tree[mha + "out/bias"] = stack(v.num_layers, enc + "self_attn.out_proj.bias")
    for j, fc in (("0", "fc1"), ("1", "fc2")):
        tree[blk + f"MlpBlock_0/Dense_{j}/kernel"] = stack(v.num_layers, enc + f"mlp.{fc}.weight", lambda w: w.T)
        tree[blk + f"MlpBlock_0/Dense_{j}/bias"] = stack(v.num_layers, enc + f"mlp.{fc}.bias")
    tree["img/Transformer/encoder_norm/scale"] = sd[vt + "post_layernorm.weight"]
    tree["img/Transformer/encoder_norm/bias"] = sd[vt + "post_layernorm.bias"]
    tree["img/head/kernel"] = sd["model.multi_modal_projector.linear.weight"].T
    tree["img/head/bias"] = sd["model.multi_modal_projector.linear.bias"]

    lay, n, k, h, d = lm + "layers.{}.", t.num_heads, t.num_kv_heads, t.head_dim, t.hidden_size
    tree["llm/embedder/input_embedding"] = sd[lm + "embed_tokens.weight"][: cfg.image_token_index]
    heads = lambda w, count: w.reshape(count, h, d).transpose(0, 2, 1)  # (count*H, D) -> (count, D, H)  # noqa: E731
    if k == n:
        tree["llm/layers/attn/qkv_einsum/w"] = np.stack([np.stack(
            [heads(sd[lay.format(i) + f"self_attn.{x}_proj.weight"], n) for x in "qkv"]) for i in range(t.num_layers)])
    else:
        tree["llm/layers/attn/q_einsum/w"] = stack(t.num_layers, lay + "self_attn.q_proj.weight", lambda w: heads(w, n))
        tree["llm/layers/attn/kv_einsum/w"] = np.stack([np.stack(
            [heads(sd[lay.format(i) + f"self_attn.{x}_proj.weight"], k) for x in "kv"]) for i in range(t.num_layers)])
    tree["llm/layers/attn/attn_vec_einsum/w"] = stack(t.num_layers, lay + "self_attn.o_proj.weight",
                                                      lambda w: w.reshape(d, n, h).transpose(1, 2, 0))
    tree["llm/layers/mlp/gating_einsum"] = np.stack([np.stack(
        [sd[lay.format(i) + f"mlp.{x}_proj.weight"].T for x in ("gate", "up")]) for i in range(t.num_layers)])
    tree["llm/layers/mlp/linear"] = stack(t.num_layers, lay + "mlp.down_proj.weight", lambda w: w.T)
    tree["llm/layers/pre_attention_norm/scale"] = stack(t.num_layers, lay + "input_layernorm.weight")
    if t.family == "gemma":  # Gemma 1: HF post_attention_layernorm is the pre-MLP norm
        tree["llm/layers/pre_ffw_norm/scale"] = stack(t.num_layers, lay + "post_attention_layernorm.weight")
    else:
        tree["llm/layers/pre_ffw_norm/scale"] = stack(t.num_layers, lay + "pre_feedforward_layernorm.weight")
        tree["llm/layers/post_attention_norm/scale"] = stack(t.num_layers, lay + "post_attention_layernorm.weight")
        tree["llm/layers/post_ffw_norm/scale"] = stack(t.num_layers, lay + "post_feedforward_layernorm.weight")
    tree["llm/final_norm/scale"] = sd[lm + "norm.weight"]
    return tree


def save_tree(path, tree: dict[str, np.ndarray], prefix: str = "params/", compressed: bool = False,
              order: str = "C"):
    """np.savez like big_vision (jax arrays come out C-contiguous); order="K" keeps transposes Fortran-ordered."""
    arrays = {prefix + k: np.asarray(v, order=order) for k, v in tree.items()}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def native_of(m, cfg) -> dict[str, torch.Tensor]:
    return to_native(m.state_dict(), cfg, HF_NAMES)


def load_natives(path, config=None, **kw) -> dict[str, torch.Tensor]:
    ck = open_spec_checkpoint(path, "big-vision", config, **kw)
    return {n: t.load() for n, t in ck.tensors.items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].contiguous().view(torch.uint8)), name


@pytest.mark.parametrize("preset", ["tiny", "tiny-pg2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_is_bit_identical_and_export_reproduces_the_tree(tmp_path, preset, dtype):
    cfg, m = hf_model(preset, dtype)
    tree = big_vision_tree(m, cfg)
    src = save_tree(tmp_path / "pt.npz", tree)
    if dtype == torch.bfloat16:  # numpy stores bfloat16 as 2-byte void, like a real big_vision .bf16.npz
        assert np.load(src)["params/img/head/bias"].dtype == np.dtype("V2")
    natives = load_natives(src)  # preset inferred from the shapes
    assert_bit_identical(natives, native_of(m, cfg))

    out = tmp_path / "out.npz"
    convert_to_spec(src, out, "big-vision", quiet=True)  # npz -> native -> npz
    with np.load(src) as a, np.load(out) as b:
        assert list(b.keys()) == list(a.keys()) or set(b.keys()) == set(a.keys())
        for key in a.keys():
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert a[key].tobytes() == b[key].tobytes(), key
    assert_bit_identical(load_natives(out), natives)


def test_export_from_transformers_checkpoint_round_trips(tmp_path):
    cfg, m = hf_model("tiny-pg2", torch.bfloat16)
    m.save_pretrained(tmp_path / "hf")
    out = tmp_path / "bv.npz"
    summary = convert_to_spec(tmp_path / "hf", out, "big-vision", quiet=True)
    assert summary.dst_layout == "big-vision"
    with np.load(out) as got:
        tree = big_vision_tree(m, cfg)
        assert set(got.keys()) == {"params/" + k for k in tree}
        for k, v in tree.items():
            assert got["params/" + k].tobytes() == v.tobytes(), k
    meta = json.loads(zipfile.ZipFile(out).comment)
    assert meta["pgconv.format"] == "big-vision" and meta["pgconv.source_format"] == "hf-v5-save"
    again = tmp_path / "again.npz"
    convert_to_spec(tmp_path / "hf", again, "big-vision", quiet=True)
    assert again.read_bytes() == out.read_bytes()  # deterministic: same input, same bytes


def test_export_refuses_non_padding_rows_unless_allowed(tmp_path):
    cfg, m = hf_model("tiny", torch.float32, zero_extra_rows=False)  # random rows 1664.. like the hub's
    m.save_pretrained(tmp_path / "hf")
    with pytest.raises(InputError, match=r"^\S*model.safetensors: text.embed.weight: rows 1664\.\.1727 would be cut "
                                         r"but are not zero padding"):  # names the source file too
        convert_to_spec(tmp_path / "hf", tmp_path / "bv.npz", "big-vision", quiet=True)
    assert not (tmp_path / "bv.npz").exists() and not list(tmp_path.glob(".bv.npz*"))
    convert_to_spec(tmp_path / "hf", tmp_path / "bv.npz", "big-vision", allow_cut=True, quiet=True)
    with np.load(tmp_path / "bv.npz") as got:
        assert got["params/llm/embedder/input_embedding"].shape == (1664, 72)


def test_used_rows_are_refused(tmp_path):
    cfg, m = hf_model("tiny", torch.float32)
    tree = big_vision_tree(m, cfg)
    src = save_tree(tmp_path / "pt.npz", tree)
    bad = dataclasses.replace(cfg, eos_token_ids=(1, 1700))  # an eos id in the rows big_vision lacks
    with pytest.raises(InputError, match="eos token id 1700 is outside them"):
        open_spec_checkpoint(src, "big-vision", bad)


def test_mha_config_uses_qkv_einsum(tmp_path):
    base = PRESETS["tiny"]
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_kv_heads=base.text.num_heads))
    cfg, m = hf_model("tiny", torch.float32, cfg=cfg)
    tree = big_vision_tree(m, cfg)
    assert "llm/layers/attn/qkv_einsum/w" in tree
    assert_bit_identical(load_natives(save_tree(tmp_path / "pt.npz", tree), cfg), native_of(m, cfg))


@pytest.mark.parametrize("prefix,compressed,order", [("", False, "C"), ("params/", True, "C"), ("params/", False, "K")])
def test_bare_compressed_and_fortran_files(tmp_path, prefix, compressed, order):
    cfg, m = hf_model("tiny", torch.bfloat16)
    src = save_tree(tmp_path / "pt.npz", big_vision_tree(m, cfg), prefix, compressed, order)
    if order == "K":
        assert NpzReader(src).members["params/img/head/kernel"].fortran_order
    assert_bit_identical(load_natives(src), native_of(m, cfg))


def test_training_checkpoint_ignores_optimizer_state(tmp_path):
    cfg, m = hf_model("tiny", torch.float32)
    tree = {"params/" + k: v for k, v in big_vision_tree(m, cfg).items()}
    np.savez(tmp_path / "ckpt.npz", **tree, **{"opt/step": np.array(3)})
    assert_bit_identical(load_natives(tmp_path / "ckpt.npz"), native_of(m, cfg))


def test_shape_errors_name_the_rule_and_preset_candidates(tmp_path):
    cfg, m = hf_model("tiny", torch.float32)
    tree = big_vision_tree(m, cfg)
    tree["llm/layers/mlp/gating_einsum"] = tree["llm/layers/mlp/gating_einsum"].transpose(0, 1, 3, 2).copy()
    src = save_tree(tmp_path / "pt.npz", tree)
    with pytest.raises(InputError, match=r"no preset .* \(closest: tiny \(1 tensor\(s\) differ\)"):
        open_spec_checkpoint(src)
    with pytest.raises(InputError, match=r"gating_einsum' has shape \[2, 2, 96, 72\]; rule .*expects \[2, 2, 72, 96\]"):
        open_spec_checkpoint(src, config="tiny")
    with pytest.raises(InputError, match="does not match spec 'big-vision'.*missing"):
        open_spec_checkpoint(save_tree(tmp_path / "pg1.npz", big_vision_tree(m, cfg)), config="tiny-pg2")


def test_untied_config_has_no_big_vision_form(tmp_path):
    cfg, m = hf_model("tiny", torch.float32)
    untied = dataclasses.replace(cfg, tie_word_embeddings=False)
    from pgconv.converter.big_vision import SPEC
    from pgconv.converter.spec_bind import bind
    with pytest.raises(InputError, match="no rule making 1 native tensor.*lm_head.weight"):
        bind(SPEC, untied)


def test_imported_model_matches_transformers(tmp_path):
    """Our model on the imported weights gives transformers' logits (same weights loaded into transformers)."""
    from pgconv.converter.load import build_model

    cfg, m = hf_model("tiny-pg2", torch.float32)
    natives = load_natives(save_tree(tmp_path / "pt.npz", big_vision_tree(m, cfg)))
    ours = build_model(cfg, natives)
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 7, 9, 108]])
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    tti = torch.zeros_like(ids)
    ref = PaliGemmaForConditionalGeneration(HFConfig(**to_hf_config(cfg, "float32"), attn_implementation="eager"))
    assert ref.config.text_config._attn_implementation == "eager"  # PG2 softcapping is eager-only (trap 6)
    sd = from_native(natives, cfg, HF_NAMES)
    ref.load_state_dict({**sd, "lm_head.weight": sd["model.language_model.embed_tokens.weight"]}, strict=True)
    ref.eval()
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels, token_type_ids=tti).logits
        got = ours(ids, pixels, tti)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_npz_reader_sees_the_tree_without_loading(tmp_path):
    cfg, m = hf_model("tiny", torch.bfloat16)
    src = save_tree(tmp_path / "pt.npz", big_vision_tree(m, cfg))
    with NpzReader(src) as r:
        assert r.members["params/llm/layers/attn/kv_einsum/w"].shape == (2, 2, 2, 72, 24)
        assert str(r.member("params/llm/layers/attn/kv_einsum/w").dtype) == "bfloat16"


def _cli(*args) -> None:
    from pgconv.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 0


def test_cli_import_loads_in_transformers_with_identical_logits(tmp_path):
    cfg, m = hf_model("tiny", torch.float32)
    save_tree(tmp_path / "pt.npz", big_vision_tree(m, cfg))
    _cli("convert", tmp_path / "pt.npz", tmp_path / "hf", "--to", "hf-legacy", "--check", "--quiet")
    loaded, info = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                                     attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 5, 108]])
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        args = dict(input_ids=ids, pixel_values=pixels, token_type_ids=torch.zeros_like(ids))
        assert torch.equal(loaded.eval()(**args).logits, m(**args).logits)
    _cli("convert", tmp_path / "hf", tmp_path / "back.npz", "--to", "big-vision", "--check", "--quiet")
    assert (tmp_path / "back.npz").stat().st_size > 0


def test_pgconv_verify_passes_on_an_imported_checkpoint(tmp_path):
    import shutil

    from pgconv.converter.fixture import make_fixture
    from pgconv.parity.verify import verify

    fixture = make_fixture(tmp_path / "fixture", "tiny-pg2")
    cfg = PRESETS["tiny-pg2"]
    m = PaliGemmaForConditionalGeneration.from_pretrained(fixture)
    save_tree(tmp_path / "pt.npz", big_vision_tree(m, cfg))
    _cli("convert", tmp_path / "pt.npz", tmp_path / "hf", "--to", "hf-legacy", "--quiet")
    for p in fixture.iterdir():  # big_vision files carry no tokenizer: bring the fixture's
        if p.name.startswith(("tokenizer", "special_tokens", "preprocessor", "processor")):
            shutil.copy(p, tmp_path / "hf" / p.name)
    report = verify(str(tmp_path / "hf"), max_new_tokens=3)
    assert report["passed"], report["first_divergence"]


def test_vocabulary_pad_streams_in_chunks(tmp_path):
    """The padded embedding is produced in pieces (file rows, then zeros), equal to the materialised tensor."""
    from pgconv.converter.custom import RowsSource

    cfg, m = hf_model("tiny", torch.bfloat16)
    ck = open_spec_checkpoint(save_tree(tmp_path / "pt.npz", big_vision_tree(m, cfg)))
    embed = ck.tensors["text.embed.weight"]
    assert isinstance(embed, RowsSource)
    pieces = [p.clone() for p in embed.chunks(max_bytes=1000)]  # the reader reuses its buffer
    assert len(pieces) > 10 and all(p.numel() * 2 <= 1000 for p in pieces)
    assert torch.equal(torch.cat(pieces).view(torch.int16), embed.load().reshape(-1).view(torch.int16))
