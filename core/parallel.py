"""Compiled (Numba, ``nogil``) kernels on the free cores, through Python threads.

The kernels of ``core._kernels`` and ``core.solvers.compiled`` release the GIL, so one call can
be cut into chunks (batch elements, or factors) that run at once: :func:`run` hands the chunks
to a process-wide pool of ``cpu_count - 1`` threads, made at the first use, and the calling
thread takes chunks too. Chunks are claimed one at a time by whichever thread is free, so a pool
thread that is slow to wake (other processes hold the cores) costs nothing: the caller runs the
chunks nobody has claimed. The caller owns what each chunk writes: chunks never write to the
same memory.

:func:`threads` is the measured rule: one thread for work below ``2 min_work``, else the cores
the load average leaves free (``core.threads.free_cores``), no more than the work and the
chunks allow. On the 2-core bench machine a pure-compute kernel cut in two took 1.8x the
one-thread time at 2 x 24 us, 0.95x at 2 x 115 us, 0.66x at 2 x 0.5 ms and 0.55x at
2 x 2.4 ms (waking a sleeping pool thread: ~20-80 us), so the kernels' callers set ``min_work``
to 0.5-1 ms of work. ``ARIADNE_KERNEL_THREADS=N`` caps it (``1``: every kernel on the calling
thread), and so does a solve's ``threads`` (``core.threads.solve_threads``); inside a solve,
torch's OpenMP pool drops to one thread once kernels run here (``core.threads.kernels_threaded``).

A plain ``concurrent.futures.ThreadPoolExecutor`` measured ~78 us per two-chunk call of empty
chunks there (futures, a condition variable per wait) against ~26-35 us for the queue and locks
used here.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

from core import threads as _threads

_PREFIX = "ariadne-kernel"
_workers: list[threading.Thread] = []
_jobs: queue.SimpleQueue = queue.SimpleQueue()
_start = threading.Lock()


def _reset_after_fork() -> None:
    """A forked child has none of the parent's threads: start a pool of its own when needed."""
    global _jobs, _start
    _workers.clear()
    _jobs = queue.SimpleQueue()
    _start = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class _Job:
    """One :func:`run` call: its chunks, claimed one at a time by any thread."""

    __slots__ = ("fn", "calls", "claimed", "left", "lock", "done", "error", "caller", "busy")

    def __init__(self, fn: Callable[..., object], calls: Sequence[tuple]) -> None:
        self.fn, self.calls = fn, calls
        self.claimed, self.left = 0, len(calls)
        self.caller, self.busy = threading.get_ident(), 0.0  # the pool threads' seconds
        self.lock = threading.Lock()
        self.done = threading.Lock()
        self.done.acquire()  # released by whoever finishes the last chunk
        self.error: BaseException | None = None

    def work(self) -> None:
        """Run unclaimed chunks until none is left."""
        while True:
            with self.lock:
                k = self.claimed
                self.claimed += 1
            if k >= len(self.calls):
                return
            error, start = None, time.perf_counter()
            try:
                self.fn(*self.calls[k])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by run()
                error = exc
            seconds = time.perf_counter() - start
            with self.lock:
                if threading.get_ident() != self.caller:
                    self.busy += seconds
                if error is not None and self.error is None:
                    self.error = error
                self.left -= 1
                last = self.left == 0
            if last:
                self.done.release()


def _serve(jobs: queue.SimpleQueue) -> None:
    while True:
        job = jobs.get()
        if job is None:  # _stop at exit
            return
        job.work()


def _stop() -> None:
    """At interpreter exit, before daemon threads are frozen: end the pool threads (each takes
    one None) and wait for them, so none wakes during finalization."""
    with _start:
        workers = list(_workers)
        for _ in workers:
            _jobs.put(None)
        for t in workers:
            t.join(timeout=1.0)
        _workers.clear()


atexit.register(_stop)


def pool_size() -> int:
    """The pool's threads (``cpu_count - 1``; with the caller, one per core)."""
    return max(0, _threads.cpu_count() - 1)


def _ensure_workers() -> None:
    if len(_workers) < pool_size():
        with _start:
            while len(_workers) < pool_size():
                t = threading.Thread(target=_serve, args=(_jobs,), daemon=True,
                                     name=f"{_PREFIX}-{len(_workers)}")
                t.start()
                _workers.append(t)


def _cap() -> int | None:
    """The thread cap from ``ARIADNE_KERNEL_THREADS`` and the enclosing solve's ``threads``."""
    cap = _threads.kernel_threads()
    env = os.environ.get("ARIADNE_KERNEL_THREADS")
    if env:
        if not env.strip().isdigit() or int(env) < 1:
            raise ValueError(f"ARIADNE_KERNEL_THREADS must be an integer >= 1, got {env!r}")
        cap = int(env) if cap is None else min(cap, int(env))
    return cap


def threads(work: float, min_work: float, chunks: int | None = None) -> int:
    """Threads for a kernel call of ``work`` units (factor evaluations, or the like): 1 below
    ``2 min_work`` or on a pool thread; else the free cores (at most the cap, see the module
    doc), no more than ``work // min_work`` and ``chunks`` (the pieces the call can be cut
    into)."""
    most = int(work // min_work)
    if chunks is not None:
        most = min(most, chunks)
    if most < 2 or threading.current_thread().name.startswith(_PREFIX):
        return 1
    cap = _cap()
    return max(1, min(most, pool_size() + 1, _threads.free_cores() if cap is None else cap))


def run(fn: Callable[..., object], calls: Sequence[tuple], helpers: int | None = None) -> None:
    """``fn(*args)`` for every ``args`` of ``calls``, on the calling thread and up to
    ``helpers`` pool threads (default ``len(calls) - 1``) at once. Returns when every call has
    finished; raises the first exception one of them raised (after the others have finished:
    they may still be writing the caller's arrays)."""
    if len(calls) <= 1:
        for args in calls:
            fn(*args)
        return
    helpers = min(len(calls) - 1 if helpers is None else helpers, pool_size())
    job = _Job(fn, calls)
    if helpers > 0:
        _threads.kernels_threaded()
        _ensure_workers()
        for _ in range(helpers):
            _jobs.put(job)
    job.work()
    job.done.acquire()
    _threads.add_busy(job.busy)
    if job.error is not None:
        raise job.error


def bounds(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(total)``, sizes differing by at most one."""
    cuts = [total * k // parts for k in range(parts + 1)]
    return [(cuts[k], cuts[k + 1]) for k in range(parts)]
