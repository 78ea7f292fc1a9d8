"""`pgconv verify --candidate keras-hub` (parity.keras_hub): keras-hub's PaliGemma on the torch backend, loaded by
keras-hub's own transformers converter, against transformers' golden activations. The measured agreement is
asserted (where keras-hub matches and where, and why, it does not), so a change on either side shows up.

Needs keras + keras-hub (`make test-keras` installs them, ~80 MB without keras-hub's tensorflow-text); without
them every test but the missing-extra one is skipped with that reason."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import pytest
import torch

from pgconv.cli import main
from pgconv.errors import InputError, PgconvWarning
from pgconv.model.config import PRESETS
from pgconv.model.hf_config import to_hf_config
from pgconv.parity.candidates import verify_candidate

from test_parity_fixtures import tiny_checkpoint  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.keras

VISION = {f"vision.{n}" for n in ("embed", "norm")} | {
    f"vision.blocks.{i}{s}" for i in range(2) for s in ("", ".norm1", ".attn", ".norm2", ".mlp")}
BEFORE_DECODER = VISION | {"projector", "image_features", "text.embed", "text.mask.full"}


@pytest.fixture(scope="module")
def kh():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    reason = "keras-hub not installed (pip install 'pgconv[keras]', or make test-keras)"
    kh = pytest.importorskip("keras_hub", reason=reason)
    pytest.importorskip("keras_hub.src.utils.transformers.preset_loader", reason=reason)  # + sentencepiece
    return kh


@pytest.fixture(scope="module")
def clean_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny fixture rebuilt by transformers with the RoPE wavelength and norm epsilons keras-hub hard-codes
    (10000, 1e-6): non-square attention all the same (head_dim 24 != 72 / 4 heads, 2 kv heads, 16 image tokens)."""
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    from pgconv.parity.calibrate import randomize_

    tiny = PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, rope_theta=10_000.0, rms_norm_eps=1e-6))
    out = tmp_path_factory.mktemp("ckpt") / "keras-clean"
    shutil.copytree(tiny_checkpoint("tiny"), out)
    hf = PaliGemmaForConditionalGeneration._from_config(HFConfig(**to_hf_config(cfg, dtype="float32")),
                                                        dtype=torch.float32)
    randomize_(hf, seed=3)
    saved = tmp_path_factory.mktemp("hf-save")
    hf.save_pretrained(saved)  # transformers 5's own layout: the adapter converts it to hf-legacy for keras-hub
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved / name, out / name)
    return out


def _rows(report):
    return {r["name"]: r for r in report["probes"]}


def test_missing_extra_is_one_line_error(monkeypatch, tiny_checkpoint):
    """Without keras-hub: one InputError naming the extra (no traceback through keras)."""
    from pgconv.parity.keras_hub import KerasHubCandidate

    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub -> ImportError
    with pytest.raises(InputError, match=r"pgconv\[keras\]") as e:
        KerasHubCandidate(tiny_checkpoint("tiny"), torch.float32, "cpu")
    assert "\n" not in str(e.value)


def test_keras_hub_converter_takes_num_image_tokens_as_head_dim(kh, tiny_checkpoint, tmp_path):
    """keras-hub's own loader, unaided, fails on a checkpoint whose head_dim (24) is not num_image_tokens (16): the
    bug the adapter reports and works around. If keras-hub fixes it this test says so (drop the override)."""
    import pgconv
    from pgconv.parity.keras_hub import converter_notes

    legacy = tmp_path / "legacy"
    pgconv.convert(tiny_checkpoint("tiny"), legacy, to="hf-legacy", quiet=True)
    hf = json.loads((legacy / "config.json").read_text())
    assert (hf["text_config"]["num_image_tokens"], hf["text_config"]["head_dim"]) == (16, 24)
    with pytest.raises(ValueError, match="cannot reshape"):
        kh.models.PaliGemmaBackbone.from_preset(str(legacy))
    notes = converter_notes(hf)
    assert any("num_image_tokens (16) as head_dim (24)" in n for n in notes)
    assert any("1664 of 1728 vocabulary rows" in n for n in notes)


def test_tiny_fixture_diverges_at_rope_wavelength(kh, tiny_checkpoint):
    """The tiny fixture (rope_theta 5000, rms_norm_eps 1e-5): keras-hub matches transformers to fp32 rounding
    through the vision tower, projector, merge and mask; its first decoder attention is the first divergence,
    contributing ~3 % nRMSE itself (RoPE wavelength fixed at 10000). The norms' epsilon 1e-6 (vs 1e-5) stays within
    budget; greedy tokens agree; no logits (vocabulary cut at image_token_index) and no RoPE table (0-based)."""
    with pytest.warns(PgconvWarning) as seen:  # the CLI prints each as `pgconv: warning: ...`
        report = verify_candidate(str(tiny_checkpoint("tiny")), "keras-hub", max_new_tokens=4)
    said = " | ".join(str(w.message) for w in seen)
    for what in ("as head_dim (24)", "RoPE wavelength 10000, the checkpoint rope_theta 5000",
                 "rms_norm_eps 1e-05", "1664 of 1728 vocabulary rows"):
        assert what in said
    rows = _rows(report)
    assert not report["passed"]
    assert report["first_divergence"]["name"] == "text.blocks.0.attn"
    for name in BEFORE_DECODER:
        assert rows[name]["passed"] and rows[name]["nrmse"] < 1e-6, name
    assert 0.01 < rows["text.blocks.0.attn"]["contributed_nrmse"] < 0.1
    assert not rows["text.blocks.1.attn"]["passed"]
    for i in range(2):  # the steps without RoPE match once fed transformers' values
        assert rows[f"text.blocks.{i}.mlp"]["contributed_nrmse"] < 1e-6
        assert rows[f"text.blocks.{i}.attn_norm"]["contributed_nrmse"] < 1e-5
    assert rows["text.norm"]["contributed_nrmse"] < 1e-6
    assert set(report["missing"]) == {"logits", "text.rope"}
    assert report["cases"][0]["generation"]["passed"]


def test_transformers_built_non_square_checkpoint_matches(kh, clean_checkpoint, capsys, tmp_path):
    """A transformers-saved checkpoint with keras-hub's fixed constants: every compared probe within the fp32
    budgets, greedy tokens equal, with head_dim != hidden / heads and 2 kv heads (the head_dim override applied),
    end to end through the CLI (exit 0). In bf16 every probe is within the bf16 budgets; the greedy tokens may part
    only at a near tie of transformers' own logits (measured: step 1, top-2 gap 0.016, half a bf16 ulp at 4)."""
    from pgconv.parity.candidates import compare_cases
    from pgconv.parity.golden import golden
    from pgconv.parity.keras_hub import KerasHubCandidate

    gdir = tmp_path / "golden-bf16"
    doc = golden(str(clean_checkpoint), gdir, dtype="bfloat16", max_new_tokens=4)
    with pytest.warns(PgconvWarning):
        cand = KerasHubCandidate(clean_checkpoint, torch.bfloat16, "cpu")
    bf16 = compare_cases(gdir, doc, cand, max_new_tokens=4)
    assert all(r["passed"] for r in bf16["probes"]), bf16["failures"]
    step = bf16["cases"][0]["generation"]["first_divergence"]
    if step is not None:
        top = doc["cases"][0]["generation"]["topk_logits"][step]
        assert top[0] - top[1] < 0.05, (step, top[:2])
    with pytest.warns(PgconvWarning, match="as head_dim"):
        report = verify_candidate(str(clean_checkpoint), "keras-hub", max_new_tokens=4)
    rows = _rows(report)
    assert report["passed"], report["failures"]
    assert report["first_divergence"] is None
    assert all(rows[f"text.blocks.{i}"]["contributed_nrmse"] < 1e-5 for i in range(2))
    assert max(r["nrmse"] for r in report["probes"]) < 1e-5
    assert set(report["missing"]) == {"logits", "text.rope"}
    with pytest.raises(SystemExit) as e:
        main(["verify", str(clean_checkpoint), "--candidate", "keras-hub"])
    assert e.value.code == 0, capsys.readouterr()


def test_refuses_what_keras_hub_cannot_load(kh, tiny_checkpoint, tmp_path):
    """PaliGemma 2 (keras-hub's converter is for PaliGemma 1) and image_token_index 0 (its vocabulary would have
    no rows; transformers' tester config) are one-line input errors, and the CLI exits 2."""
    from pgconv.parity.keras_hub import KerasHubCandidate

    from tester_checkpoints import pg_tester_checkpoint

    with pytest.raises(InputError, match="PaliGemma 1"):
        KerasHubCandidate(tiny_checkpoint("tiny-pg2"), torch.float32, "cpu")
    tester = pg_tester_checkpoint(tmp_path / "tester")
    with pytest.raises(InputError, match="image_token_index 0"):
        KerasHubCandidate(tester, torch.float32, "cpu")
    with pytest.raises(SystemExit) as e:
        main(["verify", str(tiny_checkpoint("tiny-pg2")), "--candidate", "keras-hub"])
    assert e.value.code == 2
