"""Compiled (Numba) CPU kernels: fused linearization of the library's pose and reprojection costs.

One kernel per cost type evaluates, for every batch element ``b`` and factor ``e``, the residual,
its Jacobian blocks, the weighting ``W = w U``, the robust loss's IRLS weight and the products
``J^T J`` / ``J^T r``, and adds them straight into the normal equations' values ``H (B, nnz)``,
``g (B, n)`` and the cost ``(B, P)`` (``P`` problems of a ragged batch, factor ``e``'s problem
``grp[e]``; ``P = 1`` and ``grp`` empty otherwise). Every formula is the torch reference's
(``core.lie``, ``core.costs``, ``core.loss``), written out per element with the same Taylor
series, thresholds and branch choices, so the two paths agree to rounding
(``tests/core/test_kernels.py`` holds them equal to 1e-12). ``core.fused`` decides when a kernel
is used; nothing here is differentiable.

Array conventions (all C-contiguous): values ``(B, F, S)`` float64; indices ``(E,)`` int64;
measurements ``(B|1, E, S)``; ``U (B|1, E|1, d, d)`` (``has_u`` False: identity) and ``w (B|1,
E|1, d|1)``; ``top (E, k, D)``, ``rowmap (2, D)`` (``Pattern.tops``: entry ``(p, q)`` of factor
``e``'s block goes to ``top[e, rowmap[0, p], q] + rowmap[1, p]``) and ``col (E, D)`` int64 from
``Objective.pattern``; ``kind``
the robust loss's code (``LOSSES``, 0: none) and ``scale (B|1, E|1)`` its scale.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from core.lie import _util

log = logging.getLogger(__name__)

try:  # the compiled path is optional at run time: without Numba every cost takes the torch path
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; kept usable without it
    numba = None

AVAILABLE = numba is not None and os.environ.get("ARIADNE_KERNELS", "1") != "0"


def _jit(fn: Callable[..., Any]) -> Any:
    """``numba.njit`` with the compiled code cached on disk; without a usable cache location
    (read-only install, unwritable ``NUMBA_CACHE_DIR``) the functions compile in memory."""
    if numba is None:  # pragma: no cover
        return fn
    try:
        return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        log.info("Numba cache unavailable for %s (%s): compiling in memory", fn.__name__, exc)
        return numba.njit(cache=False, nogil=True, error_model="numpy")(fn)


def _inline(fn: Callable[..., Any]) -> Any:
    """``numba.njit`` inlined into each compiled caller (Numba IR): the caller's literal array
    sizes become the helper's loop bounds (unrolled), and its arrays pass without a call. Only
    for the hot helpers of a few kernels: each call site compiles the helper again."""
    if numba is None:  # pragma: no cover
        return fn
    return numba.njit(nogil=True, error_model="numpy", inline="always")(fn)


# Taylor coefficients (powers of theta^2) and thresholds, the torch path's own
_F64 = np.float64
SIN_OVER_T = np.array(_util.SIN_OVER_T, _F64)
ONE_MINUS_COS_OVER_T2 = np.array(_util.ONE_MINUS_COS_OVER_T2, _F64)
T_MINUS_SIN_OVER_T3 = np.array(_util.T_MINUS_SIN_OVER_T3, _F64)
COS_TERM_OVER_T4 = np.array(_util.COS_TERM_OVER_T4, _F64)
SE3_Q_LAST = np.array(_util.SE3_Q_LAST, _F64)
JL_INV_COEFF = np.array(_util.JL_INV_COEFF, _F64)
HALF_T_COT_HALF_T = np.array(_util.HALF_T_COT_HALF_T, _F64)
ATAN_OVER_X = np.array(_util.ATAN_OVER_X, _F64)
SIN_HALF_OVER_T = np.array(_util.SIN_HALF_OVER_T, _F64)
COS_HALF = np.array(_util.COS_HALF, _F64)
SMALL2 = 0.5 * 0.5  # small_angle_threshold(float64) ** 2
LOG_SMALL2 = 0.1 * 0.1  # so3._log_threshold(float64) ** 2


@_jit
def _horner(c: np.ndarray, x: float) -> float:
    acc = c[c.shape[0] - 1]
    for k in range(c.shape[0] - 2, -1, -1):
        acc = c[k] + acc * x
    return acc


@_jit
def _qmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """Hamilton product of ``(x, y, z, w)`` quaternions ``a[0:4] * b[0:4]`` into ``out``."""
    x1, y1, z1, w1 = a[0], a[1], a[2], a[3]
    x2, y2, z2, w2 = b[0], b[1], b[2], b[3]
    out[0] = w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2
    out[1] = w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2
    out[2] = w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2
    out[3] = w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2


@_jit
def _rotate(q: np.ndarray, p: np.ndarray, out: np.ndarray) -> None:
    """``R(q) p`` as ``so3._rotate``: ``u = 2 v x p``, ``p + w u + v x u``."""
    vx, vy, vz, w = q[0], q[1], q[2], q[3]
    ux = 2 * (vy * p[2] - vz * p[1])
    uy = 2 * (vz * p[0] - vx * p[2])
    uz = 2 * (vx * p[1] - vy * p[0])
    out[0] = p[0] + w * ux + (vy * uz - vz * uy)
    out[1] = p[1] + w * uy + (vz * ux - vx * uz)
    out[2] = p[2] + w * uz + (vx * uy - vy * ux)


@_jit
def _se3_inverse(x: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """``x^-1 = (-R^T t, q^-1)`` for storage ``(t, q)``; ``tmp`` holds 3 scratch values."""
    out[3], out[4], out[5], out[6] = -x[3], -x[4], -x[5], x[6]
    _rotate(out[3:7], x[0:3], tmp)
    out[0], out[1], out[2] = -tmp[0], -tmp[1], -tmp[2]


@_jit
def _se3_compose(x: np.ndarray, y: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """``x * y = (t1 + R1 t2, q1 q2)`` into ``out`` (which must not alias ``x`` or ``y``)."""
    _rotate(x[3:7], y[0:3], tmp)
    out[0], out[1], out[2] = x[0] + tmp[0], x[1] + tmp[1], x[2] + tmp[2]
    _qmul(x[3:7], y[3:7], out[3:7])


@_jit
def _jl_inv_coeff(theta2: float) -> float:
    """``1 / t^2 - cos(t / 2) / (2 t sin(t / 2))`` (``so3._inv_coeff``)."""
    if theta2 < SMALL2:
        return _horner(JL_INV_COEFF, theta2)
    t = math.sqrt(theta2)
    return 1 / t**2 - math.cos(t / 2) / (2 * t * math.sin(t / 2))


@_jit
def _se3_log(x: np.ndarray, out: np.ndarray) -> None:
    """``se3.log``: ``phi = so3.log(q)``, ``rho = Jl(phi)^-1 t``; ``(7,) -> out (6,)``."""
    sign = -1.0 if x[6] < 0 else 1.0
    vx, vy, vz, w = sign * x[3], sign * x[4], sign * x[5], sign * x[6]
    s2 = vx * vx + vy * vy + vz * vz
    if s2 < LOG_SMALL2:
        k = 2 / w * _horner(ATAN_OVER_X, s2 / (w * w))
    else:
        s = math.sqrt(s2)
        k = 2 * math.atan2(s, w) / s
    px, py, pz = k * vx, k * vy, k * vz
    d = _jl_inv_coeff(px * px + py * py + pz * pz)
    tx, ty, tz = x[0], x[1], x[2]
    ax, ay, az = py * tz - pz * ty, pz * tx - px * tz, px * ty - py * tx  # phi x t
    bx, by, bz = py * az - pz * ay, pz * ax - px * az, px * ay - py * ax  # phi x (phi x t)
    out[0] = tx - 0.5 * ax + d * bx
    out[1] = ty - 0.5 * ay + d * by
    out[2] = tz - 0.5 * az + d * bz
    out[3], out[4], out[5] = px, py, pz


@_jit
def _skew(v0: float, v1: float, v2: float, out: np.ndarray) -> None:
    out[0, 0], out[0, 1], out[0, 2] = 0.0, -v2, v1
    out[1, 0], out[1, 1], out[1, 2] = v2, 0.0, -v0
    out[2, 0], out[2, 1], out[2, 2] = -v1, v0, 0.0


@_jit
def _se3_jr_inv(r: np.ndarray, out: np.ndarray, s: np.ndarray) -> None:
    """``se3.jr_inv(r) = jl_inv(-r) = [[j, -j Q j], [0, j]]``, ``j = so3.jl_inv(-phi)`` and
    ``Q = se3._q_block(-r)`` (Barfoot eq. 7.86 with outer products); ``out (6, 6)``;
    ``s (4, 3, 3)`` scratch."""
    rho0, rho1, rho2 = -r[0], -r[1], -r[2]
    ph0, ph1, ph2 = -r[3], -r[4], -r[5]
    theta2 = ph0 * ph0 + ph1 * ph1 + ph2 * ph2
    j, K, Q, T = s[0], s[1], s[2], s[3]
    _skew(ph0, ph1, ph2, K)
    d = _jl_inv_coeff(theta2)
    for a in range(3):
        for b in range(3):
            kk = K[a, 0] * K[0, b] + K[a, 1] * K[1, b] + K[a, 2] * K[2, b]
            j[a, b] = (1.0 if a == b else 0.0) - 0.5 * K[a, b] + d * kk
    if theta2 < SMALL2:
        ca = _horner(T_MINUS_SIN_OVER_T3, theta2)
        ce = _horner(COS_TERM_OVER_T4, theta2)
        cc = _horner(SE3_Q_LAST, theta2)
    else:
        t = math.sqrt(theta2)
        ca = (t - math.sin(t)) / t**3
        ce = (t * t / 2 + math.cos(t) - 1) / t**4
        cc = (2 * t - 3 * math.sin(t) + t * math.cos(t)) / (2 * t**5)
    dd = ph0 * rho0 + ph1 * rho1 + ph2 * rho2
    u0 = ph1 * rho2 - ph2 * rho1
    u1 = ph2 * rho0 - ph0 * rho2
    u2 = ph0 * rho1 - ph1 * rho0
    rho = (rho0, rho1, rho2)
    phi = (ph0, ph1, ph2)
    u = (u0, u1, u2)
    _skew(rho0, rho1, rho2, T)  # P
    for a in range(3):
        for b in range(3):
            eye = 1.0 if a == b else 0.0
            first = rho[a] * phi[b] + phi[a] * rho[b] - dd * K[a, b] - 2 * dd * eye
            second = u[a] * phi[b] - phi[a] * u[b] + dd * K[a, b]
            third = -2 * dd * (phi[a] * phi[b] - theta2 * eye)
            Q[a, b] = 0.5 * T[a, b] + ca * first + ce * second + cc * third
    # T = Q j, then the top-right block -j (Q j)
    for a in range(3):
        for b in range(3):
            T[a, b] = Q[a, 0] * j[0, b] + Q[a, 1] * j[1, b] + Q[a, 2] * j[2, b]
    for a in range(3):
        for b in range(3):
            out[a, b] = j[a, b]
            out[a + 3, b + 3] = j[a, b]
            out[a + 3, b] = 0.0
            out[a, b + 3] = -(j[a, 0] * T[0, b] + j[a, 1] * T[1, b] + j[a, 2] * T[2, b])


@_jit
def _quat_to_matrix(q: np.ndarray, R: np.ndarray) -> None:
    x, y, z, w = q[0], q[1], q[2], q[3]
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz, wx, wy, wz = x * y, x * z, y * z, w * x, w * y, w * z
    R[0, 0], R[0, 1], R[0, 2] = 1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy)
    R[1, 0], R[1, 1], R[1, 2] = 2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx)
    R[2, 0], R[2, 1], R[2, 2] = 2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy)


@_jit
def _se3_adjoint(x: np.ndarray, out: np.ndarray, s: np.ndarray) -> None:
    """``[[R, t^ R], [0, R]]`` into ``out (6, 6)``; ``s (2, 3, 3)`` scratch."""
    R, P = s[0], s[1]
    _quat_to_matrix(x[3:7], R)
    _skew(x[0], x[1], x[2], P)
    for a in range(3):
        for b in range(3):
            out[a, b] = R[a, b]
            out[a + 3, b + 3] = R[a, b]
            out[a + 3, b] = 0.0
            out[a, b + 3] = P[a, 0] * R[0, b] + P[a, 1] * R[1, b] + P[a, 2] * R[2, b]


LOSSES = {"huber": 1, "cauchy": 2, "welsch": 3, "geman_mcclure": 4}
"""The robust-loss kinds of ``core.loss`` by the code the kernels take (0: no loss)."""


@_jit
def _robust(kind: int, s: float, c: float) -> tuple[float, float]:
    """``rho(s), rho'(s)`` of loss ``kind`` (``LOSSES``) with scale ``c``: ``RobustLoss.__call__``
    per element, the same formulas and branch."""
    c2 = c * c
    if kind == 1:  # huber
        if s <= c2:
            return s, 1.0
        root = math.sqrt(s)
        return 2 * c * root - c2, c / root
    if kind == 2:  # cauchy
        return c2 * math.log1p(s / c2), 1 / (1 + s / c2)
    if kind == 3:  # welsch
        return -c2 * math.expm1(-s / c2), math.exp(-s / c2)
    t = c2 / (s + c2)  # geman_mcclure
    return s * c2 / (s + c2), t * t


@_inline
def _scatter_block(b: int, e: int, M: np.ndarray, top: np.ndarray, rowmap: np.ndarray,
                   H: np.ndarray) -> None:
    """Add factor ``e``'s ``J^T J`` block ``M (D, D)`` into ``H[b]`` at its positions (the block
    form ``top``, ``rowmap`` of ``Pattern.tops``), column by column."""
    for p in range(M.shape[0]):
        s, wp = rowmap[0, p], rowmap[1, p]
        for q in range(M.shape[0]):
            H[b, top[e, s, q] + wp] += M[p, q]


@_inline
def _accumulate(
    b: int, e: int, r: np.ndarray, J: np.ndarray, U: np.ndarray, has_u: bool, w: np.ndarray,
    top: np.ndarray, rowmap: np.ndarray, col: np.ndarray, H: np.ndarray, g: np.ndarray,
    cost: np.ndarray, kind: int, scale: np.ndarray, grp: np.ndarray, rw: np.ndarray,
    Jw: np.ndarray, M: np.ndarray,
) -> None:
    """Weigh ``r (d,)`` and ``J (d, D)`` by ``w (U r)`` and the robust loss ``kind`` (``LOSSES``;
    0: none) of scale ``scale (B|1, E|1)`` as ``cost._weigh`` does (IRLS: both times
    ``sqrt(rho'(s))``, ``s = |w U r|^2``), and add factor ``e``'s ``J^T J``, ``J^T r`` into batch
    element ``b`` and ``0.5 rho(s)`` into ``cost[b, grp[e]]`` (``grp`` empty: ``cost[b, 0]``;
    ``cost (B, P)``: per problem of a ragged batch); ``rw, Jw``, ``M (D, D)`` scratch. Inlined
    into each kernel (``_inline``), where ``d, D`` are the literal sizes of its scratch arrays."""
    d, D = J.shape
    ub = U[b if U.shape[0] > 1 else 0, e if U.shape[1] > 1 else 0]
    wb = w[b if w.shape[0] > 1 else 0, e if w.shape[1] > 1 else 0]
    for k in range(d):
        wk = wb[k if wb.shape[0] > 1 else 0]
        if has_u:
            acc = 0.0
            for m in range(d):
                acc += ub[k, m] * r[m]
            rw[k] = wk * acc
            for q in range(D):
                acc = 0.0
                for m in range(d):
                    acc += ub[k, m] * J[m, q]
                Jw[k, q] = wk * acc
        else:
            rw[k] = wk * r[k]
            for q in range(D):
                Jw[k, q] = wk * J[k, q]
    s = 0.0
    for k in range(d):
        s += rw[k] * rw[k]
    prob = grp[e] if grp.shape[0] > 0 else 0
    if kind == 0:
        cost[b, prob] += 0.5 * s
    else:
        c = scale[b if scale.shape[0] > 1 else 0, e if scale.shape[1] > 1 else 0]
        rho, drho = _robust(kind, s, c)
        cost[b, prob] += 0.5 * rho
        root = math.sqrt(drho)
        for k in range(d):
            rw[k] *= root
            for q in range(D):
                Jw[k, q] *= root
    for p in range(D):
        acc = 0.0
        for k in range(d):
            acc += Jw[k, p] * rw[k]
        g[b, col[e, p]] += acc
        for q in range(p, D):
            acc = 0.0
            for k in range(d):
                acc += Jw[k, p] * Jw[k, q]
            M[p, q] = acc
            M[q, p] = acc
    _scatter_block(b, e, M, top, rowmap, H)


@_jit
def _weigh6(
    b: int, e: int, r: np.ndarray, J: np.ndarray, U: np.ndarray, has_u: bool, w: np.ndarray,
    cost: np.ndarray, kind: int, scale: np.ndarray, grp: np.ndarray, rw: np.ndarray,
    A: np.ndarray,
) -> None:
    """``_accumulate``'s weighting for a 6-dim residual: ``rw = c w (U r)``, ``A = c w (U J)``
    (``r (6,)``, ``J, A (6, 6)``, ``c = sqrt(rho'(s))``, ``s = |w U r|^2``) and ``0.5 rho(s)``
    into ``cost[b, grp[e]]``. ``J`` is an SE3 ``Jr^-1`` (``_se3_jr_inv``): its lower-left 3x3
    block is zero and skipped. The sizes are literals and each row of ``U`` is held in locals,
    so the products unroll (each sum in the order of ``_accumulate``'s loops)."""
    bu, eu = b if U.shape[0] > 1 else 0, e if U.shape[1] > 1 else 0  # no views: indices only
    bw, ew, per = b if w.shape[0] > 1 else 0, e if w.shape[1] > 1 else 0, w.shape[2] > 1
    for k in range(6):
        wk = w[bw, ew, k if per else 0]
        if has_u:
            u0, u1, u2 = U[bu, eu, k, 0], U[bu, eu, k, 1], U[bu, eu, k, 2]
            u3, u4, u5 = U[bu, eu, k, 3], U[bu, eu, k, 4], U[bu, eu, k, 5]
            rw[k] = wk * (u0 * r[0] + u1 * r[1] + u2 * r[2] + u3 * r[3] + u4 * r[4] + u5 * r[5])
            for q in range(3):  # J[3:, :3] = 0 (Jr^-1's lower-left block)
                A[k, q] = wk * (u0 * J[0, q] + u1 * J[1, q] + u2 * J[2, q])
            for q in range(3, 6):
                A[k, q] = wk * (u0 * J[0, q] + u1 * J[1, q] + u2 * J[2, q] + u3 * J[3, q]
                                + u4 * J[4, q] + u5 * J[5, q])
        else:
            rw[k] = wk * r[k]
            for q in range(6):
                A[k, q] = wk * J[k, q]
    s = 0.0
    for k in range(6):
        s += rw[k] * rw[k]
    prob = grp[e] if grp.shape[0] > 0 else 0
    if kind == 0:
        cost[b, prob] += 0.5 * s
        return
    c = scale[b if scale.shape[0] > 1 else 0, e if scale.shape[1] > 1 else 0]
    rho, drho = _robust(kind, s, c)
    cost[b, prob] += 0.5 * rho
    root = math.sqrt(drho)
    for k in range(6):
        rw[k] *= root
        for q in range(6):
            A[k, q] *= root


@_inline
def _normal6(
    b: int, e: int, rw: np.ndarray, JT: np.ndarray, top: np.ndarray, rowmap: np.ndarray,
    col: np.ndarray, H: np.ndarray, g: np.ndarray, M: np.ndarray,
) -> None:
    """``_accumulate``'s sums for a 6-dim residual from the weighted Jacobian's transpose ``JT
    (D, 6)`` (rows contiguous): ``JT rw`` into ``g[b, col[e]]``, ``M = JT JT^T`` (upper triangle,
    mirrored; ``M (D, D)`` scratch) into ``H[b]`` at the block's positions, column by column."""
    D = JT.shape[0]
    r0, r1, r2, r3, r4, r5 = rw[0], rw[1], rw[2], rw[3], rw[4], rw[5]
    for p in range(D):  # (indices into H, g, top, col: no views made per factor)
        a0, a1, a2, a3, a4, a5 = JT[p, 0], JT[p, 1], JT[p, 2], JT[p, 3], JT[p, 4], JT[p, 5]
        g[b, col[e, p]] += a0 * r0 + a1 * r1 + a2 * r2 + a3 * r3 + a4 * r4 + a5 * r5
        for q in range(p, D):
            acc = (a0 * JT[q, 0] + a1 * JT[q, 1] + a2 * JT[q, 2] + a3 * JT[q, 3] + a4 * JT[q, 4]
                   + a5 * JT[q, 5])
            M[p, q] = acc
            M[q, p] = acc
    _scatter_block(b, e, M, top, rowmap, H)


@_jit
def se3_between(
    Xi: np.ndarray, Xj: np.ndarray, ii: np.ndarray, jj: np.ndarray, Z: np.ndarray,
    U: np.ndarray, has_u: bool, w: np.ndarray, top: np.ndarray, rowmap: np.ndarray, col: np.ndarray,
    H: np.ndarray, g: np.ndarray, cost: np.ndarray, kind: int, scale: np.ndarray,
    grp: np.ndarray,
) -> None:
    """``r = Log(z^-1 x_i^-1 x_j)``, ``J_j = Jr^-1(r)``, ``J_i = -J_j Ad(x_j^-1 x_i)``
    (``core.costs.pose.Between`` on SE3). Weighted as ``A = c w U J_j`` first (``_weigh6``),
    then ``c w U J_i = -A Ad``: half the products of weighing ``J = [J_i, J_j]`` as a whole
    (equal up to rounding: the torch path forms ``U (J_j Ad)``)."""
    B, E = Xi.shape[0], ii.shape[0]
    a7, b7, c7, m7 = np.empty(7), np.empty(7), np.empty(7), np.empty(7)
    tmp, r = np.empty(3), np.empty(6)
    Jj, Ad, A = np.empty((6, 6)), np.empty((6, 6)), np.empty((6, 6))
    s33 = np.empty((4, 3, 3))
    rw, JT, M = np.empty(6), np.empty((12, 6)), np.empty((12, 12))
    for bb in range(B):
        zb = Z[bb if Z.shape[0] > 1 else 0]
        for e in range(E):
            xi, xj, z = Xi[bb, ii[e]], Xj[bb, jj[e]], zb[e]
            _se3_inverse(xi, a7, tmp)
            _se3_compose(a7, xj, b7, tmp)  # xi^-1 xj
            _se3_inverse(z, a7, tmp)
            _se3_compose(a7, b7, m7, tmp)  # z^-1 xi^-1 xj
            _se3_log(m7, r)
            _se3_jr_inv(r, Jj, s33)
            _se3_inverse(xj, a7, tmp)
            _se3_compose(a7, xi, c7, tmp)  # xj^-1 xi
            _se3_adjoint(c7, Ad, s33)
            _weigh6(bb, e, r, Jj, U, has_u, w, cost, kind, scale, grp, rw, A)
            for k in range(6):  # JT = [-A Ad, A]^T
                a0, a1, a2, a3, a4, a5 = A[k, 0], A[k, 1], A[k, 2], A[k, 3], A[k, 4], A[k, 5]
                for q in range(3):  # Ad[3:, :3] = 0
                    JT[q, k] = -(a0 * Ad[0, q] + a1 * Ad[1, q] + a2 * Ad[2, q])
                for q in range(3, 6):
                    JT[q, k] = -(a0 * Ad[0, q] + a1 * Ad[1, q] + a2 * Ad[2, q] + a3 * Ad[3, q]
                                 + a4 * Ad[4, q] + a5 * Ad[5, q])
                for q in range(6):
                    JT[q + 6, k] = A[k, q]
            _normal6(bb, e, rw, JT, top, rowmap, col, H, g, M)


@_jit
def se3_prior(
    X: np.ndarray, ii: np.ndarray, Z: np.ndarray, U: np.ndarray, has_u: bool, w: np.ndarray,
    top: np.ndarray, rowmap: np.ndarray, col: np.ndarray, H: np.ndarray, g: np.ndarray,
    cost: np.ndarray,
    kind: int, scale: np.ndarray, grp: np.ndarray,
) -> None:
    """``r = Log(z^-1 x)``, ``J = Jr^-1(r)`` (``core.costs.pose.Prior`` on SE3)."""
    B, E = X.shape[0], ii.shape[0]
    a7, m7, tmp, r = np.empty(7), np.empty(7), np.empty(3), np.empty(6)
    J, A, s33 = np.empty((6, 6)), np.empty((6, 6)), np.empty((4, 3, 3))
    rw, JT, M = np.empty(6), np.empty((6, 6)), np.empty((6, 6))
    for bb in range(B):
        zb = Z[bb if Z.shape[0] > 1 else 0]
        for e in range(E):
            _se3_inverse(zb[e], a7, tmp)
            _se3_compose(a7, X[bb, ii[e]], m7, tmp)
            _se3_log(m7, r)
            _se3_jr_inv(r, J, s33)
            _weigh6(bb, e, r, J, U, has_u, w, cost, kind, scale, grp, rw, A)
            for k in range(6):
                for q in range(6):
                    JT[q, k] = A[k, q]
            _normal6(bb, e, rw, JT, top, rowmap, col, H, g, M)


@_jit
def _se2_coeffs(theta: float) -> tuple[float, float, float]:
    """``(sin t / t, (1 - cos t) / t^2, (t - sin t) / t^3)`` (``se2._coeffs``)."""
    theta2 = theta * theta
    if theta2 < SMALL2:
        return (_horner(SIN_OVER_T, theta2), _horner(ONE_MINUS_COS_OVER_T2, theta2),
                _horner(T_MINUS_SIN_OVER_T3, theta2))
    t = math.sqrt(theta2)
    return math.sin(t) / t, 2 * (math.sin(t / 2) / t) ** 2, (t - math.sin(t)) / t**3


@_jit
def _half_cot(theta: float) -> float:
    """``(t / 2) cot(t / 2)`` (``se2._half_cot``)."""
    theta2 = theta * theta
    if theta2 < SMALL2:
        return _horner(HALF_T_COT_HALF_T, theta2)
    t = math.sqrt(theta2)
    return 0.5 * t * math.cos(t / 2) / math.sin(t / 2)


@_jit
def _se2_inverse(x: np.ndarray, out: np.ndarray) -> None:
    c, s = x[2], -x[3]
    out[0], out[1] = -(c * x[0] - s * x[1]), -(s * x[0] + c * x[1])
    out[2], out[3] = c, s


@_jit
def _se2_compose(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    c1, s1, c2, s2 = x[2], x[3], y[2], y[3]
    out[0] = x[0] + (c1 * y[0] - s1 * y[1])
    out[1] = x[1] + (s1 * y[0] + c1 * y[1])
    out[2], out[3] = c1 * c2 - s1 * s2, s1 * c2 + c1 * s2


@_jit
def _se2_log(x: np.ndarray, out: np.ndarray) -> None:
    th = math.atan2(x[3], x[2])
    h, half = _half_cot(th), 0.5 * th
    out[0], out[1], out[2] = h * x[0] + half * x[1], -half * x[0] + h * x[1], th


@_jit
def _se2_jr_inv(r: np.ndarray, out: np.ndarray) -> None:
    """``se2.jr_inv``: ``[[h, -t/2, w1], [t/2, h, w2], [0, 0, 1]]``."""
    r1, r2, th = r[0], r[1], r[2]
    _, b, c = _se2_coeffs(th)
    ct = c * th
    v1, v2 = ct * r1 - b * r2, b * r1 + ct * r2
    h, half = _half_cot(th), 0.5 * th
    out[0, 0], out[0, 1], out[0, 2] = h, -half, -(h * v1 - half * v2)
    out[1, 0], out[1, 1], out[1, 2] = half, h, -(half * v1 + h * v2)
    out[2, 0], out[2, 1], out[2, 2] = 0.0, 0.0, 1.0


@_jit
def se2_between(
    Xi: np.ndarray, Xj: np.ndarray, ii: np.ndarray, jj: np.ndarray, Z: np.ndarray,
    U: np.ndarray, has_u: bool, w: np.ndarray, top: np.ndarray, rowmap: np.ndarray, col: np.ndarray,
    H: np.ndarray, g: np.ndarray, cost: np.ndarray, kind: int, scale: np.ndarray,
    grp: np.ndarray,
) -> None:
    """``core.costs.pose.Between`` on SE2; ``Ad(x) = [[R, (y, -x)^T], [0, 1]]``."""
    B, E = Xi.shape[0], ii.shape[0]
    a4, b4, c4, m4, r = np.empty(4), np.empty(4), np.empty(4), np.empty(4), np.empty(3)
    Jj, Ad, J = np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 6))
    rw, Jw = np.empty(3), np.empty((3, 6))
    M = np.empty((6, 6))
    for bb in range(B):
        zb = Z[bb if Z.shape[0] > 1 else 0]
        for e in range(E):
            xi, xj = Xi[bb, ii[e]], Xj[bb, jj[e]]
            _se2_inverse(xi, a4)
            _se2_compose(a4, xj, b4)
            _se2_inverse(zb[e], a4)
            _se2_compose(a4, b4, m4)
            _se2_log(m4, r)
            _se2_jr_inv(r, Jj)
            _se2_inverse(xj, a4)
            _se2_compose(a4, xi, c4)
            c, s = c4[2], c4[3]
            Ad[0, 0], Ad[0, 1], Ad[0, 2] = c, -s, c4[1]
            Ad[1, 0], Ad[1, 1], Ad[1, 2] = s, c, -c4[0]
            Ad[2, 0], Ad[2, 1], Ad[2, 2] = 0.0, 0.0, 1.0
            for p in range(3):
                for q in range(3):
                    J[p, q] = -(Jj[p, 0] * Ad[0, q] + Jj[p, 1] * Ad[1, q] + Jj[p, 2] * Ad[2, q])
                    J[p, q + 3] = Jj[p, q]
            _accumulate(bb, e, r, J, U, has_u, w, top, rowmap, col, H, g, cost, kind, scale,
                        grp, rw, Jw, M)


@_jit
def se2_prior(
    X: np.ndarray, ii: np.ndarray, Z: np.ndarray, U: np.ndarray, has_u: bool, w: np.ndarray,
    top: np.ndarray, rowmap: np.ndarray, col: np.ndarray, H: np.ndarray, g: np.ndarray,
    cost: np.ndarray,
    kind: int, scale: np.ndarray, grp: np.ndarray,
) -> None:
    """``core.costs.pose.Prior`` on SE2."""
    B, E = X.shape[0], ii.shape[0]
    a4, m4, r, J = np.empty(4), np.empty(4), np.empty(3), np.empty((3, 3))
    rw, Jw = np.empty(3), np.empty((3, 3))
    M = np.empty((3, 3))
    for bb in range(B):
        zb = Z[bb if Z.shape[0] > 1 else 0]
        for e in range(E):
            _se2_inverse(zb[e], a4)
            _se2_compose(a4, X[bb, ii[e]], m4)
            _se2_log(m4, r)
            _se2_jr_inv(r, J)
            _accumulate(bb, e, r, J, U, has_u, w, top, rowmap, col, H, g, cost, kind, scale,
                        grp, rw, Jw, M)


@_jit
def bal_reprojection(
    T: np.ndarray, K: np.ndarray, X: np.ndarray, ci: np.ndarray, ki: np.ndarray,
    pi: np.ndarray, obs: np.ndarray, U: np.ndarray, has_u: bool, w: np.ndarray,
    top: np.ndarray, rowmap: np.ndarray, col: np.ndarray, H: np.ndarray, g: np.ndarray,
    cost: np.ndarray,
    kind: int, scale: np.ndarray, grp: np.ndarray,
) -> None:
    """``core.costs.reprojection.Reprojection``: ``P = R X + t``, ``p = -P[:2] / P[2]``,
    ``r = f (1 + k1 |p|^2 + k2 |p|^4) p - observed``; Jacobians as its ``_jacobians``."""
    B, E = T.shape[0], ci.shape[0]
    P, R, S = np.empty(3), np.empty((3, 3)), np.empty((3, 3))
    r, J, dpp, dpP, dX = np.empty(2), np.empty((2, 12)), np.empty((2, 2)), np.empty((2, 3)), \
        np.empty((2, 3))
    rw, Jw = np.empty(2), np.empty((2, 12))
    M = np.empty((12, 12))
    for bb in range(B):
        ob = obs[bb if obs.shape[0] > 1 else 0]
        for e in range(E):
            t, k, x = T[bb, ci[e]], K[bb, ki[e]], X[bb, pi[e]]
            _rotate(t[3:7], x, P)
            P[0], P[1], P[2] = P[0] + t[0], P[1] + t[1], P[2] + t[2]
            p0, p1 = -P[0] / P[2], -P[1] / P[2]
            r2 = p0 * p0 + p1 * p1
            f, k1, k2 = k[0], k[1], k[2]
            s = 1 + k1 * r2 + k2 * r2 * r2
            r[0] = f * s * p0 - ob[e, 0]
            r[1] = f * s * p1 - ob[e, 1]
            c2 = 2 * (k1 + 2 * k2 * r2)
            pp = (p0, p1)
            for a in range(2):
                for b in range(2):
                    dpp[a, b] = f * (s * (1.0 if a == b else 0.0) + c2 * pp[a] * pp[b])
            inv = -1 / P[2]
            for a in range(2):
                for b in range(2):
                    dpP[a, b] = (dpp[a, 0] * (1.0 if b == 0 else 0.0)
                                 + dpp[a, 1] * (1.0 if b == 1 else 0.0)) * inv
                dpP[a, 2] = (dpp[a, 0] * p0 + dpp[a, 1] * p1) * inv
            _quat_to_matrix(t[3:7], R)
            for a in range(2):
                for b in range(3):
                    dX[a, b] = dpP[a, 0] * R[0, b] + dpP[a, 1] * R[1, b] + dpP[a, 2] * R[2, b]
            _skew(x[0], x[1], x[2], S)
            for a in range(2):
                for b in range(3):
                    J[a, b] = dX[a, b]
                    J[a, 3 + b] = -(dX[a, 0] * S[0, b] + dX[a, 1] * S[1, b] + dX[a, 2] * S[2, b])
                    J[a, 9 + b] = dX[a, b]
                J[a, 6] = s * pp[a]
                J[a, 7] = f * r2 * pp[a]
                J[a, 8] = f * (r2 * r2) * pp[a]
            _accumulate(bb, e, r, J, U, has_u, w, top, rowmap, col, H, g, cost, kind, scale,
                        grp, rw, Jw, M)


@_jit
def se3_retract(X: np.ndarray, delta: np.ndarray, out: np.ndarray) -> None:
    """``out = X * exp(delta)`` (``se3.retract``): ``exp(rho, phi) = (Jl(phi) rho, so3.exp(phi))``;
    ``X, out (B, F, 7)``, ``delta (B, F, 6)``."""
    e7, tmp = np.empty(7), np.empty(3)
    for b in range(X.shape[0]):
        for f in range(X.shape[1]):
            d = delta[b, f]
            rx, ry, rz, px, py, pz = d[0], d[1], d[2], d[3], d[4], d[5]
            theta2 = px * px + py * py + pz * pz
            if theta2 < SMALL2:
                cb = _horner(ONE_MINUS_COS_OVER_T2, theta2)
                ca = _horner(T_MINUS_SIN_OVER_T3, theta2)
                k = _horner(SIN_HALF_OVER_T, theta2)
                w = _horner(COS_HALF, theta2)
            else:
                t = math.sqrt(theta2)
                cb = 2 * (math.sin(t / 2) / t) ** 2
                ca = (t - math.sin(t)) / t**3
                k = math.sin(t / 2) / t
                w = math.cos(t / 2)
            ax, ay, az = py * rz - pz * ry, pz * rx - px * rz, px * ry - py * rx  # phi x rho
            bx, by, bz = py * az - pz * ay, pz * ax - px * az, px * ay - py * ax
            e7[0], e7[1], e7[2] = rx + cb * ax + ca * bx, ry + cb * ay + ca * by, \
                rz + cb * az + ca * bz
            e7[3], e7[4], e7[5], e7[6] = k * px, k * py, k * pz, w
            _se3_compose(X[b, f], e7, out[b, f], tmp)


@_jit
def se2_retract(X: np.ndarray, delta: np.ndarray, out: np.ndarray) -> None:
    """``out = X * exp(delta)`` (``se2.retract``); ``X, out (B, F, 4)``, ``delta (B, F, 3)``."""
    e4 = np.empty(4)
    for b in range(X.shape[0]):
        for f in range(X.shape[1]):
            r1, r2, th = delta[b, f, 0], delta[b, f, 1], delta[b, f, 2]
            a, cb, _ = _se2_coeffs(th)
            bt = cb * th
            e4[0], e4[1] = a * r1 - bt * r2, bt * r1 + a * r2
            e4[2], e4[3] = math.cos(th), math.sin(th)
            _se2_compose(X[b, f], e4, out[b, f])


@_jit
def csc_block_rows(R: np.ndarray, sizes: np.ndarray, starts: np.ndarray, indptr: np.ndarray,
                   column_first: np.ndarray, out: np.ndarray) -> None:
    """The rows ``out (nnz,)`` of a block CSC pattern (``core.objective._csc_rows``): block
    column ``C``'s unique blocks ``column_first[C]:column_first[C + 1]`` have row blocks ``R``;
    its first scalar column lists their rows (``starts[R[u]] + a``, ``a < sizes[R[u]]``), each
    further column of the block column the same rows."""
    for C in range(sizes.shape[0]):
        j0 = starts[C]
        k = indptr[j0]
        for u in range(column_first[C], column_first[C + 1]):
            r0 = starts[R[u]]
            for a in range(sizes[R[u]]):
                out[k] = r0 + a
                k += 1
        first, count = indptr[j0], k - indptr[j0]
        for c in range(1, sizes[C]):
            dst = indptr[j0 + c]
            for t in range(count):
                out[dst + t] = out[first + t]
