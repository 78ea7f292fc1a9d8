"""Click options shared by several commands."""

from __future__ import annotations

import click

from pgconv.errors import InputError

__all__ = ["max_memory_option"]


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from pgconv.model.budget import parse_size

    if value is not None:
        try:  # a usage error before anything loads, like any other bad option value
            parse_size(value)
        except InputError as e:
            raise click.BadParameter(str(e).removeprefix("--max-memory: "), ctx, param) from None
    return value


def max_memory_option(what: str):
    """`--max-memory SIZE` (kept as the string; `pgconv.model.budget.parse_size` reads it)."""
    return click.option(
        "--max-memory", "max_memory", default=None, metavar="SIZE", callback=_size,
        help=f"Memory budget for the weights, e.g. 8GB, 512MiB, 24G (GB = 10^9 bytes, GiB = 2^30, as accelerate). "
             f"Default: what the machine can spare now (MemAvailable minus 10%, at least 1 GiB). A model that fits "
             f"runs as before; one that does not {what} (README: Big checkpoints).")
