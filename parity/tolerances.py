"""The versioned tolerance table (`tolerances.json` next to this file) and `--tolerances FILE` overrides.

Budgets are per probe kind and dtype: `nrmse` (relative RMSE) and `nmax` (max abs error / max |ref|) that the error
a probe's step contributes must stay within (the end-to-end error is checked against them too and reported), and
`k`, the float64 arbitration multiplier (ours is "rounding noise" while its error against float64 is <= k x the
reference's + `floor`, by default a tenth of `nrmse`). Logit and generation budgets sit in their own sections.
Every number carries its reasoning and the noise it was calibrated on (`parity.calibrate`). An override file has the same shape and may give any subset; it is deep-merged over the built-in table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgconv.converter.checkpoint import read_json
from pgconv.errors import InputError, json_type

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


def _merge(base: dict, over: dict, p: Path, where: str = "") -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, p, f"{where}{key}.")
        elif key in base and isinstance(base[key], dict) != isinstance(value, dict):
            raise InputError(f"{p}: {where}{key} must be {json_type(base[key])}, got {json_type(value)}")
        else:
            out[key] = value
    return out


def load_tolerances(path: str | Path | None = None) -> Tolerances:
    """The built-in table, deep-merged with the JSON override at `path` (if given)."""
    table = json.loads(DEFAULT_PATH.read_text(encoding="utf-8"))
    if path is None:
        return Tolerances(table, f"built-in {DEFAULT_PATH.name} v{table.get('version')}")
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise InputError(f"{p}: tolerance file not found")
    # read_json: refuses a FIFO or device (reading would block forever), duplicate keys, bad UTF-8/JSON.
    override = read_json(p)
    if not isinstance(override, dict):
        raise InputError(f"{p}: expected a JSON object like {DEFAULT_PATH.name}")
    unknown = sorted(set(override) - set(table))
    if unknown:
        raise InputError(f"{p}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(table))}")
    merged = _merge(table, override, p)
    _check_numbers(merged, p)
    return Tolerances(merged, str(p))


# Budget keys per section ("probes" entries may leave k and floor to the arbitration section). JSON has NaN and
# Infinity literals and Python's json reads them: a NaN budget passes every comparison, so nothing could fail.
_BUDGETS = {"probes": (("nrmse", "nmax"), ("k", "floor")), "arbitration": (("k", "floor_fraction"), ()),
            "logits": (("kl_mean", "kl_max", "decisive_top1_min", "near_tie_nats"), ()),
            "generation": (("near_tie_nats", "teacher_forced_kl_max", "cache_kl_max"), ())}


def _check_numbers(table: dict, p: Path) -> None:
    """Every budget a finite non-negative number (decisive_top1_min a fraction), every dtype entry an object."""
    for section, (required, optional) in _BUDGETS.items():
        groups = table.get(section)
        if not isinstance(groups, dict):
            raise InputError(f"{p}: {section} must be an object, got {json_type(groups)}")
        entries = {f"{section}.{k}.{d}": e for k, per in groups.items() if isinstance(per, dict)
                   for d, e in per.items() if d in DTYPES} if section == "probes" else \
                  {f"{section}.{d}": e for d, e in groups.items() if d in DTYPES}
        for where, entry in entries.items():
            if not isinstance(entry, dict):
                raise InputError(f"{p}: {where} must be an object of budgets, got {json_type(entry)}")
            for key in required + tuple(k for k in optional if k in entry):
                value = entry.get(key)
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                    and value >= 0 and (key != "decisive_top1_min" or value <= 1)
                if not ok:
                    what = "a fraction from 0 to 1" if key == "decisive_top1_min" else "a finite non-negative number"
                    raise InputError(f"{p}: {where}.{key} must be {what}, got {json.dumps(value)[:60]}")
