"""LM damping schedules: GTSAM's fixed factor, Nielsen's rule, and the ``auto`` pairing."""

from __future__ import annotations

import pytest
import torch

import core
from core.optimizer import _update_damping


def step(opts: core.LevenbergMarquardt, gain: list[float], accept: list[bool]):
    lam = torch.full((len(gain),), 1e-3, dtype=torch.float64)
    nu = torch.full_like(lam, 2.0)
    a = torch.tensor(accept)
    return _update_damping(lam, nu, torch.tensor(gain, dtype=torch.float64), a, ~a, opts)


def test_fixed_factor() -> None:
    lam, _ = step(core.LevenbergMarquardt(damping_update="fixed"), [0.9, 0.1, -1.0],
                  [True, True, False])
    torch.testing.assert_close(lam, torch.tensor([1e-4, 1e-4, 1e-2], dtype=torch.float64))
    lam, _ = step(core.LevenbergMarquardt(damping_update="fixed", damping_factor=4.0), [0.9, -1],
                  [True, False])
    torch.testing.assert_close(lam, torch.tensor([2.5e-4, 4e-3], dtype=torch.float64))


def test_nielsen_rule() -> None:
    lam, nu = step(core.LevenbergMarquardt(damping_update="nielsen"), [1.0, 0.5, -1.0],
                   [True, True, False])
    torch.testing.assert_close(lam, torch.tensor([1e-3 / 3, 1e-3, 2e-3], dtype=torch.float64))
    torch.testing.assert_close(nu, torch.tensor([2.0, 2.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("mode,expected", [("levenberg", 1e-4), ("marquardt", 1e-3 / 3)])
def test_auto_pairs_fixed_with_levenberg_and_nielsen_with_marquardt(mode: str, expected: float
                                                                   ) -> None:
    lam, _ = step(core.LevenbergMarquardt(damping_mode=mode), [1.0], [True])  # type: ignore[arg-type]
    assert float(lam[0]) == pytest.approx(expected)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown damping_update 'gtsam'"):
        core.LevenbergMarquardt(damping_update="gtsam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="damping_factor must be > 1, got 1.0"):
        core.LevenbergMarquardt(damping_factor=1.0)


def test_fixed_takes_no_more_steps_than_nielsen_on_a_helix() -> None:
    """A 600-pose helix (odometry + loop closures): the default (fixed factor with lambda I) takes
    no more steps than Nielsen's rule to the same optimum (bench/RESULTS.md has the full
    table: the same or fewer on every shared g2o file and helix)."""
    from bench.synthetic import pose_graph_batch

    data = pose_graph_batch(600, 1, seed=4)
    var = core.Variable("poses", core.SE3, count=data.num_poses)
    between = core.costs.Between(var, data.i, data.j, data.measurements,
                                 sqrt_info=data.sqrt_information())
    prior = core.costs.Prior(var, data.init[:, :1], index=0, sqrt_info=1e3)
    objective = core.Objective([between, prior])
    runs = {u: core.LevenbergMarquardt(solver="sparse", damping_update=u).solve(
        objective, {"poses": data.init}).info for u in ("auto", "nielsen")}
    assert runs["auto"].status_names == runs["nielsen"].status_names == ["converged"]
    assert int(runs["auto"].iterations[0]) <= int(runs["nielsen"].iterations[0])
    torch.testing.assert_close(runs["auto"].final_cost, runs["nielsen"].final_cost, rtol=1e-6,
                               atol=0)
