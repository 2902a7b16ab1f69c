"""core.threads: the measured OpenBLAS thread rule and its restoration after a solve."""

from __future__ import annotations

import os

import pytest
import torch

import core
from core import threads


@pytest.mark.parametrize("load,expected", [(0.2, 2), (1.0, 2), (1.6, 1), (2.0, 1), (9.0, 1)])
def test_free_cores(monkeypatch: pytest.MonkeyPatch, load: float, expected: int) -> None:
    monkeypatch.setattr(threads, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads, "running", lambda: 1)
    assert threads.free_cores() == expected


@pytest.mark.parametrize("now,load,expected", [(1, 0.1, 4), (2, 0.1, 3), (4, 0.1, 1), (9, 0.1, 1),
                                               (2, 3.0, 2), (None, 0.1, 4), (None, 2.0, 3)])
def test_free_cores_sees_a_process_before_the_load_average_does(
        monkeypatch: pytest.MonkeyPatch, now: int | None, load: float, expected: int) -> None:
    """The smaller of the averaged count and the threads runnable now (caller included)."""
    monkeypatch.setattr(threads, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads, "running", lambda: now)
    assert threads.free_cores() == expected


def test_running_counts_a_spinning_process() -> None:
    """``running`` reads the machine's runnable threads: the caller at least, and one more while
    a child process spins (sampled until the scheduler shows it, at most 2 s)."""
    import subprocess
    import sys
    import time

    if threads.running() is None:
        pytest.skip("no /proc/loadavg on this platform")
    assert threads.running() >= 1
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline, seen = time.monotonic() + 2.0, 0
        while time.monotonic() < deadline and seen < 2:
            seen = max(seen, threads.running() or 0)
        assert seen >= 2
    finally:
        child.kill()
        child.wait()


def test_cpu_count_is_the_system_s() -> None:
    assert threads.cpu_count() == (os.cpu_count() or 1)


def test_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    monkeypatch.setattr(threads, "running", lambda: 1)
    assert threads.choose(100) == 1
    assert threads.choose(threads.BLAS_FROM) == 4
    assert threads.choose(100, threads=3) == 3
    with pytest.raises(ValueError, match="threads must be >= 1 or None"):
        threads.choose(100, threads=0)
    with pytest.raises(ValueError, match="threads must be >= 1 or None"):
        core.LevenbergMarquardt(threads=0)


def test_solve_sets_and_restores_openblas_threads_and_torch_threads() -> None:
    blas = threads._openblas()
    if blas is None:
        pytest.skip("no OpenBLAS loaded (CHOLMOD not installed)")
    torch_before, blas_before = torch.get_num_threads(), blas.openblas_get_num_threads()
    want = 2 if blas_before != 2 else 1
    x = core.Variable("x", core.Vector(2), 3)
    cost = core.costs.Prior(x, torch.ones(3, 2, dtype=torch.float64))
    seen = []

    def spy(xs, aux, jac):  # records OpenBLAS's thread count inside the solve
        seen.append(blas.openblas_get_num_threads())
        return xs[0] - aux[0], [torch.eye(2, dtype=torch.float64).expand(1, 3, 2, 2)]

    probe = core.Cost(None, [x], [torch.zeros(1, 3, 2, dtype=torch.float64)],
                      index=[torch.arange(3)], analytic=spy, name="probe")
    init = {"x": torch.zeros(1, 3, 2, dtype=torch.float64)}
    core.LevenbergMarquardt(max_iters=3, solver="sparse", threads=want).solve(
        core.Objective([cost, probe]), init)
    assert seen and set(seen) == {want}
    assert blas.openblas_get_num_threads() == blas_before
    assert torch.get_num_threads() == torch_before
    with pytest.raises(ValueError):  # restored on errors too
        core.LevenbergMarquardt(solver="sparse", threads=want).solve(
            core.Objective([cost]), {"x": torch.zeros(1, 4, 2)})
    assert blas.openblas_get_num_threads() == blas_before


def test_a_solve_leaves_torch_linalg_working() -> None:
    """torch 2.13 + MKL: any torch.set_num_threads(n >= 2) breaks batched linalg.solve, so a
    solve must not touch torch's threads (it did once, to restore them)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(2, 180, 180, generator=gen, dtype=torch.float64)
    A = A @ A.mT + 60 * torch.eye(180, dtype=torch.float64)
    b = torch.randn(2, 180, 1, generator=gen, dtype=torch.float64)
    x = core.Variable("x", core.Vector(2), 3)
    cost = core.costs.Prior(x, torch.ones(3, 2, dtype=torch.float64))
    core.LevenbergMarquardt(solver="sparse").solve(
        core.Objective([cost]), {"x": torch.zeros(1, 3, 2, dtype=torch.float64)})
    torch.testing.assert_close(A @ torch.linalg.solve(A, b), b)


def test_solve_sets_torch_openmp_threads_and_restores_them_without_breaking_mkl() -> None:
    """Inside a solve with ``threads=1`` torch runs one OpenMP thread; afterwards the caller's
    count is back and MKL's batched solve still works (the OpenMP runtime is set directly, not
    through ``torch.set_num_threads``, whose n >= 2 breaks MKL in torch 2.13)."""
    if threads._openmp() is None:
        pytest.skip("torch's OpenMP runtime not found")
    before = torch.get_num_threads()
    x = core.Variable("x", core.Vector(2), 3)
    cost = core.costs.Prior(x, torch.ones(3, 2, dtype=torch.float64))
    seen = []

    def spy(xs, aux, jac):
        seen.append(torch.get_num_threads())
        return xs[0] - aux[0], [torch.eye(2, dtype=torch.float64).expand(1, 3, 2, 2)]

    probe = core.Cost(None, [x], [torch.zeros(1, 3, 2, dtype=torch.float64)],
                      index=[torch.arange(3)], analytic=spy, name="probe")
    init = {"x": torch.zeros(1, 3, 2, dtype=torch.float64)}
    core.LevenbergMarquardt(max_iters=3, solver="sparse", threads=1).solve(
        core.Objective([cost, probe]), init)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(2, 180, 180, generator=gen, dtype=torch.float64)
    A = A @ A.mT + 60 * torch.eye(180, dtype=torch.float64)
    b = torch.randn(2, 180, 1, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(A @ torch.linalg.solve(A, b), b)


@pytest.mark.parametrize("backward", ["implicit", "dlm"])
def test_backward_factorization_runs_with_the_solve_threads(
        monkeypatch: pytest.MonkeyPatch, backward: str) -> None:
    """The layer's factorization at the solution (implicit and DLM backward) runs with the
    thread counts of the forward solve, not the caller's."""
    blas = threads._openblas()
    if blas is None:
        pytest.skip("no OpenBLAS loaded (CHOLMOD not installed)")
    before = blas.openblas_get_num_threads()
    want = 2 if before != 2 else 1
    seen: list[int] = []
    plain = core.solvers.SparseCholesky.factor

    def spy(self, *args, **kwargs):  # records OpenBLAS's thread count at each factorization
        seen.append(blas.openblas_get_num_threads())
        return plain(self, *args, **kwargs)

    monkeypatch.setattr(core.solvers.SparseCholesky, "factor", spy)
    x = core.Variable("x", core.Vector(2), 3)
    target = torch.ones(1, 3, 2, dtype=torch.float64, requires_grad=True)
    objective = core.Objective([core.costs.Prior(x, target, name="prior")])
    layer = core.OptimizationLayer(objective, core.LevenbergMarquardt(
        max_iters=3, solver="sparse", threads=want), backward=backward)
    out, _ = layer({"x": torch.zeros(1, 3, 2, dtype=torch.float64), "prior.target": target})
    out["x"].sum().backward()
    assert len(seen) >= 2 and set(seen) == {want}  # the loop's and the backward's
    assert blas.openblas_get_num_threads() == before
    assert target.grad is not None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_keep_heap_keeps_freed_blocks_mapped() -> None:
    """After ``keep_heap`` (a solve's set-up) a freed 16 MB block stays in the heap: freeing it
    does not lower the resident size, and allocating it again faults no new pages. glibc's
    default maps such a block and unmaps it on free."""
    import ctypes
    import resource

    if not threads.keep_heap():
        pytest.skip("not glibc, or ARIADNE_MALLOC=0")
    core.LevenbergMarquardt()  # the constructor prepares it too (idempotent)
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 * 2**20
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    touched = _rss()
    libc.free(p)
    assert _rss() > touched - size // 2  # not returned to the system
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    q = libc.malloc(size)
    ctypes.memset(q, 2, size)
    libc.free(q)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < size // 4096 // 4


def test_keep_heap_off_by_environment() -> None:
    import subprocess
    import sys

    code = "from core import threads; print(threads.keep_heap())"
    env = dict(os.environ, ARIADNE_MALLOC="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
