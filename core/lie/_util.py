"""Shared helpers for the Lie group modules: shape checks, small-vector algebra, and the
"safe theta" machinery for coefficients such as ``sin(theta) / theta``.

Safe theta trick: a coefficient ``f(theta)`` that is even in ``theta`` is evaluated from
``theta2 = theta**2`` (whose gradient is finite everywhere) as

    ``where(small, taylor(theta2), exact(theta_safe))``,
    ``theta_safe = sqrt(where(small, 1, theta2))``,

so neither branch is ever evaluated at a point where it divides by zero, and no NaN gradient
leaks through the branch that ``torch.where`` discards.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch
from torch import Tensor

# Number of Taylor terms (in powers of theta**2) used in every series below.
N_TERMS = 8


def check(x: Tensor, size: int, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a tensor whose last dimension is ``size``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[-1] != size:
        raise ValueError(
            f"{name}: expected shape (..., {size}), got {tuple(x.shape)} "
            f"(last dimension must be {size})"
        )


def check_matrix(m: Tensor, size: int, name: str) -> None:
    """Raise ``ValueError`` unless ``m`` has shape ``(..., size, size)``."""
    if not isinstance(m, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(m).__name__}")
    if m.ndim < 2 or m.shape[-2:] != (size, size):
        raise ValueError(f"{name}: expected shape (..., {size}, {size}), got {tuple(m.shape)}")


def batch_shape(shape: Sequence[int | Sequence[int]]) -> tuple[int, ...]:
    """Normalise ``identity(2, 3)`` and ``identity((2, 3))`` style arguments to a tuple."""
    if len(shape) == 1 and not isinstance(shape[0], int):
        return tuple(int(s) for s in shape[0])  # type: ignore[union-attr]
    return tuple(int(s) for s in shape)  # type: ignore[arg-type]


def resolve_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` or the default floating dtype."""
    return torch.get_default_dtype() if dtype is None else dtype


def small_angle_threshold(dtype: torch.dtype) -> float:
    """Angle below which the Taylor branch is used.

    With ``N_TERMS`` terms the series are accurate to ~1e-16 (float64) below the threshold, while
    the exact branches, whose worst cancellation is ``O(eps / theta**4)`` for the SE(3) ``Q``
    coefficient, stay accurate to ~1e-14 above it.
    """
    return 0.5 if dtype == torch.float64 else 1.0


def horner(x: Tensor, coeffs: Sequence[float]) -> Tensor:
    """``sum_k coeffs[k] * x**k`` evaluated with Horner's scheme."""
    out = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


@functools.lru_cache(maxsize=64)
def _series_table(series: tuple[tuple[float, ...], ...], dtype: torch.dtype, device: str) -> Tensor:
    """The coefficients of several series as a ``(N_TERMS, K)`` tensor, made once per device."""
    return torch.tensor(series, dtype=dtype, device=device).T.contiguous()


def safe_theta(theta2: Tensor, threshold: float | None = None) -> tuple[Tensor, Tensor]:
    """``(small, theta_safe)`` for ``theta2 = theta**2 >= 0``.

    ``small`` marks ``theta < threshold``; ``theta_safe`` is ``sqrt(theta2)`` where not small and
    ``1`` where small, so exact formulas evaluated at ``theta_safe`` never divide by zero.
    """
    thr = small_angle_threshold(theta2.dtype) if threshold is None else threshold
    small = theta2 < thr * thr
    return small, torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))


def branches(small: Tensor) -> tuple[bool, bool]:
    """Whether the series and the exact branch are needed for the mask ``small``.

    On the CPU (outside ``torch.func`` transforms and compilation), where reading the mask costs
    nothing, a branch that no element takes is skipped: near convergence every angle is small
    and the exact formulas (and their trigonometry) are never evaluated. Elsewhere (a GPU, where
    reading it would synchronize with the host) both are evaluated and selected per element.
    Dropping a branch that ``torch.where`` would discard changes no value and no gradient.
    """
    if (
        small.device.type != "cpu"
        or torch._C._functorch.is_functorch_wrapped_tensor(small)
        or torch.compiler.is_compiling()
    ):
        return True, True
    if small.numel() == 0:
        return True, False  # an empty batch still needs tensors of the right shape
    return bool(small.any()), not bool(small.all())


def even_coeffs(
    theta2: Tensor,
    terms: Sequence[tuple[Sequence[float], Callable[[Tensor], Tensor]]],
    threshold: float | None = None,
) -> list[Tensor]:
    """Functions ``f_k(theta)``, even in ``theta``, from ``theta2 = theta**2``: the Taylor series
    ``terms[k][0]`` (in powers of ``theta2``) where ``theta < threshold``, ``terms[k][1](theta)``
    at ``theta_safe`` elsewhere (see :func:`safe_theta`). All series are evaluated together in one
    Horner pass over a ``(..., K)`` tensor; see :func:`branches` for which branches run."""
    small, t = safe_theta(theta2, threshold)
    use_series, use_exact = branches(small)
    out: list[Tensor] = []
    if use_series:
        table = _series_table(tuple(tuple(s) for s, _ in terms), theta2.dtype, str(theta2.device))
        x = theta2[..., None]
        acc = table[-1].expand(*theta2.shape, len(terms))
        for k in range(table.shape[0] - 2, -1, -1):
            acc = torch.addcmul(table[k], acc, x)
        out = list(acc.unbind(-1))
    if not use_exact:
        return out
    exact = [f(t) for _, f in terms]
    if not use_series:
        return exact
    return [torch.where(small, s, e) for s, e in zip(out, exact)]


def _series(term: Callable[[int], Fraction]) -> tuple[float, ...]:
    return tuple(float(term(k)) for k in range(N_TERMS))


def _bernoulli(n: int) -> Fraction:
    """Bernoulli number ``B_n`` (with ``B_1 = -1/2``), by the standard recursion."""
    b = [Fraction(1)]
    for m in range(1, n + 1):
        b.append(-sum(math.comb(m + 1, k) * b[k] for k in range(m)) / (m + 1))
    return b[n]


def _fact(n: int) -> int:
    return math.factorial(n)


# Taylor coefficients in powers of theta**2 (exact rational values, rounded once).
# sin(t) / t
SIN_OVER_T = _series(lambda k: Fraction((-1) ** k, _fact(2 * k + 1)))
# (1 - cos t) / t**2
ONE_MINUS_COS_OVER_T2 = _series(lambda k: Fraction((-1) ** k, _fact(2 * k + 2)))
# (t - sin t) / t**3
T_MINUS_SIN_OVER_T3 = _series(lambda k: Fraction((-1) ** k, _fact(2 * k + 3)))
# (t**2 / 2 + cos t - 1) / t**4  ==  (t**2 + 2 cos t - 2) / (2 t**4)
COS_TERM_OVER_T4 = _series(lambda k: Fraction((-1) ** k, _fact(2 * k + 4)))
# (2 t - 3 sin t + t cos t) / (2 t**5)
SE3_Q_LAST = _series(lambda k: Fraction((-1) ** k * (k + 1), _fact(2 * k + 5)))
# 1 / t**2 - (1 + cos t) / (2 t sin t)  ==  1 / t**2 - cot(t / 2) / (2 t)
JL_INV_COEFF = _series(
    lambda k: -Fraction((-1) ** (k + 1)) * _bernoulli(2 * k + 2) / _fact(2 * k + 2)
)
# (t / 2) cot(t / 2)  ==  1 - t**2 * JL_INV_COEFF
HALF_T_COT_HALF_T = _series(lambda k: Fraction((-1) ** k) * _bernoulli(2 * k) / _fact(2 * k))
# cos(t / 2)
COS_HALF = _series(lambda k: Fraction((-1) ** k, 4**k * _fact(2 * k)))
# sin(t / 2) / t
SIN_HALF_OVER_T = _series(lambda k: Fraction((-1) ** k, 2 ** (2 * k + 1) * _fact(2 * k + 1)))
# atan(x) / x
ATAN_OVER_X = _series(lambda k: Fraction((-1) ** k, 2 * k + 1))


def cross(a: Tensor, b: Tensor) -> Tensor:
    """Broadcasting cross product of ``(..., 3)`` vectors."""
    a1, a2, a3 = a.unbind(-1)
    b1, b2, b3 = b.unbind(-1)
    return torch.stack(
        torch.broadcast_tensors(a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1), dim=-1
    )


def skew(v: Tensor) -> Tensor:
    """``(..., 3) -> (..., 3, 3)`` skew-symmetric matrix with ``skew(v) @ p == cross(v, p)``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack((o, -z, y, z, o, -x, -y, x, o), dim=-1).reshape(*v.shape[:-1], 3, 3)


def unskew(m: Tensor) -> Tensor:
    """Inverse of :func:`skew` (antisymmetric part): ``(..., 3, 3) -> (..., 3)``."""
    return 0.5 * torch.stack(
        (m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]),
        dim=-1,
    )


def eye_like(x: Tensor, n: int, batch: tuple[int, ...]) -> Tensor:
    """Identity matrices ``(*batch, n, n)`` with the dtype and device of ``x``."""
    return torch.eye(n, dtype=x.dtype, device=x.device).expand(*batch, n, n).clone()


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """NumPy broadcasting of ``shapes``, in plain Python.

    ``torch.broadcast_shapes`` imports ``torch.fx``'s symbolic-shape machinery (and sympy) on its
    first call, 0.5-0.7 s inside the first linearization of a fresh process; this does not.
    """
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for s in shapes:
        for k, size in enumerate(s, start=ndim - len(s)):
            if size != 1:
                if out[k] not in (1, size):
                    raise ValueError(f"shapes {[tuple(x) for x in shapes]} do not broadcast")
                out[k] = size
    return tuple(out)


def block(rows: Sequence[Sequence[Tensor]]) -> Tensor:
    """Assemble a batched block matrix from ``(..., r_i, c_j)`` blocks (batches broadcast)."""
    flat = [b for row in rows for b in row]
    shape = broadcast_shapes(*(b.shape[:-2] for b in flat))
    return torch.cat(
        [torch.cat([b.expand(*shape, *b.shape[-2:]) for b in row], dim=-1) for row in rows],
        dim=-2,
    )
