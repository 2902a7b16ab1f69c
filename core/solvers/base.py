"""The linear solver protocol: ``factor(H, pattern, damping) -> Factor``; ``Factor.solve(b)``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

import torch
from torch import Tensor

from core.objective import Pattern


class Factor(Protocol):
    """A factorization of ``B`` damped normal matrices.

    ``ok (B,)``: False where the matrix was not numerically positive definite (its solves are
    then meaningless and the optimizer rejects the step).
    """

    ok: Tensor

    def solve(self, b: Tensor) -> Tensor:
        """Solve ``(H + diag(damping)) x = b`` for ``b (B, n)``; returns ``(B, n)``."""
        ...


class LinearSolver(Protocol):
    """Factor ``H + diag(damping)`` for values ``H (B, nnz)`` in ``pattern``, ``damping (B, n)``."""

    def factor(self, H: Tensor, pattern: Pattern, damping: Tensor) -> Factor: ...


class PlanCache(OrderedDict):
    """Per-structure solver state (symbolic analyses, device buffers) keyed by ``(id(pattern),
    ...)``, least recently used first; holding at most ``limit`` plans, so a training run that
    meets many structures does not keep every factor's memory alive. A factor still refers to
    its own plan, so it stays valid after the eviction."""

    def __init__(self, limit: int = 8) -> None:
        super().__init__()
        self.limit = limit

    def lookup(self, key: tuple, pattern: Pattern) -> Any:
        """The plan of ``key`` if it was made for this very ``pattern`` (ids can be reused)."""
        plan = self.get(key)
        if plan is None or plan.pattern is not pattern:
            return None
        self.move_to_end(key)
        return plan

    def store(self, key: tuple, plan: Any) -> Any:
        self[key] = plan
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)
        return plan


def damped(H: Tensor, pattern: Pattern, damping: Tensor) -> Tensor:
    """``H + diag(damping)`` as pattern values ``(B, nnz)``."""
    return H.index_add(1, pattern.diag, damping)


class _FactorSolve(torch.autograd.Function):
    """``x = A^-1 b`` with a precomputed factor of the symmetric ``A`` (pattern values).

    Backward (``A`` symmetric): ``grad_b = A^-1 grad_x`` with the same factor, and for every stored
    entry ``(i, j)``: ``grad_A_ij = -grad_b_i x_j``.
    """

    @staticmethod
    def forward(ctx, A: Tensor, b: Tensor, factor: Factor, pattern: Pattern) -> Tensor:  # type: ignore[override]
        x = factor.solve(b.detach())
        ctx.save_for_backward(x)
        ctx.factor, ctx.pattern = factor, pattern
        return x

    @staticmethod
    def backward(ctx, grad_x: Tensor) -> tuple[Tensor | None, Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        grad_b = ctx.factor.solve(grad_x)
        failed = ~ctx.factor.ok & (grad_x != 0).any(-1)
        if bool(failed.any()):  # e.g. an iterative solver that did not converge
            raise RuntimeError(
                "adjoint solve failed (not positive definite or not converged) for batch "
                f"elements {torch.nonzero(failed).flatten().tolist()}"
            )
        grad_A = None
        if ctx.needs_input_grad[0]:
            grad_A = -grad_b[:, ctx.pattern.rows] * x[:, ctx.pattern.cols]
        return grad_A, grad_b, None, None


def solve(factor: Factor, A: Tensor, pattern: Pattern, b: Tensor) -> Tensor:
    """``A^-1 b`` through ``factor`` (a factorization of the pattern values ``A (B, nnz)``),
    differentiable in ``A`` and ``b`` when autograd needs it, for every solver alike."""
    if torch.is_grad_enabled() and (A.requires_grad or b.requires_grad):
        return _FactorSolve.apply(A, b, factor, pattern)
    return factor.solve(b)
