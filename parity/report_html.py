"""Self-contained report.html: summary, error-vs-depth plots (inline SVG, no scripts or external files), probe table.

One plot per stack (vision, text): the end-to-end relative RMSE at each depth (what the layer shows, inherited error
included) and the contributed relative RMSE (the layer run on the reference's input), on a log axis, with the budget
as a dashed line. A bug shows as a jump in the contributed curve; accumulated noise as a slow rise of the other.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from pgconv.parity.report import fmt

__all__ = ["html", "depth_plot"]

_W, _H, _PAD = 560, 240, 48
_FLOOR = 1e-12  # exact zeros drawn on the floor of the log axis


def _num(x: Any) -> float:
    if isinstance(x, str):
        return math.inf if "inf" in x else math.nan
    return float(x)


def _y(v: float, lo: float, hi: float) -> float:
    v = min(max(v, lo), hi)
    return _PAD / 2 + (_H - _PAD) * (1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))


def depth_plot(probes: list[dict[str, Any]], stack: str) -> str:
    """SVG of end-to-end vs contributed nrmse along `stack`'s probes (in execution order)."""
    rows = [p for p in probes if p.get("stack") == stack]
    if not rows:
        return ""
    e2e = [max(_num(p["nrmse"]), _FLOOR) for p in rows]
    con = [max(_num(p["contributed_nrmse"]), _FLOOR) for p in rows]
    budget = [_num(p["budget"]["nrmse"]) for p in rows]
    finite = [v for v in e2e + con + budget if math.isfinite(v) and v > 0]
    lo = 10 ** math.floor(math.log10(max(min(finite), _FLOOR)))
    hi = 10 ** math.ceil(math.log10(max(finite) * 1.01))
    hi = hi if hi > lo else lo * 10
    n = len(rows)

    def x(i: int) -> float:
        return _PAD + (_W - _PAD * 1.5) * (i / max(n - 1, 1))

    def line(vals: list[float], color: str, dash: str = "") -> str:
        pts = " ".join(f"{x(i):.1f},{_y(v if math.isfinite(v) else hi, lo, hi):.1f}" for i, v in enumerate(vals))
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        dots = "".join(f'<circle cx="{x(i):.1f}" cy="{_y(v if math.isfinite(v) else hi, lo, hi):.1f}" r="2.5" '
                       f'fill="{color}"><title>{escape(rows[i]["name"])}: {fmt(v)}</title></circle>'
                       for i, v in enumerate(vals) if not dash)
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{extra} points="{pts}"/>{dots}'

    ticks = []
    for e in range(int(math.log10(lo)), int(math.log10(hi)) + 1):
        y = _y(10.0 ** e, lo, hi)
        ticks.append(f'<line x1="{_PAD}" x2="{_W - _PAD / 2}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{_PAD - 4}" y="{y + 3:.1f}" font-size="9" text-anchor="end">1e{e}</text>')
    labels = "".join(f'<text x="{x(i):.1f}" y="{_H - _PAD / 2 + 12}" font-size="8" text-anchor="end" '
                     f'transform="rotate(-45 {x(i):.1f} {_H - _PAD / 2 + 12})">{escape(_short(r["name"]))}</text>'
                     for i, r in enumerate(rows) if n <= 40 or i % max(n // 20, 1) == 0)
    fails = "".join(f'<circle cx="{x(i):.1f}" cy="{_y(con[i] if math.isfinite(con[i]) else hi, lo, hi):.1f}" r="5" '
                    f'fill="none" stroke="#c00" stroke-width="2"/>' for i, r in enumerate(rows) if not r["passed"])
    legend = ('<text x="60" y="14" font-size="10" fill="#1f77b4">end-to-end (inherited + contributed)</text>'
              '<text x="270" y="14" font-size="10" fill="#d62728">contributed (teacher forced)</text>'
              '<text x="450" y="14" font-size="10" fill="#777">budget</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H + 40}" role="img" '
            f'aria-label="{stack} error vs depth"><text x="{_W / 2}" y="{_H + 36}" font-size="11" text-anchor="middle">'
            f'{stack} stack: relative RMSE vs depth</text>{"".join(ticks)}{line(budget, "#777", "4 3")}'
            f'{line(e2e, "#1f77b4")}{line(con, "#d62728")}{fails}{legend}{labels}</svg>')


def _short(name: str) -> str:
    return name.replace("vision.blocks.", "v").replace("text.blocks.", "t")


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}td:first-child,th:first-child{text-align:left}
tr.fail td{background:#fde8e8}.pass{color:#080}.fail{color:#c00}code{background:#f4f4f4;padding:0 3px}
.plots{display:flex;flex-wrap:wrap;gap:16px}"""


def html(report: dict[str, Any]) -> str:
    status = '<span class="pass">PASS</span>' if report["passed"] else '<span class="fail">FAIL</span>'
    fd, g, lg, w = report["first_divergence"], report["generation"], report["logits"], report["weights"]
    items = [
        f"<li>checkpoint <code>{escape(str(report['checkpoint']))}</code>, {report['family']}, {report['dtype']} on "
        f"{report['device']}, tolerances {escape(str(report['tolerances']['version']))}</li>",
        f"<li>weights: {w['bit_identical']}/{w['mapped']} bit-identical, {w['shared']} shared storage</li>",
        f"<li>first divergence: {'none' if fd is None else '<code>' + escape(fd['probe']) + '</code>'}</li>",
        f"<li>logits: KL mean {fmt(lg['kl_mean'])}, max {fmt(lg['kl_max'])}, top-1 {fmt(lg['top1_agreement'])}, "
        f"top-5 overlap {fmt(lg['top5_overlap'])}</li>",
        f"<li>generation: reference <code>{escape(repr(g['reference_text']))}</code>, pgconv "
        f"<code>{escape(repr(g['candidate_text']))}</code> ({'identical' if g['tokens_equal'] else 'differ'})</li>",
    ] + [f'<li class="fail">{escape(f)}</li>' for f in report["failures"]]
    head = ("<tr><th>probe</th><th>verdict</th><th>max abs</th><th>mean abs</th><th>nrmse</th><th>cosine</th>"
            "<th>contributed max abs</th><th>contributed nrmse</th><th>budget nrmse</th><th>fp64 ours / ref</th></tr>")
    body = []
    for p in report["probes"]:
        fp = p.get("fp64") or {}
        fp_cell = f"{fmt(fp['ours'])} / {fmt(fp['reference'])}" if fp else "-"
        body.append(f'<tr class="{"" if p["passed"] else "fail"}"><td>{escape(p["name"])}</td>'
                    f'<td>{escape(p["verdict"])}{" (inherited)" if p.get("inherited") else ""}'
                    f'{"<br>" + escape(p["error"]) if p.get("error") else ""}</td><td>{fmt(p["max_abs"])}</td>'
                    f'<td>{fmt(p["mean_abs"])}</td><td>{fmt(p["nrmse"])}</td><td>{fmt(p["cosine"], 6)}</td>'
                    f'<td>{fmt(p["contributed_max_abs"])}</td><td>{fmt(p["contributed_nrmse"])}</td>'
                    f'<td>{fmt(p["budget"]["nrmse"])}</td><td>{fp_cell}</td></tr>')
    plots = "".join(depth_plot(report["probes"], s) for s in ("vision", "text"))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>pgconv verify: '
            f'{"PASS" if report["passed"] else "FAIL"}</title><style>{_CSS}</style></head><body>'
            f'<h1>pgconv verify: {status}</h1><ul>{"".join(items)}</ul><h2>Error vs depth</h2>'
            f'<div class="plots">{plots}</div><h2>Probes</h2><table>{head}{"".join(body)}</table></body></html>\n')
