"""`pgconv.convert`: plan from headers, validate, then stream into a temporary sibling directory and rename.

Order of work: resolve SRC (path or hub id) -> read headers -> plan and validate (no bytes read) -> check
tied tensors -> check DST and free space -> write shards, index, companion files, manifest into
`.DST.pgconv-tmp-*` -> optional `--check` on that directory -> fsync -> rename to DST. Any error or Ctrl-C
removes the temporary directory; SRC is only ever read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pgconv.converter.checkpoint import Checkpoint, open_checkpoint, source_spec
from pgconv.converter.dtypes import parse_dtype
from pgconv.converter.hub import resolve_source
from pgconv.converter.manifest import build_manifest, check_output, write_manifest
from pgconv.converter.layouts import LAYOUTS
from pgconv.converter.plan import Plan, plan_conversion
from pgconv.converter.safetensors_io import build_header
from pgconv.converter.staging import check_destination, copy_companion, publish, reap_stale, temp_sibling
from pgconv.converter.sharding import parse_size, shard_file_names, shard_targets
from pgconv.converter.sources import tensors_equal
from pgconv.converter.writer import StreamWriter, TensorRecord
from pgconv.errors import InputError

__all__ = ["convert", "ConvertSummary", "rewrite_config"]

INDEX_NAME = "model.safetensors.index.json"


@dataclass
class ConvertSummary:
    src: str
    dst: Path
    src_layout: str
    dst_layout: str
    tensors: int
    bytes: int
    files: list[str]
    seconds: float
    copied: int = 0  # tensors copied as raw bytes
    lossy: list[tuple[str, float, int]] = field(default_factory=list)  # (tensor, max |delta|, fp16 overflows)
    dropped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # SigLIP head tensors not written (Plan.ignored)
    config_changes: dict = field(default_factory=dict)
    check: str | None = None
    manifest: bool = True  # False for a single-file output (.npz): no pgconv-manifest.json to point to
    config_note: str | None = None  # where the config came from when the source has no config.json

    def __str__(self) -> str:
        lines = [f"{self.src} ({self.src_layout}) -> {self.dst} ({self.dst_layout}): {self.tensors} tensors, "
                 f"{self.bytes / 1e6:.1f} MB in {len(self.files)} file(s), {self.seconds:.1f} s"]
        if self.config_note:
            lines.append(self.config_note)
        if self.dropped:
            lines.append("dropped (tied, identical to the embedding): " + ", ".join(self.dropped))
        if self.ignored:
            lines.append(f"dropped {len(self.ignored)} SigLIP head tensor(s) (vision_use_head: transformers loads them, "
                         f"PaliGemma never uses the head's output): {', '.join(self.ignored[:3])}"
                         f"{' ...' if len(self.ignored) > 3 else ''}")
        if self.config_changes:
            lines.append("config.json: " + ", ".join(f"{k}={v}" for k, v in self.config_changes.items()))
        if self.lossy:
            worst = max(self.lossy, key=lambda x: x[1])
            where = " (per-tensor values in pgconv-manifest.json)" if self.manifest else ""
            lines.append(f"lossy cast: {len(self.lossy)} tensor(s) changed value; largest max |delta| {worst[1]:.3g} "
                         f"in {worst[0]}{where}")
            overflows = [(n, k) for n, _, k in self.lossy if k]
            if overflows:
                lines.append(f"float16 overflow: {sum(k for _, k in overflows)} value(s) became inf in "
                             f"{len(overflows)} tensor(s): {', '.join(n for n, _ in overflows[:3])}")
        if self.check:
            lines.append(self.check)
        return "\n".join(lines)


def rewrite_config(config: dict, changes: dict) -> dict:
    """Apply plan edits to a config.json dict: dtype (also `torch_dtype` and sub-configs that state one), tying, and
    `vision_config.vision_use_head` (the unused SigLIP head's weights are not written)."""
    out = json.loads(json.dumps(config))
    subs = [out] + [out[k] for k in ("text_config", "vision_config") if isinstance(out.get(k), dict)]
    if "dtype" in changes:
        for d in subs:
            for key in ("dtype", "torch_dtype"):
                if key in d or (d is out and key == "dtype"):
                    d[key] = changes["dtype"]
    if "tie_word_embeddings" in changes:
        for d in subs[:2]:
            if "tie_word_embeddings" in d or d is out:
                d["tie_word_embeddings"] = changes["tie_word_embeddings"]
    if "vision_config.vision_use_head" in changes:
        if not isinstance(out.get("vision_config"), dict):
            out["vision_config"] = {}  # an absent one is built from PaliGemma's defaults: keep those explicit
        out["vision_config"]["vision_use_head"] = changes["vision_config.vision_use_head"]
    return out


def config_note(src: Path, config: str | Path | None, cfg) -> str | None:
    """What the summary says when SRC has no config.json: its config was --config or a preset inferred from the
    tensor shapes, and every field the shapes cannot show (eos ids, image token id, soft-caps) is that preset's."""
    from pgconv.model.config import PRESETS

    root = src if src.is_dir() else src.parent
    if (root / "config.json").exists():
        return None
    if config is not None:
        return f"config: none in the source; --config {config} used"
    name = next((n for n, c in PRESETS.items() if c == cfg), None)
    return (f"config: none in the source; preset {name!r} inferred from the tensor shapes (its eos/image token ids and "
            "other non-shape fields are assumed; --config to choose)") if name else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tree(tmp: Path, ckpt: Checkpoint, plan: Plan, shards: list, names: list[str], quiet: bool,
               untie: bool) -> list[TensorRecord]:
    steps = {s.target.name: s for s in plan.steps}
    with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1000, disable=quiet,
              desc="convert", leave=False) as bar:
        with StreamWriter(ckpt.tensors, bar.update) as writer:
            for name, metas in zip(names, shards):
                writer.write_shard(tmp / name, [steps[m.name] for m in metas])
            records = writer.finish()
    if len(names) > 1:
        index = {"metadata": {"total_parameters": sum(r.target.numel for r in records), "total_size": plan.total_bytes},
                 "weight_map": {r.target.name: r.file for r in sorted(records, key=lambda r: r.target.name)}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    companions = ckpt.companion_files()
    for p in companions:
        if p.name == "config.json" and plan.config_changes:
            text = json.dumps(rewrite_config(ckpt.config, dict(plan.config_changes)), indent=2, sort_keys=True) + "\n"
            (tmp / p.name).write_text(text, encoding="utf-8")
        else:
            copy_companion(p, tmp)
    if ckpt.config is not None and "config.json" not in {p.name for p in companions}:
        # A source without a config.json file (big_vision .npz, spec formats) brings its config as data.
        text = json.dumps(rewrite_config(ckpt.config, dict(plan.config_changes)), indent=2, sort_keys=True) + "\n"
        (tmp / "config.json").write_text(text, encoding="utf-8")
    write_manifest(tmp, build_manifest(plan, records, ckpt, untie=untie))
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    return records


def convert(src: str | Path, dst: str | Path, to: str, dtype: str | None = None, shard_size: str | int = "5GB",
            force: bool = False, check: bool = False, untie: bool = False, quiet: bool = False,
            from_: str | Path | None = None, config: str | Path | None = None,
            allow_vocab_cut: bool = False) -> ConvertSummary:
    """Convert the PaliGemma checkpoint `src` (directory, weight file or hub id) into layout `to` at `dst`.

    Spec-defined formats (converter/spec.py): `to` may also be a spec (`big-vision`, a built-in spec name, or a
    .toml/.json file), and `from_` reads SRC through one (a `.npz` SRC is read as big_vision, a checkpoint without
    config.json through its layout's spec); `config` (preset name or config.json) is for sources without a
    config.json; `allow_vocab_cut` lets a vocabulary cut drop rows that are not zero padding.
    """
    start = time.perf_counter()
    src_path, trusted = resolve_source(src)
    from_ = source_spec(src_path, trusted, from_, config)
    if to not in LAYOUTS:  # a spec: custom writer (npz members / stacked tensors streamed layer by layer)
        from pgconv.converter.spec_write import convert_to_spec

        return convert_to_spec(src_path, dst, to, from_=from_, config=config, dtype=dtype, force=force,
                               allow_cut=allow_vocab_cut, check=check, untie=untie, quiet=quiet)
    # The spec machinery imports torch; a plain same-dtype layout conversion must not pay for it (RSS, start-up),
    # so it is imported only for spec sources and for files that carry pgconv provenance.
    if from_ is not None:
        from pgconv.converter.custom import open_spec_checkpoint

        ckpt = open_spec_checkpoint(src_path, from_, config, allow_cut=allow_vocab_cut)
    else:
        ckpt = open_checkpoint(src_path, trusted_root=trusted)
    cfg = ckpt.pg_config()
    try:
        plan = plan_conversion(ckpt.metas(), cfg, to, dtype=parse_dtype(dtype), untie=untie)
    except InputError as e:
        raise type(e)(f"{src_path}: {e}") from None
    if "pgconv.format" in ckpt.metadata:  # custom.check_provenance has nothing to check otherwise
        from pgconv.converter.custom import check_provenance

        check_provenance(ckpt.metadata, getattr(ckpt, "spec", None) or plan.src_layout, False, str(src_path))
    for d in plan.drops:
        a, b = ckpt.tensors[d.source], ckpt.tensors[d.equals]
        if not tensors_equal(a, b):
            raise InputError(f"{a.file}: tensor {d.source!r} differs from {d.equals!r} although the config ties them "
                             "(tie_word_embeddings=true); pass --untie to keep both")
    dst = Path(dst).absolute()
    check_destination(dst, ckpt, src_path.is_dir(), force)
    shards = shard_targets(plan.targets, parse_size(shard_size))
    names = shard_file_names(len(shards))
    need = sum(len(build_header(s, {"format": "pt"})[0]) for s in shards) + plan.total_bytes
    need += sum(p.stat().st_size for p in ckpt.companion_files()) + (1 << 20)
    free = shutil.disk_usage(dst.parent).free
    if free < need:
        raise InputError(f"{dst.parent}: not enough free space ({free / 1e9:.2f} GB free, {need / 1e9:.2f} GB needed)")
    reap_stale(dst)  # what a kill -9'd earlier run towards DST left (only dead processes' on this host)
    tmp = temp_sibling(dst, "tmp")
    try:
        tmp.mkdir()
    except OSError as e:  # EACCES/EROFS that os.access did not predict (root, ACLs, a race)
        raise InputError(f"{dst.parent}: cannot create the output there ({e.strerror or e})") from None
    try:
        try:
            records = _write_tree(tmp, ckpt, plan, shards, names, quiet, untie)
        except OSError as e:
            raise InputError(f"{dst}: write failed ({e.strerror or e})") from None
        report = check_output(tmp, ckpt, plan, shown=dst) if check else None
        try:
            publish(tmp, dst, force)  # a DST made meanwhile by another run is refused, atomically
        except OSError as e:
            raise InputError(f"{dst}: cannot rename the finished output into place ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    note = config_note(src_path, config, cfg) if from_ is not None else None
    return ConvertSummary(
        str(src), dst, ckpt.spec.name if getattr(ckpt, "spec", None) else plan.src_layout, plan.dst_layout, len(records), plan.total_bytes, names,
        time.perf_counter() - start, copied=sum(r.copied for r in records),
        lossy=[(r.target.name, r.max_abs_diff, r.fp16_overflow) for r in records
               if (r.max_abs_diff or 0) > 0 or r.fp16_overflow],
        dropped=[d.source for d in plan.drops], ignored=list(plan.ignored), config_changes=dict(plan.config_changes),
        check=report,
        config_note=note,
    )
