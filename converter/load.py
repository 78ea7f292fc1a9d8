"""Load a transformers PaliGemma checkpoint (or a live transformers model) into `pgconv.model.PaliGemma`, strictly.

Names go through the key layouts (data, `layouts.py`) via the same validated plan the converter uses, so a
missing, unexpected or mis-shaped tensor is an `InputError` that names it. The model is built on the meta
device and the loaded tensors are assigned as its parameters (`load_state_dict(assign=True)`), so weights
are in memory once. A tied `lm_head` is not a parameter of our model: logits use `text.embed.weight`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from pgconv.converter.checkpoint import Checkpoint, open_checkpoint, read_json
from pgconv.converter.hub import resolve_source
from pgconv.converter.layouts import detect_layout, to_native
from pgconv.converter.plan import Plan, plan_conversion
from pgconv.converter.sources import tensors_equal
from pgconv.errors import InputError, PgconvWarning
from pgconv.model.config import PaliGemmaConfig
from pgconv.model.generation_config import GenerationSettings, resolve_generation
from pgconv.model.hf_config import from_hf_config, to_hf_config

__all__ = ["load", "load_state_dict", "check_checkpoint", "build_model", "from_transformers", "auto_dtype",
           "generation_settings"]


def check_checkpoint(src: Path, trusted_root: Path | None = None) -> tuple[Checkpoint, PaliGemmaConfig, Plan]:
    """Every check `load` makes before reading tensor data: headers, index, paths, config, names, shapes, and a
    stored tied `lm_head` compared with the embedding. `pgconv verify` runs it before transformers opens the files.

    The config returned is the one transformers runs: a stored `lm_head` that differs from the embedding although
    the config ties them is kept untied, as transformers 5 does (it warns and does not tie them), and a
    `PgconvWarning` says so (`pgconv convert` still refuses such a checkpoint, see `untied_warning`)."""
    ckpt = open_checkpoint(src, trusted_root=trusted_root)
    ckpt.companion_files()  # refuses a tokenizer/config file that links out of the checkpoint
    cfg = ckpt.pg_config()
    # transformers reads it for generate's eos/pad ids but falls back silently when it is broken: say so instead.
    generation_settings(ckpt, cfg)
    try:
        plan = plan_conversion(ckpt.metas(), cfg, "native")
    except InputError as e:
        raise type(e)(f"{src}: {e}") from None
    if "pgconv.format" in (ckpt.metadata or {}):
        # Written by a pgconv spec (maybe with norm offsets): reading it as a plain layout could miss an offset.
        from pgconv.converter.custom import check_provenance

        check_provenance(ckpt.metadata, plan.src_layout, False, str(src))
    for d in plan.drops:
        if not tensors_equal(ckpt.tensors[d.source], ckpt.tensors[d.equals]):
            cfg = cfg.replace(tie_word_embeddings=False)
            plan = plan_conversion(ckpt.metas(), cfg, "native")
            # stacklevel 1: one line per process however many readers meet the same checkpoint (Python's default
            # filter shows a warning once per location and text).
            warnings.warn(untied_warning(ckpt.tensors[d.source].file, d.source, d.equals), PgconvWarning)
    return ckpt, cfg, plan


def untied_warning(file: Path, head: str, embed: str) -> str:
    return (f"{file}: tensor {head!r} differs from {embed!r} although the config ties them "
            "(tie_word_embeddings=true); using both untied, as transformers does")


def generation_settings(ckpt: Checkpoint, cfg: PaliGemmaConfig | None = None) -> GenerationSettings:
    """The settings transformers' `generate()` runs this checkpoint with (`model.generation_config`): from
    generation_config.json when it exists, else config.json's top level (`generation_config.resolve_generation`).
    A checkpoint without config.json gets the config.json pgconv would write for it."""
    gen = ckpt.root / "generation_config.json"
    generation = read_json(gen) if gen.exists() or gen.is_symlink() else None
    if generation is not None and not isinstance(generation, dict):
        raise InputError(f"{gen}: not a JSON object")
    config = ckpt.config if ckpt.config is not None else to_hf_config(cfg or ckpt.pg_config())
    return resolve_generation(config, generation, config_name=str(ckpt.root / "config.json"),
                              generation_name=str(gen))


def auto_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype transformers' `from_pretrained(dtype="auto")` loads a checkpoint in: config.json's `dtype` (or
    4.x's `torch_dtype`) when stated, else the first floating tensor's of the first weight file in name order. So a
    bf16 checkpoint with fp32 norms runs in one dtype, the one transformers runs it in."""
    from pgconv.converter.dtypes import FLOAT_CODES, torch_dtype

    config = ckpt.config or {}
    stated = config.get("dtype") or config.get("torch_dtype")  # from_hf_config checked it is a dtype name
    if isinstance(stated, str):
        return getattr(torch, stated)
    first = min(ckpt.files, key=lambda f: f.name)
    for name in sorted(n for n, t in ckpt.tensors.items() if t.file == first):
        if ckpt.tensors[name].meta.dtype in FLOAT_CODES:
            return torch_dtype(ckpt.tensors[name].meta.dtype)
    return torch.float32


def load_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> tuple[PaliGemmaConfig, dict[str, torch.Tensor]]:
    """(config, native state dict) of a checkpoint directory, weight file or hub id, cast to `dtype` (default: the
    one transformers' `dtype="auto"` picks, `auto_dtype`).

    Tensors are read one at a time (and cast right away), so peak memory is the result plus one tensor.
    """
    _, cfg, sd = _read(path, dtype)
    return cfg, sd


def _read(path: str | Path, dtype: torch.dtype | None) -> tuple[Checkpoint, PaliGemmaConfig, dict[str, torch.Tensor]]:
    ckpt, cfg, plan = check_checkpoint(*resolve_source(path))
    if dtype is None:
        dtype = auto_dtype(ckpt)
    sd: dict[str, torch.Tensor] = {}
    for step in plan.steps:
        t = ckpt.tensors[step.sources[0]].load()
        sd[step.target.name] = t if dtype is None else t.to(dtype)
    return ckpt, cfg, sd


def build_model(cfg: PaliGemmaConfig, state_dict: Mapping[str, torch.Tensor], device: str | torch.device | None = None):
    """A `PaliGemma` whose parameters *are* the given tensors (no copy when they already sit on `device`).

    Built on the meta device, then `load_state_dict(strict=True, assign=True)`; names and shapes are checked
    first so that an error names the tensor instead of printing torch's list.
    """
    from pgconv.model.paligemma import PaliGemma

    with torch.device("meta"):
        model = PaliGemma(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = [f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}"] if missing else []
        parts += [f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}"] if unexpected else []
        raise InputError("state dict does not fit the model: " + "; ".join(parts))
    for name, t in state_dict.items():
        if tuple(t.shape) != expected[name]:
            raise InputError(f"tensor {name!r} has shape {list(t.shape)}; the model expects {list(expected[name])}")
    sd = dict(state_dict)
    if device is not None:
        for name in sd:  # one tensor at a time: the CPU copy is freed before the next one moves
            sd[name] = sd[name].to(device)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load(path_or_hub_id: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Read a transformers PaliGemma checkpoint (any known layout, single file or sharded, or a hub id); the
    model's `generation` holds the generation settings transformers would use (`generation_settings`)."""
    ckpt, cfg, sd = _read(path_or_hub_id, dtype)
    model = build_model(cfg, sd, device)
    model.generation = generation_settings(ckpt, cfg)
    return model


def from_transformers(hf_model: torch.nn.Module):
    """Our model sharing weight storage with a live transformers `PaliGemmaForConditionalGeneration`.

    Each of our parameters is a view of the same storage as the corresponding transformers parameter (no
    copy, same dtype and device), so both models always hold identical weights (for the parity harness).
    """
    cfg = from_hf_config(hf_model.config.to_dict())
    sd = hf_model.state_dict()  # detached tensors sharing storage with the parameters
    native = to_native(sd, cfg, detect_layout(sd))
    return build_model(cfg, native, device=None)
