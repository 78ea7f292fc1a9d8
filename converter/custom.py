"""Spec-defined formats on disk (big_vision `.npz`, user formats): read as native tensors, write from them.

Reading (`open_spec_checkpoint`): index the file from headers only (npz: zip + `.npy` headers; safetensors: its
header), pick the config (`config`: a preset name or a config.json path; else a config.json next to the file;
else the one preset whose shapes the file has exactly), bind the spec, check the file's names, shapes and
dtypes, and return a `Checkpoint` whose tensors are the *native* tensors, each a lazy `SourceTensor` (a raw byte
span when it is a plain slice of the file). The converter plans and writes those like any native checkpoint.

Writing (`convert_to_spec`): native tensors (from any layout or spec) -> the spec's file tensors, streamed one
tensor (one layer slice for stacked tensors) at a time into `.npz` (a single file) or safetensors (a directory
with `model.safetensors`, `config.json` and `pgconv-manifest.json`), in a temporary sibling renamed at the end.

Provenance: written files record the format name, the spec digest and the spec's numeric offsets (npz: the zip
comment, which np.load ignores; safetensors: `__metadata__`). Reading a file as a different format than the one
that wrote it with offsets is refused, so an offset can never be applied twice.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from pgconv.converter.checkpoint import Checkpoint, open_checkpoint, read_json
from pgconv.converter.npz import BFLOAT16, NpzReader, to_torch
from pgconv.converter.dtypes import itemsize, torch_dtype
from pgconv.converter.sources import CHUNK_BYTES, SourceTensor, TensorMeta
from pgconv.converter.spec import Spec, load_spec
from pgconv.converter.spec_bind import BoundSpec, bind
from pgconv.converter.spec_ops import Shape, SpecError
from pgconv.errors import InputError
from pgconv.model.config import PRESETS, PaliGemmaConfig
from pgconv.model.hf_config import from_hf_config, to_hf_config

__all__ = ["SpecCheckpoint", "RowsSource", "open_spec_checkpoint", "resolve_config", "infer_preset", "provenance",
           "check_provenance"]

_NP_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


# ---------------------------------------------------------------------------------------------------------------
# Provenance


def provenance(bound: BoundSpec) -> dict[str, str]:
    out = {"pgconv.format": bound.spec.name, "pgconv.spec_digest": bound.spec.digest}
    if bound.offsets:
        out["pgconv.offsets"] = json.dumps(bound.offsets, sort_keys=True)  # native = file + c
    return {**out, **dict(bound.spec.metadata)}


def check_provenance(metadata: dict[str, str], reading_as: Spec | str, has_offsets: bool, where: str) -> None:
    """Refuse to read a file as another format than the one that wrote it when either side carries offsets."""
    fmt = metadata.get("pgconv.format")
    if fmt is None:
        return
    name = reading_as.name if isinstance(reading_as, Spec) else reading_as
    same = fmt == name and (not isinstance(reading_as, Spec) or metadata.get("pgconv.spec_digest") == reading_as.digest)
    written = metadata.get("pgconv.offsets")
    if not same and (written or has_offsets):
        what = f"with offsets {written} (native = file + c)" if written else "without offsets"
        raise InputError(f"{where}: written by pgconv as format {fmt!r} {what}; reading it as {name!r} "
                         f"{'(which adds offsets) ' if has_offsets else ''}would apply an offset twice or miss "
                         f"one; read it with the spec that wrote it (--from)")


# ---------------------------------------------------------------------------------------------------------------
# Reading


class _Npz:
    def __init__(self, path: Path):
        self.reader = NpzReader(path)
        self.files = (path,)
        try:
            self.metadata = json.loads(self.reader.comment or b"{}")
        except (ValueError, RecursionError):  # also a too-long integer literal, which json raises as ValueError
            self.metadata = {}  # a comment someone else wrote: not ours
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            self.metadata = {}  # JSON, but not our provenance either
        self.shapes = {n: m.shape for n, m in self.reader.members.items()}

    def file_of(self, name: str) -> Path:
        return self.files[0]

    def dtype(self, name: str) -> str:
        m = self.reader.member(name)  # raises InputError for non-float members
        return "BF16" if m.dtype == BFLOAT16 else _NP_CODES[m.dtype.name]

    def read(self, name: str, k: int | None):
        return to_torch(self.reader.read(name, k))

    def span(self, name: str, k: int | None) -> tuple[int, int] | None:
        m = self.reader.members[name]
        if m.compressed or m.fortran_order:
            return None
        self.reader.verify(name)  # these bytes are copied raw: check the member's CRC-32 first
        if k is None:
            return m.data_offset, m.data_offset + m.nbytes
        step = m.nbytes // m.shape[0]
        return m.data_offset + k * step, m.data_offset + (k + 1) * step


class _Safetensors:
    def __init__(self, path: Path):
        self.ckpt = open_checkpoint(path)
        self.files = self.ckpt.files
        self.metadata = self.ckpt.metadata
        self.shapes = {n: t.meta.shape for n, t in self.ckpt.tensors.items()}

    def file_of(self, name: str) -> Path:
        return self.ckpt.tensors[name].file

    def dtype(self, name: str) -> str:
        return self.ckpt.tensors[name].meta.dtype

    def _slice(self, name: str, k: int | None) -> SourceTensor:
        t = self.ckpt.tensors[name]
        if k is None:
            return t
        begin, end = self.span(name, k)
        return SourceTensor(TensorMeta(f"{name}[{k}]", t.meta.shape[1:], t.meta.dtype), t.file, span=(begin, end))

    def read(self, name: str, k: int | None):
        return self._slice(name, k).load()

    def span(self, name: str, k: int | None) -> tuple[int, int] | None:
        t = self.ckpt.tensors[name]
        if t.span is None or k is None:
            return t.span
        step = t.meta.nbytes // t.meta.shape[0]
        return t.span[0] + k * step, t.span[0] + (k + 1) * step


def infer_preset(spec: Spec, found: dict[str, Shape], where: str) -> str:
    """The one preset whose expected file tensors and shapes equal `found` exactly; otherwise an error listing
    the closest presets and how many tensors each gets wrong."""
    scores = []
    for name, cfg in PRESETS.items():
        try:
            expected = bind(spec, cfg).file_shapes
        except SpecError:
            continue
        wrong = len(set(expected) ^ set(found)) + sum(found[n] != s for n, s in expected.items() if n in found)
        scores.append((wrong, name))
    exact = [n for w, n in scores if w == 0]
    if len(exact) == 1:
        return exact[0]
    if exact:
        raise InputError(f"{where}: shapes match several presets ({', '.join(exact)}); pass --config")
    near = ", ".join(f"{n} ({w} tensor(s) differ)" for w, n in sorted(scores)[:3])
    raise InputError(f"{where}: no preset has exactly these {spec.name} tensor shapes (closest: {near}); pass --config "
                     "with a preset name or a config.json")


def resolve_config(config: str | Path | PaliGemmaConfig | None, spec: Spec, found: dict[str, Shape], where: str,
                   root: Path | None = None) -> PaliGemmaConfig:
    """The config to read a spec-format file with (see the module docstring for the order)."""
    if isinstance(config, PaliGemmaConfig):
        return config
    if config is not None and str(config) in PRESETS:
        return PRESETS[str(config)]
    path = Path(config) if config is not None else (root / "config.json" if root else None)
    if path is not None and path.is_file():
        data = read_json(path)
        try:
            return from_hf_config(data if isinstance(data, dict) else {})
        except InputError as e:
            raise type(e)(f"{path}: {e}") from None
    if config is not None:
        raise InputError(f"--config {config}: neither a preset ({', '.join(PRESETS)}) nor a config.json file")
    return PRESETS[infer_preset(spec, found, where)]


@dataclasses.dataclass(frozen=True, eq=False)
class RowsSource(SourceTensor):
    """A tensor that is the first rows of a raw file tensor followed by zero rows (a vocabulary pad or cut),
    streamed in chunks: the file rows are read piecewise and the zero rows generated, so neither the file tensor
    nor the result is ever whole in memory (the 257152 x D embedding is the largest big_vision tensor)."""

    file_span: tuple[int, int] = (0, 0)
    file_rows: int = 0
    allow_cut: bool = False

    def chunks(self, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        row_bytes = (self.file_span[1] - self.file_span[0]) // max(self.file_rows, 1)
        keep = min(self.file_rows, self.meta.shape[0])
        dtype = self.meta.dtype
        head = SourceTensor(TensorMeta(self.name, (keep * row_bytes // itemsize(dtype),), dtype), self.file,
                            span=(self.file_span[0], self.file_span[0] + keep * row_bytes))
        yield from head.chunks(max_bytes)
        if self.file_rows > keep:  # slice_rows: the dropped file rows must be zero padding, checked as they pass
            tail = SourceTensor(TensorMeta(self.name, ((self.file_rows - keep) * row_bytes // itemsize(dtype),), dtype),
                                self.file, span=(self.file_span[0] + keep * row_bytes, self.file_span[1]))
            for piece in tail.chunks(max_bytes):
                if not self.allow_cut and bool(piece.view(torch.uint8).ne(0).any()):
                    raise InputError(f"{self.file}: rows {keep}.. of the file tensor behind {self.name!r} would be "
                                     "cut but are not zero padding; pass --allow-vocab-cut (allow_cut=True)")
        zeros = (self.meta.shape[0] - keep) * row_bytes // itemsize(dtype)
        step = max(1, max_bytes // itemsize(dtype))
        for start in range(0, zeros, step):
            yield torch.zeros(min(step, zeros - start), dtype=torch_dtype(dtype))


@dataclasses.dataclass
class SpecCheckpoint(Checkpoint):
    """A checkpoint read through a spec: `tensors` are native tensors; the config comes with it."""

    cfg: PaliGemmaConfig | None = None
    spec: Spec | None = None
    companions: bool = False  # copy config/tokenizer files found next to the source (a directory source)

    def pg_config(self) -> PaliGemmaConfig:
        return self.cfg

    def companion_files(self) -> list[Path]:
        return [p for p in super().companion_files() if p.name != "config.json"] if self.companions else []


def open_spec_checkpoint(path: str | Path, spec: str | Path | Spec = "big-vision",
                         config: str | Path | PaliGemmaConfig | None = None, *, allow_cut: bool = False,
                         npz_suffix: bool = True) -> SpecCheckpoint:
    """Open `path` (a `.npz`, a safetensors file or directory) through `spec` as native tensors (no data read).
    `npz_suffix=False` lets `--check` read an `.npz` output under its temporary name."""
    path = Path(path)
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    src = _Npz(path) if spec.format == "npz" else _Safetensors(path)
    if spec.format == "npz" and npz_suffix and path.suffix != ".npz":
        raise InputError(f"{path}: spec {spec.name!r} reads .npz files")
    # Training checkpoints nest the weights under the spec's prefix (big_vision "params/", next to "opt/...");
    # released ones are often bare.
    prefix = spec.prefix if spec.prefix and any(n.startswith(spec.prefix) for n in src.shapes) else ""
    found = {n: s for n, s in src.shapes.items() if n.startswith(prefix)}
    spec_here = dataclasses.replace(spec, prefix=prefix)
    cfg = resolve_config(config, spec_here, found, str(path), path if path.is_dir() else path.parent)
    try:
        bound = bind(spec_here, cfg, allow_cut=allow_cut)
    except SpecError as e:
        raise type(e)(f"{path}: {e}") from None
    bound.check_file(found, str(path))
    check_provenance(src.metadata, spec, bool(bound.offsets), str(path))
    dtypes = {name: src.dtype(name) for name in bound.file_shapes}
    natives = bound.native_tensors(src.read, src.span)
    tensors = {}
    for name, nt in natives.items():
        codes = {dtypes[s] for s in nt.sources}
        if len(codes) != 1:
            raise InputError(f"{path}: {name!r} is made from tensors of different dtypes ({', '.join(nt.sources)})")
        meta = TensorMeta(name, nt.shape, codes.pop())
        if nt.rows_of is not None:
            tensors[name] = RowsSource(meta, src.file_of(nt.sources[0]), loader=nt.load, file_span=nt.rows_of[0],
                                       file_rows=nt.rows_of[1], allow_cut=allow_cut)
        else:
            tensors[name] = SourceTensor(meta, src.file_of(nt.sources[0]), span=nt.span, loader=nt.load)
    top = max(set(dtypes.values()), key=list(dtypes.values()).count)
    hf = to_hf_config(cfg, dtype={"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(top, "float32"))
    return SpecCheckpoint(root=path if path.is_dir() else path.parent, files=tuple(src.files), tensors=tensors,
                          config=hf, metadata=dict(src.metadata), cfg=cfg, spec=spec, companions=path.is_dir())
