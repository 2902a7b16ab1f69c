"""Tests for core.solvers.pcg: block-Jacobi PCG against dense solves, failure reporting."""

from __future__ import annotations

import pytest
import torch

import core
from core.solvers.pcg import PCG, block_sizes_of, infer_block_sizes

DT = torch.float64


def pose_graph(gen: torch.Generator, batch: int = 3, num: int = 12) -> tuple:
    """A small SE3 pose graph (chain + loop closures + a prior), linearized at noisy values.

    Returns ``(objective, values, linearization)``; the batch elements differ by their values."""
    poses = core.Variable("poses", core.SE3, num)
    i = torch.cat([torch.arange(num - 1), torch.tensor([0, 2, 5])])
    j = torch.cat([torch.arange(1, num), torch.tensor([7, 9, 11])])
    truth = core.SE3.random(num, generator=gen, dtype=DT)
    measured = core.SE3.compose(core.SE3.inverse(truth[i]), truth[j])
    between = core.costs.Between(poses, i, j, measured)
    prior = core.costs.Prior(poses, truth[0], index=0, sqrt_info=10.0)
    objective = core.Objective([between, prior])
    noise = 0.2 * torch.randn(batch, num, 6, generator=gen, dtype=DT)
    values = {"poses": core.SE3.retract(truth.expand(batch, num, 7), noise)}
    return objective, values, core.linearize(objective, values)


def dense_solve(lin: core.Linearization, damping: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    A = lin.pattern.to_dense(lin.H) + torch.diag_embed(damping)
    return torch.linalg.solve(A, b[..., None])[..., 0]


@pytest.mark.parametrize("how", ["objective", "block_sizes", "inferred"])
def test_pcg_matches_dense_solve(gen: torch.Generator, how: str) -> None:
    objective, _, lin = pose_graph(gen)
    sizes = block_sizes_of(objective)
    solver = {
        "objective": lambda: PCG(objective, tol=1e-12),
        "block_sizes": lambda: PCG(block_sizes=sizes, tol=1e-12),
        "inferred": lambda: PCG(tol=1e-12),
    }[how]()
    damping = torch.rand(lin.g.shape, generator=gen, dtype=DT) * 1e-3
    factor = solver.factor(lin.H, lin.pattern, damping)
    x = factor.solve(-lin.g)
    expected = dense_solve(lin, damping, -lin.g)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-8 * float(expected.abs().max()))
    assert factor.ok.all() and factor.converged.all()
    assert (factor.iterations > 0).all() and (factor.iterations < 1000).all()
    # a second right-hand side with the same factor
    b2 = torch.randn(lin.g.shape, generator=gen, dtype=DT)
    torch.testing.assert_close(
        factor.solve(b2), dense_solve(lin, damping, b2), rtol=1e-7, atol=1e-8
    )


def test_inferred_blocks_are_the_variable_elements(gen: torch.Generator) -> None:
    objective, _, lin = pose_graph(gen)
    assert infer_block_sizes(lin.pattern) == block_sizes_of(objective) == [6] * 12


def test_non_convergence_is_reported(gen: torch.Generator) -> None:
    objective, _, lin = pose_graph(gen, num=40)
    damping = torch.full_like(lin.g, 1e-9)
    factor = PCG(objective, tol=1e-12, max_iters=2).factor(lin.H, lin.pattern, damping)
    assert factor.ok.all()  # before any solve: only the blocks are checked
    x = factor.solve(-lin.g)
    assert not factor.ok.any() and not factor.converged.any()
    assert (factor.iterations == 2).all()
    assert torch.isfinite(x).all()


def test_indefinite_block_is_reported(gen: torch.Generator) -> None:
    objective, _, lin = pose_graph(gen, batch=2)
    damping = torch.zeros_like(lin.g)
    damping[1, 3] = -1e6  # element 1 is no longer positive definite
    factor = PCG(objective).factor(lin.H, lin.pattern, damping)
    x = factor.solve(-lin.g)
    assert factor.ok.tolist() == [True, False]
    assert torch.isfinite(x).all()


def test_zero_rhs(gen: torch.Generator) -> None:
    objective, _, lin = pose_graph(gen)
    factor = PCG(objective).factor(lin.H, lin.pattern, torch.ones_like(lin.g))
    x = factor.solve(torch.zeros_like(lin.g))
    assert (x == 0).all() and factor.ok.all() and (factor.iterations == 0).all()


def test_lm_with_pcg_matches_dense(gen: torch.Generator) -> None:
    objective, values, _ = pose_graph(gen)
    opts = dict(max_iters=30, rel_tol=1e-12)
    dense = core.LevenbergMarquardt(solver="dense", **opts).solve(objective, values)
    pcg = core.LevenbergMarquardt(solver=PCG(objective, tol=1e-10), **opts).solve(objective, values)
    named = core.LevenbergMarquardt(solver="pcg", **opts).solve(objective, values)
    torch.testing.assert_close(pcg.info.final_cost, dense.info.final_cost, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(named.info.final_cost, dense.info.final_cost, rtol=1e-6, atol=1e-12)


def test_bad_arguments(gen: torch.Generator) -> None:
    objective, _, lin = pose_graph(gen)
    with pytest.raises(ValueError, match="sum to n"):
        PCG(block_sizes=[6, 6]).factor(lin.H, lin.pattern, torch.zeros_like(lin.g))
    with pytest.raises(ValueError, match="not both"):
        PCG(objective, block_sizes=[6])
    with pytest.raises(ValueError, match="tol"):
        PCG(tol=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pcg_on_cuda(gen: torch.Generator) -> None:
    objective, values, lin = pose_graph(gen)
    damping = torch.full_like(lin.g, 1e-3)
    expected = dense_solve(lin, damping, -lin.g)
    lin_gpu = core.linearize(objective.to("cuda"), {k: v.cuda() for k, v in values.items()})
    factor = PCG(objective, tol=1e-12).factor(lin_gpu.H, lin_gpu.pattern, damping.cuda())
    x = factor.solve(-lin_gpu.g)
    assert x.device.type == "cuda" and factor.ok.all()
    torch.testing.assert_close(x.cpu(), expected, rtol=0, atol=1e-8 * float(expected.abs().max()))
