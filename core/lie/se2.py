"""SE(2): planar rigid motions as functions on plain tensors.

Storage ``(..., 4)`` = ``(x, y, cos theta, sin theta)``; tangent ``(..., 3)`` =
``(rho_x, rho_y, theta)`` (translation part first), with ``exp(rho, theta) = (V(theta) rho,
theta)`` and ``V = [[sin t / t, -(1 - cos t) / t], [(1 - cos t) / t, sin t / t]]``.
(pypose has no SE(2); this layout mirrors its SE(3) one.)

Jacobians: Sola, Deray, Atchuthan, "A micro Lie theory for state estimation in robotics"
(arXiv:1812.01537), eqs. (163)-(164); ``exp(xi + d) ~= exp(xi) exp(Jr(xi) d)``,
``Jr(xi) = Jl(-xi)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.lie import _util, so2

STORAGE_DIM = 4
DOF = 3


def identity(
    *batch_shape: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Identity motion, ``(*batch_shape, 4)`` = ``(0, 0, 1, 0)``."""
    shape = _util.batch_shape(batch_shape)
    out = torch.zeros(*shape, 4, dtype=_util.resolve_dtype(dtype), device=device)
    out[..., 2] = 1
    return out


def _coeffs(theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sin t / t, (1 - cos t) / t^2, (t - sin t) / t^3)`` for signed ``theta``."""
    theta2 = theta * theta
    a, b, c = _util.even_coeffs(
        theta2,
        [
            (_util.SIN_OVER_T, lambda t: torch.sin(t) / t),
            (_util.ONE_MINUS_COS_OVER_T2, lambda t: 2 * (torch.sin(t / 2) / t) ** 2),
            (_util.T_MINUS_SIN_OVER_T3, lambda t: (t - torch.sin(t)) / t**3),
        ],
    )
    return a, b, c


def _half_cot(theta: Tensor) -> Tensor:
    """``(t / 2) cot(t / 2)`` for signed ``theta`` (finite on ``(-2 pi, 2 pi)``)."""
    theta2 = theta * theta
    (h,) = _util.even_coeffs(
        theta2, [(_util.HALF_T_COT_HALF_T, lambda t: 0.5 * t * torch.cos(t / 2) / torch.sin(t / 2))]
    )
    return h


def exp(xi: Tensor) -> Tensor:
    """``(..., 3) -> (..., 4)``: ``t = V(theta) rho``, rotation ``(cos theta, sin theta)``."""
    _util.check(xi, 3, "se2.exp xi")
    r1, r2, th = xi.unbind(-1)
    a, b, _ = _coeffs(th)
    bt = b * th  # (1 - cos t) / t
    return torch.stack((a * r1 - bt * r2, bt * r1 + a * r2, torch.cos(th), torch.sin(th)), dim=-1)


def log(x: Tensor) -> Tensor:
    """``(..., 4) -> (..., 3)``: ``theta = atan2(s, c)``, ``rho = V(theta)^-1 t`` with
    ``V^-1 = [[h, t/2], [-t/2, h]]``, ``h = (t/2) cot(t/2)``."""
    _util.check(x, 4, "se2.log x")
    px, py, c, s = x.unbind(-1)
    th = torch.atan2(s, c)
    h = _half_cot(th)
    half = 0.5 * th
    return torch.stack((h * px + half * py, -half * px + h * py, th), dim=-1)


def compose(x: Tensor, y: Tensor) -> Tensor:
    """``x * y = (t1 + R1 t2, R1 R2)``; ``(..., 4), (..., 4) -> (..., 4)``, batches broadcast."""
    _util.check(x, 4, "se2.compose x")
    _util.check(y, 4, "se2.compose y")
    t = x[..., :2] + so2.act(x[..., 2:], y[..., :2])
    r = so2.compose(x[..., 2:], y[..., 2:])
    return torch.cat((t, r), dim=-1)


def inverse(x: Tensor) -> Tensor:
    """``x^-1`` = ``(-R^T t, R^T)``; ``(..., 4) -> (..., 4)``."""
    _util.check(x, 4, "se2.inverse x")
    r_inv = so2.inverse(x[..., 2:])
    return torch.cat((-so2.act(r_inv, x[..., :2]), r_inv), dim=-1)


def act(x: Tensor, p: Tensor) -> Tensor:
    """Transform points: ``(..., 4), (..., 2) -> (..., 2)`` = ``R p + t``, batches broadcast."""
    _util.check(x, 4, "se2.act x")
    _util.check(p, 2, "se2.act p")
    return so2.act(x[..., 2:], p) + x[..., :2]


def hat(xi: Tensor) -> Tensor:
    """``(..., 3) -> (..., 3, 3)``: ``[[0, -theta, rho_x], [theta, 0, rho_y], [0, 0, 0]]``."""
    _util.check(xi, 3, "se2.hat xi")
    r1, r2, th = xi.unbind(-1)
    o = torch.zeros_like(th)
    return torch.stack((o, -th, r1, th, o, r2, o, o, o), dim=-1).reshape(*xi.shape[:-1], 3, 3)


def vee(m: Tensor) -> Tensor:
    """Inverse of :func:`hat`: ``(..., 3, 3) -> (..., 3)``."""
    _util.check_matrix(m, 3, "se2.vee m")
    th = 0.5 * (m[..., 1, 0] - m[..., 0, 1])
    return torch.stack((m[..., 0, 2], m[..., 1, 2], th), dim=-1)


def to_matrix(x: Tensor) -> Tensor:
    """Homogeneous matrix ``(..., 4) -> (..., 3, 3)``."""
    _util.check(x, 4, "se2.to_matrix x")
    px, py, c, s = x.unbind(-1)
    o, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack((c, -s, px, s, c, py, o, o, one), dim=-1).reshape(*x.shape[:-1], 3, 3)


def from_matrix(m: Tensor) -> Tensor:
    """Homogeneous matrix ``(..., 3, 3) -> (..., 4)`` (rotation part re-normalized)."""
    _util.check_matrix(m, 3, "se2.from_matrix m")
    return torch.cat((m[..., :2, 2], so2.from_matrix(m[..., :2, :2])), dim=-1)


def adjoint(x: Tensor) -> Tensor:
    """``(..., 4) -> (..., 3, 3)``: ``[[R, (y, -x)^T], [0, 1]]``, ``x exp(xi) = exp(Ad xi) x``."""
    _util.check(x, 4, "se2.adjoint x")
    px, py, c, s = x.unbind(-1)
    o, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack((c, -s, py, s, c, -px, o, o, one), dim=-1).reshape(*x.shape[:-1], 3, 3)


def jr(xi: Tensor) -> Tensor:
    """Right Jacobian ``(..., 3) -> (..., 3, 3)`` (Sola eq. 163), rows:

    ``(sin t / t, (1 - cos t) / t, rho1 (t - sin t) / t^2 - rho2 (1 - cos t) / t^2)``,
    ``(-(1 - cos t) / t, sin t / t, rho1 (1 - cos t) / t^2 + rho2 (t - sin t) / t^2)``,
    ``(0, 0, 1)``.
    """
    _util.check(xi, 3, "se2.jr xi")
    r1, r2, th = xi.unbind(-1)
    a, b, c = _coeffs(th)
    bt, ct = b * th, c * th
    o, one = torch.zeros_like(th), torch.ones_like(th)
    rows = (a, bt, ct * r1 - b * r2, -bt, a, b * r1 + ct * r2, o, o, one)
    return torch.stack(rows, dim=-1).reshape(*xi.shape[:-1], 3, 3)


def jl(xi: Tensor) -> Tensor:
    """Left Jacobian ``(..., 3) -> (..., 3, 3)``, ``Jl(xi) = Jr(-xi)`` (Sola eq. 164)."""
    _util.check(xi, 3, "se2.jl xi")
    return jr(-xi)


def jr_inv(xi: Tensor) -> Tensor:
    """Inverse right Jacobian ``(..., 3) -> (..., 3, 3)``.

    ``Jr = [[M, v], [0, 1]]`` with ``M = V(theta)^T``, so ``Jr^-1 = [[M^-1, -M^-1 v], [0, 1]]`` and
    ``M^-1 = [[h, -t/2], [t/2, h]]``, ``h = (t/2) cot(t/2)`` (singular at ``|theta| = 2 pi``).
    """
    _util.check(xi, 3, "se2.jr_inv xi")
    r1, r2, th = xi.unbind(-1)
    _, b, c = _coeffs(th)
    ct = c * th
    v1, v2 = ct * r1 - b * r2, b * r1 + ct * r2
    h, half = _half_cot(th), 0.5 * th
    o, one = torch.zeros_like(th), torch.ones_like(th)
    w1 = -(h * v1 - half * v2)
    w2 = -(half * v1 + h * v2)
    rows = (h, -half, w1, half, h, w2, o, o, one)
    return torch.stack(rows, dim=-1).reshape(*xi.shape[:-1], 3, 3)


def jl_inv(xi: Tensor) -> Tensor:
    """Inverse left Jacobian ``(..., 3) -> (..., 3, 3)``, ``Jl^-1(xi) = Jr^-1(-xi)``."""
    _util.check(xi, 3, "se2.jl_inv xi")
    return jr_inv(-xi)


def retract(x: Tensor, delta: Tensor) -> Tensor:
    """``x * exp(delta)``; ``(..., 4), (..., 3) -> (..., 4)``."""
    return compose(x, exp(delta))


def local(x: Tensor, y: Tensor) -> Tensor:
    """``log(x^-1 y)``; ``(..., 4), (..., 4) -> (..., 3)``; ``retract(x, local(x, y)) == y``."""
    return log(compose(inverse(x), y))


def normalize(x: Tensor) -> Tensor:
    """Re-normalize the ``(cos, sin)`` part of ``(..., 4)``."""
    _util.check(x, 4, "se2.normalize x")
    return torch.cat((x[..., :2], so2.normalize(x[..., 2:])), dim=-1)


def random(
    *batch_shape: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random motion ``(*batch_shape, 4)``: uniform rotation, translation ~ N(0, I)."""
    shape = _util.batch_shape(batch_shape)
    dtype = _util.resolve_dtype(dtype)
    r = so2.random(*shape, generator=generator, dtype=dtype, device=device)
    t = torch.randn(*shape, 2, generator=generator, dtype=dtype, device=device)
    return torch.cat((t, r), dim=-1)
