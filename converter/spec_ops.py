"""Transforms of checkpoint specs: shape expressions and invertible tensor ops.

A spec rule reads one or more file tensors and turns them into native tensors through a chain of ops. The value
flowing through the chain is a *group* (a list of tensors, usually one): per-element ops (`transpose`,
`reshape`, `add`, `pad_rows`, `slice_rows`) map each element, `unbind`/`split` turn each element into several,
`stack`/`concat` merge the whole group into one. Every op

* states its output shapes from its input shapes, so a rule's shapes are checked from the config alone (no
  transform is ever inferred from a tensor's shape), and
* has an inverse given those shapes, so a spec read one way (file -> native) writes the other way.

Elements are thunks, evaluated only when the tensor they make is written, so at most one tensor is materialised.
Exactness: every inverse is bit-exact except `add` (x + c - c rounds; computed in float64 and rounded once to
the storage dtype), and the row cut of `pad_rows`'s inverse / `slice_rows` only drops rows that are zero padding
(anything else is refused unless the caller allows the cut).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pgconv.errors import InputError

__all__ = ["SpecError", "Shape", "Thunk", "OpSpec", "BoundOp", "OPS", "evaluate", "bind_op"]

Shape = tuple[int, ...]
Thunk = Callable[[], torch.Tensor]
Group = list[Thunk]


class SpecError(InputError):
    """A spec that cannot be used: bad syntax, incomplete coverage, a non-invertible or mis-shaped rule."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def evaluate(expr: int | str, symbols: Mapping[str, int]) -> int:
    """An integer shape expression: a literal, a symbol (`D`, `vL`, ...) or `+ - * //` and parentheses of those."""
    if isinstance(expr, bool) or not isinstance(expr, (int, str)):
        raise SpecError(f"shape expression {expr!r} must be an integer or a string")
    if isinstance(expr, int):
        return _bounded(expr, "")

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return _bounded(node.value, expr)
        if isinstance(node, ast.Name):
            if node.id not in symbols:
                raise SpecError(f"unknown symbol {node.id!r} in {expr!r} (known: {', '.join(symbols)})")
            return symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.FloorDiv) and right == 0:
                raise SpecError(f"shape expression {expr!r} divides by zero")
            return _bounded(_BINOPS[type(node.op)](left, right), expr)
        raise SpecError(f"shape expression {expr!r}: only integers, symbols, + - * // and parentheses are allowed")

    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, RecursionError, MemoryError, ValueError):  # ValueError: e.g. a NUL byte in the string
        raise SpecError(f"shape expression {expr[:80]!r} is not valid") from None
    try:
        return ev(tree.body)
    except RecursionError:
        raise SpecError(f"shape expression {expr[:80]!r} is nested too deeply") from None


def _bounded(value: int, expr: str) -> int:
    """`value` if it fits 64 bits: a product of literals (`0xfff...` or `9999 * 9999 * ...`) can otherwise grow past
    what `str(int)` prints (4300 digits), and every later error message that shows the shape would raise."""
    if not -(1 << 63) < value < 1 << 63:
        raise SpecError(f"shape expression {expr[:80]!r} gives a {value.bit_length()}-bit value (at most 64 bits)"
                        if expr else f"shape value of {value.bit_length()} bits is out of range (at most 64 bits)")
    return value


@dataclass(frozen=True)
class OpSpec:
    """An op as written in a spec file: `{name = arg}`."""

    name: str
    arg: Any

    def describe(self) -> str:
        return f"{self.name}({self.arg!r})" if not isinstance(self.arg, dict) else \
            f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.arg.items())})"


@dataclass(frozen=True)
class BoundOp:
    """An op resolved for a config: concrete argument, input and output shapes, group maps both ways."""

    spec: OpSpec
    in_shapes: tuple[Shape, ...]
    out_shapes: tuple[Shape, ...]
    forward: Callable[[Group], Group]
    inverse: Callable[[Group], Group]
    exact: bool = True


@dataclass(frozen=True)
class Context:
    """What runtime checks name in their errors, and whether a non-padding row cut is allowed."""

    where: str  # "rule 3 (file 'x' -> native 'y')"
    tensors: str  # tensor names of this rule instance
    allow_cut: bool = False


def _each(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Group], Group]:
    return lambda xs: [(lambda x=x: f(x())) for x in xs]


def _chunks(xs: Group, sizes: list[int]) -> list[Group]:
    out, pos = [], 0
    for n in sizes:
        out.append(xs[pos:pos + n])
        pos += n
    return out


def _axis(arg: Any, ndim: int) -> int:
    if isinstance(arg, bool) or not isinstance(arg, int) or not -ndim <= arg < ndim:
        raise SpecError(f"axis {arg!r} is not valid for a {ndim}-d tensor")
    return arg % ndim


def _same(shapes: tuple[Shape, ...], what: str) -> Shape:
    if len(set(shapes)) != 1:
        raise SpecError(f"{what} needs equal shapes, got {[list(s) for s in shapes]}")
    return shapes[0]


def _transpose(arg, shapes, sym, ctx):
    if not isinstance(arg, list) or any(isinstance(a, bool) or not isinstance(a, int) for a in arg) or \
            sorted(arg) != list(range(len(arg))):
        raise SpecError(f"transpose {arg!r} is not a permutation of 0..n-1")
    inv = [arg.index(k) for k in range(len(arg))]
    for s in shapes:
        if len(s) != len(arg):
            raise SpecError(f"transpose {arg} of a {len(s)}-d tensor {list(s)}")
    out = tuple(tuple(s[p] for p in arg) for s in shapes)
    return out, _each(lambda t: t.permute(arg)), _each(lambda t: t.permute(inv)), True


def _reshape(arg, shapes, sym, ctx):
    if not isinstance(arg, list):
        raise SpecError(f"reshape takes a list of sizes, got {arg!r}")
    target = tuple(evaluate(e, sym) for e in arg)
    for s in shapes:
        if math.prod(s) != math.prod(target):
            raise SpecError(f"reshape {list(s)} ({math.prod(s)} elements) to {list(target)} ({math.prod(target)})")
    back = list(shapes)
    inverse = lambda ys: [(lambda y=y, s=s: y().reshape(s)) for y, s in zip(ys, back)]  # noqa: E731
    return (target,) * len(shapes), _each(lambda t: t.reshape(target)), inverse, True


def _unbind(arg, shapes, sym, ctx):
    axes = [_axis(arg, len(s)) for s in shapes]
    counts = [s[a] for s, a in zip(shapes, axes)]
    out = tuple(s[:a] + s[a + 1:] for s, a, n in zip(shapes, axes, counts) for _ in range(n))

    def forward(xs: Group) -> Group:
        return [(lambda x=x, a=a, k=k: x().select(a, k)) for x, a, n in zip(xs, axes, counts) for k in range(n)]

    def inverse(ys: Group) -> Group:
        return [(lambda g=g, a=a: torch.stack([y() for y in g], a)) for g, a in zip(_chunks(ys, counts), axes)]

    return out, forward, inverse, True


def _stack(arg, shapes, sym, ctx):
    shape = _same(shapes, "stack")
    a = _axis(arg, len(shape) + 1)
    n = len(shapes)
    out = (shape[:a] + (n,) + shape[a:],)
    return out, (lambda xs: [lambda: torch.stack([x() for x in xs], a)]), \
        (lambda ys: [(lambda k=k: ys[0]().select(a, k)) for k in range(n)]), True


def _split(arg, shapes, sym, ctx):
    if not isinstance(arg, dict) or set(arg) != {"axis", "sizes"} or not isinstance(arg["sizes"], list):
        raise SpecError(f"split takes {{axis = A, sizes = [...]}}, got {arg!r}")
    sizes = [evaluate(e, sym) for e in arg["sizes"]]
    axes = [_axis(arg["axis"], len(s)) for s in shapes]
    for s, a in zip(shapes, axes):
        if sum(sizes) != s[a]:
            raise SpecError(f"split sizes {sizes} do not add up to axis {a} of {list(s)}")
    out = tuple(s[:a] + (n,) + s[a + 1:] for s, a in zip(shapes, axes) for n in sizes)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]

    def forward(xs: Group) -> Group:
        return [(lambda x=x, a=a, b=b, n=n: x().narrow(a, b, n)) for x, a in zip(xs, axes) for b, n in zip(starts, sizes)]

    def inverse(ys: Group) -> Group:
        groups = _chunks(ys, [len(sizes)] * len(shapes))
        return [(lambda g=g, a=a: torch.cat([y() for y in g], a)) for g, a in zip(groups, axes)]

    return out, forward, inverse, True


def _concat(arg, shapes, sym, ctx):
    a = _axis(arg, len(shapes[0]))
    rest = {s[:a] + s[a + 1:] for s in shapes}
    if len(rest) != 1 or len({len(s) for s in shapes}) != 1:
        raise SpecError(f"concat on axis {a} needs shapes equal off that axis, got {[list(s) for s in shapes]}")
    sizes = [s[a] for s in shapes]
    shape = shapes[0][:a] + (sum(sizes),) + shapes[0][a + 1:]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return (shape,), (lambda xs: [lambda: torch.cat([x() for x in xs], a)]), \
        (lambda ys: [(lambda b=b, n=n: ys[0]().narrow(a, b, n)) for b, n in zip(starts, sizes)]), True


def _add(arg, shapes, sym, ctx):
    if isinstance(arg, bool) or not isinstance(arg, (int, float)) or not math.isfinite(arg):
        raise SpecError(f"add takes a finite number, got {arg!r}")
    c = float(arg)

    # Added in float64 and rounded once to the storage dtype; not bit-exact on the way back (x + c - c rounds).
    def shift(d: float) -> Callable[[Group], Group]:
        return _each(lambda t: (t.double() + d).to(t.dtype))

    return tuple(shapes), shift(c), shift(-c), False


def _cut(t: torch.Tensor, n: int, ctx: Context) -> torch.Tensor:
    tail = t[n:]
    # Bitwise zero: -0.0 or a NaN row is data, and re-padding with +0.0 would not give it back.
    if tail.numel() and not ctx.allow_cut and bool(_bits(tail).ne(0).any()):
        raise InputError(f"{ctx.tensors}: rows {n}..{t.shape[0] - 1} would be cut but are not zero padding "
                         f"({ctx.where}); pass --allow-vocab-cut (allow_cut=True) to drop them")
    return t[:n]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros((n,) + tuple(t.shape[1:]), dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def _rows(arg, shapes, sym, ctx, grow: bool):
    n = evaluate(arg, sym)
    for s in shapes:
        if not s or (s[0] > n if grow else s[0] < n):
            raise SpecError(f"{'pad_rows' if grow else 'slice_rows'} {n} of a tensor with shape {list(s)}")
    out = tuple((n,) + s[1:] for s in shapes)
    rows = [s[0] for s in shapes]
    pad = lambda xs, ns: [(lambda x=x, r=r: _pad(x(), r)) for x, r in zip(xs, ns)]  # noqa: E731
    cut = lambda xs, ns: [(lambda x=x, r=r: _cut(x(), r, ctx)) for x, r in zip(xs, ns)]  # noqa: E731
    if grow:
        return out, (lambda xs: pad(xs, [n] * len(xs))), (lambda ys: cut(ys, rows)), True
    return out, (lambda xs: cut(xs, [n] * len(xs))), (lambda ys: pad(ys, rows)), True


OPS: dict[str, Callable] = {
    "transpose": _transpose,
    "reshape": _reshape,
    "unbind": _unbind,
    "stack": _stack,
    "split": _split,
    "concat": _concat,
    "add": _add,
    "pad_rows": lambda arg, shapes, sym, ctx: _rows(arg, shapes, sym, ctx, grow=True),
    "slice_rows": lambda arg, shapes, sym, ctx: _rows(arg, shapes, sym, ctx, grow=False),
}


def bind_op(op: OpSpec, shapes: tuple[Shape, ...], symbols: Mapping[str, int], ctx: Context) -> BoundOp:
    """Resolve `op` for input `shapes` (raises SpecError naming the problem; the caller adds the rule)."""
    if op.name not in OPS:
        raise SpecError(f"unknown op {op.name!r} (known: {', '.join(OPS)})")
    out, fwd, inv, exact = OPS[op.name](op.arg, shapes, symbols, ctx)
    return BoundOp(op, tuple(shapes), tuple(out), fwd, inv, exact)
