"""Where an output goes: the destination checks, the temporary sibling it is built in
(`.DST.pgconv-tmp-HOST-PID-RANDOM`), the atomic rename into place, and the clean-up of siblings a killed run left.

Every writer builds its output in a hidden sibling and renames it into place (`publish`), so an error or Ctrl-C
leaves nothing behind, and two conversions started at once towards the same DST cannot both "win": the
existence check and the rename are one step. `kill -9`, a power cut or an OOM kill cannot run the clean-up; the
next run towards the same destination removes such leftovers, but only those made on this host by a process that
no longer exists (a live conversion's directory, or one on a shared filesystem from another machine, is never
touched).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pgconv.converter.checkpoint import resolved
from pgconv.errors import InputError

if TYPE_CHECKING:
    from pgconv.converter.checkpoint import Checkpoint

__all__ = ["temp_sibling", "reap_stale", "copy_companion", "check_destination", "publish"]

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
    a file that cannot be read is named as the source it is, not reported as a failed write of the output.

    Opened without blocking and checked to be a regular file on the open descriptor: a FIFO put in its place after
    `companion_files` listed it would otherwise block the conversion forever (or be dropped from the output)."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputError(f"{src}: cannot read ({e.strerror or e})") from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{src}: not a regular file (the output would lack it)")
        os.set_blocking(fd, True)
        with open(directory / src.name, "wb") as out:  # its errors are the output's (ENOSPC, EROFS)
            while True:
                try:
                    chunk = f.read(1 << 20)
                except OSError as e:
                    raise InputError(f"{src}: cannot read ({e.strerror or e})") from None
                if not chunk:
                    break
                out.write(chunk)


def check_destination(dst: Path, src: "Checkpoint", src_is_dir: bool, force: bool, *, file_output: bool = False
                      ) -> None:
    """Refuse, before any work, a DST that overlaps the source (DST is or holds one of its files, or lies inside a
    directory source: writing there changes SRC), that exists without `force` (with `force`, only a directory is
    replaced by a directory output; `file_output` outputs replace whatever is there), or whose parent is missing or
    not writable. `publish` repeats the existence check atomically."""
    real = resolved(dst)
    inputs = [*src.files, *src.companion_files()] + ([src.root] if src_is_dir else [])
    if any(resolved(p) == real or resolved(p).is_relative_to(real) for p in inputs) or (
            src_is_dir and real.is_relative_to(resolved(src.root))):
        raise InputError(f"{dst}: destination overlaps the source {src.root}; choose another "
                         + ("file" if file_output else "directory"))
    if dst.exists() or dst.is_symlink():
        if not force:
            raise InputError(f"{dst}: already exists (use --force to replace it)")
        if not file_output and (not dst.is_dir() or dst.is_symlink()):
            raise InputError(f"{dst}: exists and is not a directory; refusing to replace it")
    if not dst.parent.is_dir():
        raise InputError(f"{dst.parent}: destination's parent " + ("is not a directory" if dst.parent.exists() else
                                                                             "directory does not exist"))
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise InputError(f"{dst.parent}: not writable")


# renameat2(2) flags (linux/fs.h): fail if the target exists / swap source and target, both atomically.
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _libc_renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28 (Linux); absent on macOS
    except (OSError, AttributeError):
        return None


_renameat2_fn = _libc_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False when this system or filesystem lacks it (the caller
    falls back to a lock); any other failure raises the OSError (FileExistsError for RENAME_NOREPLACE)."""
    if _renameat2_fn is None:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextlib.contextmanager
def _parent_lock(dst: Path) -> Iterator[None]:
    """An exclusive lock on DST's parent directory, for systems without renameat2: every pgconv writer takes it
    around its check-and-rename, so those two are one step for each other (flock on the directory itself; on
    filesystems where that fails, e.g. NFS, an fcntl lock on a `.DST.pgconv-lock` file, which stays)."""
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        fd = os.open(dst.parent / f".{dst.name}.pgconv-lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(tmp: Path, dst: Path, force: bool) -> None:
    """Rename the finished output `tmp` to `dst` in one atomic step, then fsync the parent directory.

    Without `force`, a `dst` that appeared since `check_destination` (another conversion started at the same time
    finished first) is an `InputError` naming it, and it is left as it is: renameat2(RENAME_NOREPLACE), or where
    that is missing, the check and a plain rename under `_parent_lock`. With `force`, an existing `dst` is swapped
    with `tmp` atomically (RENAME_EXCHANGE: `dst` is at no moment missing or half-written) and the old one, now at
    `tmp`, removed; without renameat2, moved aside and replaced under the lock. The caller removes `tmp` on error.
    """
    taken = InputError(f"{dst}: already exists (another process created it while this conversion ran; use --force "
                       "to replace it)")
    if not force:
        try:
            done = _renameat2(tmp, dst, _RENAME_NOREPLACE)
        except FileExistsError:
            raise taken from None
        if not done:
            with _parent_lock(dst):
                if dst.exists() or dst.is_symlink():
                    raise taken
                os.rename(tmp, dst)
    else:
        while True:  # at most twice: a dst that is removed between the two calls is then simply absent
            try:
                if _renameat2(tmp, dst, _RENAME_EXCHANGE):
                    _remove(tmp)  # the replaced output
                    break
            except FileNotFoundError:  # no dst to swap with
                try:
                    if _renameat2(tmp, dst, _RENAME_NOREPLACE):
                        break
                except FileExistsError:
                    continue
            with _parent_lock(dst):
                old = temp_sibling(dst, "old")
                replaced = dst.exists() or dst.is_symlink()
                if replaced:
                    dst.rename(old)
                try:
                    os.rename(tmp, dst)
                except BaseException:
                    if replaced:
                        old.rename(dst)  # put the --force'd destination back
                    raise
            if replaced:
                _remove(old)
            break
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

