"""The weight half of `pgconv diff A B`: both checkpoints as native tensors, compared one tensor pair at a time.

Any source pgconv reads (the HF layouts, native, big_vision `.npz`, a spec'd format, a checkpoint without
config.json) is opened as `pgconv convert` opens it and mapped to native names (`open_native`). Per tensor
(`compare_tensor`): identical (equal values, whatever the stored dtypes), within rounding, or differing with max
|delta|, relative error (||B - A|| / ||A||) and the ulp distance at the narrower dtype, plus what went wrong
(`converter.diagnose`).

"Within <dtype> rounding" is derived from the cast, not a tolerance: every value of B must be representable in
<dtype> and a nearest <dtype> value to A's (A rounded to nearest, or at an exact tie the other neighbour), i.e.
|B - A| <= u |A| with u the unit roundoff (2^-8 for bfloat16, 2^-11 for float16; half the smallest subnormal below
the normal range). A truncating converter (up to 2u |A|, all toward zero: a bias that adds up through the layers)
differs, with that diagnosis; a bug (a scale of 1.001, a sibling tensor) is many ulps away almost everywhere.
<dtype> is the narrower of the two stored dtypes, or bfloat16 / float16 when B is stored wider but holds A rounded
to it. Values a cast sends to inf (|A| > 65504 for float16) or flushes to zero (a subnormal that rounding would have
kept) are a lossy cast and counted, whatever the rest of the tensor does.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgconv.errors import InputError

__all__ = ["NativeSource", "open_native", "compare_tensor", "diff_weights", "ulp_distance", "config_differences"]

_CHUNK = 1 << 24  # elements per piece for the bulk identical check (bounded temporaries at 3B)
_PIECE = 1 << 22  # elements per piece for the float64 statistics (~10 float64 temporaries each: ~320 MB)
_ORDER = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # widest first (bf16: fewest mantissa bits)


@dataclasses.dataclass
class NativeSource:
    path: Path
    layout: str  # the layout or spec its names are read through
    cfg: Any  # PaliGemmaConfig
    config: dict | None  # the config.json transformers would run it with
    tensors: dict[str, Any]  # native name -> SourceTensor (lazy)
    root: Path
    unmapped: list[str] = dataclasses.field(default_factory=list)  # stored names its layout has no place for
    lenient: str | None = None  # why the strict reading failed (tensors missing or unexpected), when it did


def open_native(src: str | Path, from_: str | Path | None = None) -> NativeSource:
    """`src` opened as `pgconv convert` reads a source (`from_`: through that spec, as `convert --from`), with every
    tensor under its native name (no data read)."""
    from pgconv.converter.checkpoint import source_spec
    from pgconv.converter.hub import resolve_source
    from pgconv.converter.plan import TRANSFORMS, plan_conversion

    path, trusted = resolve_source(src)
    spec = source_spec(path, trusted, from_, None)
    if spec is None:
        from pgconv.converter.layouts import LayoutError
        from pgconv.converter.load import check_checkpoint

        try:
            ckpt, cfg, plan = check_checkpoint(path, trusted)  # tied head compared, provenance, companions checked
        except InputError as e:
            # Tensors missing, unexpected (LayoutError) or shaped otherwise than the config says (plan's "the config
            # implies"): what a conversion bug looks like, so a finding of the diff, not bad input. Every other
            # error (unreadable files, a bad config, a spec's offsets) stays one.
            if not (isinstance(e, LayoutError) or "the config implies" in str(e)):
                raise
            return _lenient(path, trusted, e)
        layout = plan.src_layout
    else:
        from pgconv.converter.custom import open_spec_checkpoint

        ckpt = open_spec_checkpoint(path, spec, None)
        cfg = ckpt.pg_config()
        try:
            plan = plan_conversion(ckpt.metas(), cfg, "native")
        except InputError as e:
            raise type(e)(f"{path}: {e}") from None
        layout = ckpt.spec.name if getattr(ckpt, "spec", None) else str(spec)
    tensors = {}
    for step in plan.steps:
        if step.transform == "identity":
            tensors[step.target.name] = ckpt.tensors[step.sources[0]]
        else:  # not met for native targets today; kept honest should a layout gain one
            t = TRANSFORMS[step.transform]
            srcs = [ckpt.tensors[s] for s in step.sources]
            tensors[step.target.name] = dataclasses.replace(
                srcs[0], meta=step.target, span=None,
                loader=lambda t=t, s=srcs, a=step.args: t.apply([x.load() for x in s], a))
    return NativeSource(path, layout, cfg, ckpt.config, tensors, ckpt.root)


def _lenient(path: Path, trusted: Path | None, error: Exception) -> NativeSource:
    """A checkpoint whose names fit its layout except for missing or unexpected tensors: every name the layout
    knows, renamed (an lm_head whatever the tying: the diff compares it with the embedding), the rest listed."""
    from pgconv.converter.checkpoint import open_checkpoint
    from pgconv.converter.layouts import detect_layout, head_shapes, key_map

    ckpt = open_checkpoint(path, trusted_root=trusted)
    cfg = ckpt.pg_config()
    try:
        layout = detect_layout(ckpt.tensors)
    except InputError:
        raise type(error)(f"{path}: {error}") from None
    names = {theirs: ours for ours, theirs in key_map(cfg, layout, with_lm_head=True).items()}
    head = head_shapes(cfg, layout)
    return NativeSource(path, layout, cfg, ckpt.config, {names[n]: t for n, t in ckpt.tensors.items() if n in names},
                        ckpt.root, [n for n in ckpt.tensors if n not in names and n not in head], str(error))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ordered_bits(t: Tensor) -> Tensor:
    """Floats of one dtype as int64 whose order and differences are the floats' (ulp steps), -0 == +0."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    i = t.contiguous().view(bits).to(torch.int64)
    top = 1 << (8 * t.element_size() - 1)
    return torch.where(i < 0, -(i + top), i)  # sign-magnitude -> a two's complement line


def ulp_distance(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """Elementwise number of `dtype` steps between a and b, each rounded to nearest in `dtype` (int64)."""
    return (_ordered_bits(a.to(dtype)) - _ordered_bits(b.to(dtype))).abs()


def _values_equal(a: Tensor, b: Tensor) -> bool:
    """Equal values (NaN equal to NaN), a piece at a time in the wider dtype."""
    wide = a.dtype if _ORDER.index(a.dtype) <= _ORDER.index(b.dtype) else b.dtype
    fa, fb = a.reshape(-1), b.reshape(-1)
    for s in range(0, fa.numel(), _CHUNK):
        x, y = fa[s:s + _CHUNK].to(wide), fb[s:s + _CHUNK].to(wide)
        if not bool(((x == y) | (x.isnan() & y.isnan())).all()):
            return False
    return True


def _pieces(a: Tensor, b: Tensor, size: int = _PIECE):
    """Matching flat pieces of two same-shape tensors: every statistic below is a reduction over elements, so a
    3B embedding costs a few pieces' float64 temporaries, never the whole tensor's."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    for s in range(0, fa.numel(), size):
        yield fa[s:s + size], fb[s:s + size]


def _cast_piece(a: Tensor, b: Tensor, d: torch.dtype) -> dict[str, Any]:
    fin = torch.finfo(d)
    rne = a.to(d)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[b.element_size()]
    if b.dtype == d and torch.equal(rne.view(bits), b.view(bits)):
        # The common case, B stored as A rounded to nearest (bit for bit): only overflows can be wrong.
        return {"max_ulp": 0, "ties_other_way": 0, "not_nearest": 0, "toward_zero": True, "representable": True,
                "overflow": int((rne.isinf() & a.isfinite()).sum()), "saturated": 0, "flushed": 0,
                "max_abs_a": float(torch.nan_to_num(a.abs(), nan=0.0, posinf=0.0).max())}
    a64, b64 = a.double(), b.double()
    over = a64.isfinite() & (a64.abs() > fin.max) & b.isinf()
    saturated = a64.isfinite() & rne.isinf() & (b64.abs() == fin.max)  # rounding gives inf, B the largest value
    flushed = (b == 0) & (rne != 0) & (a64.abs() < fin.smallest_normal)
    representable = (b.to(d).to(b.dtype) == b) | b.isnan() | b.isinf()
    ok = ~(over | saturated | flushed)
    x, y, r = a64[ok], b64[ok], rne.double()[ok]
    dist = ulp_distance(a[ok], b[ok], d)
    # A nearest value of `d`: the one rounding to nearest gives, or at an exact tie the other neighbour.
    tie_other = (dist == 1) & ((y - x).abs() == (r - x).abs())
    off = (dist > 0) & ~tie_other
    return {"max_ulp": int(dist.max()) if dist.numel() else 0, "ties_other_way": int(tie_other.sum()),
            "not_nearest": int(off.sum()), "toward_zero": bool((y[off].abs() <= x[off].abs()).all()),
            "representable": bool(representable.all()), "overflow": int(over.sum()),
            "saturated": int(saturated.sum()), "flushed": int(flushed.sum()),
            "max_abs_a": float(a64[a64.isfinite()].abs().max()) if bool(a64.isfinite().any()) else 0.0}


def _cast(a: Tensor, b: Tensor, d: torch.dtype) -> dict[str, Any]:
    """B against A rounded to `d`: ulp distance where both are finite, overflow (A finite, B inf), saturation (B the
    largest value where rounding gives inf), flushes (B zero where rounding keeps a subnormal)."""
    out: dict[str, Any] = {"dtype": _name(d), "numel": a.numel()}
    for x, y in _pieces(a, b):
        c = _cast_piece(x, y, d)
        for k, v in c.items():
            if k not in out:
                out[k] = v
            elif isinstance(v, bool):
                out[k] = out[k] and v
            elif k in ("max_ulp", "max_abs_a"):
                out[k] = max(out[k], v)
            else:
                out[k] += v
    out["toward_zero"] = out["toward_zero"] and out["not_nearest"] > 0
    return out


def _stats(a: Tensor, b: Tensor, narrow: torch.dtype, ulps: bool) -> dict[str, Any]:
    """max |B - A| (inf if a difference is not finite), ||B - A|| / ||A|| over the finite differences, max ulps at
    `narrow` (when `ulps`: the cast check has them otherwise)."""
    max_abs, sq, sq_a, most = 0.0, 0.0, 0.0, 0
    for x, y in _pieces(a, b):
        x64 = x.double()
        delta = y.double() - x64
        finite = delta.isfinite()
        max_abs = max(max_abs, float(delta.abs().max()) if bool(finite.all()) else math.inf)
        sq += float(torch.where(finite, delta, 0.0).square().sum())
        sq_a += float(x64.square().sum())
        if ulps:
            most = max(most, int(ulp_distance(x, y, narrow).max()))
    out = {"max_abs": max_abs, "rel_err": math.sqrt(sq / sq_a) if sq_a else math.inf, "ulp_dtype": _name(narrow)}
    return {**out, "max_ulp": most} if ulps else out


def _cast_finding(c: dict[str, Any]) -> str | None:
    d = c["dtype"]
    parts = []
    if c["overflow"]:
        parts.append(f"{c['overflow']} value(s) beyond +-{torch.finfo(getattr(torch, d)).max:g} became inf (max |A| "
                     f"{c['max_abs_a']:.6g})")
    if c["saturated"]:
        parts.append(f"{c['saturated']} value(s) beyond the {d} range clamped to "
                     f"+-{torch.finfo(getattr(torch, d)).max:g}")
    if c["flushed"]:
        parts.append(f"{c['flushed']} value(s) flushed to zero that rounding to {d} keeps (subnormals)")
    if c["not_nearest"]:
        how = "toward zero (truncated)" if c["toward_zero"] else "another way than to nearest"
        parts.append(f"{c['not_nearest']} of {c['numel']} value(s) rounded {how}: one ulp off, up to twice the "
                     f"{d} unit roundoff")
    return f"lossy cast to {d}: " + "; ".join(parts) if parts else None


def compare_tensor(name: str, a: Tensor, b: Tensor, cfg: Any, load_a: Any) -> dict[str, Any]:
    """One row of the weight report (see the module docstring)."""
    from pgconv.converter.diagnose import diagnose

    row: dict[str, Any] = {"name": name, "dtype_a": _name(a.dtype), "dtype_b": _name(b.dtype),
                           "shape_a": list(a.shape), "shape_b": list(b.shape), "status": "identical",
                           "max_abs": 0.0, "rel_err": 0.0, "max_ulp": 0, "ulp_dtype": None, "diagnosis": None}
    floating = a.is_floating_point() and b.is_floating_point()
    if a.shape == b.shape and (_values_equal(a, b) if floating else torch.equal(a, b)):
        return row
    if not floating:
        return {**row, "status": "differs", "diagnosis": diagnose(name, a, b, cfg, load_a) or "integer values differ"}
    narrow = a.dtype if _ORDER.index(a.dtype) >= _ORDER.index(b.dtype) else b.dtype
    if a.shape == b.shape:
        first = _cast(a, b, narrow)
        stats = _stats(a, b, narrow, ulps=first["overflow"] + first["saturated"] + first["flushed"] > 0)
        row.update({"max_ulp": first["max_ulp"], **stats})
        # The rounding dtypes to try: the narrower stored one, then the 16-bit ones below it (B stored wide
        # holding A rounded to 16 bits). Finer first, so the verdict names the least rounding that explains B.
        tries = [narrow] + [d for d in (torch.float16, torch.bfloat16) if _ORDER.index(d) > _ORDER.index(narrow)]
        for d in tries:
            c = first if d == narrow else _cast(a, b, d)
            if not c["representable"] or c["max_ulp"] > 1:
                continue
            row["cast"] = c
            lossy = _cast_finding(c)
            if lossy is not None:
                return {**row, "status": "differs", "diagnosis": lossy}
            how = "correctly rounded" if c["ties_other_way"] == 0 else \
                f"rounded to nearest ({c['ties_other_way']} tie(s) broken the other way)"
            return {**row, "status": "rounding", "ulp_dtype": c["dtype"], "max_ulp": c["max_ulp"],
                    "diagnosis": f"A rounded to {c['dtype']}, {how}"}
        if name.endswith("norm.weight") and a.dtype == b.dtype:
            # A norm stored with its (1 + w) offset and read back (a spec's `add`, computed in float64 and rounded
            # once each way): B is A + c rounded, then - c rounded, exactly; the same model within that rounding.
            for c in (1.0, -1.0):
                if all(torch.equal(((x.double() + c).to(x.dtype).double() - c).to(x.dtype), y)
                       for x, y in _pieces(a, b)):
                    return {**row, "status": "rounding", "ulp_dtype": _name(a.dtype),
                            "diagnosis": f"A {'+' if c > 0 else '-'} 1 rounded to {_name(a.dtype)} and back (a norm "
                                         "stored with its (1 + w) offset): within one rounding of A + 1"}
    found = diagnose(name, a, b, cfg, load_a)
    return {**row, "status": "differs",
            "diagnosis": found or (f"differs (max |delta| {row['max_abs']:.3g}, relative error {row['rel_err']:.3g}); "
                                   "no known porting mistake explains it" if a.shape == b.shape else
                                   f"shape {list(b.shape)} where A has {list(a.shape)}; no known porting mistake "
                                   "explains it")}


def config_differences(a: Any, b: Any) -> list[str]:
    """Fields of the two PaliGemmaConfigs that differ, as 'text.rope_theta: 10000.0 (A) vs 1000000.0 (B)'."""
    flat_a, flat_b = _flatten(dataclasses.asdict(a)), _flatten(dataclasses.asdict(b))
    # vision.use_head: the SigLIP head PaliGemma never runs (a conversion drops it and says so): not the model.
    return [f"{k}: {flat_a.get(k)!r} (A) vs {flat_b.get(k)!r} (B)" for k in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(k) != flat_b.get(k) and k != "vision.use_head"]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def diff_weights(a: NativeSource, b: NativeSource) -> dict[str, Any]:
    """The weight report: a row per tensor both hold, the tensors only one holds, config differences, findings."""
    cache: dict[str, Tensor] = {}

    def load_a(other: str) -> Tensor | None:
        # One extra A tensor at a time (a sibling, another layer's): bounded memory.
        if other not in a.tensors:
            return None
        if other not in cache:
            cache.clear()
            cache[other] = a.tensors[other].load()
        return cache[other]

    rows = []
    for name in sorted(set(a.tensors) & set(b.tensors), key=list(a.tensors).index):
        ta, tb = a.tensors[name].load(), b.tensors[name].load()
        rows.append(compare_tensor(name, ta, tb, a.cfg, load_a))
        del ta, tb
        cache.clear()
    missing = [n for n in a.tensors if n not in b.tensors]
    extra = [n for n in b.tensors if n not in a.tensors]
    findings = [f"{r['name']}: {r['diagnosis']}" for r in rows if r["status"] == "differs"]
    notes = []
    for n in extra:
        if n == "lm_head.weight" and "text.embed.weight" in a.tensors:
            head = b.tensors[n].load()
            if _values_equal_shape(head, a.tensors["text.embed.weight"].load()):
                notes.append("lm_head.weight: only in B, equal to A's text.embed.weight (B stores the tied head "
                             "untied: the same model)")
                continue
        findings.append(f"{n}: only in B")
    findings += [f"{n}: missing in B" for n in missing]
    for side, src in (("A", a), ("B", b)):
        findings += [f"{n}: stored in {side} but no tensor of layout {src.layout} (unexpected)" for n in src.unmapped]
        if src.lenient:
            notes.append(f"{side} read leniently ({src.lenient})")
    config = config_differences(a.cfg, b.cfg)
    untied = any(n.startswith("lm_head.weight:") for n in notes)  # tying is then a storage choice, not a change
    config = [c for c in config if not (c.startswith("tie_word_embeddings") and untied)]
    findings += [f"config: {c}" for c in config]
    rounding = sorted({r["ulp_dtype"] for r in rows if r["status"] == "rounding"},
                      key=lambda d: -torch.finfo(getattr(torch, d)).eps)  # the coarsest rounding names the verdict
    status = "differs" if findings else "rounding" if rounding else "identical"
    return {"status": status, "rounding_dtype": rounding[0] if rounding else None, "tensors": rows,
            "compared": len(rows), "identical": sum(r["status"] == "identical" for r in rows),
            "within_rounding": sum(r["status"] == "rounding" for r in rows),
            "differing": sum(r["status"] == "differs" for r in rows),
            "missing": missing, "extra": [n for n in extra if not any(x.startswith(n + ":") for x in notes)],
            "config_differences": config, "findings": findings, "notes": notes,
            "layouts": {"a": a.layout, "b": b.layout}}


def _values_equal_shape(x: Tensor, y: Tensor) -> bool:
    return x.shape == y.shape and _values_equal(x, y)
