"""Layer-by-layer execution of pgconv's PaliGemma when its weights do not fit the memory budget.

`load_streamed(path, dtype, budget=...)` builds the model with every parameter a placeholder (right shape, dtype and
device, one element of storage) and reads each unit's weights from the checkpoint only while the unit runs:

- units: each vision block, each decoder block, the token embedding (it is also the tied head), an untied
  `lm_head`; everything else (patch and position embeddings, norms, projector: a few MB) stays resident;
- a forward pre-hook on every module of a unit that owns parameters reads the unit's tensors (`SourceTensor.load`:
  a `preadv` into a fresh tensor, so no mapped page of the file stays in the resident set) and casts them one
  tensor at a time to the run dtype (a bf16 checkpoint run in fp32 is cast one layer at a time); the unit that ran
  before is released to placeholders first, so at most one streamed unit is materialised. A hook on every
  parameter-owning module, not only the block, so that a sub-module called on its own (verify's teacher-forced
  replays) never runs on placeholders;
- while the budget allows, units stay pinned (read once, kept): the embedding first (every step uses it twice),
  then decoder blocks (every step), then vision blocks (once per image). The rest of the budget is the working set
  of one streamed unit (its cast weights plus the stored tensor being cast);
- `logits()` reads the head's weight directly (no module call), so it is wrapped to materialise the head.

The KV cache is per decoder block already (`KVCache` in each `Attention`), and activations for a prompt are T x d, so
peak memory is the budget plus activations, the cache and the interpreter, whatever the model's size. Generation,
hooks (`parity.capture.Recorder`) and `pgconv.generate` run unchanged on the streamed model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pgconv.errors import InputError
from pgconv.model.budget import FIT_FACTOR, format_size

__all__ = ["Unit", "Streamer", "load_streamed", "load_within", "map_large_allocations", "place", "weight_bytes",
           "needs_streaming", "streamer_of", "HEAD_UNITS"]


@dataclass
class Unit:
    name: str
    params: list[tuple[str, nn.Module, str]]  # (native name, owning module, attribute name)
    nbytes: int
    pinned: bool = False
    resident: bool = False
    loads: int = 0  # times read from the checkpoint (tests, --verbose)
    device: torch.device | None = None  # where it runs when not the model's device (several GPUs: `parity.offload`)


@dataclass
class Streamer:
    """The streamed units of one model and their loaders (native name -> SourceTensor)."""

    model: nn.Module
    sources: dict[str, object]
    dtype: torch.dtype
    device: torch.device
    budget: int
    units: list[Unit] = field(default_factory=list)
    _active: Unit | None = None
    _placeholders: dict[torch.dtype, Tensor] = field(default_factory=dict)

    def placeholder(self, shape: tuple[int, ...]) -> Tensor:
        """A (shape) tensor on one element of storage (zero strides): shape, dtype and device are right, so code that
        reads `weight.dtype` / `.device` / `.shape` works, and no memory is held."""
        base = self._placeholders.get(self.dtype)
        if base is None:
            base = self._placeholders[self.dtype] = torch.zeros(1, dtype=self.dtype, device=self.device)
        return base.as_strided(shape, (0,) * len(shape))

    def _read(self, native: str, device: torch.device | None = None) -> Tensor:
        t = self.sources[native].load()  # type: ignore[attr-defined]
        # As `pgconv.load` casts (`load._read`), one tensor at a time.
        return t.to(device=device or self.device, dtype=self.dtype)

    def pin_within(self, budget: int, used: int = 0) -> None:
        """Pin (read once, keep) units in priority order while the pinned weights plus the working set of the units
        left to stream fit `budget` (`used`: bytes already held, e.g. tensors shared with the reference). So the
        embedding (3.7 GB in fp32 at 10B, the largest unit) is pinned when that leaves room to stream the blocks,
        and streamed (its own working set then counts) when it does not."""
        for unit in self.units:
            if unit.pinned:
                continue
            rest = [u for u in self.units if not u.pinned and u is not unit]
            if used + unit.nbytes + self.working_set(rest) <= budget:
                unit.pinned, used = True, used + unit.nbytes
                if self._active is unit:
                    self._active = None
                self.materialise(unit)

    def working_set(self, units: list[Unit] | None = None) -> int:
        """Bytes streaming `units` (default: those not pinned) needs at once: the largest unit cast, plus the
        largest of their tensors in its stored dtype (being cast)."""
        units = [u for u in self.units if not u.pinned] if units is None else units
        if not units:
            return 0
        return (max(u.nbytes for u in units)
                + max(self.sources[n].meta.nbytes for u in units for n, _, _ in u.params))  # type: ignore[attr-defined]

    def materialise(self, unit: Unit) -> None:
        if unit.resident:
            return
        if self._active is not None and self._active is not unit and not self._active.pinned:
            self.release(self._active)
        for native, module, attr in unit.params:
            module._parameters[attr] = nn.Parameter(self._read(native, unit.device), requires_grad=False)
        unit.resident, unit.loads = True, unit.loads + 1
        if not unit.pinned:
            self._active = unit

    def release(self, unit: Unit) -> None:
        from pgconv.parity.capture import release_freed_memory

        for _, module, attr in unit.params:
            shape = tuple(module._parameters[attr].shape)
            module._parameters[attr] = nn.Parameter(self.placeholder(shape), requires_grad=False)
        unit.resident = False
        if self._active is unit:
            self._active = None
        release_freed_memory()  # freed layer-sized blocks back to the OS, not kept in the heap's high-water mark

    def release_all(self) -> None:
        for unit in self.units:
            if unit.resident and not unit.pinned:
                self.release(unit)

    def hold(self, unit: Unit) -> Callable[[], None]:
        def hook(*_args: object) -> None:
            self.materialise(unit)

        return hook


HEAD_UNITS = ("text.embed", "lm_head")  # verify keeps these in memory on both sides (shared)
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_FROM = 1 << 20


def map_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more from its own mapping (glibc `mallopt(M_MMAP_THRESHOLD)`), so a
    released layer goes back to the OS at once. glibc's default raises the threshold to the size of each mapped
    block freed (up to 32 MiB), after which layer-sized tensors come from the heap, whose freed blocks stay resident
    (measured: +8 MiB per offloaded 8 MiB weight read, never returned without `malloc_trim`). Process-wide and
    only on the layer-by-layer paths; a no-op off glibc."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM)
    except (OSError, AttributeError):
        pass


def _to(value, device: torch.device):
    """`value` with every tensor in it (tuples, lists, dicts, an `AttnContext`) on `device`."""
    import dataclasses

    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _to(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value)})
    return value


def place(model: nn.Module, devices: dict[str, torch.device]) -> None:
    """Run each streamed unit named in `devices` on its device (several GPUs: the placement of the reference's
    layers, `parity.offload.placement`): its weights load there, its inputs (activations, the `AttnContext`'s RoPE
    tables and masks) are moved there on entry, a decoder block's KV cache lives there; the resident modules after
    a moved unit (final norms, projector) take their inputs back on the model's device. Moves are no-ops where
    everything is on one device (what runs on CPU here)."""
    streamer = model.streamer
    home = streamer.device

    def mover(device: torch.device, block: nn.Module | None = None):
        def hook(_module, args, kwargs):
            if block is not None and block.attn.cache is not None:
                block.attn.cache.to(device)  # buffers move in place; ensure_cache checks block 0's only
            return _to(args, device), _to(kwargs, device)

        return hook

    moved = False
    for unit in streamer.units:
        device = devices.get(unit.name)
        if device is None or torch.device(device) == home:
            continue
        unit.device, moved = torch.device(device), True
        root = model.get_submodule(unit.name)
        block = root if unit.name.startswith("text.blocks.") else None
        root.register_forward_pre_hook(mover(unit.device, block), with_kwargs=True, prepend=True)
    if moved:
        for name in ("vision.norm", "projector", "text.norm"):
            model.get_submodule(name).register_forward_pre_hook(mover(home), with_kwargs=True, prepend=True)
        plain = model.logits

        def logits(hidden: Tensor) -> Tensor:
            return plain(hidden.to(home))

        model.logits = logits


def weight_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of every parameter of a `PaliGemma(cfg)` in `dtype` (meta device: nothing allocated)."""
    from pgconv.model.paligemma import PaliGemma

    with torch.device("meta"):
        model = PaliGemma(cfg)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def needs_streaming(nbytes: int, budget: int | None) -> bool:
    """Whether a model of `nbytes` weights (in the run dtype) must run layer by layer under `budget`."""
    return budget is not None and nbytes * FIT_FACTOR > budget


def streamer_of(model: nn.Module) -> Streamer | None:
    return getattr(model, "streamer", None)


def _units(model: nn.Module, dtype: torch.dtype) -> tuple[list[Unit], set[str]]:
    """The streamed units in pinning priority order, and the native names that stay resident."""
    groups: list[tuple[str, nn.Module]] = [("text.embed", model.text.embed)]
    if model.lm_head is not None:
        groups.append(("lm_head", model.lm_head))
    groups += [(f"text.blocks.{i}", b) for i, b in enumerate(model.text.blocks)]
    groups += [(f"vision.blocks.{i}", b) for i, b in enumerate(model.vision.blocks)]
    units, streamed = [], set()
    for prefix, root in groups:
        params = []
        for mod_name, module in root.named_modules():
            for attr, p in module.named_parameters(recurse=False):
                native = ".".join(x for x in (prefix, mod_name, attr) if x)
                params.append((native, module, attr))
                streamed.add(native)
        units.append(Unit(prefix, params, sum(m._parameters[a].numel() for _, m, a in params) * dtype.itemsize))
    resident = {n for n, _ in model.named_parameters()} - streamed
    return units, resident


def load_streamed(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", *,
                  budget: int, pin: bool = True):
    """`pgconv.load`'s model, run layer by layer within `budget` bytes of weights (module docstring). `pin=False`:
    nothing pinned yet (verify first shares the reference's in-memory tensors, then `streamer.pin_within`)."""
    from pgconv.converter.hub import resolve_source
    from pgconv.converter.load import auto_dtype, check_checkpoint, generation_settings
    from pgconv.model.paligemma import PaliGemma

    ckpt, cfg, plan = check_checkpoint(*resolve_source(path))
    dtype = dtype or auto_dtype(ckpt)
    map_large_allocations()
    sources = {step.target.name: ckpt.tensors[step.sources[0]] for step in plan.steps}
    with torch.device("meta"):
        model = PaliGemma(cfg)
    device = torch.device(device)
    units, resident = _units(model, dtype)
    missing = sorted(set(n for n, _ in model.named_parameters()) - set(sources))
    if missing:  # check_checkpoint's plan covers every parameter; a mismatch here is a bug, not bad input
        raise AssertionError(f"no source for {missing[:3]}")
    streamer = Streamer(model, sources, dtype, device, budget, units)
    for name in resident:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(streamer._read(name), requires_grad=False)
    for unit in units:
        for _, module, attr in unit.params:
            module._parameters[attr] = nn.Parameter(streamer.placeholder(tuple(module._parameters[attr].shape)),
                                                    requires_grad=False)
        for module in {id(m): m for _, m, _ in unit.params}.values():
            module.register_forward_pre_hook(streamer.hold(unit))
    # The least a run needs: one block streamed next to the pinned embedding and head, or all of them streamed.
    blocks = [u for u in units if u.name not in HEAD_UNITS]
    heads = sum(u.nbytes for u in units if u.name in HEAD_UNITS)
    least = min(streamer.working_set(blocks) + heads, streamer.working_set(units))
    if least > budget:
        raise InputError(f"memory budget {format_size(budget)} is below what one layer at a time needs "
                         f"({format_size(least)} in {str(dtype).removeprefix('torch.')}: the largest block or the "
                         f"embedding, and the largest stored tensor to cast it): raise --max-memory")
    if pin:
        streamer.pin_within(budget)
    _wrap_logits(model, streamer)
    model.streamer = streamer
    model.generation = generation_settings(ckpt, cfg)
    return model.eval().requires_grad_(False)


def _wrap_logits(model: nn.Module, streamer: Streamer) -> None:
    head = next(u for u in streamer.units if u.name == ("lm_head" if model.lm_head is not None else "text.embed"))
    plain = model.logits

    def logits(hidden: Tensor) -> Tensor:
        streamer.materialise(head)  # the head's weight is read directly, not through a module call
        return plain(hidden)

    model.logits = logits  # instance attribute: nn.Module keeps plain callables in __dict__


def load_within(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", *,
                budget: int | None):
    """`pgconv.load(path, dtype, device)` when the weights fit `budget` (None: no limit), else `load_streamed`:
    a model that fits runs exactly as before budgets existed."""
    from pgconv.converter.hub import resolve_source
    from pgconv.converter.load import auto_dtype, check_checkpoint, load

    if budget is not None:
        ckpt, cfg, _ = check_checkpoint(*resolve_source(path))
        run_dtype = dtype or auto_dtype(ckpt)
        if needs_streaming(weight_bytes(cfg, run_dtype), budget):
            return load_streamed(path, run_dtype, device, budget=budget)
    return load(path, dtype=dtype, device=device)
