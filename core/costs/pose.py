"""Library costs with analytic Jacobians: ``Prior`` and ``Between`` for every space.

Both work for Lie groups and vectors alike through the space's functions (for ``Vector`` the
group operation is addition, so ``Log``, ``Jr^-1`` and ``Ad`` are identities). Jacobians are with
respect to right perturbations ``x * Exp(delta)``:

* ``Prior``: ``r = Log(z^-1 x)``; ``dr/dx = Jr^-1(r)``.
* ``Between``: ``r = Log(z^-1 x_i^-1 x_j)``; ``dr/dx_j = Jr^-1(r)``,
  ``dr/dx_i = -Jr^-1(r) Ad(x_j^-1 x_i)``, since
  ``Exp(-d) x_i^-1 x_j = x_i^-1 x_j Exp(-Ad(x_j^-1 x_i) d)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.cost import Cost, make_cost
from core.loss import RobustLoss
from core.variable import Variable

# compiled kernels computing the same residuals and Jacobians (core.fused, core._kernels)
_KERNELS = {
    "SE3": {"between": "between_se3", "prior": "prior_se3"},
    "SE2": {"between": "between_se2", "prior": "prior_se2"},
}


def _per_factor(t: Tensor, storage: int, num: int, what: str) -> Tensor:
    """``(S,)``, ``(E, S)`` or ``(B, E, S)`` -> ``(B|1, E, S)`` (a view where possible)."""
    t = torch.as_tensor(t)
    if t.shape[-1:] != (storage,):
        raise ValueError(f"{what} must end in the storage size {storage}, got {tuple(t.shape)}")
    if t.ndim == 1:
        t = t.expand(num, storage)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[1] != num:
        raise ValueError(
            f"{what} must be (S,), (E, S) or (B, E, S) with E = {num}, got {tuple(t.shape)}"
        )
    return t


def _as_index(i: int | Tensor, what: str) -> Tensor:
    i = torch.as_tensor(i)
    if i.dtype not in (torch.int32, torch.int64, torch.uint8, torch.int16):
        raise ValueError(f"{what} must be an integer tensor, got {i.dtype}")
    return i.reshape(-1).long()


def Prior(  # noqa: N802 (a Cost constructor)
    variable: Variable,
    target: Tensor,
    index: int | Tensor | None = None,
    *,
    weight: float | Tensor | None = None,
    sqrt_info: float | Tensor | None = None,
    loss: RobustLoss | None = None,
    name: str | None = None,
) -> Cost:
    """``r = Log(target^-1 x[index])`` per factor. ``target``: ``(S,)``, ``(E, S)`` or
    ``(B, E, S)``; ``index``: int or ``(E,)`` (default: every element of ``variable``).
    A float ``sqrt_info`` is a scalar weight."""
    space = variable.space
    idx = torch.arange(variable.count) if index is None else _as_index(index, "Prior index")
    target = _per_factor(
        target, space.storage_dim, idx.shape[0], f"Prior on {variable.name!r}: target"
    )
    if isinstance(sqrt_info, float | int):
        weight, sqrt_info = float(sqrt_info), None

    def prior(xs: list[Tensor], aux: list[Tensor], jacobians: bool):
        r = space.local(aux[0], xs[0])
        return r, [space.jr_inv(r)] if jacobians else None

    return make_cost(
        None,
        [variable],
        {"target": target},
        index=[idx],
        weight=weight,
        sqrt_info=sqrt_info,
        loss=loss,
        name=name or f"prior_{variable.name}",
        analytic=prior,
        residual_dim=space.dof,
        aux_spaces={"target": space},
        kernel=_KERNELS.get(str(space), {}).get("prior"),
    )


def Between(  # noqa: N802 (a Cost constructor)
    variable: Variable,
    i: Tensor,
    j: Tensor,
    measured: Tensor,
    *,
    other: Variable | None = None,
    weight: float | Tensor | None = None,
    sqrt_info: float | Tensor | None = None,
    loss: RobustLoss | None = None,
    name: str | None = None,
) -> Cost:
    """``r = Log(measured^-1 x_i^-1 x_j)`` with ``x_i = variable[i]``, ``x_j = (other or
    variable)[j]``; ``measured``: ``(S,)``, ``(E, S)`` or ``(B, E, S)``."""
    second = other or variable
    space = variable.space
    if second.space != space:
        raise ValueError(
            f"Between: {variable.name!r} is {space} but {second.name!r} is {second.space}"
        )
    i, j = _as_index(i, "Between i"), _as_index(j, "Between j")
    measured = _per_factor(measured, space.storage_dim, i.shape[0], "Between measured")
    if isinstance(sqrt_info, float | int):
        weight, sqrt_info = float(sqrt_info), None

    def between(xs: list[Tensor], aux: list[Tensor], jacobians: bool):
        xi, xj = xs
        r = space.local(aux[0], space.compose(space.inverse(xi), xj))
        if not jacobians:
            return r, None
        Jj = space.jr_inv(r)
        Ji = -Jj @ space.adjoint(space.compose(space.inverse(xj), xi))
        return r, [Ji, Jj]

    return make_cost(
        None,
        [variable, second],
        {"measured": measured},
        index=[i, j],
        weight=weight,
        sqrt_info=sqrt_info,
        loss=loss,
        name=name or f"between_{variable.name}",
        analytic=between,
        residual_dim=space.dof,
        aux_spaces={"measured": space},
        kernel=_KERNELS.get(str(space), {}).get("between"),
    )
