"""pgconv's own CPU kernels (`csrc/gemv.c`), built once per machine with the system C compiler.

Candidates of `model/cpu_kernels.py`, measured against torch's kernels like any other and run only where they win:
`gemv`, for decode products (one row of x, bf16 or fp32, CPU, contiguous), and `gelu_tanh`, the MLPs' bf16 GELU
(torch's own results from a table, Gemma's product with `up` in the same pass). It is compiled on first use with
`cc -O3 -march=native` into the user cache dir (`tuning` cache root, `kernels/`), named by a hash of the source,
the compiler's version, the flags and the CPU (a library built for one CPU never loads on another); the build
is atomic (temporary file + rename); a read-only cache dir builds into a private temp dir instead. Without a C
compiler, or if the build or load fails, `available()` is
False and the reason is in `unavailable_reason()`: the model then runs on torch's kernels alone.
`PGCONV_GEMV=0` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pgconv import tuning

__all__ = ["available", "unavailable_reason", "isa", "gemv", "gelu_tanh", "flusher", "library_path", "build",
           "build_id", "open_library", "ENV"]

ENV = "PGCONV_GEMV"  # 0 turns the kernel off
SOURCE = Path(__file__).resolve().parent / "csrc" / "gemv.c"
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-fno-fast-math"]
BUILD_TIMEOUT_S = 120

_lock = threading.Lock()
_state: dict = {}  # "lib", "id", "isa" or "error", once decided in this process
_scratch = threading.local()


def _compiler() -> list[str] | None:
    """The C compiler command: $CC (which may carry arguments, e.g. 'ccache gcc'), else cc, else gcc."""
    if cc := os.environ.get("CC", "").strip():
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def library_path(cc: list[str] | str, flags: list[str] = FLAGS) -> Path:
    """Where the build for this source, compiler, flags and CPU lives. The CPU is its label and its whole flags
    line: `-march=native` code uses every extension the CPU reports (the masked loads need AVX512BW), so two VMs
    that differ only in a flag the hypervisor hides must not share a build (a shared home dir would SIGILL)."""
    cc = [cc] if isinstance(cc, str) else cc
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(cc).encode(), version.encode(), " ".join(flags).encode(),
                 tuning.cpu_label().encode(), " ".join(tuning.cpu_flags()).encode()):
        h.update(part + b"\0")
    from pgconv.converter.fixture import cache_dir

    return cache_dir() / "kernels" / f"gemv-{h.hexdigest()[:16]}.so"


def build(cc: list[str], out: Path, flags: list[str] = FLAGS) -> None:
    """Compile the kernel into `out` (atomic: a temporary file, then a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([*cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT_S)
        if r.returncode != 0:
            raise OSError(f"{' '.join(cc)} failed: "
                          f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no output']}")
        os.replace(tmp, out)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _load():
    if os.environ.get(ENV, "1").strip() == "0":
        raise OSError(f"{ENV}=0")
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler (cc) on PATH")
    path = library_path(cc)
    if not path.is_file():
        try:
            build(cc, path)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # A read-only cache dir: build into a fresh private temp dir (0700, this process's own; never a
            # predictable shared path, whose planted library another user could make us load).
            path = Path(tempfile.mkdtemp(prefix="pgconv-kernels-")) / path.name
            build(cc, path)
    try:
        return open_library(path)
    except OSError:  # a damaged build (a crash mid-write elsewhere, a full disk): built again, once
        build(cc, path)
        return open_library(path)


def open_library(path: Path):
    """Load a build and declare its functions (also for tests of other builds)."""
    lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.pgconv_gemv_bf16.argtypes = [p, p, p, p, i64, i64, i64, p]
    lib.pgconv_gemv_f32.argtypes = [p, p, p, p, i64, i64, i64]
    lib.pgconv_gemv_bf16.restype = lib.pgconv_gemv_f32.restype = ctypes.c_int
    lib.pgconv_gemv_isa.restype = ctypes.c_int
    lib.pgconv_flush.argtypes = [p, i64]
    lib.pgconv_flush.restype = ctypes.c_int
    lib.pgconv_gelu_table_bf16.argtypes = [p, p, p, i64, i64, p]
    lib.pgconv_gelu_table_bf16.restype = ctypes.c_int
    return lib


def _lib():
    if not _state:
        with _lock:
            if not _state:
                try:
                    _state["lib"] = lib = _load()
                    _state["id"] = Path(lib._name).stem
                    _state["isa"] = ISA.get(lib.pgconv_gemv_isa(), "portable")
                except (OSError, subprocess.SubprocessError, AttributeError) as e:
                    _state["error"] = str(e) or type(e).__name__
    return _state.get("lib")


def build_id() -> str | None:
    """The loaded build's name (it changes with the source, compiler, flags and CPU), or None: kernel decisions
    that were measured with another build are measured again."""
    _lib()
    return _state.get("id")


def _reset() -> None:
    """Forget this process's build decision (tests: another compiler, cache dir or PGCONV_GEMV). A library already
    loaded stays mapped; a new decision loads the file for the new key."""
    with _lock:
        _state.clear()


def available() -> bool:
    return _lib() is not None


def unavailable_reason() -> str | None:
    _lib()
    return _state.get("error")


ISA = {2: "avx512_bf16", 1: "avx512f", 0: "portable"}


def isa() -> str | None:
    """The code path the build uses: avx512_bf16 (vdpbf16ps: denormals flushed, as oneDNN), avx512f (exact
    widening + FMA) or portable (scalar loops); None when unavailable."""
    _lib()
    return _state.get("isa")


def flusher(t: Tensor):
    """A function that evicts `t`'s bytes from every cache level (x86 clflush), or None where that is not
    available (no build, another architecture, a tensor without plain memory). The function holds `t`."""
    lib = _lib()
    if lib is None or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0 or not _plain(t):
        return None
    if lib.pgconv_flush(None, 0) != 0:  # asks whether clflush exists; touches no memory
        return None
    n = t.numel() * t.element_size()
    return lambda t=t: lib.pgconv_flush(t.data_ptr(), n)


def _plain(t: Tensor) -> bool:
    """Whether `t`'s values are its memory as it lies: not a zero tensor (no memory), not a lazily negated or
    conjugated view (the sign is applied on read, so raw memory has the other sign)."""
    return not (t._is_zerotensor() or t.is_neg() or t.is_conj()) and (t.data_ptr() != 0 or t.numel() == 0)


def gemv(x2: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x2, weight, bias)` for one row (x2 [1, k]) in bf16 or fp32 on CPU; raises NotImplementedError
    for anything else (the caller then uses torch's kernel)."""
    lib = _lib()
    dt = x2.dtype
    if (lib is None or x2.dim() != 2 or x2.shape[0] != 1 or dt not in (torch.bfloat16, torch.float32)
            or weight.dtype != dt or (bias is not None and bias.dtype != dt) or x2.device.type != "cpu"
            or weight.device.type != "cpu" or not weight.is_contiguous() or weight.dim() != 2
            or weight.shape[1] != x2.shape[1] or (bias is not None and (bias.shape != (weight.shape[0],)
                                                                       or not bias.is_contiguous()))
            or not all(_plain(t) for t in (x2, weight, bias) if t is not None)):
        raise NotImplementedError("pgconv gemv: one contiguous bf16/fp32 row on CPU only")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, weight, bias)):
        raise NotImplementedError("pgconv gemv: no autograd")
    x2 = x2.contiguous()
    n, k = weight.shape
    y = torch.empty(1, n, dtype=dt)
    b = bias.data_ptr() if bias is not None else None
    threads = torch.get_num_threads()
    if dt == torch.bfloat16:
        scratch = None
        if _state["isa"] != "avx512_bf16":  # x widened to fp32 once (the paths without AVX512-BF16)
            scratch = getattr(_scratch, "buf", None)
            if scratch is None or scratch.numel() < k:
                scratch = _scratch.buf = torch.empty(max(k, 4096), dtype=torch.float32)
        lib.pgconv_gemv_bf16(x2.data_ptr(), weight.data_ptr(), b, y.data_ptr(), n, k, threads,
                             None if scratch is None else scratch.data_ptr())
    else:
        lib.pgconv_gemv_f32(x2.data_ptr(), weight.data_ptr(), b, y.data_ptr(), n, k, threads)
    return y


@functools.cache
def _gelu_table() -> Tensor:
    """torch's own bf16 tanh GELU of each of the 65536 bf16 bit patterns (index = the input's bits), built once
    per process with this torch: in chunks of 4096 (one thread's range, a multiple of the vector width), so every
    entry comes from ATen's vectorised kernel, the one that computes all but at most 31 elements of a thread's
    range in the model (transformers' too)."""
    import numpy as np

    bits = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
    with torch.no_grad():
        return torch.cat([F.gelu(c, approximate="tanh") for c in bits.split(4096)]).contiguous()


def gelu_tanh(x: Tensor, up: Tensor | None = None) -> Tensor:
    """`F.gelu(x, approximate="tanh")` (times `up`: the GeGLU product `F.gelu(x) * up`, one pass) in bf16 on CPU,
    bit for bit torch's: the GELU from a table of torch's own results (`_gelu_table`), the product rounded as
    torch's bf16 `mul` (csrc/gemv.c). Raises NotImplementedError for anything else (the caller then uses torch's)."""
    lib = _lib()
    if (lib is None or x.dtype != torch.bfloat16 or x.device.type != "cpu" or not x.is_contiguous() or not _plain(x)
            or (up is not None and (up.dtype != x.dtype or up.shape != x.shape or up.device.type != "cpu"
                                    or not up.is_contiguous() or not _plain(up)))):
        raise NotImplementedError("pgconv gelu: contiguous bf16 tensors of one shape on CPU only")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, up)):
        raise NotImplementedError("pgconv gelu: no autograd")
    y = torch.empty_like(x)
    if x.numel():
        table = _gelu_table()
        lib.pgconv_gelu_table_bf16(x.data_ptr(), None if up is None else up.data_ptr(), y.data_ptr(), x.numel(),
                                   torch.get_num_threads(), table.data_ptr())
    return y
