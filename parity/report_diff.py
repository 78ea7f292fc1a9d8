"""Reports of `pgconv diff` (`parity.diff`): terminal text, report.json, report.md, report.html, junit.xml, in the
formats of verify's and compare's: findings first (one line per differing tensor), then the weight summary, then per
case the llama.cpp numbers (KL mean / p99 / max, top-1 and greedy agreement) and the first divergent probe."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any
from pgconv.parity.report import _md_code, fmt, junit_xml, write_report_set

__all__ = ["diff_terminal", "diff_markdown", "diff_html", "diff_junit", "write_diff_reports"]

_SHOWN = 20  # findings in the terminal (a cast gone wrong touches every tensor; the files list them all)


def _weights_line(w: dict[str, Any]) -> str:
    parts = [f"{w['compared']} tensors compared: {w['identical']} identical"]
    if w["within_rounding"]:
        parts.append(f"{w['within_rounding']} within {w['rounding_dtype']} rounding")
    if w["differing"]:
        parts.append(f"{w['differing']} differ")
    if w["missing"]:
        parts.append(f"{len(w['missing'])} missing in B")
    if w["extra"]:
        parts.append(f"{len(w['extra'])} only in B")
    return ", ".join(parts) + f" (A: {w['layouts']['a']}, B: {w['layouts']['b']})"


def _rounding_lines(w: dict[str, Any], limit: int = 6) -> list[str]:
    rows = [r for r in w["tensors"] if r["status"] == "rounding"]
    out = [f"  {r['name']}: {r['diagnosis']}, max |delta| {fmt(r['max_abs'])}, relative error {fmt(r['rel_err'])}"
           for r in sorted(rows, key=lambda r: -r["rel_err"])[:limit]]
    if len(rows) > limit:
        out.append(f"  ... {len(rows) - limit} more within rounding (report.json)")
    return out


def _case_lines(report: dict[str, Any]) -> list[str]:
    b = report["behaviour"]
    if b is None:
        return [f"behaviour: not run ({report['behaviour_skipped']})"]
    out = [f"behaviour ({b['impl']}, {b['dtype']}; A's activations as the golden):"]
    for c in b["cases"]:
        lg, g = c["logits"], c["greedy"]
        out.append(f"  case {c['case']} ({c['prompt']!r}): KL mean {fmt(lg['kl_mean'])} / p99 {fmt(lg['kl_p99'])} "
                   f"/ max {fmt(lg['kl_max'])} nats over {lg['positions']} positions, top-1 agreement "
                   f"{100 * lg['top1_agreement']:.1f} %, greedy tokens "
                   + ("identical" if g["first_divergence"] is None else
                      f"diverge at step {g['first_divergence']} ({100 * g['agreement']:.0f} % agree)"))
        if "cast" in c:
            cl = c["cast"]["logits"]
            out.append(f"    A rounded to nearest: KL mean {fmt(cl['kl_mean'])} / max {fmt(cl['kl_max'])} "
                       f"(budget for B: KL mean <= {fmt(lg.get('cast_budget_kl_mean'))})")
        fd = c["first_divergence"]
        if c["bit_identical"]:
            out.append("    every probe bit-identical")
        elif fd is not None:
            why = " (expected: B's weights are rounded)" if report["weights"]["status"] == "rounding" else ""
            out.append(f"    first divergence (past verify's {b['dtype']} noise budget){why}: {fd['name']}, nrmse "
                       f"{fmt(fd['nrmse'])}, max |delta| {fmt(fd['max_abs'])}")
        else:
            worst = max(c["probes"], key=lambda r: r["nrmse"])
            out.append(f"    every probe within verify's {b['dtype']} budgets (largest nrmse {fmt(worst['nrmse'])} at "
                       f"{worst['name']})")
    return out


def diff_terminal(report: dict[str, Any]) -> str:
    w = report["weights"]
    lines = [f"pgconv diff: {report['a']} -> {report['b']} ({report['family']})", "", "weights: " + _weights_line(w)]
    lines += [f"  {f}" for f in w["findings"][:_SHOWN]] + [f"  note: {n}" for n in w["notes"]]
    if len(w["findings"]) > _SHOWN:
        lines.append(f"  ... {len(w['findings']) - _SHOWN} more finding(s) (report.json, report.md)")
    if w["status"] == "rounding":
        lines += _rounding_lines(w)
    lines += [""] + _case_lines(report) + [""]
    lines.append(f"verdict: {report['verdict'].upper() if report['verdict'] == 'differs' else report['verdict']}  "
                 f"({report['timing']['total']:.1f} s)")
    extra = [f for f in report["failures"] if f not in w["findings"]]
    lines += [f"  {f}" for f in extra]
    return "\n".join(lines)


def diff_markdown(report: dict[str, Any]) -> str:
    w = report["weights"]
    lines = [f"## pgconv diff: {report['verdict']}", "", f"`{report['a']}` -> `{report['b']}` ({report['family']}, "
             f"{report['impl']}, {report['dtype']})", "", f"- weights: {_weights_line(w)}"]
    lines += [f"- {_md_code(f)}" for f in report["failures"]] + [f"- note: {n}" for n in w["notes"]]
    b = report["behaviour"]
    if b is None:
        lines += ["", f"Behaviour not run ({report['behaviour_skipped']})."]
    else:
        lines += ["", "| case | KL mean | KL p99 | KL max | top-1 agreement | greedy agreement | first divergence |",
                  "|---|---|---|---|---|---|---|"]
        for c in b["cases"]:
            lg, fd = c["logits"], c["first_divergence"]
            lines.append(f"| {c['case']} | {fmt(lg['kl_mean'])} | {fmt(lg['kl_p99'])} | {fmt(lg['kl_max'])} | "
                         f"{lg['top1_agreement']:.3f} | {c['greedy']['agreement']:.3f} | "
                         f"{_md_code(fd['name']) if fd else 'none'} |")
    lines += ["", "| tensor | status | max abs | relative error | ulps | diagnosis |", "|---|---|---|---|---|---|"]
    for r in w["tensors"]:
        if r["status"] != "identical":
            lines.append(f"| {_md_code(r['name'])} | {r['status']} | {fmt(r['max_abs'])} | {fmt(r['rel_err'])} | "
                         f"{r['max_ulp']} {r['ulp_dtype'] or ''} | {r['diagnosis'] or ''} |")
    return "\n".join(lines) + "\n"


def diff_junit(report: dict[str, Any]) -> str:
    w = report["weights"]
    cases = [(f"tensor {r['name']}", r["status"] != "differs", r["diagnosis"] or r["status"]) for r in w["tensors"]]
    cases += [(f"tensor {n}", False, "missing in B") for n in w["missing"]]
    cases += [(f"tensor {n}", False, "only in B") for n in w["extra"]]
    cases += [(f"config {c.split(':')[0]}", False, c) for c in w["config_differences"]]
    for c in (report["behaviour"] or {}).get("cases", []):
        bad = [f for f in report["failures"] if f.startswith(f"case {c['case']}:")]
        cases.append((f"behaviour case {c['case']}", not bad, "; ".join(bad) or "ok"))
    return junit_xml("pgconv.diff", "pgconv diff " + report["dtype"], cases, report["timing"]["total"])


def diff_html(report: dict[str, Any]) -> str:
    from pgconv.parity.report_html import _CSS

    bad = report["verdict"] == "differs"
    status = f'<span class="{"fail" if bad else "pass"}">{escape(report["verdict"])}</span>'
    items = [f"<li><code>{escape(report['a'])}</code> -&gt; <code>{escape(report['b'])}</code>, "
             f"{escape(report['impl'])}, {escape(report['dtype'])}</li>",
             f"<li>weights: {escape(_weights_line(report['weights']))}</li>"]
    items += [f'<li class="fail">{escape(f)}</li>' for f in report["failures"]]
    body = "".join(f"<li>{escape(line.strip())}</li>" for line in _case_lines(report))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>pgconv diff: '
            f'{escape(report["verdict"])}</title><style>{_CSS}</style></head><body><h1>pgconv diff: {status}</h1>'
            f'<ul>{"".join(items)}</ul><h2>Behaviour</h2><ul>{body}</ul><h2>Tensors</h2>'
            f'<pre>{escape(diff_markdown(report))}</pre></body></html>\n')


def write_diff_reports(report: dict[str, Any], directory: Path) -> None:
    write_report_set(report, directory, diff_markdown, diff_html, diff_junit)
