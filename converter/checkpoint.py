"""Open a checkpoint (directory, weight file, index file) into lazy tensor sources, reading headers only.

A directory resolves as transformers resolves it: `model.safetensors`, else `model.safetensors.index.json`, else
`pytorch_model.bin`, else `pytorch_model.bin.index.json`, else its one weight file. Weight files are read by the reader registered for their suffix in `READERS` (the
big_vision `.npz` reader registers itself there). Paths that come from inside a checkpoint (index entries,
weight files found in a directory) must stay inside `trusted_root` (the checkpoint directory, or the repo's
cache folder for hub downloads, whose snapshots link into `blobs/`): absolute paths, `..` and escaping
symlinks are rejected.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from pgconv.converter.bin_io import read_bin
from pgconv.converter.safetensors_io import read_safetensors
from pgconv.converter.sources import SourceTensor, TensorMeta
from pgconv.errors import InputError, json_type, json_value_error
from pgconv.model.config import PaliGemmaConfig
from pgconv.model.hf_config import from_hf_config

__all__ = ["Checkpoint", "READERS", "INDEX_NAMES", "MANIFEST_NAME", "open_checkpoint", "read_json", "inside"]

Reader = Callable[[Path], tuple[dict[str, str], dict[str, SourceTensor]]]
READERS: dict[str, Reader] = {".safetensors": read_safetensors, ".bin": read_bin}
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PRECEDENCE = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
MANIFEST_NAME = "pgconv-manifest.json"
# Non-weight files that travel with a checkpoint: config, generation config, tokenizer, processor config.
COMPANION_PATTERNS = ("*.json", "tokenizer.model", "*.txt", "*.jinja", "*.md")


@dataclass
class Checkpoint:
    root: Path  # directory holding config.json and the non-weight files
    files: tuple[Path, ...]  # weight files, in index order
    tensors: dict[str, SourceTensor]
    config: dict | None = None  # parsed config.json, None when absent
    index: dict | None = None
    trusted_root: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # __metadata__ of the first weight file

    @property
    def format(self) -> str:
        return self.files[0].suffix.lstrip(".")

    def metas(self) -> dict[str, TensorMeta]:
        return {name: t.meta for name, t in self.tensors.items()}

    def pg_config(self) -> PaliGemmaConfig:
        path = self.root / "config.json"
        if self.config is None:
            raise InputError(f"{path}: missing (a PaliGemma config.json is needed to check the tensors)")
        try:
            return from_hf_config(self.config)
        except InputError as e:
            raise type(e)(f"{path}: {e}") from None

    def companion_files(self) -> list[Path]:
        """Non-weight files to copy along (config, tokenizer, processor and generation configs).

        A companion that is a symlink out of the checkpoint is an error, not a silent skip: the output would lack
        it, and a tokenizer read from elsewhere is input the user did not give (issue 8)."""
        skip = {p.name for p in self.files} | set(INDEX_NAMES) | {MANIFEST_NAME}
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name in skip or not any(fnmatch(p.name, pat) for pat in COMPANION_PATTERNS):
                continue
            if not inside(p, self.trusted_root or self.root):
                raise InputError(f"{p}: resolves outside the checkpoint directory (symlink to {p.resolve()})")
            if p.is_file():
                out.append(p)
            elif p.is_symlink() and not p.exists():
                raise InputError(f"{p}: dangling symlink (the output would lack this file)")
            elif not p.is_dir():  # a FIFO, socket or device: it cannot be copied, and dropping it would go unnoticed
                raise InputError(f"{p}: not a regular file (the output would lack it)")
        return out


def read_json(path: Path) -> object:
    def no_dupes(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise InputError(f"{path}: key {dup!r} appears twice")
        return dict(pairs)

    if path.exists() and not path.is_file():  # a FIFO or device would block or stream forever
        raise InputError(f"{path}: not a regular file")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_dupes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except InputError:  # a duplicate key, from no_dupes (InputError is a ValueError too)
        raise
    except ValueError as e:  # int() of a literal longer than sys.get_int_max_str_digits()
        raise InputError(f"{path}: invalid JSON ({json_value_error(e)})") from None


def resolved(path: Path) -> Path:
    """`path.resolve()`, with a symlink loop (RuntimeError in Python 3.11, OSError later) as an `InputError`."""
    try:
        return path.resolve()
    except RuntimeError:
        raise InputError(f"{path}: symlink loop") from None
    except OSError as e:
        raise InputError(f"{path}: cannot resolve ({e.strerror or e})") from None


def inside(path: Path, root: Path) -> bool:
    return resolved(path).is_relative_to(resolved(root))


def default_trusted_root(root: Path) -> Path:
    """The folder that paths inside the checkpoint at `root` may lead into: `root` itself, or for a huggingface_hub
    cache snapshot (`models--ORG--NAME/snapshots/REV/`, whose files are symlinks to `../../blobs/`) the repo's cache
    folder, whichever way the snapshot was reached (hub id or path)."""
    snapshots = root.parent
    repo = snapshots.parent
    if snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")) and \
            (repo / "blobs").is_dir():
        return repo
    return root


def _member(root: Path, name: object, trusted_root: Path, what: str) -> Path:
    """`root / name` for a name read from inside the checkpoint, refusing anything that leaves `trusted_root`."""
    if not isinstance(name, str) or not name or "\0" in name:  # a NUL byte: ValueError from every os call
        raise InputError(f"{what}: {name!r} is not a file name")
    pure = PurePosixPath(name)
    if not pure.parts:  # "." or "./": the directory itself
        raise InputError(f"{what}: {name!r} is not a file name")
    if pure.is_absolute() or "\\" in name or ":" in pure.parts[0] or ".." in pure.parts:
        raise InputError(f"{what}: path {name!r} points outside the checkpoint directory")
    path = root / pure
    if not inside(path, trusted_root):
        raise InputError(f"{what}: {name!r} resolves outside the checkpoint directory (symlink to {path.resolve()})")
    return path


def _read_weights(path: Path) -> tuple[dict[str, str], dict[str, SourceTensor]]:
    reader = READERS.get(path.suffix)
    if reader is None:
        raise InputError(f"{path}: unsupported weight file type (known: {', '.join(READERS)})")
    if not path.is_file():
        raise InputError(f"{path}: weight file is missing")
    return reader(path)


def _from_index(index_path: Path, trusted_root: Path) -> tuple[tuple[Path, ...], dict[str, SourceTensor], dict, dict]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: no weight_map object")
    root = index_path.parent
    shards: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):  # a list or object would not even be hashable
            raise InputError(f"{index_path}: tensor {tensor!r} maps to {json_type(shard)}, not a file name")
        if shard not in shards:
            shards[shard] = _member(root, shard, trusted_root, f"{index_path}: tensor {tensor!r}")
    tensors: dict[str, SourceTensor] = {}
    metadata: dict[str, str] = {}
    for shard, path in shards.items():
        if not path.is_file():
            raise InputError(f"{index_path}: shard {shard!r} is missing")
        meta, found = _read_weights(path)
        metadata = metadata or meta
        for name, t in found.items():
            if name in tensors:
                raise InputError(f"{index_path}: tensor {name!r} is stored in both {tensors[name].file.name} and {shard}")
            listed = weight_map.get(name)
            if listed is None:
                raise InputError(f"{path}: tensor {name!r} is not listed in {index_path.name}")
            if listed != shard:
                raise InputError(f"{index_path}: tensor {name!r} is listed in {listed} but stored in {shard}")
            tensors[name] = t
    absent = [n for n in weight_map if n not in tensors]
    if absent:
        raise InputError(f"{index_path}: tensor {absent[0]!r} is listed in {weight_map[absent[0]]} but that shard "
                         f"does not hold it ({len(absent)} missing)")
    return tuple(shards.values()), tensors, index, metadata


def open_checkpoint(path: str | Path, *, trusted_root: Path | None = None) -> Checkpoint:
    """Headers of every weight file under `path`, cross-checked against the index; config.json parsed if present."""
    path = Path(path)
    try:
        return _open(path, trusted_root)
    except OSError as e:  # an unreadable directory or file met while listing or probing (readers wrap their own)
        raise InputError(f"{e.filename or path}: cannot read ({e.strerror or e})") from None


def _open(path: Path, trusted_root: Path | None) -> Checkpoint:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    root = path if path.is_dir() else path.parent
    trusted = trusted_root or default_trusted_root(root)
    index = None
    if path.is_dir():
        # transformers' precedence: safetensors before .bin, a single file before an index (a re-save into the same
        # directory leaves the other behind), so that pgconv and transformers read the same weights; `pgconv
        # inspect` lists the ignored file as a problem.
        found = [n for n in PRECEDENCE if (path / n).exists()]
        if found:
            weights = _member(root, found[0], trusted, str(path))
        else:
            candidates = sorted(p for p in path.iterdir() if p.suffix in READERS and p.is_file())
            if len(candidates) != 1:
                what = "no weight files" if not candidates else f"{len(candidates)} weight files and no index"
                raise InputError(f"{path}: {what} (expected model.safetensors or model.safetensors.index.json)")
            weights = _member(root, candidates[0].name, trusted, str(path))
    else:
        weights = path
    if weights.name.endswith(".index.json"):
        files, tensors, index, metadata = _from_index(weights, trusted)
    else:
        metadata, tensors = _read_weights(weights)
        files = (weights,)
    if not tensors:
        raise InputError(f"{weights}: holds no tensors")
    cfg_path = root / "config.json"
    # A dangling or looping link is a broken config.json, not "no config" (exists() is False for both).
    config = read_json(_member(root, "config.json", trusted, str(root))) \
        if cfg_path.exists() or cfg_path.is_symlink() else None
    if config is not None and not isinstance(config, dict):
        raise InputError(f"{cfg_path}: not a JSON object")
    return Checkpoint(root, files, tensors, config, index, trusted, metadata)


def source_spec(path: Path, trusted_root: Path | None, from_: str | Path | None, config: str | Path | None
                ) -> str | Path | None:
    """The spec a conversion reads SRC `path` through, or None to read it as a layout with its own config.json.

    `--from` wins; a `.npz` is big_vision; a checkpoint without config.json is read through the spec of the layout
    its names use, which takes `--config` (a preset or a config.json) or else the one preset its shapes match
    exactly. `--config` next to an existing config.json is an error rather than silently ignored."""
    if from_ is not None:
        return from_
    if path.suffix == ".npz":
        return "big-vision"
    root = path if path.is_dir() else path.parent
    cfg_path = root / "config.json"
    if cfg_path.exists() or cfg_path.is_symlink():  # a dangling link (an interrupted download) is not "no config"
        if config is not None:
            raise InputError(f"--config {config}: {root / 'config.json'} exists; --config is only for sources without "
                             "one (a checkpoint without config.json, --from, .npz)")
        return None
    from pgconv.converter.layouts import detect_layout

    tensors = open_checkpoint(path, trusted_root=trusted_root).tensors  # its errors name their file already
    try:
        return detect_layout(tensors)
    except InputError as e:
        raise type(e)(f"{path}: {e}") from None

