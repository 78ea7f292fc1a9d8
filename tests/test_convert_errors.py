"""Bad input and interruptions: one-line errors (exit 2), no partial output, no temp litter, source untouched."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convert_helpers import hub_cache, random_state, tree_digest, write_checkpoint
from pgconv.cli import main
from pgconv.converter import writer
from pgconv.converter.convert import convert
from pgconv.errors import InputError
from pgconv.model.config import PRESETS

CFG = PRESETS["tiny"]


@pytest.fixture
def src(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "src", CFG, random_state(CFG, "hf-legacy", "F32"), shard_size="60KB",
                            extra_files={"tokenizer.json": "{}"})


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _litter(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".pgconv-" in p.name]


def _break(src: Path, case: str) -> str:
    """Damage a copy of the source in one way; return text the error must contain."""
    cfg_path = src / "config.json"
    config = json.loads(cfg_path.read_text())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    if case == "truncated shard":
        data = (src / first).read_bytes()
        (src / first).write_bytes(data[:-10])
        return "truncated"
    if case == "no config, shapes of no preset":  # without config.json the preset is inferred: none fits here
        _break(src, "missing tensor")
        cfg_path.unlink()
        return "no preset has exactly these hf-legacy tensor shapes"
    if case == "config not json":
        cfg_path.write_text("{oops")
        return "invalid JSON"
    if case == "unknown model_type":
        cfg_path.write_text(json.dumps({**config, "model_type": "llava"}))
        return "model_type 'llava'"
    if case == "config contradicts weights":
        config["text_config"]["intermediate_size"] = 100
        cfg_path.write_text(json.dumps(config))
        return "the config implies [100, 72]"
    if case == "missing tensor":
        del index["weight_map"]["language_model.model.norm.weight"]
        rest = {k: v for k, v in index["weight_map"].items()}
        # rewrite the shard without that tensor
        from safetensors.torch import load_file, save_file
        for f in set(rest.values()) | {first}:
            sd = load_file(src / f)
            sd.pop("language_model.model.norm.weight", None)
            save_file(sd, src / f, metadata={"format": "pt"})
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        return "missing 1 tensor(s): language_model.model.norm.weight"
    if case == "unexpected tensor":
        from safetensors.torch import load_file, save_file
        sd = load_file(src / first)
        sd["vision_tower.vision_model.head.probe"] = torch.zeros(3)
        save_file(sd, src / first, metadata={"format": "pt"})
        index["weight_map"]["vision_tower.vision_model.head.probe"] = first
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        return "unexpected 1 tensor(s): vision_tower.vision_model.head.probe"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated shard", "no config, shapes of no preset", "config not json", "unknown model_type",
                                  "config contradicts weights", "missing tensor", "unexpected tensor"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, src, capsys, case):
    match = _break(src, case)
    before = tree_digest(src)
    code, out, err = _cli(capsys, "convert", src, tmp_path / "dst", "--to", "native", "--quiet")
    assert code == 2, err
    assert err.startswith("pgconv: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert match in err
    assert not (tmp_path / "dst").exists() and not _litter(tmp_path)
    assert tree_digest(src) == before


def test_existing_destination_needs_force(tmp_path, src, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("x")
    code, _, err = _cli(capsys, "convert", src, dst, "--to", "native", "--quiet")
    assert code == 2 and "already exists" in err and (dst / "keep").exists()
    code, out, _ = _cli(capsys, "convert", src, dst, "--to", "native", "--quiet", "--force")
    assert code == 0 and not (dst / "keep").exists() and (dst / "model.safetensors").exists()
    assert "(hf-legacy) ->" in out and not _litter(tmp_path)


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_destination_overlapping_source_is_refused(tmp_path, src, where):
    dst = {"same": src, "inside": src / "out", "contains": src.parent}[where]
    before = tree_digest(src)
    with pytest.raises(InputError, match="overlaps the source"):
        convert(src, dst, to="native", force=True, quiet=True)
    assert tree_digest(src) == before


def test_write_failure_leaves_no_destination(tmp_path, src, monkeypatch):
    """A full disk (ENOSPC mid-write) -> InputError, no DST, no temp dir; a --force'd old DST survives."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    original = writer._write_span
    monkeypatch.setattr(writer, "_write_span", fail)
    with pytest.raises(InputError, match="No space left"):
        convert(src, tmp_path / "dst", to="native", quiet=True)
    assert not (tmp_path / "dst").exists() and not _litter(tmp_path)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep").write_text("x")
    calls.clear()
    with pytest.raises(InputError):
        convert(src, tmp_path / "old", to="native", quiet=True, force=True)
    assert (tmp_path / "old" / "keep").exists() and not _litter(tmp_path)


def test_keyboard_interrupt_cleans_up(tmp_path, src, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_write_span", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "dst", to="native", quiet=True)
    assert not (tmp_path / "dst").exists() and not _litter(tmp_path)


def test_free_space_is_checked_before_writing(tmp_path, src, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(InputError, match="not enough free space"):
        convert(src, tmp_path / "dst", to="native", quiet=True)
    assert not (tmp_path / "dst").exists() and not _litter(tmp_path)


def test_cli_rejects_bad_options(tmp_path, src, capsys):
    code, _, err = _cli(capsys, "convert", src, tmp_path / "d", "--to", "gguf")
    assert code == 2 and "gguf" in err
    code, _, err = _cli(capsys, "convert", src, tmp_path / "d", "--to", "native", "--shard-size", "5GiB")
    assert code == 2 and "invalid shard size" in err and not (tmp_path / "d").exists()


_SLOW_CONVERT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a runner in the background (`cmd &`) passes SIGINT ignored
from pgconv.converter import writer
original = writer._write_span
def slow(*a, **k):  # per tensor, on every worker: the tiny conversion takes seconds, the signal lands mid-write
    time.sleep(0.5)
    return original(*a, **k)
writer._write_span = slow
from pgconv.cli import main
main(sys.argv[1:])
"""


def test_sigint_during_conversion(tmp_path, src):
    """A real SIGINT mid-write (subprocess): exit 130, one line, no DST, no temp directory."""
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, "convert", str(src), str(dst), "--to", "native",
                             "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not _litter(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert _litter(tmp_path), "conversion never started writing"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "pgconv: interrupted"
    assert not dst.exists() and not _litter(tmp_path)


_TWO_RUNS = """
import contextlib, io, sys
from pgconv.cli import main
for args in (sys.argv[1:7], sys.argv[7:]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as e:
            print(repr((e.code, err.getvalue())))
"""


def test_hub_ids_offline(tmp_path, src):
    """HF_HUB_OFFLINE=1: a cached repo converts (symlinks into blobs/ are inside the repo cache); an unknown id
    is a one-line exit 2. One subprocess: huggingface_hub reads HF_HUB_OFFLINE at import."""
    hub_cache(tmp_path / "hub", "acme/tiny-pali", src)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    args = ["convert", "acme/tiny-pali", str(tmp_path / "out"), "--to", "native", "--quiet",
            "convert", "acme/no-such-model", str(tmp_path / "out2"), "--to", "native"]
    run = subprocess.run([sys.executable, "-c", _TWO_RUNS, *args], env=env, capture_output=True, text=True, timeout=120)
    (ok_code, ok_err), (bad_code, bad_err) = [eval(line) for line in run.stdout.strip().splitlines()[-2:]]
    assert ok_code == 0, ok_err
    assert (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert bad_code == 2 and bad_err.count("\n") == 1 and "HF_HUB_OFFLINE" in bad_err, bad_err
    assert not (tmp_path / "out2").exists()
