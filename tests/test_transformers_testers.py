"""transformers' own PaliGemma / PaliGemma 2 tester configs (no vision_use_head, vocab 99, image id 0, pad 1, Gemma 2
without softcap keys) are read, loaded, inspected, converted, generated from and verified like transformers does,
on checkpoints transformers itself saves from them (tests/tester_checkpoints.py)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import pgconv
from pgconv.cli import main
from pgconv.converter.convert import convert
from pgconv.converter.fixture import default_image
from pgconv.converter.inspect import inspect
from pgconv.converter.load import from_transformers
from pgconv.model.generate import generate
from pgconv.model.hf_config import from_hf_config
from tester_checkpoints import hf_sizes, our_sizes, pg_tester_checkpoint, pg_tester_hf_config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FAMILIES = ["gemma", "gemma2"]
PROMPT = "caption en"
EOS = 1  # GemmaConfig's default eos (the tester states none); its generation_config.json says 1 too


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("testers")
    return {f: pg_tester_checkpoint(root / f, f, seed=3) for f in FAMILIES}


def _reference(path):
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    proc = transformers.PaliGemmaProcessor.from_pretrained(path)
    inputs = proc(images=Image.open(default_image()).convert("RGB"), text="<image>" + PROMPT, return_tensors="pt")
    return hf, proc, {k: inputs[k] for k in ("input_ids", "pixel_values", "token_type_ids", "attention_mask")}


@pytest.mark.parametrize("family", FAMILIES)
def test_tester_config_reads_with_transformers_sizes(family):
    hf = pg_tester_hf_config(family)
    cfg = from_hf_config(hf.to_dict())
    assert our_sizes(cfg) == hf_sizes(hf)
    assert cfg.vision.use_head and (cfg.text.vocab_size, cfg.image_token_index, cfg.pad_token_id) == (99, 0, 1)
    if family == "gemma2":  # Gemma2Config's defaults, not the tiny preset's
        t = cfg.text
        assert (t.query_pre_attn_scalar, t.sliding_window, t.final_logit_softcap) == (256, 4096, 30)


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_reports_the_unused_head_not_a_problem(checkpoints, family):
    r = inspect(checkpoints[family])
    assert (r.layout, r.config, r.problems, r.unexpected) == ("hf-v5-save", "ok", [], [])
    assert len(r.ignored) == 11 and all(n.startswith("vision_tower.head.") for n in r.ignored)
    assert "ignored: 11 SigLIP head tensor(s)" in str(r)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_and_generate_like_transformers(checkpoints, family):
    path = checkpoints[family]
    hf, _, inputs = _reference(path)
    model = pgconv.load(path)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs.values()), hf(**inputs).logits, atol=1e-5, rtol=0)
    n = 12
    theirs = hf.generate(**inputs, max_new_tokens=n, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    # The comparison does not depend on how EOS ends a run: transformers runs the full length here.
    assert len(theirs) == n and EOS not in theirs.tolist()
    ours = generate(model, *inputs.values(), max_new_tokens=n, eos_token_ids=(EOS,), pad_token_id=1)
    assert ours[0].tolist() == theirs.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_cli_runs(checkpoints, family, capsys):
    path = checkpoints[family]
    hf, proc, inputs = _reference(path)
    theirs = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    with pytest.raises(SystemExit) as e:
        main(["generate", str(path), "--image", str(default_image()), "--prompt", PROMPT, "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    assert out == proc.decode(theirs, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_passes(checkpoints, family):
    report = pgconv.verify(checkpoints[family], max_new_tokens=4, probes="coarse")
    assert report["passed"], report["failures"]
    assert report["weights"]["untied_by_transformers"] is None


@pytest.mark.parametrize("family", FAMILIES)
def test_from_transformers_skips_the_head(family):
    hf = transformers.PaliGemmaForConditionalGeneration._from_config(pg_tester_hf_config(family),
                                                                     attn_implementation="eager").eval()
    ours = from_transformers(hf)
    ids = torch.tensor([[0] * 16 + [2, 50, 60, 4]])
    inputs = {"input_ids": ids, "pixel_values": torch.rand(1, 3, 20, 20), "token_type_ids": torch.zeros_like(ids),
              "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(ours(*inputs.values()), hf(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("to", ["hf-legacy", "hf-v5-save", "native"])
def test_convert_drops_the_head_and_says_so(checkpoints, tmp_path, to):
    src = checkpoints["gemma2"]
    summary = convert(src, tmp_path / "out", to=to, quiet=True, check=True)
    text = str(summary)
    assert "dropped 11 SigLIP head tensor(s)" in text and "vision_config.vision_use_head=False" in text
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["vision_config"]["vision_use_head"] is False
    manifest = json.loads((tmp_path / "out" / "pgconv-manifest.json").read_text())
    assert len(manifest["ignored"]) == 11
    if to == "native":
        return
    # transformers loads the output cleanly (no head to re-create) and computes what it did on the source.
    out, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf, _, inputs = _reference(src)
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(**inputs).logits, hf(**inputs).logits, atol=0, rtol=0)


def test_checkpoint_without_the_head_weights_reads_and_verifies(checkpoints, tmp_path):
    """vision_use_head true but no head stored: transformers re-creates the head (warning of missing weights) and
    never uses it; pgconv's reader and verify accept the checkpoint as well."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = shutil.copytree(checkpoints["gemma"], tmp_path / "ck")
    sd = load_file(src / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".head." not in k}, src / "model.safetensors", metadata={"format": "pt"})
    r = inspect(src)
    assert (r.problems, r.ignored) == ([], [])
    hf, _, inputs = _reference(src)
    with torch.no_grad():
        torch.testing.assert_close(pgconv.load(src)(*inputs.values()), hf(**inputs).logits, atol=1e-5, rtol=0)
    assert pgconv.verify(src, max_new_tokens=2, probes="coarse")["passed"]
