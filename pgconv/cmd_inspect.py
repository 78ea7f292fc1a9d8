"""`pgconv inspect PATH [--json] [--scan]`: thin wrapper over `pgconv.converter.inspect.inspect`.

Exit 0 when no problem is found, 1 when the report lists problems, 2 when the input cannot be read.
"""

from __future__ import annotations

import json
import sys

import click

from pgconv.errors import printable

__all__ = ["inspect"]


@click.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--scan", is_flag=True, help="Also read every value and count NaN/Inf.")
@click.option("--from", "from_", metavar="SPEC", help="Read PATH through a spec (built-in name or .toml/.json file); "
              "a .npz is read as big-vision.")
@click.option("--config", metavar="PRESET|FILE", help="Config (preset name or config.json) for a source without "
              "config.json: a spec-read source (default: the preset its shapes match) or a checkpoint that lacks one "
              "(default: none, reported as a problem).")
def inspect(path: str, as_json: bool, scan: bool, from_: str | None, config: str | None) -> None:
    """Describe the checkpoint PATH (directory, weight file, .npz or hub id); exit 1 if it has problems."""
    from pgconv.converter.inspect import inspect as run

    report = run(path, scan=scan, from_=from_, config=config)
    # Names come from the file: JSON escapes control characters itself, the text report through `printable`.
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else printable(str(report)))
    if report.problems:
        sys.exit(1)
