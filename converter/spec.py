"""Checkpoint specs: user-defined formats as a declarative, checked, invertible map onto pgconv's native names.

A spec file (TOML or JSON) names a format and lists rules; a rule reads file tensor(s) and makes native tensor(s):

    name = "my-format"
    format = "safetensors"                        # or "npz"
    dtype = "bfloat16"                            # written on export (default: keep the source dtype)

    [[rule]]
    file = "llm/layers/attn/kv_einsum/w"          # template; {i} = layer index
    native = ["text.blocks.{i}.attn.k.weight", "text.blocks.{i}.attn.v.weight"]
    layer_axis = 0                                # the file tensor stacks all layers on axis 0
    shape = ["L", 2, "K", "D", "H"]               # file shape: checked against the config and the file
    ops = [{unbind = 0}, {transpose = [0, 2, 1]}, {reshape = ["K*H", "D"]}]
    when = ["gqa"]                                # only for configs with these flags (see FLAGS)

Ops (converter/spec_ops.py) run file -> native when reading and are inverted when writing. `spec_bind.bind`
checks a spec against a config before any bytes move. The built-in layouts and big_vision are specs too:
converter/specs/*.toml are generated from layouts.py / big_vision.py by `python -m pgconv.converter.spec`, and a
test keeps them identical. specs/hkproj-pytorch-paligemma.toml is a hand-written example of a user format.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgconv.converter import layouts
from pgconv.converter.spec_ops import OPS, OpSpec, SpecError
from pgconv.errors import json_value_error
from pgconv.model.config import PaliGemmaConfig

__all__ = ["Rule", "Spec", "SpecError", "FLAGS", "FORMATS", "BUILTIN_DIR", "symbols", "spec_from_data",
           "spec_to_data", "loads", "dumps", "load_spec", "builtin_names", "layout_spec", "builtin_texts"]

BUILTIN_DIR = Path(__file__).parent / "specs"
FORMATS = ("safetensors", "npz")
DTYPES = ("float32", "bfloat16", "float16")


def symbols(cfg: PaliGemmaConfig) -> dict[str, int]:
    """Names usable in shape expressions: text sizes plain, vision sizes with a `v` prefix."""
    v, t = cfg.vision, cfg.text
    return {"D": t.hidden_size, "F": t.intermediate_size, "L": t.num_layers, "N": t.num_heads, "K": t.num_kv_heads,
            "H": t.head_dim, "V": t.vocab_size, "I": cfg.image_token_index,
            "vD": v.hidden_size, "vF": v.intermediate_size, "vL": v.num_layers, "vN": v.num_heads,
            "vH": v.head_dim, "vP": v.patch_size, "vC": v.num_channels, "vT": v.num_patches}


FLAGS: dict[str, Callable[[PaliGemmaConfig], bool]] = {
    "gemma": lambda c: c.text.family == "gemma",
    "gemma2": lambda c: c.text.family == "gemma2",
    "tied": lambda c: c.tie_word_embeddings,
    "untied": lambda c: not c.tie_word_embeddings,
    "mha": lambda c: c.text.num_kv_heads == c.text.num_heads,
    "gqa": lambda c: c.text.num_kv_heads < c.text.num_heads,
}


@dataclass(frozen=True)
class Rule:
    file: tuple[str, ...]
    native: tuple[str, ...]
    ops: tuple[OpSpec, ...] = ()
    shape: tuple[tuple[int | str, ...], ...] | None = None  # full shape of each file tensor (layer axis included)
    layer_axis: int | None = None
    when: tuple[str, ...] = ()

    def label(self, k: int) -> str:
        one = lambda xs: repr(xs[0]) if len(xs) == 1 else repr(list(xs))  # noqa: E731
        return f"rule {k} ({one(self.file)} -> {one(self.native)})"


@dataclass(frozen=True)
class Spec:
    name: str
    rules: tuple[Rule, ...]
    format: str = "safetensors"
    prefix: str = ""  # prepended to every file name (big_vision: "params/")
    dtype: str | None = None  # dtype written on export (None: keep the source's)
    description: str = ""
    metadata: tuple[tuple[str, str], ...] = ()  # recorded verbatim in the output's metadata
    origin: str = field(default="<spec>", compare=False)  # file it came from, for error messages

    @property
    def digest(self) -> str:
        """Identifies what the spec does to tensors (rules, prefix, format; not its description, metadata or
        formatting): recorded as provenance in written files."""
        data = spec_to_data(self)
        semantic = {k: data.get(k) for k in ("format", "prefix", "rule")}
        return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Data (parsed TOML/JSON) <-> Spec, strictly: unknown keys and wrong types are errors naming the rule.

_TOP = {"name", "format", "prefix", "dtype", "description", "metadata", "rule"}
_RULE = {"file", "native", "ops", "shape", "layer_axis", "when"}


def _names(value: Any, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
        raise SpecError(f"{where} must be a non-empty string or list of strings, got {value!r}")
    return tuple(items)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where} must be an integer, got {value!r}")
    return value


def _rule_from_data(d: Any, where: str) -> Rule:
    if not isinstance(d, dict):
        raise SpecError(f"{where}: must be a table")
    unknown = sorted(set(d) - _RULE)
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_RULE))})")
    for key in ("file", "native"):
        if key not in d:
            raise SpecError(f"{where}: missing {key!r}")
    ops = []
    if not isinstance(d.get("ops", []), list):
        raise SpecError(f"{where}: ops must be a list of one-key tables like [{{transpose = [1, 0]}}], got "
                        f"{d['ops']!r}")
    for j, op in enumerate(d.get("ops", []), 1):
        if not isinstance(op, dict) or len(op) != 1:
            raise SpecError(f"{where}: op {j} must be a one-key table like {{transpose = [1, 0]}}, got {op!r}")
        (name, arg), = op.items()
        if name not in OPS:
            raise SpecError(f"{where}: op {j}: unknown op {name!r} (known: {', '.join(OPS)})")
        ops.append(OpSpec(name, arg))
    shape = d.get("shape")
    if shape is not None:
        if not isinstance(shape, list) or not shape:
            raise SpecError(f"{where}: shape must be a list of sizes (or a list of such lists), got {shape!r}")
        shape = tuple(tuple(s) for s in shape) if all(isinstance(s, list) for s in shape) else (tuple(shape),)
        for s in shape:
            if not all(isinstance(e, (int, str)) and not isinstance(e, bool) for e in s):
                raise SpecError(f"{where}: shape entries must be integers or expressions, got {list(s)!r}")
    when = d.get("when", [])
    return Rule(
        file=_names(d["file"], f"{where}: file"),
        native=_names(d["native"], f"{where}: native"),
        ops=tuple(ops),
        shape=shape,
        layer_axis=_int(d["layer_axis"], f"{where}: layer_axis") if "layer_axis" in d else None,
        when=_names(when, f"{where}: when") if when else (),
    )


def spec_from_data(data: Any, origin: str = "<spec>") -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a spec must be a table/object")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise SpecError(f"{origin}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP))})")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError(f"{origin}: missing `name` (a non-empty string)")
    fmt = data.get("format", "safetensors")
    if fmt not in FORMATS:
        raise SpecError(f"{origin}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise SpecError(f"{origin}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    meta = data.get("metadata", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SpecError(f"{origin}: metadata must map strings to strings")
    for key in ("prefix", "description"):
        if not isinstance(data.get(key, ""), str):
            raise SpecError(f"{origin}: {key} must be a string")
    rules = data.get("rule")
    if not isinstance(rules, list) or not rules:
        raise SpecError(f"{origin}: no rules (add [[rule]] tables)")
    return Spec(
        name=name, format=fmt, prefix=data.get("prefix", ""), dtype=dtype, description=data.get("description", ""),
        metadata=tuple(meta.items()), origin=origin,
        rules=tuple(_rule_from_data(r, f"{origin}: rule {k}") for k, r in enumerate(rules, 1)),
    )


def _rule_to_data(r: Rule) -> dict[str, Any]:
    d: dict[str, Any] = {"file": r.file[0] if len(r.file) == 1 else list(r.file),
                         "native": r.native[0] if len(r.native) == 1 else list(r.native)}
    if r.when:
        d["when"] = list(r.when)
    if r.layer_axis is not None:
        d["layer_axis"] = r.layer_axis
    if r.shape is not None:
        d["shape"] = list(r.shape[0]) if len(r.shape) == 1 else [list(s) for s in r.shape]
    if r.ops:
        d["ops"] = [{op.name: op.arg} for op in r.ops]
    return d


def spec_to_data(spec: Spec) -> dict[str, Any]:
    d: dict[str, Any] = {"name": spec.name}
    if spec.description:
        d["description"] = spec.description
    d["format"] = spec.format
    if spec.prefix:
        d["prefix"] = spec.prefix
    if spec.dtype:
        d["dtype"] = spec.dtype
    if spec.metadata:
        d["metadata"] = dict(spec.metadata)
    d["rule"] = [_rule_to_data(r) for r in spec.rules]
    return d


# ---------------------------------------------------------------------------------------------------------------
# Text: TOML is read with tomllib; it is written by the small emitter below (the spec schema only needs strings,
# integers, floats, arrays and inline tables). JSON uses the same data.


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # '1.0', '1e-06', 'inf', 'nan' are all TOML floats
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k) else _toml_value(k)


def dumps(spec: Spec, fmt: str = "toml", header: str = "") -> str:
    data = spec_to_data(spec)
    if fmt == "json":
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [f"{k} = {_toml_value(v)}" for k, v in data.items() if k not in ("metadata", "rule")]
    if "metadata" in data:
        lines += ["", "[metadata]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data["metadata"].items()]
    for rule in data["rule"]:
        lines += ["", "[[rule]]"] + [f"{k} = {_toml_value(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"


def loads(text: str, fmt: str = "toml", origin: str = "<spec>") -> Spec:
    try:
        data = json.loads(text) if fmt == "json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise SpecError(f"{origin}: invalid {fmt.upper()} ({e})") from None
    except RecursionError:
        raise SpecError(f"{origin}: {fmt.upper()} nested too deeply") from None
    except ValueError as e:  # an integer literal past Python's int-from-string limit (4300 digits)
        raise SpecError(f"{origin}: invalid {fmt.upper()} ({json_value_error(e)})") from None
    _check_ints(data, origin)
    return spec_from_data(data, origin)


_INT_LIMIT = 1 << 63


def _check_ints(data: Any, origin: str) -> None:
    """Refuse integers of 64 bits or more anywhere in a spec: no size, axis or offset needs one, and a huge one
    (TOML's 0x... literals have no digit limit) cannot even be printed in an error message (`str(int)` raises)."""
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, int) and not isinstance(x, bool) and not -_INT_LIMIT < x < _INT_LIMIT:
            raise SpecError(f"{origin}: an integer of {x.bit_length()} bits is out of range (at most 64 bits)")


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_spec(ref: str | Path) -> Spec:
    """A spec from a `.toml`/`.json` file, or a built-in one by name (`big-vision`, `hf-legacy`, ...)."""
    path = Path(ref)
    if path.suffix in (".toml", ".json") and path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"{path}: cannot read ({e})") from None
        return loads(text, "json" if path.suffix == ".json" else "toml", str(path))
    if str(ref) in builtin_names():
        builtin = BUILTIN_DIR / f"{ref}.toml"
        return loads(builtin.read_text(encoding="utf-8"), "toml", f"spec {ref!r}")
    if path.suffix in (".toml", ".json"):
        raise SpecError(f"{path}: no such spec file")
    raise SpecError(f"unknown spec {str(ref)!r}: not a .toml/.json file, nor a built-in spec "
                    f"({', '.join(builtin_names())})")


# ---------------------------------------------------------------------------------------------------------------
# Built-in specs, generated from the data they describe (so they cannot drift: tests/test_spec.py).


def layout_spec(name: str) -> Spec:
    """The spec of a transformers/native layout from converter/layouts.py: pure renames."""
    lay = layouts.LAYOUTS[name]

    def side(prefix: str, ours: str, theirs: str) -> str:
        return prefix + (ours if lay.native_names else theirs)

    rules = [Rule((side(lay.vision, o, t),), ("vision." + o,)) for o, t in
             {**layouts.VISION_TENSORS, **layouts.VISION_LAYER_TENSORS}.items()]
    rules += [Rule((side(lay.projector, o, t),), ("projector." + o,)) for o, t in layouts.PROJECTOR_TENSORS.items()]
    rules += [Rule((side(lay.text, o, t),), ("text." + o,)) for o, t in layouts.TEXT_TENSORS.items()]
    families = layouts.TEXT_LAYER_TENSORS
    common = {o: t for o, t in families["gemma"].items() if families["gemma2"].get(o) == t}
    rules += [Rule((side(lay.text, o, t),), ("text." + o,)) for o, t in common.items()]
    for family, table in families.items():
        rules += [Rule((side(lay.text, o, t),), ("text." + o,), when=(family,)) for o, t in table.items()
                  if o not in common]
    rules.append(Rule((lay.lm_head,), ("lm_head.weight",), when=("untied",)))
    return Spec(name=name, rules=tuple(rules), description=lay.description,
                metadata=(("generated_from", "pgconv.converter.layouts"),))


def builtin_texts() -> dict[str, str]:
    """File name in converter/specs/ -> text, for every generated spec."""
    from pgconv.converter import big_vision  # big_vision builds on this module

    header = "Generated by `python -m pgconv.converter.spec` from {}; do not edit (tests/test_spec.py checks it)."
    out = {f"{n}.toml": dumps(layout_spec(n), header=header.format("converter/layouts.py")) for n in layouts.LAYOUTS}
    out["big-vision.toml"] = dumps(big_vision.SPEC, header=header.format("converter/big_vision.py"))
    return out


if __name__ == "__main__":
    for file_name, text in builtin_texts().items():
        (BUILTIN_DIR / file_name).write_text(text, encoding="utf-8")
        print(f"wrote {BUILTIN_DIR / file_name}")
