"""Shard planning like huggingface_hub's `save_pretrained`: decimal size units, greedy in plan order, file names."""

from __future__ import annotations

import re

from pgconv.converter.sources import TensorMeta
from pgconv.errors import InputError

__all__ = ["parse_size", "shard_targets", "shard_file_names"]

_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}  # decimal, like huggingface_hub


def parse_size(size: str | int) -> int:
    """"5GB" -> 5_000_000_000 (decimal units, as huggingface_hub's max_shard_size); a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", str(size).upper())
    value = int(float(m.group(1)) * _UNITS[m.group(2) or "B"]) if m else 0
    if value <= 0:
        raise InputError(f"invalid shard size {size!r}; use e.g. 5GB, 500MB or a positive byte count")
    return value


def shard_targets(metas: list[TensorMeta], max_bytes: int) -> list[list[TensorMeta]]:
    """Greedy in plan order like huggingface_hub: a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    size = 0
    for m in metas:
        if m.nbytes > max_bytes:
            if current:
                shards.append(current)
            shards.append([m])
            current, size = [], 0
            continue
        if current and size + m.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(m)
        size += m.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
