"""Shared pieces of the reliability tests: a cached tiny checkpoint, byte-level safetensors editing, and an
in-process CLI runner that reports exit code, stdout and stderr.

Checkpoints come from `make_fixture` (tiny preset, hf-legacy, fp32, tokenizer included) and are built once per
test session into pytest's base temp directory; every test works on its own copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Result", "run_cli", "tiny_checkpoint", "sharded_checkpoint", "npz_checkpoint", "fresh_copy",
           "read_header", "write_raw", "edit_header", "tree_digest", "litter", "assert_one_line_error", "no_hang"]


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> Result:
    """`pgconv.cli.main(argv)` in-process: (exit code, stdout, stderr). Any escaping exception fails the test,
    which is the point: the CLI must turn every bad input into an exit code."""
    from pgconv.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    else:  # main always exits
        raise AssertionError("pgconv.cli.main returned without sys.exit")
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_one_line_error(res: Result, *needles: str) -> None:
    """Exit 2, one `pgconv: error: ...` line on stderr naming every needle, no traceback."""
    assert res.code == 2, (res.code, res.err[-2000:])
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err[-2000:]
    assert lines[0].startswith("pgconv: error: "), lines[0]
    assert "Traceback" not in res.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@contextmanager
def no_hang(seconds: float = 60):
    """Fail instead of hanging: SIGALRM interrupts the command after `seconds` (also a blocking open of a FIFO)."""
    def alarm(signum, frame):
        raise TimeoutError(f"command still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_CACHE: dict[tuple[str, str], Path] = {}


def tiny_checkpoint(factory: pytest.TempPathFactory) -> Path:
    """The tiny fixture (single `model.safetensors`), built once per session. Never modify it: use `fresh_copy`."""
    key = (str(factory.getbasetemp()), "single")
    if key not in _CACHE:
        from pgconv.converter.fixture import make_fixture

        _CACHE[key] = make_fixture(factory.getbasetemp() / "reliability-tiny", "tiny")
    return _CACHE[key]


def sharded_checkpoint(factory: pytest.TempPathFactory) -> Path:
    """The tiny fixture in 3+ shards with `model.safetensors.index.json` (written by pgconv convert)."""
    key = (str(factory.getbasetemp()), "sharded")
    if key not in _CACHE:
        from pgconv.converter.convert import convert

        out = factory.getbasetemp() / "reliability-tiny-sharded"
        convert(tiny_checkpoint(factory), out, to="hf-legacy", shard_size="300KB", quiet=True)
        _CACHE[key] = out
    return _CACHE[key]


def npz_checkpoint(factory: pytest.TempPathFactory) -> Path:
    """The tiny fixture exported to a big_vision `.npz` (vocabulary cut allowed: the fixture's pad rows are random)."""
    key = (str(factory.getbasetemp()), "npz")
    if key not in _CACHE:
        from pgconv.converter.convert import convert

        out = factory.getbasetemp() / "reliability-tiny.npz"
        convert(tiny_checkpoint(factory), out, to="big-vision", allow_vocab_cut=True, quiet=True)
        _CACHE[key] = out
    return _CACHE[key]


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def read_header(path: Path) -> tuple[dict, bytes]:
    """(parsed header, data buffer) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: dict | bytes, data: bytes, declared: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text) if declared is None else declared) + text + data)


def edit_header(path: Path, edit) -> None:
    """Rewrite the header of `path` with `edit(header) -> header` (data untouched)."""
    header, data = read_header(path)
    write_raw(path, edit(header), data)


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (symlinks by target name), to prove a directory was not touched."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def litter(parent: Path) -> list[str]:
    """Temporary or backup entries a writer may have left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if "pgconv-tmp" in p.name or "pgconv-old" in p.name
                  or p.name.endswith((".tmp", ".old")))
