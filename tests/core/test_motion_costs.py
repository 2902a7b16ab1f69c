"""GP motion prior and SDF collision hinge (``core.costs.motion``): analytic Jacobians against
central finite differences and ``gradcheck`` in float64, the closed-form Q, the out-of-map rule,
and a small planning solve."""

from __future__ import annotations

import pytest
import torch

import core
from core.costs.motion import (
    CollisionHinge,
    GPMotionPrior,
    expand_sdf,
    gp_covariance,
    gp_sqrt_information,
    sdf_lookup,
)

ORIGIN, CELL = (-1.0, -2.0), 0.25  # an 8 x 12 grid over [-1, 2] x [-2, 0]


def numeric_jacobian(cost: core.CostTable, name: str, x: torch.Tensor, h: float = 1e-6
                     ) -> torch.Tensor:
    """``(B, E, d, F * S)`` central differences of the weighted residuals w.r.t. every entry of
    ``x (B, F, S)`` (a Vector variable), stacked per factor."""
    B, F, S = x.shape
    cols = []
    for k in range(F * S):
        dx = torch.zeros(F * S, dtype=x.dtype)
        dx[k] = h
        dx = dx.view(1, F, S)
        plus = cost.evaluate({name: x + dx}, False).r
        minus = cost.evaluate({name: x - dx}, False).r
        cols.append((plus - minus) / (2 * h))
    return torch.stack(cols, -1)


def assembled(cost: core.CostTable, x: torch.Tensor) -> torch.Tensor:
    """The analytic per-factor Jacobian blocks scattered into ``(B, E, d, F * S)``."""
    terms = cost.evaluate({cost.optimized[0].name: x}, True)
    B, F, S = x.shape
    J = torch.zeros(*terms.r.shape, F * S, dtype=x.dtype)
    offset = 0
    for v, idx in zip(cost.optimized, cost.index):
        block = terms.J[..., offset: offset + v.space.dof]
        for e, f in enumerate(idx.tolist()):
            J[:, e, :, f * S: (f + 1) * S] += block[:, e]
        offset += v.space.dof
    return J


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_gp_prior_jacobians_match_finite_differences(dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 6, 2 * dim, generator=gen, dtype=torch.float64)
    states = core.Variable("x", core.Vector(2 * dim), count=6)
    qc = torch.rand(dim, generator=gen, dtype=torch.float64) + 0.5
    cost = GPMotionPrior(states, dt=0.3, qc=qc)
    assert torch.allclose(assembled(cost, x), numeric_jacobian(cost, "x", x), atol=1e-6)


def test_gp_prior_is_the_closed_form_mahalanobis_distance() -> None:
    dt, qc = 0.2, torch.tensor([0.5, 2.0], dtype=torch.float64)
    Q = gp_covariance(dt, qc, 2)
    assert torch.allclose(Q[:2, :2], torch.diag(qc) * dt**3 / 3)
    assert torch.allclose(Q[:2, 2:], torch.diag(qc) * dt**2 / 2)
    assert torch.allclose(Q[2:, 2:], torch.diag(qc) * dt)
    U = gp_sqrt_information(dt, qc, 2)
    assert torch.allclose(U.mT @ U, torch.linalg.inv(Q))
    assert torch.allclose(U, U.triu())
    states = core.Variable("x", core.Vector(4), count=2)
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    terms = GPMotionPrior(states, dt, qc).evaluate({"x": x}, False)
    p0, v0, p1, v1 = x[0, 0, :2], x[0, 0, 2:], x[0, 1, :2], x[0, 1, 2:]
    e = torch.cat([p1 - p0 - dt * v0, v1 - v0])
    assert float(terms.cost[0]) == pytest.approx(float(0.5 * e @ torch.linalg.solve(Q, e)))
    # a constant-velocity trajectory costs nothing
    line = torch.tensor([[[0.0, 0.0, 1.0, 2.0], [dt, 2 * dt, 1.0, 2.0]]], dtype=torch.float64)
    assert float(GPMotionPrior(states, dt, qc).evaluate({"x": line}, False).cost[0]) < 1e-20


def random_sdf(batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, 12, generator=gen, dtype=torch.float64)


def off_grid_points(batch: int, count: int, seed: int) -> torch.Tensor:
    """States whose positions avoid cell-centre lines (where bilinear gradients jump) and span
    the map and beyond it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, count, 4, generator=gen, dtype=torch.float64)
    p = torch.rand(batch, count, 2, generator=gen, dtype=torch.float64) * torch.tensor(
        [5.0, 4.0], dtype=torch.float64) + torch.tensor([-2.0, -4.0], dtype=torch.float64)
    g = (p - torch.tensor(ORIGIN, dtype=torch.float64)) / CELL - 0.5
    frac = g - g.floor()
    p = p + CELL * 0.3 * ((frac < 0.05) | (frac > 0.95)).to(p.dtype)  # away from the kinks
    x[..., :2] = p
    return x


@pytest.mark.parametrize("batch_sdf", [1, 2])
def test_collision_hinge_jacobians_match_finite_differences(batch_sdf: int) -> None:
    x = off_grid_points(2, 9, seed=batch_sdf)
    states = core.Variable("x", core.Vector(4), count=9)
    cost = CollisionHinge(states, random_sdf(batch_sdf), ORIGIN, CELL, eps=0.5)
    J, Jn = assembled(cost, x), numeric_jacobian(cost, "x", x)
    assert torch.allclose(J, Jn, atol=1e-6)
    assert bool((J != 0).any())  # some hinges are active


def test_sdf_lookup_gradcheck_and_exact_at_cell_centres() -> None:
    sdf = random_sdf(1)
    p = off_grid_points(1, 20, seed=3)[..., :2].requires_grad_()
    torch.autograd.gradcheck(lambda q: sdf_lookup(sdf, q, ORIGIN, CELL)[0], (p,))
    d, grad = sdf_lookup(sdf, p, ORIGIN, CELL)
    (auto,) = torch.autograd.grad(d.sum(), p)
    assert torch.allclose(grad, auto)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(12), indexing="ij")
    centres = torch.stack([ORIGIN[0] + (cols + 0.5) * CELL, ORIGIN[1] + (rows + 0.5) * CELL], -1)
    d, _ = sdf_lookup(sdf, centres.reshape(1, -1, 2).double(), ORIGIN, CELL)
    assert torch.allclose(d, sdf.reshape(1, -1))


def test_out_of_map_points_continue_the_edge_value() -> None:
    """Outside the box of cell centres: the clamped point's value minus the distance out; finite
    and never wrapped around to the other edge, however far out."""
    sdf = torch.zeros(1, 8, 12, dtype=torch.float64)
    sdf[0, :, -1] = 5.0  # the right edge is far from obstacles, the left one touches them
    left = ORIGIN[0] + 0.5 * CELL
    right = ORIGIN[0] + 11.5 * CELL
    p = torch.tensor([[[left - 0.3, -1.0], [right + 0.3, -1.0], [right + 1e6, -1e6],
                       [0.0, -1e9]]], dtype=torch.float64)
    d, grad = sdf_lookup(sdf, p, ORIGIN, CELL)
    assert d[0, 0] == pytest.approx(-0.3) and d[0, 1] == pytest.approx(5.0 - 0.3)
    assert torch.isfinite(d).all() and torch.isfinite(grad).all()
    assert grad[0, 0, 0] == pytest.approx(1.0)  # back into the map: +x
    assert grad[0, 1, 0] == pytest.approx(-1.0)  # back into the map: -x
    assert grad[0, 3, 1] == pytest.approx(1.0)  # below the map: +y


def test_bad_sdf_is_named() -> None:
    states = core.Variable("x", core.Vector(4), count=3)
    with pytest.raises(ValueError, match="floating-point"):
        CollisionHinge(states, torch.zeros(8, 8, dtype=torch.int64), ORIGIN, CELL, 0.1)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(B, H, W\)"):
        expand_sdf(torch.zeros(1, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="cell must be > 0"):
        CollisionHinge(states, torch.zeros(8, 8), ORIGIN, 0.0, 0.1)
    with pytest.raises(ValueError, match="Vector"):
        GPMotionPrior(core.Variable("y", core.Vector(3), count=3), 0.1)
    with pytest.raises(ValueError, match="dt must be > 0"):
        GPMotionPrior(states, 0.0)


def test_planner_goes_around_a_disc() -> None:
    """GP prior + hinge + boundary priors: LM bends a straight line that crosses a disc (0.1 off
    its centre line) around it, a batch of two maps solved as one problem."""
    n, cell = 64, 4.0 / 64
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    centre = torch.stack([-2 + (xs + 0.5) * cell, -2 + (ys + 0.5) * cell], -1).double()
    sdf = torch.stack([centre.norm(dim=-1) - 0.5, (centre - 0.3).norm(dim=-1) - 0.4])
    N, dt = 21, 0.1
    states = core.Variable("x", core.Vector(4), count=N)
    start = torch.tensor([-1.5, 0.1, 0, 0], dtype=torch.float64)
    goal = torch.tensor([1.5, 0.1, 0, 0], dtype=torch.float64)
    objective = core.Objective([
        GPMotionPrior(states, dt, 1.0),
        CollisionHinge(states, sdf, (-2.0, -2.0), cell, eps=0.2, weight=100.0),
        core.costs.Prior(states, start, index=0, sqrt_info=100.0, name="start"),
        core.costs.Prior(states, goal, index=N - 1, sqrt_info=100.0, name="goal"),
    ])
    t = torch.linspace(0, 1, N, dtype=torch.float64)[:, None]
    line = torch.cat([start[:2] + t * (goal[:2] - start[:2]),
                      ((goal[:2] - start[:2]) / (dt * (N - 1))).expand(N, 2)], -1)
    init = line[None].expand(2, N, 4).clone()
    solution = core.LevenbergMarquardt(max_iters=100, solver="dense").solve(objective,
                                                                          {"x": init})
    d, _ = sdf_lookup(sdf, solution.values["x"][..., :2], (-2.0, -2.0), cell)
    assert bool((d > 0.15).all()), d.min(1).values


def kink_crossing_points(sdf: torch.Tensor, eps: float, count: int, seed: int) -> torch.Tensor:
    """States inside the map whose bicubic distance is near ``eps`` (across the hinge's kink)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(sdf.shape[0], 4000, 2, generator=gen, dtype=torch.float64) * torch.tensor(
        [2.5, 1.5], dtype=torch.float64) + torch.tensor([-0.8, -1.8], dtype=torch.float64)
    d, _ = sdf_lookup(sdf, p, ORIGIN, CELL, "bicubic")
    near = (d - eps).abs().argsort(-1)[:, :count]  # the closest to the kink, on both sides
    x = torch.randn(sdf.shape[0], count, 4, generator=gen, dtype=torch.float64)
    x[..., :2] = p.gather(1, near[..., None].expand(-1, -1, 2))
    return x


@pytest.mark.parametrize("smooth", [0.1, 0.4])
def test_smooth_hinge_jacobians_match_finite_differences_across_the_kink(smooth: float) -> None:
    """Bicubic SDF + rounded hinge: analytic Jacobians equal central differences everywhere,
    also at states within the rounded band around ``d = eps`` (and away from it, beyond the map
    included)."""
    sdf = random_sdf(2, seed=5)
    states = core.Variable("x", core.Vector(4), count=9)
    cost = CollisionHinge(states, sdf, ORIGIN, CELL, eps=0.5, interp="bicubic", smooth=smooth)
    for x in (kink_crossing_points(sdf, 0.5, 9, seed=1), off_grid_points(2, 9, seed=2)):
        J, Jn = assembled(cost, x), numeric_jacobian(cost, "x", x)
        assert torch.allclose(J, Jn, atol=1e-6)
        assert bool((J != 0).any())
    d, _ = sdf_lookup(sdf, kink_crossing_points(sdf, 0.5, 9, 1)[..., :2], ORIGIN, CELL, "bicubic")
    assert bool(((0.5 - d).abs() < smooth / 2).all())  # the first set lies in the band


def test_bicubic_lookup_gradcheck_exact_at_centres_and_linear_fields() -> None:
    sdf = random_sdf(1)
    p = off_grid_points(1, 20, seed=3)[..., :2].requires_grad_()
    torch.autograd.gradcheck(lambda q: sdf_lookup(sdf, q, ORIGIN, CELL, "bicubic")[0], (p,))
    d, grad = sdf_lookup(sdf, p, ORIGIN, CELL, "bicubic")
    (auto,) = torch.autograd.grad(d.sum(), p)
    assert torch.allclose(grad, auto)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(12), indexing="ij")
    centres = torch.stack([ORIGIN[0] + (cols + 0.5) * CELL, ORIGIN[1] + (rows + 0.5) * CELL], -1)
    d, _ = sdf_lookup(sdf, centres.reshape(1, -1, 2).double(), ORIGIN, CELL, "bicubic")
    assert torch.allclose(d, sdf.reshape(1, -1))
    # a linear field is reproduced exactly away from the edge cells (Catmull-Rom is exact there)
    plane = (0.3 * centres[..., 0] - 0.7 * centres[..., 1] + 0.2)[None].double()
    q = torch.tensor([[[-0.3, -1.4], [0.61, -0.77], [1.1, -1.05]]], dtype=torch.float64)
    d, grad = sdf_lookup(plane, q, ORIGIN, CELL, "bicubic")
    assert torch.allclose(d, 0.3 * q[..., 0] - 0.7 * q[..., 1] + 0.2)
    assert torch.allclose(grad, torch.tensor([0.3, -0.7], dtype=torch.float64).expand_as(grad))


def test_bicubic_gradient_and_smooth_hinge_are_continuous() -> None:
    """Along a line through many cells: the bilinear gradient jumps at cell-centre lines, the
    bicubic one does not; the rounded hinge's residual and slope have no jump at ``d = eps``."""
    sdf = random_sdf(1, seed=7)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    p = torch.stack([-0.8 + 2.5 * t, -1.7 + 1.4 * t], -1)[None]
    steps = {}
    for interp in ("bilinear", "bicubic"):
        _, grad = sdf_lookup(sdf, p, ORIGIN, CELL, interp)  # type: ignore[arg-type]
        steps[interp] = float((grad[0, 1:] - grad[0, :-1]).norm(dim=-1).max())
    assert steps["bicubic"] < 0.05 < steps["bilinear"]
    from core.costs.motion import smoothed_hinge

    u = torch.linspace(-0.3, 0.3, 60001, dtype=torch.float64)
    r, slope = smoothed_hinge(u, 0.2)
    assert float((r[1:] - r[:-1]).abs().max()) < 1e-4
    assert float((slope[1:] - slope[:-1]).abs().max()) < 1e-3
    assert torch.equal(r[u >= 0.1], u[u >= 0.1]) and bool((r[u <= -0.1] == 0).all())
    assert bool((r >= u.clamp(min=0)).all())  # never cheaper than the plain hinge
    r0, slope0 = smoothed_hinge(u, 0.0)
    assert torch.equal(r0, u.clamp(min=0)) and torch.equal(slope0, (u > 0).double())


def test_bicubic_out_of_map_points_continue_the_edge_value() -> None:
    """The out-of-map rule is the same with the bicubic lookup: finite, never wrapped."""
    sdf = torch.zeros(1, 8, 12, dtype=torch.float64)
    sdf[0, :, -1] = 5.0
    left, right = ORIGIN[0] + 0.5 * CELL, ORIGIN[0] + 11.5 * CELL
    p = torch.tensor([[[left - 0.3, -1.0], [right + 0.3, -1.0], [right + 1e6, -1e6],
                       [0.0, -1e9]]], dtype=torch.float64)
    d, grad = sdf_lookup(sdf, p, ORIGIN, CELL, "bicubic")
    assert d[0, 0] == pytest.approx(-0.3) and d[0, 1] == pytest.approx(5.0 - 0.3)
    assert torch.isfinite(d).all() and torch.isfinite(grad).all()
    assert grad[0, 0, 0] == pytest.approx(1.0) and grad[0, 1, 0] == pytest.approx(-1.0)
    assert grad[0, 3, 1] == pytest.approx(1.0)


def test_bad_smoothing_options_are_named() -> None:
    states = core.Variable("x", core.Vector(4), count=3)
    with pytest.raises(ValueError, match="smooth must be >= 0"):
        CollisionHinge(states, torch.zeros(8, 8), ORIGIN, CELL, 0.1, smooth=-0.1)
    with pytest.raises(ValueError, match="interp must be"):
        CollisionHinge(states, torch.zeros(8, 8), ORIGIN, CELL, 0.1, interp="nearest")  # type: ignore[arg-type]
