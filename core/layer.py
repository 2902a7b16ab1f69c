"""The optimum as a differentiable layer.

``OptimizationLayer(objective, optimizer, backward=...)(inputs) -> (solution, info)``, where
``inputs`` holds initial values of the optimized variables (by variable name, ``(B, F, S)``) and
replacements for auxiliary tensors (by ``"<cost>.<aux>"``, ``"<cost>.weight"``,
``"<cost>.sqrt_info"``, ``"<cost>.loss_scale"``), e.g. network outputs. Backward modes, and exactly
what each differentiates:

* ``"unroll"``: autograd through every iteration the optimizer takes (linear solves are
  differentiated through their factor, see ``core.solvers.base.solve``): the derivative of the
  algorithm's output, for the inputs and the initial values alike; memory grows with the
  iterations. Every element takes at least one step (the gradient-norm test, which could stop an
  element before its first step, is off), so a start at the optimum differentiates one damped
  Gauss-Newton step taken there: the implicit gradient up to the damping.
* ``"truncated"``: the first ``max_iters - backward_iters`` iterations run without gradient (and
  stop early where they converge); then exactly ``backward_iters`` iterations run with it from
  their detached result, every finite step taken. Gradients reach the inputs through those last
  iterations only, and the initial values not at all, unless ``max_iters <= backward_iters``
  (then it is ``"unroll"``). The status is the optimizer's: ``converged`` where the first phase
  converged or the last step met the convergence test.
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
* ``"dlm"``: direct loss minimization (Song et al., "Training deep neural networks via direct
  loss minimization", ICML 2016; Theseus's ``DLMGradient``): the solve runs without gradient;
  in the backward, with the upstream gradient ``v`` in the tangent space at ``x*``, one
  Gauss-Newton step from ``x*`` on the cost ``E(x) + eps <v, x>`` gives ``x_eps`` and the same
  step on ``E`` alone gives ``x_0``; the inputs' gradient is
  ``(dE/dtheta(x_eps) - dE/dtheta(x_0)) / eps``, a finite difference of the envelope theorem's
  ``dE/dtheta`` that tends to the implicit gradient as ``dlm_epsilon`` shrinks (by the mixed
  derivative ``d/d eps dF/dtheta = <v, dx_eps/dtheta>`` of ``F(eps) = min E + eps <v, x>``). It
  needs no derivative of the residuals with respect to ``x`` beyond the forward's ``J``, only
  of the cost with respect to the inputs. Initial values get no gradient.

Bad batch elements cost only themselves: an element with a non-finite input (initial value or
per-element aux tensor), a failed solve, a non-finite solution or (implicit) a singular normal
matrix at its solution is solved no further: its outputs are NaN, its ``info.status`` FAILED with
``info.messages`` naming the cause, and its inputs get exactly zero gradient. The other elements
are solved as a batch without it, so their outputs and gradients are those of that batch.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn
from typing_extensions import assert_never

from core.linearize import linearize
from core.objective import Objective, has_batch_dim
from core.optimizer import (
    CONVERGED,
    FAILED,
    FAILED_MESSAGE,
    MAX_ITERS,
    Info,
    LevenbergMarquardt,
    Solution,
    element_ok,
    resolve_solver,
    threads_for,
)
from core.ragged import RaggedCache, merge
from core.solvers import LinearSolver, make_solver, solve

log = logging.getLogger(__name__)
T = TypeVar("T")

Backward = Literal["unroll", "truncated", "implicit", "dlm"]


class OptimizationLayer(nn.Module):
    """A differentiable nonlinear least-squares layer; see the module docstring.

    Args:
        objective: the problem structure (costs, variables); its auxiliary tensors are defaults
            that ``inputs`` may replace.
        optimizer: the solver configuration.
        backward: how gradients flow: ``"unroll"``, ``"truncated"``, ``"implicit"`` or ``"dlm"``.
        backward_iters: for ``"truncated"``, how many final iterations carry gradients.
        implicit_hessian: ``"gauss_newton"`` solves the adjoint system with the final factor of
            ``J^T W J``; ``"exact"`` solves it with the exact Hessian of the cost at ``x*`` (the
            Gauss-Newton matrix misses second-order residual and robust-loss terms) by conjugate
            gradients on Hessian-vector products, preconditioned by that same factor.
        cg_tol, cg_iters: relative tolerance and cap of those conjugate gradients.
        dlm_epsilon: for ``"dlm"``, the size of the loss perturbation (smaller: closer to the
            implicit gradient, until rounding dominates).
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
        dlm_epsilon: float = 1e-2,
    ) -> None:
        super().__init__()
        if backward not in ("unroll", "truncated", "implicit", "dlm"):
            raise ValueError(f"unknown backward mode {backward!r}; use unroll, truncated, "
                             "implicit or dlm")
        if not dlm_epsilon > 0:
            raise ValueError(f"dlm_epsilon must be > 0, got {dlm_epsilon}")
        if backward_iters < 1:
            raise ValueError(f"backward_iters must be >= 1, got {backward_iters}")
        self.objective = objective
        self.optimizer = optimizer
        self._objectives: dict[str, tuple[Objective, Objective]] = {}
        self.backward = backward
        self.backward_iters = backward_iters
        if implicit_hessian not in ("gauss_newton", "exact"):
            raise ValueError(f"unknown implicit_hessian {implicit_hessian!r}")
        self.implicit_hessian = implicit_hessian
        self.cg_tol, self.cg_iters = cg_tol, cg_iters
        self.dlm_epsilon = dlm_epsilon

    def forward(self, inputs: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Info]:
        """Solve from ``inputs``; returns the solution (name -> ``(B, F, S)``) and the info.

        Bad elements are set aside (see the module docstring): the others are solved as the
        batch without them (at most once more when an element fails during the solve).
        """
        names = {v.name for v in self.objective.variables}
        missing = names - set(inputs)
        if missing:
            close = {k for m in missing for k in difflib.get_close_matches(m, list(inputs))}
            hint = f" (inputs has {sorted(close)}: misspelt?)" if close else ""
            raise ValueError(f"OptimizationLayer: missing initial values for {sorted(missing)}"
                             + hint)
        init = {k: v for k, v in inputs.items() if k in names}
        device = next(iter(init.values())).device
        objective = self._on(device).with_inputs(
            {k: v for k, v in inputs.items() if k not in names}
        )
        optimizer = self._resolved(device)
        batch = objective.check_values(init)
        causes = _bad_inputs(objective, init, batch)

        def attempt(keep: list[int]) -> tuple[dict[str, Tensor], Info, dict[int, str]]:
            if len(keep) == batch:
                return self._solve(optimizer, objective, init)
            index = torch.tensor(keep, device=device)
            return self._solve(optimizer, objective.select(index, batch),
                               {k: v.index_select(0, index) for k, v in init.items()})

        keep, solved, info = _without_failures(
            [b for b in range(batch) if b not in causes], causes, attempt, "batch elements",
            batch)
        values = init if solved is None else solved
        if info is not None and len(keep) == batch:
            return values, info
        return _scatter(values, info, keep, batch, causes, init)

    def ragged(
        self,
        objectives: Sequence[Objective],
        inputs: Sequence[Mapping[str, Tensor]],
        cache: RaggedCache | None = None,
        solver: Callable[[Objective], LinearSolver] | None = None,
    ) -> tuple[list[dict[str, Tensor]], Info]:
        """Solve ``P`` problems of different structures in one call (``core.ragged``): problem
        ``p`` is ``objectives[p]`` with ``inputs[p]`` (its initial values ``(1, F_p, S)`` and
        input replacements, keys as for ``forward``). Returns each problem's solution
        (name -> ``(1, F_p, S)``) and one ``Info`` per problem, ``(P,)`` (its ``best_values``
        left empty: the solutions are the values), in the layer's backward mode; the layer's
        own ``objective`` is not used. Bad problems cost only themselves, as bad batch elements
        do (module docstring): they are set aside and the others solved as the ragged batch
        without them. ``ValueError`` for an empty list,
        missing initial values, or problems of mismatched dtypes or devices (naming the
        problem). ``cache``: where merged structures are kept (default
        ``core.ragged.DEFAULT_CACHE``). ``solver``: makes the linear solver of a merged
        objective where the optimizer's is bound to one objective (a ``Schur``); called once
        per combination, the result kept with the cached structure under this callable (pass
        the same callable object every call)."""
        if not objectives:
            raise ValueError("OptimizationLayer.ragged: needs at least one problem")
        if len(inputs) != len(objectives):
            raise ValueError(f"OptimizationLayer.ragged: {len(objectives)} objectives but "
                             f"{len(inputs)} inputs")
        inits, auxes, ref = [], [], None
        for p, (o, given) in enumerate(zip(objectives, inputs)):
            names = {v.name for v in o.variables}
            missing = names - set(given)
            if missing:
                raise ValueError(f"OptimizationLayer.ragged: problem {p}: missing initial "
                                 f"values for {sorted(missing)}")
            init = {k: v for k, v in given.items() if k in names}
            for k, x in init.items():
                ref = ref or (p, k, x)
                if x.dtype != ref[2].dtype or x.device != ref[2].device:
                    raise ValueError(
                        f"OptimizationLayer.ragged: problem {p}: {k!r} is {x.dtype} on "
                        f"{x.device} but problem {ref[0]}'s {ref[1]!r} is {ref[2].dtype} on "
                        f"{ref[2].device}")
            inits.append(init)
            auxes.append({k: v for k, v in given.items() if k not in names})
        assert ref is not None
        device = ref[2].device
        problems = [o.to(device) for o in objectives]
        causes: dict[int, str] = {}
        for p, (o, init, aux) in enumerate(zip(problems, inits, auxes)):
            mine = o.with_inputs(aux) if aux else o
            if mine.check_values(init) != 1:
                raise ValueError(f"OptimizationLayer.ragged: problem {p}: batch size must be "
                                 "1 (a same-structure batch goes through forward)")
            bad = _bad_inputs(mine, init, 1)
            if bad:
                causes[p] = bad[0]

        def attempt(keep: list[int]) -> tuple[list[dict[str, Tensor]], Info, dict[int, str]]:
            batch = merge([problems[p] for p in keep], [auxes[p] for p in keep], cache)
            optimizer = replace(self.optimizer,
                                solver=_ragged_solver(batch.objective, self.optimizer.solver,
                                                      solver, device))
            init = batch.join_values([inits[p] for p in keep])
            merged, info, failed = self._solve(optimizer, batch.objective, init)
            return batch.split_values(merged), info, failed

        keep, solved, info = _without_failures(
            [p for p in range(len(problems)) if p not in causes], causes, attempt, "problems",
            len(problems))
        values = [] if solved is None else solved
        out = []
        for p, init in enumerate(inits):
            if p in keep:
                out.append(values[keep.index(p)])
            else:
                out.append({k: torch.full_like(v, float("nan")) for k, v in init.items()})
        if info is not None and len(keep) == len(problems):
            return out, replace(info, best_values={})
        return out, _spread_info(info, keep, len(problems), causes, ref[2])

    def _solve(
        self, optimizer: LevenbergMarquardt, objective: Objective, init: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], Info, dict[int, str]]:
        """Solve in the layer's backward mode; also returns the elements that failed (index ->
        cause): FAILED status, a non-finite solution, a singular implicit normal matrix."""
        mode = self.backward
        singular = None
        if mode == "unroll":
            solution = replace(optimizer, grad_tol=-float("inf")).solve(objective, init)
            values, info = solution.values, solution.info
        elif mode == "truncated":
            values, info = self._truncated(optimizer, objective, init)
        elif mode == "implicit":
            values, info, singular = self._implicit(optimizer, objective, init)
        elif mode == "dlm":
            values, info, singular = self._dlm(optimizer, objective, init)
        else:
            assert_never(mode)
        return values, info, _failures(objective, values, info, singular)

    def _on(self, device: torch.device) -> Objective:
        """The objective with its tensors on ``device``, moved once per device and kept."""
        key = str(device)
        cached = self._objectives.get(key)
        if cached is None or cached[0] is not self.objective:
            cached = self._objectives[key] = (self.objective, self.objective.to(device))
        return cached[1]

    def _resolved(self, device: torch.device) -> LevenbergMarquardt:
        """The optimizer with its solver name resolved to the instance the objective keeps per
        structure and device (``core.optimizer.resolve_solver``), so the sparse symbolic
        analysis is done once per structure, not once per forward."""
        return replace(self.optimizer,
                       solver=resolve_solver(self.objective, self.optimizer.solver, device))

    def _truncated(
        self, optimizer: LevenbergMarquardt, objective: Objective, init: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], Info]:
        head_iters = max(optimizer.max_iters - self.backward_iters, 0)
        if not head_iters:  # all iterations with gradient: unroll
            solution = replace(optimizer, grad_tol=-float("inf")).solve(objective, init)
            return solution.values, solution.info
        with torch.no_grad():
            head = replace(optimizer, max_iters=head_iters).solve(objective, init)
        values = {k: v.detach() for k, v in head.values.items()}
        # Near the optimum the gain ratio and the cost decrease are rounding noise: take every
        # finite step and test no convergence, so exactly the last `backward_iters` iterations
        # carry the gradient (the status is decided afterwards, see _merge_info).
        never = -float("inf")
        tail = replace(optimizer, max_iters=self.backward_iters, min_gain=never, rel_tol=never,
                       abs_tol=never, step_tol=never, grad_tol=never)
        solution = tail.solve(objective, values)
        return solution.values, _merge_info(head, solution, optimizer, objective)

    def _implicit(
        self, optimizer: LevenbergMarquardt, objective: Objective, init: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], Info, Tensor | None]:
        """The IFT step (module docstring); also returns ``(B * P,)`` True where the normal matrix
        at the solution is singular (None without grad mode: no factorization then)."""
        with torch.no_grad():
            solution = optimizer.solve(objective, {k: v.detach() for k, v in init.items()})
        x_star = {k: v.detach() for k, v in solution.values.items()}
        if not torch.is_grad_enabled():
            return x_star, solution.info, None
        lin = linearize(objective, x_star)  # g(x*, theta), differentiable in theta
        pattern = lin.pattern
        H = lin.H.detach()
        solver = make_solver(optimizer.solver, objective.dim, H.device)  # the resolved instance
        with threads_for(objective, optimizer, H.device):  # the forward solve's thread counts
            factor = solver.factor(H, pattern, torch.zeros_like(lin.g))
            if self.implicit_hessian == "gauss_newton":
                delta = solve(factor, H, pattern, -lin.g)
            else:
                hvp = _exact_hvp(objective.with_inputs(_detached(objective)), x_star)
                delta = _ExactSolve.apply(-lin.g, factor, hvp, self.cg_tol, self.cg_iters)
        # read after the solve: solvers that verify their solves (cuDSS, PCG) update ``ok``
        out = objective.retract(x_star, delta - delta.detach())
        return out, solution.info, ~element_ok(factor, objective.elements(H.shape[0]))


    def _dlm(
        self, optimizer: LevenbergMarquardt, objective: Objective, init: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], Info, Tensor | None]:
        """The solve without gradient, then :class:`_DLM` (module docstring); also returns
        ``(B * P,)`` True where the normal matrix at the solution is singular."""
        with torch.no_grad():
            solution = optimizer.solve(objective, {k: v.detach() for k, v in init.items()})
        x_star = {k: v.detach() for k, v in solution.values.items()}
        thetas = [t for c in objective.costs for t in c.inputs().values() if t.requires_grad]
        if not torch.is_grad_enabled() or not thetas:
            return x_star, solution.info, None
        with torch.no_grad():
            lin = linearize(objective, x_star)
        solver = make_solver(optimizer.solver, objective.dim, lin.H.device)
        with threads_for(objective, optimizer, lin.H.device):
            factor = solver.factor(lin.H, lin.pattern, torch.zeros_like(lin.g))
        names = list(x_star)
        step = _DLMStep(objective, x_star, names, factor, lin.g, self.dlm_epsilon)
        outputs = _DLM.apply(step, len(names), *[x_star[k] for k in names], *thetas)
        return (dict(zip(names, outputs)), solution.info,
                ~element_ok(factor, objective.elements(lin.H.shape[0])))


class _DLMStep:
    """What :class:`_DLM`'s backward needs: the objective, ``x*``, the factor of ``H`` at ``x*``,
    the gradient ``g (B, n)`` there, and ``eps``."""

    def __init__(self, objective: Objective, x_star: dict[str, Tensor], names: list[str],
                 factor: object, g: Tensor, eps: float) -> None:
        self.objective, self.x_star, self.names = objective, x_star, names
        self.factor, self.g, self.eps = factor, g, eps

    def tangent(self, grads: tuple[Tensor, ...]) -> Tensor:
        """``v (B, n)``: the upstream gradients ``(B, F, S)`` pulled back to the tangent space at
        ``x*`` (a VJP of ``retract(x*, delta)`` at ``delta = 0``)."""
        first = self.x_star[self.names[0]]
        delta = first.new_zeros(first.shape[0], self.objective.dim, requires_grad=True)
        with torch.enable_grad():
            moved = self.objective.retract(self.x_star, delta)
            outs = [moved[k] for k in self.names]
            (v,) = torch.autograd.grad(outs, delta, [torch.zeros_like(o) if g is None else g
                                                     for o, g in zip(outs, grads)])
        return v

    def input_gradients(self, v: Tensor, thetas: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """``(dE/dtheta(x_eps) - dE/dtheta(x_0)) / eps`` for each input ``theta``."""
        base = self.factor.solve(-self.g)  # type: ignore[attr-defined]
        perturbed = self.factor.solve(-(self.g + self.eps * v))  # type: ignore[attr-defined]
        with torch.enable_grad():
            x_0 = self.objective.retract(self.x_star, base)
            x_eps = self.objective.retract(self.x_star, perturbed)
            diff = (self.objective.cost(x_eps) - self.objective.cost(x_0)).sum() / self.eps
            grads = torch.autograd.grad(diff, thetas, allow_unused=True)
        return grads


class _DLM(torch.autograd.Function):
    """Forward: ``x*`` as it is. Backward: no gradient for ``x*``'s own inputs (the values); the
    inputs ``theta`` get :meth:`_DLMStep.input_gradients` of the upstream gradient. ``x*``, the
    inputs and ``g`` are saved for the backward (what this mode keeps, besides the factor)."""

    @staticmethod
    def forward(ctx, step, count, *tensors):  # type: ignore[override]
        ctx.step, ctx.count = step, count
        ctx.save_for_backward(*tensors, step.g)
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        step: _DLMStep = ctx.step
        thetas = ctx.saved_tensors[ctx.count : -1]
        v = step.tangent(grads)
        theta_grads = step.input_gradients(v, thetas)
        return (None, None, *([None] * ctx.count), *theta_grads)


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


def _merge_info(head: Solution, tail: Solution, opts: LevenbergMarquardt,
                objective: Objective) -> Info:
    """One Info for a truncated run: FAILED if either phase failed; CONVERGED where the first
    phase converged or the tail's last step meets ``opts``' convergence test (relative
    decrease, absolute cost, gradient norm); else MAX_ITERS. Per element (per problem of a
    ragged batch)."""
    a, b = head.info, tail.info
    before, after = b.cost_history[-2], b.cost_history[-1]
    assert tail.linearization is not None
    g = tail.linearization.g
    gmax = objective.elements(g.shape[0]).max_columns(g.abs())
    done = (before - after).abs() <= opts.rel_tol * before
    done = done | (after <= opts.abs_tol) | (gmax < opts.grad_tol)
    failed = (a.status == FAILED) | (b.status == FAILED)
    status = torch.where(failed, FAILED, torch.where((a.status == CONVERGED) | done,
                                                     CONVERGED, MAX_ITERS))
    return Info(
        status=status,
        iterations=a.iterations + b.iterations,
        cost_history=torch.cat([a.cost_history, b.cost_history[1:]]),
        damping=b.damping,
        time_s=a.time_s + b.time_s,
        best_values=b.best_values,
        solver_failures=a.solver_failures + b.solver_failures,
    )


SINGULAR = (
    "the normal matrix at the solution is singular (not positive definite), so the optimum "
    "does not depend smoothly on the inputs: a gauge freedom (add a prior, e.g. on one pose) "
    "or a degenerate problem; backward='unroll' differentiates the iterations instead"
)


def _bad_inputs(objective: Objective, init: dict[str, Tensor], batch: int) -> dict[int, str]:
    """Batch elements with a non-finite initial value or input tensor -> the cause (a shared
    input, one without a batch dimension of size ``B``, makes every element bad)."""
    named = {f"initial values of {k!r}": (v, True) for k, v in init.items()}
    named.update({f"input {k!r}": (t, has_batch_dim(k, t) and t.shape[0] == batch)
                  for c in objective.costs for k, t in c.inputs().items()})
    bad = {}
    with torch.no_grad():
        for what, (t, per_element) in named.items():
            t = t.detach()
            finite = torch.isfinite(t.reshape(batch, -1) if per_element else t.reshape(1, -1))
            bad[what] = ~finite.all(1).expand(batch)
        if not bool(torch.stack(list(bad.values())).any()):
            return {}
    causes: dict[int, str] = {}
    for what, mask in bad.items():
        for b in torch.nonzero(mask).flatten().tolist():
            causes.setdefault(b, f"non-finite {what}")
    return causes


def _failures(objective: Objective, values: dict[str, Tensor], info: Info,
              singular: Tensor | None) -> dict[int, str]:
    """Elements (index -> cause; problems of a ragged batch) whose solve failed, whose solution
    is not finite, or (implicit) whose normal matrix at the solution is singular (``singular
    (B * P,)``, ``core.optimizer.element_ok``: per problem where its factorization says, else
    every problem of the batch element). One host sync."""
    els = objective.elements(next(iter(values.values())).shape[0])
    flags = [info.status == FAILED, ~els.all_finite(values).to(info.status.device)]
    flags.append(torch.zeros_like(flags[0]) if singular is None
                 else singular.to(flags[0].device))
    failed = {}
    for k, (solver, nonfinite, sing) in enumerate(torch.stack(flags, 1).tolist()):
        if solver:
            failed[k] = info.causes.get(k, FAILED_MESSAGE)
        elif nonfinite:
            failed[k] = "the solution is not finite"
        elif sing:
            failed[k] = SINGULAR
    return failed


def _without_failures(
    keep: list[int], causes: dict[int, str],
    attempt: Callable[[list[int]], tuple[T, Info, dict[int, str]]], what: str, total: int,
) -> tuple[list[int], T | None, Info | None]:
    """Solve the elements ``keep`` by ``attempt(keep) -> (result, info, failed)`` (``failed``:
    position in ``keep`` -> cause), setting the failed ones aside in ``causes`` and solving the
    others again until none fails; logs every cause. Returns the elements kept, the last result
    and its info (None when no element was left to solve)."""
    result, info = None, None
    while keep:
        result, info, failed = attempt(keep)
        if not failed:
            break
        causes.update({keep[k]: why for k, why in failed.items()})
        keep = [b for k, b in enumerate(keep) if k not in failed]
    if causes:
        log.warning("OptimizationLayer: %d of %d %s failed: %s", len(causes), total, what,
                    "; ".join(f"{b}: {why}" for b, why in sorted(causes.items())))
    return keep, result, info


def _ragged_solver(objective: Objective, spec: object,
                   make: Callable[[Objective], LinearSolver] | None, device: torch.device
                   ) -> LinearSolver:
    """The merged objective's solver: ``make(objective)`` made once per combination (kept in
    the structure's ``solvers``), else ``spec`` resolved as a same-structure batch's."""
    if make is None:
        return resolve_solver(objective, spec, device)  # type: ignore[arg-type]
    key = ("ragged", make, str(device))
    if key not in objective.solvers:
        objective.solvers[key] = make(objective)  # type: ignore[index]
    return objective.solvers[key]  # type: ignore[index,return-value]


def _spread_info(info: Info | None, keep: list[int], count: int, causes: dict[int, str],
                 like: Tensor) -> Info:
    """The info of a ragged batch's ``keep`` problems spread to all ``count``: the others
    FAILED with their causes (``best_values`` left empty: per-problem shapes differ)."""
    index = torch.tensor(keep, dtype=torch.long, device=like.device)
    status = torch.full((count,), FAILED, dtype=torch.long, device=like.device)
    zeros = torch.zeros(count, dtype=torch.long, device=like.device)
    history = torch.full((1, count), float("nan"), dtype=like.dtype, device=like.device)
    if info is None or not keep:
        return Info(status, zeros, history, history[0], 0.0, {}, zeros, dict(causes))
    nans = torch.full((info.cost_history.shape[0], count), float("nan"), dtype=like.dtype,
                      device=like.device)
    return Info(
        status=status.index_copy(0, index, info.status),
        iterations=zeros.index_copy(0, index, info.iterations),
        cost_history=nans.index_copy(1, index, info.cost_history),
        damping=history[0].index_copy(0, index, info.damping),
        time_s=info.time_s,
        best_values={},
        solver_failures=zeros.index_copy(0, index, info.solver_failures),
        causes={**{keep[k]: why for k, why in info.causes.items()}, **causes},
    )


def _scatter(values: dict[str, Tensor], info: Info | None, keep: list[int], batch: int,
             causes: dict[int, str], init: dict[str, Tensor]) -> tuple[dict[str, Tensor], Info]:
    """Outputs and info of the ``keep`` elements (``values (K, F, S)``, ``info`` of K) spread
    into a batch of ``B``: the other elements get NaN values and a FAILED status with their
    causes. Differentiable in ``values`` (``index_copy``)."""
    like = next(iter(init.values()))
    index = torch.tensor(keep, dtype=torch.long, device=like.device)

    def spread(sub: Tensor | None, full: Tensor, dim: int = 0) -> Tensor:
        return full if not keep or sub is None else full.index_copy(dim, index, sub)

    def nans(t: Tensor, dim: int = 0) -> Tensor:
        shape = list(t.shape)
        shape[dim] = batch
        return torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)

    out = {k: spread(values[k] if keep else None, nans(v)) for k, v in init.items()}
    status = torch.full((batch,), FAILED, dtype=torch.long, device=like.device)
    zeros = torch.zeros(batch, dtype=torch.long, device=like.device)
    history = torch.full((1, batch), float("nan"), dtype=like.dtype, device=like.device)
    if info is None or not keep:
        full = Info(status, zeros, history, history[0], 0.0,
                    {k: v.detach() for k, v in out.items()}, zeros, dict(causes))
        return out, full
    sub_causes = {keep[k]: why for k, why in info.causes.items()}
    full = Info(
        status=spread(info.status, status),
        iterations=spread(info.iterations, zeros),
        cost_history=spread(info.cost_history, nans(info.cost_history, 1), dim=1),
        damping=spread(info.damping, history[0].clone()),
        time_s=info.time_s,
        best_values={k: spread(v, nans(v)) for k, v in info.best_values.items()},
        solver_failures=spread(info.solver_failures, zeros),
        causes={**sub_causes, **causes},
    )
    return out, full
