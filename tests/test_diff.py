"""`pgconv diff A B`: real porting mistakes named (tensor and diagnosis, exit 1), conversions identical, casts
equivalent within rounding with KL reported, overflow and truncation caught, bad input exit 2.

A is the tiny transformers checkpoint (`make_fixture`, hf-legacy names), its vocabulary padding rows zero (as the
hub's are, so big_vision holds it whole). Each B is A's safetensors file edited the way a converter gets it wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pgconv
from pgconv.cli import main
from pgconv.converter.diagnose import rope_permutation

L = "language_model.model.layers."
V = "vision_tower.vision_model.encoder.layers."
EMB = "language_model.model.embed_tokens.weight"
H, KV, HD, D = 4, 2, 24, 72  # the tiny preset's text attention


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diff")
    a = root / "A"
    pgconv.make_fixture(a, "tiny")
    sd = load_file(str(a / "model.safetensors"))
    sd[EMB][1664:] = 0  # big_vision's vocabulary stops at 1664; the hub pads with zero rows
    save_file(sd, str(a / "model.safetensors"), metadata={"format": "pt"})
    return a


def _variant(a: Path, name: str, edit=None, config=None) -> Path:
    out = a.parent / name
    if out.exists():
        return out
    shutil.copytree(a, out)
    sd = load_file(str(a / "model.safetensors"))
    if edit is not None:
        edit(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def _cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["diff", *map(str, args)])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def llama_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.permute (interleaved RoPE rows -> half-split), as it is written."""
    dim1, dim2 = w.shape
    return w.view(heads, dim1 // heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _swap(x, y):
    def edit(sd):
        sd[x], sd[y] = sd[y], sd[x]
    return edit


def _set(name, fn):
    def edit(sd):
        sd[name] = fn(sd[name], sd)
    return edit


def _cut_config(cfg):
    cfg["vocab_size"] = cfg["text_config"]["vocab_size"] = 1600


# (variant, edit, config edit, tensor named, words the diagnosis must hold)
MISTAKES = [
    ("transposed", _set(V + "0.self_attn.out_proj.weight", lambda w, sd: w.T), None,
     "vision.blocks.0.attn.o.weight", "equals A transposed"),
    # non-square: B no longer fits its config (read leniently, still a finding, not bad input)
    ("transposed-down", _set(L + "0.mlp.down_proj.weight", lambda w, sd: w.T), None,
     "text.blocks.0.mlp.down.weight", "equals A transposed"),
    ("rope", _set(L + "0.self_attn.k_proj.weight", lambda w, sd: llama_permute(w, KV)), None,
     "text.blocks.0.attn.k.weight", "RoPE interleaved -> half-split permutation"),
    ("rope-inverse", _set(L + "1.self_attn.q_proj.weight",
                          lambda w, sd: w.view(H, HD, D)[:, rope_permutation(HD, False)].reshape(H * HD, D)), None,
     "text.blocks.1.attn.q.weight", "RoPE half-split -> interleaved permutation"),
    ("kv", _swap(L + "1.self_attn.k_proj.weight", L + "1.self_attn.v_proj.weight"), None,
     "text.blocks.1.attn.k.weight", "equals A's text.blocks.1.attn.v.weight (k and v swapped)"),
    ("gate-up", _swap(L + "0.mlp.gate_proj.weight", L + "0.mlp.up_proj.weight"), None,
     "text.blocks.0.mlp.gate.weight", "(gate and up swapped)"),
    # a vocabulary read off by one (a dropped first row, a zero row appended to keep the shape)
    ("vocab-shift", _set(EMB, lambda w, sd: torch.cat([w[1:], torch.zeros(1, w.shape[1])])), None,
     "text.embed.weight", "rows shifted by +1"),
    ("norm-offset", _set(L + "1.input_layernorm.weight", lambda w, sd: w + 1), None,
     "text.blocks.1.attn_norm.weight", "B = A + 1 (the RMSNorm (1 + w) offset applied again"),
    ("scaled", _set(EMB, lambda w, sd: w * D ** 0.5), None, "text.embed.weight", "sqrt(text width)"),
    ("vocab-cut", _set(EMB, lambda w, sd: w[:1600]), _cut_config, "text.embed.weight",
     "A's first 1600 of 1728 rows (cut: 128 rows dropped, 64 of them nonzero)"),
    # big_vision's q_einsum is (heads, width, head_dim): reshaped to (heads * head_dim, width) without the transpose
    ("einsum", _set(L + "0.self_attn.q_proj.weight",
                    lambda w, sd: w.view(H, HD, D).permute(0, 2, 1).reshape(H * HD, D)), None,
     "text.blocks.0.attn.q.weight", "viewed as (heads=4, head_dim=24, width=72) with axes permuted to (heads, width, "
                                    "head_dim) and flattened"),
    ("heads", _set(L + "1.self_attn.q_proj.weight", lambda w, sd: w.view(H, HD, D)[[1, 0, 3, 2]].reshape(H * HD, D)),
     None, "text.blocks.1.attn.q.weight", "heads permuted: B heads 0..3 = A heads [1, 0, 3, 2]"),
    ("layer", _set(L + "1.mlp.down_proj.weight", lambda w, sd: sd[L + "0.mlp.down_proj.weight"].clone()), None,
     "text.blocks.1.mlp.down.weight", "layer 1 holds layer 0's weights"),
    ("patch-kernel", _set("vision_tower.vision_model.embeddings.patch_embedding.weight",
                          lambda w, sd: w.permute(0, 1, 3, 2)), None, "vision.patch_embed.weight",
     "axes permuted to (d0, d1, d3, d2)"),
    ("truncated", _set(L + "0.mlp.up_proj.weight",
                       lambda w, sd: (w.view(torch.int32) & -65536).view(torch.float32)), None,
     "text.blocks.0.mlp.up.weight", "rounded toward zero (truncated)"),
]


@pytest.mark.parametrize(("variant", "edit", "config", "tensor", "words"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_porting_mistake_is_named_with_its_tensor_and_diagnosis(ckpt, capsys, variant, edit, config, tensor,
                                                                     words):
    b = _variant(ckpt, variant, edit, config)
    code, out, err = _cli(capsys, ckpt, b, "--weights-only")
    assert code == 1, out + err
    line = next((ln.strip() for ln in out.splitlines() if ln.strip().startswith(tensor + ":")), None)
    assert line is not None, out
    assert words in line, line
    assert "verdict: DIFFERS" in out


def test_a_mistake_runs_both_models_and_finds_the_first_divergent_probe(ckpt, capsys, tmp_path):
    b = _variant(ckpt, "kv", next(m[1] for m in MISTAKES if m[0] == "kv"))
    code, out, _ = _cli(capsys, ckpt, b, "--report", tmp_path / "r", "--max-new-tokens", 4)
    assert code == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["tool"] == "pgconv diff" and report["schema_version"] == 1 and report["verdict"] == "differs"
    case = report["behaviour"]["cases"][0]
    # layer 1's attention is the first step that reads k and v of layer 1; everything before it is bit-identical
    assert case["first_divergence"]["name"] == "text.blocks.1.attn"
    before = [r for r in case["probes"] if r["name"] == "text.blocks.1.attn_norm"][0]
    assert before["max_abs"] == 0
    assert case["logits"]["kl_mean"] > 0.01 and case["logits"]["kl_p99"] <= case["logits"]["kl_max"]
    assert {"a_tokens", "b_tokens", "agreement", "first_divergence"} <= set(case["greedy"])
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.json", "report.md", "report.html", "junit.xml"}
    assert "k and v swapped" in (tmp_path / "r" / "report.md").read_text()
    assert 'failures="' in (tmp_path / "r" / "junit.xml").read_text()


@pytest.mark.parametrize("layout", ["hf-legacy", "hf-v5-save", "hf-4.52", "hf-5.6", "native", "big-vision",
                                    "big-vision-and-back"])
def test_a_against_its_own_conversion_to_every_layout_is_identical(ckpt, layout):
    b = ckpt.parent / f"conv-{layout}"
    if layout.startswith("big-vision"):
        npz = ckpt.parent / "A.npz"
        if not npz.exists():
            pgconv.convert(ckpt, npz, "big-vision", quiet=True)
        if layout == "big-vision":
            b = npz
        elif not b.exists():
            pgconv.convert(npz, b, "hf-legacy", quiet=True)
    elif not b.exists():
        pgconv.convert(ckpt, b, layout, quiet=True)
    report = pgconv.diff(ckpt, b, weights_only=True)
    assert report["verdict"] == "identical", report["failures"]
    assert report["weights"]["identical"] == report["weights"]["compared"] == 59


def test_identical_behaviour_is_bit_identical_through_big_vision(ckpt, capsys):
    npz = ckpt.parent / "A.npz"
    if not npz.exists():
        pgconv.convert(ckpt, npz, "big-vision", quiet=True)
    # B has no tokenizer next to it: A's makes the inputs; A and B change places to show either side works
    code, out, _ = _cli(capsys, npz, ckpt, "--max-new-tokens", 3)
    assert code == 0, out
    assert "every probe bit-identical" in out and "verdict: identical" in out


@pytest.mark.parametrize(("dtype", "impl"), [("bfloat16", "transformers"), ("float16", "pgconv")])
def test_a_cast_is_equivalent_within_rounding_with_kl_reported(ckpt, capsys, dtype, impl):
    b = ckpt.parent / f"A-{dtype}"
    if not b.exists():
        pgconv.convert(ckpt, b, "hf-5.6", dtype=dtype, quiet=True)
    report = pgconv.diff(ckpt, b, impl=impl, max_new_tokens=3)
    assert report["verdict"] == f"equivalent within {dtype} rounding", report["failures"]
    assert report["weights"]["within_rounding"] == 59 and not report["weights"]["findings"]
    lg = report["behaviour"]["cases"][0]["logits"]
    assert 0 < lg["kl_mean"] <= lg["kl_p99"] <= lg["kl_max"] < 0.05
    assert report["behaviour"]["impl"] == impl and not report["behaviour"]["cast_run"]
    code, out, _ = _cli(capsys, ckpt, b, "--weights-only")
    assert code == 0 and f"verdict: equivalent within {dtype} rounding" in out


def test_an_fp16_cast_of_values_beyond_65504_is_reported_as_overflow(ckpt, capsys):
    def big(sd):
        sd[L + "0.mlp.down_proj.weight"][0, :3] = torch.tensor([7e4, -1e5, 65519.0])  # 65519 rounds to 65504: fine
    a = _variant(ckpt, "A-big", big)
    b = a.parent / "A-big-f16"
    if not b.exists():
        pgconv.convert(a, b, "hf-legacy", dtype="float16", quiet=True)
    code, out, _ = _cli(capsys, a, b, "--weights-only")
    assert code == 1
    assert ("text.blocks.0.mlp.down.weight: lossy cast to float16: 2 value(s) beyond +-65504 became inf (max |A| "
            "100000)") in out
    assert "58 within float16 rounding, 1 differ" in out


def test_ties_broken_away_from_zero_are_judged_against_a_run_of_a_rounded_to_nearest(ckpt):
    # One tensor of A at exact bfloat16 ties; B rounds them away from zero, RNE to even: half are one ulp apart.
    name = L + "0.mlp.down_proj.weight"

    def ties(sd):
        bits = sd[name].view(torch.int32)
        sd[name] = ((bits & -65536) | 0x8000).view(torch.float32)
    a = _variant(ckpt, "A-ties", ties)

    def away(sd):
        ties(sd)
        for k, w in sd.items():
            bits = w.view(torch.int32)
            up = (w == w.to(torch.bfloat16).float()) | (bits & 0xFFFF != 0x8000)  # not a tie: to nearest
            sd[k] = torch.where(up, w.to(torch.bfloat16).float(), ((bits & -65536) + 0x10000).view(torch.float32))
            sd[k] = sd[k].to(torch.bfloat16)
    b = _variant(ckpt, "A-ties-away", away)
    report = pgconv.diff(a, b, max_new_tokens=2)
    row = next(r for r in report["weights"]["tensors"] if r["name"] == "text.blocks.0.mlp.down.weight")
    assert row["status"] == "rounding" and row["cast"]["ties_other_way"] > 0, row
    assert report["behaviour"]["cast_run"] is True
    case = report["behaviour"]["cases"][0]
    assert "cast" in case and case["logits"]["cast_budget_kl_mean"] >= case["cast"]["logits"]["kl_mean"]
    assert report["verdict"] == "equivalent within bfloat16 rounding", report["failures"]


def test_lm_head_stored_untied_is_the_same_model(ckpt):
    b = ckpt.parent / "untied"
    if not b.exists():
        pgconv.convert(ckpt, b, "hf-legacy", untie=True, quiet=True)
    report = pgconv.diff(ckpt, b, weights_only=True)
    assert report["verdict"] == "identical", report["failures"]
    assert "B stores the tied head untied" in report["weights"]["notes"][0]


@pytest.mark.parametrize(("args", "words"), [
    (["{a}", "{missing}"], "no such file or directory"),
    (["{a}", "{a}", "--dtype", "float64"], "Invalid value for '--dtype'"),
    (["{a}", "{a}", "--image", "{missing}"], "image not found"),
    (["{npz}", "{npz}"], "neither has a tokenizer"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, capsys, tmp_path, args, words):
    npz = ckpt.parent / "A.npz"
    if not npz.exists():
        pgconv.convert(ckpt, npz, "big-vision", quiet=True)
    code, out, err = _cli(capsys, *[x.format(a=ckpt, missing=tmp_path / "nope", npz=npz) for x in args])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_api_checks_impl_and_is_exported(ckpt):
    from pgconv.errors import InputError

    with pytest.raises(InputError, match="impl 'keras'"):
        pgconv.diff(ckpt, ckpt, impl="keras")
    assert pgconv.diff is __import__("pgconv.parity.diff", fromlist=["diff"]).diff


def test_a_config_difference_is_a_finding_and_both_still_run(ckpt, capsys):
    b = _variant(ckpt, "theta", config=lambda c: c["text_config"]["rope_parameters"].update(rope_theta=10000.0))
    code, out, _ = _cli(capsys, ckpt, b, "--max-new-tokens", 2)
    assert code == 1
    assert "config: text.rope_theta: 5000.0 (A) vs 10000.0 (B)" in out
    assert "59 identical" in out and "first divergence (past verify's float32 noise budget): text.rope," in out


def test_a_spec_with_a_norm_offset_read_back_through_it_is_within_float32_rounding(ckpt, tmp_path, capsys):
    from pgconv.converter.spec import BUILTIN_DIR

    spec = tmp_path / "plus-one.toml"  # a user format storing the final norm as 1 + w (native = file - 1)
    text = (BUILTIN_DIR / "native.toml").read_text().replace('name = "native"', 'name = "plus-one"')
    rule = 'native = "text.norm.weight"\n'
    spec.write_text(text.replace(rule, rule + "ops = [{add = -1.0}]\n"))
    b = tmp_path / "p1"
    pgconv.convert(ckpt, b, str(spec), quiet=True)
    code, _, err = _cli(capsys, ckpt, b, "--weights-only")
    assert code == 2 and "read it with the spec that wrote it" in err  # an offset must never be missed
    code, out, _ = _cli(capsys, ckpt, b, "--from-b", spec, "--max-new-tokens", 2)
    assert code == 0, out
    assert "text.norm.weight: A + 1 rounded to float32 and back" in out
    assert "verdict: equivalent within float32 rounding" in out


def test_missing_and_unexpected_tensors_are_findings_not_bad_input(ckpt, capsys):
    b = _variant(ckpt, "dropped", lambda sd: sd.pop("vision_tower.vision_model.post_layernorm.bias"))
    code, out, _ = _cli(capsys, ckpt, b)
    assert code == 1
    assert "vision.norm.bias: missing in B" in out and "behaviour: not run (B's tensors do not fit A's model" in out
    c = _variant(ckpt, "extra", lambda sd: sd.update({"language_model.model.layers.0.extra.weight": torch.ones(3)}))
    code, out, _ = _cli(capsys, ckpt, c, "--weights-only")
    assert code == 1
    assert "language_model.model.layers.0.extra.weight: stored in B but no tensor of layout hf-legacy" in out


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_a_transformers_saved_checkpoint_and_the_gemma2_norm_name_trap(tmp_path, capsys, family):
    from tester_checkpoints import pg_tester_checkpoint

    a = pg_tester_checkpoint(tmp_path / "A", family)  # transformers' save_pretrained (its tester config)
    native = tmp_path / "native"
    pgconv.convert(a, native, "native", quiet=True)
    report = pgconv.diff(a, native, max_new_tokens=2)
    assert report["verdict"] == "identical" and report["behaviour"]["cases"][0]["bit_identical"], report["failures"]
    sd = load_file(str(next(a.glob("*.safetensors"))))
    key = next(k for k in sd if k.endswith("layers.0.post_attention_layernorm.weight"))
    other = key.replace("post_attention_layernorm", "pre_feedforward_layernorm" if family == "gemma2" else
                        "input_layernorm")
    b = tmp_path / "B"
    shutil.copytree(a, b)
    sd[key], sd[other] = sd[other], sd[key]
    save_file(sd, str(next(b.glob("*.safetensors"))), metadata={"format": "pt"})
    code, out, _ = _cli(capsys, a, b, "--weights-only")
    assert code == 1
    if family == "gemma2":  # post_attention_layernorm is Gemma 2's post-attention norm, not the pre-MLP one
        assert ("text.blocks.0.post_attn_norm.weight: equals A's text.blocks.0.mlp_norm.weight (post-attention and "
                "pre-MLP norms swapped (Gemma 2's post_attention_layernorm is not Gemma's pre-MLP norm") in out
    else:
        assert "text.blocks.0.mlp_norm.weight: equals A's text.blocks.0.attn_norm.weight (the input and pre-MLP " \
               "norms swapped)" in out
