"""`pgconv verify` end to end: exit codes (0 pass, 1 parity failure, 2 bad input), report files, the Python API."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn.functional as F

from pgconv.cli import main
from pgconv.errors import InputError
from pgconv.model import ops
from pgconv.parity.report import finalise
from pgconv.parity.verify import verify

from test_parity_fixtures import tiny_checkpoint  # noqa: F401  (pytest fixture)

REPORT_FIELDS = {"schema_version", "passed", "checkpoint", "dtype", "device", "first_divergence", "probes", "logits",
                 "generation", "weights"}
PROBE_FIELDS = {"name", "kind", "passed", "max_abs", "mean_abs", "cosine", "contributed_max_abs", "verdict"}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["verify", *map(str, args)])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_default_passes_and_writes_every_report(capsys, tmp_path):
    code, out, _ = _cli(capsys, "--report", tmp_path / "r", "--max-new-tokens", 4)
    assert code == 0, out
    assert "PASS" in out and "first divergence: none" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert REPORT_FIELDS <= set(report) and report["schema_version"] == 1 and report["passed"] is True
    assert {"kl_mean", "top1_agreement"} <= set(report["logits"])
    assert {"reference_text", "candidate_text", "tokens_equal", "first_divergence"} <= set(report["generation"])
    assert report["generation"]["tokens_equal"] and len(report["generation"]["reference_tokens"]) == 4
    names = [p["name"] for p in report["probes"]]
    assert all(PROBE_FIELDS <= set(p) for p in report["probes"])
    assert names[0] == "vision.embed" and names[-1] == "logits" and "text.blocks.1.mlp" in names
    assert report["weights"]["mapped"] == report["weights"]["bit_identical"] == report["weights"]["shared"] > 0
    suite = ET.parse(tmp_path / "r" / "junit.xml").getroot()
    cases = suite.findall(".//testcase")
    assert len(cases) == len(names) + 3 and not suite.findall(".//failure")
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("<svg") == 2 and "<script" not in html and "src=" not in html and "href=" not in html
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.startswith("## pgconv verify: PASS") and "| `text.norm` |" in md


def test_parity_failure_exits_1_and_reports_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "gelu_tanh", lambda x, up=None: F.gelu(x) if up is None else F.gelu(x) * up)
    code, out, _ = _cli(capsys, "--report", tmp_path, "--max-new-tokens", 2, "--probes", "coarse")
    assert code == 1
    assert "FAIL" in out and "first divergence: vision.blocks.0" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False and report["first_divergence"]["probe"] == "vision.blocks.0"
    cases = ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert "probe vision.blocks.0" in failed


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/ckpt"], "not a checkpoint directory"),
    (["--image", "/nonexistent.png"], "image not found"),
    (["--prompt", "a", "--prompt", "b", "--image", "x.png", "--image", "y.png", "--image", "z.png"], "2 prompts"),
    (["--prompt", "<image><image>x", "--image", "x.png", "--image", "y.png", "--image", "z.png"], "taking 2"),
    (["--dtype", "float64"], "float64"),
    (["--dtype", "float32,bf16"], "bf16"),
    (["--dtype", "float32,float32"], "listed twice"),
    (["--dtype", ""], "not supported"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--probes", "some"], "some"),
    (["--device", "tpu"], "tpu"),
])
def test_bad_input_exits_2(capsys, args, message):
    code, out, err = _cli(capsys, *args)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_bad_tolerance_files_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    for content, message in [("{", "invalid JSON"), ('{"nope": 1}', "unknown section"),
                             ('{"probes": {"text_block": {"float32": {"nrmse": -1}}}}', "non-negative")]:
        bad.write_text(content)
        code, _, err = _cli(capsys, "--tolerances", bad)
        assert code == 2 and message in err, err


def test_tolerance_override_is_applied(tmp_path, monkeypatch):
    # Exact GELU enters in vision block 0's MLP; with vision budgets opened up the first failure moves to the text MLP.
    monkeypatch.setattr(ops, "gelu_tanh", lambda x, up=None: F.gelu(x) if up is None else F.gelu(x) * up)
    loose = {"nrmse": 1.0, "nmax": 1.0}
    path = tmp_path / "tol.json"
    probes = {k: {"float32": loose} for k in ("vision_sub", "vision_block")}
    path.write_text(json.dumps({"version": "test", "probes": probes}))
    report = verify(tolerances=path, max_new_tokens=2)
    assert report["tolerances"]["version"] == "test"
    assert report["first_divergence"]["probe"] == "text.blocks.0.mlp"


def test_api_returns_what_report_json_holds(tmp_path):
    report = verify(max_new_tokens=2, probes="coarse", report_dir=tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == finalise(report)
    assert not any(p["name"].endswith((".mlp", ".attn", "norm1", "attn_norm")) for p in report["probes"])


def test_several_prompts_are_separate_cases(tiny_checkpoint):
    report = verify(str(tiny_checkpoint("tiny-pg2")), prompts=["caption en", "answer en what is it?"], max_new_tokens=2)
    assert report["passed"], report["failures"]
    assert [c["prompt"] for c in report["cases"]] == ["caption en", "answer en what is it?"]
    assert report["cases"][1]["prompt_length"] > report["cases"][0]["prompt_length"]
    # Generated tokens are suffix positions: the text probes report them as their own segment.
    block = next(p for p in report["cases"][0]["probes"] if p["name"] == "text.blocks.0")
    assert set(block["segments"]) == {"image", "prompt", "suffix"}


def _two_images(tmp_path):
    from PIL import Image

    from pgconv.converter.fixture import default_image

    a = Image.open(default_image()).convert("RGB")
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    a.save(paths[0]), a.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(paths[1])
    return paths


def test_several_images_in_one_prompt_verify(capsys, tmp_path):
    """A prompt with two <image> markers takes the two --image files, in order, as one case; every probe compares
    (the vision probes see both images) and it passes."""
    a, b = _two_images(tmp_path)
    code, out, _ = _cli(capsys, "--image", a, "--image", b, "--prompt", "<image> and <image>: same?",
                        "--max-new-tokens", 3, "--report", tmp_path / "r")
    assert code == 0, out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    (case,) = report["cases"]
    assert case["images"] == [str(a), str(b)] and case["image"] == f"{a} + {b}"
    assert case["prompt_length"] > 2 * 16  # two blocks of the tiny model's 16 image tokens
    assert all(p["passed"] for p in report["probes"]) and report["probes"][0]["name"] == "vision.embed"


def test_vision_probes_see_every_image_of_a_prompt(tmp_path, monkeypatch):
    """A bug in the second image's vision path only is localised at the first vision probe."""
    from pgconv.model.siglip import SiglipVision

    real = SiglipVision.embed
    monkeypatch.setattr(SiglipVision, "embed", lambda self, pv: (lambda x: torch.cat([x[:1], x[1:] * 1.01]))(
        real(self, pv)))
    paths = _two_images(tmp_path)
    assert verify(images=paths[:1], max_new_tokens=1, probes="coarse")["passed"]  # one image: the bug is dormant
    report = verify(images=paths, prompts=["<image><image>caption en"], max_new_tokens=1, probes="coarse")
    assert not report["passed"] and report["first_divergence"]["probe"] == "vision.embed"


def test_cases_share_images_out_by_prompt(tmp_path):
    from pgconv.converter.fixture import default_image
    from pgconv.parity.verify import _cases

    a, b, c, d = (tmp_path / f"{n}.png" for n in "abcd")
    two = "<image> vs <image>"
    assert _cases([a, b, c], [two, "caption en"]) == [([a, b], two), ([c], "caption en")]
    assert _cases([a, b, c, d], [two]) == [([a, b], two), ([c, d], two)]  # one prompt for each group of its images
    assert _cases([a, b], ["caption en"]) == [([a], "caption en"), ([b], "caption en")]
    assert _cases([a], [two, "x"]) == [([a, a], two), ([a], "x")]  # one image fills every slot
    assert _cases([], [two]) == [([default_image()] * 2, two)]
    with pytest.raises(InputError, match="got 3 images and 1 prompts taking 2"):
        _cases([a, b, c], [two])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda(dtype, tiny_checkpoint):
    for preset in ("tiny", "tiny-pg2"):
        report = verify(str(tiny_checkpoint(preset)), dtype=dtype, device="cuda", max_new_tokens=4)
        assert report["passed"], report["failures"]
        assert report["device"] == "cuda"


@pytest.mark.parametrize("layout", ["native", "hf-4.52"])
def test_every_layout_verifies(tiny_checkpoint, tmp_path, layout):  # noqa: F811
    """transformers cannot map pgconv's own names: a native checkpoint's tensors are renamed for it; the result is
    the same report as for the hub layout it came from (greedy tokens and logit metrics identical)."""
    from pgconv.converter.convert import convert

    src = tiny_checkpoint("tiny")
    convert(src, tmp_path / layout, to=layout, quiet=True)
    base = verify(src, max_new_tokens=3, probes="coarse")
    other = verify(tmp_path / layout, max_new_tokens=3, probes="coarse")
    assert other["passed"] and other["weights"]["checkpoint_layout"] == layout
    assert base["weights"]["checkpoint_layout"] == "hf-legacy"
    assert other["generation"]["reference_tokens"] == base["generation"]["reference_tokens"]
    assert other["logits"]["kl_mean"] == base["logits"]["kl_mean"]


def test_several_cases_are_listed_one_by_one(capsys, tmp_path):
    """Two prompts on the built-in image: the probe table folds them (worst row); each case also gets its own line in
    the terminal, a row in report.md and a test case in junit.xml."""
    code, out, _ = _cli(capsys, "--report", tmp_path, "--max-new-tokens", 2, "--probes", "coarse",
                        "--prompt", "caption en", "--prompt", "answer en what is this?")
    assert code == 0, out
    assert "cases (2;" in out and "1. " in out and "'answer en what is this?': PASS" in out
    md = (tmp_path / "report.md").read_text()
    assert "**Cases:** 2" in md and "| 2 |" in md and "`answer en what is this?`" in md
    names = [c.get("name") for c in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")]
    assert sum(n.startswith("case ") for n in names) == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["prompt"] for c in report["cases"]] == ["caption en", "answer en what is this?"]
    single = verify(max_new_tokens=2, probes="coarse")
    from pgconv.parity.report import markdown, terminal

    assert "cases (" not in terminal(single) and "**Cases:**" not in markdown(single)


def test_case_table_cells_survive_pipes_and_backticks():
    from pgconv.parity.report import _md_code

    assert _md_code("a | b") == "`a \\| b`" and _md_code("x`y") == "`` x`y ``" and _md_code("l1\nl2") == "`l1 l2`"
