"""`pgconv compare GOLDEN DUMP`: another implementation's dump against golden activations (exit 0 pass, 1 a probe
fails, 2 bad input); thin wrapper over `pgconv.parity.dump.compare`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pgconv.errors import printable

__all__ = ["compare"]


@click.command("compare")
@click.argument("golden_dir", type=click.Path(path_type=Path))
@click.argument("dump", type=click.Path(path_type=Path))
@click.option("--tolerances", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON overriding entries of the built-in tolerance table.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Write report.json, report.md, report.html and junit.xml here.")
def compare(golden_dir: Path, dump: Path, tolerances: Path | None, report_dir: Path | None) -> None:
    """Compare DUMP (a safetensors file of probe values named as in GOLDEN/probes.json) with GOLDEN (written by
    `pgconv golden`): per-probe error against the per-dtype budgets, first divergence, reports."""
    from pgconv.parity.dump import compare as run
    from pgconv.parity.report_compare import compare_terminal

    report = run(golden_dir, dump, tolerances=tolerances, report_dir=report_dir)
    click.echo(printable(compare_terminal(report)))
    if report_dir is not None:
        click.echo(f"reports written to {report_dir}/ (report.json, report.md, report.html, junit.xml)")
    if not report["passed"]:
        sys.exit(1)
