"""`pgconv compare GOLDEN DUMP`: another implementation's activations against a golden directory (`parity.golden`).

DUMP is a safetensors file holding any subset of the probes of one golden case, under the schema's names
(`probes.json`): `X` is the implementation's value end to end (its own forward on the case's inputs); `X@teacher`
optionally its step run on the golden value of X's `teacher_input` (teacher forcing: the error the step itself
contributes). Several cases in one file prefix the names with `case<k>/`. A dump must prove it ran on the golden
inputs: metadata `pgconv.inputs_sha256` equal to the case's, or the four inputs saved in it.

Per probe, with the budgets of `parity/tolerances.json` for the golden dtype (`--tolerances` overrides): a teacher-
forced value is judged on its own error (within budget: the end-to-end error, if larger, is inherited); without one
the end-to-end error is judged. Masks must be equal; logits also meet the KL / decisive top-1 budgets. The first
failing probe in execution order is the first divergence; probes the dump lacks are listed, not failed. Greedy
tokens (`generation.tokens`, int64) are compared when given. Exit codes as verify: 0 pass, 1 a probe fails, 2 bad
input (unknown name, wrong shape, other inputs, unreadable files).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgconv.errors import InputError

__all__ = ["compare", "compare_cases", "compare_tensors", "save_dump", "COMPARE_SCHEMA"]

COMPARE_SCHEMA = 1
TEACHER = "@teacher"


def _golden(golden_dir: Path) -> dict[str, Any]:
    from pgconv.converter.checkpoint import read_json
    from pgconv.parity.golden import GOLDEN_SCHEMA

    index = golden_dir / "probes.json"
    if not index.is_file():
        raise InputError(f"{golden_dir}: not a golden directory (no probes.json; write one with pgconv golden)")
    doc = read_json(index)
    if not isinstance(doc, dict) or doc.get("golden_schema") != GOLDEN_SCHEMA:
        raise InputError(f"{index}: not a golden schema {GOLDEN_SCHEMA} file")
    return doc


def _read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    from pgconv.converter.safetensors_io import read_safetensors

    if not path.is_file():
        raise InputError(f"{path}: not a file")
    metadata, tensors = read_safetensors(path)
    return metadata or {}, {name: t.load() for name, t in tensors.items()}


def _split(dump: dict[str, Tensor], metadata: dict[str, str], n_cases: int, path: Path) -> dict[int, dict[str, Tensor]]:
    """{case: {name: tensor}} from `case<k>/name` keys, or bare names for case `pgconv.case` (default 0)."""
    out: dict[int, dict[str, Tensor]] = {}
    for key, t in dump.items():
        case, name = 0, key
        if key.startswith("case") and "/" in key:
            head, name = key.split("/", 1)
            if not head[4:].isdigit():
                raise InputError(f"{path}: tensor {key!r}: a case prefix is case<k>/")
            case = int(head[4:])
        elif "pgconv.case" in metadata:
            if not metadata["pgconv.case"].isdigit():
                raise InputError(f"{path}: metadata pgconv.case={metadata['pgconv.case']!r} is not a case number")
            case = int(metadata["pgconv.case"])
        if case >= n_cases:
            raise InputError(f"{path}: tensor {key!r} is for case {case}, the golden directory has {n_cases}")
        out.setdefault(case, {})[name] = t
    return out


def _check_inputs(case: dict[str, Any], tensors: dict[str, Tensor], metadata: dict[str, str], path: Path,
                  several: bool) -> None:
    from pgconv.parity.golden import INPUT_NAMES, inputs_sha256

    k = case["case"]
    if all(n in tensors for n in INPUT_NAMES):
        got = inputs_sha256(tensors)
    else:
        got = metadata.get(f"pgconv.inputs_sha256.case{k}" if several else "pgconv.inputs_sha256")
        if got is None:
            raise InputError(f"{path}: no record of the inputs it ran on: add metadata pgconv.inputs_sha256 (case "
                             f"{k}: {case['inputs_sha256']}) or save the four inputs {', '.join(INPUT_NAMES)}")
    if got != case["inputs_sha256"]:
        raise InputError(f"{path}: made from other inputs than golden case {k} (inputs sha256 {got[:16]}..., golden "
                         f"{case['inputs_sha256'][:16]}...)")


def compare_tensors(schema: list[dict[str, Any]], golden: dict[str, Tensor], dump: dict[str, Tensor],
                    inputs: dict[str, Tensor], image_token_id: int, dtype: str, tol: Any,
                    path: str = "dump") -> dict[str, Any]:
    """Rows for the probes in `dump` (names and shapes checked against `schema`), missing probes, first failure."""
    from pgconv.parity.golden import INPUT_NAMES
    from pgconv.parity.metrics import decisive, logit_metrics, segment_masks, segment_metrics, within_budget

    by_name = {p["name"]: p for p in schema}
    names = {n for n in dump if n not in INPUT_NAMES and n != "generation.tokens"}
    for n in sorted(names):
        base = n.removesuffix(TEACHER)
        if base not in by_name:
            raise InputError(f"{path}: tensor {n!r} is not a probe of the golden schema (names: probes.json)")
        want = list(golden[base].shape)
        if list(dump[n].shape) != want:
            raise InputError(f"{path}: tensor {n!r} has shape {list(dump[n].shape)}; the golden {base!r} is {want}")
        if not dump[n].is_floating_point():
            raise InputError(f"{path}: tensor {n!r} is {str(dump[n].dtype).removeprefix('torch.')}, not floating")
    masks = segment_masks(inputs["input_ids"], inputs["token_type_ids"], image_token_id)
    rows = []
    for p in schema:
        if p["name"] not in names and p["name"] + TEACHER not in names:
            continue
        g = golden[p["name"]].double()
        budget = tol.probe(p["kind"], dtype)
        row: dict[str, Any] = {"name": p["name"], "kind": p["kind"], "stack": p["stack"], "layer": p["layer"],
                               "budget": budget, "error": None}
        e2e = dump.get(p["name"])
        tf = dump.get(p["name"] + TEACHER)
        stats = segment_metrics(e2e.double(), g, masks) if e2e is not None else None
        cstats = segment_metrics(tf.double(), g, masks) if tf is not None else None
        main = stats or cstats
        row.update({k: main["all"][k] for k in ("max_abs", "mean_abs", "nrmse", "nmax", "cosine")})
        row["segments"] = {k: v for k, v in main.items() if k != "all"}
        row["contributed_nrmse"] = cstats["all"]["nrmse"] if cstats else None
        row["contributed_max_abs"] = cstats["all"]["max_abs"] if cstats else None
        row["within_budget"] = within_budget(stats, budget) if stats else None
        row["contributed_within_budget"] = within_budget(cstats, budget) if cstats else None
        if p["kind"] == "mask":
            ok = all(bool(torch.equal(t.double(), g)) for t in (e2e, tf) if t is not None)
            if not ok:
                row["error"] = "the mask differs (1 = may attend)"
        elif cstats is not None:
            ok = row["contributed_within_budget"]
        else:
            ok = row["within_budget"]
        row["inherited"] = bool(cstats is not None and ok and stats is not None and not row["within_budget"])
        if p["name"] == "logits":
            lb = tol.section("logits", dtype)
            m = logit_metrics((tf if tf is not None else e2e).float()[0], g.float()[0])
            d = decisive(m, lb["near_tie_nats"])
            row["kl"] = {"kl_mean": m["kl_mean"], "kl_max": m["kl_max"], "top1_agreement": m["top1_agreement"],
                         **d}
            kl_ok = m["kl_mean"] <= lb["kl_mean"] and m["kl_max"] <= lb["kl_max"] and \
                d["decisive_top1_agreement"] >= lb["decisive_top1_min"]
            if not kl_ok:
                row["error"] = f"logits KL mean {m['kl_mean']:.3g} / max {m['kl_max']:.3g} over budget"
            ok = ok and kl_ok
        row["passed"] = bool(ok)
        row["verdict"] = "match" if ok else "differs"
        row["source"] = "teacher-forced" if tf is not None else "end to end"
        rows.append(row)
    # A sub-layer probe without a teacher-forced value of its own (e.g. a pre-MLP norm, whose input is no probe)
    # takes its block's teacher-forced verdict: end to end it carries every upstream error, which over a deep model
    # exceeds one step's budget without any bug.
    by_row = {r["name"]: r for r in rows}
    for r in rows:
        block = by_row.get(r["name"].rsplit(".", 1)[0]) if r["layer"] is not None and not r["stack"] else None
        if (r["source"] == "end to end" and not r["passed"] and r["kind"] != "mask" and block is not None
                and block["source"] == "teacher-forced" and block["passed"]):
            r.update(passed=True, verdict="match", inherited=True, source="its block, teacher-forced")
    first = next((r for r in rows if not r["passed"]), None)
    present = {r["name"] for r in rows}
    return {"probes": rows, "missing": [p["name"] for p in schema if p["name"] not in present],
            "first_divergence": None if first is None else
            {k: first[k] for k in ("name", "kind", "stack", "layer", "nrmse", "max_abs", "contributed_nrmse",
                                   "error")}}


def compare(
    golden_dir: str | Path,
    dump_path: str | Path,
    *,
    tolerances: str | Path | None = None,
    report_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Compare DUMP with GOLDEN (module docstring); returns the report (what report.json holds)."""
    t0 = time.perf_counter()
    gdir, dpath = Path(golden_dir), Path(dump_path)
    _precheck(report_dir)
    doc = _golden(gdir)
    metadata, dump = _read(dpath)
    per_case = _split(dump, metadata, len(doc["cases"]), dpath)
    if not per_case:
        raise InputError(f"{dpath}: holds no tensors")
    for k, tensors in per_case.items():
        _check_inputs(doc["cases"][k], tensors, metadata, dpath,
                      len(per_case) > 1 or "pgconv.inputs_sha256" not in metadata)
    return _assemble(gdir, doc, per_case, str(dpath), tolerances, report_dir, t0)


def compare_cases(gdir: Path, doc: dict[str, Any], candidate: Any, *, max_new_tokens: int,
                  tolerances: str | Path | None = None, report_dir: str | Path | None = None) -> dict[str, Any]:
    """A candidate (`parity.candidates` protocol) run on every golden case and compared like a dump: its `run` on
    the case's inputs, its optional `teacher` on each probe's golden teacher input, its optional `generate`."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    _precheck(report_dir)
    names = [p["name"] for p in doc["probes"]]
    teacher_of = {p["name"]: p["teacher_input"] for p in doc["probes"] if p["teacher_input"]}
    per_case = {}
    for case in doc["cases"]:
        cdir = gdir / case["dir"]
        inputs = load_file(str(cdir / "inputs.safetensors"))
        out = dict(candidate.run(inputs, names))
        if callable(getattr(candidate, "teacher", None)):
            golden = load_file(str(cdir / "activations.safetensors"))
            for name, source in teacher_of.items():
                y = candidate.teacher(name, golden[source], inputs)
                if y is not None:
                    out[name + TEACHER] = y
        if callable(getattr(candidate, "generate", None)):
            out["generation.tokens"] = torch.tensor(candidate.generate(inputs, max_new_tokens), dtype=torch.long)
        per_case[case["case"]] = out
    notes = [str(n) for n in getattr(candidate, "notes", None) or []]  # what an adapter found about its side
    return _assemble(gdir, doc, per_case, f"candidate {getattr(candidate, 'name', type(candidate).__name__)}",
                     tolerances, report_dir, t0, notes)


def _precheck(report_dir: str | Path | None) -> None:
    from pgconv.parity.verify import _check_report_dir

    if report_dir is not None:
        _check_report_dir(Path(report_dir))


def _assemble(gdir: Path, doc: dict[str, Any], per_case: dict[int, dict[str, Tensor]], label: str,
              tolerances: str | Path | None, report_dir: str | Path | None, t0: float,
              notes: list[str] = ()) -> dict[str, Any]:
    from safetensors.torch import load_file

    from pgconv.parity.tolerances import load_tolerances

    tol = load_tolerances(tolerances)
    cases = []
    for k, tensors in sorted(per_case.items()):
        case = doc["cases"][k]
        cdir = gdir / case["dir"]
        golden = load_file(str(cdir / "activations.safetensors"))
        inputs = load_file(str(cdir / "inputs.safetensors"))
        result = compare_tensors(doc["probes"], golden, tensors, inputs, doc["image_token_id"], doc["dtype"], tol,
                                 label)
        gen = None
        if "generation.tokens" in tensors:
            ours = [int(t) for t in tensors["generation.tokens"].reshape(-1).tolist()]
            theirs = case["generation"]["tokens"]
            step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                        None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
            gen = {"reference_tokens": theirs, "candidate_tokens": ours, "first_divergence": step,
                   "passed": step is None}
        cases.append({"case": k, "prompt": case["prompt"], "images": case["images"], **result, "generation": gen})
    failures = []
    for c in cases:
        where = f"case {c['case']}: " if len(cases) > 1 else ""
        failures += [f"{where}probe {r['name']}: {r['verdict']}" + (f" ({r['error']})" if r["error"] else "")
                     for r in c["probes"] if not r["passed"]]
        if c["generation"] is not None and not c["generation"]["passed"]:
            failures.append(f"{where}generation: greedy tokens diverge at step {c['generation']['first_divergence']}")
    first = next(({**c["first_divergence"], "case": c["case"]} for c in cases if c["first_divergence"]), None)
    report = {
        "tool": "pgconv compare", "schema_version": COMPARE_SCHEMA, "passed": not failures, "failures": failures,
        "golden": str(gdir), "dump": label, "checkpoint": doc["checkpoint"], "family": doc["family"],
        "dtype": doc["dtype"], "tolerances": {"source": tol.source, "version": tol.version},
        "first_divergence": first, "probes": [r for c in cases for r in c["probes"]],
        "missing": sorted({m for c in cases for m in c["missing"]}), "cases": cases, "notes": list(notes),
        "timing": {"total": round(time.perf_counter() - t0, 4)},
    }
    from pgconv.parity.report import finalise
    from pgconv.parity.report_compare import write_compare_reports

    report = finalise(report)
    if report_dir is not None:
        write_compare_reports(report, Path(report_dir))
    return report


def save_dump(path: str | Path, probes: dict[str, Tensor], inputs_sha256: str | Sequence[str]) -> None:
    """Write a dump as `pgconv compare` reads it (for Python adapters): `probes` by schema name (case-prefixed for
    several cases), with the inputs' hash as metadata."""
    from safetensors.torch import save_file

    meta = ({"pgconv.inputs_sha256": inputs_sha256} if isinstance(inputs_sha256, str) else
            {f"pgconv.inputs_sha256.case{k}": h for k, h in enumerate(inputs_sha256)})
    # clone: two probes may be one tensor (our projector output is the merged features), which save_file refuses.
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in probes.items()}, str(path), metadata=meta)
