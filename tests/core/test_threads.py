"""core.threads: the measured thread rule and its restoration after a solve."""

from __future__ import annotations

import os

import pytest
import torch

import core
from core import threads


@pytest.mark.parametrize("load,expected", [(0.2, 2), (1.0, 2), (1.6, 1), (2.0, 1), (9.0, 1)])
def test_free_cores(monkeypatch: pytest.MonkeyPatch, load: float, expected: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert threads.free_cores() == expected


def test_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert threads.choose(100) == (1, 1)
    assert threads.choose(threads.BLAS_FROM) == (1, 4)
    assert threads.choose(100, threads=3) == (3, 3)
    with pytest.raises(ValueError, match="threads must be >= 1 or None"):
        threads.choose(100, threads=0)
    with pytest.raises(ValueError, match="threads must be >= 1 or None"):
        core.LevenbergMarquardt(threads=0)


def test_solve_restores_the_callers_threads() -> None:
    before = torch.get_num_threads()
    blas = threads._openblas()
    blas_before = blas.openblas_get_num_threads() if blas is not None else None
    target = 2 if before != 2 else 3
    torch.set_num_threads(target)
    try:
        x = core.Variable("x", core.Vector(2), 3)
        cost = core.costs.Prior(x, torch.ones(3, 2, dtype=torch.float64))
        seen = []

        def spy(xs, aux, jac):  # records the thread count inside the solve
            seen.append(torch.get_num_threads())
            return xs[0] - aux[0], [torch.eye(2, dtype=torch.float64).expand(1, 3, 2, 2)]

        probe = core.Cost(None, [x], [torch.zeros(1, 3, 2, dtype=torch.float64)],
                          index=[torch.arange(3)], analytic=spy, name="probe")
        core.LevenbergMarquardt(max_iters=3, solver="sparse").solve(
            core.Objective([cost, probe]), {"x": torch.zeros(1, 3, 2, dtype=torch.float64)})
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == target
        if blas is not None:
            assert blas.openblas_get_num_threads() == blas_before
        with pytest.raises(ValueError):  # restored on errors too
            core.LevenbergMarquardt(solver="sparse").solve(core.Objective([cost]),
                                                           {"x": torch.zeros(1, 4, 2)})
        assert torch.get_num_threads() == target
    finally:
        torch.set_num_threads(before)
