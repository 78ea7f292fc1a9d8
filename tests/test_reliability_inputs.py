"""Issue 8 catalogue, end to end through the CLI: every broken checkpoint gives exit 2 and one line naming the file
and the tensor or key, for convert, inspect, verify and generate; no output is left behind and the source is
untouched. Reader-level variants of the same cases (and a reader byte fuzz) live in test_safetensors_io.py; the
CLI fuzz is test_fuzz.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from reliability_helpers import (assert_one_line_error, edit_header, fresh_copy, litter, read_header, run_cli,
                                 sharded_checkpoint, tiny_checkpoint, tree_digest, write_raw)

EMBED = "language_model.model.embed_tokens.weight"
BIAS = "multi_modal_projector.linear.bias"
HEAD = "language_model.lm_head.weight"
ST = "model.safetensors"


def _order(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


# -- safetensors file damage (single-file checkpoint) -------------------------------------------------------------

def _truncated(d: Path) -> list[str]:
    raw = (d / ST).read_bytes()
    (d / ST).write_bytes(raw[:-100])
    return [ST, "truncated"]


def _header_longer_than_file(d: Path) -> list[str]:
    header, data = read_header(d / ST)
    write_raw(d / ST, header, data, declared=(d / ST).stat().st_size)
    return [ST, "larger than the file"]


def _header_over_100mb(d: Path) -> list[str]:
    header, data = read_header(d / ST)
    write_raw(d / ST, header, data, declared=100_000_001)
    return [ST, "100 MB"]


def _malformed_json(d: Path) -> list[str]:
    header, data = read_header(d / ST)
    text = json.dumps(header).encode()
    write_raw(d / ST, text[:-1] + b",", data)  # the closing brace becomes a dangling comma
    return [ST, "not valid JSON"]


def _duplicate_key(d: Path) -> list[str]:
    header, data = read_header(d / ST)
    first, second = _order(header)[:2]
    text = json.dumps(header).replace(json.dumps(second) + ":", json.dumps(first) + ":")
    write_raw(d / ST, text.encode(), data)
    return [ST, repr(first), "twice"]


def _unknown_dtype(d: Path) -> list[str]:
    def edit(h):
        h[BIAS]["dtype"] = "Q4_K"
        return h
    edit_header(d / ST, edit)
    return [ST, BIAS, "unknown dtype"]


def _overlap(d: Path) -> list[str]:
    header, _ = read_header(d / ST)
    victim = _order(header)[3]

    def edit(h):
        h[victim]["data_offsets"] = [o - 4 for o in h[victim]["data_offsets"]]
        return h
    edit_header(d / ST, edit)
    return [ST, victim, "overlaps"]


def _hole(d: Path) -> list[str]:
    header, data = read_header(d / ST)
    last = _order(header)[-1]
    header[last]["data_offsets"] = [o + 4 for o in header[last]["data_offsets"]]
    write_raw(d / ST, header, data + b"\0" * 4)
    return [ST, last, "hole"]


def _zero_length(d: Path) -> list[str]:
    (d / ST).write_bytes(b"")
    return [ST, "0 bytes"]


# -- model-level problems (readable file, wrong content) ----------------------------------------------------------

def _tensors(d: Path, edit: Callable[[dict], None]) -> None:
    sd = load_file(d / ST)
    edit(sd)
    save_file(sd, d / ST, metadata={"format": "pt"})


def _missing_tensor(d: Path) -> list[str]:
    _tensors(d, lambda sd: sd.pop(BIAS))
    return [str(d), BIAS, "missing"]


def _unexpected_tensor(d: Path) -> list[str]:
    _tensors(d, lambda sd: sd.update({"vision_tower.extra.weight": torch.zeros(3)}))
    return [str(d), "vision_tower.extra.weight", "unexpected"]


def _wrong_shape(d: Path) -> list[str]:
    _tensors(d, lambda sd: sd.update({BIAS: torch.zeros(71)}))
    return [str(d), BIAS, "[71]", "config implies [72]"]


def _tied_differ(d: Path) -> list[str]:
    _tensors(d, lambda sd: sd.update({HEAD: sd[EMBED] + 1}))
    return [ST, HEAD, "differs"]


def _config(d: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _config_missing(d: Path) -> list[str]:
    (d / "config.json").unlink()
    return ["config.json", "missing"]


def _config_invalid_json(d: Path) -> list[str]:
    (d / "config.json").write_text('{"model_type": "paligemma",')
    return ["config.json", "invalid JSON"]


def _config_not_object(d: Path) -> list[str]:
    (d / "config.json").write_text("[1, 2, 3]")
    return ["config.json", "not a JSON object"]


def _config_unknown_model_type(d: Path) -> list[str]:
    _config(d, lambda c: c.update(model_type="llava"))
    return ["config.json", "model_type", "llava"]


def _config_contradicts_weights(d: Path) -> list[str]:
    _config(d, lambda c: c["text_config"].update(intermediate_size=128))
    return [str(d), "language_model.model.layers.0.mlp.", "config implies"]


def _config_fewer_layers(d: Path) -> list[str]:
    _config(d, lambda c: c["vision_config"].update(num_hidden_layers=1))
    return [str(d), "vision_tower.vision_model.encoder.layers.1.", "unexpected"]


SINGLE = {
    "safetensors truncated data": _truncated,
    "safetensors header length > file": _header_longer_than_file,
    "safetensors header > 100 MB": _header_over_100mb,
    "safetensors malformed JSON": _malformed_json,
    "safetensors duplicate key": _duplicate_key,
    "safetensors unknown dtype": _unknown_dtype,
    "safetensors overlapping offsets": _overlap,
    "safetensors hole": _hole,
    "safetensors zero-length file": _zero_length,
    "model missing tensor": _missing_tensor,
    "model unexpected tensor": _unexpected_tensor,
    "model wrong shape": _wrong_shape,
    "model tied weights differ": _tied_differ,
    "config.json missing": _config_missing,
    "config.json invalid JSON": _config_invalid_json,
    "config.json not an object": _config_not_object,
    "config.json unknown model_type": _config_unknown_model_type,
    "config.json contradicts weight shapes": _config_contradicts_weights,
    "config.json contradicts layer count": _config_fewer_layers,
}
# inspect describes a readable checkpoint instead of refusing it: these are problems in its report (exit 1).
INSPECT_REPORTS = {"model missing tensor", "model unexpected tensor", "model wrong shape", "model tied weights differ",
                   "config.json missing",
                   "config.json unknown model_type", "config.json contradicts weight shapes",
                   "config.json contradicts layer count"}


# -- index damage (sharded checkpoint) ----------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"


def _index(d: Path, edit: Callable[[dict], None]) -> None:
    idx = json.loads((d / INDEX).read_text())
    edit(idx["weight_map"])
    (d / INDEX).write_text(json.dumps(idx))


def _shards(d: Path) -> list[str]:
    return sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))


def _missing_shard(d: Path) -> list[str]:
    gone = _shards(d)[1]
    (d / gone).unlink()
    return [INDEX, gone, "missing"]


def _tensor_in_two_shards(d: Path) -> list[str]:
    a, b = _shards(d)[:2]
    first = load_file(d / a)
    name = sorted(first)[0]
    second = load_file(d / b)
    second[name] = first[name]
    save_file(second, d / b, metadata={"format": "pt"})
    return [INDEX, name, "stored in"]  # "stored in both", or "listed in A but stored in B" when B is read first


def _tensor_not_in_index(d: Path) -> list[str]:
    _index(d, lambda wm: wm.pop(BIAS))
    return [BIAS, "not listed"]


def _traversal(d: Path) -> list[str]:
    shard = _shards(d)[0]
    fresh = d.parent / shard
    fresh.write_bytes((d / shard).read_bytes())  # a real file waits outside: only the check stops it
    _index(d, lambda wm: wm.update({k: f"../{shard}" for k, v in wm.items() if v == shard}))
    return [INDEX, f"../{shard}", "outside the checkpoint"]


def _absolute(d: Path) -> list[str]:
    shard = _shards(d)[0]
    outside = d.parent / ("abs-" + shard)
    outside.write_bytes((d / shard).read_bytes())
    _index(d, lambda wm: wm.update({k: str(outside) for k, v in wm.items() if v == shard}))
    return [INDEX, str(outside), "outside the checkpoint"]


def _escaping_symlink(d: Path) -> list[str]:
    shard = _shards(d)[0]
    outside = d.parent / ("link-" + shard)
    (d / shard).rename(outside)
    (d / shard).symlink_to(outside)
    return [INDEX, shard, "resolves outside"]


def _index_not_json(d: Path) -> list[str]:
    (d / INDEX).write_text("{weight_map: nope}")
    return [INDEX, "invalid JSON"]


SHARDED = {
    "index missing shard": _missing_shard,
    "index tensor in two shards": _tensor_in_two_shards,
    "index tensor in a shard but not the index": _tensor_not_in_index,
    "index traversal path": _traversal,
    "index absolute path": _absolute,
    "index escaping symlink": _escaping_symlink,
    "index invalid JSON": _index_not_json,
}


def _damaged(tmp_path_factory, tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    if case in SHARDED:
        src = fresh_copy(sharded_checkpoint(tmp_path_factory), tmp_path / "src")
        return src, SHARDED[case](src)
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    return src, SINGLE[case](src)


CASES = list(SINGLE) + list(SHARDED)


@pytest.mark.parametrize("case", CASES)
def test_convert_refuses_with_one_line_and_leaves_nothing(tmp_path_factory, tmp_path, capsys, case):
    src, needles = _damaged(tmp_path_factory, tmp_path, case)
    before = tree_digest(src)
    outside = sorted(p.name for p in tmp_path.iterdir())
    res = run_cli(["convert", src, tmp_path / "dst", "--to", "native", "--quiet"], capsys)
    if case == "config.json missing":  # convert reads it as the one preset its shapes match (or --config)
        assert res.code == 0 and (tmp_path / "dst" / "config.json").is_file(), res.err
        assert tree_digest(src) == before
        return
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "dst").exists() and litter(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == outside
    assert tree_digest(src) == before


@pytest.mark.parametrize("case", CASES)
def test_inspect_refuses_or_reports(tmp_path_factory, tmp_path, capsys, case):
    src, needles = _damaged(tmp_path_factory, tmp_path, case)
    before = tree_digest(src)
    res = run_cli(["inspect", src], capsys)
    if case in INSPECT_REPORTS:  # a readable checkpoint with problems: listed in the report, exit 1
        assert res.code == 1 and "Traceback" not in res.err, res.err
        problems = [line for line in res.out.splitlines() if line.startswith("problem:")]
        assert problems and any(all(n in p for n in needles if n not in (str(src), ST)) for p in problems), res.out
    else:
        assert_one_line_error(res, *needles)
    assert tree_digest(src) == before


# A differing tied lm_head: transformers 5 warns and keeps both untied; verify and generate do the same with one
# warning line (convert still refuses it above).
USED_UNTIED = {"model tied weights differ"}


def _used_untied_with_one_warning(res, needles: list[str]) -> None:
    assert res.code == 0, res.err
    warnings = [line for line in res.err.splitlines() if line.startswith("pgconv: warning:")]
    assert len(warnings) == 1 and all(n in warnings[0] for n in needles) and "untied" in warnings[0], res.err


# Damage that transformers would load silently (extra files it never opens, paths outside the checkpoint it
# follows) must be refused by verify before transformers sees the checkpoint.
@pytest.mark.parametrize("case", CASES)
def test_verify_refuses_with_one_line(tmp_path_factory, tmp_path, capsys, case):
    src, needles = _damaged(tmp_path_factory, tmp_path, case)
    before = tree_digest(src)
    res = run_cli(["verify", src, "--max-new-tokens", "1", "--probes", "coarse"], capsys)
    if case in USED_UNTIED:
        _used_untied_with_one_warning(res, needles)
    else:
        assert_one_line_error(res, *[n for n in needles if n != str(src)])
    assert tree_digest(src) == before


@pytest.mark.parametrize("case", CASES)
def test_generate_refuses_with_one_line(tmp_path_factory, tmp_path, capsys, case):
    src, needles = _damaged(tmp_path_factory, tmp_path, case)
    res = run_cli(["generate", src, "--max-new-tokens", "1"], capsys)
    if case in USED_UNTIED:
        return _used_untied_with_one_warning(res, needles)
    assert_one_line_error(res, *[n for n in needles if n != str(src)])


# -- found by an adversarial review (2026-11-28): each was a traceback, a hang or a silent choice ------------------

DEEP = "[" * 50_000 + "]" * 50_000


def _deep_config(d: Path) -> list[str]:
    (d / "config.json").write_text(DEEP)
    return ["config.json", "nested too deeply"]


def _deep_header(d: Path) -> list[str]:
    header, data = read_header(d / ST)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()[:-1] + b', "x": ' + DEEP.encode() + b"}"
    raw += b" " * (-len(raw) % 8)
    write_raw(d / ST, raw, data)
    return [ST, "nested too deeply"]


def _dot_shard(d: Path) -> list[str]:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "."
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["model.safetensors.index.json", "is not a file name"]


REVIEW_CASES: dict[str, Callable[[Path], list[str]]] = {
    "config.json nested too deeply": _deep_config,
    "safetensors header nested too deeply": _deep_header,
    "index shard name '.'": _dot_shard,
}


@pytest.mark.parametrize("case", REVIEW_CASES)
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_review_cases_are_one_line_errors(tmp_path_factory, tmp_path, capsys, case, command):
    sharded = case == "index shard name '.'"
    src = fresh_copy((sharded_checkpoint if sharded else tiny_checkpoint)(tmp_path_factory), tmp_path / "src")
    needles = REVIEW_CASES[case](src)
    before = tree_digest(src)
    argv = ["convert", src, tmp_path / "dst", "--to", "native", "--quiet"] if command == "convert" else ["inspect", src]
    res = run_cli(argv, capsys)
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "dst").exists() and litter(tmp_path) == [] and tree_digest(src) == before


def test_bin_with_a_meta_or_sparse_tensor_is_refused(tmp_path, capsys):
    from pgconv.converter.bin_io import read_bin
    from pgconv.errors import InputError

    for name, t in (("meta", torch.zeros(4, device="meta")), ("sparse", torch.eye(3).to_sparse())):
        path = tmp_path / f"{name}.bin"
        torch.save({"w": t}, path)
        with pytest.raises(InputError, match="not a dense CPU tensor"):
            read_bin(path)


def test_config_json_fifo_does_not_block(tmp_path_factory, tmp_path):
    import os
    import subprocess
    import sys

    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")
    run = subprocess.run([sys.executable, "-c", "from pgconv.cli import main; main()", "inspect", str(src)],
                         capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "not a regular file" in run.stderr, run.stderr


def test_unreadable_companion_and_directory_name_the_source(tmp_path_factory, tmp_path, capsys, monkeypatch):
    """Running as root, chmod cannot make a file unreadable: the OS errors are simulated where they are raised."""
    import errno
    import os

    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    real = os.open

    def os_open(path, *a, **kw):  # the open copy_companion does (it must not block on a FIFO, so not copyfile)
        if Path(path) == src / "tokenizer.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "open", os_open)
    res = run_cli(["convert", src, tmp_path / "dst", "--to", "native", "--quiet"], capsys)
    assert_one_line_error(res, str(src / "tokenizer.json"), "cannot read", "Permission denied")
    assert not (tmp_path / "dst").exists() and litter(tmp_path) == []
    monkeypatch.undo()

    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == src:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_iterdir(self)

    (src / ST).rename(src / "weights.safetensors")  # no standard name: the directory must be listed
    monkeypatch.setattr(Path, "iterdir", iterdir)
    res = run_cli(["inspect", src], capsys)
    assert_one_line_error(res, str(src), "cannot read", "Permission denied")


def test_inspect_lists_integer_weights_as_a_problem(tmp_path_factory, tmp_path, capsys):
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    sd = load_file(src / ST)
    sd["language_model.model.norm.weight"] = sd["language_model.model.norm.weight"].to(torch.int64)
    save_file(sd, src / ST, metadata={"format": "pt"})
    res = run_cli(["inspect", src], capsys)
    assert res.code == 1 and "language_model.model.norm.weight has dtype I64" in res.out


def test_destination_under_a_regular_file(tmp_path_factory, tmp_path, capsys):
    src = tiny_checkpoint(tmp_path_factory)
    (tmp_path / "file").write_text("x")
    res = run_cli(["convert", src, tmp_path / "file" / "dst", "--to", "native"], capsys)
    assert_one_line_error(res, "file", "is not a directory")


@pytest.mark.parametrize("text, needle", [("{", "invalid JSON"), ("[1]", "not a JSON object")])
def test_broken_generation_config_is_refused_before_loading(tmp_path_factory, tmp_path, text, needle):
    """transformers falls back silently from a broken generation_config.json (other eos ids than the file meant):
    load (generate) and verify refuse it instead."""
    from pgconv.converter.load import check_checkpoint
    from pgconv.errors import InputError

    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    (src / "generation_config.json").write_text(text)
    with pytest.raises(InputError, match=f"generation_config.json: {needle}"):
        check_checkpoint(src)


def test_bin_with_a_corrupted_tensor_byte_is_refused(tmp_path):
    """torch.load(mmap=True) never checks the zip CRC of tensor bytes: read_bin does (one flipped byte)."""
    import struct
    import zipfile

    from pgconv.converter.bin_io import read_bin
    from pgconv.errors import InputError

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    assert set(read_bin(path)[1]) == {"w"}
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF  # a byte of the tensor's storage
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt zip archive.*CRC"):
        read_bin(path)


def test_single_file_next_to_shards_wins_as_in_transformers(tmp_path_factory, tmp_path, capsys):
    """A re-save into the same directory leaves the other format behind: like transformers, the single file is read
    (so both read the same weights), and inspect lists the ignored index."""
    from pgconv.converter.load import load_state_dict

    src = fresh_copy(sharded_checkpoint(tmp_path_factory), tmp_path / "src")
    single = load_file(tiny_checkpoint(tmp_path_factory) / ST)
    single = {k: v + 1 for k, v in single.items()}  # different weights: which file was read is visible
    save_file(single, src / ST, metadata={"format": "pt"})
    _, sd = load_state_dict(src)
    assert torch.equal(sd["text.norm.weight"], single["language_model.model.norm.weight"])
    res = run_cli(["inspect", src], capsys)
    assert res.code == 1 and "model.safetensors.index.json: ignored, model.safetensors takes precedence" in res.out



# -- issue 15: tokenizer ids past the vocabulary; non-finite scores when sampling ----------------------------------

_WORDS = ["caption en", "answer en where is the cow standing?", "detect cat", "ding dong", "the quick brown fox"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.sampled_from(_WORDS), which=st.integers(0, 100), past=st.sampled_from([0, 1, 63, 10**6]),
       command=st.sampled_from(["generate", "verify"]))
def test_tokenizer_ids_past_the_vocabulary_are_one_line(tmp_path_factory, capsys, text, which, past, command):
    """A tokenizer.json giving a prompt token an id >= config.json's vocab_size: transformers (and our model) fail
    with `IndexError: index out of range in self`; pgconv names the file, the token and the id, before any weight
    is read."""
    from tokenizers import Tokenizer

    base = tiny_checkpoint(tmp_path_factory)
    vocab = json.loads((base / "config.json").read_text())["text_config"]["vocab_size"]
    tok = json.loads((base / "tokenizer.json").read_text())
    pieces = [p for p in Tokenizer.from_file(str(base / "tokenizer.json")).encode(text).tokens
              if p in tok["model"]["vocab"]]
    piece = pieces[which % len(pieces)]
    tok["model"]["vocab"][piece] = vocab + past
    d = fresh_copy(base, tmp_path_factory.mktemp("tok") / "ck")
    (d / "tokenizer.json").write_text(json.dumps(tok))
    res = run_cli([command, d, "--prompt", text, "--max-new-tokens", "1"], capsys)
    assert_one_line_error(res, "tokenizer.json", repr(piece), f"id {vocab + past}", f"vocab_size {vocab}")


def test_transformers_also_fails_on_ids_past_the_vocabulary(tmp_path_factory, tmp_path):
    transformers = pytest.importorskip("transformers")
    base = tiny_checkpoint(tmp_path_factory)
    tok = json.loads((base / "tokenizer.json").read_text())
    tok["model"]["vocab"]["ding"] = 10**6
    d = fresh_copy(base, tmp_path / "ck")
    (d / "tokenizer.json").write_text(json.dumps(tok))
    proc = transformers.PaliGemmaProcessor.from_pretrained(d)
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(d)
    from pgconv.converter.fixture import default_image

    inputs = proc(images=str(default_image()), text="<image>ding dong", return_tensors="pt")
    assert int(inputs["input_ids"].max()) == 10**6
    inputs.pop("labels")
    with pytest.raises(IndexError):
        model(**inputs)


def _nonfinite(tmp_path_factory, tmp_path, kind: str) -> Path:
    d = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / kind)
    sd = load_file(d / ST)
    if kind == "nan":
        sd[EMBED][:] = float("nan")
    else:  # finite in float32, +-inf logits once run in float16
        sd[EMBED] *= 1e4
    save_file(sd, d / ST, metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("kind, dtype", [("nan", "float32"), ("nan", "bfloat16"), ("overflow", "float16")])
def test_sampling_on_nonfinite_scores_is_one_line(tmp_path_factory, tmp_path, capsys, kind, dtype):
    """torch.multinomial raised `probability tensor contains either inf, nan or element < 0` (a traceback); greedy
    picks a token from the same scores, as transformers' greedy does."""
    d = _nonfinite(tmp_path_factory, tmp_path, kind)
    argv = ["generate", d, "--dtype", dtype, "--max-new-tokens", "2"]
    res = run_cli(argv + ["--temperature", "1", "--seed", "0"], capsys)
    assert_one_line_error(res, "cannot sample", "NaN or infinite", "inspect --scan", "--dtype bfloat16 or float32")
    assert res.out.strip() == ""
    res = run_cli(argv + ["--temperature", "1", "--top-k", "5", "--top-p", "0.9", "--seed", "0"], capsys)
    assert_one_line_error(res, "cannot sample")
    res = run_cli(argv, capsys)
    assert res.code == 0 and "Traceback" not in res.err, res.err
    if kind == "overflow":  # the same weights sample fine in float32: the message's advice holds
        res = run_cli(["generate", d, "--dtype", "float32", "--max-new-tokens", "2", "--temperature", "1"], capsys)
        assert res.code == 0, res.err


# -- issue 15: verify gives transformers the image files ------------------------------------------------------------

def _photo_files(tmp_path: Path) -> list[Path]:
    """An RGBA PNG with varying alpha, an LA PNG and an EXIF-rotated JPEG: where pgconv and transformers differed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (23, 37, 4), dtype=np.uint8), "RGBA")
    paths = [tmp_path / "alpha.png", tmp_path / "grey-alpha.png", tmp_path / "rotated.jpg"]
    rgba.save(paths[0])
    rgba.convert("LA").save(paths[1])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": what phones write
    rgba.convert("RGB").save(paths[2], exif=exif)
    return paths


def test_verify_gives_transformers_the_files_and_compares_the_processor(tmp_path_factory, tmp_path, monkeypatch):
    import transformers

    from pgconv.parity.verify import verify

    seen = []
    call = transformers.PaliGemmaProcessor.__call__
    monkeypatch.setattr(transformers.PaliGemmaProcessor, "__call__",
                        lambda self, images=None, **kw: seen.append(images) or call(self, images=images, **kw))
    paths = _photo_files(tmp_path)
    report = verify(tiny_checkpoint(tmp_path_factory), images=paths, prompts=["caption en"], max_new_tokens=1,
                    probes="coarse")
    assert report["passed"], report["failures"]
    assert seen and all(isinstance(i, str) for images in seen for i in images)  # paths: transformers' own loading
    assert {str(i) for images in seen for i in images} == set(map(str, paths))
    p = report["processor"]
    import importlib.util

    # AutoProcessor's pick: the torchvision-backed processor where torchvision is installed (not in this project)
    tv = importlib.util.find_spec("torchvision") is not None
    assert p["image_processor"] == ("SiglipImageProcessor" if tv else "SiglipImageProcessorPil")
    assert p["backend"] == ("torchvision" if tv else "pil") and p["compared_with"] == "SiglipImageProcessorPil"
    assert p["checked"] and p["passed"] and p["pixel_values_max_abs"] == 0 and p["tokens_equal"]
    assert (p["reference_pixel_values_max_abs"] > 0) == tv  # torchvision's resize differs by about one level
    assert all(c["processor"]["passed"] for c in report["cases"])


def test_verify_fails_when_pgconv_loads_images_differently(tmp_path_factory, tmp_path, capsys, monkeypatch):
    """The loading pgconv had before issue 15 (alpha composited onto white, EXIF ignored) is now caught by verify."""
    from PIL import Image

    import pgconv.model.processor as processor_mod

    def composite_no_exif(path):
        with Image.open(path) as im:
            return processor_mod.to_rgb(im)

    monkeypatch.setattr(processor_mod, "load_image", composite_no_exif)
    for path in _photo_files(tmp_path):
        res = run_cli(["verify", tiny_checkpoint(tmp_path_factory), "--image", path, "--max-new-tokens", "1",
                       "--probes", "coarse"], capsys)
        assert res.code == 1 and "Traceback" not in res.err, res.err
        assert "pgconv's processor DIFFERS from SiglipImageProcessorPil" in res.out, res.out
        assert "processor: pgconv's inputs differ from transformers' SiglipImageProcessorPil" in res.out


class _TorchvisionLike:
    """Stands in for transformers' torchvision-backed processor (not installed here): another backend whose pixels
    differ by one uint8 level, or whose decoder cannot read the file."""

    def __init__(self, pil, fail: bool):
        self.pil, self.fail = pil, fail
        self.tokenizer = pil.tokenizer
        self.image_processor = type("SiglipImageProcessor", (), {"backend": "torchvision"})()

    def __call__(self, **kw):
        if self.fail:
            raise RuntimeError("decode_image: Unsupported image file. Only jpeg, png, webp and gif are supported")
        enc = self.pil(**kw)
        enc["pixel_values"] = enc["pixel_values"] + 1 / 127.5
        return enc


@pytest.mark.parametrize("fail", [False, True])
def test_verify_with_the_torchvision_processor(tmp_path_factory, tmp_path, monkeypatch, fail):
    """The models get AutoProcessor's pick (named in the report); pgconv's processor is compared with the PIL one;
    a file the torchvision decoder cannot read falls back to the PIL processor, recorded."""
    from pgconv.parity import inputs as inputs_mod
    from pgconv.parity.verify import verify

    real = inputs_mod.reference_processors
    monkeypatch.setattr(inputs_mod, "reference_processors",
                        lambda path: (_TorchvisionLike(real(path)[1], fail), real(path)[1]))
    report = verify(tiny_checkpoint(tmp_path_factory), images=_photo_files(tmp_path)[:1], max_new_tokens=1,
                    probes="coarse")
    p = report["processor"]
    assert p["passed"] and p["compared_with"] == "SiglipImageProcessorPil" and p["pixel_values_max_abs"] == 0
    if fail:
        assert p["image_processor"] == "SiglipImageProcessorPil" and "SiglipImageProcessor failed" in p["fallbacks"][0]
        assert p["reference_pixel_values_max_abs"] == 0
    else:
        assert p["image_processor"] == "SiglipImageProcessor" and p["backend"] == "torchvision"
        assert p["reference_pixel_values_max_abs"] == pytest.approx(1 / 127.5, abs=1e-6)
    from pgconv.parity.report import terminal

    assert f"inputs: transformers' {p['image_processor']}" in terminal(report)
