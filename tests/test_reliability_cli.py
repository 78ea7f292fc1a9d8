"""Issue 8, CLI catalogue: unwritable or existing destinations, full disks, interrupts and exceptions mid-write,
for every writer (layout convert, spec/.npz convert, fixture), plus exit codes end to end.

Already covered elsewhere (not repeated here): convert's existing DST / --force and overlapping DST, an injected
ENOSPC in `_write_span`, KeyboardInterrupt in-process, the free-space check, and a real SIGINT mid-conversion
(test_convert_errors.py); an unknown fixture preset (test_cli_generate.py); unknown layouts and shard sizes
(test_convert_errors.py `test_cli_rejects_bad_options`); fixture refusing a non-empty directory and a failed
write (test_fixture.py).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability_helpers import assert_one_line_error, fresh_copy, litter, run_cli, tiny_checkpoint, tree_digest
from pgconv.errors import InputError

PGCONV = Path(sys.executable).parent / "pgconv"


def _writers(src: Path, parent: Path) -> dict[str, list]:
    """One command per writer, each writing to `parent`/out*."""
    return {
        "convert layout": ["convert", src, parent / "out", "--to", "native", "--quiet"],
        "convert cast": ["convert", src, parent / "out", "--to", "hf-v5-save", "--dtype", "bfloat16", "--quiet"],
        "convert big-vision": ["convert", src, parent / "out.npz", "--to", "big-vision", "--allow-vocab-cut",
                               "--quiet"],
        "fixture": ["fixture", parent / "out"],
    }


WRITERS = ["convert layout", "convert cast", "convert big-vision", "fixture"]


def _outputs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# -- unwritable destination ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", WRITERS)
def test_destination_parent_missing_or_a_file(tmp_path_factory, tmp_path, capsys, writer):
    src = tiny_checkpoint(tmp_path_factory)
    (tmp_path / "file").write_text("x")
    for parent in (tmp_path / "file", tmp_path / "no" / "such"):
        argv = _writers(src, parent)[writer]
        res = run_cli(argv, capsys)
        if writer == "fixture" and parent.name == "such":  # the fixture creates missing parents, like mkdir -p
            assert res.code == 0, res.err
            continue
        assert_one_line_error(res, str(parent))
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("writer", WRITERS)
def test_permission_denied_is_one_line(tmp_path_factory, tmp_path, capsys, monkeypatch, writer):
    """EACCES when the output is created (a read-only directory; as root chmod does not stop us, so the error is
    injected into mkdir/open under tmp_path): exit 2, one line, nothing left."""
    src = tiny_checkpoint(tmp_path_factory)
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    real_mkdir, real_open = os.mkdir, os.open

    def deny(path) -> None:
        if str(path).startswith(str(out_dir)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def mkdir(path, *a, **k):
        deny(path)
        return real_mkdir(path, *a, **k)

    def open_(path, *a, **k):
        deny(path)
        return real_open(path, *a, **k)

    import builtins
    real_builtin_open = builtins.open

    def builtin_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            deny(file)
        return real_builtin_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(builtins, "open", builtin_open)
    monkeypatch.setattr(io, "open", builtin_open)  # zipfile opens through io.open
    monkeypatch.setattr(os, "access", lambda p, m, **k: True)  # what root sees on a directory it cannot write
    res = run_cli(_writers(src, out_dir)[writer], capsys)
    monkeypatch.undo()
    assert_one_line_error(res, "Permission denied")
    assert _outputs(out_dir) == []


def test_not_writable_is_checked_before_any_work(tmp_path_factory, tmp_path, capsys, monkeypatch):
    src = tiny_checkpoint(tmp_path_factory)
    monkeypatch.setattr(os, "access", lambda p, m, **k: Path(p) != tmp_path)
    res = run_cli(_writers(src, tmp_path)["convert layout"], capsys)
    assert_one_line_error(res, str(tmp_path), "not writable")


# -- destination exists ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", WRITERS)
def test_existing_destination_is_kept(tmp_path_factory, tmp_path, capsys, writer):
    src = tiny_checkpoint(tmp_path_factory)
    argv = _writers(src, tmp_path)[writer]
    dst = Path(argv[2] if writer != "fixture" else argv[1])
    if writer == "convert big-vision":
        dst.write_bytes(b"precious")
    else:
        dst.mkdir()
        (dst / "keep.txt").write_text("precious")
    before = tree_digest(tmp_path)
    res = run_cli(argv, capsys)
    assert_one_line_error(res, str(dst), "--force")
    assert tree_digest(tmp_path) == before and litter(tmp_path) == []


def test_destination_that_is_a_file_is_never_replaced_by_a_directory(tmp_path_factory, tmp_path, capsys):
    src = tiny_checkpoint(tmp_path_factory)
    (tmp_path / "out").write_text("precious")
    res = run_cli(_writers(src, tmp_path)["convert layout"] + ["--force"], capsys)
    assert_one_line_error(res, "out", "not a directory")
    assert (tmp_path / "out").read_text() == "precious"


# -- full disk -------------------------------------------------------------------------------------------------------

def _fd_under(fd: int, directory: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory))
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
@pytest.mark.parametrize("after", [0, 200_000])
@pytest.mark.parametrize("writer", ["convert layout", "convert cast"])
def test_enospc_in_the_write_syscalls(tmp_path_factory, tmp_path, capsys, monkeypatch, writer, after):
    """os.write / os.pwrite / os.copy_file_range into the output fail with ENOSPC after `after` bytes (the
    layout writer pwrites both direct and buffered): exit 2 naming DST and the error, no DST, no temp directory."""
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    before = tree_digest(src)
    out = tmp_path / "outputs"
    out.mkdir()
    written = [0]
    real_write, real_pwrite, real_copy = os.write, os.pwrite, os.copy_file_range

    def charge(fd: int, n: int) -> None:
        if _fd_under(fd, out):
            if written[0] + n > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written[0] += n

    def write(fd, data):
        charge(fd, len(data))
        return real_write(fd, data)

    def pwrite(fd, data, offset):
        charge(fd, len(data))
        return real_pwrite(fd, data, offset)

    def copy(src_fd, dst_fd, count, *a, **k):
        charge(dst_fd, count)
        return real_copy(src_fd, dst_fd, count, *a, **k)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "copy_file_range", copy)
    res = run_cli(_writers(src, out)[writer], capsys)
    monkeypatch.undo()
    assert_one_line_error(res, "out", "No space left on device")
    assert _outputs(out) == [] and tree_digest(src) == before


def _unshare() -> list[str] | None:
    """A command prefix giving a private mount namespace (root, or an unprivileged user namespace)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return None
    for prefix in ([exe, "-m"], [exe, "-rm"]):
        probe = subprocess.run([*prefix, "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"; '
                                'rc=$?; umount "$d" 2>/dev/null; rmdir "$d"; exit $rc'], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


UNSHARE = _unshare()
_BATCH = r"""
import contextlib, io, json, os, shutil, sys
honest = shutil.disk_usage
from pgconv.cli import main
results = {}
for case in json.loads(sys.argv[1]):
    # Over-reporting free space lets the writes really run into ENOSPC (instead of the up-front check refusing).
    shutil.disk_usage = (lambda p: shutil._ntuple_diskusage(10**12, 0, 10**12)) if case["lie"] else honest
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(case["argv"])
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = f"raised {type(e).__name__}: {e}"
    results[case["id"]] = {"code": code, "err": err.getvalue(), "left": sorted(os.listdir(case["mnt"]))}
print("RESULTS=" + json.dumps(results))
"""
# (size/options of the tmpfs, over-report free space): a 512 kB filesystem for a ~1.4 MB checkpoint.
FS_CASES = {"free-space check": ("size=512k", False), "real ENOSPC mid-write": ("size=512k", True),
            "read-only": ("ro,size=8m", False)}


@pytest.fixture(scope="module")
def small_filesystems(tmp_path_factory) -> dict[str, dict]:
    """Every writer on every small/read-only tmpfs, in one subprocess with a private mount namespace (one tmpfs
    per case): {"writer/case": {"code", "err", "left"}}."""
    if UNSHARE is None:
        pytest.skip("no private mount namespace (unshare -m) to mount a small tmpfs in")
    src = tiny_checkpoint(tmp_path_factory)
    root = tmp_path_factory.mktemp("fs")
    cases, mounts = [], []
    for writer in WRITERS:
        for case, (options, lie) in FS_CASES.items():
            mnt = root / f"m{len(cases)}"
            mnt.mkdir()
            mounts.append(f'mount -t tmpfs -o {options} tmpfs "{mnt}" || exit 99')
            cases.append({"id": f"{writer}/{case}", "mnt": str(mnt), "lie": lie,
                          "argv": [str(a) for a in _writers(src, mnt)[writer]]})
    shell = "; ".join(mounts) + '; exec "$@"'
    proc = subprocess.run([*UNSHARE, "sh", "-c", shell, "sh", sys.executable, "-c", _BATCH, json.dumps(cases)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULTS=")[-1])


@pytest.mark.parametrize("case", list(FS_CASES))
@pytest.mark.parametrize("writer", WRITERS)
def test_full_or_read_only_filesystem(small_filesystems, writer, case):
    """Honest free space: refused before writing. Free space over-reported (so the writes really hit ENOSPC): still
    one line, exit 2, and the filesystem is left empty. Read-only: one line, nothing written."""
    got = small_filesystems[f"{writer}/{case}"]
    err = got["err"]
    assert got["code"] == 2 and err.count("\n") == 1 and err.startswith("pgconv: error: "), got
    want = {"free-space check": ["not enough free space"], "real ENOSPC mid-write": ["No space left on device"],
            "read-only": ["not writable", "Read-only file system"]}[case]
    assert any(w in err for w in want), err
    assert got["left"] == []


# -- exceptions and interrupts mid-write ------------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [RuntimeError("bug"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
@pytest.mark.parametrize("writer", ["convert big-vision", "convert cast"])
def test_exception_mid_write_leaves_nothing(tmp_path_factory, tmp_path, monkeypatch, writer, exc):
    """The 10th tensor raises: the exception propagates (a bug stays a bug), no DST, no temp litter, and a
    --force'd existing destination is still there."""
    from pgconv.converter import convert as conv

    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    before = tree_digest(src)
    out = tmp_path / "outputs"
    out.mkdir()
    calls = [0]
    from pgconv.converter import sources

    def failing(real):
        def read(self, *a, **k):  # the 10th tensor read (chunks or whole) raises
            calls[0] += 1
            if calls[0] == 10:
                raise exc
            return real(self, *a, **k)
        return read

    for name in ("chunks", "load"):
        monkeypatch.setattr(sources.SourceTensor, name, failing(getattr(sources.SourceTensor, name)))
    argv = _writers(src, out)[writer]
    dst = Path(argv[2])
    kwargs = dict(to=argv[4], quiet=True, force=True)
    if writer == "convert big-vision":
        kwargs["allow_vocab_cut"] = True
        dst.write_bytes(b"old")
    else:
        kwargs["dtype"] = "bfloat16"
        dst.mkdir()
        (dst / "old").write_text("old")
    with pytest.raises(type(exc)):
        conv.convert(src, dst, **kwargs)
    assert calls[0] >= 10
    assert _outputs(out) == [dst.name] and tree_digest(src) == before
    assert (dst.read_bytes() if dst.is_file() else (dst / "old").read_bytes()) == b"old"


_SLOW = """
import signal, sys, time, importlib
signal.signal(signal.SIGINT, signal.default_int_handler)  # a runner in the background (`cmd &`) passes SIGINT ignored
module, attr, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
mod = importlib.import_module(module)
owner, name = (getattr(mod, attr.split(".")[0]), attr.split(".")[1]) if "." in attr else (mod, attr)
real = getattr(owner, name)
def slow(*a, **k):
    time.sleep(delay)
    return real(*a, **k)
setattr(owner, name, slow)
from pgconv.cli import main
main(sys.argv[4:])
"""
# (module, function slowed down per call, seconds): enough calls that the signal lands mid-write.
_SLOWED = {
    "convert big-vision": ("pgconv.converter.npz", "NpzWriter.add", 0.05),
    "fixture": ("pgconv.converter.fixture", "_chunks", 0.05),
    "convert cast": ("pgconv.converter.sources", "SourceTensor.chunks", 0.05),
    "convert layout": ("pgconv.converter.writer", "_write_span", 0.05),
}


def _start_slowed(writer: str, src: Path, out: Path) -> tuple[subprocess.Popen, list[str]]:
    """Start `writer` into `out` in a subprocess, slowed per `_SLOWED`, and return once tensor bytes are on disk
    (not just the temporary name: a signal that lands while torch/numpy are still being imported, lazily by the
    writer, can be swallowed by a bare `except:` in their import code)."""
    module, attr, delay = _SLOWED[writer]
    argv = [str(a) for a in _writers(src, out)[writer]]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, module, attr, str(delay), *argv], stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while _bytes_under(out) < 8192 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be interrupted"
    return proc, argv


def _bytes_under(directory: Path) -> int:
    total = 0
    for p in directory.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:  # renamed or removed while we looked
            pass
    return total


@pytest.mark.parametrize("writer, sig", [("convert big-vision", signal.SIGINT), ("fixture", signal.SIGINT),
                                         ("convert cast", signal.SIGTERM)], ids=["npz-SIGINT", "fixture-SIGINT",
                                                                                "cast-SIGTERM"])
def test_signal_mid_write(tmp_path_factory, tmp_path, writer, sig):
    """A real SIGINT (Ctrl-C) or SIGTERM (kill, CI timeout) while the output is being written (subprocess): exit
    130/143 with one line, no DST, no temporary directory. (Layout SIGINT: test_convert_errors.py.)"""
    src = tiny_checkpoint(tmp_path_factory)
    out = tmp_path / "outputs"
    out.mkdir()
    proc, _ = _start_slowed(writer, src, out)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    want = (130, "pgconv: interrupted") if sig == signal.SIGINT else (143, "pgconv: terminated")
    assert (proc.returncode, err.strip()) == want, err
    assert _outputs(out) == []


# -- exit codes and --debug --------------------------------------------------------------------------------------------

def test_exit_codes_end_to_end(tmp_path_factory, tmp_path):
    """The installed console script: 0 ok, 1 inspect problems, 2 bad input or usage; one line, no traceback."""
    src = tiny_checkpoint(tmp_path_factory)
    bad = fresh_copy(src, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}")
    nan = fresh_copy(src, tmp_path / "nan")
    raw = bytearray((nan / "model.safetensors").read_bytes())
    raw[-4:] = b"\x00\x00\xc0\x7f"  # the last float32 becomes NaN
    (nan / "model.safetensors").write_bytes(bytes(raw))
    cases = [(["inspect", src], 0), (["inspect", nan, "--scan"], 1),
             (["convert", bad, tmp_path / "o", "--to", "native"], 2), (["no-such-command"], 2)]
    for argv, want in cases:
        run = subprocess.run([str(PGCONV), *map(str, argv)], capture_output=True, text=True, timeout=120)
        assert run.returncode == want, (argv, run.stderr)
        assert "Traceback" not in run.stderr
        if argv[0] == "convert":
            assert run.stderr.startswith("pgconv: error: ") and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "o").exists()


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    """--debug adds the traceback, and bad input still exits 2 (exit 1 means a finding)."""
    from pgconv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--debug", "inspect", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback (most recent call last)" in err and "InputError" in err
    assert err.rstrip().splitlines()[-1].startswith("pgconv: error: ") and "no such file" in err
    res = run_cli(["inspect", tmp_path / "missing"], capsys)
    assert_one_line_error(res, "missing", "no such file")


# -- verify --report DIR --------------------------------------------------------------------------------------------

def test_verify_report_dir_problems_fail_before_the_run(tmp_path_factory, tmp_path, capsys, monkeypatch):
    """An unusable --report directory is a one-line error before any model is loaded, not a traceback at the end."""
    from pgconv.parity import models

    monkeypatch.setattr(models, "load_reference", lambda *a, **k: pytest.fail("loaded a model first"))
    src = tiny_checkpoint(tmp_path_factory)
    (tmp_path / "file").write_text("x")
    res = run_cli(["verify", src, "--report", tmp_path / "file" / "reports"], capsys)
    assert_one_line_error(res, "file", "not a directory")
    monkeypatch.setattr(os, "access", lambda p, m, **k: Path(p) != tmp_path)
    res = run_cli(["verify", src, "--report", tmp_path / "reports"], capsys)
    assert_one_line_error(res, str(tmp_path), "not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_verify_reports_on_a_full_disk(tmp_path, capsys, monkeypatch):
    """ENOSPC while the reports are written: one line, exit 2, no half-written report files."""
    from pgconv.parity import report as report_mod

    real = Path.write_text
    calls = [0]

    def write_text(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    res = run_cli(["verify", "--max-new-tokens", "1", "--probes", "coarse", "--report", tmp_path / "reports"], capsys)
    assert_one_line_error(res, "reports", "No space left on device")
    assert not (tmp_path / "reports").exists() or list((tmp_path / "reports").iterdir()) == []
    assert report_mod  # the writer under test


@pytest.mark.parametrize("command", ["generate", "verify"])
def test_unusable_cache_for_the_builtin_checkpoint(tmp_path, capsys, monkeypatch, command):
    """Without a CHECKPOINT the tiny fixture is created in the cache; an unusable cache is one line naming it."""
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("PGCONV_CACHE", str(tmp_path / "file" / "cache"))
    res = run_cli([command, "--max-new-tokens", "1"], capsys)
    assert_one_line_error(res, "file", "PGCONV_CACHE")


@pytest.mark.parametrize("argv, needles", [
    (["fixture", "{out}", "--preset", "paligemma-3b"], ["unknown preset", "paligemma-3b-pt-224"]),
    (["convert", "{src}", "{out}", "--to", "native", "--config", "nope"], ["--config nope"]),
    (["convert", "{src}", "{out}", "--to", "nope"], ["nope"]),
    (["convert", "{src}", "{out}", "--to", "native", "--from", "nope"], ["nope"]),
])
def test_unknown_presets_and_formats(tmp_path_factory, tmp_path, capsys, argv, needles):
    """Unknown preset, layout or spec names are one-line errors; a --config that would be ignored is refused."""
    src = tiny_checkpoint(tmp_path_factory)
    argv = [a.format(src=src, out=tmp_path / "out") for a in argv]
    res = run_cli(argv, capsys)
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "out").exists() and litter(tmp_path) == []


# -- kill -9: leftovers of a process that could not clean up --------------------------------------------------------

@pytest.mark.parametrize("writer", ["convert layout", "convert big-vision", "fixture"])
def test_kill_9_leftovers_are_removed_by_the_next_run(tmp_path_factory, tmp_path, capsys, writer):
    """SIGKILL mid-write leaves the hidden temporary sibling (nothing can run on SIGKILL); the next run towards the
    same destination removes it and succeeds. A live process's sibling and another host's are kept."""
    from pgconv.converter.staging import temp_sibling

    src = tiny_checkpoint(tmp_path_factory)
    out = tmp_path / "outputs"
    out.mkdir()
    proc, argv = _start_slowed(writer, src, out)
    proc.kill()
    proc.communicate(timeout=60)
    left = litter(out)
    assert left and all("pgconv-tmp" in n for n in left), left
    dst = Path(argv[2] if writer != "fixture" else argv[1])
    live = temp_sibling(dst)  # ours: this test process is alive
    live.mkdir()
    other_host = out / left[0].replace(left[0].split("-tmp-")[1].split("-")[0], "otherhost", 1)
    other_host.mkdir()
    res = run_cli(argv, capsys)
    assert res.code == 0, res.err
    assert dst.exists()
    assert litter(out) == sorted([live.name, other_host.name])


# -- issue 15: files that would block, and tolerance budgets that could never fail ---------------------------------

def _pgconv_subprocess(argv: list, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a child process: a blocking open would hang the test runner in-process (the timeout fails
    the test instead)."""
    return subprocess.run([sys.executable, "-c", "from pgconv.cli import main; main()", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("command, option", [("generate", "--image"), ("verify", "--image"),
                                             ("verify", "--tolerances")])
def test_fifo_inputs_are_refused_not_opened(tmp_path_factory, tmp_path, command, option):
    """`--image` / `--tolerances` naming a FIFO blocked forever in open(); now one line, exit 2."""
    src = tiny_checkpoint(tmp_path_factory)
    fifo = tmp_path / ("pipe.png" if option == "--image" else "pipe.json")
    os.mkfifo(fifo)
    run = _pgconv_subprocess([command, src, option, fifo, "--max-new-tokens", "1"])
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert f"{fifo}: not a regular file" in run.stderr and run.stdout == "", run.stderr


_BUDGET_KEYS = [("probes", "text_block", "nrmse"), ("probes", "vision_block", "nmax"), ("probes", "projector", "k"),
                ("probes", "text_sub", "floor"), ("arbitration", None, "k"), ("arbitration", None, "floor_fraction"),
                ("logits", None, "kl_mean"), ("logits", None, "kl_max"), ("logits", None, "decisive_top1_min"),
                ("logits", None, "near_tie_nats"), ("generation", None, "teacher_forced_kl_max"),
                ("generation", None, "cache_kl_max"), ("generation", None, "near_tie_nats")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(_BUDGET_KEYS), dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       value=st.one_of(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-1", "-0.5",
                                        "true", "false", "null", '"0.1"', "[0.1]", "{}"]),
                       st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False).map(repr)))
def test_tolerance_budgets_must_be_finite_non_negative(tmp_path, capsys, where, dtype, value):
    """NaN passes every comparison (a NaN budget could never fail); inf, negative or non-number budgets are input
    errors naming the file and the key, before any model loads."""
    section, kind, key = where
    entry = f'{{"{dtype}": {{"{key}": {value}}}}}'
    body = f'{{"{section}": {{"{kind}": {entry}}}}}' if kind else f'{{"{section}": {entry}}}'
    tol = tmp_path / "tol.json"
    tol.write_text(body)
    res = run_cli(["verify", "/nonexistent-checkpoint", "--tolerances", tol], capsys)
    assert_one_line_error(res, str(tol), ".".join(filter(None, (section, kind, dtype, key))))


@pytest.mark.parametrize("value", ["1.0000001", "2", "1e300"])
def test_decisive_top1_min_is_a_fraction(tmp_path, capsys, value):
    tol = tmp_path / "tol.json"
    tol.write_text(f'{{"logits": {{"float32": {{"decisive_top1_min": {value}}}}}}}')
    res = run_cli(["verify", "/nonexistent-checkpoint", "--tolerances", tol], capsys)
    assert_one_line_error(res, str(tol), "logits.float32.decisive_top1_min", "a fraction from 0 to 1")


def test_valid_tolerance_overrides_still_load(tmp_path):
    from pgconv.parity.tolerances import load_tolerances

    tol = tmp_path / "tol.json"
    tol.write_text('{"probes": {"text_block": {"float32": {"nrmse": 0, "nmax": 1e300, "k": 5}}}, '
                   '"logits": {"float16": {"decisive_top1_min": 1}}}')
    t = load_tolerances(tol)
    assert t.probe("text_block", "float32")["nmax"] == 1e300 and t.section("logits", "float16")["decisive_top1_min"] == 1
