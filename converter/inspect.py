"""`pgconv.inspect`: describe a checkpoint from its headers (and, with `scan`, its values).

Reports the detected layout, the preset whose shapes it matches, tensor count, dtype histogram, total bytes,
the tied-embedding status, tensors missing / unexpected / mis-shaped against what config.json implies, and
(with `scan`) NaN/Inf counts per tensor. Problems are collected, not raised: only unreadable input raises.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pgconv.converter.checkpoint import PRECEDENCE, Checkpoint, open_checkpoint
from pgconv.converter.hub import resolve_source
from pgconv.converter.dtypes import FLOAT_CODES
from pgconv.converter.layouts import LAYOUTS, TEXT_TENSORS, VISION_HEAD_TENSORS, detect_layout, head_shapes
from pgconv.converter.plan import expected_shapes
from pgconv.converter.sources import tensors_equal
from pgconv.errors import InputError
from pgconv.model.config import PRESETS, PaliGemmaConfig

__all__ = ["InspectReport", "inspect", "matching_presets"]


@dataclass
class InspectReport:
    path: str
    format: str
    files: list[str]
    layout: str | None
    presets: list[str]  # presets whose tensor shapes the checkpoint has exactly
    config: str  # "ok", "absent" or the config error
    tensors: int
    dtypes: dict[str, int]  # dtype -> tensor count
    dtype_bytes: dict[str, int]
    total_bytes: int
    tied: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshaped: list[dict] = field(default_factory=list)  # {"name", "shape", "expected"}
    # Stored SigLIP head tensors (vision_use_head true): transformers loads them, PaliGemma never uses the head's
    # output, pgconv ignores them (convert does not write them). Not a problem.
    ignored: list[str] = field(default_factory=list)
    nonfinite: dict[str, dict[str, int]] | None = None  # with scan: tensor -> {"nan", "inf"} (only tensors with any)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        hist = ", ".join(f"{d} x{n} ({self.dtype_bytes[d] / 1e6:.1f} MB)" for d, n in self.dtypes.items())
        lines = [
            f"checkpoint: {self.path} ({self.format}, {len(self.files)} file(s))",
            f"layout: {self.layout or 'unknown'}",
            f"preset: {', '.join(self.presets) or 'none (shapes match no preset)'}",
            f"config.json: {self.config}",
            f"tensors: {self.tensors}, {self.total_bytes / 1e6:.1f} MB; dtypes: {hist}",
            f"embeddings: {self.tied}",
        ]
        if self.ignored:
            lines.append(f"ignored: {len(self.ignored)} SigLIP head tensor(s) (vision_use_head: transformers loads "
                         "them, PaliGemma never uses the head's output; convert does not write them)")
        if self.nonfinite is not None:
            bad = sum(v["nan"] + v["inf"] for v in self.nonfinite.values())
            lines.append(f"scan: {bad} NaN/Inf value(s) in {len(self.nonfinite)} tensor(s)")
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def matching_presets(shapes: dict[str, tuple[int, ...]], layout: str) -> list[str]:
    """Presets whose tensors (ignoring any lm_head) have exactly these names and shapes in `layout`."""
    lay = LAYOUTS[layout]
    head = {lay.lm_head} | {lay.vision + n for n in VISION_HEAD_TENSORS}  # an unused SigLIP head: not a shape
    body = {k: v for k, v in shapes.items() if k not in head}
    return [name for name, cfg in PRESETS.items() if expected_shapes(cfg, layout, with_lm_head=False) == body]


def _tied_status(ck: Checkpoint, cfg: PaliGemmaConfig | None, layout: str) -> tuple[str, str | None]:
    lay = LAYOUTS[layout]
    embed = lay.text + ("embed.weight" if lay.native_names else TEXT_TENSORS["embed.weight"])
    head = ck.tensors.get(lay.lm_head)
    stored = "lm_head stored" if head is not None else "no lm_head stored"
    if cfg is None:
        return f"unknown (no usable config.json; {stored})", None
    if not cfg.tie_word_embeddings:
        return f"untied ({stored})", (None if head is not None else f"untied config but {lay.lm_head} is missing")
    if head is None:
        return "tied (lm_head not stored; logits use the embedding)", None
    if embed in ck.tensors and tensors_equal(head, ck.tensors[embed]):
        return "tied (lm_head stored, identical to the embedding)", None
    return "tied per config, but the stored lm_head differs", (
        f"{lay.lm_head} differs from {embed} although the config ties them (transformers, verify and generate use "
        "both untied, with a warning; convert refuses it, --untie keeps both)")


def _scan(ck: Checkpoint) -> dict[str, dict[str, int]]:
    import torch

    out = {}
    for name, t in ck.tensors.items():
        if t.meta.dtype not in FLOAT_CODES:
            continue
        nan = inf = 0
        for chunk in t.chunks():
            nan += int(torch.isnan(chunk).sum())
            inf += int(torch.isinf(chunk).sum())
        if nan or inf:
            out[name] = {"nan": nan, "inf": inf}
    return out


def inspect(path: str | Path, scan: bool = False, from_: str | Path | None = None,
            config: str | Path | None = None) -> InspectReport:
    """Describe the checkpoint at `path` (directory, weight file or hub id).

    A big_vision `.npz`, or any source read through a spec (`from_`: a built-in spec name or a .toml/.json file),
    is described through that spec: its tensors appear under pgconv's native names, the layout is the spec's name
    and the config is `config` (preset name or config.json), a config.json beside it, or the preset its shapes
    match. A file that does not fit the spec is unreadable input (InputError), like a malformed header.
    """
    if from_ is not None or Path(str(path)).suffix == ".npz":
        return _inspect_spec(Path(path), from_ or "big-vision", config, scan)
    src, trusted = resolve_source(path)
    root = src if src.is_dir() else src.parent
    if config is not None and (root / "config.json").exists():
        raise InputError(f"--config {config}: {root / 'config.json'} exists; --config is only for sources without "
                         "one (a checkpoint without config.json, --from, .npz)")
    ck = open_checkpoint(src, trusted_root=trusted)
    shapes = {n: t.meta.shape for n, t in ck.tensors.items()}
    dtypes = Counter(t.meta.dtype for t in ck.tensors.values())
    dtype_bytes = Counter()
    for t in ck.tensors.values():
        dtype_bytes[t.meta.dtype] += t.meta.nbytes
    problems: list[str] = []
    try:
        layout = detect_layout(shapes)
    except InputError as e:
        layout = None
        problems.append(str(e))
    cfg, given, config = None, config, "absent"
    if ck.config is not None:
        try:
            cfg, config = ck.pg_config(), "ok"
        except InputError as e:
            config = str(e)
            problems.append(config)
    elif given is not None:  # a checkpoint without config.json, checked against the config the user names
        from pgconv.converter.custom import resolve_config
        from pgconv.converter.spec import load_spec

        cfg, config = resolve_config(given, load_spec(layout or "native"), {}, str(src)), f"ok (--config {given})"
    else:
        problems.append(f"{root / 'config.json'}: missing (transformers, verify and generate need one; tensors not "
                        "checked against a config; convert takes --config or the one preset the shapes match)")
    if "pgconv.format" in ck.metadata and layout is not None:
        # Written by a pgconv spec: read as the plain layout, an offset it applied would be skipped.
        from pgconv.converter.custom import check_provenance

        try:
            check_provenance(ck.metadata, layout, False, str(src))
        except InputError as e:
            problems.append(str(e))
    report = InspectReport(str(src), ck.format, [p.name for p in ck.files], layout,
                           matching_presets(shapes, layout) if layout else [], config, len(ck.tensors),
                           dict(sorted(dtypes.items())), dict(sorted(dtype_bytes.items())),
                           sum(dtype_bytes.values()), "unknown (layout not detected)")
    if layout is not None:
        report.tied, problem = _tied_status(ck, cfg, layout)
        problems += [problem] if problem else []
    if cfg is not None and layout is not None:
        expected = expected_shapes(cfg, layout, with_lm_head=not cfg.tie_word_embeddings)
        head = LAYOUTS[layout].lm_head
        siglip_head = head_shapes(cfg, layout)
        report.ignored = sorted(n for n in siglip_head if n in shapes)
        report.missing = sorted(set(expected) - set(shapes))
        report.unexpected = sorted(n for n in set(shapes) - set(expected) - set(siglip_head)
                                   if not (n == head and cfg.tie_word_embeddings))
        expected = {**expected, **siglip_head}  # a mis-shaped head transformers refuses to load
        report.misshaped = [{"name": n, "shape": list(shapes[n]), "expected": list(expected[n])}
                            for n in sorted(set(expected) & set(shapes)) if shapes[n] != expected[n]]
        problems += [f"missing tensor {n}" for n in report.missing]
        problems += [f"unexpected tensor {n}" for n in report.unexpected]
        problems += [f"tensor {m['name']} has shape {m['shape']}, the config implies {m['expected']}" for m in report.misshaped]
    if src.is_dir():
        present = [n for n in PRECEDENCE if (src / n).exists()]
        problems += [f"{src / n}: ignored, {present[0]} takes precedence (as in transformers); remove it if stale"
                     for n in present[1:]]
    problems += [f"tensor {n} has dtype {t.meta.dtype}; PaliGemma weights are floating point"
                 for n, t in sorted(ck.tensors.items()) if t.meta.dtype not in FLOAT_CODES]
    if scan:
        report.nonfinite = _scan(ck)
        problems += [f"tensor {n}: {v['nan']} NaN, {v['inf']} Inf" for n, v in report.nonfinite.items()]
    report.problems = problems
    return report


def _inspect_spec(path: Path, spec: str | Path, config: str | Path | None, scan: bool) -> InspectReport:
    from pgconv.converter.custom import open_spec_checkpoint

    ck = open_spec_checkpoint(path, spec, config, allow_cut=True)  # a vocabulary cut is reported, not refused
    cfg = ck.pg_config()
    shapes = {n: t.meta.shape for n, t in ck.tensors.items()}
    dtypes = Counter(t.meta.dtype for t in ck.tensors.values())
    dtype_bytes: Counter = Counter()
    for t in ck.tensors.values():
        dtype_bytes[t.meta.dtype] += t.meta.nbytes
    name = ck.spec.name if ck.spec is not None else str(spec)
    fmt = f"{ck.files[0].suffix.lstrip('.') or 'directory'} read through spec {name}"
    report = InspectReport(str(path), fmt, [p.name for p in ck.files], name, matching_presets(shapes, "native"),
                           _config_origin(path, config), len(ck.tensors),
                           dict(sorted(dtypes.items())), dict(sorted(dtype_bytes.items())), sum(dtype_bytes.values()),
                           "unknown")
    problems: list[str] = []
    report.tied, problem = _tied_status(ck, cfg, "native")
    problems += [problem] if problem else []
    if scan:
        report.nonfinite = _scan(ck)
        problems += [f"tensor {n}: {v['nan']} NaN, {v['inf']} Inf" for n, v in report.nonfinite.items()]
    report.problems = problems
    return report


def _config_origin(path: Path, config: str | Path | None) -> str:
    """How open_spec_checkpoint found the config (custom.resolve_config's order)."""
    if config is not None:
        return f"ok (--config {config})"
    beside = (path if path.is_dir() else path.parent) / "config.json"
    return f"ok ({beside})" if beside.is_file() else "absent (preset inferred from the tensor shapes)"
