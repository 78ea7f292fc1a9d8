"""Reports of `pgconv compare` (`parity.dump`): terminal table, report.json, report.md, report.html, junit.xml, in the
formats of verify's (`parity.report`, `parity.report_html`): the same probe columns, depth plots and junit cases."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any
from pgconv.parity.report import _md_code, _probe_cells, _table, fmt, junit_xml, write_report_set

__all__ = ["compare_terminal", "compare_markdown", "compare_junit", "compare_html", "write_compare_reports"]

_COLUMNS = ("probe", "verdict", "max_abs", "nrmse", "cosine", "contrib", "budget")


def _rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    several = len(report["cases"]) > 1
    return [(f"case {c['case']}: " if several else "", r) for c in report["cases"] for r in c["probes"]]


def _first(report: dict[str, Any]) -> str:
    fd = report["first_divergence"]
    if fd is None:
        return "first divergence: none"
    where = f"case {fd['case']}, " if len(report["cases"]) > 1 else ""
    return (f"first divergence: {fd['name']} ({where}{fd['kind']}), nrmse {fmt(fd['nrmse'])}"
            + (f", teacher-forced nrmse {fmt(fd['contributed_nrmse'])}" if fd.get("contributed_nrmse") is not None
               else "") + (f": {fd['error']}" if fd.get("error") else ""))


def compare_terminal(report: dict[str, Any]) -> str:
    head = [f"pgconv compare: {report['dump']} against {report['golden']} ({report['family']}, {report['dtype']})", ""]
    rows = [list(_COLUMNS)] + [[prefix + c for c in _probe_cells(r)][:1] + _probe_cells(r)[1:]
                               for prefix, r in _rows(report)]
    tail = [""]
    for c in report["cases"]:
        g = c.get("generation")
        if g is not None:
            tail.append(f"greedy tokens{' (case %d)' % c['case'] if len(report['cases']) > 1 else ''}: "
                        + ("identical" if g["passed"] else f"diverge at step {g['first_divergence']}"))
    if report["missing"]:
        tail.append(f"not in the dump ({len(report['missing'])}): {', '.join(report['missing'][:8])}"
                    + (" ..." if len(report["missing"]) > 8 else ""))
    tail += [f"note: {n}" for n in report.get("notes", [])]
    tail.append(_first(report))
    verdict = "PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"])
    tail.append(f"{verdict}  ({report['timing']['total']:.1f} s)")
    return "\n".join(head + _table(rows) + tail)


def compare_markdown(report: dict[str, Any]) -> str:
    status = "PASS" if report["passed"] else "FAIL"
    lines = [f"## pgconv compare: {status}", "",
             f"{_md_code(report['dump'])} against golden {_md_code(report['golden'])} ({_md_code(report['family'])}, "
             f"{_md_code(report['dtype'])}, tolerances {_md_code(report['tolerances']['version'])})", ""]
    lines += [f"- {f}" for f in report["failures"]] + [f"- note: {n}" for n in report.get("notes", [])]
    lines += [f"- {_first(report)}", ""]
    lines += ["| probe | verdict | max abs | nrmse | teacher-forced nrmse | budget |", "|---|---|---|---|---|---|"]
    for prefix, r in _rows(report):
        lines.append(f"| {_md_code(prefix + r['name'])} | {r['verdict']}{' (inherited)' if r.get('inherited') else ''}"
                     f" | {fmt(r['max_abs'])} | {fmt(r['nrmse'])} | {fmt(r['contributed_nrmse'])} | "
                     f"{fmt(r['budget']['nrmse'])} |")
    if report["missing"]:
        lines += ["", f"Not in the dump: {', '.join(_md_code(m) for m in report['missing'])}"]
    return "\n".join(lines) + "\n"


def compare_junit(report: dict[str, Any]) -> str:
    cases = [(f"probe {prefix}{r['name']}", r["passed"], f"{r['verdict']}: nrmse {fmt(r['nrmse'])}, teacher-forced "
              f"{fmt(r['contributed_nrmse'])}" + (f"; {r['error']}" if r.get("error") else ""))
             for prefix, r in _rows(report)]
    for c in report["cases"]:
        if c.get("generation") is not None:
            cases.append((f"generation case {c['case']}", c["generation"]["passed"],
                          f"first divergent step {c['generation']['first_divergence']}"))
    return junit_xml("pgconv.compare", "pgconv compare " + report["dtype"], cases, report["timing"]["total"])


def compare_html(report: dict[str, Any]) -> str:
    from pgconv.parity.report_html import _CSS, depth_plot

    status = '<span class="pass">PASS</span>' if report["passed"] else '<span class="fail">FAIL</span>'
    items = [f"<li>dump <code>{escape(report['dump'])}</code> against golden <code>{escape(report['golden'])}</code>"
             f", {escape(report['family'])}, {escape(report['dtype'])}</li>", f"<li>{escape(_first(report))}</li>"]
    items += [f'<li class="fail">{escape(f)}</li>' for f in report["failures"]]
    head = ("<tr><th>probe</th><th>verdict</th><th>max abs</th><th>nrmse</th><th>cosine</th>"
            "<th>teacher-forced nrmse</th><th>budget nrmse</th></tr>")
    body = [f'<tr class="{"" if r["passed"] else "fail"}"><td>{escape(prefix + r["name"])}</td>'
            f'<td>{escape(r["verdict"])}{" (inherited)" if r.get("inherited") else ""}</td><td>{fmt(r["max_abs"])}'
            f'</td><td>{fmt(r["nrmse"])}</td><td>{fmt(r["cosine"], 6)}</td><td>{fmt(r["contributed_nrmse"])}</td>'
            f'<td>{fmt(r["budget"]["nrmse"])}</td></tr>' for prefix, r in _rows(report)]
    plot_rows = [{**r, "contributed_nrmse": r["contributed_nrmse"] if r["contributed_nrmse"] is not None
                  else r["nrmse"]} for r in report["cases"][0]["probes"]]
    plots = "".join(depth_plot(plot_rows, s) for s in ("vision", "text"))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>pgconv compare: '
            f'{"PASS" if report["passed"] else "FAIL"}</title><style>{_CSS}</style></head><body>'
            f'<h1>pgconv compare: {status}</h1><ul>{"".join(items)}</ul><h2>Error vs depth</h2>'
            f'<div class="plots">{plots}</div><h2>Probes</h2><table>{head}{"".join(body)}</table></body></html>\n')


def write_compare_reports(report: dict[str, Any], directory: Path) -> None:
    write_report_set(report, directory, compare_markdown, compare_html, compare_junit)
