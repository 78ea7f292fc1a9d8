"""A golden directory (`parity.golden`) read for `pgconv compare` and `verify --candidate`: probes.json validated
field by field (a damaged or hand-edited file is a one-line input error naming it, never a traceback or a read
outside the directory), the case files opened through the regular-file-checked safetensors reader (a FIFO would
block `open` for good) and their tensors loaded only when a comparison row asks for them."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgconv.errors import InputError, json_type

__all__ = ["LazyTensors", "tensor_info", "is_int", "read_golden", "header", "case_files"]

_NAME = re.compile(r"[A-Za-z0-9_.]+")  # probe names and kinds: also safe in every report format
_CASE_DIR = re.compile(r"case\d+")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class LazyTensors(Mapping):
    """Tensors of a safetensors file (`read_safetensors`' SourceTensors) loaded only when asked, a fresh tensor each
    time: a row holds its own golden and dump values and drops them after."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self._t = tensors

    def __getitem__(self, key: str) -> Tensor:
        return self._t[key].load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def info(self, key: str) -> tuple[list[int], torch.dtype]:
        from pgconv.converter.dtypes import torch_dtype

        meta = self._t[key].meta
        return list(meta.shape), torch_dtype(meta.dtype)


def tensor_info(m: Mapping, key: str) -> tuple[list[int], torch.dtype]:
    """(shape, dtype) of a tensor of a mapping, from the header where the mapping is lazy."""
    if isinstance(m, LazyTensors):
        return m.info(key)
    t = m[key]
    return list(t.shape), t.dtype


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_golden(golden_dir: Path) -> dict[str, Any]:
    from pgconv.converter.checkpoint import read_json
    from pgconv.parity.golden import GOLDEN_SCHEMA

    index = golden_dir / "probes.json"
    if not index.is_file():
        raise InputError(f"{golden_dir}: not a golden directory (no probes.json; write one with pgconv golden)")
    doc = read_json(index)
    if not isinstance(doc, dict) or doc.get("golden_schema") != GOLDEN_SCHEMA:
        raise InputError(f"{index}: not a golden schema {GOLDEN_SCHEMA} file")
    _check_doc(index, doc, golden_dir)
    return doc


def _check_doc(index: Path, doc: dict[str, Any], gdir: Path) -> None:
    """Every field of probes.json that compare reads, with its type: a damaged file is one line, not a traceback."""
    from pgconv.parity.verify import DTYPES

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise InputError(f"{index}: {what}")

    need(doc.get("dtype") in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {doc.get('dtype')!r:.60}")
    need(is_int(doc.get("image_token_id")), f"image_token_id must be an integer, got {json_type(doc.get('image_token_id'))}")
    for key in ("family", "checkpoint"):
        need(isinstance(doc.get(key), str), f"{key} must be a string, got {json_type(doc.get(key))}")
    probes, cases = doc.get("probes"), doc.get("cases")
    need(isinstance(probes, list) and bool(probes), f"probes must be a non-empty list, got {json_type(probes)}")
    names: set[str] = set()
    for i, p in enumerate(probes):
        need(isinstance(p, dict), f"probes[{i}] must be an object, got {json_type(p)}")
        name = p.get("name")
        need(isinstance(name, str) and bool(_NAME.fullmatch(name)),
             f"probes[{i}].name must be a probe name (letters, digits, '.', '_'), got {str(name)[:60]!r}")
        need(name not in names, f"probe {name!r} is listed twice")
        need(isinstance(p.get("kind"), str) and bool(_NAME.fullmatch(p["kind"])),
             f"probe {name!r}: kind must be a probe kind, got {str(p.get('kind'))[:60]!r}")
        for key, ok, what in (("teacher_input", lambda v: v is None or isinstance(v, str), "a probe name or null"),
                              ("stack", lambda v: v is None or isinstance(v, str), "a string or null"),
                              ("layer", lambda v: v is None or is_int(v), "an integer or null")):
            need(key in p and ok(p[key]), f"probe {name!r}: {key} must be {what}, got {json_type(p.get(key))}")
        names.add(name)
    for p in probes:
        if p["teacher_input"] is not None and p["teacher_input"] not in names:
            need(False, f"probe {p['name']!r}: teacher_input {p['teacher_input'][:60]!r} is not a probe of the file")
    need(isinstance(cases, list) and bool(cases), f"cases must be a non-empty list, got {json_type(cases)}")
    root = gdir.resolve()
    for i, c in enumerate(cases):
        need(isinstance(c, dict), f"cases[{i}] must be an object, got {json_type(c)}")
        need(is_int(c.get("case")) and c["case"] == i, f"cases[{i}].case must be {i}, got {str(c.get('case'))[:60]}")
        d = c.get("dir")
        need(isinstance(d, str) and bool(_CASE_DIR.fullmatch(d)), f"cases[{i}].dir must be case<k>, got {str(d)[:60]!r}")
        need((gdir / d).resolve().parent == root, f"cases[{i}].dir {d!r} leads outside the golden directory")
        sha = c.get("inputs_sha256")
        need(isinstance(sha, str) and bool(_HEX64.fullmatch(sha)), f"cases[{i}].inputs_sha256 must be 64 hex digits")
        gen = c.get("generation")
        tokens = gen.get("tokens") if isinstance(gen, dict) else None
        need(isinstance(tokens, list) and all(is_int(t) for t in tokens),
             f"cases[{i}].generation.tokens must be a list of integers")
        need(isinstance(c.get("prompt"), str), f"cases[{i}].prompt must be a string")
        need(isinstance(c.get("images"), list) and all(isinstance(x, str) for x in c["images"]),
             f"cases[{i}].images must be a list of paths")


def header(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Header of a safetensors file, regular files only (a FIFO would block `open` for good)."""
    from pgconv.converter.safetensors_io import read_safetensors

    if not path.is_file():
        raise InputError(f"{path}: {'not a regular file' if path.exists() else 'not found'}")
    return read_safetensors(path)


def case_files(gdir: Path, doc: dict[str, Any], k: int) -> tuple[dict[str, Tensor], LazyTensors]:
    """(golden inputs, golden activations read lazily) of case k, both checked against probes.json."""
    from pgconv.parity.golden import INPUT_NAMES, inputs_sha256

    cdir = gdir / doc["cases"][k]["dir"]
    _, inp = header(cdir / "inputs.safetensors")
    lacking = [n for n in INPUT_NAMES if n not in inp]
    if lacking:
        raise InputError(f"{cdir / 'inputs.safetensors'}: lacks {', '.join(lacking)}")
    inputs = {n: inp[n].load() for n in INPUT_NAMES}
    if inputs_sha256(inputs) != doc["cases"][k]["inputs_sha256"]:
        raise InputError(f"{cdir / 'inputs.safetensors'}: does not match inputs_sha256 of case {k} in probes.json")
    _, act = header(cdir / "activations.safetensors")
    lacking = [p["name"] for p in doc["probes"] if p["name"] not in act]
    if lacking:
        raise InputError(f"{cdir / 'activations.safetensors'}: lacks probe(s) of probes.json: "
                         f"{', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}")
    return inputs, LazyTensors(act)
