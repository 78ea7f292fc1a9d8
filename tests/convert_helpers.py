"""Checkpoint builders and independent readers for the converter tests.

Sources are written with huggingface_hub / safetensors / transformers (never with pgconv's writer) and read
back with `safetensors.safe_open`, so the converter is checked against independent code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open

from pgconv.converter.plan import expected_shapes
from pgconv.model.config import PaliGemmaConfig
from pgconv.model.hf_config import to_hf_config

__all__ = ["random_bits", "random_state", "write_checkpoint", "read_tensors", "hf_model", "tree_digest",
           "tiny_inputs", "TORCH_DTYPES"]

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, infinities, subnormals, -0): a byte-exact copy must keep them all."""
    size = torch.empty((), dtype=dtype).element_size()
    ints = torch.randint(-(2 ** 15), 2 ** 15, shape, generator=g, dtype=torch.int64).to(_INT_VIEW[size])
    return ints.view(dtype)


def random_state(cfg: PaliGemmaConfig, layout: str, dtype: str = "F32", *, seed: int = 0, bits: bool = True,
                 with_lm_head: bool | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dt = TORCH_DTYPES[dtype]
    out = {}
    for name, shape in expected_shapes(cfg, layout, with_lm_head=with_lm_head).items():
        out[name] = random_bits(shape, dt, g) if bits else torch.randn(shape, generator=g).to(dt)
    return out


def write_checkpoint(path: Path, cfg: PaliGemmaConfig, sd: dict[str, torch.Tensor], *, shard_size: str | int = "5GB",
                     dtype: str = "float32", extra_files: dict[str, str] | None = None) -> Path:
    """A transformers-style checkpoint: config.json + huggingface_hub-written safetensors (sharded if needed)."""
    path.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(sd, path, max_shard_size=shard_size)
    (path / "config.json").write_text(json.dumps(to_hf_config(cfg, dtype), indent=2))
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = s.get_tensor(k)
    return out


def hf_model(cfg: PaliGemmaConfig, seed: int = 0):
    """transformers' model for `cfg`, float32 eager, with every parameter random (not just the init)."""
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(HFConfig(**to_hf_config(cfg, "float32"), attn_implementation="eager"))
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def tiny_inputs(cfg: PaliGemmaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = cfg.num_image_tokens
    ids = torch.cat([torch.full((1, n), cfg.image_token_index), torch.tensor([[cfg.bos_token_id, 5, 6, 7, 8, 10]])], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g),
            "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (relative names), to prove a directory was not touched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def hub_cache(root: Path, repo: str, files: Path) -> Path:
    """A huggingface_hub cache entry for `repo` whose snapshot files link into blobs/, like a real download; returns
    the snapshot directory."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "blobs").mkdir()
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    for i, f in enumerate(sorted(files.iterdir())):
        blob = base / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap
