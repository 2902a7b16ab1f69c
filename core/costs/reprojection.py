"""BAL / Snavely (Bundler) reprojection cost with analytic Jacobians, and BAL helpers.

Camera model (Snavely et al., "Photo tourism", 2006; the BAL format of Agarwal et al., "Bundle
adjustment in the large", ECCV 2010), for a world point ``X``::

    P = R X + t            (world -> camera)
    p = -P[:2] / P[2]      (the camera looks down -z)
    pred = f (1 + k1 |p|^2 + k2 |p|^4) p
    r = pred - observed

Variable layout: ``cameras`` is ``SE3`` holding the WORLD-TO-CAMERA transform ``T_cw = (R, t)``
exactly as BAL gives it (storage ``(t, q)``; note this is the inverse of the body-to-world
convention used for poses elsewhere: the camera centre is ``-R^T t``); ``intrinsics`` is
``Vector(3)`` = ``(f, k1, k2)`` per camera; ``points`` is ``Vector(3)`` in world coordinates.

Jacobians, with the right perturbation ``T_cw Exp((rho, phi))`` (so ``P(delta) ~= R (X + rho +
phi x X) + t``)::

    dP/drho = R,  dP/dphi = -R [X]x,  dP/dX = R
    dp/dP = -1/P[2] [I_2 | p]
    dpred/dp = f (s I + 2 (k1 + 2 k2 |p|^2) p p^T),  s = 1 + k1 |p|^2 + k2 |p|^4
    dpred/d(f, k1, k2) = [s p, f |p|^2 p, f |p|^4 p]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from core.cost import Cost, make_cost
from core.io import BALProblem
from core.lie import SE3, Vector, so3
from core.loss import RobustLoss
from core.objective import Objective
from core.variable import Variable


class BALVariables(NamedTuple):
    """The three variables of a BAL problem."""

    cameras: Variable
    intrinsics: Variable
    points: Variable


def project(T: Tensor, K: Tensor, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Snavely projection. ``T (..., 7)`` world-to-camera, ``K (..., 3)`` = ``(f, k1, k2)``,
    ``X (..., 3)``; returns ``pred (..., 2)``, the camera-frame point ``P (..., 3)`` and the
    normalized point ``p (..., 2)``."""
    P = so3.act(T[..., 3:], X) + T[..., :3]
    p = -P[..., :2] / P[..., 2:]
    r2 = (p * p).sum(-1, keepdim=True)
    s = 1 + K[..., 1:2] * r2 + K[..., 2:3] * r2 * r2
    return K[..., 0:1] * s * p, P, p


def _jacobians(T: Tensor, K: Tensor, X: Tensor, P: Tensor, p: Tensor) -> list[Tensor]:
    """``[dr/dT (..., 2, 6), dr/dK (..., 2, 3), dr/dX (..., 2, 3)]``; see the module docstring."""
    f, k1, k2 = K[..., 0, None, None], K[..., 1, None, None], K[..., 2, None, None]
    r2 = (p * p).sum(-1)[..., None, None]
    s = 1 + k1 * r2 + k2 * r2 * r2
    pp = p[..., :, None] * p[..., None, :]  # (..., 2, 2)
    eye2 = torch.eye(2, dtype=p.dtype, device=p.device)
    d_pred_p = f * (s * eye2 + 2 * (k1 + 2 * k2 * r2) * pp)
    d_p_P = torch.cat([eye2.expand_as(pp), p[..., :, None]], dim=-1) * (-1 / P[..., 2, None, None])
    R = so3.to_matrix(T[..., 3:])
    d_r_X = d_pred_p @ d_p_P @ R  # (..., 2, 3)
    zero = torch.zeros_like(X[..., 0])
    x0, x1, x2 = X[..., 0], X[..., 1], X[..., 2]
    skew = torch.stack([zero, -x2, x1, x2, zero, -x0, -x1, x0, zero], -1).view(*X.shape, 3)
    d_r_T = torch.cat([d_r_X, -d_r_X @ skew], dim=-1)
    d_r_K = torch.stack([s[..., 0] * p, f[..., 0] * r2[..., 0] * p,
                         f[..., 0] * (r2 * r2)[..., 0] * p], dim=-1)
    return [d_r_T, d_r_K, d_r_X]


def Reprojection(  # noqa: N802 (a Cost constructor)
    cameras: Variable,
    intrinsics: Variable,
    points: Variable,
    camera_index: Tensor,
    point_index: Tensor,
    observed: Tensor,
    *,
    intrinsics_index: Tensor | None = None,
    weight: float | Tensor | None = None,
    sqrt_info: Tensor | None = None,
    loss: RobustLoss | None = None,
    name: str = "reprojection",
) -> Cost:
    """BAL reprojection residuals ``pred - observed`` of ``O`` observations.

    ``cameras``: ``SE3`` (world-to-camera), ``intrinsics``: ``Vector(3)``, ``points``:
    ``Vector(3)``; ``camera_index, point_index (O,)`` int64; ``observed (O, 2)`` or
    ``(B|1, O, 2)``; ``intrinsics_index (O,)`` defaults to ``camera_index`` (one ``(f, k1, k2)``
    per camera; pass zeros to share one). ``weight``: scalar, ``(B|1, O, 1|2)``; ``sqrt_info``:
    ``(..., 2, 2)``.
    """
    for var, space in ((cameras, SE3), (intrinsics, Vector(3)), (points, Vector(3))):
        if var.space != space:
            raise ValueError(f"Reprojection: variable {var.name!r} must be {space}, "
                             f"got {var.space}")
    observed = torch.as_tensor(observed)
    if observed.ndim == 2:
        observed = observed[None]
    num = camera_index.shape[0]
    if observed.ndim != 3 or observed.shape[1:] != (num, 2):
        raise ValueError(f"Reprojection: observed must be (O, 2) or (B, O, 2) with O = {num}, "
                         f"got {tuple(observed.shape)}")
    k_index = camera_index if intrinsics_index is None else intrinsics_index

    def reprojection(xs: list[Tensor], aux: list[Tensor], jacobians: bool):
        T, K, X = xs
        pred, P, p = project(T, K, X)
        r = pred - aux[0]
        return r, _jacobians(T, K, X, P, p) if jacobians else None

    return make_cost(None, [cameras, intrinsics, points], {"observed": observed},
                     index=[camera_index, k_index, point_index], weight=weight,
                     sqrt_info=sqrt_info, loss=loss, name=name, analytic=reprojection,
                     residual_dim=2, kernel="reprojection_bal")


def bal_to_variables(problem: BALProblem) -> tuple[BALVariables, dict[str, Tensor]]:
    """Variables ``cameras`` (SE3, world-to-camera), ``intrinsics``, ``points`` and their initial
    values ``(1, C, 7)``, ``(1, C, 3)``, ``(1, P, 3)`` (problem's dtype and device)."""
    c, num_points = problem.num_cameras, problem.num_points
    variables = BALVariables(Variable("cameras", SE3, c), Variable("intrinsics", Vector(3), c),
                             Variable("points", Vector(3), num_points))
    cams = problem.cameras
    pose = torch.cat([cams[:, 3:6], so3.exp(cams[:, 0:3])], dim=-1)
    init = {"cameras": pose[None], "intrinsics": cams[None, :, 6:9].clone(),
            "points": problem.points[None].clone()}
    return variables, init


def variables_to_bal(values: Mapping[str, Tensor]) -> Tensor:
    """BAL cameras ``(..., C, 9)`` (angle-axis, t, f, k1, k2) from ``values["cameras"]
    (..., C, 7)`` and ``values["intrinsics"] (..., C, 3)``; the angle is in ``[0, pi]``."""
    T, K = values["cameras"], values["intrinsics"]
    return torch.cat([so3.log(T[..., 3:]), T[..., :3], K], dim=-1)


def bal_objective(
    problem: BALProblem, loss: RobustLoss | None = None, weight: float | Tensor | None = None
) -> tuple[Objective, dict[str, Tensor]]:
    """The BAL objective ``sum 0.5 rho(||w r||^2)`` (one ``Reprojection`` cost) and its initial
    values (see :func:`bal_to_variables`)."""
    variables, init = bal_to_variables(problem)
    cost = Reprojection(*variables, problem.camera_index, problem.point_index,
                        problem.observations, weight=weight, loss=loss)
    return Objective([cost]), init
