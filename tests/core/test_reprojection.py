"""Tests for core.costs.reprojection: Jacobians, BAL helpers, and the dubrovnik-3-7 problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import core
from core.costs.reprojection import (
    Reprojection,
    bal_objective,
    bal_to_variables,
    project,
    variables_to_bal,
)
from core.io import read_bal
from core.lie import se3
from core.solvers.schur import Schur

DT = torch.float64


def random_factors(gen: torch.Generator, batch: int = 2, num: int = 7):
    """Cameras ``(B, E, 7)`` about 5 units in front of points ``(B, E, 3)``, intrinsics."""
    T = core.SE3.random(batch, num, generator=gen, dtype=DT)
    X = torch.randn(batch, num, 3, generator=gen, dtype=DT)
    # move the points 5 units along the camera's -z axis (in front of a BAL camera)
    X = se3.act(se3.inverse(T), se3.act(T, X) * 0.2 + torch.tensor([0, 0, -5.0], dtype=DT))
    K = torch.tensor([500.0, 0.1, -0.05], dtype=DT) + 0.01 * torch.randn(
        batch, num, 3, generator=gen, dtype=DT
    )
    return T, K, X


def test_jacobians_match_finite_differences(gen: torch.Generator) -> None:
    T, K, X = random_factors(gen)
    batch, num = X.shape[:2]
    v = (
        core.Variable("cameras", core.SE3, num),
        core.Variable("intrinsics", core.Vector(3), num),
        core.Variable("points", core.Vector(3), num),
    )
    idx = torch.arange(num)
    observed = torch.randn(batch, num, 2, generator=gen, dtype=DT)
    cost = Reprojection(*v, idx, idx, observed)
    terms = cost.evaluate({"cameras": T, "intrinsics": K, "points": X}, jacobians=True)
    assert terms.J is not None and terms.J.shape == (batch, num, 2, 12)

    def residual(delta: torch.Tensor) -> torch.Tensor:
        pred, _, _ = project(
            se3.retract(T, delta[..., :6]), K + delta[..., 6:9], X + delta[..., 9:]
        )
        return pred - observed

    eps, fd = 1e-6, torch.zeros_like(terms.J)
    for k in range(12):
        step = torch.zeros(batch, num, 12, dtype=DT)
        step[..., k] = eps
        fd[..., k] = (residual(step) - residual(-step)) / (2 * eps)
    torch.testing.assert_close(terms.r, residual(torch.zeros(batch, num, 12, dtype=DT)))
    torch.testing.assert_close(terms.J, fd, rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


def test_matches_autodiff_cost(gen: torch.Generator) -> None:
    T, K, X = random_factors(gen, batch=1)
    num = X.shape[1]
    v = (
        core.Variable("cameras", core.SE3, num),
        core.Variable("intrinsics", core.Vector(3), num),
        core.Variable("points", core.Vector(3), num),
    )
    idx = torch.arange(num)
    observed = torch.randn(1, num, 2, generator=gen, dtype=DT)
    values = {"cameras": T, "intrinsics": K, "points": X}
    analytic = Reprojection(*v, idx, idx, observed).evaluate(values, jacobians=True)
    auto = core.Cost(
        lambda t, k, x, z: project(t, k, x)[0] - z, v, [observed], index=[idx, idx, idx]
    ).evaluate(values, jacobians=True)
    torch.testing.assert_close(analytic.r, auto.r)
    torch.testing.assert_close(analytic.J, auto.J)


def test_bal_round_trip(gen: torch.Generator) -> None:
    cams = torch.cat(
        [
            0.5 * torch.randn(4, 3, generator=gen, dtype=DT),
            torch.randn(4, 6, generator=gen, dtype=DT),
        ],
        dim=-1,
    )
    problem = core.io.BALProblem(
        cams,
        torch.randn(3, 3, dtype=DT),
        torch.tensor([0, 3]),
        torch.tensor([1, 2]),
        torch.zeros(2, 2, dtype=DT),
    )
    variables, init = bal_to_variables(problem)
    assert [v.name for v in variables] == ["cameras", "intrinsics", "points"]
    assert init["cameras"].shape == (1, 4, 7) and init["points"].shape == (1, 3, 3)
    torch.testing.assert_close(variables_to_bal(init)[0], cams)
    # the SE3 element is world -> camera: act(T, X) == R X + t
    R = core.SO3.to_matrix(core.SO3.exp(cams[:, :3]))
    X = torch.randn(4, 3, generator=gen, dtype=DT)
    torch.testing.assert_close(
        se3.act(init["cameras"][0], X), (R @ X[..., None])[..., 0] + cams[:, 3:6]
    )


def test_bad_arguments() -> None:
    cams = core.Variable("cameras", core.SE3, 2)
    intr, pts = core.Variable("k", core.Vector(3), 2), core.Variable("p", core.Vector(3), 2)
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="must be SE3"):
        Reprojection(pts, intr, pts, idx, idx, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="observed must be"):
        Reprojection(cams, intr, pts, idx, idx, torch.zeros(3, 2))


def numpy_bal_cost(path: Path) -> float:
    """``0.5 sum ||r||^2`` straight from the README formula (Rodrigues' rotation, numpy)."""
    with open(path) as fh:
        c, p, o = (int(t) for t in fh.readline().split())
        body = np.array(fh.read().split(), dtype=np.float64)
    obs = body[: 4 * o].reshape(o, 4)
    cams = body[4 * o : 4 * o + 9 * c].reshape(c, 9)
    pts = body[4 * o + 9 * c :].reshape(p, 3)
    total = 0.0
    for ci, pi, u, v in obs:
        cam, x = cams[int(ci)], pts[int(pi)]
        theta = np.linalg.norm(cam[:3])
        k = cam[:3] / theta
        P = (
            x * np.cos(theta)
            + np.cross(k, x) * np.sin(theta)
            + k * k.dot(x) * (1 - np.cos(theta))
            + cam[3:6]
        )
        q = -P[:2] / P[2]
        r2 = q.dot(q)
        pred = cam[6] * (1 + cam[7] * r2 + cam[8] * r2 * r2) * q
        total += 0.5 * float(((pred - [u, v]) ** 2).sum())
    return total


def test_dubrovnik(shared_data: Path) -> None:
    """Initial cost vs numpy; LM with Schur and sparse solvers take the same path to the optimum.

    dubrovnik-3-7 has 38 residuals and 48 - 7 (gauge) unknowns, so the optimum has zero cost:
    the final costs are compared in absolute terms, the paths relatively."""
    path = shared_data / "dubrovnik-3-7-pre.txt"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    objective, init = bal_objective(read_bal(path))
    initial = float(objective.cost(init))
    assert initial == pytest.approx(numpy_bal_cost(path), rel=1e-12)
    assert initial == pytest.approx(2764.21998442216, rel=1e-12)
    opts = dict(max_iters=200, damping_mode="marquardt", rel_tol=1e-12, abs_tol=1e-14)
    runs = [
        core.LevenbergMarquardt(solver=s, **opts).solve(objective, init)
        for s in ("sparse", Schur(objective, "points"))
    ]
    for run in runs:
        assert run.info.status_names == ["converged"]
        assert float(run.info.final_cost) < 1e-10
    steps = min(len(r.info.cost_history) for r in runs)
    head = min(steps, 40)
    torch.testing.assert_close(
        runs[1].info.cost_history[:head], runs[0].info.cost_history[:head], rtol=1e-6, atol=1e-10
    )


def test_dubrovnik_gtsam(shared_data: Path) -> None:
    """GTSAM's BAL reader + GeneralSFMFactorCal3Bundler: same initial cost, same (zero) optimum."""
    gtsam = pytest.importorskip("gtsam")
    from gtsam.symbol_shorthand import C, P

    path = shared_data / "dubrovnik-3-7-pre.txt"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    sfm = gtsam.readBal(str(path))
    graph, values = gtsam.NonlinearFactorGraph(), gtsam.Values()
    noise = gtsam.noiseModel.Isotropic.Sigma(2, 1.0)
    for j in range(sfm.numberTracks()):
        track = sfm.track(j)
        values.insert(P(j), track.point3())
        for m in range(track.numberMeasurements()):
            i, uv = track.measurement(m)
            graph.add(gtsam.GeneralSFMFactorCal3Bundler(uv, noise, C(i), P(j)))
    for i in range(sfm.numberCameras()):
        values.insert(C(i), sfm.camera(i))
    objective, init = bal_objective(read_bal(path))
    assert graph.error(values) == pytest.approx(float(objective.cost(init)), rel=1e-10)
    params = gtsam.LevenbergMarquardtParams()
    params.setDiagonalDamping(True)
    params.setMaxIterations(500)
    params.setRelativeErrorTol(1e-12)
    params.setAbsoluteErrorTol(1e-14)
    result = gtsam.LevenbergMarquardtOptimizer(graph, values, params).optimize()
    ours = core.LevenbergMarquardt(
        solver=Schur(objective, "points"),
        max_iters=200,
        damping_mode="marquardt",
        rel_tol=1e-12,
        abs_tol=1e-14,
    ).solve(objective, init)
    assert graph.error(result) < 1e-10 and float(ours.info.final_cost) < 1e-10
