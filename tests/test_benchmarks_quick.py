"""Benchmarks: the quick modes run and the bookkeeping is right. Times are never asserted (they are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import __main__ as runner
from benchmarks import common, inference
from pgconv.model.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def test_discover_runs_inference_first_and_finds_every_sibling():
    names = runner.discover()
    assert names[0] == "inference"
    on_disk = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - runner.NOT_BENCHMARKS
    assert set(names) == on_disk


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('QUICK_ARGS = ["--preset", "tiny", "--runs", "1"]\nap.add_argument("--quick")',
         ["--preset", "tiny", "--runs", "1"]),
        ('ap.add_argument("--quick", action="store_true")', ["--quick"]),
        ('ap.add_argument("--preset", default="x")', ["--preset", "tiny"]),
        ('ap.add_argument("--fixture")', None),
    ],
)
def test_quick_args_come_from_the_module_source(tmp_path, monkeypatch, source, expected):
    (tmp_path / "bench_x.py").write_text(source + "\n")
    monkeypatch.setattr(runner, "HERE", tmp_path)
    assert runner.quick_args("bench_x") == expected


@pytest.mark.parametrize("preset", ["tiny", "paligemma-3b-pt-224", "paligemma2-3b-pt-224"])
def test_decode_weight_bytes_match_the_model_built_on_meta(preset):
    from pgconv.model.paligemma import PaliGemma

    cfg = PRESETS[preset]
    with torch.device("meta"):
        model = PaliGemma(cfg).to(torch.bfloat16)
    params = dict(model.named_parameters())
    head = params["lm_head.weight"] if "lm_head.weight" in params else params["text.embed.weight"]
    step = sum(p.numel() for n, p in params.items() if n.startswith("text.blocks.")) + model.text.norm.weight.numel()
    step_bytes, total_bytes = inference.decode_weight_bytes(cfg, "bfloat16")
    assert step_bytes == 2 * (step + head.numel())
    assert total_bytes == 2 * sum(p.numel() for p in params.values())
    assert inference.decode_weight_bytes(cfg, "float32") == (2 * step_bytes, 2 * total_bytes)
    if preset == "paligemma-3b-pt-224":  # the roofline: ~5.0 GB per bf16 step / 28 GB/s = 0.18 s
        assert 4.9e9 < step_bytes < 5.1e9


def _row(ttft, decode, rss, tokens):
    return {"ttft_s": ttft, "decode_s": decode, "peak_rss": rss, "tokens": tokens, "load_s": 1.0, "rss_after_load": rss}


def test_summary_ratios_roofline_and_token_agreement():
    rows = {"ours": _row(0.8, 0.2, 90, [5, 6, 7, 8]), "eager": _row(1.0, 0.4, 100, [5, 6, 9, 8])}
    bw = {"read_bytes_per_s": 10.0, "set_by": "head GEMV aten", "streams": {"sum": 8.0, "head GEMV aten": 10.0},
          "bytes": 1 << 30, "threads": 2}
    s = inference.summarize(rows, bw, step_bytes=1)
    assert s["roofline_s"] == pytest.approx(0.1)
    assert s["roofline_fraction"] == pytest.approx({"ours": 0.5, "eager": 0.25})
    v = s["vs"]["eager"]
    assert (v["ttft"], v["decode"], v["rss"]) == pytest.approx((0.8, 0.5, 0.9))
    assert (v["same_leading_tokens"], v["tokens"]) == (2, 4)
    result = {"preset": "tiny", "prompt_tokens": 12, "new_tokens": 3, "runs": 1, "machine": common.machine(2),
              "dtypes": {"float32": {"bandwidth": bw, "rows": rows, "skipped": {"sdpa": "no memory"}, "summary": s}}}
    md = inference.markdown(result)
    assert "| vs eager | 0.80 (met) | 0.50 (met) | 0.90 (met) | 2/4 |" in md
    assert "transformers sdpa | skipped: no memory" in md
    assert "Ours at 50% of the decode roofline (target >= 75 %: **not met**)" in md
    assert "Roofline: 1e-09 GB of weights per decode step / read bandwidth 1e-08 GB/s = **0.1 s/token**" in md
    assert "set by **head GEMV aten (probe)**" in md and "| ours | 1.0 | 0.800 | 0.2000 | 50% | - | - |" in md


def test_the_roofline_takes_the_fastest_stream_of_the_run_and_each_implementation_its_own():
    """The VM's bandwidth moves between runs: a stream measured right after an implementation's run that beats the
    probe sets the roofline, and each implementation is also shown against its own runs' bandwidth."""
    rows = {"ours": _row(0.8, 0.2, 90, [5]), "eager": _row(1.0, 0.4, 100, [5])}
    for name, r in rows.items():  # one run each: its decode and the bandwidth measured right after it
        r["runs"] = [{"decode_s": r["decode_s"], "read_bytes_per_s": 6.0 if name == "ours" else 20.0}]
    rows["ours"]["bandwidth"] = {"read_bytes_per_s": 6.0, "set_by": "head GEMV gemv", "streams": {}, "bytes": 1}
    rows["eager"]["bandwidth"] = {"read_bytes_per_s": 20.0, "set_by": "sum over the step's weights",
                                  "streams": {}, "bytes": 1}
    bw = {"read_bytes_per_s": 10.0, "set_by": "sum", "streams": {"sum": 10.0}, "bytes": 1 << 30, "threads": 2}
    s = inference.summarize(rows, bw, step_bytes=1)
    assert s["read_bytes_per_s"] == 20.0 and s["set_by"] == "sum over the step's weights (after a eager run)"
    assert s["roofline_fraction"] == pytest.approx({"ours": 0.25, "eager": 0.125})
    assert s["own_fraction"] == pytest.approx({"ours": 1 / 6 / 0.2, "eager": 1 / 20 / 0.4})
    rows["ours"]["runs"] = [{"decode_s": 0.2, "read_bytes_per_s": 6.0}, {"decode_s": 0.3, "read_bytes_per_s": 2.0},
                            {"decode_s": 0.25, "read_bytes_per_s": 4.0}]  # paired run by run: 5/6, 5/3, 1
    assert inference.summarize(rows, bw, step_bytes=1)["own_fraction"]["ours"] == pytest.approx(1.0)
    rows["ours"]["runs"] = rows["ours"]["runs"][:1]
    result = {"preset": "tiny", "prompt_tokens": 12, "new_tokens": 3, "runs": 1, "machine": common.machine(2),
              "dtypes": {"float32": {"bandwidth": bw, "rows": rows, "skipped": {}, "summary": s}}}
    md = inference.markdown(result)
    assert "| ours | 1.0 | 0.800 | 0.2000 | 25% | 6e-09 (head GEMV gemv) | 83% |" in md
    assert "Ours at 25% of the decode roofline (target >= 75 %: **not met**); 83% of the bandwidth" in md


def test_a_roofline_that_an_implementation_beats_is_not_printed():
    """transformers at 132 % of the 'roofline' (issue 16): the bound is wrong, so no fraction is printed."""
    rows = {"ours": _row(0.8, 0.2, 90, [5]), "eager": _row(1.0, 0.4, 100, [5])}
    bw = {"read_bytes_per_s": 10.0, "set_by": "sum", "streams": {"sum": 10.0}, "bytes": 1 << 30, "threads": 2}
    for step_bytes, printed in ((0.2 * 10.0 * 1.04, True), (0.2 * 10.0 * 1.32, False)):  # ours at 104 % / 132 %
        s = inference.summarize(rows, bw, step_bytes=step_bytes)
        assert bool(s["roofline_exceeded"]) != printed
        result = {"preset": "tiny", "prompt_tokens": 12, "new_tokens": 3, "runs": 1, "machine": common.machine(2),
                  "dtypes": {"float32": {"bandwidth": bw, "rows": rows, "skipped": {}, "summary": s}}}
        md = inference.markdown(result)
        assert ("Roofline: " in md and "Ours at 104% of the decode roofline" in md) == printed
        assert ("**No roofline printed**: ours decoded at 132% of the bound" in md) != printed
        assert ("| ours | 1.0 | 0.800 | 0.2000 | - |" in md) != printed


def test_update_results_keeps_one_generated_section_per_cpu_model(tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    zen_begin, zen_end = inference.markers("AMD EPYC")
    path.write_text(f"# Results\n\nhand-written notes\n\n{zen_begin}\nold table\n{zen_end}\n\n## Profile\nkept\n")
    monkeypatch.setattr(inference, "RESULTS_MD", path)
    inference._update_results("xeon table\n", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz")
    text = path.read_text()
    assert "old table" in text and "xeon table" in text and "#### Measured on Intel(R) Xeon(R) Platinum" in text
    assert text.index("old table") < text.index("xeon table") < text.index("## Profile")  # after the last section
    inference._update_results("new zen table", "AMD EPYC")
    text = path.read_text()
    assert "old table" not in text and "new zen table" in text and "xeon table" in text
    assert text.startswith("# Results\n\nhand-written notes") and text.endswith("## Profile\nkept\n")
    assert text.count(zen_begin) == 1 and text.count("<!-- BEGIN inference on ") == 2
    assert inference.markers("a -- b")[0].startswith("<!-- BEGIN inference on a - b:")  # no comment end inside


def test_disk_write_speeds_and_the_machine_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("PGCONV_WRITER", "buffered")
    d = common.disk_write_speeds(tmp_path / "d", nbytes=1 << 20, runs=1)
    assert d["direct"] > 0 and d["buffered"] > 0 and d["plan"].startswith("buffered") and d["plan_source"] == "forced"
    assert list((tmp_path / "d").iterdir()) == []
    info = {**common.machine(2), "disk_write": d}
    md = common.machine_markdown(info)
    assert f"- CPU: {info['cpu']}" in md and "- Disk write (durable: fsync included; " in md
    assert "pgconv convert writes buffered 32MiB" in md


def test_run_child_reports_the_child_peak_rss_and_failures():
    code = "import json; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); print(json.dumps({'n': 1}))"
    r = common.run_child([sys.executable, "-c", code])
    assert r["n"] == 1 and r["peak_rss"] >= 200 << 20 and r["wall_s"] > 0
    with pytest.raises(common.ChildError, match="boom"):
        common.run_child([sys.executable, "-c", "raise SystemExit('boom')"])


def test_quick_inference_runs_ours_and_transformers_on_the_same_tokens(tmp_path):
    """The CI smoke run, reduced to fp32, ours + eager: it completes, and both generate the same greedy tokens."""
    cmd = [sys.executable, "-m", "benchmarks.inference", "--quick", "--dtypes", "float32", "--impls", "ours,eager",
           "--new-tokens", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "inference-quick.json").read_text())
    d = result["dtypes"]["float32"]
    assert set(d["rows"]) == {"ours", "eager"} and not d["skipped"]
    for r in d["rows"].values():
        assert r["threads"] == 2 and len(r["tokens"]) == 3 and r["ttft_s"] > 0 and r["peak_rss"] > 0
    assert d["summary"]["vs"]["eager"]["same_leading_tokens"] == 3
    assert (tmp_path / "inference-quick.md").read_text().startswith("Preset `tiny`")


@pytest.mark.slow
def test_every_quick_benchmark_runs():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_quick_diff_benchmark_finds_the_fp32_conversion_identical(tmp_path, monkeypatch):
    from benchmarks import diff_3b

    monkeypatch.setattr(diff_3b, "OUT", tmp_path)
    monkeypatch.setattr(diff_3b, "fixture_path", lambda preset: tmp_path / "fixtures" / preset)
    diff_3b.main(diff_3b.QUICK_ARGS)
    result = json.loads((tmp_path / "diff_3b.json").read_text())["result"]
    assert result["verdict"] == "identical" and result["bit_identical"] and result["kl_max"] == 0
    assert result["peak_rss"] > 0 and result["fp32_weight_bytes"] == 4 * sum(
        p.numel() for p in __import__("pgconv").load(tmp_path / "fixtures" / "tiny").parameters())
