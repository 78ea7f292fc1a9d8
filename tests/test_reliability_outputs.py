"""Issue 15, data safety: where an output may go and what reaches it.

A destination inside a directory source is refused for every writer (layout, spec safetensors, big_vision .npz);
two conversions started at once towards one DST cannot both succeed (the check and the rename are one atomic
step: renameat2(RENAME_NOREPLACE), or a lock on DST's parent where that is missing); a companion file that cannot
be copied (a FIFO, a dangling link) fails the conversion instead of being left out; a DST that is a symlink loop
is a one-line error. Each case runs through the CLI: exit 2, one line, nothing at DST, the source untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reliability_helpers import (assert_one_line_error, fresh_copy, litter, no_hang, run_cli, tiny_checkpoint,
                                 tree_digest)

# -- DST inside SRC ------------------------------------------------------------------------------------------------

# (DST name inside the source directory, extra CLI arguments): one per writer.
_WRITERS = {
    "layout": ("sub", ["--to", "native"]),
    "spec-safetensors": ("sub", ["--to", "hf-v5-save-spec.toml"]),
    "npz": ("out.npz", ["--to", "big-vision", "--allow-vocab-cut"]),
}


def _spec_file(tmp_path: Path) -> Path:
    """A user spec with safetensors output (the built-in hf-v5-save spec, under a file name so that --to reads it
    as a spec, not the layout of the same name)."""
    from pgconv.converter.spec import BUILTIN_DIR

    path = tmp_path / "hf-v5-save-spec.toml"
    path.write_text((BUILTIN_DIR / "hf-v5-save.toml").read_text())
    return path


@pytest.mark.parametrize("writer", list(_WRITERS))
@pytest.mark.parametrize("source", ["with-config", "spec-read"])
def test_destination_inside_a_directory_source_is_refused(tmp_path_factory, tmp_path, capsys, writer, source):
    """Before: the .npz and spec writers wrote into the source directory (exit 0, SRC modified)."""
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    if source == "spec-read":  # no config.json: read through the layout's spec, config inferred from the shapes
        (src / "config.json").unlink()
    name, args = _WRITERS[writer]
    args = [str(_spec_file(tmp_path)) if a.endswith(".toml") else a for a in args]
    before = tree_digest(src)
    for dst in (src / name, src / "deeper" / name):
        if dst.parent != src:
            (dst.parent).mkdir()
            before = tree_digest(src)
        res = run_cli(["convert", src, dst, *args, "--quiet"], capsys)
        assert_one_line_error(res, str(dst), "overlaps the source")
        assert not dst.exists() and tree_digest(src) == before and litter(dst.parent) == []


def test_destination_holding_the_source_is_refused_with_force(tmp_path_factory, tmp_path, capsys):
    """--force towards a directory that contains the source would delete it: refused for the spec writer too."""
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "parent" / "src")
    before = tree_digest(tmp_path / "parent")
    res = run_cli(["convert", src, tmp_path / "parent", "--to", _spec_file(tmp_path), "--force", "--quiet"], capsys)
    assert_one_line_error(res, "overlaps the source")
    assert tree_digest(tmp_path / "parent") == before


def test_destination_next_to_a_file_source_is_fine(tmp_path_factory, tmp_path, capsys):
    """A weight file as SRC: DST beside it is not inside the source (the usual `pali.npz` -> `pali-hf`)."""
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    res = run_cli(["convert", src / "model.safetensors", src / "out.npz", "--to", "big-vision", "--allow-vocab-cut",
                   "--quiet"], capsys)
    assert res.code == 0, res.err
    res = run_cli(["convert", src / "out.npz", src / "back", "--to", "native", "--quiet"], capsys)
    assert res.code == 0, res.err


# -- two conversions at once -----------------------------------------------------------------------------------------

# Runs the CLI with every writer stopped, once its output is complete in the temporary sibling (before the rename),
# until PGCONV_TEST_RACERS processes have arrived: all of them have passed the up-front existence check, so only
# the rename decides. PGCONV_TEST_NO_RENAMEAT2 hides renameat2 to exercise the lock fallback.
_RACER = """
import os, sys, time
from pathlib import Path
barrier, racers = Path(os.environ["PGCONV_TEST_BARRIER"]), int(os.environ["PGCONV_TEST_RACERS"])

def wait():
    (barrier / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(barrier.iterdir())) < racers and time.time() < deadline:
        time.sleep(0.01)

from pgconv.converter import convert, fixture, spec_write
for module, name in ((convert, "_write_tree"), (spec_write, "_write_npz"), (fixture, "_write_files")):
    def stopped(*a, _real=getattr(module, name), **k):
        out = _real(*a, **k)
        wait()
        return out
    setattr(module, name, stopped)
if os.environ.get("PGCONV_TEST_NO_RENAMEAT2"):
    from pgconv.converter import staging
    staging._renameat2_fn = None
from pgconv.cli import main
main(sys.argv[1:])
"""


def _race(argv: list, tmp_path: Path, n: int = 2, fallback: bool = False) -> list[subprocess.CompletedProcess]:
    barrier = tmp_path / f"barrier-{time.monotonic_ns()}"
    barrier.mkdir()
    env = {**os.environ, "PGCONV_TEST_BARRIER": str(barrier), "PGCONV_TEST_RACERS": str(n)}
    if fallback:
        env["PGCONV_TEST_NO_RENAMEAT2"] = "1"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, *map(str, argv)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


_RACE_WRITERS = {"layout": ("dst", ["--to", "native"]),
                 "npz": ("dst.npz", ["--to", "big-vision", "--allow-vocab-cut"])}


@pytest.mark.parametrize("rename", ["renameat2", "lock"])
@pytest.mark.parametrize("writer", list(_RACE_WRITERS))
def test_two_conversions_at_once_only_one_wins(tmp_path_factory, tmp_path, capsys, writer, rename):
    """Before: both exited 0 and the later one replaced the earlier one's DST without --force."""
    src = tiny_checkpoint(tmp_path_factory)
    before = tree_digest(src)
    name, args = _RACE_WRITERS[writer]
    reference = tmp_path / "reference" / name
    reference.parent.mkdir()
    assert run_cli(["convert", src, reference, *args, "--quiet"], capsys).code == 0
    out = tmp_path / "out"
    out.mkdir()
    dst = out / name
    runs = _race(["convert", src, dst, *args, "--quiet"], tmp_path, fallback=rename == "lock")
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 2], [(r.returncode, r.stderr[-1500:]) for r in runs]
    loser = next(r for r in runs if r.returncode == 2)
    lines = loser.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgconv: error: ") and "Traceback" not in loser.stderr
    assert str(dst) in lines[0] and "already exists" in lines[0], lines
    # DST is one complete output (the winner's), the loser left no temporary, the source was only read.
    got = tree_digest(dst) if dst.is_dir() else {"": dst.read_bytes()}
    want = tree_digest(reference) if reference.is_dir() else {"": reference.read_bytes()}
    assert got == want
    assert sorted(p.name for p in out.iterdir()) == [name] and tree_digest(src) == before


@pytest.mark.parametrize("rename", ["renameat2", "lock"])
def test_two_forced_conversions_at_once_leave_one_complete_output(tmp_path_factory, tmp_path, capsys, rename):
    """With --force both may succeed, each replacing what was there; DST is at every moment a complete output
    (RENAME_EXCHANGE) and nothing is left beside it."""
    src = tiny_checkpoint(tmp_path_factory)
    reference = tmp_path / "reference"
    assert run_cli(["convert", src, reference, "--to", "native", "--quiet"], capsys).code == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "dst").mkdir()
    (out / "dst" / "old-file").write_text("replaced")
    runs = _race(["convert", src, out / "dst", "--to", "native", "--quiet", "--force"], tmp_path,
                 fallback=rename == "lock")
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-1500:] for r in runs]
    assert tree_digest(out / "dst") == tree_digest(reference)
    assert sorted(p.name for p in out.iterdir()) == ["dst"]


@pytest.mark.parametrize("force", [False, True])
def test_two_fixtures_at_once(tmp_path, force):
    """`pgconv fixture DIR` too: before, the later run replaced the earlier one's directory without --force."""
    runs = _race(["fixture", tmp_path / "out"] + (["--force"] if force else []), tmp_path)
    codes = sorted(r.returncode for r in runs)
    assert codes == ([0, 0] if force else [0, 2]), [r.stderr[-1500:] for r in runs]
    if not force:
        err = next(r for r in runs if r.returncode == 2).stderr.strip().splitlines()
        assert len(err) == 1 and str(tmp_path / "out") in err[0], err
    assert (tmp_path / "out" / "config.json").is_file()
    assert litter(tmp_path) == []


def test_publish_refuses_a_destination_made_meanwhile(tmp_path):
    """The no-replace rename itself, both ways: an existing DST is kept, whatever it is."""
    from pgconv.converter import staging
    from pgconv.errors import InputError

    for fallback in (False, True):
        for existing in ("dir", "file", "link"):
            d = tmp_path / f"{existing}-{fallback}"
            d.mkdir()
            dst, tmp = d / "dst", d / ".dst.pgconv-tmp"
            tmp.mkdir()
            (tmp / "new").write_text("new")
            {"dir": dst.mkdir, "file": lambda: dst.write_text("old"), "link": lambda: dst.symlink_to("nowhere")}[
                existing]()
            saved = staging._renameat2_fn
            staging._renameat2_fn = None if fallback else saved
            try:
                with pytest.raises(InputError, match="already exists"):
                    staging.publish(tmp, dst, force=False)
            finally:
                staging._renameat2_fn = saved
            assert dst.is_symlink() if existing == "link" else (dst.is_dir() if existing == "dir" else
                                                                dst.read_text() == "old")
            assert (tmp / "new").read_text() == "new"  # the caller removes it


def test_lock_fallback_without_flock_on_directories(tmp_path, monkeypatch):
    """Where a directory cannot be flock'ed (NFS), the lock is an fcntl lock on a lock file next to DST."""
    import fcntl

    from pgconv.converter import staging

    def no_flock(fd, op):
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(staging, "_renameat2_fn", None)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    for force in (False, True):
        tmp = tmp_path / f".dst.pgconv-tmp-{force}"
        tmp.mkdir()
        (tmp / "f").write_text(str(force))
        staging.publish(tmp, tmp_path / "dst", force=force)
        assert (tmp_path / "dst" / "f").read_text() == str(force) and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dst.pgconv-lock", "dst"]


# -- companions that cannot be copied, DST symlink loops ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "dangling-link"])
@pytest.mark.parametrize("writer", ["layout", "spec-safetensors"])
def test_companion_that_cannot_be_copied_fails_the_conversion(tmp_path_factory, tmp_path, capsys, kind, writer):
    """Before: a FIFO tokenizer_config.json was silently left out of DST (exit 0). It must not hang either."""
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    (src / "tokenizer_config.json").unlink()
    if kind == "fifo":
        os.mkfifo(src / "tokenizer_config.json")
    else:
        (src / "tokenizer_config.json").symlink_to("gone.json")
    before = tree_digest(src)
    to = "native" if writer == "layout" else str(_spec_file(tmp_path))
    with no_hang(60):  # a blocking open of the FIFO would hang here
        res = run_cli(["convert", src, tmp_path / "dst", "--to", to, "--quiet"], capsys)
    assert_one_line_error(res, str(src / "tokenizer_config.json"))
    assert not (tmp_path / "dst").exists() and litter(tmp_path) == [] and tree_digest(src) == before


def test_copy_companion_never_blocks_on_a_fifo(tmp_path):
    """A FIFO swapped in after the listing: the copy opens without blocking and refuses it."""
    from pgconv.converter.staging import copy_companion
    from pgconv.errors import InputError

    os.mkfifo(tmp_path / "tokenizer.json")
    (tmp_path / "out").mkdir()
    with no_hang(30), pytest.raises(InputError, match="not a regular file"):
        copy_companion(tmp_path / "tokenizer.json", tmp_path / "out")


@pytest.mark.parametrize("writer", ["layout", "npz"])
def test_destination_that_is_a_symlink_loop(tmp_path_factory, tmp_path, capsys, writer):
    """Before: RuntimeError('Symlink loop') traceback from Path.resolve()."""
    src = tiny_checkpoint(tmp_path_factory)
    name, args = _RACE_WRITERS[writer]
    dst = tmp_path / name
    dst.symlink_to(name)
    for force in ([], ["--force"]):
        res = run_cli(["convert", src, dst, *args, "--quiet", *force], capsys)
        assert_one_line_error(res, str(dst), "symlink loop")
        assert dst.is_symlink() and litter(tmp_path) == []
