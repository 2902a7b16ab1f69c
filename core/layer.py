"""The optimum as a differentiable layer.

``OptimizationLayer(objective, optimizer, backward=...)(inputs) -> (solution, info)``, where
``inputs`` holds initial values of the optimized variables (by variable name, ``(B, F, S)``) and
replacements for auxiliary tensors (by ``"<cost>.<aux>"``, ``"<cost>.weight"``,
``"<cost>.sqrt_info"``, ``"<cost>.loss_scale"``), e.g. network outputs. Backward modes:

* ``"unroll"``: autograd through every iteration (linear solves are differentiated through their
  factor, see ``core.solvers.base.solve``); gradients reach initial values too; memory grows with
  the iterations.
* ``"truncated"``: all but the last ``backward_iters`` iterations run without gradient; the last
  ones with it (gradients reach initial values only through those last iterations).
* ``"implicit"``: the solve runs without gradient; at the solution ``x*`` the optimality condition
  of Gauss-Newton, ``g(x*, theta) = J^T W r = 0``, defines ``x*(theta)``. The implicit function
  theorem gives ``dx*/dtheta = -H^-1 dg/dtheta`` with ``H = J^T W J`` (exact for zero or linear
  residuals, the Gauss-Newton approximation otherwise), so for an upstream gradient ``v = dL/dx*``
  (in the tangent space) ``dL/dtheta = -(H^-1 v)^T dg/dtheta``: one solve with the final factor
  and one vector-Jacobian product through the residuals. We write it as one extra Gauss-Newton
  step ``x* (+) (delta - sg(delta))``, ``delta = -H^-1 g(x*, theta)``, with ``H`` held fixed and
  ``sg`` stopping gradients: its value is exactly ``x*`` and its Jacobian is the IFT's (the solve's
  backward is the adjoint solve ``H u = v`` with the same factor, ``H`` being symmetric). Memory
  and time do not depend on the number of forward iterations. Initial values get no gradient
  (the optimum does not depend on them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor, nn
from typing_extensions import assert_never

from core.linearize import linearize
from core.objective import Objective
from core.optimizer import Info, LevenbergMarquardt, Solution
from core.solvers import LinearSolver, make_solver, solve

Backward = Literal["unroll", "truncated", "implicit"]


class OptimizationLayer(nn.Module):
    """A differentiable nonlinear least-squares layer; see the module docstring.

    Args:
        objective: the problem structure (costs, variables); its auxiliary tensors are defaults
            that ``inputs`` may replace.
        optimizer: the solver configuration.
        backward: how gradients flow: ``"unroll"``, ``"truncated"`` or ``"implicit"``.
        backward_iters: for ``"truncated"``, how many final iterations carry gradients.
        implicit_hessian: ``"gauss_newton"`` solves the adjoint system with the final factor of
            ``J^T W J``; ``"exact"`` solves it with the exact Hessian of the cost at ``x*`` (the
            Gauss-Newton matrix misses second-order residual and robust-loss terms) by conjugate
            gradients on Hessian-vector products, preconditioned by that same factor.
        cg_tol, cg_iters: relative tolerance and cap of those conjugate gradients.
    """

    def __init__(
        self,
        objective: Objective,
        optimizer: LevenbergMarquardt,
        backward: Backward = "implicit",
        backward_iters: int = 5,
        implicit_hessian: Literal["gauss_newton", "exact"] = "gauss_newton",
        cg_tol: float = 1e-10,
        cg_iters: int = 100,
    ) -> None:
        super().__init__()
        if backward not in ("unroll", "truncated", "implicit"):
            raise ValueError(f"unknown backward mode {backward!r}; use unroll, truncated, implicit")
        if backward_iters < 1:
            raise ValueError(f"backward_iters must be >= 1, got {backward_iters}")
        self.objective = objective
        self.optimizer = optimizer
        self._solvers: dict[tuple[str, str], LinearSolver] = {}
        self._objectives: dict[str, tuple[Objective, Objective]] = {}
        self.backward = backward
        self.backward_iters = backward_iters
        if implicit_hessian not in ("gauss_newton", "exact"):
            raise ValueError(f"unknown implicit_hessian {implicit_hessian!r}")
        self.implicit_hessian = implicit_hessian
        self.cg_tol, self.cg_iters = cg_tol, cg_iters

    def forward(self, inputs: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Info]:
        """Solve from ``inputs``; returns the solution (name -> ``(B, F, S)``) and the info."""
        names = {v.name for v in self.objective.variables}
        missing = names - set(inputs)
        if missing:
            raise ValueError(f"OptimizationLayer: missing initial values for {sorted(missing)}")
        init = {k: v for k, v in inputs.items() if k in names}
        device = next(iter(init.values())).device
        objective = self._on(device).with_inputs(
            {k: v for k, v in inputs.items() if k not in names}
        )
        optimizer = self._resolved(device)
        mode = self.backward
        if mode == "unroll":
            solution = optimizer.solve(objective, init)
            return solution.values, solution.info
        if mode == "truncated":
            return self._truncated(optimizer, objective, init)
        if mode == "implicit":
            return self._implicit(optimizer, objective, init)
        assert_never(mode)

    def _on(self, device: torch.device) -> Objective:
        """The objective with its tensors on ``device``, moved once per device and kept."""
        key = str(device)
        cached = self._objectives.get(key)
        if cached is None or cached[0] is not self.objective:
            cached = self._objectives[key] = (self.objective, self.objective.to(device))
        return cached[1]

    def _resolved(self, device: torch.device) -> LevenbergMarquardt:
        """The optimizer with its solver name resolved to an instance kept across calls, so the
        sparse symbolic analysis is done once per structure, not once per forward."""
        spec = self.optimizer.solver
        if not isinstance(spec, str):
            return self.optimizer
        key = (spec, str(device))
        if key not in self._solvers:
            self._solvers[key] = make_solver(spec, self.objective.dim, device)
        return replace(self.optimizer, solver=self._solvers[key])

    def _truncated(
        self, optimizer: LevenbergMarquardt, objective: Objective, init: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], Info]:
        head_iters = max(optimizer.max_iters - self.backward_iters, 0)
        values = init
        if head_iters:
            with torch.no_grad():
                head = replace(optimizer, max_iters=head_iters).solve(objective, init)
            values = {k: v.detach() for k, v in head.values.items()}
        tail = replace(optimizer, max_iters=optimizer.max_iters - head_iters)
        if head_iters:
            # Near the optimum the gain ratio and the cost decrease are rounding noise: take every
            # finite step and test no convergence, so exactly the last `backward_iters`
            # iterations carry the gradient.
            never = -float("inf")
            tail = replace(
                tail, min_gain=never, rel_tol=never, abs_tol=never, step_tol=never, grad_tol=never
            )
        solution = tail.solve(objective, values)
        if head_iters:
            solution = _merge_info(head, solution)
        return solution.values, solution.info

    def _implicit(
        self, optimizer: LevenbergMarquardt, objective: Objective, init: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], Info]:
        with torch.no_grad():
            solution = optimizer.solve(objective, {k: v.detach() for k, v in init.items()})
        x_star = {k: v.detach() for k, v in solution.values.items()}
        if not torch.is_grad_enabled():
            return x_star, solution.info
        lin = linearize(objective, x_star)  # g(x*, theta), differentiable in theta
        pattern = lin.pattern
        H = lin.H.detach()
        solver = make_solver(optimizer.solver, objective.dim, H.device)  # the resolved instance
        factor = solver.factor(H, pattern, torch.zeros_like(lin.g))
        if self.implicit_hessian == "gauss_newton":
            delta = solve(factor, H, pattern, -lin.g)
        else:
            hvp = _exact_hvp(objective.with_inputs(_detached(objective)), x_star)
            delta = _ExactSolve.apply(-lin.g, factor, hvp, self.cg_tol, self.cg_iters)
        # checked after the solve: solvers that verify their solves (cuDSS, PCG) update ``ok``
        if not bool(factor.ok.all()):
            bad = torch.nonzero(~factor.ok).flatten().tolist()
            raise ValueError(
                f"implicit backward: the normal matrix at the solution is singular for batch "
                f"elements {bad}, so the optimum does not depend smoothly on the inputs: fix the "
                "gauge (e.g. a prior on one pose) or use backward='unroll'"
            )
        return objective.retract(x_star, delta - delta.detach()), solution.info


def _detached(objective: Objective) -> dict[str, Tensor]:
    return {k: t.detach() for c in objective.costs for k, t in c.inputs().items()}


def _exact_hvp(objective: Objective, x: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """``u (B, n) -> H u`` with ``H`` the exact Hessian of the cost at ``x`` w.r.t. the tangent
    perturbation (double backward through the costs, robust losses included)."""
    batch = next(iter(x.values())).shape[0]
    first = next(iter(x.values()))
    delta = first.new_zeros(batch, objective.dim, requires_grad=True)
    with torch.enable_grad():
        cost = objective.cost(objective.retract(x, delta)).sum()
        (grad,) = torch.autograd.grad(cost, delta, create_graph=True)

    def hvp(u: Tensor) -> Tensor:
        with torch.enable_grad():
            (out,) = torch.autograd.grad(grad, delta, u, retain_graph=True)
        return out

    return hvp


class _ExactSolve(torch.autograd.Function):
    """Forward: ``H_gn^-1 b`` (its value is discarded by the caller). Backward: ``u = H^-1 v`` for
    the exact Hessian ``H`` by preconditioned conjugate gradients (preconditioner: the Gauss-Newton
    factor), batched; elements that do not reach ``tol`` raise rather than return a silent
    approximation."""

    @staticmethod
    def forward(ctx, b, factor, hvp, tol, iters):  # type: ignore[override]
        ctx.factor, ctx.hvp, ctx.tol, ctx.iters = factor, hvp, tol, iters
        return factor.solve(b)

    @staticmethod
    def backward(ctx, v):  # type: ignore[override]
        factor, hvp = ctx.factor, ctx.hvp
        u = factor.solve(v)
        r = v - hvp(u)
        z = factor.solve(r)
        p, rz = z, (r * z).sum(-1, keepdim=True)
        scale = v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        for _ in range(ctx.iters):
            if bool((r.norm(dim=-1, keepdim=True) <= ctx.tol * scale).all()):
                return u, None, None, None, None
            Hp = hvp(p)
            alpha = rz / (p * Hp).sum(-1, keepdim=True)
            u, r = u + alpha * p, r - alpha * Hp
            z = factor.solve(r)
            rz, rz_old = (r * z).sum(-1, keepdim=True), rz
            p = z + rz / rz_old * p
        if bool((r.norm(dim=-1, keepdim=True) <= ctx.tol * scale).all()):
            return u, None, None, None, None
        raise RuntimeError(
            f"implicit backward: conjugate gradients on the exact Hessian did not reach tol "
            f"{ctx.tol} in {ctx.iters} iterations (relative residual "
            f"{float((r.norm(dim=-1, keepdim=True) / scale).max()):.2e}); the solution may not be "
            "a strict minimum: use implicit_hessian='gauss_newton' or raise cg_iters"
        )


def _merge_info(head: Solution, tail: Solution) -> Solution:
    """One Info for a run split in two phases."""
    a, b = head.info, tail.info
    info = Info(
        status=b.status,
        iterations=a.iterations + b.iterations,
        cost_history=torch.cat([a.cost_history, b.cost_history[1:]]),
        damping=b.damping,
        time_s=a.time_s + b.time_s,
        best_values=b.best_values,
        solver_failures=a.solver_failures + b.solver_failures,
    )
    return Solution(tail.values, info, tail.linearization)
