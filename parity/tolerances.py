"""The versioned tolerance table (`tolerances.json` next to this file) and `--tolerances FILE` overrides.

Budgets are per probe kind and dtype: `nrmse` (relative RMSE) and `nmax` (max abs error / max |ref|) that the error
a probe's step contributes must stay within (the end-to-end error is checked against them too and reported), and
`k`, the float64 arbitration multiplier (ours is "rounding noise" while its error against float64 is <= k x the
reference's + `floor`, by default a tenth of `nrmse`). Logit and generation budgets sit in their own sections.
Every number carries its reasoning and the noise it was calibrated on (`parity.calibrate`). An override file has the same shape and may give any subset; it is deep-merged over the built-in table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgconv.errors import InputError

__all__ = ["Tolerances", "load_tolerances", "DEFAULT_PATH", "DTYPES"]

DEFAULT_PATH = Path(__file__).with_name("tolerances.json")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Tolerances:
    table: dict[str, Any]
    source: str

    @property
    def version(self) -> str:
        return str(self.table.get("version", "?"))

    def probe(self, kind: str, dtype: str) -> dict[str, float]:
        """{"nrmse", "nmax", "k", "floor"} for a probe kind in a dtype."""
        try:
            entry = self.table["probes"][kind][dtype]
        except KeyError:
            raise InputError(f"{self.source}: no tolerance for probe kind {kind!r} in {dtype}") from None
        arb = self.table["arbitration"][dtype]
        nrmse = float(entry["nrmse"])
        # The floor lets a step whose reference is (nearly) exact still count as noise while ours is within budget/10.
        floor = entry.get("floor", arb["floor_fraction"] * nrmse)
        return {"nrmse": nrmse, "nmax": float(entry["nmax"]), "k": float(entry.get("k", arb["k"])),
                "floor": float(floor)}

    def section(self, name: str, dtype: str) -> dict[str, float]:
        try:
            entry = self.table[name][dtype]
        except KeyError:
            raise InputError(f"{self.source}: no {name!r} tolerances for {dtype}") from None
        return {k: v for k, v in entry.items() if not isinstance(v, (dict, str, list))}


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, f"{where}.{key}")
        elif key in base and isinstance(base[key], dict) != isinstance(value, dict):
            raise InputError(f"tolerance override {where}.{key}: expected {type(base[key]).__name__}")
        else:
            out[key] = value
    return out


def load_tolerances(path: str | Path | None = None) -> Tolerances:
    """The built-in table, deep-merged with the JSON override at `path` (if given)."""
    table = json.loads(DEFAULT_PATH.read_text(encoding="utf-8"))
    if path is None:
        return Tolerances(table, f"built-in {DEFAULT_PATH.name} v{table.get('version')}")
    p = Path(path)
    try:
        override = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p}: tolerance file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read tolerance file ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise InputError(f"{p}: JSON nested too deeply") from None
    if not isinstance(override, dict):
        raise InputError(f"{p}: expected a JSON object like {DEFAULT_PATH.name}")
    unknown = sorted(set(override) - set(table))
    if unknown:
        raise InputError(f"{p}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(table))}")
    merged = _merge(table, override, p.name)
    _check_numbers(merged, p)
    return Tolerances(merged, str(p))


def _check_numbers(table: dict, p: Path) -> None:
    for kind, per_dtype in table["probes"].items():
        for dtype, entry in per_dtype.items():
            if dtype not in DTYPES:
                continue
            for key in ("nrmse", "nmax"):
                value = entry.get(key)
                if not isinstance(value, (int, float)) or value < 0:
                    raise InputError(f"{p}: probes.{kind}.{dtype}.{key} must be a non-negative number, got {value!r}")
