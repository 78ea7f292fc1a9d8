"""Issue 15: hostile values inside the files pgconv parses must give one-line errors, never tracebacks.

* JSON values of any type in any field of a safetensors header or a shard index (hypothesis: random JSON trees,
  huge integers, NUL and control characters in names) -> the readers return or raise `InputError`, nothing else;
  a few fixed cases (dtype as a list or an object, a weight_map value that is a list, NUL in a shard name) run
  through the CLI.
* Integer literals longer than Python's int-from-string limit (4300 digits: `ValueError: Exceeds the limit`) in
  every JSON/TOML file we read, and 64-bit overflow in spec shape expressions.
* A config.json that is a symlink loop; an `.npz` with two members of the same name (numpy keeps the last).
* Control characters in names (tensor, member, file) never reach the terminal raw (hypothesis over the C0/C1
  controls, DEL and the bidi overrides).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from reliability_helpers import (assert_one_line_error, edit_header, fresh_copy, litter, npz_checkpoint, read_header,
                                 run_cli, sharded_checkpoint, tiny_checkpoint, tree_digest, write_raw)
from pgconv.errors import InputError

ST, INDEX = "model.safetensors", "model.safetensors.index.json"
HUGE = "1" * 5000  # past sys.get_int_max_str_digits() (4300): json.loads raises a bare ValueError
READERS = settings(deadline=None, max_examples=150, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLI = settings(READERS, max_examples=12)


class Huge:
    """A JSON integer literal too long to parse (json.dumps cannot write one: str(int) has the same limit)."""


def dumps(value: object) -> str:
    if isinstance(value, Huge):
        return HUGE
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + dumps(v) for k, v in value.items()) + "}"
    return json.dumps(value)


_TEXT = st.text(st.characters(codec="utf-8"), max_size=8) | st.sampled_from(["F32", "BF16", "", "\0", "x\x1b[2J"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True) | _TEXT | st.builds(Huge),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=12)


def _read_or_input_error(fn, *args) -> None:
    try:
        fn(*args)
    except InputError:
        pass  # anything else (TypeError, ValueError, RuntimeError ...) fails the test with its traceback


# -- safetensors header and index: random JSON in every field -------------------------------------------------------

@READERS
@given(data=st.data())
def test_random_json_in_a_safetensors_header_is_read_or_refused(tmp_path_factory, tmp_path, data):
    from pgconv.converter.safetensors_io import read_safetensors

    header, buffer = read_header(tiny_checkpoint(tmp_path_factory) / ST)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    where = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "name", "metadata", "shape item",
                                       "offset item", "extra key"]))
    value = data.draw(JSON)
    entry = header[name]
    if where in ("dtype", "shape", "data_offsets"):
        entry[where] = value
    elif where == "entry":
        header[name] = value
    elif where == "name":
        header[data.draw(_TEXT)] = header.pop(name)
    elif where == "metadata":
        header["__metadata__"] = value if data.draw(st.booleans()) else {"format": value}
    elif where == "shape item" and entry["shape"]:
        entry["shape"][0] = value
    elif where == "offset item":
        entry["data_offsets"][data.draw(st.integers(0, 1))] = value
    else:
        entry[data.draw(_TEXT)] = value
    path = tmp_path / "x.safetensors"
    write_raw(path, dumps(header).encode(), buffer)
    _read_or_input_error(read_safetensors, path)


@READERS
@given(data=st.data())
def test_random_json_in_an_index_is_read_or_refused(tmp_path_factory, tmp_path, data):
    from pgconv.converter.checkpoint import open_checkpoint

    base = sharded_checkpoint(tmp_path_factory)
    index = json.loads((base / INDEX).read_text())
    value = data.draw(JSON)
    where = data.draw(st.sampled_from(["shard", "weight_map", "index", "metadata", "tensor name", "total_size"]))
    wm = index["weight_map"]
    tensor = data.draw(st.sampled_from(sorted(wm)))
    if where == "shard":
        wm[tensor] = value
    elif where == "weight_map":
        index["weight_map"] = value
    elif where == "index":
        index = value
    elif where == "metadata":
        index["metadata"] = value
    elif where == "tensor name":
        wm[data.draw(_TEXT)] = wm.pop(tensor)
    else:
        index["metadata"]["total_size"] = value
    src = tmp_path / "src"  # one copy per test: every example rewrites the whole index, shards stay as they are
    if not src.exists():
        fresh_copy(base, src)
    (src / INDEX).write_text(dumps(index))
    _read_or_input_error(lambda: open_checkpoint(src).pg_config())


@CLI
@given(value=JSON, field=st.sampled_from(["dtype", "shape", "data_offsets"]))
def test_random_json_in_a_header_through_the_cli(tmp_path_factory, tmp_path, capsys, value, field):
    src = tmp_path / "src"
    if not src.exists():
        fresh_copy(tiny_checkpoint(tmp_path_factory), src)
    good = (tiny_checkpoint(tmp_path_factory) / ST).read_bytes()
    (src / ST).write_bytes(good)
    header, buffer = read_header(src / ST)
    header[sorted(k for k in header if k != "__metadata__")[0]][field] = value
    write_raw(src / ST, dumps(header).encode(), buffer)
    for argv in (["inspect", src], ["convert", src, tmp_path / "dst", "--to", "native", "--quiet"]):
        res = run_cli(argv, capsys)
        assert res.code in (0, 1, 2) and "Traceback" not in res.err, res.err[-2000:]
        if res.code == 2:
            assert_one_line_error(res)
        assert not (tmp_path / "dst").exists() or res.code == 0
        if (tmp_path / "dst").exists():
            import shutil

            shutil.rmtree(tmp_path / "dst")


def _first(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


@pytest.mark.parametrize("case", ["dtype list", "dtype object", "shard list", "shard object", "shard NUL",
                                  "tensor name NUL"])
def test_wrong_json_types_are_one_line_errors(tmp_path_factory, tmp_path, capsys, case):
    """Before: TypeError (unhashable list/dict) and ValueError (embedded null byte) tracebacks."""
    base = tiny_checkpoint(tmp_path_factory) if case.startswith("dtype") else sharded_checkpoint(tmp_path_factory)
    src = fresh_copy(base, tmp_path / "src")
    if case.startswith("dtype"):
        edit_header(src / ST, lambda h: {**h, _first(h): {**h[_first(h)], "dtype": ["F32"] if "list" in case
                                                          else {"F32": 1}}})
        needle = str(src / ST)
    else:
        index = json.loads((src / INDEX).read_text())
        name = sorted(index["weight_map"])[0]
        shard = index["weight_map"][name]
        if case == "tensor name NUL":
            index["weight_map"][name + "\0"] = index["weight_map"].pop(name)
        else:
            index["weight_map"][name] = {"shard list": [shard], "shard object": {"f": shard},
                                         "shard NUL": shard + "\0"}[case]
        (src / INDEX).write_text(json.dumps(index))
        needle = str(src / INDEX) if case != "tensor name NUL" else str(src)
    before = tree_digest(src)
    for argv in (["inspect", src], ["convert", src, tmp_path / "dst", "--to", "native", "--quiet"]):
        assert_one_line_error(run_cli(argv, capsys), needle)
    assert not (tmp_path / "dst").exists() and tree_digest(src) == before and litter(tmp_path) == []


# -- integer literals past the int-from-string limit ---------------------------------------------------------------

def _huge_json(path: Path) -> None:
    path.write_text(path.read_text().replace("{", '{"pgconv_huge": ' + HUGE + ",", 1))


def _spec(tmp_path: Path, fmt: str, shape: str) -> Path:
    """The built-in big-vision spec with its first rule's shape replaced by the text `shape`."""
    import re

    from pgconv.converter.spec import dumps as spec_dumps, load_spec

    text = spec_dumps(load_spec("big-vision"), fmt)
    pattern = r'shape = \[[^\]]*\]' if fmt == "toml" else r'"shape": \[[^\]]*\]'
    text = re.sub(pattern, lambda m: m.group(0).split("[")[0] + shape, text, count=1)
    path = tmp_path / f"huge.{fmt}"
    path.write_text(text)
    return path


_HUGE_CASES = {
    # case: (file to damage or make, command, needle)
    "safetensors header": (ST, "convert"),
    "config.json": ("config.json", "convert"),
    "config.json (generate)": ("config.json", "generate"),
    "index": (INDEX, "convert"),
    "generation_config.json": ("generation_config.json", "generate"),
    "tolerances": ("tolerances.json", "verify"),
    "spec TOML literal": ("spec", "toml:[" + "0x" + "f" * 5000 + "]"),
    "spec JSON literal": ("spec", "json:[" + HUGE + "]"),
    "spec TOML decimal": ("spec", "toml:[" + HUGE + "]"),
    "spec expression": ("spec", "toml:['" + " * ".join(["99999999999"] * 2000) + "']"),
    "spec hex expression": ("spec", "toml:['0x" + "f" * 20000 + "']"),
}


@pytest.mark.parametrize("case", list(_HUGE_CASES))
def test_integer_literals_too_long_to_parse(tmp_path_factory, tmp_path, capsys, case):
    """Before: `ValueError: Exceeds the limit (4300 digits) for integer string conversion` tracebacks."""
    name, command = _HUGE_CASES[case]
    src = fresh_copy((sharded_checkpoint if name == INDEX else tiny_checkpoint)(tmp_path_factory), tmp_path / "src")
    dst = tmp_path / "dst"
    if name == ST:
        header, buffer = read_header(src / ST)
        text = json.dumps(header, separators=(",", ":")).replace('"shape":[', '"shape":[' + HUGE + ",", 1)
        write_raw(src / ST, text.encode(), buffer)
        needle = src / ST
    elif name == "tolerances.json":
        (tmp_path / name).write_text('{"probes": {"x": ' + HUGE + "}}")
        needle = tmp_path / name
    elif name == "spec":
        fmt, shape = command.split(":", 1)
        spec = _spec(tmp_path, fmt, shape)
        needle = spec
    else:
        _huge_json(src / name)
        needle = src / name
    argv = {"convert": ["convert", src, dst, "--to", "native", "--quiet"],
            "generate": ["generate", src, "--prompt", "hi", "--max-new-tokens", "1"],
            "verify": ["verify", src, "--tolerances", tmp_path / "tolerances.json"]}.get(command)
    if name == "spec":
        argv = ["convert", src, tmp_path / "dst.npz", "--to", needle, "--allow-vocab-cut", "--quiet"]
    before = tree_digest(src)
    res = run_cli(argv, capsys)
    assert_one_line_error(res, str(needle))
    assert not dst.exists() and not (tmp_path / "dst.npz").exists() and tree_digest(src) == before


def test_shape_expressions_stay_within_64_bits():
    from pgconv.converter.spec_ops import SpecError, evaluate

    assert evaluate("D * 4 + 1", {"D": 8}) == 33
    assert evaluate((1 << 62), {}) == 1 << 62
    for expr in ("9999999999 * 9999999999", "0x" + "f" * 17, "D * D * D", (1 << 64)):
        with pytest.raises(SpecError, match="64 bits"):
            evaluate(expr, {"D": 1 << 30})


# -- config.json symlink loop, npz duplicate member ---------------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "convert", "inspect"])
def test_config_json_symlink_loop(tmp_path_factory, tmp_path, capsys, command):
    """Before: RuntimeError('Symlink loop') traceback (generate), 'missing' (convert), exit 1 (inspect)."""
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("config.json")
    argv = {"generate": ["generate", src, "--prompt", "hi", "--max-new-tokens", "1"],
            "convert": ["convert", src, tmp_path / "dst", "--to", "native", "--quiet"],
            "inspect": ["inspect", src]}[command]
    assert_one_line_error(run_cli(argv, capsys), str(src / "config.json"), "symlink loop")
    assert not (tmp_path / "dst").exists()


def test_npz_with_a_duplicate_member_is_refused(tmp_path_factory, tmp_path, capsys):
    """Before: accepted, the last copy silently winning (as in np.load)."""
    src = tmp_path / "dup.npz"
    src.write_bytes(npz_checkpoint(tmp_path_factory).read_bytes())
    with zipfile.ZipFile(src) as z:
        member = sorted(z.namelist())[0]
        data = z.read(member)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(src, "a") as z:
        z.writestr(member, data)
    before = src.read_bytes()
    for argv in (["inspect", src], ["convert", src, tmp_path / "dst", "--to", "native", "--quiet"]):
        assert_one_line_error(run_cli(argv, capsys), str(src), repr(member[: -len(".npy")]), "twice")
    assert not (tmp_path / "dst").exists() and src.read_bytes() == before


# -- terminal injection --------------------------------------------------------------------------------------------

# Every character a terminal may act on: C0 controls, DEL, C1 controls (CSI is \x9b), bidi overrides and isolates,
# line/paragraph separators.
CONTROLS = st.sampled_from([chr(c) for c in [*range(0x20), *range(0x7f, 0xa0), 0x200e, 0x202a, 0x202e, 0x2066,
                                             0x2069, 0x2028, 0x2029, 0xfeff]])
NAME = st.lists(st.one_of(CONTROLS, st.sampled_from(["]0;pwned", "[2J", "a", "."])), min_size=1, max_size=8).map("".join)


def _raw_controls(text: str) -> list[str]:
    return sorted({repr(c) for c in text if not c.isprintable() and c != "\n"})


@settings(READERS, max_examples=25)
@given(name=NAME)
def test_control_characters_in_tensor_names_never_reach_the_terminal(tmp_path_factory, tmp_path, capsys, name):
    """Before: `inspect` and `convert` printed ESC/BEL sequences from tensor names raw."""
    src = tmp_path / "src"
    if not src.exists():
        fresh_copy(tiny_checkpoint(tmp_path_factory), src)
        tensors = load_file(src / ST)
        (src / "good.safetensors").write_bytes((src / ST).read_bytes())
    else:
        tensors = load_file(src / "good.safetensors")
    tensors["evil" + name] = torch.zeros(2)
    save_file(tensors, src / ST)
    for argv in (["inspect", src], ["inspect", src, "--json"], ["convert", src, tmp_path / "dst", "--to", "native",
                                                                 "--quiet"]):
        res = run_cli(argv, capsys)
        assert res.code in (1, 2), res.err
        assert _raw_controls(res.out + res.err) == [], (argv[0], res.out[-500:], res.err[-500:])
        assert "evil" in res.out + res.err  # the name is shown, escaped


@pytest.mark.parametrize("where", ["shard name", "npz member", "companion file"])
def test_control_characters_in_file_and_member_names_are_escaped(tmp_path_factory, tmp_path, capsys, where):
    name = "x\x1b]0;pwned\x07\x9b2J\u202e"
    if where == "npz member":
        src = tmp_path / "evil.npz"
        src.write_bytes(npz_checkpoint(tmp_path_factory).read_bytes())
        with zipfile.ZipFile(src, "a") as z:
            z.writestr(name + ".txt", b"not an array")
        argv = ["inspect", src]
    else:
        src = fresh_copy(sharded_checkpoint(tmp_path_factory), tmp_path / "src")
        if where == "shard name":
            index = json.loads((src / INDEX).read_text())
            index["weight_map"][sorted(index["weight_map"])[0]] = name + ".safetensors"
            (src / INDEX).write_text(json.dumps(index))
        else:
            os.mkfifo(src / (name + ".json"))
        argv = ["convert", src, tmp_path / "dst", "--to", "native", "--quiet"]
    res = run_cli(argv, capsys)
    assert_one_line_error(res, "pwned")
    assert _raw_controls(res.out + res.err) == [], res.err


def test_printable_escapes_only_what_a_terminal_acts_on():
    from pgconv.errors import printable

    assert printable("model.layers.0.weight — ü 漢字\n") == "model.layers.0.weight — ü 漢字\n"
    assert printable("a\x1b[2Jb\x07\tc\u202e") == "a\\x1b[2Jb\\x07\\tc\\u202e"
    assert printable("a\nb", keep="") == "a\\nb"
    assert all(c.isprintable() for c in printable("".join(map(chr, range(0x110000 // 64))), keep=""))


def test_error_line_folds_whitespace_and_escapes_controls(capsys):
    from pgconv.cli import _one_line

    assert _one_line("a\n  b\tc\x1b[31m\x1c") == "a b c\\x1b[31m\\x1c"

