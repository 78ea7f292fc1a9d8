"""`pgconv-manifest.json`: what a conversion wrote, and the `--check` that re-reads it.

The manifest lists every target tensor with its file, shape, dtype, byte size and SHA-256, the source tensor(s)
it came from, the transform and any cast loss, plus the layout pair and the tool version. It holds no paths
or timestamps, so the same input gives a byte-identical manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

from pgconv.converter.checkpoint import MANIFEST_NAME, Checkpoint, open_checkpoint, read_json
from pgconv.converter.plan import Plan, plan_conversion
from pgconv.converter.sources import sha256_of, tensors_equal
from pgconv.converter.writer import TensorRecord
from pgconv.errors import InputError

__all__ = ["build_manifest", "write_manifest", "verify_hashes", "check_output"]


def _meta(m) -> dict:
    return {"name": m.name, "shape": list(m.shape), "dtype": m.dtype, "bytes": m.nbytes}


def build_manifest(plan: Plan, records: list[TensorRecord], source: Checkpoint, *, untie: bool) -> dict:
    from pgconv import __version__

    order = {s.target.name: i for i, s in enumerate(plan.steps)}
    tensors = []
    for r in sorted(records, key=lambda r: order[r.target.name]):
        entry = {**_meta(r.target), "file": r.file, "sha256": r.sha256, "sources": [_meta(m) for m in r.sources],
                 "transform": r.transform}
        if r.max_abs_diff is not None:
            entry["max_abs_diff"] = r.max_abs_diff
            entry["fp16_overflow"] = r.fp16_overflow
        tensors.append(entry)
    return {
        "tool": "pgconv",
        "version": __version__,
        "source_layout": plan.src_layout,
        "target_layout": plan.dst_layout,
        "source_files": [p.name for p in source.files],
        "config_changes": dict(plan.config_changes),
        "untie": untie,
        "dropped": [{"source": d.source, "equals": d.equals, "reason": d.reason} for d in plan.drops],
        "ignored": list(plan.ignored),  # the unused SigLIP head's tensors, not written
        "tensors": tensors,
    }


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = directory / MANIFEST_NAME
    # One tensor per line: readable, diffable, and small even for 600 tensors.
    head = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items() if k != "tensors"]
    rows = [f"    {json.dumps(t)}" for t in manifest["tensors"]]
    text = "{\n" + ",\n".join(head) + ',\n  "tensors": [\n' + ",\n".join(rows) + "\n  ]\n}\n"
    path.write_text(text, encoding="utf-8")
    return path


def verify_hashes(out_dir: Path, shown: Path | None = None) -> int:
    """Every tensor on disk in `out_dir` against `pgconv-manifest.json` (names, header, sha256); returns the count.
    Errors name `shown` (the destination the user asked for) instead of a temporary directory that is about to go."""
    shown = shown or out_dir
    out = open_checkpoint(out_dir)
    manifest = read_json(out_dir / MANIFEST_NAME)
    listed = {t["name"]: t for t in manifest["tensors"]}
    if set(listed) != set(out.tensors):
        extra = sorted(set(out.tensors) ^ set(listed))
        raise InputError(f"{shown}: check failed: tensors on disk differ from the manifest ({', '.join(extra[:3])})")
    for name, t in out.tensors.items():
        entry = listed[name]
        if [entry["dtype"], entry["shape"], entry["file"]] != [t.meta.dtype, list(t.meta.shape), t.file.name]:
            raise InputError(f"{shown / t.file.name}: check failed: tensor {name!r} header differs from the manifest")
        if sha256_of(t) != entry["sha256"]:
            raise InputError(f"{shown / t.file.name}: check failed: tensor {name!r} sha256 differs from the manifest")
    return len(listed)


def check_output(out_dir: Path, source: Checkpoint, plan: Plan, shown: Path | None = None) -> str:
    """Re-read `out_dir`: hashes against the manifest, then (same dtype) the inverse conversion bit for bit.

    The inverse is planned independently from the written headers and config (`out -> src_layout`); every
    tensor it maps back must land on the name it came from and equal the source byte for byte. Errors name
    `shown` (default `out_dir`).
    """
    shown = shown or out_dir
    n = verify_hashes(out_dir, shown)
    if any(sources_dtype != s.target.dtype for s in plan.steps
           for sources_dtype in (source.tensors[m].meta.dtype for m in s.sources)):
        return f"check: {n} tensor hashes verified (dtype changed: no round trip)"
    out = open_checkpoint(out_dir)
    back = plan_conversion(out.metas(), out.pg_config(), plan.src_layout, src_layout=plan.dst_layout)
    back_name = {step.sources[0]: step.target.name for step in back.steps}
    for step in plan.steps:
        origin = step.sources[0]
        if not step.shares_source and back_name.get(step.target.name) != origin:
            raise InputError(f"{shown}: check failed: {step.target.name!r} converts back to "
                             f"{back_name.get(step.target.name)!r}, not {origin!r}")
        if not tensors_equal(out.tensors[step.target.name], source.tensors[origin]):
            raise InputError(f"{shown}: check failed: {step.target.name!r} is not bit-identical to source {origin!r}")
    return f"check: {n} tensor hashes verified; converting back gives the source bit for bit"
