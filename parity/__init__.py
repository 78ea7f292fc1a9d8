"""pgconv.parity: layer-by-layer parity harness against transformers (`pgconv verify`).

Modules: `probes` (the pairing table, data), `capture` (forward hooks / pre-hooks), `metrics`, `replay` (teacher
forcing), `oracle` (float64 arbitration), `compare` (one probe's verdict), `generation`, `case` (one image + prompt),
`models` (reference loading, shared-storage candidate, weight parity), `tolerances` (+ tolerances.json),
`calibrate` (the noise the tolerances are calibrated on), `report` / `report_html` (writers), `verify` (the API).
"""

from __future__ import annotations

from typing import Any

__all__ = ["verify"]


def __getattr__(name: str) -> Any:  # lazy: `import pgconv.parity` must not import torch or transformers
    if name == "verify":
        from pgconv.parity.verify import verify

        return verify
    raise AttributeError(f"module 'pgconv.parity' has no attribute {name!r}")
