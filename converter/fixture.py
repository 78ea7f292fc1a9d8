"""Offline, deterministic transformers-format PaliGemma checkpoints with random weights.

`make_fixture(dir, preset)` writes config.json, safetensors weights in the hub's legacy layout
(`vision_tower.vision_model.*`, `multi_modal_projector.linear.*`, `language_model.model.*`, no lm_head: tied),
a real small tokenizer (`tokenizer_fixture.py`), preprocessor_config.json and generation_config.json.
Tiny presets are fp32 in one file; full-size presets are bf16, sharded like `save_pretrained` (5 GB decimal shards,
`model.safetensors.index.json`), streamed chunk by chunk so no tensor is ever fully in memory.

Random values: every tensor has its own PCG64 stream seeded by (seed, crc32(native name)), so values do not depend
on write order or chunk size. Each 16 random bits pick a normal quantile `mean + std * Phi^-1((u + 0.5) / 65536)`
from a 65536-entry table (inverse-transform sampling at 16-bit resolution, which is all bf16 can hold anyway);
this is ~5x faster than sampling normals and makes the 3B preset a ~30 s write. The scales (`INIT`) give the tiny
model sharp, varied logits so greedy outputs are well separated and not one repeated token.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist

import numpy as np

from pgconv.converter.layouts import key_map, native_shapes
from pgconv.converter.safetensors_io import build_header
from pgconv.converter.sources import TensorMeta
from pgconv.converter.staging import publish, reap_stale, temp_sibling
from pgconv.converter.tokenizer_fixture import write_tokenizer
from pgconv.errors import InputError
from pgconv.model.config import PRESETS, PaliGemmaConfig
from pgconv.model.hf_config import to_hf_config

__all__ = ["FIXTURE_FORMAT", "INIT", "FixturePlan", "Shard", "plan_fixture", "make_fixture", "default_checkpoint",
           "default_image", "cache_dir"]

FIXTURE_FORMAT = 1  # bump when the files a preset+seed produce change (it names the default-checkpoint cache dir)
MAX_SHARD_BYTES = 5_000_000_000  # transformers save_pretrained default "5GB" (decimal units)
TINY_PRESETS = ("tiny", "tiny-pg2")
LAYOUT = "hf-legacy"
_CHUNK = 1 << 22  # elements per generated chunk (a multiple of 4: one 64-bit raw draw gives four 16-bit uniforms)

# (pattern on the native name, mean, scale, fan_in): std = scale / sqrt(fan_in) when fan_in else scale; first match wins.
# Chosen on the tiny presets so that greedy decoding varies with the prompt and logits are well separated:
INIT: list[tuple[str, float, float, bool]] = [
    # Final-norm gains (1 + w) ~ N(0, 3) with random signs: with gains ~1 the tied lm_head mostly scores each
    # position's own input embedding highest, and greedy decoding repeats the last prompt token forever.
    ("text.norm.weight", -1.0, 3.0, False),
    ("vision.*norm*.weight", 1.0, 0.1, False),  # LayerNorm gains around 1
    ("vision.*norm*.bias", 0.0, 0.05, False),
    ("text.*norm*.weight", 0.0, 0.1, False),  # Gemma RMSNorm scales by (1 + w)
    ("*.bias", 0.0, 0.02, False),
    ("vision.pos_embed.weight", 0.0, 0.1, False),
    # Small embeddings and strong residual writers, so the layers (not the input token) dominate the residual stream.
    ("text.embed.weight", 0.0, 0.3, False),
    ("text.blocks.*.attn.o.weight", 0.0, 4.0, True),
    ("text.blocks.*.mlp.down.weight", 0.0, 4.0, True),
    ("*", 0.0, 1.0, True),
]

_DTYPES = {"float32": ("F32", "<f4", 4), "bfloat16": ("BF16", "<u2", 2), "float16": ("F16", "<f2", 2)}


@dataclass(frozen=True)
class Tensor:
    name: str  # name in the checkpoint (hf-legacy layout)
    native: str
    shape: tuple[int, ...]
    mean: float
    std: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: tuple[Tensor, ...]


@dataclass(frozen=True)
class FixturePlan:
    preset: str
    config: PaliGemmaConfig
    dtype: str  # "float32" | "bfloat16" | "float16"
    shards: tuple[Shard, ...]

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][2]

    @property
    def total_parameters(self) -> int:
        return sum(t.numel for s in self.shards for t in s.tensors)

    @property
    def total_size(self) -> int:
        return self.total_parameters * self.itemsize

    def index(self) -> dict | None:
        """`model.safetensors.index.json` content as transformers 5.x writes it; None for a single file."""
        if len(self.shards) == 1:
            return None
        weight_map = {t.name: s.filename for s in self.shards for t in s.tensors}
        return {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                "weight_map": weight_map}


def _parse_dtype(dtype: object | None, preset: str) -> str:
    if dtype is None:
        return "float32" if preset in TINY_PRESETS else "bfloat16"
    name = str(dtype).removeprefix("torch.")
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(name, name)
    if name not in _DTYPES:
        raise InputError(f"fixture dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return name


def _config(preset: str) -> PaliGemmaConfig:
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


def _init(native: str, shape: tuple[int, ...]) -> tuple[float, float]:
    for pattern, mean, scale, fan_in in INIT:
        if fnmatchcase(native, pattern):
            return mean, (scale / math.sqrt(math.prod(shape[1:])) if fan_in else scale)
    raise AssertionError(native)  # "*" always matches


def plan_fixture(preset: str = "tiny", dtype: object | None = None) -> FixturePlan:
    """Every file, tensor name, shape and init scale `make_fixture` would write, without writing anything."""
    cfg, dtype = _config(preset), _parse_dtype(dtype, preset)
    names, shapes = key_map(cfg, LAYOUT), native_shapes(cfg)
    tensors = sorted((Tensor(names[n], n, s, *_init(n, s)) for n, s in shapes.items()), key=lambda t: t.name)
    itemsize = _DTYPES[dtype][2]
    # huggingface_hub split_state_dict_into_shards: in order, start a new shard when the next tensor would overflow.
    groups: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.numel * itemsize
        if groups[-1] and size + nbytes > MAX_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    if len(groups) == 1:
        shards = (Shard("model.safetensors", tuple(groups[0])),)
    else:
        n = len(groups)
        shards = tuple(Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups))
    return FixturePlan(preset, cfg, dtype, shards)


@lru_cache(maxsize=1)
def _quantiles() -> np.ndarray:
    nd = NormalDist()
    return np.array([nd.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float64)


@lru_cache(maxsize=64)
def _table(mean: float, std: float, dtype: str) -> np.ndarray:
    values = (mean + std * _quantiles()).astype(np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        return values.astype(ml_dtypes.bfloat16).view("<u2")  # round-to-nearest-even, like torch's .to(bfloat16)
    return values.astype(_DTYPES[dtype][1])


def _chunks(t: Tensor, seed: int, dtype: str):
    """The tensor's values (flat, row-major, little-endian) in chunks of at most `_CHUNK` elements."""
    stream = np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(t.native.encode())]))
    table = _table(t.mean, t.std, dtype)
    for start in range(0, t.numel, _CHUNK):
        n = min(_CHUNK, t.numel - start)
        u16 = stream.random_raw((n + 3) // 4).astype("<u8", copy=False).view("<u2")[:n]
        yield np.take(table, u16)


def _write_shard(path: Path, shard: Shard, seed: int, dtype: str) -> None:
    code = _DTYPES[dtype][0]
    metas = [TensorMeta(t.name, t.shape, code) for t in shard.tensors]
    prefix, offsets = build_header(metas, {"format": "pt"})  # the converter's writer: byte-identical to safetensors
    with open(path, "wb") as f:
        f.write(prefix)
        for t in sorted(shard.tensors, key=lambda t: offsets[t.name]):
            for chunk in _chunks(t, seed, dtype):
                f.write(memoryview(chunk))  # no bytes copy


def _json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_files(out: Path, plan: FixturePlan, seed: int) -> None:
    cfg = plan.config
    _json(out / "config.json", to_hf_config(cfg, dtype=plan.dtype))
    eos = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    _json(out / "generation_config.json",
          {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id})
    size = cfg.vision.image_size
    _json(out / "preprocessor_config.json", {
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": cfg.num_image_tokens, "processor_class": "PaliGemmaProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": size, "width": size},
    })
    # Hub PaliGemma 1 tokenizers add <bos> by default, PaliGemma 2 ones do not (trap 14).
    write_tokenizer(out, base=cfg.image_token_index - 1152, add_bos_token=cfg.family == "gemma")
    for shard in plan.shards:
        _write_shard(out / shard.filename, shard, seed, plan.dtype)
    if (index := plan.index()) is not None:
        _json(out / "model.safetensors.index.json", index)


def make_fixture(directory: str | os.PathLike, preset: str = "tiny", seed: int = 0, dtype: object | None = None,
                 *, force: bool = False) -> Path:
    """Write a complete random-weight transformers checkpoint for `preset` into `directory`; returns its path.

    Deterministic (same preset, seed and dtype give byte-identical files) and atomic (written into a temporary
    sibling directory, then renamed). An existing non-empty `directory` is refused unless `force`.
    """
    out = Path(directory).expanduser().absolute()
    plan = plan_fixture(preset, dtype)
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"fixture seed must be a non-negative integer, got {seed!r}")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"{out}: directory is not empty (pass force=True / --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise InputError(f"{out.parent}: not writable")
        # Weights plus the tokenizer (about 300 bytes per vocabulary entry) and small JSON files.
        need = plan.total_size + 300 * plan.config.text.vocab_size + (1 << 20)
        if (free := shutil.disk_usage(out.parent).free) < need:
            raise InputError(f"{out.parent}: not enough free space ({free / 1e9:.2f} GB free, {need / 1e9:.2f} GB needed)")
        reap_stale(out)
        tmp = temp_sibling(out, "tmp")
        tmp.mkdir()
    except OSError as e:  # parent is a file, permissions, read-only filesystem
        raise InputError(f"{out.parent}: cannot create the fixture there ({e.strerror or e})") from None
    try:
        _write_files(tmp, plan, seed)
        _replace_dir(tmp, out, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # full disk mid-write: one line, exit 2, nothing left behind (issue 8)
            raise InputError(f"{out}: write failed ({e.strerror or e})") from None
        raise
    return out


def _replace_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename `tmp` to `out` atomically. Without `force`, rename(2) itself replaces only a missing or empty `out`:
    a non-empty one that appeared meanwhile (another fixture run finished first) fails instead of being replaced.
    With `force`, `publish` swaps it out."""
    if force:
        publish(tmp, out, force=True)
        return
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise InputError(f"{out}: another process wrote there while this fixture was being written (use "
                             "--force to replace it)") from None
        raise


# ---------------------------------------------------------------------------------------------------------------------
# Built-in default checkpoint and image


def cache_dir() -> Path:
    """$PGCONV_CACHE, else $XDG_CACHE_HOME/pgconv, else ~/.cache/pgconv."""
    if env := os.environ.get("PGCONV_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pgconv"


def default_checkpoint() -> Path:
    """The tiny fixture (seed 0) in the user cache, created on first use; safe when several processes race."""
    from pgconv import __version__

    out = cache_dir() / f"tiny-fixture-v{FIXTURE_FORMAT}-pgconv{__version__}"
    if (out / "config.json").is_file():
        return out
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        reap_stale(out)
        tmp = temp_sibling(out, "tmp")
        tmp.mkdir()
        _write_files(tmp, plan_fixture("tiny"), seed=0)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a lost race: something else is in the way
                raise InputError(f"{out}: cannot create the default checkpoint (path exists and is not a fixture)")
    except OSError as e:  # unwritable or full cache directory: one line, not a traceback (issue 8)
        raise InputError(f"{out.parent}: cannot create the built-in tiny checkpoint ({e.strerror or e}); "
                         "set PGCONV_CACHE to a writable directory") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_image() -> Path:
    """A small built-in, non-square RGB test image (PNG)."""
    from importlib.resources import files

    return Path(str(files("pgconv.model") / "assets" / "test_image.png"))
