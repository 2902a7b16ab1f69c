"""Thread counts for a CPU solve (OpenBLAS's and torch's OpenMP pool), chosen by a measured rule
and restored afterwards.

Two pools share the cores in a CPU solve: torch's intra-op OpenMP threads and OpenBLAS's
(CHOLMOD's supernodal updates). On a machine where other processes hold cores, a pool's threads
wait for descheduled partners: on the 2-core bench machine at load ~5, sphere2500 took 0.56-0.66 s
with one OpenBLAS thread and 0.99-1.60 s with two, and one torch operation over 40,000 doubles
took 78 us with one OpenMP thread against 23.5 ms with two (a 256-pose solve: 0.011 s against
0.14 s). The rule (:func:`choose`): OpenBLAS gets the cores other processes leave free
(:func:`free_cores`: by the 1-minute load average and by the threads runnable now), and one
thread for problems too small to gain from more; torch's OpenMP pool gets
the free cores too (never more than the caller's setting), and one thread once the compiled
kernels run on several (``core.parallel``, :func:`kernels_threaded`). Both are restored on exit.

torch's pool is set through the OpenMP runtime torch loaded (``omp_set_num_threads`` of its
libgomp/libiomp), not through ``torch.set_num_threads``: in torch 2.13 (CPU, MKL)
``torch.set_num_threads(n)`` with ``n >= 2`` also resets MKL's threads and makes later batched
``torch.linalg.solve`` calls fail inside MKL ("Parameter 6 was incorrect on entry to DLASWP");
the OpenMP setting alone leaves MKL as it was (``tests/core/test_threads.py`` checks both).

Memory (:func:`keep_heap`): a solve keeps the memory it frees in the process's heap, so its
iterations do not fault the same pages in again (expensive on virtual machines).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

BLAS_FROM = 5000
"""Unknowns from which OpenBLAS may use more than one thread (CHOLMOD's supernodes of smaller
problems are too small to share)."""

class _Solve:
    """The enclosing :func:`solve_threads`: the user's ``threads``, torch's OpenMP runtime and
    its thread count now."""

    __slots__ = ("threads", "omp", "omp_now")

    def __init__(self, threads: int | None, omp: ctypes.CDLL | None, omp_now: int) -> None:
        self.threads, self.omp, self.omp_now = threads, omp, omp_now


_SOLVE: ContextVar[_Solve | None] = ContextVar("solve_threads", default=None)
_HELPERS = [0.0, 0.0]  # this process's kernel pool threads' share of the load average, and when
_found: list[ctypes.CDLL] = []
_omp: list[ctypes.CDLL | None] = []
_heap: list[bool] = []
_loadavg: list[int] = []  # the open /proc/loadavg (-1: none)
_cores: list[int] = []

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_FROM = 32 * 2**20
"""Allocations from which glibc maps fresh pages (its dynamic threshold's upper bound): smaller
ones are served from the heap, which :func:`keep_heap` keeps."""


def keep_heap() -> bool:
    """Keep the memory a solve frees in this process's heap (glibc only; once per process;
    ``ARIADNE_MALLOC=0`` leaves malloc as it is): blocks under :data:`MMAP_FROM` come from the
    heap and the heap is never trimmed. Returns whether the setting is in force.

    glibc's default returns a freed block at the top of the heap to the system once more than
    twice the largest freed block is free there, and maps blocks above a threshold that starts
    at 128 KB: each iteration's normal matrix and CHOLMOD's workspace then come back as fresh
    pages, faulted one by one, and page faults are expensive on virtual machines (here 0.5 us a
    page, 5-15 us for pages the host has not backed yet). In a fresh process, sphere2500's first
    solve faulted 26,000 pages, its linearizations every other iteration 1,677 (the freed
    ``H`` trimmed and faulted again: 20-25 ms against 5-7 ms) and CHOLMOD 660-1,470 per
    factorization; with this setting 13,500 in all, the linearizations' sum 117 -> 62 ms. The
    cost: memory a process frees stays mapped to it (its resident size keeps its peak, as
    with allocators that never return memory); blocks over 32 MB are still returned."""
    if _heap:
        return _heap[0]
    done = False
    if os.environ.get("ARIADNE_MALLOC", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)  # the running process's C library
        except OSError:  # pragma: no cover - no dynamic loader
            libc = None
        if libc is not None and hasattr(libc, "gnu_get_libc_version") and hasattr(
                libc, "mallopt"):  # glibc (musl's mallopt does nothing)
            done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    _heap.append(done)
    return done


def prepare() -> None:
    """What every CPU solve's settings need, looked up once per process: :func:`keep_heap`,
    torch's OpenMP runtime and the OpenBLAS of CHOLMOD's bindings if they are already imported
    (this never imports them). ``LevenbergMarquardt`` calls it when it is made, so that a
    process's first solve does not read ``/proc/self/maps`` twice (3.5 ms) inside its time."""
    keep_heap()
    _openmp()
    if "sksparse.cholmod" in sys.modules:
        _openblas()


def _openblas() -> ctypes.CDLL | None:
    """The OpenBLAS already loaded into this process (CHOLMOD's), or None; never loads one."""
    if _found:
        return _found[0]
    try:  # CHOLMOD's bindings load the system OpenBLAS: load them first if installed
        import sksparse.cholmod  # noqa: F401
    except ImportError:
        pass
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libopenblas" in line}
    except OSError:  # not Linux: leave OpenBLAS alone
        return None
    for path in sorted(paths):
        lib = ctypes.CDLL(path)
        if hasattr(lib, "openblas_set_num_threads") and hasattr(lib, "openblas_get_num_threads"):
            _found.append(lib)
            return lib
    return None


def _openmp() -> ctypes.CDLL | None:
    """torch's OpenMP runtime (the libgomp or libiomp5 loaded from torch's folder, else any
    loaded one), or None (not Linux, or torch built without OpenMP)."""
    if _omp:
        return _omp[0]
    import torch  # noqa: F401  (loads its OpenMP runtime)

    found = None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "gomp" in line or "iomp5" in line}
    except OSError:
        paths = set()
    for path in sorted(paths, key=lambda p: "torch" not in p):
        lib = ctypes.CDLL(path)
        if hasattr(lib, "omp_set_num_threads") and hasattr(lib, "omp_get_max_threads"):
            found = lib
            break
    _omp.append(found)
    return found


def cpu_count() -> int:
    """``os.cpu_count()``, read once per process (each call reads ``/sys``: 8-70 us, paid by
    every kernel call's thread rule)."""
    if not _cores:
        _cores.append(os.cpu_count() or 1)
    return _cores[0]


def free_cores() -> int:
    """Cores not taken by other processes, by the smaller of two counts (at least 1):

    - the last minute: ``cpu_count - round(load average - 1 - helpers)`` (the 1-minute load
      average counts this process too: its calling thread, 1, and the threads of
      ``core.parallel``'s pool, ``helpers``: their busy seconds averaged over the last minute as
      the load average does, :func:`add_busy`);
    - now: ``cpu_count - (running - 1)``, ``running`` the threads runnable on the machine at
      this moment, the caller included (:func:`running`).

    The load average lags: a process that starts to spin raises it by 0.63 after a minute, so
    for the first tens of seconds of a job beside a busy process the first count alone gave the
    kernels two threads on one free core (sphere2500 0.33-0.65 s against 0.29-0.30 s on one
    thread, 2-core machine); the second count sees the process at once."""
    cores = cpu_count()
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        return cores
    averaged = cores - round(max(0.0, load - 1.0 - _helper_load()))
    now = running()
    return max(1, min(cores, averaged, cores if now is None else cores - (now - 1)))


def running() -> int | None:
    """Threads runnable on this machine now, the caller included (``/proc/loadavg``'s fourth
    field, read through a file kept open: ~1 us); None where there is no such file."""
    if not _loadavg:
        try:
            _loadavg.append(os.open("/proc/loadavg", os.O_RDONLY))
        except OSError:
            _loadavg.append(-1)
    if _loadavg[0] < 0:
        return None
    try:
        fields = os.pread(_loadavg[0], 128, 0).split()
        return max(1, int(fields[3].split(b"/")[0]))
    except (OSError, IndexError, ValueError):
        return None


def add_busy(seconds: float) -> None:
    """Count ``seconds`` of work done by ``core.parallel``'s pool threads (beside the calling
    thread) into this process's own share of the load average, which :func:`free_cores` leaves
    out: without it two kernel threads raise the load to ~2 and the rule then gives them one
    core (an exponential average over one minute, as the kernel's 1-minute load)."""
    now = time.monotonic()
    _HELPERS[:] = [_helper_load(now) + seconds / 60.0, now]


def _helper_load(now: float | None = None) -> float:
    load, at = _HELPERS
    return load * math.exp(-((time.monotonic() if now is None else now) - at) / 60.0)


def choose(n: int, threads: int | None = None) -> int:
    """OpenBLAS threads for a solve of ``n`` unknowns; ``threads`` given: that many (the user's
    choice)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None (automatic), got {threads}")
        return threads
    return free_cores() if n >= BLAS_FROM else 1


def kernel_threads() -> int | None:
    """The user's thread count for the compiled kernels (``core.parallel``) inside
    :func:`solve_threads` given ``threads``; None: the automatic rule."""
    solve = _SOLVE.get()
    return None if solve is None else solve.threads


def kernels_threaded() -> None:
    """``core.parallel`` runs compiled kernels on several threads: inside :func:`solve_threads`
    (automatic rule), torch's OpenMP pool goes down to one thread for the rest of the solve.
    After each OpenMP region libgomp's threads spin for milliseconds (GOMP_SPINCOUNT) on the
    cores the kernel threads need: 64 x 256 poses took 249-277 ms per solve with torch's two
    threads against 242-262 ms with one (kernels on 2 threads, 2-core machine; 276-313 ms with
    the kernels on one thread); the torch work left in such a solve is small."""
    solve = _SOLVE.get()
    if solve is not None and solve.threads is None and solve.omp is not None and (
            solve.omp_now > 1):
        solve.omp.omp_set_num_threads(1)
        solve.omp_now = 1


@contextmanager
def solve_threads(n: int, threads: int | None = None) -> Iterator[int]:
    """Set OpenBLAS's thread count for a solve of ``n`` unknowns (see :func:`choose`) and
    torch's OpenMP threads to the free cores (``threads`` if given; never more than before),
    and restore both on exit, also when the solve raises; ``threads`` given, it also caps the
    compiled kernels' threads (:func:`kernel_threads`); else torch's pool drops to one thread
    once the kernels run on several (:func:`kernels_threaded`). It also makes sure of
    :func:`keep_heap` (done once per process)."""
    keep_heap()
    want = choose(n, threads)
    blas = _openblas()
    before = int(blas.openblas_get_num_threads()) if blas is not None else None
    if blas is not None and want != before:
        blas.openblas_set_num_threads(want)
    omp = _openmp()
    omp_before = int(omp.omp_get_max_threads()) if omp is not None else None
    omp_want = min(omp_before or 1, threads if threads is not None else free_cores())
    if omp is not None and omp_want != omp_before:
        omp.omp_set_num_threads(omp_want)
    solve = _Solve(threads, omp, omp_want)
    token = _SOLVE.set(solve)
    try:
        yield want
    finally:
        _SOLVE.reset(token)
        if blas is not None and before is not None and want != before:
            blas.openblas_set_num_threads(before)
        if omp is not None and omp_before is not None and solve.omp_now != omp_before:
            omp.omp_set_num_threads(omp_before)
