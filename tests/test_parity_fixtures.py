"""Checkpoints for the parity tests (pytest fixtures; imported by the test modules that use them).

`tiny_checkpoint(preset)` writes the offline fixture of a tiny preset once per session. `square_checkpoint` is the
tiny fixture with vision width == text width (72), so a transposed projector keeps its shape and only the values
can tell (its weights are randomised in transformers and saved with `save_pretrained`, tokenizer files kept).
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from pgconv.converter.fixture import make_fixture
from pgconv.model.config import PRESETS
from pgconv.model.hf_config import to_hf_config


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    made: dict[str, object] = {}

    def get(preset: str):
        if preset not in made:
            made[preset] = make_fixture(tmp_path_factory.mktemp("ckpt") / preset, preset)
        return made[preset]

    return get


@pytest.fixture(scope="session")
def square_checkpoint(tiny_checkpoint, tmp_path_factory):
    import torch
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    from pgconv.parity.calibrate import randomize_

    tiny = PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, hidden_size=72, intermediate_size=96))
    out = tmp_path_factory.mktemp("ckpt") / "square"
    shutil.copytree(tiny_checkpoint("tiny"), out)
    hf_cfg = HFConfig(**to_hf_config(cfg, dtype="float32"))
    hf = PaliGemmaForConditionalGeneration._from_config(hf_cfg, dtype=torch.float32)
    randomize_(hf, seed=1)
    saved = tmp_path_factory.mktemp("hf-save")
    hf.save_pretrained(saved)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved / name, out / name)
    return out
