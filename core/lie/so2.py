"""SO(2): planar rotations as functions on plain tensors.

Storage ``(..., 2)`` = ``(cos theta, sin theta)``; tangent ``(..., 1)`` = ``theta``.
The group is abelian, so ``adjoint``, ``jr``, ``jl`` and their inverses are all identities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from core.lie import _util

STORAGE_DIM = 2
DOF = 1


def identity(
    *batch_shape: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Identity rotation, ``(*batch_shape, 2)`` = ``(1, 0)``."""
    shape = _util.batch_shape(batch_shape)
    out = torch.zeros(*shape, 2, dtype=_util.resolve_dtype(dtype), device=device)
    out[..., 0] = 1
    return out


def exp(xi: Tensor) -> Tensor:
    """``(..., 1) -> (..., 2)``: ``(cos theta, sin theta)``."""
    _util.check(xi, 1, "so2.exp xi")
    return torch.cat((torch.cos(xi), torch.sin(xi)), dim=-1)


def log(x: Tensor) -> Tensor:
    """``(..., 2) -> (..., 1)``: ``theta = atan2(sin, cos)`` in ``(-pi, pi]``."""
    _util.check(x, 2, "so2.log x")
    return torch.atan2(x[..., 1:2], x[..., 0:1])


def compose(x: Tensor, y: Tensor) -> Tensor:
    """``x * y`` (complex multiplication); ``(..., 2), (..., 2) -> (..., 2)``, batches broadcast."""
    _util.check(x, 2, "so2.compose x")
    _util.check(y, 2, "so2.compose y")
    c1, s1 = x.unbind(-1)
    c2, s2 = y.unbind(-1)
    return torch.stack((c1 * c2 - s1 * s2, s1 * c2 + c1 * s2), dim=-1)


def inverse(x: Tensor) -> Tensor:
    """``x^-1`` = ``(cos, -sin)``; ``(..., 2) -> (..., 2)``."""
    _util.check(x, 2, "so2.inverse x")
    return torch.stack((x[..., 0], -x[..., 1]), dim=-1)


def act(x: Tensor, p: Tensor) -> Tensor:
    """Rotate points: ``(..., 2), (..., 2) -> (..., 2)`` = ``R(x) @ p``, batches broadcast."""
    _util.check(x, 2, "so2.act x")
    _util.check(p, 2, "so2.act p")
    c, s = x.unbind(-1)
    px, py = p.unbind(-1)
    return torch.stack((c * px - s * py, s * px + c * py), dim=-1)


def hat(xi: Tensor) -> Tensor:
    """``(..., 1) -> (..., 2, 2)``: ``[[0, -theta], [theta, 0]]``."""
    _util.check(xi, 1, "so2.hat xi")
    t = xi[..., 0]
    o = torch.zeros_like(t)
    return torch.stack((o, -t, t, o), dim=-1).reshape(*xi.shape[:-1], 2, 2)


def vee(m: Tensor) -> Tensor:
    """Inverse of :func:`hat`: ``(..., 2, 2) -> (..., 1)`` (antisymmetric part)."""
    _util.check_matrix(m, 2, "so2.vee m")
    return 0.5 * (m[..., 1, 0:1] - m[..., 0, 1:2])


def to_matrix(x: Tensor) -> Tensor:
    """Rotation matrix ``(..., 2) -> (..., 2, 2)``."""
    _util.check(x, 2, "so2.to_matrix x")
    c, s = x.unbind(-1)
    return torch.stack((c, -s, s, c), dim=-1).reshape(*x.shape[:-1], 2, 2)


def from_matrix(m: Tensor) -> Tensor:
    """Rotation matrix ``(..., 2, 2) -> (..., 2)`` (averages both columns, then normalizes)."""
    _util.check_matrix(m, 2, "so2.from_matrix m")
    c = 0.5 * (m[..., 0, 0] + m[..., 1, 1])
    s = 0.5 * (m[..., 1, 0] - m[..., 0, 1])
    return normalize(torch.stack((c, s), dim=-1))


def adjoint(x: Tensor) -> Tensor:
    """``(..., 2) -> (..., 1, 1)`` ones (SO(2) is abelian)."""
    _util.check(x, 2, "so2.adjoint x")
    return torch.ones(*x.shape[:-1], 1, 1, dtype=x.dtype, device=x.device)


def _ones(xi: Tensor, name: str) -> Tensor:
    _util.check(xi, 1, name)
    return torch.ones(*xi.shape[:-1], 1, 1, dtype=xi.dtype, device=xi.device)


def jr(xi: Tensor) -> Tensor:
    """Right Jacobian of exp, ``(..., 1) -> (..., 1, 1)``: identically 1."""
    return _ones(xi, "so2.jr xi")


def jr_inv(xi: Tensor) -> Tensor:
    """Inverse right Jacobian, ``(..., 1) -> (..., 1, 1)``: identically 1."""
    return _ones(xi, "so2.jr_inv xi")


def jl(xi: Tensor) -> Tensor:
    """Left Jacobian of exp, ``(..., 1) -> (..., 1, 1)``: identically 1."""
    return _ones(xi, "so2.jl xi")


def jl_inv(xi: Tensor) -> Tensor:
    """Inverse left Jacobian, ``(..., 1) -> (..., 1, 1)``: identically 1."""
    return _ones(xi, "so2.jl_inv xi")


def retract(x: Tensor, delta: Tensor) -> Tensor:
    """``x * exp(delta)``; ``(..., 2), (..., 1) -> (..., 2)``."""
    return compose(x, exp(delta))


def local(x: Tensor, y: Tensor) -> Tensor:
    """``log(x^-1 y)``; ``(..., 2), (..., 2) -> (..., 1)``; ``retract(x, local(x, y)) == y``."""
    return log(compose(inverse(x), y))


def normalize(x: Tensor) -> Tensor:
    """Project ``(..., 2)`` back onto the unit circle."""
    _util.check(x, 2, "so2.normalize x")
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def random(
    *batch_shape: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random rotation ``(*batch_shape, 2)``."""
    shape = _util.batch_shape(batch_shape)
    dtype = _util.resolve_dtype(dtype)
    u = torch.rand(*shape, 1, generator=generator, dtype=dtype, device=device)
    return exp((2 * u - 1) * math.pi)
