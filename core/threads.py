"""Thread counts for a CPU solve, chosen by a measured rule and restored afterwards.

Two pools share the cores in a CPU solve: torch's intra-op threads (the optimizer's vector work;
the library costs' linearization is single-threaded compiled code, ``core.fused``) and
OpenBLAS's (CHOLMOD's supernodal updates). On a machine where other processes hold cores, a
pool's threads wait for descheduled partners and spin against each other: on the 2-core bench
machine with one busy process beside it, two torch threads made the 256-pose graph 2.5x slower
than one (bench/RESULTS.md). The rule (:func:`choose`): torch gets one thread during the solve;
OpenBLAS gets the cores that the 1-minute load average leaves free, and one thread for problems
too small to gain from more. The user's settings are restored on exit, so a network trained
around the solves keeps its threads.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

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


def choose(n: int, threads: int | None = None) -> tuple[int, int]:
    """``(torch threads, OpenBLAS threads)`` for a solve of ``n`` unknowns; ``threads`` given:
    that many of both (the user's choice)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None (automatic), got {threads}")
        return threads, threads
    return 1, free_cores() if n >= BLAS_FROM else 1


@contextmanager
def solve_threads(n: int, threads: int | None = None) -> Iterator[tuple[int, int]]:
    """Set torch's and OpenBLAS's thread counts for a solve of ``n`` unknowns (see
    :func:`choose`) and restore both on exit, also when the solve raises."""
    want_torch, want_blas = choose(n, threads)
    before_torch = torch.get_num_threads()
    blas = _openblas()
    before_blas = int(blas.openblas_get_num_threads()) if blas is not None else None
    if want_torch != before_torch:
        torch.set_num_threads(want_torch)
    if blas is not None and want_blas != before_blas:
        blas.openblas_set_num_threads(want_blas)
    try:
        yield want_torch, want_blas
    finally:
        if torch.get_num_threads() != before_torch:
            torch.set_num_threads(before_torch)
        if blas is not None and before_blas is not None:
            blas.openblas_set_num_threads(before_blas)
