"""The mlx-vlm candidate (parity/mlx_vlm.py, an adapter file: `pgconv verify CKPT --candidate parity/mlx_vlm.py`):
mlx-vlm's PaliGemma on MLX's CPU backend, loaded by mlx-vlm's own loader, against transformers' golden activations.
The measured agreement is asserted: where mlx-vlm matches, and the first divergence with its cause.

Needs `mlx[cpu]` and mlx-vlm (`pip install 'mlx[cpu]' && pip install --no-deps mlx-vlm`); skipped without."""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys

import pytest
import torch

import pgconv.parity.mlx_vlm as adapter
from pgconv.errors import InputError, PgconvWarning
from pgconv.model.config import PRESETS
from pgconv.model.hf_config import to_hf_config
from pgconv.parity.candidates import verify_candidate

from test_parity_fixtures import tiny_checkpoint  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.mlx

REASON = "mlx-vlm not installed (pip install 'mlx[cpu]' && pip install --no-deps mlx-vlm)"


@pytest.fixture(scope="module")
def mlx():
    try:  # not importorskip: importing mlx-vlm's models patches transformers' AutoProcessor (the adapter undoes it)
        return adapter.import_mlx()
    except InputError:
        pytest.skip(REASON)


def test_transformers_processor_left_alone(mlx, square_heads):
    """After the candidate loaded, transformers' AutoProcessor is transformers' own again (mlx-vlm's import
    replaces it with one returning MLX arrays: every later golden run broke)."""
    from PIL import Image
    from transformers import AutoProcessor

    adapter.MlxVlmCandidate(square_heads, torch.float32, "cpu")
    processor = AutoProcessor.from_pretrained(square_heads)
    enc = processor(text="cap", images=[Image.new("RGB", (28, 28))], return_tensors="pt")
    assert isinstance(enc["input_ids"], torch.Tensor)


@pytest.fixture(scope="module")
def square_heads(tiny_checkpoint, tmp_path_factory):
    """The tiny fixture rebuilt by transformers with head_dim = 72 / 4 heads = 18 (mlx-vlm's Gemma assumes it),
    2 kv heads, RoPE base 10000: what is left to differ is mlx-vlm's own modelling."""
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    from pgconv.parity.calibrate import randomize_

    tiny = PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, head_dim=18, rope_theta=10_000.0))
    out = tmp_path_factory.mktemp("ckpt") / "mlx-square"
    shutil.copytree(tiny_checkpoint("tiny"), out)
    hf = PaliGemmaForConditionalGeneration._from_config(HFConfig(**to_hf_config(cfg, dtype="float32")),
                                                        dtype=torch.float32)
    randomize_(hf, seed=5)
    saved = tmp_path_factory.mktemp("hf-save")
    hf.save_pretrained(saved)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved / name, out / name)
    return out


def _verify(ckpt):
    with pytest.warns(PgconvWarning) as seen:
        report = verify_candidate(str(ckpt), adapter.__file__, max_new_tokens=2)
    return report, {r["name"]: r for r in report["probes"]}, " | ".join(str(w.message) for w in seen)


def test_missing_mlx_is_one_line_error(monkeypatch, tiny_checkpoint):
    monkeypatch.setitem(sys.modules, "mlx_vlm.utils", None)
    with pytest.raises(InputError, match="mlx-vlm") as e:
        adapter.MlxVlmCandidate(tiny_checkpoint("tiny"), torch.float32, "cpu")
    assert "\n" not in str(e.value)


def test_image_features_scaled_by_default_hidden_size(mlx, square_heads):
    """mlx-vlm matches transformers to fp32 rounding in every step but one: the merge scales the image features by
    sqrt(text width / 2048) (the config's top-level hidden_size, absent here, defaults to 2048), so the first
    divergence is image_features with nRMSE exactly 1 - sqrt(72 / 2048); every later step, fed transformers'
    values, matches (the logits included)."""
    report, rows, said = _verify(square_heads)
    assert "sqrt(72 / 2048)" in said
    assert report["first_divergence"]["name"] == "image_features"
    assert rows["image_features"]["contributed_nrmse"] == pytest.approx(1 - math.sqrt(72 / 2048), abs=1e-5)
    assert not rows["text.embed"]["passed"]
    failing = {n for n, r in rows.items() if not r["passed"]}
    assert failing == {"image_features", "text.embed"}
    for name, r in rows.items():
        if name.startswith("vision.") or name == "projector":
            assert r["nrmse"] < 1e-5, name
        if name not in failing and r["contributed_nrmse"] is not None:
            assert r["contributed_nrmse"] < 1e-5, name
    assert report["missing"] == ["text.rope"]


def test_refuses_head_dim_it_cannot_load(mlx, tiny_checkpoint):
    """The tiny fixture's head_dim 24 != 72 / 4: mlx-vlm's Gemma attention would not fit the weights."""
    with pytest.raises(InputError, match=r"head_dim = hidden_size / num_heads \(18\).* is 24"):
        adapter.MlxVlmCandidate(tiny_checkpoint("tiny"), torch.float32, "cpu")


def test_paligemma2_rope_base_from_rope_parameters_ignored(mlx, tiny_checkpoint):
    """tiny-pg2 (rope_theta 5000 in transformers 5's rope_parameters): besides the image scaling, each decoder
    attention contributes 1-10 % nRMSE itself (mlx-vlm's RoPE base stays 10000); the norms and MLPs match."""
    report, rows, said = _verify(tiny_checkpoint("tiny-pg2"))
    assert "RoPE base 10000, the checkpoint's 5000" in said and "no sliding window" in said
    assert report["first_divergence"]["name"] == "image_features"
    for i in range(3):
        assert 0.005 < rows[f"text.blocks.{i}.attn"]["contributed_nrmse"] < 0.1
        for sub in ("attn_norm", "post_attn_norm", "mlp", "post_mlp_norm"):
            assert rows[f"text.blocks.{i}.{sub}"]["contributed_nrmse"] < 1e-5, (i, sub)
    assert rows["logits"]["contributed_nrmse"] < 1e-5
