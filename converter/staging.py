"""Temporary siblings of an output (`.DST.pgconv-tmp-HOST-PID-RANDOM`) and the clean-up of ones a killed run left.

Every writer builds its output in a hidden sibling and renames it into place, so an error or Ctrl-C leaves
nothing behind. `kill -9`, a power cut or an OOM kill cannot run that clean-up; the next run towards the same
destination removes such leftovers, but only those made on this host by a process that no longer exists (a
live conversion's directory, or one on a shared filesystem from another machine, is never touched).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from pgconv.errors import InputError

__all__ = ["temp_sibling", "reap_stale", "copy_companion"]

_KINDS = ("tmp", "old")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def temp_sibling(dst: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name next to `dst` (not created): `kind` "tmp" for the output being built, "old" for a
    --force'd destination moved aside."""
    assert kind in _KINDS
    return dst.parent / f".{dst.name}.pgconv-{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def reap_stale(dst: Path) -> list[Path]:
    """Remove `dst`'s temporary siblings left by dead processes on this host; returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.pgconv-({'|'.join(_KINDS)})-{re.escape(_host())}-(\d+)-[0-9a-f]{{8}}")
    removed = []
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(2))) or p.is_symlink():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if not p.exists():
            removed.append(p)
    return removed


def copy_companion(src: Path, directory: Path) -> None:
    """Copy a checkpoint's companion file (tokenizer, processor, generation config) into the output being built;
    a file that cannot be read is named as the source it is, not reported as a failed write of the output."""
    try:
        shutil.copyfile(src, directory / src.name)
    except OSError as e:
        if e.filename == str(src):
            raise InputError(f"{src}: cannot read ({e.strerror or e})") from None
        raise

