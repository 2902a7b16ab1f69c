"""The linear solver protocol: ``factor(H, pattern, damping) -> Factor``; ``Factor.solve(b)``."""

from __future__ import annotations

from typing import Protocol

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


def damped(H: Tensor, pattern: Pattern, damping: Tensor) -> Tensor:
    """``H + diag(damping)`` as pattern values ``(B, nnz)``."""
    return H.index_add(1, pattern.diag, damping)
