"""`pgconv golden` / `pgconv compare` / `verify --candidate` (parity.golden, parity.dump, parity.candidates): golden
activations are transformers' own, a dump of our model passes, a perturbed layer is the first divergence, bad dumps
are one-line input errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pgconv.cli import main
from pgconv.model import ops
from pgconv.parity.candidates import PgconvCandidate
from pgconv.parity.dump import compare, save_dump
from pgconv.parity.golden import INPUT_NAMES, golden, inputs_sha256

from test_parity_fixtures import tiny_checkpoint  # noqa: F401  (pytest fixture)


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def goldens(tiny_checkpoint, tmp_path_factory):
    made = {}

    def get(preset: str, dtype: str):
        if (preset, dtype) not in made:
            out = tmp_path_factory.mktemp("golden") / f"{preset}-{dtype}"
            golden(str(tiny_checkpoint(preset)), out, dtype=dtype, max_new_tokens=4)
            made[preset, dtype] = out
        return made[preset, dtype]

    return get


def _our_dump(path, golden_dir, preset_dir, dtype, teacher=False):
    doc = json.loads((golden_dir / "probes.json").read_text())
    inputs = load_file(str(golden_dir / "case0" / "inputs.safetensors"))
    cand = PgconvCandidate(preset_dir, getattr(torch, dtype), "cpu")
    out = cand.run(inputs, [p["name"] for p in doc["probes"]])
    if teacher:
        gold = load_file(str(golden_dir / "case0" / "activations.safetensors"))
        for p in doc["probes"]:
            if p["teacher_input"] and (y := cand.teacher(p["name"], gold[p["teacher_input"]], inputs)) is not None:
                out[p["name"] + "@teacher"] = y
    save_dump(path, out, doc["cases"][0]["inputs_sha256"])
    return doc, out


def test_golden_is_transformers_own_forward(goldens, tiny_checkpoint):
    """Every golden activation is what transformers computes (hooks on its modules), the inputs its processor's,
    and the schema documents every probe."""
    from transformers import PaliGemmaForConditionalGeneration

    gdir = goldens("tiny", "float32")
    doc = json.loads((gdir / "probes.json").read_text())
    acts = load_file(str(gdir / "case0" / "activations.safetensors"))
    inputs = load_file(str(gdir / "case0" / "inputs.safetensors"))
    assert set(inputs) == set(INPUT_NAMES) and doc["cases"][0]["inputs_sha256"] == inputs_sha256(inputs)
    assert {p["name"] for p in doc["probes"]} == set(doc["cases"][0]["shapes"])
    assert set(acts) == {p["name"] for p in doc["probes"]}
    for p in doc["probes"]:
        assert p["description"] and len(p["axes"]) == len(p["shape"]) == acts[p["name"]].ndim
    ref = PaliGemmaForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"), attn_implementation="eager")
    with torch.no_grad():
        out = ref(**inputs, output_hidden_states=True)
        vis = ref.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        tokens = ref.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    torch.testing.assert_close(acts["logits"], out.logits, rtol=0, atol=0)
    torch.testing.assert_close(acts["text.embed"], out.hidden_states[0], rtol=0, atol=0)
    torch.testing.assert_close(acts["text.blocks.0"], out.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(acts["vision.norm"], vis.last_hidden_state, rtol=0, atol=0)
    assert doc["cases"][0]["generation"]["tokens"] == tokens.tolist()
    assert doc["probes"][[p["name"] for p in doc["probes"]].index("text.blocks.1")]["teacher_input"] == "text.blocks.0"


@pytest.mark.parametrize("preset", ["tiny", "tiny-pg2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dump_of_our_model_passes(goldens, tiny_checkpoint, tmp_path, capsys, preset, dtype):
    gdir = goldens(preset, dtype)
    _our_dump(tmp_path / "d.safetensors", gdir, tiny_checkpoint(preset), dtype, teacher=True)
    code, out, _ = _cli(capsys, "compare", gdir, tmp_path / "d.safetensors", "--report", tmp_path / "rep")
    assert code == 0, out
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["passed"] and report["missing"] == [] and report["first_divergence"] is None
    assert {f.name for f in (tmp_path / "rep").iterdir()} == {"report.json", "report.md", "report.html", "junit.xml"}


def test_a_perturbed_layer_is_the_first_divergence(goldens, tiny_checkpoint, tmp_path, capsys):
    gdir = goldens("tiny", "float32")
    _, out = _our_dump(tmp_path / "d.safetensors", gdir, tiny_checkpoint("tiny"), "float32")
    doc = json.loads((gdir / "probes.json").read_text())
    out["text.blocks.1.mlp"] = out["text.blocks.1.mlp"] * 1.01
    save_dump(tmp_path / "bad.safetensors", out, doc["cases"][0]["inputs_sha256"])
    code, text, _ = _cli(capsys, "compare", gdir, tmp_path / "bad.safetensors")
    assert code == 1 and "first divergence: text.blocks.1.mlp" in text
    report = compare(gdir, tmp_path / "bad.safetensors")
    assert [r["name"] for r in report["probes"] if not r["passed"]] == ["text.blocks.1.mlp"]


def test_teacher_forcing_localises_a_bug_that_propagates(monkeypatch, goldens, tiny_checkpoint, tmp_path):
    """An exact GELU in our MLPs (vision and text): every later probe is off end to end, but with teacher-forced
    values only the steps that contain the bug fail; the first is vision.blocks.0.mlp."""
    monkeypatch.setattr(ops, "gelu_tanh", lambda x: F.gelu(x))
    gdir = goldens("tiny", "float32")
    _our_dump(tmp_path / "d.safetensors", gdir, tiny_checkpoint("tiny"), "float32", teacher=True)
    report = compare(gdir, tmp_path / "d.safetensors")
    assert not report["passed"] and report["first_divergence"]["name"] == "vision.blocks.0.mlp"
    rows = {r["name"]: r for r in report["probes"]}
    for clean in ("vision.blocks.1.attn", "projector", "text.blocks.0.attn", "logits"):  # no GELU in these steps
        assert rows[clean]["passed"] and rows[clean]["inherited"], clean
    assert {n for n, r in rows.items() if not r["passed"]} == {
        f"{s}.blocks.{i}{sub}" for s in ("vision", "text") for i in (0, 1) for sub in ("", ".mlp")} | {
        "vision.blocks.1.norm2", "text.blocks.0.mlp_norm", "text.blocks.1.mlp_norm"}


def test_missing_probes_are_listed_not_failed(goldens, tiny_checkpoint, tmp_path):
    gdir = goldens("tiny", "float32")
    doc, out = _our_dump(tmp_path / "d.safetensors", gdir, tiny_checkpoint("tiny"), "float32")
    save_dump(tmp_path / "some.safetensors", {"vision.norm": out["vision.norm"], "logits": out["logits"]},
              doc["cases"][0]["inputs_sha256"])
    report = compare(gdir, tmp_path / "some.safetensors")
    assert report["passed"] and [r["name"] for r in report["probes"]] == ["vision.norm", "logits"]
    assert len(report["missing"]) == len(doc["probes"]) - 2


@pytest.mark.parametrize("edit, message", [
    (lambda t, h: ({**t, "text.blocks.9": t["text.norm"]}, h), "not a probe of the golden schema"),
    (lambda t, h: ({**t, "text.norm": t["text.norm"][:, :-1]}, h), "has shape"),
    (lambda t, h: (t, "0" * 64), "made from other inputs"),
    (lambda t, h: (t, None), "no record of the inputs"),
])
def test_bad_dumps_exit_2_with_one_line(goldens, tiny_checkpoint, tmp_path, capsys, edit, message):
    gdir = goldens("tiny", "float32")
    doc, out = _our_dump(tmp_path / "d.safetensors", gdir, tiny_checkpoint("tiny"), "float32")
    tensors, sha = edit({k: v.clone() for k, v in out.items()}, doc["cases"][0]["inputs_sha256"])
    path = tmp_path / "bad.safetensors"
    if sha is None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        save_dump(path, tensors, sha)
    code, out_text, err = _cli(capsys, "compare", gdir, path)
    assert code == 2 and message in err and err.count("\n") == 1 and out_text == ""


def test_inputs_in_the_dump_prove_the_inputs(goldens, tiny_checkpoint, tmp_path):
    gdir = goldens("tiny", "float32")
    _, out = _our_dump(tmp_path / "d.safetensors", gdir, tiny_checkpoint("tiny"), "float32")
    inputs = load_file(str(gdir / "case0" / "inputs.safetensors"))
    save_file({"text.norm": out["text.norm"].clone(), **inputs}, str(tmp_path / "x.safetensors"))
    assert compare(gdir, tmp_path / "x.safetensors")["passed"]
    inputs["input_ids"][0, -1] += 1
    save_file({"text.norm": out["text.norm"].clone(), **inputs}, str(tmp_path / "y.safetensors"))
    with pytest.raises(Exception, match="other inputs"):
        compare(gdir, tmp_path / "y.safetensors")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_candidate_transformers_sdpa_passes(tiny_checkpoint, dtype):
    from pgconv.parity.candidates import verify_candidate

    report = verify_candidate(str(tiny_checkpoint("tiny")), "transformers-sdpa", dtype=dtype, max_new_tokens=3)
    assert report["passed"], report["failures"]
    assert not report["missing"] and report["cases"][0]["generation"]["passed"]


def test_golden_refuses_a_non_empty_directory_and_leaves_nothing_on_error(tmp_path, capsys):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x").write_text("keep")
    code, _, err = _cli(capsys, "golden", "-o", tmp_path / "g")
    assert code == 2 and "not an empty directory" in err and (tmp_path / "g" / "x").read_text() == "keep"
    code, _, err = _cli(capsys, "golden", "-o", tmp_path / "h", "--image", tmp_path / "nope.png")
    assert code == 2 and "image not found" in err and not (tmp_path / "h").exists()
    assert not any(p.name.startswith(".h") for p in tmp_path.iterdir())


def _readme_adapter() -> str:
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("# my_adapter.py", 1)[1]
    return "# my_adapter.py" + block.split("```", 1)[0]


def test_the_readme_adapter_runs_through_verify(tiny_checkpoint, tmp_path, capsys):
    """The adapter file the README tells porters to copy works as written (pgconv verify --candidate FILE.py)."""
    (tmp_path / "my_adapter.py").write_text(_readme_adapter())
    code, out, err = _cli(capsys, "verify", tiny_checkpoint("tiny-pg2"), "--candidate", tmp_path / "my_adapter.py",
                          "--max-new-tokens", "3")
    assert code == 0, out + err
    assert "PASS" in out and "vision.blocks.0" in out and "text.blocks.2" in out


def test_a_broken_adapter_file_is_an_input_error(tmp_path, capsys):
    (tmp_path / "bad.py").write_text("def run():\n    pass\n")
    code, _, err = _cli(capsys, "verify", "--candidate", tmp_path / "bad.py", "--max-new-tokens", "2")
    assert code == 2 and "must define load(" in err
    code, _, err = _cli(capsys, "verify", "--candidate", "nonsense", "--max-new-tokens", "2")
    assert code == 2 and "--candidate 'nonsense'" in err


def test_adapter_notes_reach_the_report(tiny_checkpoint, tmp_path):
    from pgconv.parity.candidates import verify_candidate

    (tmp_path / "noted.py").write_text(_readme_adapter() + "\nMyPort.notes = ['my port ignores rope_theta']\n")
    report = verify_candidate(str(tiny_checkpoint("tiny")), str(tmp_path / "noted.py"), max_new_tokens=2)
    assert report["passed"] and report["notes"] == ["my port ignores rope_theta"]


def test_golden_never_writes_over_its_inputs(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """--force onto the checkpoint, a directory above it or one holding the image is refused before any work (it
    would delete them); `-o .` in an empty directory works; a file that is no image fails before the model loads."""
    import shutil

    from pgconv.parity import models

    ckpt = tmp_path / "ck" / "tiny"
    shutil.copytree(tiny_checkpoint("tiny"), ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    for out in (ckpt, ckpt.parent, ckpt / "golden"):
        code, _, err = _cli(capsys, "golden", ckpt, "-o", out, "--force", "--max-new-tokens", "1")
        assert code == 2 and "overlaps the source" in err, err
    assert sorted(p.name for p in ckpt.iterdir()) == before
    img = tmp_path / "imgs" / "x.png"
    img.parent.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    code, _, err = _cli(capsys, "golden", ckpt, "-o", img.parent, "--force", "--image", img)
    assert code == 2 and "holds the input image" in err and img.is_file()
    (tmp_path / "bad.png").write_text("not an image")
    monkeypatch.setattr(models, "load_reference", lambda *a, **k: pytest.fail("loaded before the image check"))
    code, _, err = _cli(capsys, "golden", ckpt, "-o", tmp_path / "g", "--image", tmp_path / "bad.png")
    assert code == 2 and "bad.png" in err and not (tmp_path / "g").exists()
    monkeypatch.undo()
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    code, out, err = _cli(capsys, "golden", ckpt, "-o", ".", "--max-new-tokens", "1")
    assert code == 0, err
    assert (here / "probes.json").is_file() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    doc = json.loads((here / "probes.json").read_text())
    assert doc["cases"][0]["generation"]["settings"]["eos_token_ids"] == [1]
