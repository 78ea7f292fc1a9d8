"""Capture activations with forward hooks and forward pre-hooks (no flags or hooks inside model code).

`Recorder(model, paths)` registers hooks on the named submodules for the duration of a `with` block and keeps, per
module, the first call's positional args, keyword args and output (detached; no copies: the tensors are the ones the
model produced, so capture costs no memory beyond keeping them alive). A path may carry `@name` to read one keyword
argument of the call (`layers.0@attention_mask`) or `@ctx.attr` to read an attribute of the call's second argument
(our `DecoderBlock.forward(x, ctx)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Call", "Recorder", "primary", "tensor_of", "split_path", "release_freed_memory"]


@dataclass
class Call:
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    done: bool = False


def split_path(path: str) -> tuple[str, str]:
    """"layers.0@attention_mask" -> ("layers.0", "attention_mask"); no "@" -> (path, "")."""
    module, _, attr = path.partition("@")
    return module, attr


def primary(value: Any) -> Tensor | None:
    """The main tensor of a module's output or input: a tensor itself, the first element of a tuple (HF attention
    returns `(out, weights)`), `logits` / `last_hidden_state` of a ModelOutput, else the first tensor found."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):  # ModelOutput is an OrderedDict
        for key in ("logits", "last_hidden_state", "hidden_states", "inputs_embeds", "x"):
            if isinstance(value.get(key), Tensor):
                return value[key]
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for v in value:
            t = primary(v)
            if t is not None:
                return t
    return None


def tensor_of(call: Call, at: str, attr: str = "") -> Any:
    """The captured value: the call's output or first tensor input, or a keyword argument / ctx attribute."""
    if attr.startswith("ctx."):
        ctx = call.args[1] if len(call.args) > 1 else call.kwargs.get("ctx")
        value: Any = ctx
        for part in attr[4:].split("."):
            value = getattr(value, part)
        return value
    if attr:
        return call.kwargs.get(attr)
    if at == "output":
        return primary(call.output)
    return primary((*call.args, call.kwargs))


class Recorder:
    """Hooks on `paths` (module names, optionally with "@..."; "" = the root module) while inside `with`."""

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        self.model = model
        self.calls: dict[str, Call] = {}
        names = {split_path(p)[0] for p in paths}
        modules = dict(model.named_modules())
        missing = sorted(n for n in names if n not in modules)
        if missing:
            raise KeyError(f"{type(model).__name__} has no module(s) {', '.join(missing[:5])}")
        self._targets = {n: modules[n] for n in names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # Called with the module name after each module's first call is recorded (e.g. to compare it right away).
        self.on_call: Callable[[str], None] | None = None

    def __enter__(self) -> "Recorder":
        for name, module in self._targets.items():
            call = self.calls.setdefault(name, Call())
            self._handles.append(module.register_forward_pre_hook(self._pre(call), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(name, call), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _pre(call: Call):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not call.done and not call.args and not call.kwargs:
                call.args, call.kwargs = tuple(args), dict(kwargs)

        return hook

    def _post(self, name: str, call: Call):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not call.done:  # keep the first call only (a module called twice is a probe-table error)
                call.output, call.done = _detach(output), True
                if self.on_call is not None:
                    self.on_call(name)

        return hook

    def drop(self, modules: set[str]) -> None:
        """Forget the recorded calls of `modules` (frees their captured activations). The Call is emptied in place:
        while the hooks are registered their closures still hold it, and it stays `done`, so a later call of the
        module records nothing."""
        for m in modules:
            call = self.calls.pop(m, None)
            if call is not None:
                call.args, call.kwargs, call.output = (), {}, None

    def keep_only(self, modules: set[str]) -> None:
        """Drop every recorded call except those of `modules` (frees the captured activations)."""
        self.calls = {k: v for k, v in self.calls.items() if k in modules}

    def get(self, path: str, at: str = "output") -> Any:
        return tensor_of(self.call(path), at, split_path(path)[1])

    def call(self, path: str) -> Call:
        """The recorded first call of the module at `path`; KeyError if it was never called."""
        module = split_path(path)[0]
        call = self.calls.get(module)
        if call is None or not call.done:
            raise KeyError(f"module {module!r} was not called during the forward pass")
        return call


def _detach(value: Any) -> Any:
    """Detached output; of a tuple only the tensors shaped like its first one are kept: RoPE's (cos, sin) stay, HF
    attention's (out, weights) keeps `out` (eager attention weights are (B, H, T, T) per layer: never compared)."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple) and not hasattr(value, "_fields") and value and isinstance(value[0], Tensor):
        return tuple(v.detach() for v in value if isinstance(v, Tensor) and v.shape == value[0].shape)
    return value


def _load_trim() -> Callable[[int], int] | None:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return trim
    except (OSError, AttributeError):
        return None


_TRIM = _load_trim()


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Captured activations are small allocations that glibc serves from its heap; freed between longer-lived ones,
    they leave holes the heap keeps, so the process's resident size stays at its high-water mark and the next
    phase's chunk-sized tensors (fresh mappings) land on top: at 3B bf16 the logits phase peaked 0.23 GiB above
    the reference forward's peak, 0.1 GiB below it after a trim (benchmarks/RESULTS.md)."""
    if _TRIM is not None:
        _TRIM(0)
