"""A small C kernel for the vote counter, compiled at first use with the system's C compiler.

What the vote needs from per-sample gradients is their sum, the sum of their signs and how many
samples are non-zero. PyTorch computes those in several passes over memory (form the products,
sum, sign, sum, cast, any). ``vote_counts.c`` does it in one:

- :func:`add_linear_votes` forms a linear weight's per-sample gradients ``δ_bᵀ x_b`` from the
  layer's inputs and output gradients a register tile at a time and counts them there, so the
  ``samples × parameters`` products never reach memory: what keeps the hook engine's votes close
  to the cost of one batched backward;
- :func:`add_votes` counts per-sample gradients given in memory (other layers, other engines).

The kernel has no threads of its own (no OpenMP runtime beside PyTorch's, no thread that spins
while it waits): each call covers a range of column blocks or tiles, and :func:`split_over_threads`
hands out such ranges, several per thread, to PyTorch's number of threads (the calling thread
and a small pool; :mod:`ctypes` releases the GIL during a call). A thread the system
deschedules on a busy machine holds up the range it is in, not a fixed share of the work, and
the others wait for it asleep. Each coordinate's sums are added in one range, sample after
sample, so they are the same bits whatever the number of threads. Importing this module also
asks MKL for products that do not depend on the thread count (:func:`reproducible_blas`).

The kernel is plain C (no Python headers), built once per machine with ``$CC`` (default ``cc``)
into ``native/`` under gradfix's cache (``$GRADFIX_CACHE``, default ``~/.cache/gradfix``) and
loaded with :mod:`ctypes`. Without a compiler, or with ``GRADFIX_NATIVE=0``, it is not used and
the engine falls back to PyTorch operations: the same votes, more slowly.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradfix.cache_paths import cache_root
from gradfix.votes.native.threads import split_over_threads

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("vote_counts.c")
_VALUES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}
_COUNTS = {
    torch.int8: ("i8", ctypes.c_int8),
    torch.int16: ("i16", ctypes.c_int16),
    torch.int32: ("i32", ctypes.c_int32),
}
_FLAG_SETS = (  # -fopenmp-simd: the vector loops' pragmas, no OpenMP runtime
    ["-O3", "-march=native", "-fopenmp-simd"],
    ["-O3", "-fopenmp-simd"],
    ["-O3"],
)


def enabled() -> bool:
    """False when ``GRADFIX_NATIVE`` is set to ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("GRADFIX_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where built kernels are kept: ``native/`` under gradfix's cache (``$GRADFIX_CACHE``, ...)."""
    return cache_root() / "native"


def _cpu_signature() -> str:
    """The CPU's feature flags (a kernel built with -march=native must not move to another CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str, flags: list[str], target: Path) -> bool:
    """Compile the kernel into ``target`` (written under a temporary name, then renamed)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        log.debug("cannot write into %s: %s", target.parent, exc)
        return False
    cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log.debug("%s failed: %s", " ".join(cmd), done.stderr[-2000:])
            return False
        os.replace(tmp, target)
        return True
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s failed: %s", " ".join(cmd), exc)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        log.debug("cannot load %s: %s", path, exc)
        return None
    i64, flags = ctypes.c_int64, ctypes.POINTER(ctypes.c_int32)
    try:
        lib.gradfix_vote_units.argtypes, lib.gradfix_vote_units.restype = [i64], i64
        for value, value_type in _VALUES.values():
            for count, count_type in _COUNTS.values():
                values, counts = ctypes.POINTER(value_type), ctypes.POINTER(count_type)
                vote = getattr(lib, f"gradfix_vote_{value}_{count}")
                vote.argtypes = [values, i64, i64, values, counts, i64, i64, flags]
                vote.restype = i64
                linear = getattr(lib, f"gradfix_linear_{value}_{count}")
                linear.argtypes = [values, values, i64, i64, i64, i64, values, counts, i64, i64, flags]
                linear.restype = i64
                units = getattr(lib, f"gradfix_linear_{value}_{count}_units")
                units.argtypes, units.restype = [i64, i64], i64
    except AttributeError as exc:  # a library built from another version of the source
        log.debug("%s lacks a function: %s", path, exc)
        return None
    return lib


def _writable_cache() -> Path:
    """Where to build: the cache, or, if it cannot be written, a temporary folder of this process
    (removed at exit; a loaded library stays mapped)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError as exc:
        log.debug("cannot write into %s: %s", folder, exc)
    private = Path(tempfile.mkdtemp(prefix="gradfix-native-"))
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    return private


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel, building it if this machine has none yet; None when it cannot be had."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        log.info("no C compiler (%s): per-sample votes use PyTorch operations only", cc)
        return None
    version = _compiler_version(cc)
    source = SOURCE.read_bytes()
    build_in: Path | None = None  # chosen when a build is needed
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join(
                x.encode() for x in (cc, version, " ".join(flags), platform.machine(), _cpu_signature())
            )
            + source
        ).hexdigest()[:16]
        target = cache_dir() / key / "vote_counts.so"
        if not target.exists():
            build_in = build_in or _writable_cache()
            target = build_in / key / "vote_counts.so"
            if not target.exists() and not _build(cc, flags, target):
                continue
        lib = _open(target)
        if lib is not None:
            return lib
    log.info("could not build %s with %s: per-sample votes use PyTorch operations only", SOURCE.name, cc)
    return None


_MKL_CBWR_AUTO, _MKL_CBWR_STRICT = 2, 0x10000  # mkl.h: MKL_CBWR_AUTO, MKL_CBWR_STRICT


def reproducible_blas() -> bool:
    """Ask MKL (PyTorch's BLAS on x86) for matrix products that do not depend on the thread count.

    MKL's ``sgemm`` splits some products (small ones among them: a linear layer over the ten
    tokens of one sample) differently with 1 and 2 threads, so that the activations and gradients
    of a forward and backward, and the vote sums, would differ in the last bits between the two.
    MKL's strict conditional numerical reproducibility (``MKL_CBWR=AUTO,STRICT``) makes them
    bitwise the same whatever the number of threads. It is a setting of the process that MKL
    accepts only before its first call: this module asks for it when imported (``import gradfix``
    does), which is in time unless MKL has already worked in this process. Returns whether it is
    in effect: False without MKL (another BLAS), when ``MKL_CBWR`` is set in the environment (the
    user's choice is kept), or when it is too late.
    """
    if os.environ.get("MKL_CBWR"):
        return False
    for lib in _mkl_holders():
        for name in ("mkl_cbwr_set", "mkl_serv_cbwr_set"):
            setter = getattr(lib, name, None)
            if setter is None:
                continue
            setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
            done = setter(_MKL_CBWR_AUTO | _MKL_CBWR_STRICT) == 0
            if not done:
                log.debug("MKL refused strict reproducibility (%s: it has already been used)", name)
            return done
    return False


def _mkl_holders() -> list[ctypes.CDLL]:
    """The loaded libraries that may hold MKL: PyTorch's CPU library (MKL linked in), the process."""
    found = []
    for path in (Path(torch.__file__).parent / "lib" / "libtorch_cpu.so", None):
        try:
            found.append(ctypes.CDLL(str(path) if path is not None else None))
        except OSError:
            continue
    return found


BLAS_REPRODUCIBLE = reproducible_blas()
"""Whether MKL's products were made independent of the thread count when this module was imported
(see :func:`reproducible_blas`)."""


LINEAR_CHUNK_BYTES = 8 * 2**20
"""Inputs and output gradients of about this many bytes go to the linear kernel per call."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory(mmap_bytes: int = 32 * 2**20, trim_bytes: int = 2**30) -> bool:
    """Ask glibc's malloc to keep freed memory in the process for reuse (process-wide).

    By default glibc hands large freed blocks back to the system (``munmap``, heap trimming),
    so the next pass's tensors of that size are page-faulted in again: measured on MiniLM, 25 to
    80 thousand faults and about 0.1 s of system time per vote of 32 samples. This sets
    ``M_MMAP_THRESHOLD`` (blocks up to ``mmap_bytes`` come from the heap) and
    ``M_TRIM_THRESHOLD`` (up to ``trim_bytes`` of free heap are kept). The ``gradfix`` command
    calls it at start. Returns False where the C library has no ``mallopt`` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes))


def available() -> bool:
    """Whether :func:`add_votes` runs the C kernel here (building it if needed)."""
    return enabled() and _library() is not None


def add_votes(grads: Tensor, grad_sum: Tensor | None, counts: Tensor) -> int | None:
    """Add one chunk of per-sample gradients to running vote sums, in one pass.

    ``grad_sum += Σ_b g_b`` and ``counts −= Σ_b sign(g_b)`` (so that ``counts`` holds
    ``Σ_b sign(−g_b)``, the anti-gradient votes of Eq. 9). ``grads`` is ``[samples, n]``,
    ``grad_sum`` and ``counts`` are ``[n]``: contiguous CPU tensors, ``grads`` and ``grad_sum``
    of one dtype (float32 or float64), ``counts`` int8, int16 or int32 (the caller makes sure it
    cannot overflow: ``|counts|`` never exceeds the samples voted). ``grad_sum`` may be None (a
    vote that keeps its counts only: the sums are formed in registers and not written). Returns
    how many of the samples have a non-zero gradient, or None (changing nothing) when the kernel
    cannot take these tensors or is not available: the caller then does the same with PyTorch
    operations.
    """
    sums = [] if grad_sum is None else [grad_sum]
    if (
        grads.dtype not in _VALUES
        or counts.dtype not in _COUNTS
        or any(t.dtype != grads.dtype or t.numel() != counts.numel() for t in sums)
        or grads.dim() != 2
        or not _usable(grads, *sums, counts)
        or counts.numel() != grads.shape[1]
    ):
        return None
    lib = _library()
    if lib is None:
        return None
    (value, value_type), (count, count_type) = _VALUES[grads.dtype], _COUNTS[counts.dtype]
    samples, n = grads.shape
    kernel = getattr(lib, f"gradfix_vote_{value}_{count}")
    nonzero = torch.zeros(max(samples, 1), dtype=torch.int32)
    args = (_ptr(grads, value_type), samples, n, _ptr(grad_sum, value_type), _ptr(counts, count_type))
    done = split_over_threads(
        _over_ranges(kernel, args, _ptr(nonzero, ctypes.c_int32)),
        lib.gradfix_vote_units(n),
        samples * n,
        torch.get_num_threads(),
    )
    return _hits(done, nonzero)


def add_linear_votes(x: Tensor, grad_out: Tensor, grad_sum: Tensor | None, counts: Tensor) -> int | None:
    """Add the votes of a linear weight's per-sample gradients ``G_b = δ_bᵀ x_b``, never storing them.

    ``x`` is the layer's input ``[samples, tokens, in]`` and ``grad_out`` the gradient of its
    output ``[samples, tokens, out]``; ``grad_sum`` (or None: counts only) and ``counts`` are
    ``[out, in]``. Adds ``Σ_b G_b`` to ``grad_sum`` and subtracts ``Σ_b sign(G_b)`` from
    ``counts``; each ``G_b`` is formed a register tile at a time and counted there (the products
    never reach memory, which is what keeps the vote close to the cost of a batched backward).
    Same dtypes, return value and None as :func:`add_votes`.
    """
    sums = [] if grad_sum is None else [grad_sum]
    if (
        x.dim() != 3
        or grad_out.dim() != 3
        or x.shape[:2] != grad_out.shape[:2]
        or x.dtype not in _VALUES
        or grad_out.dtype != x.dtype
        or counts.dtype not in _COUNTS
        or counts.shape != (grad_out.shape[2], x.shape[2])
        or any(t.dtype != x.dtype or t.shape != counts.shape for t in sums)
        or x.device.type != "cpu"
        or grad_out.device.type != "cpu"
        or not _usable(*sums, counts)
    ):
        return None
    lib = _library()
    if lib is None:
        return None
    (value, value_type), (count, count_type) = _VALUES[x.dtype], _COUNTS[counts.dtype]
    samples, tokens, in_dim = x.shape
    out_dim = grad_out.shape[2]
    x, grad_out = x.contiguous(), grad_out.contiguous()
    # every tile reads all samples' inputs and output gradients: a few samples at a time, so that
    # they stay in the shared cache while the tiles go over them
    step = max(1, LINEAR_CHUNK_BYTES // (tokens * (in_dim + out_dim) * x.element_size()))
    kernel = getattr(lib, f"gradfix_linear_{value}_{count}")
    units = getattr(lib, f"gradfix_linear_{value}_{count}_units")(out_dim, in_dim)
    hits = 0
    for start in range(0, samples, step):
        stop = min(samples, start + step)
        nonzero = torch.zeros(stop - start, dtype=torch.int32)
        args = (
            _ptr(grad_out[start:stop], value_type),
            _ptr(x[start:stop], value_type),
            stop - start,
            tokens,
            out_dim,
            in_dim,
            _ptr(grad_sum, value_type),
            _ptr(counts, count_type),
        )
        done = split_over_threads(
            _over_ranges(kernel, args, _ptr(nonzero, ctypes.c_int32)),
            units,
            (stop - start) * tokens * out_dim * in_dim,
            torch.get_num_threads(),
        )
        hits += _hits(done, nonzero)
    return hits


def _usable(*tensors: Tensor) -> bool:
    return enabled() and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _ptr(t: Tensor | None, ctype: type) -> Any:
    """A C pointer to ``t``'s data (NULL for None)."""
    if t is None:
        return ctypes.POINTER(ctype)()
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))


def _over_ranges(kernel: Any, args: tuple[Any, ...], flags: Any) -> Callable[[int, int], int]:
    """``kernel(*args, begin, end, flags)`` as a function of the range of units."""
    return lambda begin, end: int(kernel(*args, begin, end, flags))


def _hits(done: bool, nonzero: Tensor) -> int:
    """How many samples the kernel flagged as non-zero; MemoryError when a call ran out of memory."""
    if not done:
        raise MemoryError("gradfix.votes.native: out of memory in the vote kernel")
    return int(nonzero.count_nonzero())
