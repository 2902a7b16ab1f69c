"""Thread counts for a CPU solve (OpenBLAS's and torch's OpenMP pool), chosen by a measured rule
and restored afterwards.

Two pools share the cores in a CPU solve: torch's intra-op OpenMP threads and OpenBLAS's
(CHOLMOD's supernodal updates). On a machine where other processes hold cores, a pool's threads
wait for descheduled partners: on the 2-core bench machine at load ~5, sphere2500 took 0.56-0.66 s
with one OpenBLAS thread and 0.99-1.60 s with two, and one torch operation over 40,000 doubles
took 78 us with one OpenMP thread against 23.5 ms with two (a 256-pose solve: 0.011 s against
0.14 s). The rule (:func:`choose`): OpenBLAS gets the cores that the 1-minute load average
leaves free, and one thread for problems too small to gain from more; torch's OpenMP pool gets
the free cores too (never more than the caller's setting). Both are restored on exit.

torch's pool is set through the OpenMP runtime torch loaded (``omp_set_num_threads`` of its
libgomp/libiomp), not through ``torch.set_num_threads``: in torch 2.13 (CPU, MKL)
``torch.set_num_threads(n)`` with ``n >= 2`` also resets MKL's threads and makes later batched
``torch.linalg.solve`` calls fail inside MKL ("Parameter 6 was incorrect on entry to DLASWP");
the OpenMP setting alone leaves MKL as it was (``tests/core/test_threads.py`` checks both).
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
_omp: list[ctypes.CDLL | None] = []


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
    torch's OpenMP threads to the free cores (``threads`` if given; never more than before),
    and restore both on exit, also when the solve raises."""
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
    try:
        yield want
    finally:
        if blas is not None and before is not None and want != before:
            blas.openblas_set_num_threads(before)
        if omp is not None and omp_before is not None and omp_want != omp_before:
            omp.omp_set_num_threads(omp_before)
