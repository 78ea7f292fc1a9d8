"""pgconv.parity: layer-by-layer parity harness against transformers (`pgconv verify`).

Modules: `probes` (the pairing table, data), `capture` (forward hooks / pre-hooks), `metrics`, `replay` (teacher
forcing), `oracle` (float64 arbitration), `compare` (one probe's verdict), `generation`, `case` (one image + prompt),
`models` (reference loading, shared-storage candidate, weight parity), `tolerances` (+ tolerances.json),
`calibrate` (the noise the tolerances are calibrated on), `report` / `report_html` (writers), `verify` (the API).
"""

# The API is `pgconv.verify` (= `pgconv.parity.verify.verify`); this package exports no names itself, so that
# `pgconv.parity.verify` always means the module and importing the package stays free of torch/transformers.
__all__: list[str] = []
