"""Memory budgets (`--max-memory`) and layer-by-layer execution of models that do not fit them.

The test model is a wide tiny-pg2 (8 decoder blocks of 26 MB in fp32, 210 MB of weights) stored in bf16 and run in
fp32, so a budget of a quarter of its weights streams the decoder and casts one block at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, strategies as st

from pgconv.errors import InputError
from pgconv.model import config as C
from pgconv.model.budget import default_budget, parse_size, resolve_budget

WIDE = C.TINY_PG2.replace(text=dataclasses.replace(
    C.TINY_PG2.text, hidden_size=256, intermediate_size=8192, num_layers=8, num_heads=4, num_kv_heads=2,
    head_dim=64, layer_types=C.gemma2_layer_types(8)))
MiB = 1 << 20


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from pgconv.converter.fixture import make_fixture

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(C.PRESETS, "test-wide", WIDE)
        return make_fixture(tmp_path_factory.mktemp("big") / "wide", "test-wide", dtype="bfloat16")


def _weights():
    from pgconv.model.streaming import weight_bytes

    return weight_bytes(WIDE, torch.float32)


# -- sizes ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("24G", 24 * 2**30), ("1.5GiB", 3 * 2**29), ("1000", 1000),
    (" 2 tb ", 2 * 10**12), ("10kb", 10**4), ("3KiB", 3072), ("7B", 7), (".5M", 2**19), (4096, 4096),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "GB", "8XB", "-1GB", "0", "0GB", "1e9", "8 G B", "nan", "inf", True])
def test_parse_size_refuses(text):
    with pytest.raises(InputError, match="--max-memory"):
        parse_size(text)


@given(st.integers(1, 10**6), st.sampled_from(["KB", "MB", "GB", "KiB", "MiB", "GiB", "k", "m", "g"]))
def test_parse_size_units(n, unit):
    base = {"K": 2**10, "M": 2**20, "G": 2**30}[unit.upper()] if len(unit) == 1 else (
        1024 ** "KMG".index(unit[0]) * 1024 if "i" in unit else 1000 ** ("KMG".index(unit[0]) + 1))
    assert parse_size(f"{n}{unit}") == n * base


def test_default_budget_is_below_what_is_available(monkeypatch):
    from pgconv.model import budget

    assert budget._meminfo_available() is not None  # Linux CI: /proc/meminfo is read
    monkeypatch.setattr(budget, "_meminfo_available", lambda: 20 * 2**30)
    monkeypatch.setattr(budget, "_cgroup_room", lambda: None)
    assert default_budget() == 18 * 2**30  # 10 % margin
    monkeypatch.setattr(budget, "_cgroup_room", lambda: 4 * 2**30)  # a container's limit is lower: it counts
    assert default_budget() == 3 * 2**30  # at least 1 GiB of margin
    monkeypatch.setattr(budget, "_meminfo_available", lambda: None)
    monkeypatch.setattr(budget, "_cgroup_room", lambda: None)
    assert default_budget() is None and resolve_budget(None) is None  # unknown: everything in memory, as before
    assert resolve_budget("1GiB") == 2**30


# -- layer by layer ---------------------------------------------------------------------------------------------------

def _inputs(path):
    from pgconv.converter.fixture import default_image
    from pgconv.model.processor import Processor

    return Processor.from_pretrained(path)([[default_image()]], "caption en")


def _generate(model, inputs, n=6):
    from pgconv.model.generate import generate

    return generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["token_type_ids"],
                    inputs["attention_mask"], max_new_tokens=n)


def test_streamed_generate_gives_the_in_memory_tokens(wide):
    import pgconv
    from pgconv.model.streaming import load_within, streamer_of

    inputs = _inputs(wide)
    want = _generate(pgconv.load(wide, dtype=torch.float32), inputs)
    model = load_within(wide, torch.float32, budget=_weights() // 4)
    streamer = streamer_of(model)
    assert streamer is not None  # it did not fit: layer by layer
    got = _generate(model, inputs)
    assert torch.equal(got, want)
    blocks = [u for u in streamer.units if u.name.startswith("text.blocks.")]
    assert sum(not u.pinned for u in blocks) >= 6  # most blocks streamed: read again at every step
    assert all(u.loads == got.shape[1] for u in blocks if not u.pinned)
    assert sum(u.resident and not u.pinned for u in streamer.units) <= 1  # one streamed unit materialised at most
    # A budget that holds everything keeps the plain in-memory model (nothing changes when the model fits).
    assert streamer_of(load_within(wide, torch.float32, budget=4 * _weights())) is None


def test_streamed_submodule_called_alone_materialises_its_block(wide):
    """A sub-module run on its own (verify's teacher-forced replay of an MLP) never computes on placeholders."""
    import pgconv
    from pgconv.model.streaming import load_streamed

    ref = pgconv.load(wide, dtype=torch.float32)
    model = load_streamed(wide, torch.float32, budget=_weights() // 4)
    x = torch.randn(1, 5, WIDE.text.hidden_size)
    for i in (0, 7, 3):
        h = torch.randn(1, 5, WIDE.text.intermediate_size)
        assert torch.equal(model.text.blocks[i].mlp.down(h), ref.text.blocks[i].mlp.down(h))
        assert torch.equal(model.text.blocks[i].mlp(x), ref.text.blocks[i].mlp(x))
    assert torch.equal(model.logits(x), ref.logits(x))


def test_budget_below_one_layer_is_an_input_error(wide):
    from pgconv.model.streaming import load_within

    with pytest.raises(InputError, match="below what one layer at a time needs"):
        load_within(wide, torch.float32, budget=10 * MiB)


_PEAK = textwrap.dedent("""
    import json, sys, torch
    from pgconv.converter.fixture import default_image
    from pgconv.model.generate import generate
    from pgconv.model.processor import Processor
    from pgconv.model.streaming import load_within

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    path, budget = sys.argv[1], (int(sys.argv[2]) or None)
    inputs = Processor.from_pretrained(path)([[default_image()]], "caption en")
    torch.ones(8, 8) @ torch.ones(8, 8)
    from pgconv.model.config import TINY
    from pgconv.model.paligemma import PaliGemma
    with torch.device("meta"):  # a first meta Conv2d costs ~75 MiB (torch's lazily built meta kernels), once
        PaliGemma(TINY)
    base = status("VmHWM")  # interpreter, torch, processor: the constant every run pays
    model = load_within(path, torch.float32, budget=budget)
    tokens = generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["token_type_ids"],
                      inputs["attention_mask"], max_new_tokens=6)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "tokens": tokens.tolist()}))
""")


def run_measured(script: str, *args, timeout: float = 120) -> dict:
    """The last stdout line (JSON) of `script` run in a fresh process (its peak RSS is its own), with torch's own
    kernels: no kernel timing runs in the measured process."""
    env = {**os.environ, "PGCONV_KERNELS": "default"}
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=timeout, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def _peak(path, budget):
    return run_measured(_PEAK, path, budget)


# Activations (T x 8192 MLP intermediates), the KV cache, the processor's image and allocator slack: measured
# 20-30 MiB over the budget on this model; the unbudgeted run is 210 MiB of weights over its base.
SLACK = 64 * MiB


def test_streamed_peak_rss_is_bounded_by_the_budget(wide):
    weights = _weights()
    budget = weights // 4
    streamed = _peak(wide, budget)
    assert streamed["peak"] - streamed["base"] <= budget + SLACK, (streamed, budget)
    whole = _peak(wide, 0)  # no budget: the whole model in memory (what the bound above would catch)
    assert whole["peak"] - whole["base"] > budget + SLACK
    assert whole["peak"] - whole["base"] >= weights * 0.9
    assert streamed["tokens"] == whole["tokens"]


def _cli(capsys, *argv):
    from pgconv.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_max_memory(wide, capsys):
    plain = _cli(capsys, "generate", str(wide), "--max-new-tokens", "4")
    budgeted = _cli(capsys, "generate", str(wide), "--max-new-tokens", "4", "--max-memory",
                    f"{_weights() // 4 // MiB}MiB")
    assert plain[0] == budgeted[0] == 0, (plain, budgeted)
    assert plain[1] == budgeted[1]
    code, _, err = _cli(capsys, "generate", str(wide), "--max-memory", "lots")
    assert code == 2 and "Invalid value for '--max-memory'" in err
    code, _, err = _cli(capsys, "generate", str(wide), "--max-memory", "5MB")
    assert code == 2 and "below what one layer at a time needs" in err and "Traceback" not in err
    assert "--max-memory" in _cli(capsys, "generate", "--help")[1]


def test_quick_big_verify_benchmark_runs_layer_by_layer():
    """benchmarks/big_verify.py --quick: the 10B benchmark's code path on a model 4x its budget (times not asserted)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.big_verify", "--quick"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((root / "benchmarks/out/big_verify-quick.json").read_text())
    assert result["verify"]["passed"] and result["verify"]["memory"]["layer_by_layer"] == {"float32": True}
    assert result["verify"]["weight_bytes"] > 4 * result["budget_bytes"] * 0.9
    assert result["generate"]["tokens"] == result["verify"]["tokens"] == 2
    assert "disk" in result["generate"]["devices"]  # transformers' own run offloads too
    assert result["wall_ratio"] > 0 and "passed" in proc.stdout
