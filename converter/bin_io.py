"""`pytorch_model*.bin` reader: only through `torch.load(weights_only=True)`, never a full unpickle.

`mmap=True` keeps tensor storages on disk until a tensor is used, so planning costs no tensor bytes.
Tensors in a `.bin` may be views of shared storages, so sources carry a loader and no byte span (the writer
materialises them one at a time instead of copying a byte range).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from pgconv.converter.dtypes import DTYPES, code_of
from pgconv.converter.sources import SourceTensor, TensorMeta
from pgconv.errors import InputError

__all__ = ["read_bin"]


def read_bin(path: Path) -> tuple[dict[str, str], dict[str, SourceTensor]]:
    """(metadata, tensors) of a torch-saved state dict, loaded safely and memory-mapped."""
    import torch

    _check_zip_crcs(path)
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: our error line says it all
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # damaged input makes torch.load raise almost anything (KeyError, IndexError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: cannot load as a torch weights-only checkpoint ({first})") from None
    if not isinstance(sd, dict):
        raise InputError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    out: dict[str, SourceTensor] = {}
    for name, t in sd.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise InputError(f"{path}: entry {name!r} is not a named tensor")
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized:
            # a sparse/quantized tensor, or one saved on the meta device (no data at all): nothing to convert
            raise InputError(f"{path}: tensor {name!r} is not a dense CPU tensor (layout {t.layout}, device "
                             f"{t.device.type})")
        if t.dtype not in {d.torch for d in DTYPES.values()}:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        code = code_of(t.dtype)
        meta = TensorMeta(name, tuple(t.shape), code)
        out[name] = SourceTensor(meta, path, loader=lambda t=t: t.contiguous())
    return {}, out


def _check_zip_crcs(path: Path) -> None:
    """Every member of a zip-format `.bin` against its CRC-32: `torch.load(mmap=True)` maps tensor bytes without
    checking them, so a corrupted file would otherwise convert silently (the `.npz` reader checks the same way).
    One read of the file; legacy non-zip `.bin` files carry no checksums."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    while f.read(16 << 20):
                        pass
    except zipfile.BadZipFile as e:  # a CRC mismatch, a broken entry
        raise InputError(f"{path}: corrupt zip archive ({e})") from None
    except (OSError, EOFError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None

