"""Exceptions the CLI turns into one-line messages, and the text helpers those messages need.

`InputError` (and its subclasses) means the user gave us something we cannot use: the CLI prints
`pgconv: error: <message>` and exits 2. Messages name the file (and tensor or key) and the problem.
"""

from __future__ import annotations

__all__ = ["PgconvError", "InputError", "printable", "json_type", "json_value_error"]


class PgconvError(Exception):
    """Base class for errors pgconv raises on purpose."""


class InputError(PgconvError, ValueError):
    """Bad input: a file, config, tensor, prompt or option that cannot be used (exit code 2)."""


class PgconvWarning(UserWarning):
    """Input read as transformers reads it although it looks wrong (the CLI prints `pgconv: warning: ...`)."""


def printable(text: str, keep: str = "\n") -> str:
    """`text` with every non-printable character (ESC, BEL, NUL, other C0/C1 controls, bidi overrides, line and
    paragraph separators) written as its Python escape (`\\x1b`, `\\u202e`), except those in `keep`.

    Tensor names, member names and file names come from files anyone can craft: printed raw, an ESC sequence in a
    name rewrites the user's terminal (title, colours, hidden text, on some terminals clipboard or worse). Every
    text pgconv echoes passes through here (the CLI's error line and each command's report)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def json_value_error(e: ValueError) -> str:
    """What a ValueError from `json.loads`/`tomllib.loads` that is not a syntax error means: an integer literal past
    Python's int-from-string limit (4300 digits) is raised as a bare ValueError that suggests an interpreter API."""
    return "an integer literal is too long" if "integer string conversion" in str(e) else str(e)


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages like "dtype must be a string, got an array"."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
