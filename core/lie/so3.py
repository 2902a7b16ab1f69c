"""SO(3): 3-D rotations as functions on plain tensors.

Storage ``(..., 4)`` = unit quaternion ``(x, y, z, w)`` (pypose's layout, so ``pypose.SO3(q)``
wraps it); tangent ``(..., 3)`` = rotation vector ``phi`` with angle ``theta = |phi|``.

Jacobians follow Barfoot, "State Estimation for Robotics" (2017), Sec. 7.1.5 (eqs. 7.77, 7.79):

    ``Jl(phi) = I + (1 - cos t) / t^2 [phi] + (t - sin t) / t^3 [phi]^2``
    ``Jl(phi)^-1 = I - 1/2 [phi] + (1 / t^2 - (1 + cos t) / (2 t sin t)) [phi]^2``
    ``Jr(phi) = Jl(-phi)``,

with ``exp(phi + d) ~= exp(phi) exp(Jr(phi) d) ~= exp(Jl(phi) d) exp(phi)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.lie import _util

STORAGE_DIM = 4
DOF = 3


def identity(
    *batch_shape: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Identity rotation, ``(*batch_shape, 4)`` = ``(0, 0, 0, 1)``."""
    shape = _util.batch_shape(batch_shape)
    out = torch.zeros(*shape, 4, dtype=_util.resolve_dtype(dtype), device=device)
    out[..., 3] = 1
    return out


def exp(xi: Tensor) -> Tensor:
    """``(..., 3) -> (..., 4)``: ``q = (sin(t/2) / t * phi, cos(t/2))``."""
    _util.check(xi, 3, "so3.exp xi")
    theta2 = (xi * xi).sum(-1, keepdim=True)
    k, w = _util.even_coeffs(
        theta2,
        [
            (_util.SIN_HALF_OVER_T, lambda t: torch.sin(t / 2) / t),
            (_util.COS_HALF, lambda t: torch.cos(t / 2)),
        ],
    )
    return torch.cat((k * xi, w), dim=-1)


def from_axis_angle(axis_angle: Tensor) -> Tensor:
    """Alias of :func:`exp`: rotation vector ``(..., 3)`` -> quaternion ``(..., 4)``."""
    return exp(axis_angle)


def _log_threshold(dtype: torch.dtype) -> float:
    # threshold on s = sin(theta / 2); the atan series then converges like (s / w)^2 <= ~0.1
    return 0.1 if dtype == torch.float64 else 0.3


def log(x: Tensor) -> Tensor:
    """``(..., 4) -> (..., 3)`` rotation vector with angle in ``[0, pi]``.

    The quaternion is first flipped to ``w >= 0``; then ``theta = 2 atan2(|v|, w)`` (stable near
    pi) and ``phi = theta / |v| * v``, with a Taylor series of ``atan(s/w) / s`` for small ``|v|``.
    """
    _util.check(x, 4, "so3.log x")
    x = torch.where(x[..., 3:4] < 0, -x, x)
    v, w = x[..., :3], x[..., 3:4]
    s2 = (v * v).sum(-1, keepdim=True)
    small, s = _util.safe_theta(s2, _log_threshold(x.dtype))
    use_series, use_exact = _util.branches(small)
    if not use_exact:
        return 2 / w * _util.horner(s2 / (w * w), _util.ATAN_OVER_X) * v
    exact = 2 * torch.atan2(s, w) / s
    if not use_series:
        return exact * v
    w_safe = torch.where(small, w, torch.ones_like(w))
    taylor = 2 / w_safe * _util.horner(s2 / (w_safe * w_safe), _util.ATAN_OVER_X)
    return torch.where(small, taylor, exact) * v


def _qmul(x: Tensor, y: Tensor) -> Tensor:
    x1, y1, z1, w1 = x.unbind(-1)
    x2, y2, z2, w2 = y.unbind(-1)
    return torch.stack(
        (
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        ),
        dim=-1,
    )


def compose(x: Tensor, y: Tensor) -> Tensor:
    """Hamilton product ``x * y``; ``(..., 4), (..., 4) -> (..., 4)``, batches broadcast."""
    _util.check(x, 4, "so3.compose x")
    _util.check(y, 4, "so3.compose y")
    return _qmul(x, y)


def inverse(x: Tensor) -> Tensor:
    """Conjugate quaternion ``(-v, w)``; ``(..., 4) -> (..., 4)``."""
    _util.check(x, 4, "so3.inverse x")
    return torch.cat((-x[..., :3], x[..., 3:]), dim=-1)


def _rotate(q: Tensor, p: Tensor) -> Tensor:
    v, w = q[..., :3], q[..., 3:4]
    u = 2 * _util.cross(v, p)
    return p + w * u + _util.cross(v, u)


def act(x: Tensor, p: Tensor) -> Tensor:
    """Rotate points ``p``: ``(..., 4), (..., 3) -> (..., 3)`` = ``R(x) @ p``, batches broadcast."""
    _util.check(x, 4, "so3.act x")
    _util.check(p, 3, "so3.act p")
    return _rotate(x, p)


def hat(xi: Tensor) -> Tensor:
    """``(..., 3) -> (..., 3, 3)`` skew-symmetric matrix ``[phi]``."""
    _util.check(xi, 3, "so3.hat xi")
    return _util.skew(xi)


def vee(m: Tensor) -> Tensor:
    """Inverse of :func:`hat`: ``(..., 3, 3) -> (..., 3)`` (of the antisymmetric part)."""
    _util.check_matrix(m, 3, "so3.vee m")
    return _util.unskew(m)


def _quat_to_matrix(q: Tensor) -> Tensor:
    x, y, z, w = q.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz, wx, wy, wz = x * y, x * z, y * z, w * x, w * y, w * z
    rows = (
        1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy),
        2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx),
        2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def to_matrix(x: Tensor) -> Tensor:
    """Rotation matrix ``(..., 4) -> (..., 3, 3)`` (assumes a unit quaternion)."""
    _util.check(x, 4, "so3.to_matrix x")
    return _quat_to_matrix(x)


def _matrix_to_quat(m: Tensor) -> Tensor:
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    diag = torch.stack((m00 + m11 + m22, m00, m11, m22), dim=-1)
    sel = diag.argmax(dim=-1, keepdim=True)  # Shepperd: branch with the largest pivot
    # 4 * pivot^2 for each branch; clamped so the unused branches stay finite (no NaN grads)
    r = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22),
        dim=-1,
    )
    half = 0.5 * torch.sqrt(r.clamp_min(1e-6))  # pivots q_w, q_x, q_y, q_z
    f = 0.25 / half
    hw, hx, hy, hz = half.unbind(-1)
    fw, fx, fy, fz = f.unbind(-1)
    a, b, c = m21 - m12, m02 - m20, m10 - m01  # 4 w (x, y, z)
    d, e, g = m01 + m10, m02 + m20, m12 + m21  # 4 xy, 4 xz, 4 yz
    cand = torch.stack(
        (
            torch.stack((a * fw, b * fw, c * fw, hw), dim=-1),
            torch.stack((hx, d * fx, e * fx, a * fx), dim=-1),
            torch.stack((d * fy, hy, g * fy, b * fy), dim=-1),
            torch.stack((e * fz, g * fz, hz, c * fz), dim=-1),
        ),
        dim=-2,
    )  # (..., 4 branches, 4)
    q = torch.gather(cand, -2, sel[..., None].expand(*sel.shape[:-1], 1, 4)).squeeze(-2)
    return q


def from_matrix(m: Tensor) -> Tensor:
    """Rotation matrix ``(..., 3, 3) -> (..., 4)`` unit quaternion with ``w >= 0``.

    Shepperd's method (J. Guidance and Control 1(3), 1978): the branch with the largest of
    ``(trace, m00, m11, m22)`` is used, so the divisor is never small.
    """
    _util.check_matrix(m, 3, "so3.from_matrix m")
    q = normalize(_matrix_to_quat(m))
    return torch.where(q[..., 3:4] < 0, -q, q)


def adjoint(x: Tensor) -> Tensor:
    """``(..., 4) -> (..., 3, 3)``: the rotation matrix, ``x exp(xi) = exp(R xi) x``."""
    _util.check(x, 4, "so3.adjoint x")
    return _quat_to_matrix(x)


def _coeffs(xi: Tensor) -> tuple[Tensor, Tensor]:
    """``((1 - cos t) / t^2, (t - sin t) / t^3)`` as ``(..., 1, 1)``."""
    theta2 = (xi * xi).sum(-1)[..., None, None]
    b, a = _util.even_coeffs(
        theta2,
        [
            (_util.ONE_MINUS_COS_OVER_T2, lambda t: 2 * (torch.sin(t / 2) / t) ** 2),
            (_util.T_MINUS_SIN_OVER_T3, lambda t: (t - torch.sin(t)) / t**3),
        ],
    )
    return b, a


def _inv_coeff(xi: Tensor) -> Tensor:
    """``1 / t^2 - (1 + cos t) / (2 t sin t)`` as ``(..., 1, 1)`` (written with cot(t/2))."""
    theta2 = (xi * xi).sum(-1)[..., None, None]
    (d,) = _util.even_coeffs(
        theta2,
        [(_util.JL_INV_COEFF, lambda t: 1 / t**2 - torch.cos(t / 2) / (2 * t * torch.sin(t / 2)))],
    )
    return d


def jl(xi: Tensor) -> Tensor:
    """Left Jacobian ``(..., 3) -> (..., 3, 3)`` (Barfoot eq. 7.77)."""
    _util.check(xi, 3, "so3.jl xi")
    b, a = _coeffs(xi)
    k = _util.skew(xi)
    eye = _util.eye_like(xi, 3, xi.shape[:-1])
    return eye + b * k + a * (k @ k)


def jr(xi: Tensor) -> Tensor:
    """Right Jacobian ``(..., 3) -> (..., 3, 3)``, ``Jr(phi) = Jl(-phi)``."""
    _util.check(xi, 3, "so3.jr xi")
    return jl(-xi)


def jl_inv(xi: Tensor) -> Tensor:
    """Inverse left Jacobian ``(..., 3) -> (..., 3, 3)`` (Barfoot eq. 7.79); singular at 2 pi."""
    _util.check(xi, 3, "so3.jl_inv xi")
    d = _inv_coeff(xi)
    k = _util.skew(xi)
    eye = _util.eye_like(xi, 3, xi.shape[:-1])
    return eye - 0.5 * k + d * (k @ k)


def jr_inv(xi: Tensor) -> Tensor:
    """Inverse right Jacobian ``(..., 3) -> (..., 3, 3)``, ``Jr^-1(phi) = Jl^-1(-phi)``."""
    _util.check(xi, 3, "so3.jr_inv xi")
    return jl_inv(-xi)


def retract(x: Tensor, delta: Tensor) -> Tensor:
    """``x * exp(delta)``; ``(..., 4), (..., 3) -> (..., 4)``."""
    return compose(x, exp(delta))


def local(x: Tensor, y: Tensor) -> Tensor:
    """``log(x^-1 y)``; ``(..., 4), (..., 4) -> (..., 3)``; ``retract(x, local(x, y)) == y``."""
    return log(compose(inverse(x), y))


def normalize(x: Tensor) -> Tensor:
    """Project ``(..., 4)`` back onto the unit quaternions."""
    _util.check(x, 4, "so3.normalize x")
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def random(
    *batch_shape: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random rotation ``(*batch_shape, 4)`` (normalized Gaussian 4-vector)."""
    shape = _util.batch_shape(batch_shape)
    dtype = _util.resolve_dtype(dtype)
    q = torch.randn(*shape, 4, generator=generator, dtype=dtype, device=device)
    return normalize(q)
