"""`pgconv convert SRC DST --to LAYOUT`: thin wrapper over `pgconv.converter.convert.convert`."""

from __future__ import annotations

from pathlib import Path

import click

from pgconv.converter.layouts import LAYOUTS
from pgconv.errors import printable

__all__ = ["convert"]


@click.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, metavar="LAYOUT|SPEC",
              help=f"Target: a key layout ({', '.join(LAYOUTS)}), big-vision (.npz), or a spec file (.toml/.json).")
@click.option("--from", "from_", default=None, metavar="SPEC",
              help="Read SRC through a spec (name or .toml/.json file); a .npz SRC is read as big-vision.")
@click.option("--config", default=None, metavar="PRESET|CONFIG.JSON",
              help="Config for a source without config.json (a checkpoint that lacks one, --from, .npz); default: "
                   "the preset its tensor shapes match exactly.")
@click.option("--allow-vocab-cut", is_flag=True,
              help="Let a vocabulary cut (e.g. 257216 -> 257152 rows for big-vision) drop rows that are not zero.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast floating-point tensors (default: keep the source dtype).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest shard, decimal units (5GB = 5e9 bytes).")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--check", is_flag=True, help="Re-read DST: verify hashes and (same dtype) the round trip to SRC.")
@click.option("--untie", is_flag=True, help="Keep a separate lm_head (config rewritten tie_word_embeddings=false).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(src: str, dst: Path, to: str, from_: str | None, config: str | None, allow_vocab_cut: bool,
            dtype: str | None, shard_size: str, force: bool, check: bool, untie: bool, quiet: bool) -> None:
    """Convert the PaliGemma checkpoint SRC (directory, weight file, .npz or hub id) into DST."""
    from pgconv.converter.convert import convert as run

    summary = run(src, dst, to=to, dtype=dtype, shard_size=shard_size, force=force, check=check, untie=untie,
                  quiet=quiet, from_=from_, config=config, allow_vocab_cut=allow_vocab_cut)
    click.echo(printable(str(summary)))  # tensor and file names come from the source: no raw control characters
