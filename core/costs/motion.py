"""Library costs for trajectory optimization (GPMP2: Mukadam, Dong, Yan, Dellaert & Boots,
"Continuous-time Gaussian process motion planning via probabilistic inference", IJRR 2018).

A trajectory is one ``Vector(2 d)`` variable of ``N`` support states ``x_k = (p_k, v_k)``:
position ``p (d,)`` then velocity ``v (d,)``. Since vectors retract by addition, the Jacobians
below are ordinary derivatives.

* :func:`GPMotionPrior`: the constant-velocity (white-noise-on-acceleration) Gaussian-process
  prior between states ``i`` and ``j`` a time ``dt`` apart:
  ``e = (p_j - p_i - dt v_i, v_j - v_i)`` whitened by the closed-form covariance
  ``Q = [[dt^3/3 Qc, dt^2/2 Qc], [dt^2/2 Qc, dt Qc]]`` (IJRR 2018, eq. 13; ``Qc`` the
  power-spectral density of the acceleration noise): ``r = U e`` with ``U^T U = Q^-1``;
  ``dr/dx_i = -U Phi``, ``Phi = [[I, dt I], [0, I]]``, ``dr/dx_j = U``.
* :func:`CollisionHinge`: the obstacle cost ``r = max(0, eps - d(p))`` (IJRR 2018, eq. 17 with
  one body sphere: ``eps`` = robot radius + safety margin) on a signed distance field ``d``
  sampled on a grid and read by bilinear interpolation (:func:`sdf_lookup`);
  ``dr/dp = -grad d(p)`` where the hinge is active, 0 elsewhere.
  Options for a planner whose Gauss-Newton model stays right where a state starts or stops
  touching an obstacle: ``interp="bicubic"`` reads the SDF by Catmull-Rom interpolation
  (continuous gradient, :func:`sdf_lookup`), and ``smooth = s > 0`` rounds the hinge's kink:
  with ``u = eps - d``, ``r = 0`` for ``u <= -s/2``, ``(u + s/2)^2 / (2 s)`` for ``|u| < s/2``,
  ``u`` for ``u >= s/2`` (value and slope continuous; the plain hinge outside the band).
* Boundary priors (start and goal states) are ``core.costs.Prior`` on the same variable.

The SDF grid (:func:`sdf_lookup`): ``sdf[..., row, col]`` holds the distance at the cell centre
``(x, y) = origin + ((col + 0.5) cell, (row + 0.5) cell)`` (rows along ``y``). Points outside the
box of cell centres are handled explicitly, never wrapped: a point ``p`` is clamped to the box,
``c = clamp(p)``, and ``d(p) = d(c) - |p - c|``: the field continues outward from the map's edge
value, decreasing by the distance travelled out of the map, so leaving the map is never cheaper
than staying on its edge and the hinge pushes trajectories back in. Value and gradient are finite
everywhere (at ``p = c`` the outward term and its gradient are 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from typing_extensions import assert_never

from core.cost import Cost, make_cost
from core.costs.pose import _as_index
from core.variable import Variable


def gp_covariance(dt: float, qc: float | Sequence[float] | Tensor, dim: int,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """``Q (2 dim, 2 dim)``: the constant-velocity GP's covariance over a step ``dt`` with
    acceleration power-spectral density ``qc`` (a scalar or ``(dim,)``: ``Qc = diag(qc)``)."""
    if dt <= 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    q = torch.as_tensor(qc, dtype=dtype)
    q = q.expand(dim) if q.ndim == 0 else q
    if q.shape != (dim,) or bool((q <= 0).any()):
        raise ValueError(f"qc must be a positive scalar or ({dim},), got {q.tolist()}")
    Qc = torch.diag(q)
    return torch.cat([torch.cat([dt**3 / 3 * Qc, dt**2 / 2 * Qc], 1),
                      torch.cat([dt**2 / 2 * Qc, dt * Qc], 1)], 0)


def gp_sqrt_information(dt: float, qc: float | Sequence[float] | Tensor, dim: int,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """``U (2 dim, 2 dim)`` upper triangular with ``U^T U = Q^-1`` (:func:`gp_covariance`)."""
    Q = gp_covariance(dt, qc, dim, torch.float64)
    L = torch.linalg.cholesky(torch.linalg.inv(Q))  # Q^-1 = L L^T
    return L.mT.contiguous().to(dtype)


def gp_transition(dt: float, dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``Phi (2 dim, 2 dim) = [[I, dt I], [0, I]]``: the mean's state transition over ``dt``."""
    eye = torch.eye(dim, dtype=dtype)
    return torch.cat([torch.cat([eye, dt * eye], 1),
                      torch.cat([torch.zeros_like(eye), eye], 1)], 0)


def GPMotionPrior(  # noqa: N802 (a Cost constructor)
    variable: Variable,
    dt: float,
    qc: float | Sequence[float] | Tensor = 1.0,
    i: Tensor | None = None,
    j: Tensor | None = None,
    *,
    weight: float | Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    name: str | None = None,
) -> Cost:
    """The constant-velocity GP prior ``r = U (x_j - Phi x_i)`` (module docstring) between states
    ``variable[i]`` and ``variable[j]``; default: every consecutive pair ``(k, k + 1)``.

    ``variable``: ``Vector(2 d)`` states (position then velocity, count ``N >= 2``); ``dt``: the
    time between the paired states; ``qc``: the acceleration noise's power-spectral density.
    ``weight`` optionally scales the whitened residual (``(E, 1)`` per factor, ...)."""
    storage = variable.space.storage_dim
    if storage % 2 or variable.space.dof != storage:
        raise ValueError(f"GPMotionPrior on {variable.name!r}: needs a Vector(2 d) of positions "
                         f"and velocities, got {variable.space}")
    if (i is None) != (j is None):
        raise ValueError("GPMotionPrior: give both i and j, or neither")
    if i is None or j is None:
        if variable.count < 2:
            raise ValueError(f"GPMotionPrior on {variable.name!r}: needs at least 2 states, got "
                             f"count {variable.count}")
        i, j = torch.arange(variable.count - 1), torch.arange(1, variable.count)
    i, j = _as_index(i, "GPMotionPrior i"), _as_index(j, "GPMotionPrior j")
    dim = storage // 2
    U = gp_sqrt_information(dt, qc, dim, dtype)
    phi = gp_transition(dt, dim, dtype)

    def gp_prior(xs: list[Tensor], aux: list[Tensor], jacobians: bool):
        xi, xj = xs  # (B, E, 2 d)
        e = xj - xi @ phi.to(xi).mT
        if not jacobians:
            return e, None
        eye = torch.eye(storage, dtype=xi.dtype, device=xi.device)
        shape = (*xi.shape[:2], storage, storage)
        return e, [(-phi.to(xi)).expand(shape), eye.expand(shape)]

    return make_cost(None, [variable, variable], {}, index=[i, j], weight=weight, sqrt_info=U,
                     name=name or f"gp_prior_{variable.name}", analytic=gp_prior,
                     residual_dim=storage)


Interp = Literal["bilinear", "bicubic"]


def _catmull_rom(f: Tensor) -> tuple[Tensor, Tensor]:
    """Catmull-Rom weights ``(..., 4)`` of the samples at ``-1, 0, 1, 2`` for fractions ``f`` in
    ``[0, 1]``, and their derivatives ``d/df``."""
    f2, f3 = f * f, f * f * f
    w = torch.stack([-0.5 * f3 + f2 - 0.5 * f, 1.5 * f3 - 2.5 * f2 + 1,
                     -1.5 * f3 + 2 * f2 + 0.5 * f, 0.5 * f3 - 0.5 * f2], -1)
    dw = torch.stack([-1.5 * f2 + 2 * f - 0.5, 4.5 * f2 - 5 * f, -4.5 * f2 + 4 * f + 0.5,
                      1.5 * f2 - f], -1)
    return w, dw


def sdf_lookup(sdf: Tensor, p: Tensor, origin: Sequence[float], cell: float,
               interp: Interp = "bilinear") -> tuple[Tensor, Tensor]:
    """Signed distance and its gradient at points ``p (B, E, 2)`` of the grid ``sdf (B|1, H, W)``
    with the out-of-map rule of the module docstring.

    ``origin``: the map's lower-left corner ``(x, y)``; ``cell``: the cell size; ``interp``:
    ``"bilinear"`` (gradient piecewise constant across cells) or ``"bicubic"`` (Catmull-Rom
    over the 4 x 4 nearest samples, edge samples repeated beyond the grid: value and gradient
    continuous inside the map; it reproduces linear fields exactly). Returns ``d (B, E)`` and
    ``grad (B, E, 2)`` (``d/dx, d/dy``)."""
    if sdf.ndim != 3 or p.ndim != 3 or p.shape[-1] != 2:
        raise ValueError(f"sdf_lookup: sdf must be (B|1, H, W) and p (B, E, 2), got "
                         f"{tuple(sdf.shape)} and {tuple(p.shape)}")
    H, W = sdf.shape[-2:]
    o = torch.as_tensor(origin, dtype=p.dtype, device=p.device)
    lo = o + 0.5 * cell
    hi = o + torch.tensor([W - 0.5, H - 0.5], dtype=p.dtype, device=p.device) * cell
    c = torch.maximum(torch.minimum(p, hi), lo)  # clamped into the box of cell centres
    inside = (p == c).to(p.dtype)  # per axis: 1 where that coordinate was not clamped
    g = (c - lo) / cell  # grid coordinates (col, row) in [0, W-1] x [0, H-1]
    g0 = torch.minimum(g.floor(), torch.tensor([W - 2, H - 2], dtype=p.dtype,
                                               device=p.device)).clamp(min=0)
    f = g - g0  # fractions in [0, 1]
    col, row = g0[..., 0].long(), g0[..., 1].long()
    flat = sdf.expand(p.shape[0], H, W).reshape(p.shape[0], H * W)
    if interp == "bilinear":
        d, ddx, ddy = _bilinear(flat, row, col, f, W)
    elif interp == "bicubic":
        d, ddx, ddy = _bicubic(flat, row, col, f, H, W)
    else:
        assert_never(interp)
    grad = torch.stack([ddx, ddy], -1) / cell * inside
    out = p - c
    dist = out.norm(dim=-1)
    safe = torch.where(dist > 0, dist, torch.ones_like(dist))
    grad = grad - out / safe[..., None]
    return d - dist, grad


def _bilinear(flat: Tensor, row: Tensor, col: Tensor, f: Tensor, W: int
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Value and derivatives in grid units from the 2 x 2 samples at ``(row, col)``."""

    def at(dr: int, dc: int) -> Tensor:
        return flat.gather(1, (row + dr) * W + col + dc)

    v00, v01, v10, v11 = at(0, 0), at(0, 1), at(1, 0), at(1, 1)
    fx, fy = f[..., 0], f[..., 1]
    d = (v00 * (1 - fx) * (1 - fy) + v01 * fx * (1 - fy) + v10 * (1 - fx) * fy + v11 * fx * fy)
    ddx = (v01 - v00) * (1 - fy) + (v11 - v10) * fy
    ddy = (v10 - v00) * (1 - fx) + (v11 - v01) * fx
    return d, ddx, ddy


def _bicubic(flat: Tensor, row: Tensor, col: Tensor, f: Tensor, H: int, W: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Catmull-Rom value and derivatives in grid units from the 4 x 4 samples around
    ``(row, col)`` (indices clamped to the grid)."""
    k = torch.arange(-1, 3, device=row.device)
    rows = (row[..., None] + k).clamp(0, H - 1)  # (B, E, 4)
    cols = (col[..., None] + k).clamp(0, W - 1)
    index = (rows[..., :, None] * W + cols[..., None, :]).flatten(1)  # (B, E * 16)
    v = flat.gather(1, index).view(*row.shape, 4, 4)  # [..., row offset, col offset]
    wx, dwx = _catmull_rom(f[..., 0])
    wy, dwy = _catmull_rom(f[..., 1])
    vx, vdx = (v @ wx[..., None])[..., 0], (v @ dwx[..., None])[..., 0]  # over columns: (B, E, 4)
    d = (vx * wy).sum(-1)
    return d, (vdx * wy).sum(-1), (vx * dwy).sum(-1)


def CollisionHinge(  # noqa: N802 (a Cost constructor)
    variable: Variable,
    sdf: Tensor,
    origin: Sequence[float],
    cell: float,
    eps: float,
    index: Tensor | None = None,
    *,
    interp: Interp = "bilinear",
    smooth: float = 0.0,
    weight: float | Tensor | None = None,
    name: str | None = None,
) -> Cost:
    """``r = max(0, eps - d(p))`` per state ``variable[index]`` (default: all), ``p`` the first two
    entries of the state, ``d`` the SDF ``sdf`` (``(H, W)``, ``(B, H, W)``) read by
    :func:`sdf_lookup` (``origin``, ``cell``: the grid's placement; ``interp``: its
    interpolation). ``smooth > 0`` rounds the kink over ``|eps - d| < smooth / 2`` (module
    docstring); the default 0 is the plain hinge.

    The SDF is the aux tensor ``"sdf"`` of shape ``(B|1, E, H, W)`` (a stride-0 view along ``E``:
    no copy); a layer input ``"<name>.sdf"`` replaces it: build it with :func:`expand_sdf`."""
    if variable.space.storage_dim < 2 or variable.space.dof != variable.space.storage_dim:
        raise ValueError(f"CollisionHinge on {variable.name!r}: needs a Vector whose first two "
                         f"entries are a 2D position, got {variable.space}")
    if cell <= 0:
        raise ValueError(f"CollisionHinge: cell must be > 0, got {cell}")
    if smooth < 0:
        raise ValueError(f"CollisionHinge: smooth must be >= 0, got {smooth}")
    if interp not in ("bilinear", "bicubic"):
        raise ValueError(f"CollisionHinge: interp must be 'bilinear' or 'bicubic', got {interp!r}")
    idx = torch.arange(variable.count) if index is None else _as_index(index, "CollisionHinge")
    grid = expand_sdf(sdf, idx.shape[0])
    dof = variable.space.dof

    def hinge(xs: list[Tensor], aux: list[Tensor], jacobians: bool):
        x = xs[0]
        d, grad = sdf_lookup(aux[0][:, 0], x[..., :2], origin, cell, interp)
        r, slope = smoothed_hinge(eps - d, smooth)
        if not jacobians:
            return r[..., None], None
        rest = x.new_zeros(*x.shape[:2], dof - 2)
        J = torch.cat([-grad * slope[..., None], rest], -1)[..., None, :]
        return r[..., None], [J]

    return make_cost(None, [variable], {"sdf": grid}, index=[idx], weight=weight,
                     name=name or f"collision_{variable.name}", analytic=hinge, residual_dim=1)


def smoothed_hinge(u: Tensor, smooth: float) -> tuple[Tensor, Tensor]:
    """``max(0, u)`` with its kink rounded over ``|u| < smooth / 2`` (module docstring), and its
    slope ``dr/du``; ``smooth = 0``: the plain hinge (slope 0 at ``u = 0``)."""
    if smooth <= 0:
        active = (u > 0).to(u.dtype)
        return u * active, active
    half = 0.5 * smooth
    band = (u + half).clamp(0, smooth)  # 0 below the band, smooth above it
    r = torch.where(u >= half, u, band * band / (2 * smooth))
    return r, band / smooth


def expand_sdf(sdf: Tensor, num_factors: int) -> Tensor:
    """``sdf (H, W)`` or ``(B, H, W)`` as the ``(B|1, E, H, W)`` aux tensor of
    :func:`CollisionHinge` (a stride-0 view, no copy)."""
    if sdf.ndim == 2:
        sdf = sdf[None]
    if sdf.ndim != 3 or not sdf.is_floating_point():
        raise ValueError(f"sdf must be a floating-point (H, W) or (B, H, W) grid, got {sdf.dtype} "
                         f"{tuple(sdf.shape)}")
    if min(sdf.shape[-2:]) < 2:
        raise ValueError(f"sdf must be at least 2 x 2 cells, got {tuple(sdf.shape[-2:])}")
    return sdf[:, None].expand(sdf.shape[0], num_factors, *sdf.shape[-2:])
