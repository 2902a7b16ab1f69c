"""Tests for core.solvers.schur: Schur complement vs direct solves, structure checks, LM on BA."""

from __future__ import annotations

import math

import pytest
import torch

import core
from core.costs.reprojection import BALVariables, Reprojection
from core.lie import so3
from core.solvers.schur import Schur

DT = torch.float64


def synthetic_ba(
    gen: torch.Generator,
    num_cameras: int = 5,
    num_points: int = 50,
    views: int = 4,
    batch: int = 1,
    pixel_noise: float = 0.5,
    shared_intrinsics: bool = False,
) -> tuple[BALVariables, core.CostTable, dict[str, torch.Tensor]]:
    """Cameras on a ring looking at points in the unit ball (BAL conventions), each point seen
    by ``views`` cameras; returns the variables, the reprojection cost and noisy initial values
    ``(batch, ...)``. ``shared_intrinsics``: one ``(f, k1, k2)`` for all cameras."""
    angle = 2 * math.pi * torch.arange(num_cameras, dtype=DT) / num_cameras
    centers = torch.stack([4 * angle.cos(), 4 * angle.sin(), 0.5 * torch.ones_like(angle)], -1)
    z = centers / centers.norm(dim=-1, keepdim=True)  # camera +z points away from the scene
    x = torch.linalg.cross(torch.tensor([0.0, 0, 1], dtype=DT).expand_as(z), z)
    x = x / x.norm(dim=-1, keepdim=True)
    R = torch.stack([x, torch.linalg.cross(z, x), z], dim=-2)  # world -> camera
    cams = torch.cat([-(R @ centers[..., None])[..., 0], so3.from_matrix(R)], -1)
    intr = torch.tensor([500.0, 0.05, -0.01], dtype=DT).expand(num_cameras, 3)
    points = torch.randn(num_points, 3, generator=gen, dtype=DT) * 0.5
    order = torch.rand(num_points, num_cameras, generator=gen).argsort(-1)[:, :views]
    camera_index = order.reshape(-1)
    point_index = torch.arange(num_points).repeat_interleave(views)
    pred, _, _ = core.costs.reprojection.project(
        cams[camera_index], intr[camera_index], points[point_index]
    )
    observed = pred + pixel_noise * torch.randn(pred.shape, generator=gen, dtype=DT)
    num_k = 1 if shared_intrinsics else num_cameras
    v = BALVariables(
        core.Variable("cameras", core.SE3, num_cameras),
        core.Variable("intrinsics", core.Vector(3), num_k),
        core.Variable("points", core.Vector(3), num_points),
    )
    k_index = camera_index * 0 if shared_intrinsics else camera_index
    cost = Reprojection(*v, camera_index, point_index, observed, intrinsics_index=k_index)
    init = {
        "cameras": core.SE3.retract(
            cams.expand(batch, -1, -1),
            0.01 * torch.randn(batch, num_cameras, 6, generator=gen, dtype=DT),
        ),
        "intrinsics": intr[:num_k].expand(batch, -1, -1).clone(),
        "points": points + 0.05 * torch.randn(batch, num_points, 3, generator=gen, dtype=DT),
    }
    return v, cost, init


def ba_system(
    gen: torch.Generator, batch: int = 2, shared_intrinsics: bool = False
) -> tuple[core.Objective, core.Linearization]:
    """A BA normal system with extra structure: points first in the ordering (a prior on them),
    camera-camera coupling (between costs) besides the point elimination."""
    v, cost, init = synthetic_ba(gen, batch=batch, shared_intrinsics=shared_intrinsics)
    point_prior = core.costs.Prior(
        v.points, torch.zeros(3, dtype=DT), index=torch.arange(3), sqrt_info=0.1
    )
    between = core.costs.Between(
        v.cameras,
        torch.tensor([0, 1]),
        torch.tensor([1, 3]),
        core.SE3.identity(dtype=DT),
        sqrt_info=0.1,
    )
    objective = core.Objective([point_prior, cost, between])
    assert objective.variables[0].name == "points"
    return objective, core.linearize(objective, init)


def dense_solve(lin: core.Linearization, damping: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    A = lin.pattern.to_dense(lin.H) + torch.diag_embed(damping)
    return torch.linalg.solve(A, b[..., None])[..., 0]


@pytest.mark.parametrize("reduced", ["dense", "sparse"])
@pytest.mark.parametrize("shared", [False, True])
def test_schur_matches_direct_solve(gen: torch.Generator, reduced: str, shared: bool) -> None:
    objective, lin = ba_system(gen, shared_intrinsics=shared)
    damping = 1 + torch.rand(lin.g.shape, generator=gen, dtype=DT)  # cond(A) ~ 1e6
    solver = Schur(objective, "points", reduced=reduced)
    factor = solver.factor(lin.H, lin.pattern, damping)
    assert factor.ok.all()
    # a camera's pose and intrinsics see the same points: merged into one 9-dof element
    assert solver.maps(lin.pattern).dmax == (6 if shared else 9)
    for b in (-lin.g, torch.randn(lin.g.shape, generator=gen, dtype=DT)):
        expected = dense_solve(lin, damping, b)
        sparse = core.solvers.SparseCholesky().factor(lin.H, lin.pattern, damping).solve(b)
        x = factor.solve(b)
        scale = float(expected.abs().max())
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-9 * scale)
        torch.testing.assert_close(x, sparse, rtol=0, atol=1e-9 * scale)


def test_auto_factors_a_block_diagonal_reduced_system_sparsely(gen: torch.Generator) -> None:
    """reduced="auto": dense for a filled S, sparse (on the CPU) for the block-diagonal S of a
    ragged batch of scenes, the same solution either way."""
    from core import ragged

    objective, lin = ba_system(gen, batch=1)
    solver = Schur(objective, "points")
    reduced = solver.maps(lin.pattern).reduced
    assert reduced.nnz >= 0.25 * reduced.n**2 and solver.dense(reduced, torch.device("cpu"))
    scenes = [synthetic_ba(gen, num_cameras=c, num_points=20 + c) for c in (5, 6, 7, 8, 9)]
    batch = ragged.merge([core.Objective([cost]) for _, cost, _ in scenes],
                         cache=ragged.RaggedCache(1))
    lin = core.linearize(batch.objective, batch.join_values([init for _, _, init in scenes]))
    auto = Schur(batch.objective, "points")
    reduced = auto.maps(lin.pattern).reduced
    assert reduced.nnz < 0.25 * reduced.n**2
    assert not auto.dense(reduced, torch.device("cpu"))
    assert auto.dense(reduced, torch.device("meta"))  # off the CPU: dense up to dense_max
    damping = torch.full_like(lin.g, 1e-2)
    x = auto.factor(lin.H, lin.pattern, damping).solve(-lin.g)
    expected = dense_solve(lin, damping, -lin.g)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-9 * float(expected.abs().max()))


def test_schur_eliminating_cameras_too(gen: torch.Generator) -> None:
    """Any variable with a block-diagonal block can be eliminated, e.g. the intrinsics."""
    objective, lin = ba_system(gen, batch=1)
    damping = torch.full_like(lin.g, 1e-2)
    x = Schur(objective, "intrinsics").factor(lin.H, lin.pattern, damping).solve(-lin.g)
    expected = dense_solve(lin, damping, -lin.g)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-9 * float(expected.abs().max()))


def test_not_positive_definite_is_reported(gen: torch.Generator) -> None:
    objective, lin = ba_system(gen)
    damping = torch.full_like(lin.g, 1e-2)
    damping[1, objective.offsets["points"]] = -1e9
    factor = Schur(objective, "points").factor(lin.H, lin.pattern, damping)
    assert factor.ok.tolist() == [True, False]
    assert torch.isfinite(factor.solve(-lin.g)).all()


def test_rejects_coupled_points(gen: torch.Generator) -> None:
    v, cost, _ = synthetic_ba(gen)
    link = core.costs.Between(
        v.points, torch.tensor([0, 4]), torch.tensor([0, 5]), torch.zeros(3, dtype=DT)
    )
    objective = core.Objective([cost, link])
    with pytest.raises(ValueError, match=r"factor 1 touches points\[4\] and points\[5\]"):
        Schur(objective, "points")
    with pytest.raises(ValueError, match="no variable 'landmarks'"):
        Schur(objective, "landmarks")


def test_rejects_foreign_pattern(gen: torch.Generator) -> None:
    objective, lin = ba_system(gen)
    other, _ = ba_system(gen)
    v, cost, _ = synthetic_ba(gen, num_points=10)
    with pytest.raises(ValueError, match="unknowns"):
        Schur(core.Objective([cost]), "points").factor(lin.H, lin.pattern, torch.ones_like(lin.g))
    Schur(other, "points").factor(lin.H, lin.pattern, torch.ones_like(lin.g))  # same structure


def test_lm_with_schur_matches_dense(gen: torch.Generator) -> None:
    v, cost, init = synthetic_ba(gen, batch=2)
    objective = core.Objective([cost])
    opts = dict(max_iters=100, rel_tol=1e-12, damping_mode="marquardt")
    dense = core.LevenbergMarquardt(solver="dense", **opts).solve(objective, init)
    schur = core.LevenbergMarquardt(solver=Schur(objective, "points"), **opts).solve(
        objective, init
    )
    assert dense.info.status_names == schur.info.status_names == ["converged"] * 2
    assert (schur.info.final_cost < 1e-2 * schur.info.initial_cost).all()
    # both starts reach the same optimum (noise level: 0.5 * 0.5^2 * (400 - 188 dof) ~ 26)
    torch.testing.assert_close(
        schur.info.final_cost[0], schur.info.final_cost[1], rtol=1e-9, atol=0
    )
    torch.testing.assert_close(schur.info.final_cost, dense.info.final_cost, rtol=1e-6, atol=0)


def test_implicit_backward_through_schur(gen: torch.Generator) -> None:
    """The layer's implicit backward re-solves with the final Schur factor: same gradient as
    with the dense solver."""
    v, cost, init = synthetic_ba(gen, num_points=20)
    camera_prior = core.costs.Prior(v.cameras, init["cameras"][0], sqrt_info=10.0)
    intrinsics_prior = core.costs.Prior(v.intrinsics, init["intrinsics"][0], sqrt_info=1.0)
    objective = core.Objective([cost, camera_prior, intrinsics_prior])
    observed = cost.aux["observed"].clone().requires_grad_()
    grads = []
    for solver in ("dense", Schur(objective, "points")):
        opt = core.LevenbergMarquardt(solver=solver, max_iters=30, rel_tol=1e-12)
        layer = core.OptimizationLayer(objective, opt, backward="implicit")
        values, info = layer({**init, "reprojection.observed": observed})
        assert info.status_names == ["converged"]
        (grad,) = torch.autograd.grad(values["points"].square().sum(), observed)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-7, atol=1e-10)
