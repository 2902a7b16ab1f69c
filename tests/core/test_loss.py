"""Tests for core.loss: robust loss values, derivatives, learnable scales, and the IRLS gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.autograd.functional import jacobian

import core
from core.lie import SE3, Vector

F64 = torch.float64
KINDS = ["huber", "cauchy", "welsch", "geman_mcclure"]


def rho_by_hand(kind: str, s: float, c: float) -> float:
    """The losses as written in the literature (Ceres's conventions, c the scale)."""
    if kind == "huber":
        return s if s <= c * c else 2 * c * math.sqrt(s) - c * c
    if kind == "cauchy":
        return c * c * math.log1p(s / (c * c))
    if kind == "welsch":
        return -c * c * math.expm1(-s / (c * c))
    if kind == "geman_mcclure":
        return s * c * c / (s + c * c)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_rho_matches_formula_and_derivative(kind: str) -> None:
    c = 0.7
    s = torch.tensor([[0.0, 1e-8, 0.1, 0.48, 0.5, 1.0, 4.0, 100.0]], dtype=F64, requires_grad=True)
    rho, drho = core.RobustLoss(kind, c)(s)
    expected = [rho_by_hand(kind, v, c) for v in s.detach()[0].tolist()]
    torch.testing.assert_close(rho[0], torch.tensor(expected, dtype=F64))
    (autograd_drho,) = torch.autograd.grad(rho.sum(), s)
    torch.testing.assert_close(drho, autograd_drho)
    # quadratic near zero: rho(0) = 0, rho'(0) = 1; and robust: rho' decreases for large s
    assert float(rho[0, 0].detach()) == 0.0 and float(drho[0, 0].detach()) == pytest.approx(1.0)
    assert float(drho[0, -1].detach()) < 0.2


@pytest.mark.parametrize("kind", KINDS)
@given(s=st.floats(0.0, 1e6), c=st.floats(1e-2, 1e2))
@settings(max_examples=30, deadline=None)
def test_rho_properties(kind: str, s: float, c: float) -> None:
    """0 <= rho(s) <= s and 0 < rho'(s) <= 1 for every s >= 0 (robust losses downweight)."""
    rho, drho = core.RobustLoss(kind, c)(torch.tensor([[s]], dtype=F64))
    assert 0.0 <= float(rho) <= s * (1 + 1e-12) + 1e-15 * c * c
    assert 0.0 <= float(drho) <= 1.0 + 1e-12
    assert float(rho) == pytest.approx(rho_by_hand(kind, s, c), rel=1e-9, abs=1e-15 * c * c)


@pytest.mark.parametrize("kind", KINDS)
def test_rho_relative_precision_for_tiny_residuals(kind: str) -> None:
    """rho(s) ~ s for s -> 0 to full relative precision (tiny residuals keep their cost)."""
    s = torch.tensor([[1e-20, 1e-12]], dtype=F64)
    rho, _ = core.RobustLoss(kind, 1.0)(s)
    torch.testing.assert_close(rho, s, rtol=1e-9, atol=0)


def test_loss_validation() -> None:
    with pytest.raises(ValueError, match="unknown robust loss 'tukey'"):
        core.RobustLoss("tukey")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale must be > 0"):
        core.RobustLoss("huber", 0.0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        core.RobustLoss("cauchy", -1.0)
    loss = core.RobustLoss("welsch", 2.0).with_scale(3.0)
    assert loss == core.RobustLoss("welsch", 3.0)


def _robust_between(kind: str, scale: float | Tensor, g: torch.Generator, batch: int = 2):
    """SE3 between cost with a full sqrt_info and a robust loss, residuals on both sides of c."""
    x = core.Variable("x", SE3, count=4)
    i, j = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 2, 3, 0, 2, 3])
    values = {"x": SE3.random(batch, 4, generator=g, dtype=F64)}
    rel = SE3.compose(SE3.inverse(values["x"][:, i]), values["x"][:, j])
    noise = torch.randn(batch, 6, 6, generator=g, dtype=F64)
    noise = noise * torch.tensor([0.02, 0.1, 0.3, 0.5, 0.05, 0.2], dtype=F64)[:, None]  # per edge
    measured = SE3.retract(rel, noise)
    A = torch.randn(6, 6, 6, generator=g, dtype=F64)
    U = torch.linalg.cholesky(A @ A.mT / 6 + torch.eye(6, dtype=F64), upper=True)
    loss = core.RobustLoss(kind, scale)
    cost = core.costs.Between(x, i, j, measured, sqrt_info=U, loss=loss, name="between")
    plain = core.costs.Between(x, i, j, measured, sqrt_info=U, name="between")
    return x, cost, plain, values


@pytest.mark.parametrize("kind", KINDS)
def test_robust_cost_is_half_rho_of_weighted_norm(kind: str, gen: torch.Generator) -> None:
    _, cost, plain, values = _robust_between(kind, 0.3, gen)
    base = plain.evaluate(values, jacobians=True)
    robust = cost.evaluate(values, jacobians=True)
    s = (base.r**2).sum(-1)  # (B, E): squared weighted norms
    rho = torch.tensor([[rho_by_hand(kind, v, 0.3) for v in row] for row in s.tolist()], dtype=F64)
    torch.testing.assert_close(robust.cost, 0.5 * rho.sum(-1))
    inliers, outliers = s <= 0.09, s > 0.09
    assert bool(inliers.any()) and bool(outliers.any())  # the test covers both regimes
    # IRLS: r and J scaled by sqrt(rho'(s))
    _, drho = core.RobustLoss(kind, 0.3)(s)
    torch.testing.assert_close(robust.r, base.r * drho.sqrt()[..., None])
    torch.testing.assert_close(robust.J, base.J * drho.sqrt()[..., None, None])


@pytest.mark.parametrize("kind", KINDS)
def test_irls_gradient_is_exact(kind: str, gen: torch.Generator) -> None:
    """``g = J^T r`` from linearize equals the autograd gradient of the total robust cost with
    respect to the tangent perturbation of all variables."""
    x, cost, _, values = _robust_between(kind, 0.3, gen)
    prior = core.costs.Prior(x, values["x"][0, 0], index=0, sqrt_info=10.0)
    objective = core.Objective([cost, prior])
    lin = core.linearize(objective, values)

    def total(delta: Tensor) -> Tensor:
        return objective.cost(objective.retract(values, delta)).sum()

    grad = jacobian(total, torch.zeros(2, objective.dim, dtype=F64))
    torch.testing.assert_close(lin.g, grad, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(lin.cost, objective.cost(values))
    assert float(lin.g.abs().max()) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_learnable_scale_receives_gradient(kind: str, gen: torch.Generator) -> None:
    scale = torch.tensor(0.3, dtype=F64, requires_grad=True)
    _, cost, _, values = _robust_between(kind, scale, gen)
    total = cost.evaluate(values, jacobians=False).cost.sum()
    (grad,) = torch.autograd.grad(total, scale)
    eps = 1e-6
    with torch.no_grad():
        up = cost.replace(loss=core.RobustLoss(kind, 0.3 + eps)).evaluate(values, False).cost
        down = cost.replace(loss=core.RobustLoss(kind, 0.3 - eps)).evaluate(values, False).cost
        fd = (up - down).sum()
    assert float(grad) == pytest.approx(float(fd) / (2 * eps), rel=1e-5)
    assert abs(float(grad)) > 1e-6


def test_per_batch_scale_equals_separate_scalar_scales(gen: torch.Generator) -> None:
    """A scale of shape (B,) applies scale[b] to batch element b."""
    scales = torch.tensor([0.1, 0.5, 2.0], dtype=F64)
    _, cost, _, values = _robust_between("cauchy", scales, gen, batch=3)
    batched = cost.evaluate(values, jacobians=True)
    for b in range(3):
        one = cost.replace(loss=core.RobustLoss("cauchy", float(scales[b]))).evaluate(
            values, jacobians=True
        )
        torch.testing.assert_close(batched.cost[b], one.cost[b])
        torch.testing.assert_close(batched.r[b], one.r[b])
    assert not torch.allclose(batched.cost[0], batched.cost[2])


def test_loss_scale_is_a_replaceable_input() -> None:
    x = core.Variable("x", Vector(1), count=2)
    m = torch.tensor([[[0.0], [3.0]]], dtype=F64)
    cost = core.Cost(
        lambda x, m: x - m,
        optimized=(x,),
        aux=(m,),
        index=[torch.arange(2)],
        loss=core.RobustLoss("huber", 1.0),
        name="h",
    )
    assert float(cost.inputs()["h.loss_scale"]) == 1.0
    values = {"x": torch.zeros(1, 2, 1, dtype=F64)}
    # s = (0, 9): huber with c=1 gives rho = (0, 2*1*3 - 1) = (0, 5); with c=2: (0, 2*2*3 - 4 = 8)
    assert float(cost.evaluate(values, False).cost) == pytest.approx(2.5)
    wider = cost.with_inputs({"h.loss_scale": torch.tensor(2.0, dtype=F64)})
    assert float(wider.evaluate(values, False).cost) == pytest.approx(4.0)
    plain = core.Cost(
        lambda x, m: x - m, optimized=(x,), aux=(m,), index=[torch.arange(2)], name="p"
    )
    with pytest.raises(ValueError, match="'p' has no robust loss"):
        plain.with_inputs({"p.loss_scale": torch.tensor(2.0)})
