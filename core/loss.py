"""Robust losses rho(s) of the squared weighted residual norm ``s = ||W r||^2``.

A cost term is ``0.5 * rho(s)`` (Ceres's convention). Gauss-Newton uses iteratively reweighted
least squares: residual and Jacobian are scaled by ``sqrt(rho'(s))``, which makes the gradient exact
(``g = sum rho'(s) J^T W r``) and the Hessian the usual IRLS approximation (as GTSAM does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from typing_extensions import assert_never

LossKind = Literal["huber", "cauchy", "welsch", "geman_mcclure"]


@dataclass(frozen=True)
class RobustLoss:
    """A robust loss with a scale ``c`` (the residual norm where it departs from quadratic).

    ``scale`` may be a float or a tensor (learnable, requiring grad): shape ``()``, ``(B,)`` for
    one scale per batch element, or anything broadcasting against ``(B, E)``.
    """

    kind: LossKind
    scale: float | Tensor = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("huber", "cauchy", "welsch", "geman_mcclure"):
            raise ValueError(f"unknown robust loss {self.kind!r}")
        if not isinstance(self.scale, Tensor) and not self.scale > 0:
            raise ValueError(f"robust loss {self.kind}: scale must be > 0, got {self.scale}")

    def with_scale(self, scale: float | Tensor) -> RobustLoss:
        return RobustLoss(self.kind, scale)

    def __call__(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """``s (B, E)`` squared norms -> ``(rho (B, E), rho' (B, E))``."""
        c = self.scale
        if isinstance(c, Tensor) and c.ndim == 1:
            c = c[:, None]
        c2 = c * c
        if self.kind == "huber":
            inside = s <= c2
            root = torch.sqrt(torch.where(inside, c2, s))  # safe: never sqrt(0) in the used branch
            rho = torch.where(inside, s, 2 * c * root - c2)
            drho = torch.where(inside, torch.ones_like(s), c / root)
        elif self.kind == "cauchy":
            rho = c2 * torch.log1p(s / c2)
            drho = 1 / (1 + s / c2)
        elif self.kind == "welsch":
            e = torch.exp(-s / c2)
            rho, drho = -c2 * torch.expm1(-s / c2), e
        elif self.kind == "geman_mcclure":
            rho = s * c2 / (s + c2)
            drho = (c2 / (s + c2)) ** 2
        else:
            assert_never(self.kind)
        return rho, drho
