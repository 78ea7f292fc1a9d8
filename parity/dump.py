"""`pgconv compare GOLDEN DUMP`: another implementation's activations against a golden directory (`parity.golden`).

DUMP is a safetensors file holding any subset of the probes of one golden case, under the schema's names
(`probes.json`): `X` is the implementation's value end to end (its own forward on the case's inputs); `X@teacher`
optionally its step run on the golden value of X's `teacher_input` (teacher forcing: the error the step itself
contributes; only for probes that have a teacher_input). Several cases in one file prefix the names with `case<k>/`.
A dump must prove it ran on the golden inputs: metadata `pgconv.inputs_sha256` equal to the case's, or all four
inputs saved in it (some of them only is refused). Each case in the dump must hold at least one probe value or
`generation.tokens`: a dump that compares nothing is an input error, never a pass.

Per probe, with the budgets of `parity/tolerances.json` for the golden dtype (`--tolerances` overrides): a teacher-
forced value is judged on its own error (within budget: the end-to-end error, if larger, is inherited); without one
the end-to-end error is judged. A probe whose schema teacher_input is null (a pre-MLP norm: its input is no probe)
that fails end to end takes its block's teacher-forced verdict; one that has a teacher_input fails, and its error
asks for `X@teacher`. Masks must be equal; logits also meet the KL / decisive top-1 budgets. The first failing probe
in execution order is the first divergence; probes the dump lacks are listed, not failed. Greedy tokens
(`generation.tokens`, integers) are compared when given. Exit codes as verify: 0 pass, 1 a probe fails, 2 bad input
(unknown name, wrong shape, other inputs, a damaged golden directory, unreadable files, an adapter that raises).

Memory: both files are read lazily (headers first, one probe's golden and dump values alive at a time) and the
logits row is computed a chunk of positions at a time, so no full-vocabulary float64 copy exists; a candidate's
cases are run and compared one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgconv.errors import InputError
from pgconv.parity.golden_dir import LazyTensors, case_files, header, read_golden, tensor_info

__all__ = ["compare", "compare_tensors", "check_dump", "save_dump", "COMPARE_SCHEMA"]

COMPARE_SCHEMA = 1
TEACHER = "@teacher"
LOGIT_ROWS = 144  # positions per chunk of the logits row (parity.logits.ROWS: 148 MB per fp32 chunk at 3B)
def _split(dump: dict[str, Any], metadata: dict[str, str], n_cases: int, path: Path) -> dict[int, dict[str, Any]]:
    """{case: {name: tensor}} from `case<k>/name` keys, or bare names for case `pgconv.case` (default 0)."""
    out: dict[int, dict[str, Any]] = {}
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


def _check_inputs(case: dict[str, Any], tensors: Mapping, metadata: dict[str, str], path: Path,
                  several: bool) -> None:
    from pgconv.parity.golden import INPUT_NAMES, inputs_sha256

    k = case["case"]
    held = [n for n in INPUT_NAMES if n in tensors]
    if held and len(held) < len(INPUT_NAMES):  # the others would be ignored: say so rather than judge half a proof
        raise InputError(f"{path}: holds {', '.join(held)} but not {', '.join(n for n in INPUT_NAMES if n not in held)}"
                         f"{f' (case {k})' if several else ''}: save all four inputs or none")
    if held:
        got = inputs_sha256({n: tensors[n] for n in INPUT_NAMES})
    else:
        got = metadata.get(f"pgconv.inputs_sha256.case{k}" if several else "pgconv.inputs_sha256")
        if got is None:
            raise InputError(f"{path}: no record of the inputs it ran on: add metadata pgconv.inputs_sha256 (case "
                             f"{k}: {case['inputs_sha256']}) or save the four inputs {', '.join(INPUT_NAMES)}")
    if got != case["inputs_sha256"]:
        raise InputError(f"{path}: made from other inputs than golden case {k} (inputs sha256 {got[:16]}..., golden "
                         f"{case['inputs_sha256'][:16]}...)")


def _values(dump: Mapping) -> list[str]:
    from pgconv.parity.golden import INPUT_NAMES

    return sorted(n for n in dump if n not in INPUT_NAMES and n != "generation.tokens")


def check_dump(schema: list[dict[str, Any]], golden: Mapping, dump: Mapping, path: str = "dump") -> list[str]:
    """The dump's probe value names (`X`, `X@teacher`), each checked against the schema and the golden shapes."""
    by_name = {p["name"]: p for p in schema}
    names = _values(dump)
    for n in names:
        base = n.removesuffix(TEACHER)
        if base not in by_name:
            raise InputError(f"{path}: tensor {n!r} is not a probe of the golden schema (names: probes.json)")
        if n != base and by_name[base]["teacher_input"] is None:
            raise InputError(f"{path}: tensor {n!r}: {base} has no teacher_input in probes.json (nothing to force)")
        (shape, dt), (want, _) = tensor_info(dump, n), tensor_info(golden, base)
        if shape != want:
            raise InputError(f"{path}: tensor {n!r} has shape {shape}; the golden {base!r} is {want}")
        if not dt.is_floating_point:
            raise InputError(f"{path}: tensor {n!r} is {str(dt).removeprefix('torch.')}, not floating")
    return names


def _logit_stats(g: Tensor, e2e: Tensor | None, tf: Tensor | None, masks: dict[str, Tensor] | None) -> tuple:
    """(end-to-end stats, teacher-forced stats, per-position logit metrics) of the logits row, LOGIT_ROWS positions
    at a time (parity.logits' pass): the float64 temporaries are one chunk's, never the full vocabulary's."""
    from pgconv.parity.metrics import join_stats, logit_positions, position_stats, segment_summary

    if g.ndim != 3 or g.shape[0] != 1:  # position chunks over dim 1 join in row order only for one sequence
        step = max(1, g.shape[1] if g.ndim > 1 else 1)
    else:
        step = LOGIT_ROWS
    if masks is not None and any(m.shape != g.shape[:2] for m in masks.values()):
        masks = None
    rows = max(1, (1 << 20) // max(1, g.shape[-1]))  # metrics' float64 chunk: 4 positions of a 257216 vocabulary
    parts: dict[str, list] = {"e2e": [], "tf": []}
    per: dict[str, list] = {}
    judged = tf if tf is not None else e2e
    for s in range(0, g.shape[1], step):
        ref = g[:, s:s + step]
        for key, x in (("e2e", e2e), ("tf", tf)):
            # One float64 chunk of positions per call: with 144 positions a call, glibc's heap kept ~0.5 GB of freed
            # chunks at 3B-224 size (peak RSS 1.7 GB for 0.55 GB of live logits); per chunk, 0.85-1.4 GB measured.
            for a in range(s, min(s + step, g.shape[1]), rows) if x is not None else ():
                parts[key].append(position_stats(x[:, a:min(a + rows, s + step)], g[:, a:min(a + rows, s + step)]))
        for k, v in logit_positions(judged[:, s:s + step], ref).items():
            per.setdefault(k, []).extend(v)
    width = g.shape[-1]
    stats = segment_summary(join_stats(parts["e2e"]), width, masks) if parts["e2e"] else None
    cstats = segment_summary(join_stats(parts["tf"]), width, masks) if parts["tf"] else None
    return stats, cstats, per


def _row(p: dict[str, Any], golden: Mapping, dump: Mapping, names: set[str], masks: dict[str, Tensor], dtype: str,
         tol: Any) -> dict[str, Any]:
    from pgconv.parity.metrics import decisive, segment_metrics, summarise, within_budget

    g = golden[p["name"]]
    e2e = dump[p["name"]] if p["name"] in names else None
    tf = dump[p["name"] + TEACHER] if p["name"] + TEACHER in names else None
    budget = tol.probe(p["kind"], dtype)
    row: dict[str, Any] = {"name": p["name"], "kind": p["kind"], "stack": p["stack"], "layer": p["layer"],
                           "budget": budget, "error": None}
    if p["name"] == "logits":
        stats, cstats, per = _logit_stats(g, e2e, tf, masks)
    else:
        stats = segment_metrics(e2e, g, masks) if e2e is not None else None
        cstats = segment_metrics(tf, g, masks) if tf is not None else None
    main = stats or cstats
    row.update({k: main["all"][k] for k in ("max_abs", "mean_abs", "nrmse", "nmax", "cosine")})
    row["segments"] = {k: v for k, v in main.items() if k != "all"}
    row["contributed_nrmse"] = cstats["all"]["nrmse"] if cstats else None
    row["contributed_max_abs"] = cstats["all"]["max_abs"] if cstats else None
    row["within_budget"] = within_budget(stats, budget) if stats else None
    row["contributed_within_budget"] = within_budget(cstats, budget) if cstats else None
    if p["kind"] == "mask":
        ok = all(bool(torch.equal(t, g)) for t in (e2e, tf) if t is not None)
        if not ok:
            row["error"] = "the mask differs (1 = may attend)"
    elif cstats is not None:
        ok = row["contributed_within_budget"]
    else:
        ok = row["within_budget"]
    row["inherited"] = bool(cstats is not None and ok and stats is not None and not row["within_budget"])
    if p["name"] == "logits":
        lb = tol.section("logits", dtype)
        m = {**summarise(per), **per}
        d = decisive(m, lb["near_tie_nats"])
        row["kl"] = {"kl_mean": m["kl_mean"], "kl_max": m["kl_max"], "top1_agreement": m["top1_agreement"], **d}
        kl_ok = m["kl_mean"] <= lb["kl_mean"] and m["kl_max"] <= lb["kl_max"] and \
            d["decisive_top1_agreement"] >= lb["decisive_top1_min"]
        if not kl_ok:
            row["error"] = f"logits KL mean {m['kl_mean']:.3g} / max {m['kl_max']:.3g} over budget"
        ok = ok and kl_ok
    row["passed"] = bool(ok)
    row["verdict"] = "match" if ok else "differs"
    row["source"] = "teacher-forced" if tf is not None else "end to end"
    return row


def compare_tensors(schema: list[dict[str, Any]], golden: Mapping, dump: Mapping, inputs: dict[str, Tensor],
                    image_token_id: int, dtype: str, tol: Any, path: str = "dump") -> dict[str, Any]:
    """Rows for the probes in `dump` (names and shapes checked against `schema`), missing probes, first failure.
    `golden` and `dump` may be lazy mappings: each row reads its own tensors and drops them."""
    from pgconv.parity.metrics import segment_masks

    names = set(check_dump(schema, golden, dump, path))
    masks = segment_masks(inputs["input_ids"], inputs["token_type_ids"], image_token_id)
    rows = [_row(p, golden, dump, names, masks, dtype, tol) for p in schema
            if p["name"] in names or p["name"] + TEACHER in names]
    # A sub-layer probe with no teacher_input (a pre-MLP norm: its input is no probe, so it can have no @teacher
    # value) takes its block's teacher-forced verdict: end to end it carries every upstream error, which over a deep
    # model exceeds one step's budget without any bug. A probe that has a teacher_input is judged end to end: its
    # own input may be exact, so its error need not be inherited (only its @teacher value can tell).
    by_row = {r["name"]: r for r in rows}
    teacher_of = {p["name"]: p["teacher_input"] for p in schema}
    for r in rows:
        if r["source"] != "end to end" or r["passed"] or r["kind"] == "mask":
            continue
        if teacher_of[r["name"]] is not None:
            hint = f"provide {r['name']}{TEACHER} to separate inherited error"
            r["error"] = f"{r['error']}; {hint}" if r["error"] else hint
            continue
        block = by_row.get(r["name"].rsplit(".", 1)[0]) if r["layer"] is not None and not r["stack"] else None
        if block is not None and block["source"] == "teacher-forced" and block["passed"]:
            r.update(passed=True, verdict="match", inherited=True, source="its block, teacher-forced")
    first = next((r for r in rows if not r["passed"]), None)
    present = {r["name"] for r in rows}
    return {"probes": rows, "missing": [p["name"] for p in schema if p["name"] not in present],
            "first_divergence": None if first is None else
            {k: first[k] for k in ("name", "kind", "stack", "layer", "nrmse", "max_abs", "contributed_nrmse",
                                   "error")}}


def _tol(tolerances: Any) -> Any:
    from pgconv.parity.tolerances import Tolerances, load_tolerances

    return tolerances if isinstance(tolerances, Tolerances) else load_tolerances(tolerances)


def _check_kinds(gdir: Path, doc: dict[str, Any], tol: Any) -> None:
    """Every probe kind of probes.json has a budget: an unknown kind is the golden file's fault, named as such."""
    for p in doc["probes"]:
        try:
            tol.probe(p["kind"], doc["dtype"])
        except InputError:
            raise InputError(f"{gdir / 'probes.json'}: probe {p['name']!r}: kind {p['kind']!r} has no budget in "
                             f"{tol.source} ({doc['dtype']})") from None


def compare(
    golden_dir: str | Path,
    dump_path: str | Path,
    *,
    tolerances: Any = None,
    report_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Compare DUMP with GOLDEN (module docstring); returns the report (what report.json holds). `tolerances`: a
    JSON override's path or a loaded `Tolerances`."""
    t0 = time.perf_counter()
    gdir, dpath = Path(golden_dir), Path(dump_path)
    tol = _tol(tolerances)
    _precheck(report_dir)
    doc = read_golden(gdir)
    _check_kinds(gdir, doc, tol)
    metadata, tensors = header(dpath)
    per_case = _split(tensors, metadata, len(doc["cases"]), dpath)
    if not per_case:
        raise InputError(f"{dpath}: holds no tensors")
    several = len(per_case) > 1 or "pgconv.inputs_sha256" not in metadata
    checked = {}
    for k, held in sorted(per_case.items()):  # every case checked before any is compared
        dump = LazyTensors(held)
        _check_inputs(doc["cases"][k], dump, metadata, dpath, several)
        inputs, golden = case_files(gdir, doc, k)  # headers only: the golden tensors are read row by row
        _nonempty(check_dump(doc["probes"], golden, dump, str(dpath)), dump,
                  f"{dpath}" + (f" (case {k})" if len(per_case) > 1 else ""))
        checked[k] = (dump, inputs, golden)
    cases = [_case(doc, k, dump, inputs, golden, str(dpath), tol) for k, (dump, inputs, golden) in checked.items()]
    return _report(gdir, doc, cases, str(dpath), tol, report_dir, t0)


def _nonempty(names: list[str], values: Mapping, where: str) -> None:
    if not names and "generation.tokens" not in values:
        raise InputError(f"{where}: holds no probe values of the golden schema and no generation.tokens "
                         "(names: probes.json)")


def _precheck(report_dir: str | Path | None) -> None:
    from pgconv.parity.verify import _check_report_dir

    if report_dir is not None:
        _check_report_dir(Path(report_dir))


def _case(doc: dict[str, Any], k: int, tensors: Mapping, inputs: dict[str, Tensor], golden: Mapping, label: str,
          tol: Any) -> dict[str, Any]:
    case = doc["cases"][k]
    result = compare_tensors(doc["probes"], golden, tensors, inputs, doc["image_token_id"], doc["dtype"], tol, label)
    gen = None
    if "generation.tokens" in tensors:
        t = tensors["generation.tokens"]
        if t.is_floating_point() or t.is_complex():
            raise InputError(f"{label}: generation.tokens must be integers, got {str(t.dtype).removeprefix('torch.')}")
        ours = [int(x) for x in t.reshape(-1).tolist()]
        theirs = case["generation"]["tokens"]
        step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                    None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
        gen = {"reference_tokens": theirs, "candidate_tokens": ours, "first_divergence": step, "passed": step is None}
    return {"case": k, "prompt": case["prompt"], "images": case["images"], **result, "generation": gen}


def _report(gdir: Path, doc: dict[str, Any], cases: list[dict[str, Any]], label: str, tol: Any,
            report_dir: str | Path | None, t0: float, notes: Sequence[str] = ()) -> dict[str, Any]:
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
