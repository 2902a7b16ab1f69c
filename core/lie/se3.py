"""SE(3): rigid motions as functions on plain tensors.

Storage ``(..., 7)`` = ``(t, q)`` with ``q = (x, y, z, w)`` (pypose's layout, so
``pypose.SE3(x)`` wraps it); tangent ``(..., 6)`` = ``(rho, phi)``, translation part first, with
the true SE(3) exponential ``exp(rho, phi) = (Jl(phi) rho, exp(phi))`` (as pypose's ``se3.Exp``).

Jacobians: Barfoot, "State Estimation for Robotics" (2017), eqs. 7.83-7.86 (``Q`` is 7.86, from
Barfoot & Furgale, "Associating uncertainty with three-dimensional poses", T-RO 2014)::

    Jl(xi) = [[Jl(phi), Q(rho, phi)], [0, Jl(phi)]]
    Jl(xi)^-1 = [[Jl(phi)^-1, -Jl(phi)^-1 Q Jl(phi)^-1], [0, Jl(phi)^-1]]
    Jr(xi) = Jl(-xi)

with ``exp(xi + d) ~= exp(xi) exp(Jr(xi) d)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.lie import _util, so3

STORAGE_DIM = 7
DOF = 6


def identity(
    *batch_shape: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Identity motion, ``(*batch_shape, 7)`` = ``(0, 0, 0, 0, 0, 0, 1)``."""
    shape = _util.batch_shape(batch_shape)
    out = torch.zeros(*shape, 7, dtype=_util.resolve_dtype(dtype), device=device)
    out[..., 6] = 1
    return out


def _jl_vec(phi: Tensor, v: Tensor) -> Tensor:
    """``Jl(phi) @ v`` without forming the matrix: ``v + b phi x v + a phi x (phi x v)``."""
    b, a = so3._coeffs(phi)
    pv = _util.cross(phi, v)
    return v + b[..., 0] * pv + a[..., 0] * _util.cross(phi, pv)


def _jl_inv_vec(phi: Tensor, v: Tensor) -> Tensor:
    """``Jl(phi)^-1 @ v`` = ``v - 1/2 phi x v + d phi x (phi x v)``."""
    d = so3._inv_coeff(phi)
    pv = _util.cross(phi, v)
    return v - 0.5 * pv + d[..., 0] * _util.cross(phi, pv)


def exp(xi: Tensor) -> Tensor:
    """``(..., 6) -> (..., 7)``: ``t = Jl(phi) rho``, ``q = so3.exp(phi)``."""
    _util.check(xi, 6, "se3.exp xi")
    rho, phi = xi[..., :3], xi[..., 3:]
    return torch.cat((_jl_vec(phi, rho), so3.exp(phi)), dim=-1)


def log(x: Tensor) -> Tensor:
    """``(..., 7) -> (..., 6)``: ``phi = so3.log(q)`` (angle in ``[0, pi]``),
    ``rho = Jl(phi)^-1 t``."""
    _util.check(x, 7, "se3.log x")
    phi = so3.log(x[..., 3:])
    return torch.cat((_jl_inv_vec(phi, x[..., :3]), phi), dim=-1)


def compose(x: Tensor, y: Tensor) -> Tensor:
    """``x * y = (t1 + R1 t2, q1 q2)``; ``(..., 7), (..., 7) -> (..., 7)``, batches broadcast."""
    _util.check(x, 7, "se3.compose x")
    _util.check(y, 7, "se3.compose y")
    t = x[..., :3] + so3.act(x[..., 3:], y[..., :3])
    q = so3.compose(x[..., 3:], y[..., 3:])
    return torch.cat((t, q), dim=-1)


def inverse(x: Tensor) -> Tensor:
    """``x^-1`` = ``(-R^T t, q^-1)``; ``(..., 7) -> (..., 7)``."""
    _util.check(x, 7, "se3.inverse x")
    q_inv = so3.inverse(x[..., 3:])
    return torch.cat((-so3.act(q_inv, x[..., :3]), q_inv), dim=-1)


def act(x: Tensor, p: Tensor) -> Tensor:
    """Transform points: ``(..., 7), (..., 3) -> (..., 3)`` = ``R p + t``, batches broadcast."""
    _util.check(x, 7, "se3.act x")
    _util.check(p, 3, "se3.act p")
    return so3.act(x[..., 3:], p) + x[..., :3]


def hat(xi: Tensor) -> Tensor:
    """``(..., 6) -> (..., 4, 4)``: ``[[phi^, rho], [0, 0]]``."""
    _util.check(xi, 6, "se3.hat xi")
    top = torch.cat((_util.skew(xi[..., 3:]), xi[..., :3, None]), dim=-1)
    return torch.cat((top, torch.zeros_like(top[..., :1, :])), dim=-2)


def vee(m: Tensor) -> Tensor:
    """Inverse of :func:`hat`: ``(..., 4, 4) -> (..., 6)``."""
    _util.check_matrix(m, 4, "se3.vee m")
    return torch.cat((m[..., :3, 3], _util.unskew(m[..., :3, :3])), dim=-1)


def to_matrix(x: Tensor) -> Tensor:
    """Homogeneous matrix ``(..., 7) -> (..., 4, 4)``."""
    _util.check(x, 7, "se3.to_matrix x")
    top = torch.cat((so3.to_matrix(x[..., 3:]), x[..., :3, None]), dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1
    return torch.cat((top, bottom), dim=-2)


def from_matrix(m: Tensor) -> Tensor:
    """Homogeneous matrix ``(..., 4, 4) -> (..., 7)`` (quaternion via Shepperd, ``w >= 0``)."""
    _util.check_matrix(m, 4, "se3.from_matrix m")
    return torch.cat((m[..., :3, 3], so3.from_matrix(m[..., :3, :3])), dim=-1)


def from_rt(q: Tensor, t: Tensor) -> Tensor:
    """``(..., 4)`` quaternion and ``(..., 3)`` translation -> ``(..., 7)`` (batches broadcast)."""
    _util.check(q, 4, "se3.from_rt q")
    _util.check(t, 3, "se3.from_rt t")
    shape = _util.broadcast_shapes(q.shape[:-1], t.shape[:-1])
    return torch.cat((t.expand(*shape, 3), q.expand(*shape, 4)), dim=-1)


def adjoint(x: Tensor) -> Tensor:
    """``(..., 7) -> (..., 6, 6)``: ``[[R, t^ R], [0, R]]``, ``x exp(xi) = exp(Ad xi) x``."""
    _util.check(x, 7, "se3.adjoint x")
    r = so3.to_matrix(x[..., 3:])
    tr = _util.skew(x[..., :3]) @ r
    return _util.block(((r, tr), (torch.zeros_like(r), r)))


def _q_block(xi: Tensor) -> Tensor:
    """Barfoot's ``Q(rho, phi)`` (eq. 7.86), ``(..., 6) -> (..., 3, 3)``."""
    p, f = _util.skew(xi[..., :3]), _util.skew(xi[..., 3:])
    theta2 = (xi[..., 3:] ** 2).sum(-1)[..., None, None]
    a, e, c = _util.even_coeffs(
        theta2,
        [
            (_util.T_MINUS_SIN_OVER_T3, lambda t: (t - torch.sin(t)) / t**3),
            (_util.COS_TERM_OVER_T4, lambda t: (t * t / 2 + torch.cos(t) - 1) / t**4),
            (
                _util.SE3_Q_LAST,
                lambda t: (2 * t - 3 * torch.sin(t) + t * torch.cos(t)) / (2 * t**5),
            ),
        ],
    )
    # The products of skew matrices reduce to outer products (a^ b^ = b a^T - (a . b) I), so no
    # 3x3 matmul is needed: with d = phi . rho, u = phi x rho, F = phi^:
    #   F P + P F + F P F = rho phi^T + phi rho^T - d F - 2 d I
    #   F F P + P F F - 3 F P F = u phi^T - phi u^T + d F
    #   F P F F + F F P F = -2 d (phi phi^T - theta^2 I)
    rho, phi = xi[..., :3], xi[..., 3:]
    d = (phi * rho).sum(-1)[..., None, None]
    u = _util.cross(phi, rho)
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device)
    outer = lambda x, y: x[..., :, None] * y[..., None, :]  # noqa: E731
    first = outer(rho, phi) + outer(phi, rho) - d * f - 2 * d * eye
    second = outer(u, phi) - outer(phi, u) + d * f
    third = -2 * d * (outer(phi, phi) - theta2 * eye)
    return 0.5 * p + a * first + e * second + c * third


def jl(xi: Tensor) -> Tensor:
    """Left Jacobian ``(..., 6) -> (..., 6, 6)`` = ``[[Jl(phi), Q], [0, Jl(phi)]]``."""
    _util.check(xi, 6, "se3.jl xi")
    j = so3.jl(xi[..., 3:])
    return _util.block(((j, _q_block(xi)), (torch.zeros_like(j), j)))


def jr(xi: Tensor) -> Tensor:
    """Right Jacobian ``(..., 6) -> (..., 6, 6)``, ``Jr(xi) = Jl(-xi)``."""
    _util.check(xi, 6, "se3.jr xi")
    return jl(-xi)


def jl_inv(xi: Tensor) -> Tensor:
    """Inverse left Jacobian ``(..., 6) -> (..., 6, 6)``:
    ``[[Jl^-1, -Jl^-1 Q Jl^-1], [0, Jl^-1]]`` (singular at ``|phi| = 2 pi``)."""
    _util.check(xi, 6, "se3.jl_inv xi")
    j = so3.jl_inv(xi[..., 3:])
    return _util.block(((j, -j @ _q_block(xi) @ j), (torch.zeros_like(j), j)))


def jr_inv(xi: Tensor) -> Tensor:
    """Inverse right Jacobian ``(..., 6) -> (..., 6, 6)``, ``Jr^-1(xi) = Jl^-1(-xi)``."""
    _util.check(xi, 6, "se3.jr_inv xi")
    return jl_inv(-xi)


def retract(x: Tensor, delta: Tensor) -> Tensor:
    """``x * exp(delta)``; ``(..., 7), (..., 6) -> (..., 7)``."""
    return compose(x, exp(delta))


def local(x: Tensor, y: Tensor) -> Tensor:
    """``log(x^-1 y)``; ``(..., 7), (..., 7) -> (..., 6)``; ``retract(x, local(x, y)) == y``."""
    return log(compose(inverse(x), y))


def normalize(x: Tensor) -> Tensor:
    """Re-normalize the quaternion part of ``(..., 7)``."""
    _util.check(x, 7, "se3.normalize x")
    return torch.cat((x[..., :3], so3.normalize(x[..., 3:])), dim=-1)


def random(
    *batch_shape: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random motion ``(*batch_shape, 7)``: uniform rotation, translation ~ N(0, I)."""
    shape = _util.batch_shape(batch_shape)
    dtype = _util.resolve_dtype(dtype)
    q = so3.random(*shape, generator=generator, dtype=dtype, device=device)
    t = torch.randn(*shape, 3, generator=generator, dtype=dtype, device=device)
    return torch.cat((t, q), dim=-1)
