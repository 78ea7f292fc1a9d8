"""Binding a spec to a config: every check before bytes move, then lazy conversion in both directions.

`bind(spec, cfg)` expands each rule for the config (`{i}` over the component's layers, `when` flags), traces
every op's shapes from the declared file shape, and checks that the rules make every native tensor of the config
exactly once, with the shape the config implies, and read every file tensor exactly once. Together with every op
having an inverse, that makes the map a bijection: what a spec reads it can write back. Errors name the spec
file, the rule and the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pgconv.converter.layouts import native_shapes
from pgconv.converter.spec import FLAGS, Rule, Spec, symbols
from pgconv.converter.spec_ops import BoundOp, Context, Shape, SpecError, bind_op, evaluate
from pgconv.model.config import PaliGemmaConfig

__all__ = ["BoundSpec", "NativeTensor", "FileTensor", "bind"]


@dataclass(frozen=True)
class NativeTensor:
    name: str
    shape: Shape
    sources: tuple[str, ...]  # file tensor names it is made from
    transform: str  # what was done, for reports and manifests
    load: Callable[[], torch.Tensor]
    span: tuple[int, int] | None = None  # byte range in the file when the tensor is a plain slice of it (raw copy)
    # A single pad_rows/slice_rows of a raw file tensor: (byte range of that file tensor, its rows). The tensor is
    # then its first min(rows, shape[0]) rows followed by zero rows, and can be streamed without materialising it.
    rows_of: tuple[tuple[int, int], int] | None = None


@dataclass(frozen=True)
class FileTensor:
    name: str
    shape: Shape
    sources: tuple[str, ...]  # native tensor names it is made from
    transform: str
    parts: Callable[[], Iterator[torch.Tensor]]  # consecutive C-order pieces (one per layer when stacked on axis 0)


@dataclass(frozen=True)
class _Instance:
    """One rule for one layer (or the only instance of a rule without `{i}`)."""

    rule: int
    layer: int | None
    file: tuple[str, ...]
    native: tuple[str, ...]
    ops: tuple[BoundOp, ...]
    shapes: tuple[Shape, ...]  # of the native tensors
    layer_axis: int | None

    def transform(self, spec: Spec) -> str:
        ops = [op.spec.describe() for op in self.ops]
        if self.layer_axis is not None:
            ops.insert(0, f"layer {self.layer} of axis {self.layer_axis}")
        return f"{spec.name}: " + (" | ".join(ops) or "rename")


class BoundSpec:
    """A spec checked against a config: the file tensors it expects and lazy conversion both ways."""

    def __init__(self, spec: Spec, cfg: PaliGemmaConfig, instances: list[_Instance], file_shapes: dict[str, Shape]):
        self.spec, self.cfg, self.instances, self.file_shapes = spec, cfg, instances, file_shapes

    def native_tensors(self, read: Callable[[str, int | None], torch.Tensor],
                       span: Callable[[str, int | None], tuple[int, int] | None] | None = None) -> dict[str, NativeTensor]:
        """File -> native. `read(name, k)` gives file tensor `name`, or its slice `k` on axis 0 when `k` is set;
        `span(name, k)` its byte range in the file (None when not stored raw), for tensors that are plain copies."""
        out: dict[str, NativeTensor] = {}
        for inst in self.instances:
            def source(key: str, inst: _Instance = inst) -> torch.Tensor:
                if inst.layer_axis is None:
                    return read(key, None)
                if inst.layer_axis == 0:  # a contiguous slice: readers fetch only its bytes
                    return read(key, inst.layer)
                return read(key, None).select(inst.layer_axis, inst.layer)

            group = [(lambda key=key, src=source: src(key)) for key in inst.file]
            for op in inst.ops:
                group = op.forward(group)
            raw = rows_of = None
            if span is not None and inst.layer_axis in (None, 0) and len(inst.file) == 1:
                where = span(inst.file[0], None if inst.layer_axis is None else inst.layer)
                if not inst.ops:
                    raw = where
                elif where is not None and len(inst.ops) == 1 and inst.ops[0].spec.name in ("pad_rows", "slice_rows"):
                    rows_of = (where, inst.ops[0].in_shapes[0][0])
            for name, shape, thunk in zip(inst.native, inst.shapes, group):
                out[name] = NativeTensor(name, shape, inst.file, inst.transform(self.spec),
                                         lambda t=thunk: t().contiguous(), raw, rows_of)
        return out

    def file_tensors(self, read: Callable[[str], torch.Tensor]) -> list[FileTensor]:
        """Native -> file, in rule order. `read(name)` gives native tensor `name`."""
        by_file: dict[str, list[tuple[_Instance, Callable[[], torch.Tensor]]]] = {}
        for inst in self.instances:
            group = [(lambda n=n: read(n)) for n in inst.native]
            for op in reversed(inst.ops):
                group = op.inverse(group)
            for key, thunk in zip(inst.file, group):
                by_file.setdefault(key, []).append((inst, thunk))
        out = []
        for key, pieces in by_file.items():
            inst = pieces[0][0]
            thunks = [t for _, t in pieces]
            if inst.layer_axis is None:
                parts = lambda t=thunks[0]: iter([t().contiguous()])  # noqa: E731
            elif inst.layer_axis == 0:  # layer slices are consecutive in C order: stream them one at a time
                parts = lambda ts=thunks: (t().contiguous() for t in ts)  # noqa: E731
            else:  # layers on an inner axis interleave in C order: build the stacked tensor whole
                parts = lambda ts=thunks, a=inst.layer_axis: iter([torch.stack([t() for t in ts], a)])  # noqa: E731
            natives = tuple(n for i, _ in pieces for n in i.native)
            out.append(FileTensor(key, self.file_shapes[key], natives, inst.transform(self.spec), parts))
        return out

    def check_file(self, found: dict[str, Shape], where: str) -> None:
        """Compare a file's tensors (name -> shape) with what the spec expects for the config."""
        missing = [n for n in self.file_shapes if n not in found]
        unexpected = [n for n in found if n not in self.file_shapes]
        if missing or unexpected:
            parts = [f"missing {len(missing)} tensor(s): {_listing(missing)} (read by {self.rule_of(missing[0])})"
                     ] if missing else []
            parts += [f"unexpected {len(unexpected)} tensor(s): {_listing(unexpected)}"] if unexpected else []
            raise SpecError(f"{where}: does not match spec {self.spec.name!r}: " + "; ".join(parts))
        for name, shape in self.file_shapes.items():
            if tuple(found[name]) != shape:
                raise SpecError(f"{where}: tensor {name!r} has shape {list(found[name])}; {self.rule_of(name)} of "
                                f"spec {self.spec.name!r} expects {list(shape)} for this config")

    def rule_of(self, file_name: str) -> str:
        inst = next(i for i in self.instances if file_name in i.file)
        return self.spec.rules[inst.rule - 1].label(inst.rule)

    @property
    def offsets(self) -> dict[str, float]:
        """Native name template -> constant added when reading (native = file + c): this spec's numeric edits."""
        out: dict[str, float] = {}
        for inst in self.instances:
            for op in inst.ops:
                if op.spec.name == "add":
                    out.update({tpl: float(op.spec.arg) for tpl in self.spec.rules[inst.rule - 1].native})
        return out


def _layer_shape(shape: Shape, axis: int | None) -> Shape:
    return shape if axis is None else shape[:axis] + shape[axis + 1:]


def _listing(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")


def _component_layers(template: str, cfg: PaliGemmaConfig) -> int:
    if template.startswith("vision."):
        return cfg.vision.num_layers
    if template.startswith("text."):
        return cfg.text.num_layers
    raise SpecError(f"native name {template!r} has {{i}} but is not under vision. or text.")


def _check_structure(rule: Rule, label: str) -> bool:
    """Whether the rule stacks layers in one file tensor; raises on inconsistent `{i}` / `layer_axis` use."""
    layered = ["{i}" in n for n in rule.native]
    file_layered = ["{i}" in f for f in rule.file]
    if any(layered) != all(layered) or any(file_layered) != all(file_layered):
        raise SpecError(f"{label}: either every name of a rule has {{i}} or none does")
    if any(file_layered) and not any(layered):
        raise SpecError(f"{label}: the file name has {{i}} but the native name does not")
    stacked = any(layered) and not any(file_layered)
    if stacked and rule.layer_axis is None:
        raise SpecError(f"{label}: native names have {{i}} but the file name does not; say which file axis stacks "
                        "the layers with `layer_axis = 0`")
    if not stacked and rule.layer_axis is not None:
        raise SpecError(f"{label}: `layer_axis` is only for a file tensor that stacks every layer")
    return stacked


def bind(spec: Spec, cfg: PaliGemmaConfig, *, allow_cut: bool = False) -> BoundSpec:
    """Check `spec` against `cfg` (shapes, coverage, invertibility) and expand it; raises SpecError.

    `allow_cut` lets a row cut (`pad_rows` written back, `slice_rows` read) drop rows that are not zero padding.
    """
    sym, expected = symbols(cfg), native_shapes(cfg)
    instances: list[_Instance] = []
    file_shapes: dict[str, Shape] = {}
    made: dict[str, str] = {}  # native name -> rule label
    read_by: dict[str, str] = {}  # file name -> rule label
    for k, rule in enumerate(spec.rules, 1):
        label = f"{spec.origin}: {rule.label(k)}"
        unknown = [f for f in rule.when if f not in FLAGS]
        if unknown:
            raise SpecError(f"{label}: unknown `when` flag {unknown[0]!r} (known: {', '.join(FLAGS)})")
        if not all(FLAGS[f](cfg) for f in rule.when):
            continue
        stacked = _check_structure(rule, label)
        layered = "{i}" in rule.native[0]
        counts = {_component_layers(n, cfg) for n in rule.native} if layered else {1}
        if len(counts) != 1:
            raise SpecError(f"{label}: mixes vision and text layers")
        n_layers = counts.pop()
        try:
            full = _file_shapes(rule, expected, sym, stacked, n_layers)
        except SpecError as e:
            raise SpecError(f"{label}: {e}") from None
        # Shapes do not depend on the layer: bind the ops once per rule, for every layer's instance.
        ctx = Context(label, ", ".join(rule.native), allow_cut)
        shapes = tuple(_layer_shape(s, rule.layer_axis) for s in full)
        ops = []
        for j, op in enumerate(rule.ops, 1):
            try:
                ops.append(bind_op(op, shapes, sym, ctx))
            except SpecError as e:
                raise SpecError(f"{label}: op {j} {op.describe()}: {e}") from None
            shapes = ops[-1].out_shapes
        if len(shapes) != len(rule.native):
            raise SpecError(f"{label}: the ops make {len(shapes)} tensor(s) for {len(rule.native)} native name(s)")
        _check_used_rows(ops, rule.native, cfg, label)
        short = rule.label(k)
        for layer in range(n_layers) if layered else [None]:
            files = tuple(spec.prefix + (f.format(i=layer) if layered else f) for f in rule.file)
            natives = tuple(n.format(i=layer) if layered else n for n in rule.native)
            for name, shape in zip(natives, shapes):
                if name not in expected:
                    raise SpecError(f"{label}: {_not_native(name)}")
                if name in made:
                    raise SpecError(f"{label}: makes {name!r}, which {made[name]} makes too")
                if shape != expected[name]:
                    raise SpecError(f"{label}: makes {name!r} with shape {list(shape)}; the config implies "
                                    f"{list(expected[name])}")
                made[name] = short
            if not stacked or layer == 0:  # a stacked file tensor is read once for all its layers
                for f, s in zip(files, full):
                    if f in read_by:
                        raise SpecError(f"{label}: reads {f!r}, which {read_by[f]} reads too")
                    read_by[f], file_shapes[f] = short, s
            instances.append(_Instance(k, layer, files, natives, tuple(ops), shapes, rule.layer_axis))
    missing = [n for n in expected if n not in made]
    if missing:
        raise SpecError(f"{spec.origin}: spec {spec.name!r} has no rule making {len(missing)} native tensor(s) of "
                        f"this config: {_listing(missing)}")
    return BoundSpec(spec, cfg, instances, file_shapes)


def _check_used_rows(ops: list[BoundOp], natives: tuple[str, ...], cfg: PaliGemmaConfig, label: str) -> None:
    """A vocabulary row outside the file (padded on read, cut on write) must not be a token the text uses.

    Used = a token id the config names for text: pad, bos, eos. `<image>` is not a use: its positions are
    replaced by image features, so its row never enters the computation (big_vision has no such token).
    """
    if not {"text.embed.weight", "lm_head.weight"} & set(natives):
        return
    for op in ops:
        if op.spec.name == "pad_rows":
            kept = min(s[0] for s in op.in_shapes)
            ids = [("pad", cfg.pad_token_id), ("bos", cfg.bos_token_id)] + [("eos", e) for e in cfg.eos_token_ids]
            for what, token in ids:
                if token >= kept:
                    raise SpecError(f"{label}: the file holds rows 0..{kept - 1} of {', '.join(natives)}, but the "
                                    f"config's {what} token id {token} is outside them (it would have no embedding)")


def _not_native(name: str) -> str:
    why = ' (the config ties it to the embedding: add when = ["untied"])' if name == "lm_head.weight" else ""
    return f"makes {name!r}, which is not a native tensor of this config{why}"


def _file_shapes(rule: Rule, expected: dict[str, Shape], sym: dict[str, int], stacked: bool, n: int) -> tuple[Shape, ...]:
    """Full shape of each file tensor: declared (`shape`), or the native shape for shape-preserving rules."""
    if rule.shape is not None:
        if len(rule.shape) != len(rule.file):
            raise SpecError(f"gives {len(rule.shape)} shape(s) for {len(rule.file)} file name(s)")
        full = tuple(tuple(evaluate(e, sym) for e in s) for s in rule.shape)
        if stacked:
            for s in full:
                if not 0 <= rule.layer_axis < len(s) or s[rule.layer_axis] != n:
                    raise SpecError(f"file shape {list(s)} has no layer axis {rule.layer_axis} of size {n}")
        return full
    if any(op.name != "add" for op in rule.ops) or len(rule.file) != 1 or len(rule.native) != 1:
        raise SpecError("give the file shape (`shape = [...]`) for a rule whose ops change shapes or counts")
    native = rule.native[0].format(i=0)
    if native not in expected:
        raise SpecError(_not_native(native))
    shape = expected[native]
    if stacked:
        if not 0 <= rule.layer_axis <= len(shape):
            raise SpecError(f"layer_axis {rule.layer_axis} is out of range for {list(shape)}")
        shape = shape[:rule.layer_axis] + (n,) + shape[rule.layer_axis:]
    return (shape,)
