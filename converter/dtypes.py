"""Tensor dtypes by their safetensors code ("BF16", "F32", ...), the neutral name every reader and writer uses.

Readers of other formats (torch `.bin`, big_vision `.npz`) translate into these codes so that a plan never
depends on the file format. `RUST_ORDER` is the safetensors 0.8 Rust `Dtype` enum order; its writer sorts
tensors by descending dtype, then name (checked against `safetensors.torch.save_file`).
torch is imported only when a torch dtype is asked for: a same-dtype conversion never imports it (its shared
libraries alone are ~250 MB of resident memory and seconds of start-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgconv.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = ["DType", "DTYPES", "RUST_ORDER", "FLOAT_CODES", "code_of", "torch_dtype", "itemsize", "parse_dtype",
           "is_widening"]


@dataclass(frozen=True)
class DType:
    code: str
    torch_name: str  # attribute of the torch module
    itemsize: int
    is_float: bool

    @property
    def torch(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.torch_name)


DTYPES: dict[str, DType] = {
    d.code: d
    for d in [
        DType("BOOL", "bool", 1, False),
        DType("U8", "uint8", 1, False),
        DType("I8", "int8", 1, False),
        DType("F8_E5M2", "float8_e5m2", 1, True),
        DType("F8_E4M3", "float8_e4m3fn", 1, True),
        DType("I16", "int16", 2, False),
        DType("U16", "uint16", 2, False),
        DType("F16", "float16", 2, True),
        DType("BF16", "bfloat16", 2, True),
        DType("I32", "int32", 4, False),
        DType("U32", "uint32", 4, False),
        DType("F32", "float32", 4, True),
        DType("F64", "float64", 8, True),
        DType("I64", "int64", 8, False),
        DType("U64", "uint64", 8, False),
    ]
}
RUST_ORDER: dict[str, int] = {code: i for i, code in enumerate(DTYPES)}
# Weights pgconv converts; 8-bit floats are readable but would need a scale, so they are not weight dtypes here.
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_BY_TORCH_NAME = {d.torch_name: d.code for d in DTYPES.values()}
# User-facing names accepted by --dtype (and the torch names).
_NAMES = {"float32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16"}
# Casts that represent every source value exactly (no max |delta| to measure).
_WIDENING = {("F16", "F32"), ("BF16", "F32"), ("F16", "F64"), ("BF16", "F64"), ("F32", "F64")}


def code_of(dtype: "torch.dtype") -> str:
    try:
        return _BY_TORCH_NAME[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise InputError(f"unsupported tensor dtype {dtype}") from None


def torch_dtype(code: str) -> "torch.dtype":
    return DTYPES[code].torch


def itemsize(code: str) -> int:
    return DTYPES[code].itemsize


def parse_dtype(value: "str | torch.dtype | None") -> str | None:
    """`None`, a torch float dtype or a name ("float32", "bf16", "F16") -> safetensors code."""
    if value is None:
        return None
    if not isinstance(value, str):  # a torch.dtype
        code = _BY_TORCH_NAME.get(str(value).removeprefix("torch."))
    else:
        code = _NAMES.get(value.lower()) or (value.upper() if value.upper() in FLOAT_CODES[:3] else None)
    if code not in FLOAT_CODES[:3]:
        raise InputError(f"unsupported target dtype {value!r}; use float32, bfloat16 or float16")
    return code


def is_widening(src: str, dst: str) -> bool:
    return src == dst or (src, dst) in _WIDENING
