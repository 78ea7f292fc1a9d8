"""Hub ids and hub-cache snapshots (converter/hub.py, checkpoint.default_trusted_root).

A real download is a snapshot folder of symlinks into the repo's `blobs/`; every command must read it, whether it is
named by hub id (offline, from the cache) or by path, while links out of the repo cache stay refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from convert_helpers import hub_cache
from pgconv.converter.checkpoint import default_trusted_root
from pgconv.errors import InputError
from reliability_helpers import tiny_checkpoint


@pytest.fixture
def snapshot(tmp_path_factory, tmp_path) -> Path:
    return hub_cache(tmp_path / "hub", "acme/tiny-pali", tiny_checkpoint(tmp_path_factory))


def test_trusted_root_of_a_snapshot_is_the_repo_folder(snapshot, tmp_path):
    assert default_trusted_root(snapshot) == snapshot.parent.parent
    assert default_trusted_root(tmp_path) == tmp_path
    fake = tmp_path / "models--x--y" / "snapshots" / "rev"  # no blobs/ folder: not a hub cache entry
    fake.mkdir(parents=True)
    assert default_trusted_root(fake) == fake


def test_snapshot_path_loads_and_verifies(snapshot):
    import pgconv

    model = pgconv.load(snapshot)
    assert model.cfg.text.num_layers > 0
    report = pgconv.verify(snapshot, max_new_tokens=2, probes="coarse")
    assert report["passed"] is True, report.get("failures")


def test_links_out_of_the_repo_cache_are_still_refused(snapshot, tmp_path):
    import pgconv

    outside = tmp_path / "elsewhere.safetensors"
    weights = snapshot / "model.safetensors"
    outside.write_bytes(weights.read_bytes())
    weights.unlink()
    weights.symlink_to(outside)
    with pytest.raises(InputError, match="outside the checkpoint"):
        pgconv.load(snapshot)


_RUNS = """
import contextlib, io, sys
from pgconv.cli import main
for args in (a.split() for a in sys.argv[1:]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as e:
            code = e.code
    print(repr((code, out.getvalue(), err.getvalue())))
from pgconv.model.processor import Processor
print(repr((0, str(Processor.from_pretrained("acme/tiny-pali").num_image_tokens), "")))
"""


def test_hub_id_verifies_generates_and_inspects_offline(snapshot, tmp_path):
    """HF_HUB_OFFLINE=1 with the repo in the cache: verify, generate, inspect and the Python processor by hub id (one
    subprocess: huggingface_hub reads its environment at import)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(snapshot.parents[2]),
           "HF_HOME": str(tmp_path / "hf")}
    runs = ["verify acme/tiny-pali --max-new-tokens 2 --probes coarse", "generate acme/tiny-pali --max-new-tokens 2",
            "inspect acme/tiny-pali"]
    proc = subprocess.run([sys.executable, "-c", _RUNS, *runs], env=env, capture_output=True, text=True, timeout=300)
    results = [eval(line) for line in proc.stdout.strip().splitlines()[-len(runs) - 1:]]
    for run, (code, out, err) in zip(runs, results):
        assert code == 0, (run, err)
    assert "PASS" in results[0][1]
    assert results[1][1].strip()  # some generated text
    assert "hf-legacy" in results[2][1]
    assert int(results[3][1]) > 0  # Processor.from_pretrained(hub id)
