"""`pgconv convert SRC DST --to LAYOUT`: thin wrapper over `pgconv.converter.convert.convert`."""

from __future__ import annotations

from pathlib import Path

import click

from pgconv.converter.layouts import LAYOUTS

__all__ = ["convert"]


@click.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, type=click.Choice(list(LAYOUTS)), help="Target key layout.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast floating-point tensors (default: keep the source dtype).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest shard, decimal units (5GB = 5e9 bytes).")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--check", is_flag=True, help="Re-read DST: verify hashes and (same dtype) the round trip to SRC.")
@click.option("--untie", is_flag=True, help="Keep a separate lm_head (config rewritten tie_word_embeddings=false).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(src: str, dst: Path, to: str, dtype: str | None, shard_size: str, force: bool, check: bool,
            untie: bool, quiet: bool) -> None:
    """Convert the PaliGemma checkpoint SRC (directory, weight file or hub id) into DST."""
    from pgconv.converter.convert import convert as run

    summary = run(src, dst, to=to, dtype=dtype, shard_size=shard_size, force=force, check=check, untie=untie,
                  quiet=quiet)
    click.echo(str(summary))
