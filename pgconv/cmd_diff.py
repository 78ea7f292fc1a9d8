"""`pgconv diff A B`: is checkpoint B the same model as A? Weights tensor by tensor (with a diagnosis of every
difference), then behaviour through one implementation (exit 0 identical or equivalent within rounding, 1 differs,
2 bad input); thin wrapper over `pgconv.parity.diff.diff`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pgconv.errors import printable

__all__ = ["diff"]


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Input image (repeatable; paired with --prompt as in pgconv verify). Default: the built-in one.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable). Default: 'caption en'.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="Dtype both models run in.")
@click.option("--impl", default="transformers", show_default=True, type=click.Choice(["transformers", "pgconv"]),
              help="The implementation both checkpoints run through (transformers: eager attention).")
@click.option("--weights-only", is_flag=True, help="Compare the weights only (no model is run).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=10, show_default=True,
              help="Greedy tokens compared per case.")
@click.option("--tolerances", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON overriding entries of the built-in tolerance table (verify's budgets).")
@click.option("--from-a", "from_a", metavar="SPEC",
              help="Read A through a spec (name or .toml/.json file), as convert --from.")
@click.option("--from-b", "from_b", metavar="SPEC",
              help="Read B through a spec (name or .toml/.json file), as convert --from.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Write report.json, report.md, report.html and junit.xml here.")
def diff(a: str, b: str, images: tuple[Path, ...], prompts: tuple[str, ...], dtype: str, impl: str,
         weights_only: bool, device: str, max_new_tokens: int, tolerances: Path | None,
         from_a: str | None, from_b: str | None, report_dir: Path | None) -> None:
    """Is checkpoint B the same model as A? A and B: any layout pgconv reads (HF layouts, native, big_vision .npz,
    a spec'd format, a hub id), in any dtypes. Every differing tensor is diagnosed (transposed, heads permuted,
    k and v swapped, norm offset, vocab shift, lossy cast, ...), then both run on the same inputs: per-probe
    divergence, logits KL (mean, p99, max), top-1 and greedy-token agreement."""
    from pgconv.parity.diff import diff as run
    from pgconv.parity.report_diff import diff_terminal

    report = run(a, b, images=images, prompts=prompts, dtype=dtype, impl=impl, weights_only=weights_only,
                 device=device, max_new_tokens=max_new_tokens, tolerances=tolerances, report_dir=report_dir,
                 from_a=from_a, from_b=from_b)
    click.echo(printable(diff_terminal(report)))
    if report_dir is not None:
        click.echo(f"reports written to {report_dir}/ (report.json, report.md, report.html, junit.xml)")
    if not report["passed"]:
        sys.exit(1)
