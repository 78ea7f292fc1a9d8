"""`convert(..., to=<spec>)`: write any PaliGemma checkpoint in a spec-defined format (big_vision `.npz`, user specs).

The source (any transformers/native layout, or a spec format read with `--from`) is opened as native tensors;
the spec is bound to the config (every check before any bytes move); file tensors are then produced one at a
time, a stacked tensor one layer slice at a time, into a temporary sibling of DST renamed at the end:

* `format = "npz"`: DST is the `.npz` file; provenance goes in the zip comment.
* `format = "safetensors"`: DST is a directory with `model.safetensors` (provenance in `__metadata__`), an HF
  `config.json` (so the result is self-describing and `--from` finds its config), the source's tokenizer and
  processor files, and `pgconv-manifest.json` (name, shape, dtype, bytes, sha256, sources, transform per tensor).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pgconv.converter.checkpoint import Checkpoint, open_checkpoint, source_spec
from pgconv.converter.custom import SpecCheckpoint, check_provenance, open_spec_checkpoint, provenance
from pgconv.converter.dtypes import code_of, is_widening, parse_dtype, torch_dtype
from pgconv.converter.hub import resolve_source
from pgconv.converter.manifest import write_manifest
from pgconv.converter.npz import BFLOAT16, NpzWriter, from_torch
from pgconv.converter.plan import plan_conversion
from pgconv.converter.safetensors_io import build_header
from pgconv.converter.sources import SourceTensor, TensorMeta, tensors_equal
from pgconv.converter.spec import builtin_names, load_spec
from pgconv.converter.spec_bind import FileTensor, bind
from pgconv.converter.spec_ops import SpecError
from pgconv.converter.staging import check_destination, copy_companion, publish, reap_stale, temp_sibling
from pgconv.errors import InputError
from pgconv.model.config import PaliGemmaConfig
from pgconv.model.hf_config import to_hf_config

__all__ = ["native_source", "convert_to_spec"]

_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_NP_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BFLOAT16}


def native_source(src: str | Path, from_: str | Path | None = None, config: str | Path | None = None, *,
                  allow_cut: bool = False) -> tuple[Checkpoint, PaliGemmaConfig, str, dict[str, SourceTensor], Path]:
    """(checkpoint, config, source format name, native name -> lazy tensor, local path) for any supported SRC."""
    path, trusted = resolve_source(src)
    from_ = source_spec(path, trusted, from_, config)
    if from_ is not None:
        ck = open_spec_checkpoint(path, from_, config, allow_cut=allow_cut)
        return ck, ck.cfg, ck.spec.name, ck.tensors, path
    ck = open_checkpoint(path, trusted_root=trusted)
    cfg = ck.pg_config()
    try:
        plan = plan_conversion(ck.metas(), cfg, "native")
    except InputError as e:
        raise type(e)(f"{path}: {e}") from None
    check_provenance(ck.metadata, plan.src_layout, False, str(path))
    for d in plan.drops:
        if not tensors_equal(ck.tensors[d.source], ck.tensors[d.equals]):
            raise InputError(f"{ck.tensors[d.source].file}: tensor {d.source!r} differs from {d.equals!r} although "
                             "the config ties them (tie_word_embeddings=true)")
    return ck, cfg, plan.src_layout, {s.target.name: ck.tensors[s.sources[0]] for s in plan.steps}, path


def _cast(parts: Iterator[torch.Tensor], code: str, lossy: dict[str, float], name: str) -> Iterator[torch.Tensor]:
    """Cast each piece to `code`, recording the largest |change| of a narrowing cast (finite values only)."""
    for p in parts:
        out = p.to(torch_dtype(code))
        if not is_widening(code_of(p.dtype), code):
            wide, back = p.double(), out.double()
            ok = torch.isfinite(wide) & torch.isfinite(back)
            diff = float((back - wide).abs().masked_fill(~ok, 0).max()) if p.numel() else 0.0
            lossy[name] = max(lossy.get(name, 0.0), diff)
        yield out


def _write_all(fd: int, data: memoryview | bytes) -> None:
    data = memoryview(data)
    while data:
        data = data[os.write(fd, data):]


def _write_npz(tmp: Path, files: list[FileTensor], codes: dict[str, str], meta: dict[str, str], bar: tqdm,
               lossy: dict[str, float]) -> None:
    with NpzWriter(tmp, comment=json.dumps(meta, sort_keys=True).encode()) as w:
        for ft in files:
            pieces = _cast(ft.parts(), codes[ft.name], lossy, ft.name)

            def arrays(pieces: Iterator[torch.Tensor] = pieces) -> Iterator:
                for p in pieces:
                    bar.update(p.numel() * p.element_size())
                    yield from_torch(p)

            w.add(ft.name, ft.shape, _NP_DTYPES[codes[ft.name]], arrays())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def _write_safetensors(tmp: Path, files: list[FileTensor], codes: dict[str, str], meta: dict[str, str],
                       bar: tqdm, lossy: dict[str, float]) -> list[dict]:
    metas = [TensorMeta(ft.name, ft.shape, codes[ft.name]) for ft in files]
    header, offsets = build_header(metas, {"format": "pt", **meta})
    by_name = {ft.name: ft for ft in files}
    rows = []
    fd = os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, header)
        for name in sorted(offsets, key=offsets.get):
            ft, h, size = by_name[name], hashlib.sha256(), 0
            for p in _cast(ft.parts(), codes[name], lossy, name):
                data = memoryview(p.contiguous().view(torch.uint8).numpy())
                h.update(data)
                _write_all(fd, data)
                size += p.numel() * p.element_size()
                bar.update(p.numel() * p.element_size())
            expected = TensorMeta(name, ft.shape, codes[name]).nbytes
            if size != expected:
                raise InputError(f"{name}: spec produced {size} bytes, {expected} expected")
            rows.append({"name": name, "shape": list(ft.shape), "dtype": codes[name], "bytes": size,
                         "file": "model.safetensors", "sha256": h.hexdigest(), "sources": list(ft.sources),
                         "transform": ft.transform, **({"max_abs_diff": lossy[name]} if name in lossy else {})})
        os.fsync(fd)
    finally:
        os.close(fd)
    return rows


def convert_to_spec(src: str | Path, dst: str | Path, to: str | Path, *, from_: str | Path | None = None,
                    config: str | Path | None = None, dtype: str | None = None, force: bool = False,
                    allow_cut: bool = False, check: bool = False, untie: bool = False, quiet: bool = False):
    """Convert SRC (any layout, or a spec format with `from_`) into the format of spec `to` at DST.

    `check` re-reads DST through the spec and, when no dtype changed, compares every native tensor with the
    source bit for bit (with `allow_cut`, rows a vocabulary cut dropped read back as zero padding).
    """
    from pgconv import __version__
    from pgconv.converter.convert import ConvertSummary, config_note

    start = time.perf_counter()
    try:
        spec = load_spec(to)
    except SpecError as e:
        if not str(e).startswith("unknown spec"):
            raise
        from pgconv.converter.layouts import LAYOUTS

        raise SpecError(f"--to {to}: not a layout ({', '.join(LAYOUTS)}) nor a spec (a .toml/.json file or one of "
                        f"{', '.join(builtin_names())})") from None
    if untie:
        raise InputError(f"--untie is not supported for spec {spec.name!r} outputs (add an lm_head rule with "
                         'when = ["untied"] and an untied config instead)')
    ck, cfg, src_format, natives, src_path = native_source(src, from_, config, allow_cut=allow_cut)
    src_is_dir = src_path.is_dir()
    if spec.format == "npz" and not str(dst).endswith(".npz"):
        raise InputError(f"{dst}: spec {spec.name!r} writes one .npz file; give DST a .npz name")
    bound = bind(spec, cfg, allow_cut=allow_cut)
    target = parse_dtype(dtype) or parse_dtype(spec.dtype)
    files = bound.file_tensors(lambda n: natives[n].load())
    codes = {ft.name: target or natives[ft.sources[0]].meta.dtype for ft in files}
    total = sum(TensorMeta(ft.name, ft.shape, codes[ft.name]).nbytes for ft in files)
    dst = Path(dst).absolute()
    # As for layout outputs: never inside a directory source (writing there, or --force over it, changes SRC).
    check_destination(dst, ck, src_is_dir, force, file_output=spec.format == "npz")
    need = total + sum(p.stat().st_size for p in ck.companion_files()) + (1 << 20)
    free = shutil.disk_usage(dst.parent).free
    if free < need:
        raise InputError(f"{dst.parent}: not enough free space ({free / 1e9:.2f} GB free, {need / 1e9:.2f} GB needed)")
    meta = {**provenance(bound), "pgconv.source_format": src_format}
    reap_stale(dst)
    tmp = temp_sibling(dst, "tmp")
    lossy: dict[str, float] = {}
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, disable=quiet, desc="convert",
                  leave=False) as bar:
            if spec.format == "npz":
                _write_npz(tmp, files, codes, meta, bar, lossy)
            else:
                tmp.mkdir()
                rows = _write_safetensors(tmp, files, codes, meta, bar, lossy)
                top = max(set(codes.values()), key=list(codes.values()).count)
                (tmp / "config.json").write_text(json.dumps(to_hf_config(cfg, _NAMES[top]), indent=2) + "\n")
                for p in ck.companion_files():
                    if p.name != "config.json":
                        copy_companion(p, tmp)
                write_manifest(tmp, {"tool": "pgconv", "version": __version__, "source_layout": src_format,
                                     "target_layout": spec.name, "spec_digest": spec.digest,
                                     "source_files": [p.name for p in ck.files], "tensors": rows})
        # Checked before the rename: a failed check must leave no DST (and a --force'd one untouched).
        report = _check(tmp, dst.name, spec, bound, cfg, natives, codes, allow_cut) if check else None
        publish(tmp, dst, force)  # atomic: a DST another run made meanwhile is refused (replaced with --force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # full disk, permissions, read-only fs: one line, exit 2 (issue 8)
            raise InputError(f"{dst}: write failed ({e.strerror or e})") from None
        lead = str(e).split(":", 1)[0]
        if isinstance(e, InputError) and lead in natives:  # a runtime op check (a vocabulary cut) names the tensor
            raise type(e)(f"{natives[lead].file}: {e}") from None
        raise
    names = [dst.name] if spec.format == "npz" else ["model.safetensors"]
    return ConvertSummary(str(src), dst, src_format, spec.name, len(files), total, names, time.perf_counter() - start,
                          lossy=[(n, d, 0) for n, d in lossy.items() if d > 0], check=report,
                          ignored=_ignored_head(ck, cfg, src_format),
                          manifest=spec.format != "npz",
                          config_note=config_note(ck.root, config, cfg) if isinstance(ck, SpecCheckpoint) else None)


def _ignored_head(ck: Checkpoint, cfg: PaliGemmaConfig, src_format: str) -> list[str]:
    """The stored SigLIP head tensors a layout source had (not written: PaliGemma never uses them; plan.ignored)."""
    from pgconv.converter.layouts import LAYOUTS, head_shapes

    return [n for n in head_shapes(cfg, src_format) if n in ck.tensors] if src_format in LAYOUTS else []


def _check(out: Path, name: str, spec, bound, cfg: PaliGemmaConfig, natives: dict[str, SourceTensor],
           codes: dict[str, str], allow_cut: bool) -> str:
    """Re-read the output at `out` (renamed to `name` once this passes): a safetensors output's tensors against its
    manifest hashes, every tensor read back through the spec (an `.npz` member's CRC-32 is checked as it is read),
    and, when no dtype changed, every native tensor against the source: bit for bit, except after an `add`
    (`_add_change`) and rows an allowed vocabulary cut dropped."""
    from pgconv.converter.manifest import verify_hashes

    shown = out.parent / name
    hashed = f" ({verify_hashes(out, shown)} tensor hashes verified)" if spec.format == "safetensors" else ""
    back = open_spec_checkpoint(out, spec, cfg, npz_suffix=False)
    if {t.meta.dtype for t in natives.values()} != set(codes.values()):
        for t in back.tensors.values():  # no source to compare with, but every byte is read (and CRC-checked)
            for _ in t.chunks():
                pass
        return f"check: {name}{hashed} read back through spec {spec.name!r} (dtype changed: no round trip)"
    offsets = {n: sum(float(op.spec.arg) for op in inst.ops if op.spec.name == "add")
               for inst in bound.instances for n in inst.native if not all(op.exact for op in inst.ops)}
    cut, rounded = [], {}
    for native, t in natives.items():
        if tensors_equal(back.tensors[native], t):
            continue
        if native in offsets:
            rounded[native] = _add_change(t.load(), back.tensors[native].load(), offsets[native], native, name)
            continue
        if allow_cut and _cut_rows_only(back.tensors[native].load(), t.load()):
            cut.append(native)
            continue
        raise InputError(f"{shown}: check failed: {native!r} read back through spec {spec.name!r} differs from the "
                         "source")
    notes = [f" except the rows cut from {', '.join(cut)}"] if cut else []
    if rounded:
        worst = max(rounded, key=lambda n: rounded[n][1])
        notes.append(f"{' and' if cut else ' except'} {len(rounded)} tensor(s) through `add`, where x - c + c rounds: "
                     f"largest change {rounded[worst][0]:.3g} in {worst} ({100 * rounded[worst][1]:.2g}% of its "
                     "largest value)")
    return f"check: {name}{hashed} read back through spec {spec.name!r} gives the source bit for bit{''.join(notes)}"


# A round trip through `add` that moves a tensor by more than this share of its largest magnitude has not kept it
# (e.g. an offset far larger than the values in the storage dtype): the check fails instead of reporting it.
_ADD_LOSS_LIMIT = 0.01


def _add_change(src: torch.Tensor, back: torch.Tensor, c: float, native: str, name: str) -> tuple[float, float]:
    """(largest |back - src|, that as a share of max |src|) for a tensor stored as src - c and read back adding c.

    Each element may move by at most the rounding of those two steps in the storage dtype (one spacing of the
    stored value plus one of the result; more is a bug, not rounding), and the whole tensor by at most
    `_ADD_LOSS_LIMIT` of its scale."""
    x, y = src.double(), back.double()
    change = (y - x).abs()
    allowed = _spacing((x - c).to(src.dtype)) + _spacing(back)
    if bool((change > allowed).any()):
        raise InputError(f"{name}: check failed: {native!r} read back differs from the source by more than the "
                         f"rounding of adding {c:g} in {src.dtype}")
    worst = float(change.max()) if change.numel() else 0.0
    scale = float(x.abs().max()) if x.numel() else 0.0
    share = worst / scale if scale else (0.0 if worst == 0 else float("inf"))
    if share > _ADD_LOSS_LIMIT:
        raise InputError(f"{name}: check failed: {native!r} moved by up to {worst:.3g} ({100 * share:.3g}% of its "
                         f"largest value) through the spec's add of {c:g} in {src.dtype}; store it without the "
                         "offset or in a wider dtype")
    return worst, share


def _spacing(t: torch.Tensor) -> torch.Tensor:
    """The gap to the next representable value of each element of `t` in its own float dtype, as float64."""
    info = torch.finfo(t.dtype)
    a = t.double().abs().clamp_min(info.tiny)  # subnormals and zero: the smallest normal's spacing bounds theirs
    return info.eps * torch.exp2(torch.floor(torch.log2(a)))


def _cut_rows_only(back: torch.Tensor, src: torch.Tensor) -> bool:
    """`back` equals `src` up to some row and is zero after it (what an allowed vocabulary cut leaves)."""
    nonzero = back.reshape(back.shape[0], -1).ne(0).any(1).nonzero()
    keep = int(nonzero[-1]) + 1 if len(nonzero) else 0
    return bool(torch.equal(back[:keep].view(torch.uint8), src[:keep].contiguous().view(torch.uint8)))
