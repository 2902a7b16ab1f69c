"""Dense feature-metric (or photometric) alignment under a homography, with analytic Jacobians.

The unknown is an 8-vector ``h`` (a ``Vector(8)`` variable; ``h = 0`` is the identity)::

    H(h) = [[1 + h0, h1, h2], [h3, 1 + h4, h5], [h6, h7, 1]]      (h33 = 1)

acting on points ``x = (x, y)`` in the coordinates the caller chooses (e.g. pixels normalized to
``[-1, 1]``): ``u = H (x, y, 1)^T``, ``x' = (u0 / u2, u1 / u2)``. One factor compares a target
feature map, given at ``N`` points ``x_n`` (``f_t (N, C)``), with a source feature map ``F_s (C,
Hs, Ws)`` sampled bilinearly at the warped points, ``p_n = a x'_n + b`` in source pixels
(column, row)::

    r_n = F_s(p_n) - f_t,n           (C,) where p_n lies inside the source map and u2 > 0
    r_n = outside / sqrt(C)          (C,) elsewhere (a constant: leaving the map never pays)

Warp Jacobian (Baker & Matthews, "Lucas-Kanade 20 years on", IJCV 2004, sec. 2.1), with ``w = u2``::

    dx'/dh = [x, y, 1, 0, 0, 0, -x x', -y x'] / w
    dy'/dh = [0, 0, 0, x, y, 1, -x y', -y y'] / w

and ``dr/dh = dF_s/dp * a * dx'/dh``, where ``dF_s/dp`` is the exact derivative of the bilinear
interpolation (not a smoothed image gradient), so the Jacobian is the residual's own derivative
wherever the residual is differentiable (off the sampling grid's cell edges and the map's
border). The residual is differentiable in both feature maps (a network's outputs), which is what
``OptimizationLayer``'s backward needs.

A homography that maps the convex quadrilateral ``corners`` to a self-intersecting or reflected
one, or sends one of them behind the line at infinity, is degenerate (:func:`degenerate`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from core.cost import Cost, make_cost
from core.lie import Vector
from core.variable import Variable


def homography_matrix(h: Tensor) -> Tensor:
    """``(..., 8) -> (..., 3, 3)``: ``H(h)`` of the module docstring (``h = 0`` is identity)."""
    one = torch.ones_like(h[..., :1])
    flat = torch.cat([h[..., :8], one], dim=-1) + torch.tensor(
        [1, 0, 0, 0, 1, 0, 0, 0, 0], dtype=h.dtype, device=h.device)
    return flat.reshape(*h.shape[:-1], 3, 3)


def params_from_matrix(H: Tensor) -> Tensor:
    """``(..., 3, 3) -> (..., 8)``: the parameters of ``H / H[2, 2]`` (inverse of
    :func:`homography_matrix`)."""
    H = H / H[..., 2:3, 2:3]
    eye = torch.eye(3, dtype=H.dtype, device=H.device)
    return (H - eye).flatten(-2)[..., :8]


def warp(h: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Points ``x (..., N, 2)`` mapped by ``H(h)``, ``h (..., 8)`` (same leading dimensions):
    returns ``x' (..., N, 2)`` and the homogeneous scale ``w (..., N)`` (``w <= 0``: at or
    behind the line at infinity)."""
    H = homography_matrix(h)
    u = x @ H[..., :2, :2].mT + H[..., None, :2, 2]
    w = (x @ H[..., 2, :2, None])[..., 0] + 1.0
    safe = torch.where(w.abs() > 1e-12, w, torch.full_like(w, 1e-12))
    return u / safe[..., None], w


def warp_jacobian(x: Tensor, xw: Tensor, w: Tensor) -> Tensor:
    """``(..., N, 2, 8)``: ``dx'/dh`` of the module docstring at points ``x (..., N, 2)`` with
    warped points ``xw (..., N, 2)`` and scales ``w (..., N)``."""
    X, Y = x[..., 0], x[..., 1]
    one, zero = torch.ones_like(X), torch.zeros_like(X)
    X, Y, one, zero = torch.broadcast_tensors(X, Y, one, zero)
    xp, yp = xw[..., 0], xw[..., 1]
    row0 = torch.stack([X, Y, one, zero, zero, zero, -X * xp, -Y * xp], dim=-1)
    row1 = torch.stack([zero, zero, zero, X, Y, one, -X * yp, -Y * yp], dim=-1)
    return torch.stack([row0, row1], dim=-2) / w[..., None, None]


def bilinear(F: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``F (B, C, Hs, Ws)`` at pixel positions ``p (B, N, 2)`` (column, row).

    Returns values ``(B, N, C)``, their exact derivative ``(B, N, C, 2)`` with respect to ``p``,
    and ``inside (B, N)``: ``0 <= p <= (Ws - 1, Hs - 1)``. Outside points read the clamped border
    (their values are meant to be masked). Differentiable in ``F`` (gathers)."""
    B, C, Hs, Ws = F.shape
    if Hs < 2 or Ws < 2:
        raise ValueError(f"bilinear: the map must be at least 2x2, got {Hs}x{Ws}")
    px, py = p[..., 0], p[..., 1]
    inside = (px >= 0) & (px <= Ws - 1) & (py >= 0) & (py <= Hs - 1)
    x0 = px.detach().floor().clamp(0, Ws - 2)
    y0 = py.detach().floor().clamp(0, Hs - 2)
    fx, fy = (px - x0)[..., None], (py - y0)[..., None]
    base = (y0 * Ws + x0).long()  # (B, N)
    flat = F.flatten(2)  # (B, C, Hs * Ws)

    def at(offset: int) -> Tensor:
        index = (base + offset).clamp(0, Hs * Ws - 1)[:, None, :].expand(B, C, -1)
        return flat.gather(2, index).mT  # (B, N, C)

    f00, f01, f10, f11 = at(0), at(1), at(Ws), at(Ws + 1)
    top = f00 + fx * (f01 - f00)
    bottom = f10 + fx * (f11 - f10)
    value = top + fy * (bottom - top)
    d_dx = (1 - fy) * (f01 - f00) + fy * (f11 - f10)
    d_dy = bottom - top
    return value, torch.stack([d_dx, d_dy], dim=-1), inside


def residuals(h: Tensor, source: Tensor, target: Tensor, points: Tensor, scale: float,
              offset: float, outside: float, jacobians: bool = True
              ) -> tuple[Tensor, Tensor | None, Tensor]:
    """The residuals of the module docstring for a batch of pairs.

    ``h (B, 8)``, ``source (B, C, Hs, Ws)``, ``target (B, N, C)``, ``points (N, 2)`` or
    ``(B, N, 2)``; source pixels are ``scale * x' + offset``. Returns ``r (B, N, C)``,
    ``J (B, N, C, 8)`` (or None) and ``valid (B, N)``."""
    B, C = source.shape[:2]
    x = points.expand(B, *points.shape[-2:])
    xw, w = warp(h, x)
    value, grad, inside = bilinear(source, scale * xw + offset)
    valid = inside & (w > 1e-6)
    m = valid[..., None].to(value.dtype)
    r = m * (value - target) + (1 - m) * (outside / math.sqrt(C))
    if not jacobians:
        return r, None, valid
    # dF/dp * scale * dx'/dh by the structure of dx'/dh (no small matmuls): with
    # (a, b) = scale * dF/dp / w and s = -(a x' + b y'), J = [a x, a y, a, b x, b y, b, s x, s y]
    k = (scale * m / w[..., None].where(valid[..., None], torch.ones_like(m)))
    a, b = k * grad[..., 0], k * grad[..., 1]  # (B, N, C)
    s = -(a * xw[..., 0, None] + b * xw[..., 1, None])
    X, Y = x[..., 0, None], x[..., 1, None]
    J = torch.stack([a * X, a * Y, a, b * X, b * Y, b, s * X, s * Y], dim=-1)  # (B, N, C, 8)
    return r, J, valid


def HomographyAlignment(  # noqa: N802 (a Cost constructor)
    variable: Variable,
    source: Tensor,
    target: Tensor,
    points: Tensor,
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    outside: float = 1.0,
    weight: float | Tensor | None = None,
    name: str = "alignment",
) -> Cost:
    """One factor per batch element: the residuals of all ``N`` points and ``C`` channels
    (residual dimension ``d = N C``, point-major) of aligning ``target (B|1, N, C)`` at
    ``points (N, 2)`` with ``source (B|1, C, Hs, Ws)`` warped by ``H(variable)``.

    ``variable``: ``Vector(8)``, count 1. Source pixel = ``scale * x' + offset``. ``outside``: the
    residual norm of a point that leaves the source map (or ``w <= 0``). Layer inputs replace
    ``"<name>.source"`` ``(B, C, Hs, Ws)`` and ``"<name>.target"`` ``(B, N, C)`` (e.g. network
    features); ``weight``: scalar or ``(B|1, 1, d)``.
    """
    if variable.space != Vector(8) or variable.count != 1:
        raise ValueError(f"HomographyAlignment: variable {variable.name!r} must be Vector(8) with "
                         f"count 1, got {variable.space} x {variable.count}")
    if source.ndim != 4:
        raise ValueError(f"HomographyAlignment: source must be (B, C, Hs, Ws), got "
                         f"{tuple(source.shape)}")
    C, N = source.shape[1], points.shape[0]
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"HomographyAlignment: points must be (N, 2), got {tuple(points.shape)}")
    if target.ndim != 3 or target.shape[1:] != (N, C):
        raise ValueError(f"HomographyAlignment: target must be (B, N, C) = (B, {N}, {C}) to "
                         f"match points and source, got {tuple(target.shape)}")

    def alignment(xs: list[Tensor], aux: list[Tensor], jacobians: bool):
        src, tgt, pts = aux[0][:, 0], aux[1][:, 0], aux[2][0, 0]
        B = xs[0].shape[0]
        r, J, _ = residuals(xs[0][:, 0], src.expand(B, *src.shape[1:]), tgt, pts, scale,
                            offset, outside, jacobians)
        r = r.reshape(B, 1, -1)
        return r, None if J is None else [J.reshape(B, 1, -1, 8)]

    return make_cost(None, [variable], {"source": source, "target": target, "points": points[None]},
                     weight=weight, name=name, analytic=alignment, residual_dim=N * C)


def corners_of(h: Tensor, corners: Tensor) -> Tensor:
    """``(..., 4, 2)``: ``corners (4, 2)`` mapped by ``H(h)``, ``h (..., 8)``."""
    xw, _ = warp(h, corners.expand(*h.shape[:-1], 4, 2))
    return xw


def _turns(q: Tensor) -> Tensor:
    """``(..., 4)``: the cross product of consecutive edges of quadrilaterals ``q (..., 4, 2)``
    (all of one sign: convex)."""
    e = q.roll(-1, dims=-2) - q
    f = e.roll(-1, dims=-2)
    return e[..., 0] * f[..., 1] - e[..., 1] * f[..., 0]


def degenerate(h: Tensor, corners: Tensor) -> Tensor:
    """``(...,)`` bool: ``H(h)`` (``h (..., 8)``) is degenerate on the convex quadrilateral
    ``corners (4, 2)`` (in order around it): ``det H <= 0``, a corner at or behind the line at
    infinity (``w <= 0``), or the image quadrilateral not convex with the original orientation
    (corners crossing); also a non-finite ``h``."""
    H = homography_matrix(h)
    q, w = warp(h, corners.expand(*h.shape[:-1], 4, 2))
    convex = (_turns(q) * _turns(corners).sign() > 0).all(-1)
    finite = torch.isfinite(h).all(-1)
    return ~finite | (torch.linalg.det(H) <= 0) | (w <= 0).any(-1) | ~convex


__all__ = ["HomographyAlignment", "bilinear", "corners_of", "degenerate", "homography_matrix",
           "params_from_matrix", "residuals", "warp", "warp_jacobian"]
