"""Conversion plans: a pure function from source tensor metadata to the output, checked before any bytes move.

A `Plan` lists one `Step` per target tensor: the source tensor(s) it is made from and a named transform from
`TRANSFORMS` (default `identity`, i.e. a rename) with hashable arguments. Later transform tables (transpose,
reshape, split, vocab pad/cut for big_vision) register more `Transform`s; each one states its output shape from
its input shapes, so `validate_plan` can check every shape without data. `Drop`s consume a source tensor that
is not written because it must equal another one (a tied `lm_head`); the writer verifies the equality. `ignored`
source tensors are the SigLIP head's, which transformers loads but PaliGemma never uses: not written, reported.
No file access here (style.md §2.3).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgconv.converter.dtypes import FLOAT_CODES
from pgconv.converter.layouts import LAYOUTS, LayoutError, detect_layout, head_shapes, key_map, native_shapes
from pgconv.converter.sources import TensorMeta
from pgconv.errors import InputError
from pgconv.model.config import PaliGemmaConfig

if TYPE_CHECKING:
    import torch

__all__ = ["Transform", "TRANSFORMS", "Step", "Drop", "Plan", "plan_conversion", "validate_plan", "expected_shapes"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    name: str
    shape: Callable[[tuple[Shape, ...], tuple], Shape]  # target shape from source shapes; raises on bad input
    apply: Callable[[list["torch.Tensor"], tuple], "torch.Tensor"]
    raw: bool = False  # output bytes equal the single source's bytes, so a same-dtype step is a byte-range copy


def _identity_shape(shapes: tuple[Shape, ...], args: tuple) -> Shape:
    if len(shapes) != 1:
        raise ValueError(f"identity takes one source, got {len(shapes)}")
    return shapes[0]


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform("identity", _identity_shape, lambda ts, args: ts[0], raw=True),
}


@dataclass(frozen=True)
class Step:
    target: TensorMeta
    sources: tuple[str, ...]
    transform: str = "identity"
    args: tuple = ()
    shares_source: bool = False  # deliberately reads a source another step reads too (--untie copies the embedding)

    @property
    def is_raw_copy(self) -> bool:
        """True when the output bytes are the source bytes (same dtype, byte-preserving transform)."""
        return TRANSFORMS[self.transform].raw


@dataclass(frozen=True)
class Drop:
    source: str
    equals: str  # the source tensor it must be bit-identical to
    reason: str


@dataclass(frozen=True)
class Plan:
    src_layout: str
    dst_layout: str
    steps: tuple[Step, ...]
    drops: tuple[Drop, ...] = ()
    config_changes: Mapping[str, object] = field(default_factory=dict)  # config.json edits (`convert.rewrite_config`)
    ignored: tuple[str, ...] = ()  # source tensors of the unused SigLIP head (`layouts.head_shapes`): not written

    @property
    def targets(self) -> list[TensorMeta]:
        return [s.target for s in self.steps]

    @property
    def total_bytes(self) -> int:
        return sum(s.target.nbytes for s in self.steps)


def expected_shapes(cfg: PaliGemmaConfig, layout: str, *, with_lm_head: bool | None = None) -> dict[str, Shape]:
    """Name in `layout` -> shape, for every tensor the config implies."""
    names = key_map(cfg, layout, with_lm_head=with_lm_head)
    return {names[n]: s for n, s in native_shapes(cfg, with_lm_head=with_lm_head).items()}


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def plan_conversion(sources: Mapping[str, TensorMeta], cfg: PaliGemmaConfig, dst_layout: str, *,
                    src_layout: str | None = None, dtype: str | None = None, untie: bool = False) -> Plan:
    """Plan a layout conversion: rename every tensor, optionally cast to `dtype`, handle the tied `lm_head`.

    Tied config: a source `lm_head` is dropped after the writer checks it equals the embedding; with
    `untie`, the output keeps an `lm_head` (the source's, else a copy of the embedding) and the config is
    rewritten untied. Raises `InputError`/`LayoutError` naming the offending tensors.
    """
    if dst_layout not in LAYOUTS:
        raise InputError(f"unknown layout {dst_layout!r}; known: {', '.join(LAYOUTS)}")
    src_layout = src_layout or detect_layout(sources)
    src_lay, dst_lay = LAYOUTS[src_layout], LAYOUTS[dst_layout]
    src_names, dst_names = key_map(cfg, src_layout, with_lm_head=True), key_map(cfg, dst_layout, with_lm_head=True)
    tied = cfg.tie_word_embeddings
    native = list(native_shapes(cfg, with_lm_head=False))
    pairs = [(src_names[n], dst_names[n]) for n in native]
    embed = src_names["text.embed.weight"]
    has_head = src_lay.lm_head in sources
    drops: list[Drop] = []
    changes: dict[str, object] = {}
    if not tied or (untie and has_head):
        pairs.append((src_lay.lm_head, dst_lay.lm_head))
    elif untie:
        pairs.append((embed, dst_lay.lm_head))
    elif has_head:
        drops.append(Drop(src_lay.lm_head, embed, "tied to the embedding (tie_word_embeddings=true)"))
    if tied and untie:
        changes["tie_word_embeddings"] = False
    # The SigLIP head transformers builds (vision_use_head true) and PaliGemma never uses: its tensors, if stored,
    # are not written, and the output config says there is no head (transformers would otherwise re-create it with
    # random values and warn that its weights are missing). Mis-shaped ones are refused, as transformers refuses them.
    head = head_shapes(cfg, src_layout)
    ignored = tuple(n for n in head if n in sources)
    for n in ignored:
        if tuple(sources[n].shape) != head[n]:
            raise InputError(f"tensor {n!r} has shape {list(sources[n].shape)}; the config implies {list(head[n])}")
    if cfg.vision.use_head:
        changes["vision_config.vision_use_head"] = False
    missing = [s for s, _ in pairs if s not in sources]
    used = {s for s, _ in pairs} | {d.source for d in drops} | set(ignored)
    unexpected = [s for s in sources if s not in used]
    if missing or unexpected:
        parts = [f"missing {len(missing)} tensor(s): {_listing(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)} tensor(s): {_listing(unexpected)}"] if unexpected else []
        raise LayoutError(f"layout {src_layout}: " + "; ".join(parts))
    steps = []
    for src, dst in pairs:
        meta = sources[src]
        steps.append(Step(TensorMeta(dst, meta.shape, dtype or meta.dtype), (src,),
                          shares_source=(src == embed and dst == dst_lay.lm_head)))
    if dtype:
        changes["dtype"] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]
    plan = Plan(src_layout, dst_layout, tuple(steps), tuple(drops), changes, ignored)
    validate_plan(plan, sources, expected_shapes(cfg, dst_layout, with_lm_head=not tied or untie))
    return plan


def validate_plan(plan: Plan, sources: Mapping[str, TensorMeta], expected: Mapping[str, Shape] | None = None) -> None:
    """Coverage (every source used once, every target made once), transform shapes, expected shapes, dtypes."""
    uses = Counter(s for step in plan.steps if not step.shares_source for s in step.sources)
    uses.update(d.source for d in plan.drops)
    for step in plan.steps:
        for s in step.sources:
            if s not in sources:
                raise LayoutError(f"target {step.target.name!r} reads {s!r}, which the source does not have")
    twice = sorted(s for s, n in uses.items() if n > 1)
    unused = sorted(set(sources) - set(uses) - {s for st in plan.steps for s in st.sources} - set(plan.ignored))
    if twice:
        raise LayoutError(f"source tensor {twice[0]!r} is used more than once ({len(twice)} such)")
    if unused:
        raise LayoutError(f"source tensor {unused[0]!r} is not used by the plan ({len(unused)} unused: {_listing(unused)})")
    made = Counter(step.target.name for step in plan.steps)
    dupes = sorted(n for n, k in made.items() if k > 1)
    if dupes:
        raise LayoutError(f"target tensor {dupes[0]!r} is produced more than once")
    for step in plan.steps:
        src_metas = [sources[s] for s in step.sources]
        for m in src_metas:
            if m.dtype not in FLOAT_CODES:
                raise InputError(f"tensor {m.name!r} has dtype {m.dtype}; PaliGemma weights are floating point")
        try:
            shape = TRANSFORMS[step.transform].shape(tuple(m.shape for m in src_metas), step.args)
        except (ValueError, KeyError) as e:
            raise LayoutError(f"target {step.target.name!r}: transform {step.transform!r} cannot apply ({e})") from None
        if shape != step.target.shape:
            raise LayoutError(f"target {step.target.name!r}: transform gives {list(shape)}, plan says {list(step.target.shape)}")
        if expected is not None and expected.get(step.target.name, shape) != shape:
            src = step.sources[0]
            raise InputError(f"tensor {src!r} has shape {list(sources[src].shape)}; "
                             f"the config implies {list(expected[step.target.name])}")
    if expected is not None:
        extra = [n for n in made if n not in expected]
        if extra:
            raise LayoutError(f"plan produces {len(extra)} tensor(s) the config does not imply: {_listing(extra)}")
        absent = [n for n in expected if n not in made]
        if absent:
            raise LayoutError(f"plan does not produce {len(absent)} tensor(s) the config implies: {_listing(absent)}")
    for d in plan.drops:
        a, b = sources[d.source], sources[d.equals]
        if a.shape != b.shape:
            raise InputError(f"tensor {d.source!r} {list(a.shape)} should equal {d.equals!r} {list(b.shape)} ({d.reason})")
