"""Report writers: terminal table, report.json, report.md (fits a CI step summary), report.html, junit.xml.

report.json (schema_version 1) top level: `schema_version`, `passed`, `failures` (one line each), `checkpoint`,
`checkpoint_path`, `family`, `dtype`, `device`, `probes_mode`, `max_new_tokens`, `tolerances` {source, version},
`versions`, `timing`, `weights` {passed, mapped, bit_identical, shared, mismatched, layout (the transformers
in-memory names the map uses), checkpoint_layout, map[]}, `processor` {image_processor (the transformers class that
made the models' inputs from the files: SiglipImageProcessorPil, or SiglipImageProcessor when torchvision is
installed), backend, fallbacks, checked, passed, compared_with, tokens_equal, pixel_values_max_abs,
reference_pixel_values_max_abs; per case under `cases[].processor`, see `parity.inputs`},
`first_divergence` {probe, kind, stack, layer, nrmse, max_abs, contributed_*, fp64, case} or null,
`probes` [{name, kind, stack, layer, passed, verdict, max_abs, mean_abs, max_rel, rmse, cosine, nrmse, nmax,
contributed_max_abs, contributed_nrmse, contributed_nmax, contributed_cosine, within_budget,
contributed_within_budget, inherited, replay, budget, segments {image, prompt, suffix}, fp64, ours, reference,
case}], `logits` {kl_mean, kl_max, top1_agreement, top5_overlap, decisive_top1_agreement, passed},
`generation` {reference_text, candidate_text, tokens_equal, first_divergence, teacher_forced, cache, passed,
reference_tokens_from ("teacher-forced argmax" | "generate", see `parity.generation.speculate`)},
`cases` [per case: `image` (its image paths joined by " + "), `images` (the list: several images in one prompt),
`prompt`, and the same sections in full, with per-position KL / top-1 / top-5 lists].
Non-finite floats are written as the strings "inf", "-inf", "nan" (strict JSON).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from pgconv.errors import InputError

__all__ = ["finalise", "terminal", "markdown", "junit", "junit_xml", "write_reports", "write_report_set", "write_texts",
           "fmt"]


def finalise(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats as strings, tuples as lists, paths as strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, dict):
        return {str(k): finalise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finalise(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def fmt(x: Any, digits: int = 2) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.{digits}e}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits + 2}g}"


_COLUMNS = ("probe", "verdict", "max_abs", "nrmse", "cosine", "contrib", "budget")


def _probe_cells(p: dict[str, Any]) -> list[str]:
    flag = "" if p["passed"] else "  <-- FAIL"
    verdict = p["verdict"] + (" (inherited)" if p.get("inherited") and p["verdict"] == "match" else "")
    return [p["name"], verdict, fmt(p["max_abs"]), fmt(p["nrmse"]), fmt(p["cosine"], 6),
            fmt(p["contributed_nrmse"]), fmt(p["budget"]["nrmse"]) + flag]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _generation_lines(g: dict[str, Any]) -> list[str]:
    lines = [f"reference: {g['reference_text']!r}", f"pgconv:    {g['candidate_text']!r}"]
    fd = g.get("first_divergence")
    if fd is None:
        lines.append("greedy tokens: identical")
    elif "reference" in fd:
        kind = "near tie (not a failure)" if fd["near_tie"] else "NOT a near tie"
        lines.append(f"first divergent token: step {fd['step']}: reference {fd['reference_token']} "
                     f"{fd['reference_piece']!r} vs pgconv {fd['candidate_token']} {fd['candidate_piece']!r}; "
                     f"reference top-1/top-2 margin {fmt(fd['reference']['top1_top2_margin'])} nats, gap between the "
                     f"two {fmt(fd['reference']['gap'])} nats: {kind}")
    else:
        lines.append(f"generation lengths differ from step {fd['step']}")
    tf, cache = g["teacher_forced"], g["cache"]
    lines.append(f"teacher-forced over the reference's tokens: KL mean {fmt(tf['kl_mean'])} max {fmt(tf['kl_max'])}, "
                 f"top-1 {fmt(tf['top1_agreement'])}")
    lines.append(f"cached decode vs uncached forward: KL max {fmt(cache['kl_max'])}, max abs {fmt(cache['max_abs'])} "
                 f"over {cache['steps']} steps: {'ok' if cache['passed'] else 'FAIL'}")
    return lines


def _case_summaries(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One line of facts per image/prompt case (the tables above are the worst row over all cases); empty for a
    single case, which the top level already is."""
    cases = report.get("cases") or []
    if len(cases) < 2:
        return []
    out = []
    for i, c in enumerate(cases):
        failing = [p["name"] for p in c["probes"] if not p["passed"]]
        reasons = [f"probe {failing[0]}" + (f" (+{len(failing) - 1})" if len(failing) > 1 else "")] if failing else []
        reasons += ["logits"] if not c["logits"]["passed"] else []
        reasons += ["generation"] if not c["generation"]["passed"] else []
        fd = c.get("first_divergence")
        names = " + ".join(Path(im).name for im in c.get("images") or [c["image"]])  # several images in one prompt
        if len({k.get("dtype") for k in cases}) > 1:  # one run per dtype (--dtype float32,bfloat16)
            names = f"[{c['dtype']}] {names}"
        out.append({"index": i + 1, "image": names, "prompt": c["prompt"], "passed": not reasons,
                    "reasons": reasons, "kl_mean": c["logits"]["kl_mean"],
                    "tokens": "identical" if c["generation"]["tokens_equal"] else "differ",
                    "text": c["generation"]["candidate_text"], "first_divergence": fd["probe"] if fd else "none"})
    return out


def _case_lines(report: dict[str, Any]) -> list[str]:
    rows = _case_summaries(report)
    if not rows:
        return []
    lines = ["", f"cases ({len(rows)}; the table above is each probe's worst case):"]
    for r in rows:
        verdict = "PASS" if r["passed"] else "FAIL (" + ", ".join(r["reasons"]) + ")"
        lines.append(f"  {r['index']}. {r['image']} {r['prompt']!r}: {verdict}; KL mean {fmt(r['kl_mean'])}, tokens "
                     f"{r['tokens']} {r['text']!r}, first divergence {r['first_divergence']}")
    return lines


def terminal(report: dict[str, Any]) -> str:
    w = report["weights"]
    head = [f"pgconv verify: {report['checkpoint']} ({report['family']}, {report['dtype']}, {report['device']})",
            f"weights: {w['bit_identical']}/{w['mapped']} mapped tensors bit-identical, {w['shared']} shared storage"
            f" (checkpoint layout {w.get('checkpoint_layout', '?')}; transformers' names: {w['layout']})",
            _processor_line(report), ""]
    rows = [list(_COLUMNS)] + [_probe_cells(p) for p in report["probes"]]
    lg = report["logits"]
    tail = ["", f"logits: KL mean {fmt(lg['kl_mean'])} max {fmt(lg['kl_max'])}, top-1 {fmt(lg['top1_agreement'])}, "
                f"top-5 overlap {fmt(lg['top5_overlap'])}, decisive top-1 {fmt(lg['decisive_top1_agreement'])}"]
    tail += _generation_lines(report["generation"])
    tail += _case_lines(report)
    fd = report["first_divergence"]
    if fd is None:
        tail.append("first divergence: none")
    elif fd.get("error"):
        tail.append(f"first divergence: {fd['probe']} ({fd['kind']}): {fd['error']}")
    else:
        tail.append(f"first divergence: {fd['probe']} ({fd['kind']}), contributed nrmse "
                    f"{fmt(fd['contributed_nrmse'])}, fp64 {_fp64(fd.get('fp64'))}")
    verdict = "PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"])
    tail.append(f"{verdict}  ({report['timing']['total']:.1f} s)")
    return "\n".join(head + _table(rows) + tail)


def _processor_line(report: dict[str, Any]) -> str:
    """Which transformers image processor made the models' inputs from the files, and how pgconv's compares."""
    p = report.get("processor") or {}
    if not p.get("image_processor"):
        return "inputs: -"
    line = f"inputs: transformers' {p['image_processor']} ({p['backend']}) loaded the image files"
    if p.get("fallbacks"):
        line += f" ({len(p['fallbacks'])} case(s) with the PIL processor: {p['fallbacks'][0]})"
    if not p.get("checked"):
        return line + "; pgconv's processor not compared (no tokenizer.json)"
    if p["passed"]:
        line += f"; pgconv's processor: identical to {p['compared_with']}"
    else:
        line += (f"; pgconv's processor DIFFERS from {p['compared_with']} (token ids "
                 f"{'equal' if p['tokens_equal'] else 'differ'}, pixel values max |diff| "
                 f"{fmt(p['pixel_values_max_abs'])})")
    if p.get("reference_pixel_values_max_abs"):
        line += f"; max |diff| to the models' pixel values {fmt(p['reference_pixel_values_max_abs'])}"
    return line


def _fp64(fp: dict[str, Any] | None) -> str:
    if not fp:
        return "-"
    return f"ours {fmt(fp['ours'])} vs reference {fmt(fp['reference'])} (k={fp['k']})"


def markdown(report: dict[str, Any]) -> str:
    status = "PASS" if report["passed"] else "FAIL"
    w, lg, g = report["weights"], report["logits"], report["generation"]
    lines = [f"## pgconv verify: {status}", "",
             f"`{report['checkpoint']}`: {report['family']}, {report['dtype']} on {report['device']}, tolerances "
             f"{report['tolerances']['version']}, transformers {report['versions']['transformers']}", "",
             _processor_line(report), ""]
    for f in report["failures"]:
        lines.append(f"- **{f}**")
    fd = report["first_divergence"]
    lines += ["", f"**First divergence:** {'none' if fd is None else '`' + fd['probe'] + '` (' + fd['kind'] + ')'}",
              f"**Weights:** {w['bit_identical']}/{w['mapped']} bit-identical ({w['shared']} shared storage)",
              f"**Logits:** KL mean {fmt(lg['kl_mean'])}, max {fmt(lg['kl_max'])}; top-1 {fmt(lg['top1_agreement'])}; "
              f"top-5 overlap {fmt(lg['top5_overlap'])}",
              f"**Generation:** {'identical tokens' if g['tokens_equal'] else 'tokens differ'}; "
              f"reference `{g['reference_text']!r}`, pgconv `{g['candidate_text']!r}`", "",
              ]
    if cases := _case_summaries(report):
        lines += [f"**Cases:** {len(cases)} (the probe table is each probe's worst case)", "",
                  "| case | image | prompt | verdict | KL mean | tokens | first divergence |", "|---|---|---|---|---|---|---|"]
        for r in cases:
            verdict = "PASS" if r["passed"] else "**FAIL** (" + ", ".join(r["reasons"]) + ")"
            lines.append(f"| {r['index']} | {_md_code(r['image'])} | {_md_code(r['prompt'])} | {verdict} | "
                         f"{fmt(r['kl_mean'])} | {r['tokens']} | {r['first_divergence']} |")
        lines.append("")
    lines += ["| probe | verdict | max abs | nrmse | cosine | contributed nrmse | budget |",
              "|---|---|---|---|---|---|---|"]
    for p in report["probes"]:
        c = _probe_cells(p)
        c[1] = c[1] if p["passed"] else f"**{c[1]}**"
        c[-1] = c[-1].replace("  <-- FAIL", "")
        lines.append("| " + " | ".join(f"`{c[0]}`" if i == 0 else c[i] for i in range(len(c))) + " |")
    return "\n".join(lines) + "\n"


def _md_code(text: str) -> str:
    """`text` as an inline code span inside a table cell: a `|` would end the cell and a backtick the span."""
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def junit(report: dict[str, Any]) -> str:
    """One test case per probe (plus weights, logits, generation), in one suite."""
    cases = [("weights", report["weights"]["passed"], f"mismatched: {report['weights']['mismatched'][:5]}")]
    for p in report["probes"]:
        msg = (f"{p['verdict']}: nrmse {fmt(p['nrmse'])}, contributed {fmt(p['contributed_nrmse'])}, "
               f"fp64 {_fp64(p.get('fp64'))}" + (f"; {p['error']}" if p.get("error") else ""))
        cases.append((f"probe {p['name']}", p["passed"], msg))
    cases.append(("logits", report["logits"]["passed"], f"KL max {fmt(report['logits']['kl_max'])}"))
    cases.append(("generation", report["generation"]["passed"], "; ".join(_generation_lines(report["generation"]))))
    for r in _case_summaries(report):
        cases.append((f"case {r['index']}: {r['image']} {r['prompt']!r}", r["passed"],
                      f"failing: {', '.join(r['reasons'])}; KL mean {fmt(r['kl_mean'])}; tokens {r['tokens']}; "
                      f"first divergence {r['first_divergence']}"))
    return junit_xml("pgconv.verify", "pgconv verify " + report["dtype"], cases, report["timing"]["total"])


def junit_xml(classname: str, suite: str, cases: list[tuple[str, bool, str]], seconds: float) -> str:
    """One JUnit suite of (name, passed, message) test cases (verify, compare and diff reports)."""
    failures = sum(not ok for _, ok, _ in cases)
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<testsuites tests="{len(cases)}" failures="{failures}">',
           f'  <testsuite name={quoteattr(suite)} tests="{len(cases)}" failures="{failures}" time="{seconds}">']
    for name, ok, msg in cases:
        out.append(f'    <testcase classname="{classname}" name={quoteattr(name)}>')
        if not ok:
            out.append(f'      <failure message={quoteattr(msg[:500])}>{escape(msg)}</failure>')
        out.append("    </testcase>")
    out += ["  </testsuite>", "</testsuites>"]
    return "\n".join(out) + "\n"


def write_reports(report: dict[str, Any], directory: Path) -> None:
    from pgconv.parity.report_html import html

    write_report_set(report, directory, markdown, html, junit)


def write_report_set(report: dict[str, Any], directory: Path, md: Any, html: Any, junit_: Any) -> None:
    """report.json, report.md, report.html and junit.xml of one report (verify, compare and diff renderers)."""
    write_texts({"report.json": json.dumps(finalise(report), indent=1, allow_nan=False) + "\n",
                 "report.md": md(report), "report.html": html(report), "junit.xml": junit_(report)}, directory)


def write_texts(texts: dict[str, str], directory: Path) -> None:
    """{file name: text} written into `directory` (created if needed), all or nothing."""
    # All four written under temporary names first, then renamed: a full disk leaves no half-written report.
    tmp = {name: directory / f".{name}.pgconv-tmp" for name in texts}
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            tmp[name].write_text(text, encoding="utf-8")
        for name in texts:
            os.replace(tmp[name], directory / name)
    except OSError as e:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        raise InputError(f"{directory}: cannot write the reports ({e.strerror or e})") from None
