"""Exceptions the CLI turns into one-line messages.

`InputError` (and its subclasses) means the user gave us something we cannot use: the CLI prints
`pgconv: error: <message>` and exits 2. Messages name the file (and tensor or key) and the problem.
"""

from __future__ import annotations

__all__ = ["PgconvError", "InputError"]


class PgconvError(Exception):
    """Base class for errors pgconv raises on purpose."""


class InputError(PgconvError, ValueError):
    """Bad input: a file, config, tensor, prompt or option that cannot be used (exit code 2)."""


class PgconvWarning(UserWarning):
    """Input read as transformers reads it although it looks wrong (the CLI prints `pgconv: warning: ...`)."""
