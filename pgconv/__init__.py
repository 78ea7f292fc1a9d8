"""pgconv: PaliGemma weight conversion and verification.

The public API is imported lazily (PEP 562) so that `import pgconv` and the CLI start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "PaliGemmaConfig": ("pgconv.model.config", "PaliGemmaConfig"),
    "from_name": ("pgconv.model.config", "from_name"),
    "PRESETS": ("pgconv.model.config", "PRESETS"),
    "PaliGemma": ("pgconv.model.paligemma", "PaliGemma"),
    "generate": ("pgconv.model.generate", "generate"),
    "Processor": ("pgconv.model.processor", "Processor"),
    "load": ("pgconv.converter.load", "load"),
    "convert": ("pgconv.converter.convert", "convert"),
    "inspect": ("pgconv.converter.inspect", "inspect"),
    "make_fixture": ("pgconv.converter.fixture", "make_fixture"),
    "verify": ("pgconv.parity.verify", "verify"),
    "golden": ("pgconv.parity.golden", "golden"),
    "compare": ("pgconv.parity.dump", "compare"),
    "diff": ("pgconv.parity.diff", "diff"),
    "InputError": ("pgconv.errors", "InputError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pgconv' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
