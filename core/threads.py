"""OpenBLAS's thread count for a CPU solve, chosen by a measured rule and restored afterwards.

Two pools share the cores in a CPU solve: torch's intra-op threads and OpenBLAS's (CHOLMOD's
supernodal updates). On a machine where other processes hold cores, a pool's threads wait for
descheduled partners: on the 2-core bench machine at load ~5, sphere2500 took 0.56-0.66 s with
one thread and 0.99-1.60 s with two. The rule (:func:`choose`): OpenBLAS gets the cores that the
1-minute load average leaves free, and one thread for problems too small to gain from more; the
previous setting is restored on exit.

torch's threads are left alone: in torch 2.13 (CPU, MKL) any ``torch.set_num_threads(n)`` with
``n >= 2`` makes later batched ``torch.linalg.solve`` calls fail inside MKL ("Parameter 6 was
incorrect on entry to DLASWP"), so setting one thread for the solve and restoring two would break
the caller's network. The library costs' linearization runs in single-threaded compiled kernels
(``core.fused``), so little torch work is left in a solve; ``torch.set_num_threads(1)`` before
solving is the caller's choice on a loaded machine.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

BLAS_FROM = 5000
"""Unknowns from which OpenBLAS may use more than one thread (CHOLMOD's supernodes of smaller
problems are too small to share)."""

_found: list[ctypes.CDLL] = []


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


def free_cores() -> int:
    """Cores not taken by other processes: ``cpu_count - round(load average - 1)`` (the 1-minute
    load average counts this process too), at least 1."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        return cores
    return max(1, min(cores, cores - round(max(0.0, load - 1.0))))


def choose(n: int, threads: int | None = None) -> int:
    """OpenBLAS threads for a solve of ``n`` unknowns; ``threads`` given: that many (the user's
    choice)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None (automatic), got {threads}")
        return threads
    return free_cores() if n >= BLAS_FROM else 1


@contextmanager
def solve_threads(n: int, threads: int | None = None) -> Iterator[int]:
    """Set OpenBLAS's thread count for a solve of ``n`` unknowns (see :func:`choose`) and
    restore it on exit, also when the solve raises."""
    want = choose(n, threads)
    blas = _openblas()
    before = int(blas.openblas_get_num_threads()) if blas is not None else None
    if blas is not None and want != before:
        blas.openblas_set_num_threads(want)
    try:
        yield want
    finally:
        if blas is not None and before is not None and want != before:
            blas.openblas_set_num_threads(before)
