"""Library costs for planar pushing: a quasi-static motion model and a signed-distance contact.

Both take SE(2) object poses as the optimized variable and the pusher's (probe's) poses as known
auxiliary tensors; Jacobians are analytic, with respect to right perturbations
``x * Exp(rho, theta)``. For a point ``q = R^T (e - t)`` of the world seen in the object's frame
this gives ``dq/drho = -I`` and ``dq/dtheta = -J q``, ``J = [[0, -1], [1, 0]]``.

* :func:`QuasiStaticPushing`: Lynch, Maekawa & Tanie, "Manipulation and active sensing by
  pushing using tactile feedback" (IROS 1992), with an ellipsoidal limit surface, in the form of
  Zhou et al. (arXiv:1705.10664, eqs. 3-7) and Theseus's ``QuasiStaticPushingPlanar``: with the
  object's motion ``V = (v_x, v_y, omega)`` between poses ``o_1, o_2`` (``v = R_2^T (t_2 - t_1)``,
  ``omega`` the angle of ``R_1^T R_2``), the contact point ``p = o_2^-1 e_2`` (the pusher's
  position in the object's frame) and the pusher's motion ``v_p = R_2^T (e_2 - e_1)``:
  ``r = D(p) V - (v_p, 0)``, ``D = [[1, 0, -p_y], [0, 1, p_x], [-p_y, p_x, -c^2]]``. The first
  two rows say the object's material point under the pusher moves with the pusher (sticking); the
  third that the twist is normal to the limit surface ``f_x^2 + f_y^2 + m^2 / c^2`` at the pushing
  wrench (``c = m_max / f_max``). Time steps cancel.
* :func:`PlanarContact`: ``r = sdf(o^-1 e) - radius``: the pusher (a disc of ``radius`` centred
  at ``e``) touches the object's boundary; ``sdf`` is the analytic signed distance of a
  ``rectangle`` (half sides ``a, b``), a ``disc`` (radius ``a``) or an ``ellipse`` (semi-axes
  ``a, b``: the closest point by Newton's method on the polar parameter, so ``|grad sdf| = 1``).
  Each factor carries its own shape (``kind``), so a batch of differently shaped objects is one
  problem.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.cost import Cost, make_cost
from core.costs.pose import _as_index
from core.lie import SE2
from core.variable import Variable

SHAPE_KINDS = ("rectangle", "disc", "ellipse")
_NEWTON_STEPS = 8


def _perp(v: Tensor) -> Tensor:
    """``J v`` = ``(-v_y, v_x)`` for ``v (..., 2)``."""
    return torch.stack((-v[..., 1], v[..., 0]), -1)


def _unrotate(x: Tensor, v: Tensor) -> Tensor:
    """``R^T v`` for SE(2) ``x (..., 4)`` and ``v (..., 2)``."""
    c, s = x[..., 2], x[..., 3]
    return torch.stack((c * v[..., 0] + s * v[..., 1], -s * v[..., 0] + c * v[..., 1]), -1)


def _aux(t: Tensor | float, num: int, shape: tuple[int, ...], what: str) -> Tensor:
    """``(shape)``, ``(E, shape)`` or ``(B, E, shape)`` -> ``(B|1, E, shape)``."""
    t = torch.as_tensor(t, dtype=torch.get_default_dtype()) if not isinstance(t, Tensor) else t
    k = len(shape)
    if t.ndim == k:
        t = t.expand(num, *shape)
    if t.ndim == k + 1:
        t = t[None]
    if t.ndim != k + 2 or tuple(t.shape[1:]) != (num, *shape):
        raise ValueError(f"{what} must be {shape}, (E, ...) or (B, E, ...) with E = {num}, "
                         f"got {tuple(t.shape)}")
    return t


def pushing_residual(o1: Tensor, o2: Tensor, e1: Tensor, e2: Tensor, c_square: Tensor,
                     jacobians: bool) -> tuple[Tensor, list[Tensor] | None]:
    """The quasi-static residual ``(..., 3)`` (module docstring) for object poses ``o1, o2`` and
    pusher poses ``e1, e2 (..., 4)``, ``c_square (..., 1)``; Jacobians ``(..., 3, 3)`` with
    respect to ``o1`` and ``o2``."""
    v = _unrotate(o2, o2[..., :2] - o1[..., :2])
    omega = torch.atan2(o1[..., 2] * o2[..., 3] - o1[..., 3] * o2[..., 2],
                        o1[..., 2] * o2[..., 2] + o1[..., 3] * o2[..., 3])
    p = _unrotate(o2, e2[..., :2] - o2[..., :2])
    vp = _unrotate(o2, e2[..., :2] - e1[..., :2])
    c2 = c_square[..., 0].expand_as(p[..., 0])
    px, py, vx, vy = p[..., 0], p[..., 1], v[..., 0], v[..., 1]
    r = torch.stack((vx - py * omega - vp[..., 0], vy + px * omega - vp[..., 1],
                     -py * vx + px * vy - c2 * omega), -1)
    if not jacobians:
        return r, None
    o, one = torch.zeros_like(px), torch.ones_like(px)
    D = torch.stack((one, o, -py, o, one, px, -py, px, -c2), -1).unflatten(-1, (3, 3))
    # dV/do1: v depends on t1 through -R2^T R1 rho1; omega on theta1 with slope -1
    c12 = o1[..., 2] * o2[..., 2] + o1[..., 3] * o2[..., 3]  # R2^T R1 = rot(theta1 - theta2)
    s12 = o1[..., 3] * o2[..., 2] - o1[..., 2] * o2[..., 3]
    dV1 = torch.stack((-c12, s12, o, -s12, -c12, o, o, o, -one), -1).unflatten(-1, (3, 3))
    # dV/do2: v + rho2 - theta2 J v; omega + theta2
    dV2 = torch.stack((one, o, vy, o, one, -vx, o, o, one), -1).unflatten(-1, (3, 3))
    # dr/dp (3, 2) times dp/do2 = [-I, -J p] and dr/dvp (3, 2) times dvp/do2 = [0, -J vp]
    dr_dp = torch.stack((o, -omega, omega, o, vy, -vx), -1).unflatten(-1, (3, 2))
    dp = torch.stack((-one, o, py, o, -one, -px), -1).unflatten(-1, (2, 3))
    dvp = torch.stack((o, o, vp[..., 1], o, o, -vp[..., 0]), -1).unflatten(-1, (2, 3))
    J2 = D @ dV2 + dr_dp @ dp
    J2[..., :2, :] -= dvp
    return r, [D @ dV1, J2]


def QuasiStaticPushing(  # noqa: N802 (a Cost constructor)
    obj: Variable,
    i: Tensor,
    j: Tensor,
    pusher_i: Tensor,
    pusher_j: Tensor,
    c_square: float | Tensor,
    *,
    weight: float | Tensor | None = None,
    name: str | None = None,
) -> Cost:
    """Quasi-static pushing factors between ``obj[i]`` and ``obj[j]`` (module docstring).

    ``pusher_i, pusher_j``: the pusher's SE(2) poses at the two times, ``(4,)``, ``(E, 4)`` or
    ``(B, E, 4)``; ``c_square``: ``c^2`` (a float, ``(E, 1)`` or ``(B, E, 1)``, m^2).
    Inputs ``"<name>.pusher_i"``, ``"<name>.pusher_j"``, ``"<name>.c_square"``."""
    if obj.space != SE2:
        raise ValueError(f"QuasiStaticPushing: {obj.name!r} must be SE2, got {obj.space}")
    i, j = _as_index(i, "QuasiStaticPushing i"), _as_index(j, "QuasiStaticPushing j")
    num = i.shape[0]
    aux = {"pusher_i": _aux(pusher_i, num, (4,), "QuasiStaticPushing pusher_i"),
           "pusher_j": _aux(pusher_j, num, (4,), "QuasiStaticPushing pusher_j")}
    c2 = c_square if isinstance(c_square, Tensor) else torch.tensor([float(c_square)])
    aux["c_square"] = _aux(c2.to(aux["pusher_i"].dtype), num, (1,), "QuasiStaticPushing c_square")

    def pushing(xs: list[Tensor], a: list[Tensor], jac: bool):
        return pushing_residual(xs[0], xs[1], a[0], a[1], a[2], jac)

    return make_cost(None, [obj, obj], aux, index=[i, j], weight=weight,
                     name=name or f"pushing_{obj.name}", analytic=pushing, residual_dim=3,
                     aux_spaces={"pusher_i": SE2, "pusher_j": SE2})


def shape_code(kind: str) -> int:
    """The code of a shape kind in :func:`PlanarContact`'s ``shape`` tensor."""
    if kind not in SHAPE_KINDS:
        raise ValueError(f"unknown shape {kind!r}; the shapes are {', '.join(SHAPE_KINDS)}")
    return SHAPE_KINDS.index(kind)


def _sign(x: Tensor) -> Tensor:
    return torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))


def _rectangle_sdf(q: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
    """Signed distance ``(...,)`` and gradient ``(..., 2)`` of the rectangle ``|x| <= a,
    |y| <= b`` at ``q (..., 2)``."""
    d = q.abs() - ab
    out = d.clamp_min(0)
    norm = out.norm(dim=-1)
    inside = d.max(-1).values.clamp_max(0)
    g_out = out / norm.clamp_min(1e-12)[..., None]
    x_wins = (d[..., 0] >= d[..., 1])[..., None]
    g_in = torch.where(x_wins, torch.ones_like(q) * q.new_tensor([1.0, 0.0]),
                       torch.ones_like(q) * q.new_tensor([0.0, 1.0]))
    g = torch.where((norm > 0)[..., None], g_out, g_in) * _sign(q)
    return norm + inside, g


def _ellipse_sdf(q: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
    """Signed distance and gradient (the outward normal at the closest point) of the ellipse
    with semi-axes ``ab (..., 2)`` at ``q (..., 2)``: Newton on the polar parameter ``t`` of the
    closest point ``(a cos t, b sin t)`` in the first quadrant, from the polar guess and three
    other starts (inside, the distance has several critical points), the nearest kept."""
    a, b = ab[..., 0, None], ab[..., 1, None]
    x, y = q[..., 0, None].abs(), q[..., 1, None].abs()
    starts = torch.tensor([0.0, 0.6, 1.0], dtype=q.dtype, device=q.device) * torch.pi / 2
    t = torch.cat((torch.atan2(a * y, b * x), starts.expand(*x.shape[:-1], 3)), -1)
    for _ in range(_NEWTON_STEPS):
        c, s = torch.cos(t), torch.sin(t)
        f = (a * c - x) * (-a * s) + (b * s - y) * (b * c)
        df = (a * s) ** 2 + (b * c) ** 2 - (a * c - x) * a * c - (b * s - y) * b * s
        df = torch.where(df > 1e-12, df, (a * s) ** 2 + (b * c) ** 2)  # descend at maxima
        t = (t - f / df).clamp(0, torch.pi / 2)
    c, s = torch.cos(t), torch.sin(t)
    dist, k = torch.stack((x - a * c, y - b * s), -1).norm(dim=-1).min(-1, keepdim=True)
    c, s, a, b = c.gather(-1, k)[..., 0], s.gather(-1, k)[..., 0], a[..., 0], b[..., 0]
    inside = (x[..., 0] / a) ** 2 + (y[..., 0] / b) ** 2 < 1
    n = torch.stack((b * c, a * s), -1)
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = dist[..., 0]
    return torch.where(inside, -dist, dist), n * _sign(q)


def planar_sdf(q: Tensor, shape: Tensor) -> tuple[Tensor, Tensor]:
    """Signed distance ``(...,)`` and its gradient ``(..., 2)`` at points ``q (..., 2)`` of the
    shapes ``shape (..., 3)`` = (code (:func:`shape_code`), a, b), in the shape's frame."""
    code, ab = shape[..., 0], shape[..., 1:]
    d_rect, g_rect = _rectangle_sdf(q, ab)
    norm = q.norm(dim=-1)
    d_disc = norm - ab[..., 0]
    g_disc = q / norm.clamp_min(1e-12)[..., None]
    d_ell, g_ell = _ellipse_sdf(q, ab)
    d = torch.where(code == 0, d_rect, torch.where(code == 1, d_disc, d_ell))
    g = torch.where((code == 0)[..., None], g_rect,
                    torch.where((code == 1)[..., None], g_disc, g_ell))
    return d, g


def PlanarContact(  # noqa: N802 (a Cost constructor)
    obj: Variable,
    index: Tensor,
    pusher: Tensor,
    shape: Tensor,
    radius: float,
    *,
    weight: float | Tensor | None = None,
    name: str | None = None,
) -> Cost:
    """``r = sdf(obj[index]^-1 e) - radius`` per factor (module docstring): the pusher, a disc of
    ``radius`` at ``e`` = the translation of ``pusher`` (``(4,)``, ``(E, 4)`` or ``(B, E, 4)``),
    touches the object. ``shape``: ``(3,)``, ``(E, 3)`` or ``(B, E, 3)``, (code, a, b) with code
    from :func:`shape_code`. Inputs ``"<name>.pusher"``, ``"<name>.shape"``."""
    if obj.space != SE2:
        raise ValueError(f"PlanarContact: {obj.name!r} must be SE2, got {obj.space}")
    index = _as_index(index, "PlanarContact index")
    num = index.shape[0]
    pusher = _aux(pusher, num, (4,), "PlanarContact pusher")
    shape = _aux(shape, num, (3,), "PlanarContact shape").to(pusher.dtype)
    codes = shape[..., 0]
    if bool(((codes != 0) & (codes != 1) & (codes != 2)).any()):
        raise ValueError(f"PlanarContact: shape codes must be 0 (rectangle), 1 (disc) or 2 "
                         f"(ellipse), got {sorted(set(codes.flatten().tolist()))}")

    def contact(xs: list[Tensor], a: list[Tensor], jac: bool):
        x = xs[0]
        q = _unrotate(x, a[0][..., :2] - x[..., :2])
        d, g = planar_sdf(q, a[1].expand(*q.shape[:-1], 3))
        r = (d - radius)[..., None]
        if not jac:
            return r, None
        dq_dtheta = -_perp(q)  # dq/d(rho, theta) = [-I, -J q]
        J = torch.stack((-g[..., 0], -g[..., 1], (g * dq_dtheta).sum(-1)), -1)[..., None, :]
        return r, [J]

    return make_cost(None, [obj], {"pusher": pusher, "shape": shape}, index=[index],
                     weight=weight, name=name or f"contact_{obj.name}", analytic=contact,
                     residual_dim=1, aux_spaces={"pusher": SE2})
