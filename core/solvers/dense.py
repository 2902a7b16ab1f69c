"""Dense batched Cholesky (any device): the pattern is expanded to ``(B, n, n)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.objective import Pattern
from core.solvers.base import damped


@dataclass(frozen=True)
class DenseFactor:
    L: Tensor
    ok: Tensor

    def solve(self, b: Tensor) -> Tensor:
        return torch.cholesky_solve(b[..., None], self.L)[..., 0]


@dataclass(frozen=True)
class DenseCholesky:
    """``torch.linalg.cholesky_ex`` on the densified matrix; differentiable by autograd."""

    def factor(self, H: Tensor, pattern: Pattern, damping: Tensor) -> DenseFactor:
        A = pattern.to_dense(damped(H, pattern, damping))
        L, info = torch.linalg.cholesky_ex(A)
        ok = info == 0
        # Failed elements get an identity factor so their (discarded) solves stay finite.
        eye = torch.eye(pattern.n, dtype=A.dtype, device=A.device)
        L = torch.where(ok[:, None, None], L, eye)
        return DenseFactor(L, ok)
