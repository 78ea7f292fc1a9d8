"""`pgconv.load`: strict loading from every layout, logits equal to transformers, shared-storage construction."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_helpers import hf_model, random_state, tiny_inputs, write_checkpoint
from pgconv.converter.convert import convert
from pgconv.converter.layouts import LAYOUTS, to_native
from pgconv.converter.load import build_model, from_transformers, load, load_state_dict
from pgconv.errors import InputError
from pgconv.model.config import PRESETS


def _ours(model, inputs):
    return model(inputs["input_ids"], inputs["pixel_values"], inputs["token_type_ids"], inputs["attention_mask"])


@pytest.mark.parametrize("name, tie, shard", [("tiny", True, None), ("tiny-pg2", True, "100KB"), ("tiny", False, "100KB")])
def test_load_transformers_save_gives_transformers_logits(tmp_path, name, tie, shard):
    cfg = PRESETS[name].replace(tie_word_embeddings=tie)
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "ck", **({"max_shard_size": shard} if shard else {}))
    model = load(tmp_path / "ck")
    assert not any(p.is_meta for p in model.parameters()) and (model.lm_head is None) == tie
    inputs = tiny_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(_ours(model, inputs), hf(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_load_state_dict_from_every_layout(tmp_path, layout):
    cfg = PRESETS["tiny-pg2"]
    sd = random_state(cfg, "native", "BF16", bits=False)
    write_checkpoint(tmp_path / "src", cfg, sd, dtype="bfloat16")
    convert(tmp_path / "src", tmp_path / layout, to=layout, quiet=True)
    got_cfg, got = load_state_dict(tmp_path / layout)
    assert got_cfg == cfg and got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    _, cast = load_state_dict(tmp_path / layout, dtype=torch.float32)
    assert all(v.dtype == torch.float32 and torch.equal(v, sd[k].float()) for k, v in cast.items())


def _edit(tmp_path, change) -> str:
    cfg = PRESETS["tiny"]
    write_checkpoint(tmp_path / "ck", cfg, random_state(cfg, "hf-legacy", "F32", bits=False))
    sd = load_file(tmp_path / "ck" / "model.safetensors")
    match = change(sd)
    save_file(sd, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    return match


@pytest.mark.parametrize("change", [
    lambda sd: (sd.pop("language_model.model.layers.1.mlp.up_proj.weight"), r"missing 1 tensor\(s\): language_model.model.layers.1.mlp.up_proj.weight")[1],
    lambda sd: (sd.update({"vision_tower.vision_model.extra.weight": torch.zeros(1)}), r"unexpected 1 tensor\(s\): vision_tower.vision_model.extra.weight")[1],
    lambda sd: (sd.update({"multi_modal_projector.linear.bias": torch.zeros(71)}), r"'multi_modal_projector.linear.bias' has shape \[71\]; the config implies \[72\]")[1],
], ids=["missing", "unexpected", "misshaped"])
def test_load_is_strict_and_names_the_tensor(tmp_path, change):
    match = _edit(tmp_path, change)
    with pytest.raises(InputError, match=match):
        load(tmp_path / "ck")


def _differing_head(tmp_path):
    """A transformers save of the tiny model plus a stored lm_head that differs from the embedding, config tied."""
    from safetensors.torch import load_file, save_file

    cfg = PRESETS["tiny"]
    hf_model(cfg).save_pretrained(tmp_path / "ck")
    sd = load_file(tmp_path / "ck" / "model.safetensors")
    sd["language_model.lm_head.weight"] = torch.randn(sd["language_model.model.embed_tokens.weight"].shape) * 0.1
    save_file(sd, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["tie_word_embeddings"] is True
    return cfg, sd["language_model.lm_head.weight"]


def test_tied_head_that_differs_is_used_untied_like_transformers(tmp_path):
    """transformers 5 warns and keeps both (checked here with transformers itself); pgconv.load does the same with a
    PgconvWarning, and convert still refuses (it would have to pick one)."""
    from transformers import PaliGemmaForConditionalGeneration

    from pgconv.errors import PgconvWarning

    cfg, head = _differing_head(tmp_path)
    ref = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "ck", attn_implementation="eager").eval()
    assert ref.lm_head.weight is not ref.get_input_embeddings().weight and torch.equal(ref.lm_head.weight, head)
    with pytest.warns(PgconvWarning, match=r"'language_model.lm_head.weight' differs from .*using both untied"):
        model = load(tmp_path / "ck")
    assert not model.cfg.tie_word_embeddings and torch.equal(model.lm_head.weight, head)
    inputs = tiny_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(_ours(model, inputs), ref(**inputs).logits, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="differs from .* pass --untie"):
        convert(tmp_path / "ck", tmp_path / "out", to="hf-5.6", quiet=True)


def test_differing_tied_head_is_one_warning_line_in_generate(tmp_path, capsys):
    from pgconv.cli import main
    from pgconv.converter.tokenizer_fixture import write_tokenizer
    from pgconv.converter.fixture import default_image, make_fixture

    _differing_head(tmp_path)
    fixture = make_fixture(tmp_path / "fx", "tiny")
    write_tokenizer(tmp_path / "ck")
    (tmp_path / "ck" / "preprocessor_config.json").write_text((fixture / "preprocessor_config.json").read_text())
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path / "ck"), "--image", str(default_image()), "--prompt", "caption en",
              "--max-new-tokens", "3"])
    _, err = capsys.readouterr()
    assert e.value.code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("pgconv: warning:")]
    assert len(lines) == 1 and "using both untied, as transformers does" in lines[0], err


def test_differing_tied_head_verifies_untied_and_reports_it(tmp_path, capsys):
    """verify compares with transformers as it loads the checkpoint (untied), and says so in the report and in one
    warning line."""
    from pgconv.cli import main
    from pgconv.converter.fixture import make_fixture

    src = make_fixture(tmp_path / "fx", "tiny")
    sd = load_file(src / "model.safetensors")
    sd["language_model.lm_head.weight"] = torch.randn(sd["language_model.model.embed_tokens.weight"].shape) * 0.1
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit) as e:
        main(["verify", str(src), "--max-new-tokens", "3", "--probes", "coarse", "--report", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert e.value.code == 0, out + err
    assert [line for line in err.splitlines() if line.startswith("pgconv: warning:")] == [
        f"pgconv: warning: {src / 'model.safetensors'}: tensor 'language_model.lm_head.weight' differs from "
        "'language_model.model.embed_tokens.weight' although the config ties them (tie_word_embeddings=true); using "
        "both untied, as transformers does"]
    weights = json.loads((tmp_path / "r" / "report.json").read_text())["weights"]
    assert weights["tied_lm_head"] is False and "transformers keeps both untied" in weights["untied_by_transformers"]
    assert any(row["native"] == "lm_head.weight" and row["bit_identical"] for row in weights["map"])


def test_tied_head_identical_is_accepted(tmp_path):
    _edit(tmp_path, lambda sd: sd.update({"language_model.lm_head.weight": sd["language_model.model.embed_tokens.weight"].clone()}))
    assert load(tmp_path / "ck").lm_head is None


def test_load_dtype_and_missing_config(tmp_path):
    cfg = PRESETS["tiny"]
    write_checkpoint(tmp_path / "ck", cfg, random_state(cfg, "hf-v5-save", "F32", bits=False))
    model = load(tmp_path / "ck", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    (tmp_path / "ck" / "config.json").unlink()
    with pytest.raises(InputError, match="config.json: missing"):
        load(tmp_path / "ck")


@pytest.mark.parametrize("name, tie", [("tiny", True), ("tiny-pg2", False)])
def test_from_transformers_shares_storage(name, tie):
    cfg = PRESETS[name].replace(tie_word_embeddings=tie)
    hf = hf_model(cfg)
    ours = from_transformers(hf)
    theirs = {p.data_ptr() for p in hf.parameters()}
    assert all(p.data_ptr() in theirs for p in ours.parameters())
    inputs = tiny_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(_ours(ours, inputs), hf(**inputs).logits, atol=1e-5, rtol=0)
        hf.model.multi_modal_projector.linear.bias.add_(1.0)  # an in-place edit on their side is seen on ours
    assert torch.equal(ours.projector.bias, hf.model.multi_modal_projector.linear.bias)


def test_build_model_rejects_a_wrong_state_dict():
    cfg = PRESETS["tiny"]
    sd = to_native(random_state(cfg, "hf-5.6", "F32", bits=False), cfg, "hf-5.6")
    sd["text.norm.weight"] = torch.zeros(5)
    with pytest.raises(InputError, match=r"'text.norm.weight' has shape \[5\]"):
        build_model(cfg, sd)
    del sd["text.norm.weight"]
    with pytest.raises(InputError, match="missing 1 tensor"):
        build_model(cfg, sd)


def test_config_json_is_the_source_of_truth(tmp_path):
    """A config that changes numerics but not shapes (rope theta) is honoured, not replaced by a preset."""
    cfg = PRESETS["tiny"]
    write_checkpoint(tmp_path / "ck", cfg, random_state(cfg, "hf-legacy", "F32", bits=False))
    data = json.loads((tmp_path / "ck" / "config.json").read_text())
    data["text_config"]["rope_parameters"]["rope_theta"] = 1234.0
    (tmp_path / "ck" / "config.json").write_text(json.dumps(data))
    assert load(tmp_path / "ck").cfg.text.rope_theta == 1234.0


def test_default_dtype_is_what_transformers_auto_picks(tmp_path):
    """bf16 weights with fp32 norms (openpi style): without a dtype, pgconv loads in the one dtype transformers'
    `dtype="auto"` picks (config.json's dtype, else the first floating tensor's), compared with transformers."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import PaliGemmaForConditionalGeneration

    from pgconv.converter.fixture import make_fixture
    from pgconv.converter.load import load

    src = make_fixture(tmp_path / "ck", "tiny")
    sd = load_file(src / "model.safetensors")
    sd = {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in sd.items()}
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    cfg_path = src / "config.json"
    for stated in ("float32", "bfloat16", None):
        raw = json.loads(cfg_path.read_text())
        for key in ("dtype", "torch_dtype"):
            raw.pop(key, None)
        if stated:
            raw["dtype"] = stated
        cfg_path.write_text(json.dumps(raw))
        theirs = {p.dtype for p in PaliGemmaForConditionalGeneration.from_pretrained(src, dtype="auto").parameters()}
        ours = {p.dtype for p in load(src).parameters()}
        assert ours == theirs and len(ours) == 1, (stated, ours, theirs)
