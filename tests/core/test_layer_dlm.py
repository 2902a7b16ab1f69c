"""``backward="dlm"`` (direct loss minimization): its gradient tends to the implicit one as its
epsilon shrinks, on a quadratic problem and on a nonlinear SE(2) pose graph; the initial values
get none; bad elements cost only themselves."""

from __future__ import annotations

import pytest
import torch

import core


def _fit_problem(gen: torch.Generator) -> tuple[core.Objective, dict[str, torch.Tensor],
                                                 list[torch.Tensor]]:
    """Fit ``y = a x^2 + b`` (linear residuals: the cost is quadratic in ``a, b``), batch 3;
    the data ``x, y`` require gradients."""
    x = torch.rand(3, 20, dtype=torch.float64, generator=gen).requires_grad_()
    y = (x.detach() ** 2 + 0.5 + 0.01 * torch.randn(3, 20, dtype=torch.float64, generator=gen)
         ).requires_grad_()
    a, b = core.Variable("a", core.Vector(1)), core.Variable("b", core.Vector(1))
    fit = core.Cost(lambda a, b, x, y: y - (a * x**2 + b), optimized=(a, b), aux=(x, y),
                    name="fit")
    init = {"a": torch.ones(3, 1, 1, dtype=torch.float64),
            "b": torch.zeros(3, 1, 1, dtype=torch.float64)}
    return core.Objective([fit]), init, [x, y]


def _grads(objective: core.Objective, init: dict[str, torch.Tensor], inputs: list[torch.Tensor],
           mode: str, eps: float = 1e-2) -> list[torch.Tensor]:
    layer = core.OptimizationLayer(objective, core.LevenbergMarquardt(max_iters=30),
                                   backward=mode, dlm_epsilon=eps)  # type: ignore[arg-type]
    sol, info = layer(init)
    assert bool((info.status == core.optimizer.CONVERGED).all())
    loss = (sol["a"] ** 2).sum() + 3 * sol["b"].sum()
    return list(torch.autograd.grad(loss, inputs))


def _error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((p - q).norm() / q.norm()) for p, q in zip(a, b))


def test_dlm_tends_to_implicit_on_a_quadratic_problem(gen: torch.Generator) -> None:
    objective, init, inputs = _fit_problem(gen)
    implicit = _grads(objective, init, inputs, "implicit")
    errors = [_error(_grads(objective, init, inputs, "dlm", eps), implicit)
              for eps in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert errors[0] > errors[1] > errors[2] > errors[3]  # first order in eps
    assert errors[1] < 0.2 and errors[3] < 1e-3


def test_dlm_tends_to_implicit_on_a_pose_graph(gen: torch.Generator) -> None:
    """An SE(2) hexagon loop with noisy measured angles (nonlinear residuals); gradients with
    respect to the angles (on the manifold: the rotation stays unit)."""
    n = 6
    poses = core.Variable("poses", core.SE2, count=n)
    i, j = torch.arange(n), (torch.arange(n) + 1) % n
    step = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # (x, y, cos, sin)
    angle = torch.full((n,), 2 * torch.pi / n, dtype=torch.float64)
    angle = (angle + 0.05 * torch.randn(n, dtype=torch.float64, generator=gen)).requires_grad_()
    between = core.costs.Between(poses, i, j, step.repeat(n, 1), name="between")
    prior = core.costs.Prior(poses, core.SE2.identity(1, dtype=torch.float64)[0], index=0,
                             sqrt_info=10.0, name="prior")
    objective = core.Objective([between, prior])
    k = torch.arange(n, dtype=torch.float64)
    true_angle = 2 * torch.pi / n * k  # a regular hexagon of unit sides, then a little off
    radius = 0.5 / torch.sin(torch.tensor(torch.pi / n, dtype=torch.float64))
    truth = torch.stack([radius * torch.sin(true_angle), radius * (1 - torch.cos(true_angle)),
                         torch.cos(true_angle), torch.sin(true_angle)], -1)
    init = {"poses": core.SE2.retract(truth, 0.05 * torch.randn(n, 3, dtype=torch.float64,
                                                                generator=gen))[None]}
    implicit = _grads_pose(objective, init, angle, "implicit")
    errors = [_error([_grads_pose(objective, init, angle, "dlm", eps)], [implicit])
              for eps in (1e-1, 1e-3, 1e-5)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3


def _grads_pose(objective: core.Objective, init: dict[str, torch.Tensor], angle: torch.Tensor,
                mode: str, eps: float = 1e-2) -> torch.Tensor:
    layer = core.OptimizationLayer(objective, core.LevenbergMarquardt(max_iters=50),
                                   backward=mode, dlm_epsilon=eps)  # type: ignore[arg-type]
    step = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(angle.shape[0], 2)
    meas = torch.cat([step, torch.cos(angle)[:, None], torch.sin(angle)[:, None]], -1)
    sol, info = layer({**init, "between.measured": meas[None]})
    assert info.status_names == ["converged"]
    loss = sol["poses"][..., :2].pow(2).sum()
    (grad,) = torch.autograd.grad(loss, angle)
    return grad


def test_dlm_gives_initial_values_no_gradient_and_checks_epsilon(gen: torch.Generator) -> None:
    objective, init, inputs = _fit_problem(gen)
    a0 = init["a"].clone().requires_grad_()
    layer = core.OptimizationLayer(objective, core.LevenbergMarquardt(), backward="dlm")
    sol, _ = layer({**init, "a": a0})
    grads = torch.autograd.grad(sol["a"].sum(), [a0, inputs[0]], allow_unused=True)
    assert grads[0] is None and grads[1] is not None
    with pytest.raises(ValueError, match="dlm_epsilon"):
        core.OptimizationLayer(objective, core.LevenbergMarquardt(), backward="dlm",
                               dlm_epsilon=0.0)


def test_dlm_bad_element_costs_only_itself(gen: torch.Generator) -> None:
    objective, init, (x, y) = _fit_problem(gen)
    poisoned = y.detach().clone()
    poisoned[1, 3] = float("nan")
    poisoned.requires_grad_()
    layer = core.OptimizationLayer(objective, core.LevenbergMarquardt(), backward="dlm")
    sol, info = layer({**init, "fit.1": poisoned})
    assert info.status_names[1] == "failed" and bool(sol["a"][1].isnan().all())
    (grad,) = torch.autograd.grad(sol["a"][[0, 2]].sum(), poisoned)
    assert bool(torch.isfinite(grad).all()) and float(grad[1].abs().sum()) == 0.0
