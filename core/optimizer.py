"""Batched Gauss-Newton and Levenberg-Marquardt.

One iteration (GTSAM's three lines, batched): linearize, solve the damped normal equations,
retract; then per batch element accept or reject by the gain ratio
``rho = (F(x) - F(x + delta)) / (m(0) - m(delta))`` (Madsen, Nielsen & Tingleff, *Methods for
non-linear least squares problems*, 2004, sec. 3.2) and update the damping (``damping_update``:
GTSAM's factor 10 with ``lambda I``, Nielsen's rule with ``lambda diag(H)``, by default).
Every element has its own damping, acceptance and convergence; converged elements stop moving.
The candidate's linearization is computed once and kept where the step is accepted, so each
iteration costs one linearization and one factorization.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from core._kernels import AVAILABLE as KERNELS
from core.linearize import Linearization, linearize
from core.objective import Elements, Objective
from core.solvers import LinearSolver, SolverName, damped, make_solver, solve
from core.solvers.base import Factor
from core.solvers.sparse import RaggedCholesky, RaggedFactor, SparseCholesky, prepare_threaded
from core.threads import prepare as prepare_threads
from core.threads import solve_threads

log = logging.getLogger(__name__)

RUNNING, CONVERGED, MAX_ITERS, FAILED = 0, 1, 2, 3
FAILED_MESSAGE = "the cost was not finite at the initial values or after a step"
STATUS_NAMES = {
    RUNNING: "running",
    CONVERGED: "converged",
    MAX_ITERS: "max_iters",
    FAILED: "failed",
}


@dataclass
class Info:
    """What happened, per batch element (per problem of a ragged batch: ``(P,)`` where this
    says ``(B,)``, see ``core.ragged``).

    ``status (B,)``: CONVERGED, MAX_ITERS or FAILED codes (``status_names`` for strings);
    ``iterations (B,)``: iterations each element ran; ``cost_history (T + 1, B)``: cost after each
    iteration (the initial cost first); ``damping (B,)``: final damping; ``time_s``: wall time;
    ``solver_failures (B,)``: iterations whose linear solve failed (not positive definite, or an
    iterative solver that did not converge; the step was rejected); ``causes``: batch element ->
    why it failed, where known (``OptimizationLayer`` names bad inputs; see ``messages``).
    """

    status: Tensor
    iterations: Tensor
    cost_history: Tensor
    damping: Tensor
    time_s: float
    best_values: dict[str, Tensor] = field(default_factory=dict)
    solver_failures: Tensor | None = None
    causes: dict[int, str] = field(default_factory=dict)

    @property
    def initial_cost(self) -> Tensor:
        return self.cost_history[0]

    @property
    def final_cost(self) -> Tensor:
        return self.cost_history[-1]

    @property
    def status_names(self) -> list[str]:
        return [STATUS_NAMES[int(s)] for s in self.status]

    @property
    def messages(self) -> list[str]:
        """Per element: why it failed, ``""`` unless its status is FAILED."""
        return [
            self.causes.get(b, FAILED_MESSAGE) if s == FAILED else ""
            for b, s in enumerate(self.status.tolist())
        ]


@dataclass
class Solution:
    """The optimized values (name -> ``(B, F, S)``), the info, and the last linearization (its
    normal equations are what the implicit backward solves with)."""

    values: dict[str, Tensor]
    info: Info
    linearization: Linearization | None = None


@dataclass(frozen=True)
class LevenbergMarquardt:
    """Levenberg-Marquardt (``damping_init=0, adaptive=False`` gives Gauss-Newton).

    Fields:
        max_iters: iteration cap.
        solver: linear solver name or instance (``"auto"``: dense for small problems, else sparse).
        damping_init: initial lambda.
        damping_mode: ``"marquardt"`` damps with ``lambda * diag(H)`` (scale invariant, Ceres),
            ``"levenberg"`` with ``lambda * I`` (GTSAM's default).
        damping_min, damping_max: bounds on lambda; exceeding ``damping_max`` after rejected
            steps means no decrease is possible: the element is declared converged (as Ceres does).
        min_gain: steps with gain ratio below this are rejected.
        rel_tol: converged when an accepted step decreases the cost by less than ``rel_tol * F``.
        abs_tol: converged when the cost is below this.
        step_tol: converged when the step's max-norm is below this.
        grad_tol: converged when the gradient's max-norm is below this.
        check_every: test for "all converged" on the host every this many iterations.
        verbose: log one line per iteration (cost, relative decrease, damping, time).
        adaptive: False gives Gauss-Newton: every finite step is accepted, the best kept.
        damping_update: how lambda moves after a step: ``"nielsen"`` (Madsen, Nielsen &
            Tingleff 2004, eq. 3.16: ``lambda *= max(1/3, 1 - (2 rho - 1)^3)`` after a good step,
            ``lambda *= nu, nu *= 2`` after a rejected one; Ceres's rule), ``"fixed"``
            (``lambda /= damping_factor`` after a good step, ``lambda *= damping_factor`` after
            a rejected one; GTSAM's default, factor 10), or ``"auto"``: each reference's pairing,
            fixed with ``"levenberg"`` damping (GTSAM) and Nielsen with ``"marquardt"`` (Ceres).
            Measured in bench/RESULTS.md: with ``lambda I`` the fixed factor took the fewest
            steps on every shared g2o file and synthetic helix (as many linear solves as
            GTSAM's LM); with ``diag(H)`` it stalled on dubrovnik-3-7 where Nielsen's converged.
        damping_factor: the factor of ``"fixed"``.
        threads: OpenBLAS's (CHOLMOD's) threads during a CPU solve; None: chosen by the
            measured rule of ``core.threads.choose`` (the free cores for large problems, else
            1); the previous setting is restored afterwards. torch's threads are the caller's.
        fused: linearize the library costs with their compiled kernels where they apply (CPU,
            float64, no gradient through the costs; ``core.fused``); False: torch throughout.
    """

    max_iters: int = 50
    solver: SolverName | LinearSolver = "auto"
    damping_init: float = 1e-5
    damping_mode: Literal["marquardt", "levenberg"] = "levenberg"
    damping_min: float = 1e-12
    damping_max: float = 1e12
    min_gain: float = 1e-3
    rel_tol: float = 1e-6
    abs_tol: float = 1e-12
    step_tol: float = 1e-10
    grad_tol: float = 1e-10
    check_every: int = 1
    verbose: bool = False
    adaptive: bool = True
    damping_update: Literal["auto", "nielsen", "fixed"] = "auto"
    damping_factor: float = 10.0
    fused: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0, got {self.max_iters}")
        if self.damping_mode not in ("marquardt", "levenberg"):
            raise ValueError(f"unknown damping_mode {self.damping_mode!r}")
        if self.damping_update not in ("auto", "nielsen", "fixed"):
            raise ValueError(f"unknown damping_update {self.damping_update!r}; use 'auto', "
                             "'nielsen' or 'fixed'")
        if not self.damping_factor > 1:
            raise ValueError(f"damping_factor must be > 1, got {self.damping_factor}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None (automatic), got {self.threads}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")
        prepare_threads()  # (once per process) not inside the first solve's time
        if KERNELS and isinstance(self.solver, str) and self.solver in ("auto", "sparse"):
            # the one-matrix kernel's compiled code (once per process; ~0.1 s from Numba's
            # cache): a solver named here is made inside the first solve
            prepare_threaded()

    def solve(self, objective: Objective, init: Mapping[str, Tensor]) -> Solution:
        """Minimize ``objective`` from ``init`` (name -> ``(B, F, S)``)."""
        return optimize(objective, dict(init), self)


def GaussNewton(**options: object) -> LevenbergMarquardt:  # noqa: N802 (a constructor)
    """Gauss-Newton: undamped steps, all accepted; options as :class:`LevenbergMarquardt`."""
    return LevenbergMarquardt(damping_init=0.0, adaptive=False, **options)  # type: ignore[arg-type]


def optimize(objective: Objective, values: dict[str, Tensor], opts: LevenbergMarquardt) -> Solution:
    """The batched loop shared by LM and GN; see the module docstring. On the CPU it runs with
    the thread counts of ``core.threads.solve_threads`` (for the largest problem of a ragged
    batch)."""
    start = time.perf_counter()
    objective.check_names(values)  # before any lookup: a misspelt name is a clear error
    first = values[objective.variables[0].name]
    with threads_for(objective, opts, first.device):
        return _optimize(objective, values, opts, start)


def threads_for(objective: Objective, opts: LevenbergMarquardt, device: torch.device
                ) -> AbstractContextManager:
    """The thread counts a factorization of ``objective``'s normal matrix runs with: on the
    CPU ``core.threads.solve_threads`` for its largest diagonal block (``opts.threads``), on
    other devices nothing to set. The optimizer's loop and the layer's backward factorizations
    both run inside it."""
    if device.type != "cpu":
        return nullcontext()
    return solve_threads(_block_dim(objective), opts.threads)


def _block_dim(objective: Objective) -> int:
    """The unknowns of the largest diagonal block: the objective's, or its largest problem's
    in a ragged batch (whose factorizations, and their supernodes, are no larger)."""
    if objective.groups is None:
        return objective.dim
    return int(torch.bincount(objective.groups.columns.cpu()).max())


def _optimize(
    objective: Objective, values: dict[str, Tensor], opts: LevenbergMarquardt, start: float
) -> Solution:
    """The loop over elements (``Objective.elements``): one per batch element of a
    same-structure batch, one per problem (and batch element) of a ragged batch; every
    per-element quantity (cost, damping, gain, acceptance, convergence, status) is ``(B * P,)``
    and mapped onto columns and variable elements where it meets ``(B, n)`` tensors."""
    first = values[objective.variables[0].name]
    objective = objective.to(first.device)  # indices and aux next to the values, once per solve
    batch = objective.check_values(values)
    els = objective.elements(batch)
    solver = resolve_solver(objective, opts.solver, first.device)
    lin = linearize(objective, values, opts.fused)
    status = torch.where(torch.isfinite(lin.cost), RUNNING, FAILED).to(first.device)
    lam = torch.full((els.count,), opts.damping_init, dtype=first.dtype, device=first.device)
    nu = torch.full_like(lam, 2.0)
    iterations = torch.zeros(els.count, dtype=torch.long, device=first.device)
    failures = torch.zeros_like(iterations)
    history = [lin.cost.detach()]
    best_cost, best = lin.cost.detach(), values
    for it in range(opts.max_iters):
        active = status == RUNNING
        status = torch.where(active & (els.max_columns(lin.g.abs()) < opts.grad_tol), CONVERGED,
                             status)
        active = status == RUNNING
        if it % opts.check_every == 0 and not bool(active.any()):
            break
        delta, cand, gain, new, factor_ok = _trial(objective, values, lin, lam, solver, opts, els,
                                                   active)
        finite = torch.isfinite(new.cost) & factor_ok
        step = els.max_columns(delta.abs())
        noise = _rounding_noise(lin.cost, new.cost, step.detach())
        accept = active & finite & ((gain > opts.min_gain) | noise | (not opts.adaptive))
        values = _where(els, accept, cand, values)
        decrease = lin.cost - new.cost
        small = (decrease.abs() <= opts.rel_tol * lin.cost) | (new.cost <= opts.abs_tol)
        small = small | (step <= opts.step_tol)
        lin = new.select(accept, lin, els)
        iterations = iterations + active.long()
        failures = failures + (active & ~factor_ok).long()
        lam, nu = _update_damping(lam, nu, gain, accept, active & ~accept, opts)
        done = (accept & small) | (lam > opts.damping_max)
        status = torch.where(active & done, CONVERGED, status)
        if not opts.adaptive:
            status = torch.where(active & ~finite, FAILED, status)
        if not opts.adaptive:
            improved = lin.cost < best_cost
            best_cost = torch.where(improved, lin.cost.detach(), best_cost)
            best = _where(els, improved, values, best)
        history.append(lin.cost.detach())
        if opts.verbose:
            _log_iteration(it, history, lam, time.perf_counter() - start)
    status = torch.where(status == RUNNING, MAX_ITERS, status)
    info = Info(
        status,
        iterations,
        torch.stack(history),
        lam,
        time.perf_counter() - start,
        best if not opts.adaptive else values,
        failures,
    )
    return Solution(values, info, lin)


def _where(els: Elements, mask: Tensor, a: dict[str, Tensor], b: dict[str, Tensor]
           ) -> dict[str, Tensor]:
    """Per element: the values ``a`` where ``mask (B * P,)`` else ``b`` (name -> ``(B, F, S)``)."""
    return {k: torch.where(els.variable(k, mask)[..., None], a[k], x) for k, x in b.items()}


def resolve_solver(
    objective: Objective, spec: SolverName | LinearSolver, device: torch.device
) -> LinearSolver:
    """``spec`` itself, or the solver of that name made once per objective structure and device
    (kept in ``objective.solvers``): a re-solve of the same structure reuses its symbolic
    analysis and index maps. A ragged batch's sparse Cholesky is a ``RaggedCholesky``: once
    some problems have stopped, the loop factors only the blocks of those still running."""
    if not isinstance(spec, str):
        return spec
    solvers = getattr(objective, "solvers", None)
    if solvers is None:  # an objective made without __init__ (a subclass, a copy)
        return make_solver(spec, objective.dim, device)
    key = (spec, str(device))
    if key not in solvers:
        made = make_solver(spec, objective.dim, device)
        if objective.groups is not None and isinstance(made, SparseCholesky):
            made = RaggedCholesky(objective.groups, made)
        solvers[key] = made
    return solvers[key]  # type: ignore[return-value]


def _trial(
    objective: Objective,
    values: dict[str, Tensor],
    lin: Linearization,
    lam: Tensor,
    solver: LinearSolver,
    opts: LevenbergMarquardt,
    els: Elements,
    active: Tensor,
) -> tuple[Tensor, dict[str, Tensor], Tensor, Linearization, Tensor]:
    """Solve ``(H + lambda D) delta = -g`` and linearize at the candidate.

    Returns ``delta (B, n)``, the candidate values, the gain ratio ``(B * P,)``, the
    candidate's linearization and the factorization's ``ok (B * P,)`` (:func:`element_ok`).
    A :class:`RaggedCholesky` factors only the blocks of the ``active (B * P,)`` elements
    (the whole matrix while all are): the others' steps are zero (they are not taken
    anyway). With ``(H + D') delta = -g`` the model decrease is ``m(0) - m(delta) = 0.5
    delta^T (D' delta - g)`` (no extra product with ``H``), summed per element. In a ragged
    batch each problem's block has its own ``lambda``; a problem whose cost is not finite gets
    the block ``I`` and ``g = 0`` (a zero step), so its NaNs reach no other problem's block.
    """
    H, g = lin.H, lin.g
    bad = ~torch.isfinite(lin.cost) if els.groups is not None else None
    if bad is not None and bool(bad.any()):  # (one host sync, ragged batches only)
        H = torch.where(els.entries(bad), 0.0, H)
        g = torch.where(els.columns(bad), 0.0, g)
    else:
        bad = None
    if opts.damping_mode == "marquardt":
        diag = H[:, lin.pattern.diag].clamp(1e-6, 1e32)
    else:
        diag = torch.ones_like(g)
    damping = els.columns(lam) * diag
    if bad is not None:
        damping = torch.where(els.columns(bad), 1.0, damping)
    # A and -g before factor(): no torch work between the factorization and the solve (on a
    # small CPU, torch's OpenMP threads spinning after such work halved CHOLMOD's solve speed);
    # A (a copy of H) only where autograd differentiates through the solve
    rhs = -g
    through = torch.is_grad_enabled() and (H.requires_grad or rhs.requires_grad or
                                           damping.requires_grad)
    A = damped(H, lin.pattern, damping) if through else H
    if isinstance(solver, RaggedCholesky):
        factor: Factor = solver.factor(H.detach(), lin.pattern, damping.detach(), active)
    else:
        factor = solver.factor(H.detach(), lin.pattern, damping.detach())
    delta = solve(factor, A, lin.pattern, rhs)
    cand = objective.retract(values, delta, opts.fused)
    new = linearize(objective, cand, opts.fused)
    predicted = 0.5 * els.sum_columns(delta * (damping * delta - g))
    gain = (lin.cost - new.cost) / predicted.clamp_min(torch.finfo(predicted.dtype).tiny)
    return delta, cand, gain.detach(), new, element_ok(factor, els)


def element_ok(factor: Factor, els: Elements) -> Tensor:
    """``(B * P,)``: False where the element's factorization failed (per problem for a
    :class:`RaggedFactor`, else the batch element's ``ok (B,)`` for each of its problems)."""
    if isinstance(factor, RaggedFactor):
        return factor.problem_ok
    return els.of_batch(factor.ok)


def _rounding_noise(cost: Tensor, new_cost: Tensor, step: Tensor) -> Tensor:
    """``(B * P,)``: steps whose cost change ``cost -> new_cost (B * P,)`` is rounding noise, or
    whose size ``step (B * P,)`` (max-norm of delta) is at the rounding level of the values. LM
    accepts them too: at the optimum this keeps the iterates (and an unrolled gradient)
    converging instead of raising the damping; at a zero-residual optimum the cost is itself
    rounding noise (~1e-31) and its relative change says nothing."""
    eps = torch.finfo(cost.dtype).eps
    noise = (cost - new_cost).abs() <= 100 * eps * cost
    return noise | (step <= 100 * eps)


def _update_damping(
    lam: Tensor,
    nu: Tensor,
    gain: Tensor,
    accept: Tensor,
    reject: Tensor,
    opts: LevenbergMarquardt,
) -> tuple[Tensor, Tensor]:
    """``opts.damping_update``: Nielsen's rule (after a good step ``lambda *= max(1/3, 1 - (2 rho
    - 1)^3)``, after a rejected one ``lambda *= nu, nu *= 2``) or the fixed factor."""
    if not opts.adaptive:
        return lam, nu
    fixed = opts.damping_update == "fixed" or (
        opts.damping_update == "auto" and opts.damping_mode == "levenberg"
    )
    if fixed:
        lam = torch.where(accept, (lam / opts.damping_factor).clamp_min(opts.damping_min), lam)
        lam = torch.where(reject, (lam * opts.damping_factor).clamp_max(2 * opts.damping_max), lam)
        return lam, nu
    shrink = torch.clamp(1 - (2 * gain - 1) ** 3, min=1 / 3, max=2.0)
    lam = torch.where(accept, (lam * shrink).clamp_min(opts.damping_min), lam)
    lam = torch.where(reject, (lam * nu).clamp_max(2 * opts.damping_max), lam)
    nu = torch.where(accept, torch.full_like(nu, 2.0), torch.where(reject, nu * 2, nu))
    return lam, nu


def _log_iteration(it: int, history: list[Tensor], lam: Tensor, elapsed: float) -> None:
    cost, prev = history[-1], history[-2]
    rel = (prev - cost) / prev.clamp_min(1e-300)
    log.info(
        "iter %3d  cost %.6e  rel_decrease %.3e  damping %.2e  time %.3fs",
        it,
        float(cost.max()),
        float(rel.max()),
        float(lam.max()),
        elapsed,
    )
