"""`pgconv golden` / `pgconv compare` / `verify --candidate` (parity.golden, parity.dump, parity.candidates): golden
activations are transformers' own, a dump of our model passes, a perturbed layer is the first divergence, bad dumps
are one-line input errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
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
    monkeypatch.setattr(ops, "gelu_tanh", lambda x, up=None: F.gelu(x) if up is None else F.gelu(x) * up)
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


# --- review fixes (S1-4, S1-5, S1-6, S2-1, S2-2, S2-3, S2-7, S3-5, S3-6, S3-7) ---------------------------------------

def _golden_copy(gdir, dest, edit=None):
    """A copy of a golden directory, probes.json passed through `edit` (doc -> doc)."""
    import shutil

    shutil.copytree(gdir, dest)
    if edit is not None:
        doc = json.loads((dest / "probes.json").read_text())
        (dest / "probes.json").write_text(json.dumps(edit(doc)))
    return dest


def _golden_tensors(gdir):
    doc = json.loads((gdir / "probes.json").read_text())
    return doc, load_file(str(gdir / "case0" / "activations.safetensors")), doc["cases"][0]["inputs_sha256"]


def test_a_dump_that_compares_nothing_is_an_input_error(goldens, tmp_path, capsys):
    """Only the four inputs (or nothing but metadata): no probe row and no tokens would be a vacuous PASS."""
    gdir = goldens("tiny", "float32")
    inputs = load_file(str(gdir / "case0" / "inputs.safetensors"))
    save_file(dict(inputs), str(tmp_path / "inputs_only.safetensors"))
    code, out, err = _cli(capsys, "compare", gdir, tmp_path / "inputs_only.safetensors")
    assert code == 2 and "holds no probe values of the golden schema" in err and err.count("\n") == 1 and out == ""


def test_a_sublayer_with_a_teacher_input_is_judged_end_to_end(goldens, tmp_path, capsys):
    """text.blocks.0.attn 30 % off on an exact input (its teacher_input attn_norm is exact) fails, although its
    block's teacher-forced value passes, and the error asks for its @teacher value; the pre-MLP norm (teacher_input
    null) still takes its block's verdict."""
    gdir = goldens("tiny", "float32")
    doc, act, sha = _golden_tensors(gdir)
    assert {p["name"]: p["teacher_input"] for p in doc["probes"]}["text.blocks.0.mlp_norm"] is None
    save_dump(tmp_path / "d.safetensors", {
        "text.blocks.0.attn_norm": act["text.blocks.0.attn_norm"], "text.blocks.0.attn": act["text.blocks.0.attn"] * 1.3,
        "text.blocks.0.mlp_norm": act["text.blocks.0.mlp_norm"] * 1.3,
        "text.blocks.0": act["text.blocks.0"], "text.blocks.0@teacher": act["text.blocks.0"]}, sha)
    code, out, _ = _cli(capsys, "compare", gdir, tmp_path / "d.safetensors")
    assert code == 1 and "provide text.blocks.0.attn@teacher to separate inherited error" in out
    rows = {r["name"]: r for r in compare(gdir, tmp_path / "d.safetensors")["probes"]}
    assert not rows["text.blocks.0.attn"]["passed"] and rows["text.blocks.0.attn"]["source"] == "end to end"
    assert rows["text.blocks.0.mlp_norm"]["passed"] and rows["text.blocks.0.mlp_norm"]["inherited"]
    assert rows["text.blocks.0.mlp_norm"]["source"] == "its block, teacher-forced"


@pytest.mark.parametrize("probe", ["vision.embed", "text.rope", "text.blocks.0.mlp_norm"])
def test_teacher_value_of_a_probe_without_teacher_input_is_refused(goldens, tmp_path, capsys, probe):
    """A garbage end-to-end value must not pass on an exact @teacher value that nothing forced."""
    gdir = goldens("tiny", "float32")
    _, act, sha = _golden_tensors(gdir)
    save_dump(tmp_path / "d.safetensors", {probe: act[probe] * 0 + 5, probe + "@teacher": act[probe]}, sha)
    code, out, err = _cli(capsys, "compare", gdir, tmp_path / "d.safetensors")
    assert code == 2 and f"tensor '{probe}@teacher': {probe} has no teacher_input" in err and err.count("\n") == 1


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                     max_leaves=6)
_DELETE = object()


def _ok_type(path, v):
    """What a field may hold without compare raising (the damage drawn must be outside this)."""
    from pgconv.parity.verify import DTYPES

    is_int = isinstance(v, int) and not isinstance(v, bool)
    return {
        ("dtype",): v in DTYPES, ("image_token_id",): is_int, ("family",): isinstance(v, str),
        ("checkpoint",): isinstance(v, str), ("probes",): False, ("cases",): False,
        ("probes", 0, "name"): False, ("probes", 0, "kind"): isinstance(v, str) and v == "vision_embed",
        ("probes", 3, "teacher_input"): v is None or v in ("vision.embed", "vision.blocks.0.norm1",
                                                                  "vision.blocks.0.attn"),
        ("probes", 0, "stack"): v is None or isinstance(v, str), ("probes", 0, "layer"): v is None or is_int,
        ("cases", 0): False, ("cases", 0, "case"): is_int and v == 0, ("cases", 0, "dir"): v == "case0",
        ("cases", 0, "inputs_sha256"): False, ("cases", 0, "generation"): False,
        ("cases", 0, "generation", "tokens"): isinstance(v, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in v),
        ("cases", 0, "prompt"): isinstance(v, str),
        ("cases", 0, "images"): isinstance(v, list) and all(isinstance(x, str) for x in v),
    }[path]


_FIELDS = [("dtype",), ("image_token_id",), ("family",), ("checkpoint",), ("probes",), ("cases",),
           ("probes", 0, "name"), ("probes", 0, "kind"), ("probes", 3, "teacher_input"), ("probes", 0, "stack"),
           ("probes", 0, "layer"), ("cases", 0), ("cases", 0, "case"), ("cases", 0, "dir"),
           ("cases", 0, "inputs_sha256"), ("cases", 0, "generation"), ("cases", 0, "generation", "tokens"),
           ("cases", 0, "prompt"), ("cases", 0, "images")]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(_FIELDS), value=_JSON | st.just(_DELETE) | st.sampled_from(["../../etc", "case9", "x" * 64]))
def test_a_damaged_probes_json_is_a_one_line_input_error(goldens, tmp_path_factory, path, value):
    """Any field compare reads, missing or of the wrong type, is an InputError naming probes.json or the case
    file, never a KeyError/TypeError traceback (exit 1, the parity-failure code) or a read outside the directory."""
    import copy

    from pgconv.errors import InputError
    from pgconv.parity.dump import compare

    assume(value is _DELETE or not _ok_type(path, value))
    gdir = goldens("tiny", "float32")
    base = tmp_path_factory.mktemp("damaged")
    doc, act, sha = _golden_tensors(gdir)
    save_dump(base / "d.safetensors", {"vision.embed": act["vision.embed"], "logits": act["logits"]}, sha)
    bad = copy.deepcopy(doc)
    holder = bad
    for key in path[:-1]:
        holder = holder[key]
    if value is _DELETE:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    g = _golden_copy(gdir, base / "g", lambda _: bad)
    with pytest.raises(InputError) as e:
        compare(g, base / "d.safetensors")
    assert "\n" not in str(e.value) and str(g) in str(e.value)


@pytest.mark.parametrize("damage, message", [
    ("fifo", "activations.safetensors: not a regular file"),
    ("missing", "activations.safetensors: not found"),
    ("lacking", "activations.safetensors: lacks probe(s) of probes.json: text.norm"),
    ("inputs", "inputs.safetensors: lacks token_type_ids"),
    ("symlink", "cases[0].dir 'case0' leads outside the golden directory"),
])
def test_damaged_case_files_are_input_errors(goldens, tmp_path, capsys, damage, message):
    """A FIFO is refused before open() (it would block compare for good; SIGTERM does not reach it)."""
    import os
    import shutil
    import subprocess
    import sys

    gdir = goldens("tiny", "float32")
    g = _golden_copy(gdir, tmp_path / "g")
    _, act, sha = _golden_tensors(gdir)
    save_dump(tmp_path / "d.safetensors", {"logits": act["logits"]}, sha)
    acts, inputs = g / "case0" / "activations.safetensors", g / "case0" / "inputs.safetensors"
    if damage in ("fifo", "missing"):
        acts.unlink()
        if damage == "fifo":
            os.mkfifo(acts)
    elif damage == "lacking":
        save_file({k: v for k, v in act.items() if k != "text.norm"}, str(acts))
    elif damage == "inputs":
        save_file({k: v for k, v in load_file(str(inputs)).items() if k != "token_type_ids"}, str(inputs))
    else:
        shutil.move(g / "case0", tmp_path / "elsewhere")
        (g / "case0").symlink_to(tmp_path / "elsewhere")
    if damage == "fifo":  # in a child: a blocked open() holds the GIL (safetensors' safe_open), so no thread helps
        run = subprocess.run([sys.executable, "-c", "from pgconv.cli import main; main()", "compare", str(g),
                              str(tmp_path / "d.safetensors")], capture_output=True, text=True, timeout=120)
        code, out, err = run.returncode, run.stdout, run.stderr
    else:
        code, out, err = _cli(capsys, "compare", g, tmp_path / "d.safetensors")
    assert code == 2 and message in err and err.count("\n") == 1 and out == ""


def test_a_dump_with_some_of_the_inputs_is_refused(goldens, tmp_path, capsys):
    """Two of the four inputs beside a matching metadata hash: the other inputs would be ignored silently."""
    gdir = goldens("tiny", "float32")
    _, act, sha = _golden_tensors(gdir)
    inputs = load_file(str(gdir / "case0" / "inputs.safetensors"))
    inputs["input_ids"][0, -1] += 1  # different inputs than the hash claims
    save_dump(tmp_path / "d.safetensors", {"text.norm": act["text.norm"], "input_ids": inputs["input_ids"],
                                           "pixel_values": inputs["pixel_values"]}, sha)
    code, _, err = _cli(capsys, "compare", gdir, tmp_path / "d.safetensors")
    assert code == 2 and "save all four inputs or none" in err and err.count("\n") == 1


class _Fake:
    """A candidate whose methods misbehave as `how` says (the rest answers with golden's own values)."""

    name = "fake"

    def __init__(self, gdir, how):
        self.act, self.how = load_file(str(gdir / "case0" / "activations.safetensors")), how

    def run(self, inputs, probes):
        if self.how == "run raises":
            raise RuntimeError("boom in run\nsecond line")
        if self.how == "run returns a list":
            return {"text.norm": [1, 2, 3]}
        if self.how == "run returns a list of pairs":
            return [("text.norm", self.act["text.norm"])]
        if self.how == "run returns nothing":
            return {}
        return {"text.norm": self.act["text.norm"]}

    def teacher(self, probe, x, inputs):
        if self.how == "teacher raises":
            raise KeyError(probe)
        return [0.0] if self.how == "teacher returns a list" else None

    def generate(self, inputs, max_new_tokens):
        if self.how == "generate raises":
            raise ValueError("no cache")
        return torch.tensor([1, 2]) if self.how == "generate returns a tensor" else [1.5, 2]


@pytest.mark.parametrize("how, message", [
    ("run raises", "fake: run() failed (RuntimeError: boom in run second line)"),
    ("run returns a list", "fake: run() returned list for 'text.norm'"),
    ("run returns a list of pairs", "fake: run() must return a mapping of probe name -> torch.Tensor, got list"),
    ("teacher raises", "fake: teacher() failed (KeyError: "),
    ("teacher returns a list", "fake: teacher() returned list for"),
    ("generate raises", "fake: generate() failed (ValueError: no cache)"),
    ("generate returns a tensor", "fake: generate() must return a list of ints, got Tensor"),
    ("floats", "fake: generate() must return a list of ints, got list holding float"),
])
def test_a_misbehaving_candidate_is_a_one_line_input_error(goldens, how, message):
    from pgconv.errors import InputError
    from pgconv.parity.candidates import compare_cases

    gdir = goldens("tiny", "float32")
    doc = json.loads((gdir / "probes.json").read_text())
    with pytest.raises(InputError) as e:
        compare_cases(gdir, doc, _Fake(gdir, how), max_new_tokens=2)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_candidate_that_returns_nothing_is_an_input_error(goldens):
    from pgconv.errors import InputError
    from pgconv.parity.candidates import compare_cases

    gdir = goldens("tiny", "float32")
    cand = _Fake(gdir, "run returns nothing")
    cand.generate = None  # no tokens either
    with pytest.raises(InputError, match="fake: holds no probe values of the golden schema"):
        compare_cases(gdir, json.loads((gdir / "probes.json").read_text()), cand, max_new_tokens=2)


@pytest.mark.parametrize("body, message", [
    ("def load(checkpoint, dtype, device):\n    raise ValueError('cannot load')\n",
     "load() failed (ValueError: cannot load)"),
    ("class C:\n    name = 'c'\n    def run(self, inputs, probes):\n        raise RuntimeError('boom in run')\n"
     "def load(checkpoint, dtype, device):\n    return C()\n", "run() failed (RuntimeError: boom in run)"),
])
def test_an_adapter_file_that_raises_exits_2(tiny_checkpoint, tmp_path, capsys, body, message):
    (tmp_path / "bad.py").write_text(body)
    code, out, err = _cli(capsys, "verify", tiny_checkpoint("tiny"), "--candidate", tmp_path / "bad.py",
                          "--max-new-tokens", "1")
    assert code == 2 and f"{tmp_path / 'bad.py'}: {message}" in err and err.count("\n") == 1


def test_compare_reads_one_probe_at_a_time_and_chunks_the_logits(goldens, tmp_path, monkeypatch):
    """At most one probe's golden, end-to-end and teacher-forced values are alive at once, the logits row goes
    LOGIT_ROWS positions at a time, and the numbers are those of the whole tensors."""
    import weakref

    from pgconv.converter import sources
    from pgconv.parity import dump, metrics

    gdir = goldens("tiny", "float32")
    _, act, sha = _golden_tensors(gdir)
    gen = torch.Generator().manual_seed(0)
    noisy = {n: act[n] * (1 + 1e-3 * torch.randn(act[n].shape, generator=gen)) for n in act}
    save_dump(tmp_path / "d.safetensors", {**noisy, "logits@teacher": act["logits"] + 1e-3 * torch.randn(
        act["logits"].shape, generator=gen), "text.blocks.1@teacher": act["text.blocks.1"]}, sha)
    live, peak, chunks = set(), [0], []
    load, positions = sources.SourceTensor.load, metrics.logit_positions

    def counted(self):
        t = load(self)
        if self.name not in INPUT_NAMES:
            key = object()
            live.add(key)
            peak[0] = max(peak[0], len(live))
            weakref.finalize(t, live.discard, key)
        return t

    def spy(ours, ref, chunk=8):
        chunks.append(ours.shape[1])
        return positions(ours, ref, chunk)

    monkeypatch.setattr(sources.SourceTensor, "load", counted)
    monkeypatch.setattr(metrics, "logit_positions", spy)
    monkeypatch.setattr(dump, "LOGIT_ROWS", 5)
    report = compare(gdir, tmp_path / "d.safetensors")
    assert 2 <= peak[0] <= 3, peak  # golden + end to end + teacher forced
    assert chunks == [5, 5, 5, 5, 2]  # T = 22
    row = next(r for r in report["probes"] if r["name"] == "logits")
    got, want = load_file(str(tmp_path / "d.safetensors")), load_file(str(gdir / "case0" / "activations.safetensors"))
    whole = metrics.logit_metrics(got["logits@teacher"].double()[0], want["logits"].double()[0])
    e2e = metrics.tensor_metrics(got["logits"].double(), want["logits"].double())
    assert row["kl"]["kl_mean"] == pytest.approx(whole["kl_mean"], rel=1e-9, abs=1e-15)
    assert row["nrmse"] == pytest.approx(e2e["nrmse"], rel=1e-9) and row["max_abs"] == e2e["max_abs"] > 0


def test_verify_candidate_checks_tolerances_and_report_first_and_keeps_the_golden_off_tmp(tiny_checkpoint, tmp_path,
                                                                                           monkeypatch):
    """--tolerances / --report are refused before the golden run; the temporary golden goes next to --report, or
    under $PGCONV_TMP."""
    from pgconv.errors import InputError
    from pgconv.parity import golden as golden_mod
    from pgconv.parity.candidates import verify_candidate

    ran = []

    def fake_golden(checkpoint, out, **kw):
        ran.append(out)
        raise InputError("stop after the golden")

    monkeypatch.setattr(golden_mod, "golden", fake_golden)
    ckpt = str(tiny_checkpoint("tiny"))
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(InputError, match="bad.json"):
        verify_candidate(ckpt, "transformers-sdpa", tolerances=tmp_path / "bad.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        verify_candidate(ckpt, "transformers-sdpa", report_dir=tmp_path / "file" / "rep")
    assert ran == []
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="stop after the golden"):
        verify_candidate(ckpt, "transformers-sdpa", report_dir=tmp_path / "out" / "rep")
    assert ran[-1].parent.parent == tmp_path / "out"
    (tmp_path / "scratch").mkdir()
    monkeypatch.setenv("PGCONV_TMP", str(tmp_path / "scratch"))
    with pytest.raises(InputError, match="stop after the golden"):
        verify_candidate(ckpt, "transformers-sdpa")
    assert ran[-1].parent.parent == tmp_path / "scratch"


def test_probes_json_strings_are_escaped_in_the_reports(goldens, tmp_path):
    gdir = goldens("tiny", "float32")
    g = _golden_copy(gdir, tmp_path / "g", lambda d: {**d, "family": "<script>alert(1)</script> | `x`"})
    _, act, sha = _golden_tensors(gdir)
    save_dump(tmp_path / "d.safetensors", {"text.norm": act["text.norm"]}, sha)
    compare(g, tmp_path / "d.safetensors", report_dir=tmp_path / "rep")
    html = (tmp_path / "rep" / "report.html").read_text()
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "`` <script>alert(1)</script> \\| `x` ``" in md


def test_the_candidates_docstring_points_at_the_readme_template():
    """The protocol's docstring sends porters to a template that exists (README's 'Verifying your own port')."""
    from pathlib import Path

    from pgconv.parity import candidates

    assert "examples/adapter_template.py" not in candidates.__doc__
    assert '"Verifying your own port"' in candidates.__doc__
    assert "## Verifying your own port" in (Path(__file__).parents[1] / "README.md").read_text()
