"""Byte-level fuzzing of a valid tiny checkpoint through the CLI (issue 8).

Hypothesis overwrites, inserts, deletes or truncates bytes of one file (a safetensors header or data buffer,
config.json, or the shard index) of the tiny checkpoint, single-file or sharded, and runs the command in-process
under a deadline. Allowed outcomes only:

* success with the right answer, checked against independent readers (the `safetensors` library, `json`):
  convert's output holds exactly the source's tensors, bit for bit (a mutated data byte is carried over
  faithfully, NaN payloads included), and its copied files are byte-identical; inspect's counts and NaN/Inf
  scan match the source's values;
* exit 2 with one `pgconv: error:` line, no output directory, no temporary litter, the source untouched.

Never a traceback, a hang, or a silently wrong result. The reader-only fuzz is test_safetensors_io.py.
`PGCONV_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py` hunts longer with random (not derandomized) examples.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from reliability_helpers import (litter, no_hang, npz_checkpoint, run_cli, sharded_checkpoint, tiny_checkpoint,
                                 tree_digest)
from pgconv.converter.layouts import LAYOUTS, key_map
from pgconv.model.hf_config import from_hf_config

INDEX = "model.safetensors.index.json"
JSON_BYTES = b'0123456789"{}[],:.-eE tfn'  # replacement bytes that often keep JSON valid but change its meaning
# CI runs a fixed, fast sample; PGCONV_FUZZ_EXAMPLES=N runs N random examples per test (a longer local hunt).
_HUNT = int(os.environ.get("PGCONV_FUZZ_EXAMPLES", "0"))
FUZZ = settings(deadline=None, max_examples=_HUNT or 60, derandomize=not _HUNT, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def examples(n: int) -> settings:
    return settings(FUZZ, max_examples=_HUNT or n)


# -- mutations ------------------------------------------------------------------------------------------------------

@st.composite
def mutation(draw, files: dict[str, bytes]) -> tuple[str, bytes, str]:
    """(file name, mutated content, description) for one file of the checkpoint."""
    name = draw(st.sampled_from(sorted(files)))
    raw = bytearray(files[name])
    if name.endswith(".safetensors"):
        (n,) = struct.unpack("<Q", raw[:8])
        region = draw(st.sampled_from(["length", "header", "header", "data", "data", "data"]))
        lo, hi = {"length": (0, 8), "header": (8, 8 + n), "data": (8 + n, len(raw))}[region]
        alphabet = JSON_BYTES if region == "header" else None
    else:
        region, (lo, hi), alphabet = "json", (0, len(raw)), JSON_BYTES
    # Overwrites dominate: in a data buffer they keep the file valid, so the output must carry the new bytes.
    kind = draw(st.sampled_from(["overwrite"] * 4 + ["insert", "delete", "truncate"]))
    if kind == "truncate":
        cut = draw(st.integers(0, len(raw) - 1))
        return name, bytes(raw[:cut]), f"{name}: truncated to {cut} bytes"
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(lo, max(lo, min(hi, len(raw)) - 1)))
        byte = draw(st.sampled_from(alphabet)) if alphabet and draw(st.booleans()) else draw(st.integers(0, 255))
        if kind == "overwrite" and pos < len(raw):
            raw[pos] = byte
        elif kind == "insert":
            raw.insert(pos, byte)
        elif pos < len(raw):
            del raw[pos]
        edits.append((pos, byte))
    return name, bytes(raw), f"{name} ({region}): {kind} {edits}"


def _checkpoint(factory, sharded: bool) -> Path:
    return sharded_checkpoint(factory) if sharded else tiny_checkpoint(factory)


def _mutable_files(src: Path) -> dict[str, bytes]:
    names = [p.name for p in src.iterdir() if p.suffix == ".safetensors" or p.name in ("config.json", INDEX)]
    return {n: (src / n).read_bytes() for n in names}


def _damaged_copy(base: Path, parent: Path, name: str, content: bytes) -> Path:
    src = Path(tempfile.mkdtemp(dir=parent)) / "src"
    shutil.copytree(base, src)
    (src / name).write_bytes(content)
    return src


# -- independent oracle ---------------------------------------------------------------------------------------------

def _reference_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory through the safetensors library (raises on anything it rejects)."""
    out: dict[str, torch.Tensor] = {}
    index = directory / INDEX
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    for f in files:
        with safe_open(directory / f, "pt") as s:
            for k in s.keys():
                assert k not in out, f"{k} in two files"
                out[k] = s.get_tensor(k)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _assert_bad_input(res, src: Path, before: dict, parent: Path, description: str) -> None:
    assert res.code == 2, (description, res.code, res.err[-3000:])
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgconv: error: ") and "Traceback" not in res.err, \
        (description, res.err[-3000:])
    assert tree_digest(src) == before, description
    assert litter(src.parent) == [], description


# -- convert --------------------------------------------------------------------------------------------------------

@FUZZ
@given(data=st.data(), sharded=st.booleans(), target=st.sampled_from(["hf-legacy", "native", "hf-5.6"]),
       check=st.booleans())
def test_fuzzed_checkpoints_convert_correctly_or_fail_cleanly(tmp_path_factory, tmp_path, capsys, data, sharded,
                                                             target, check):
    base = _checkpoint(tmp_path_factory, sharded)
    name, content, description = data.draw(mutation(_mutable_files(base)))
    src = _damaged_copy(base, tmp_path, name, content)
    before = tree_digest(src)
    dst = src.parent / "dst"
    argv = ["convert", src, dst, "--to", target, "--quiet"] + (["--check"] if check else [])
    with no_hang():
        res = run_cli(argv, capsys)
    event(f"exit {res.code}")
    if res.code != 0:
        _assert_bad_input(res, src, before, src.parent, description)
        assert not dst.exists(), description
        return
    assert tree_digest(src) == before and litter(src.parent) == []
    assert_converted_faithfully(src, dst, target, description)


def assert_converted_faithfully(src: Path, dst: Path, target: str, description: str = "") -> None:
    """The source is a valid checkpoint for independent readers, and `dst` holds exactly its tensors, bit for bit,
    under `target`'s names (a tied lm_head dropped), with config.json and tokenizer.json copied byte for byte."""
    source = _reference_tensors(src)
    cfg = from_hf_config(json.loads((src / "config.json").read_text()))
    src_names = key_map(cfg, "hf-legacy", with_lm_head=True)
    dst_names = key_map(cfg, target, with_lm_head=True)
    expected = {dst_names[native]: source[theirs] for native, theirs in src_names.items() if theirs in source}
    if cfg.tie_word_embeddings:
        expected.pop(LAYOUTS[target].lm_head, None)
    written = _reference_tensors(dst)
    assert written.keys() == expected.keys(), description
    for k, t in expected.items():
        assert written[k].dtype == t.dtype and written[k].shape == t.shape, (description, k)
        assert torch.equal(_bits(written[k]), _bits(t)), (description, k)
    for companion in ("config.json", "tokenizer.json"):
        assert (dst / companion).read_bytes() == (src / companion).read_bytes(), (description, companion)


# -- inspect --------------------------------------------------------------------------------------------------------

def _nonfinite(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    out = {}
    for k, t in tensors.items():
        if t.is_floating_point():
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if nan or inf:
                out[k] = {"nan": nan, "inf": inf}
    return out


@FUZZ
@given(data=st.data(), sharded=st.booleans())
def test_fuzzed_checkpoints_inspect_truthfully_or_fail_cleanly(tmp_path_factory, tmp_path, capsys, data, sharded):
    base = _checkpoint(tmp_path_factory, sharded)
    name, content, description = data.draw(mutation(_mutable_files(base)))
    src = _damaged_copy(base, tmp_path, name, content)
    before = tree_digest(src)
    with no_hang():
        res = run_cli(["inspect", src, "--scan", "--json"], capsys)
    event(f"exit {res.code}")
    if res.code == 2:
        _assert_bad_input(res, src, before, src.parent, description)
        return
    assert res.code in (0, 1) and not res.err.strip(), (description, res.code, res.err[-3000:])
    report = json.loads(res.out)
    source = _reference_tensors(src)
    assert report["tensors"] == len(source), description
    assert report["dtypes"] == dict(sorted(Counter(
        {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(t.dtype, str(t.dtype))
        for t in source.values()).items())), description
    assert report["nonfinite"] == _nonfinite(source), description
    assert (res.code == 1) == bool(report["problems"]), description
    assert tree_digest(src) == before


# -- verify (slow per example: fewer of them) -----------------------------------------------------------------------

@examples(4)
@given(data=st.data())
def test_fuzzed_checkpoints_verify_or_fail_cleanly(tmp_path_factory, tmp_path, capsys, data):
    base = _checkpoint(tmp_path_factory, True)
    files = _mutable_files(base)
    name, content, description = data.draw(mutation(files))
    assume(content != files[name])
    src = _damaged_copy(base, tmp_path, name, content)
    before = tree_digest(src)
    with no_hang(120):
        res = run_cli(["verify", src, "--max-new-tokens", "1", "--probes", "coarse"], capsys)
    event(f"exit {res.code}")
    if res.code == 2:
        _assert_bad_input(res, src, before, src.parent, description)
        return
    assert res.code in (0, 1) and "Traceback" not in res.err, (description, res.err[-3000:])
    verdict = res.out.strip().splitlines()[-1]
    assert verdict.startswith("PASS" if res.code == 0 else "FAIL"), (description, verdict)
    _reference_tensors(src)  # verify accepted it: so must the safetensors library
    assert tree_digest(src) == before


# -- big_vision .npz -------------------------------------------------------------------------------------------------

@examples(25)
@given(data=st.data())
def test_fuzzed_npz_converts_faithfully_or_fails_cleanly(tmp_path_factory, tmp_path, capsys, data):
    """Mutated bytes of a big_vision .npz (zip structure, .npy headers, array data): `convert --to hf-legacy`
    fails with one line, or succeeds and converting back gives exactly what numpy reads from the mutated file."""
    base = npz_checkpoint(tmp_path_factory)
    raw = bytearray(base.read_bytes())
    kind = data.draw(st.sampled_from(["overwrite"] * 4 + ["truncate", "delete"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            pos = data.draw(st.integers(0, len(raw) - 1))
            if kind == "overwrite":
                raw[pos] = data.draw(st.integers(0, 255))
            else:
                del raw[pos]
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    src = work / "src.npz"
    src.write_bytes(bytes(raw))
    with no_hang():
        res = run_cli(["convert", src, work / "hf", "--to", "hf-legacy", "--config", "tiny", "--quiet"], capsys)
    event(f"exit {res.code}")
    if res.code != 0:
        assert res.code == 2 and res.err.count("\n") == 1 and res.err.startswith("pgconv: error: "), res.err[-3000:]
        assert not (work / "hf").exists() and litter(work) == [] and src.read_bytes() == bytes(raw)
        return
    with no_hang():
        back = run_cli(["convert", work / "hf", work / "back.npz", "--to", "big-vision", "--quiet"], capsys)
    assert back.code == 0, back.err
    import numpy as np

    with np.load(src) as want, np.load(work / "back.npz") as got:  # numpy as the independent reader
        assert sorted(got.files) == sorted(want.files)
        for k in want.files:
            a, b = want[k], got[k]
            assert a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize, k
            assert np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)), k


# -- torch .bin ------------------------------------------------------------------------------------------------------

@examples(30)
@given(data=st.data(), command=st.sampled_from(["convert", "inspect"]))
def test_fuzzed_bin_loads_faithfully_or_fails_cleanly(tmp_path_factory, tmp_path, capsys, data, command):
    """Mutated bytes of a `pytorch_model.bin` (zip records, pickle, storages) through the weights-only loader: a
    one-line exit 2, or exactly what torch.load(weights_only=True) reads from the mutated file."""
    base = tmp_path_factory.getbasetemp() / "reliability-tiny-bin"
    if not base.exists():
        from safetensors.torch import load_file

        tmp = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
        shutil.copytree(tiny_checkpoint(tmp_path_factory), tmp / "ck")
        torch.save(load_file(tmp / "ck" / "model.safetensors"), tmp / "ck" / "pytorch_model.bin")
        (tmp / "ck" / "model.safetensors").unlink()
        (tmp / "ck").rename(base)
    raw = bytearray((base / "pytorch_model.bin").read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    src = _damaged_copy(base, tmp_path, "pytorch_model.bin", bytes(raw))
    before = tree_digest(src)
    dst = src.parent / "dst"
    argv = ["convert", src, dst, "--to", "hf-legacy", "--quiet"] if command == "convert" else ["inspect", src, "--json"]
    with no_hang():
        res = run_cli(argv, capsys)
    event(f"{command} exit {res.code}")
    if res.code == 2:
        _assert_bad_input(res, src, before, src.parent, "bin")
        assert not dst.exists()
        return
    assert res.code in ((0,) if command == "convert" else (0, 1)) and not res.err.strip(), res.err[-3000:]
    want = torch.load(src / "pytorch_model.bin", weights_only=True)  # the independent reader accepts it too
    if command == "inspect":
        assert json.loads(res.out)["tensors"] == len(want)
        return
    written = _reference_tensors(dst)
    assert written.keys() == want.keys()
    for k, t in want.items():
        assert written[k].dtype == t.dtype and torch.equal(_bits(written[k]), _bits(t.contiguous())), k


# -- the oracle is not vacuous ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["data byte", "missing tensor", "config"])
def test_oracle_catches_a_silently_wrong_output(tmp_path_factory, tmp_path, where):
    """The convert oracle is not vacuous: it accepts a real conversion and rejects one byte of damage in it."""
    from safetensors.torch import load_file, save_file

    from pgconv.converter.convert import convert

    src = tiny_checkpoint(tmp_path_factory)
    dst = tmp_path / "dst"
    convert(src, dst, to="native", quiet=True)
    assert_converted_faithfully(src, dst, "native")
    if where == "data byte":
        raw = bytearray((dst / "model.safetensors").read_bytes())
        raw[-1] ^= 0x01
        (dst / "model.safetensors").write_bytes(bytes(raw))
    elif where == "missing tensor":
        sd = load_file(dst / "model.safetensors")
        sd.pop("projector.bias")
        save_file(sd, dst / "model.safetensors")
    else:
        (dst / "config.json").write_text((src / "config.json").read_text().replace("1e-06", "1e-07"))
    with pytest.raises(AssertionError):
        assert_converted_faithfully(src, dst, "native")
