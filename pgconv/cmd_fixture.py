"""`pgconv fixture DIR [--preset tiny] [--seed N] [--dtype D] [--force]`: thin wrapper over `make_fixture`.

An unknown preset is an `InputError` (one line naming the valid presets, exit 2), not a click usage error.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

__all__ = ["fixture"]


@click.command("fixture")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--preset", default="tiny", show_default=True, help="Config preset (tiny, tiny-pg2, paligemma-3b-pt-224, ...).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Weight dtype (default: float32 for tiny presets, bfloat16 for full-size ones).")
@click.option("--force", is_flag=True, help="Replace DIRECTORY if it is not empty.")
def fixture(directory: Path, preset: str, seed: int, dtype: str | None, force: bool) -> None:
    """Write a random-weight transformers PaliGemma checkpoint (with tokenizer) into DIRECTORY, offline."""
    from pgconv.converter.fixture import make_fixture, plan_fixture

    start = time.perf_counter()
    plan = plan_fixture(preset, dtype)
    out = make_fixture(directory, preset, seed=seed, dtype=dtype, force=force)
    files = sum(1 for _ in out.iterdir())
    click.echo(f"{out}: preset {preset}, seed {seed}, {plan.dtype}, {plan.total_parameters:,} parameters in "
               f"{len(plan.shards)} shard(s), {plan.total_size / 1e9:.3g} GB of weights, {files} files "
               f"({time.perf_counter() - start:.1f} s)")
