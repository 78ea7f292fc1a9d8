"""verify and golden under a memory budget below the weights: transformers through accelerate's CPU/disk offload
(parity/offload.py), pgconv's model block by block (model/streaming.py). Same reports as the in-memory runs; peak
memory measured in a subprocess. The model is the wide tiny-pg2 of test_big_models (210 MB in fp32)."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch

from pgconv.errors import InputError

from test_big_models import MiB, _cli, _weights, run_measured, wide  # noqa: F401  (pytest fixture)

pytest.importorskip("accelerate")


def _same_report(a, b):
    """Same probes, verdicts and checks; metrics equal within float noise."""
    assert [p["name"] for p in a["probes"]] == [p["name"] for p in b["probes"]]
    for pa, pb in zip(a["probes"], b["probes"]):
        assert (pa["verdict"], pa["passed"]) == (pb["verdict"], pb["passed"]), pa["name"]
        for key in ("nrmse", "max_abs"):
            assert math.isclose(pa[key], pb[key], rel_tol=1e-6, abs_tol=1e-12), (pa["name"], key, pa[key], pb[key])
    assert a["passed"] == b["passed"] and a["first_divergence"] == b["first_divergence"]
    for key in ("kl_mean", "kl_max", "top1_agreement", "top5_overlap"):
        assert math.isclose(a["logits"][key], b["logits"][key], rel_tol=1e-5, abs_tol=1e-12), key
    for key in ("reference_tokens", "candidate_tokens", "tokens_equal", "passed"):
        assert a["generation"][key] == b["generation"][key], key
    assert a["weights"]["passed"] and b["weights"]["passed"]
    assert b["weights"]["mapped"] == a["weights"]["mapped"] == b["weights"]["bit_identical"]


def test_budgeted_verify_gives_the_in_memory_report(wide):
    from pgconv.parity.verify import verify

    plain = verify(wide, max_new_tokens=4, dtype="float32,bfloat16")
    budgeted = verify(wide, max_new_tokens=4, dtype="float32,bfloat16", max_memory=_weights() // 4)
    assert plain["memory"]["layer_by_layer"] == {"float32": False, "bfloat16": False}
    assert budgeted["memory"]["layer_by_layer"] == {"float32": True, "bfloat16": True}
    assert budgeted["weights"]["streamed"] and budgeted["weights"]["shared"] < budgeted["weights"]["mapped"]
    _same_report(plain, budgeted)
    assert budgeted["passed"]


def test_reference_offload_places_layers_on_disk_and_keeps_the_head_in_memory(wide):
    from pgconv.parity.models import load_reference
    from pgconv.parity.offload import device_map

    placed = device_map(wide, torch.float32, {"cpu": 0})
    assert placed["model.language_model.embed_tokens"] == placed["lm_head"] == "cpu"
    assert "disk" in placed.values()
    ref = load_reference(wide, torch.float32, "cpu", max_memory={"cpu": 0})
    layer = ref.model.language_model.layers[3]
    assert layer.mlp.down_proj.weight.device.type == "meta"  # offloaded: accelerate reads it when the layer runs
    assert ref.lm_head.weight.device.type == "cpu"


def test_materialised_copy_is_the_in_memory_module(wide):
    """The float64 oracle's copy of an offloaded module computes what a copy of the in-memory module computes, and
    the offloaded original stays offloaded."""
    import copy

    from pgconv.parity.models import load_reference
    from pgconv.parity.offload import materialised_copy

    plain = load_reference(wide, torch.float32, "cpu")
    offloaded = load_reference(wide, torch.float32, "cpu", max_memory={"cpu": 0})
    x = torch.randn(1, 5, 256, dtype=torch.float64)
    for path in ("model.language_model.layers.2.mlp", "model.language_model.layers.5.post_feedforward_layernorm"):
        want = copy.deepcopy(plain.get_submodule(path)).double()(x)
        got_module = materialised_copy(offloaded.get_submodule(path)).double()
        assert not any(hasattr(m, "_hf_hook") for m in got_module.modules())
        assert torch.equal(got_module(x), want)
        assert all(p.device.type == "meta" for p in offloaded.get_submodule(path).parameters())


def test_budgeted_golden_writes_the_in_memory_activations(wide, tmp_path):
    from pgconv.parity.golden import golden

    golden(wide, tmp_path / "plain", max_new_tokens=3)
    doc = golden(wide, tmp_path / "budgeted", max_new_tokens=3, max_memory=_weights() // 4)
    for name in ("activations.safetensors", "inputs.safetensors"):
        assert (tmp_path / "plain/case0" / name).read_bytes() == (tmp_path / "budgeted/case0" / name).read_bytes()
    assert doc["cases"][0]["generation"] == json.loads((tmp_path / "plain/probes.json").read_text())["cases"][0][
        "generation"]


def test_native_layout_cannot_be_offloaded(tmp_path):
    from pgconv.converter.convert import convert
    from pgconv.converter.fixture import make_fixture
    from pgconv.parity.offload import load_offloaded

    src = make_fixture(tmp_path / "src", "tiny")
    native = tmp_path / "native"
    convert(src, native, "native", quiet=True)
    with pytest.raises(InputError, match="native layout"):
        load_offloaded(native, torch.float32, {"cpu": 0})


def test_cli_verify_and_golden_max_memory(wide, tmp_path, capsys):
    budget = f"{_weights() // 4 // MiB}MiB"
    code, out, err = _cli(capsys, "verify", str(wide), "--max-new-tokens", "2", "--max-memory", budget)
    assert code == 0 and "PASS" in out, (out, err)
    code, _, err = _cli(capsys, "verify", str(wide), "--max-memory", "8 bananas")
    assert code == 2 and "Invalid value for '--max-memory'" in err
    code, _, err = _cli(capsys, "verify", str(wide), "--max-memory", "1GB", "--candidate", "transformers-sdpa")
    assert code == 2 and "--max-memory applies to --candidate pgconv" in err
    code, out, err = _cli(capsys, "golden", str(wide), "-o", str(tmp_path / "g"), "--max-new-tokens", "2",
                          "--max-memory", budget)
    assert code == 0 and "written to" in out, (out, err)
    for command in ("verify", "golden", "generate"):
        assert "--max-memory" in _cli(capsys, command, "--help")[1]


_PEAK = textwrap.dedent("""
    import json, sys, threading, time, torch

    def status(*keys):
        out = {}
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in keys:
                out[key] = int(line.split()[1]) * 1024
        return out

    peak_anon = [0]
    def sample():  # RssAnon has no high-water mark of its own
        while True:
            peak_anon[0] = max(peak_anon[0], status("RssAnon")["RssAnon"])
            time.sleep(0.002)

    from accelerate import init_empty_weights
    from transformers import AutoConfig, PaliGemmaForConditionalGeneration
    from pgconv.model.config import TINY
    from pgconv.model.paligemma import PaliGemma
    from pgconv.parity.verify import verify

    path, budget = sys.argv[1], int(sys.argv[2])
    with torch.device("meta"):  # one-time costs of both libraries' model code, paid by every run
        PaliGemma(TINY)
    with init_empty_weights():
        PaliGemmaForConditionalGeneration._from_config(AutoConfig.from_pretrained(path))
    base = status("VmHWM", "RssAnon")
    threading.Thread(target=sample, daemon=True).start()
    report = verify(path, max_new_tokens=4, max_memory=budget)
    print(json.dumps({"base": base["VmHWM"], "base_anon": base["RssAnon"], "peak": status("VmHWM")["VmHWM"],
                      "peak_anon": peak_anon[0], "passed": report["passed"], "memory": report["memory"]}))
""")


def _peak(path, budget):
    return run_measured(_PEAK, path, budget, timeout=180)


# Activations, captures, the KV cache, the image, the modeling modules transformers imports when it first loads:
# measured 10-25 MiB of anonymous memory over the budget here. VmHWM also counts the checkpoint's pages that
# safetensors maps while transformers loads; `offload._paging_out` hands them back every 50 ms (without it: the
# whole 105 MB file on top), so what is left is the pages read between two page-outs and the libraries' code:
# measured 25-35 MiB more.
SLACK = 64 * MiB


def test_budgeted_verify_peak_memory(wide):
    weights = _weights()
    budget = weights // 4
    file_bytes = sum(f.stat().st_size for f in wide.glob("*.safetensors"))
    streamed = _peak(wide, budget)
    assert streamed["passed"] and streamed["memory"]["layer_by_layer"] == {"float32": True}
    assert streamed["peak_anon"] - streamed["base_anon"] <= budget + SLACK, streamed
    assert streamed["peak"] - streamed["base"] <= budget + 2 * SLACK < budget + file_bytes + SLACK, streamed
    whole = _peak(wide, 10 * weights)  # fits: both models in memory on one copy of the weights
    assert whole["memory"]["layer_by_layer"] == {"float32": False}
    assert whole["peak_anon"] - whole["base_anon"] > budget + SLACK  # what the bound above would catch
    assert whole["peak_anon"] - whole["base_anon"] >= 0.9 * weights


def test_one_device_places_nothing(wide):
    """On CPU (one device) nothing is moved: `placement` is empty and `_to` leaves an AttnContext's tensors as they
    are (the multi-GPU path is exercised by the cuda tests below)."""
    from pgconv.model.streaming import _to, load_streamed
    from pgconv.parity.models import load_reference
    from pgconv.parity.offload import placement

    ours = load_streamed(wide, torch.float32, budget=_weights() // 4)
    ref = load_reference(wide, torch.float32, "cpu", max_memory={"cpu": 0})
    assert placement(ours, ref) == {}
    assert all(u.device is None for u in ours.streamer.units)
    ctx = ours.attn_context(torch.zeros(1, 5, dtype=torch.long))
    moved = _to((torch.ones(2), ctx), torch.device("cpu"))
    assert moved[1].cos is ctx.cos and torch.equal(moved[1].mask, ctx.mask)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_budgeted_verify_on_cuda(wide):
    """--device cuda with a budget: accelerate spreads the reference over every visible GPU (then CPU, then disk)
    and pgconv's blocks follow its placement; the report is the CPU run's within float noise."""
    from pgconv.parity.verify import verify

    cpu = verify(wide, max_new_tokens=4)
    gpu = verify(wide, max_new_tokens=4, device="cuda", max_memory=_weights() // 4)
    assert gpu["memory"]["layer_by_layer"] == {"float32": True}
    assert gpu["passed"] and [p["verdict"] for p in gpu["probes"]] == [p["verdict"] for p in cpu["probes"]]


def test_budgeted_verify_sharded_paligemma1(tmp_path, monkeypatch):
    """The hub's layout for big checkpoints (several shards and an index) and the Gemma 1 decoder: same report."""
    import dataclasses

    from pgconv.converter import fixture
    from pgconv.model import config as C
    from pgconv.model.streaming import weight_bytes
    from pgconv.parity.verify import verify

    text = dataclasses.replace(C.TINY.text, hidden_size=256, intermediate_size=8192, num_layers=6, num_heads=4,
                               num_kv_heads=1, head_dim=64)
    monkeypatch.setitem(C.PRESETS, "test-wide-pg1", C.TINY.replace(text=text))
    monkeypatch.setattr(fixture, "MAX_SHARD_BYTES", 30_000_000)
    path = fixture.make_fixture(tmp_path / "pg1", "test-wide-pg1", dtype="bfloat16")
    assert len(list(path.glob("model-*.safetensors"))) == 3
    weights = weight_bytes(C.PRESETS["test-wide-pg1"], torch.float32)
    plain = verify(path, max_new_tokens=2, probes="coarse")
    budgeted = verify(path, max_new_tokens=2, probes="coarse", max_memory=weights // 4)
    assert budgeted["memory"]["layer_by_layer"] == {"float32": True}
    _same_report(plain, budgeted)


def test_without_accelerate_a_budgeted_verify_says_what_to_install(wide, monkeypatch):
    from pgconv.parity.verify import verify

    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    with pytest.raises(InputError, match=r"pip install 'pgconv\[big\]'"):
        verify(wide, max_new_tokens=2, max_memory=_weights() // 4)
    assert verify(wide, max_new_tokens=2, probes="coarse")["passed"]  # a model that fits needs no accelerate


def _mapped_kib(path):
    import re

    total, current = 0, None
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            current = parts[5] if len(parts) > 5 else None
        elif line.startswith("Rss:") and current == str(path):
            total += int(line.split()[1])
    return total


def test_paging_out_hands_back_mapped_checkpoint_pages_and_keeps_the_data(wide):
    """What transformers' loader does (every tensor read through safetensors' map, the file mapped till the end),
    inside `_paging_out`: the mapped pages leave the resident set, the values read are unchanged."""
    import time

    from safetensors import safe_open

    from pgconv.parity.offload import _paging_out

    f = (wide / "model.safetensors").resolve()
    with safe_open(str(f), framework="pt") as handle:
        names = list(handle.keys())
        before = {n: handle.get_tensor(n).clone() for n in names}
        assert _mapped_kib(f) > 50_000  # touched: the whole 105 MB file is resident
        with _paging_out(wide, every=0.01):
            time.sleep(0.2)
            assert _mapped_kib(f) < 5_000
            assert all(torch.equal(handle.get_tensor(n), before[n]) for n in names)  # refaulted from the file
