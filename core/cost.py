"""Costs as factor tables: one ``Cost`` evaluates ``E`` factors of one type in one vectorized call.

A factor ``e`` reads the optimized variables at ``index[a][e]`` (one index tensor per slot ``a``)
and per-factor slices of the auxiliary tensors, and returns a residual of dimension ``d``. The
weighted residual is ``W r`` with ``W`` a scalar/diagonal ``weight`` or a full upper-triangular
``sqrt_info``; a robust loss rescales it (see ``core.loss``). The cost of a factor is
``0.5 * rho(||W r||^2)``.

Two ways to give the residual:

* ``residual``: a function of ONE factor, ``f(x_1, ..., x_k, *aux) -> (d,)``, with ``x_a`` of
  shape ``(storage_dim_a,)`` and each aux of its per-factor shape. It is vectorized with
  ``torch.func.vmap`` over factors and batch; Jacobians come from ``torch.func.jacfwd`` with
  respect to the tangent perturbation ``delta_a`` of ``retract(x_a, delta_a)`` at 0.
* ``analytic``: a batched function
  ``f(xs, aux, jacobians) -> (r (B, E, d), [J_a (B, E, d, dof_a)])`` over tensors
  ``xs[a] (B, E, storage_a)`` and ``aux[k] (B|1, E, ...)``, with Jacobians with respect to the
  same right tangent perturbations (library costs use this).

Auxiliary tensors carry a leading batch dimension of size ``B`` or ``1`` (shared across the batch
without a copy); for indexed costs the next dimension is ``E``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.func import jacfwd, vmap

from core.lie import Space
from core.loss import RobustLoss
from core.variable import Variable, check_on_group

AnalyticFn = Callable[[list[Tensor], list[Tensor], bool], tuple[Tensor, "list[Tensor] | None"]]


@dataclass(frozen=True)
class CostTerms:
    """One cost evaluated at given values.

    ``r (B, E, d)``: weighted (and robustly rescaled) residuals; ``J (B, E, d, D)``: their
    Jacobians with respect to the concatenated tangent perturbations of the factor's slots
    (``D = sum dof_a``), or None; ``cost (B,)``: ``sum_e 0.5 * rho(||W r_e||^2)``;
    ``factor_cost (B, E)``: its terms, one per factor (a ragged batch sums them per problem).
    """

    r: Tensor
    J: Tensor | None
    cost: Tensor
    factor_cost: Tensor | None = None


@dataclass(frozen=True, eq=False)
class Cost:
    """A table of ``E`` factors of one residual type; see the module docstring.

    ``index``: one int64 tensor ``(E,)`` per slot of ``optimized``; None means one factor reading
    variables of count 1. ``aux``: tensors ``(B|1, [E,] ...)``, a sequence or a name->tensor mapping
    (names are how ``OptimizationLayer`` inputs replace them: ``"<cost name>.<aux name>"``).
    ``residual_dim``: ``d`` when known before evaluation (library costs), so weights and
    sqrt_info are checked at construction; otherwise at the first evaluation. ``aux_spaces``:
    ``(aux name, space)`` pairs of aux tensors holding group elements (measurements), checked
    for unit rotations (``core.variable.check_on_group``) whenever they are set. ``kernel``: the
    name of a compiled kernel computing the same residuals and Jacobians (library costs only;
    ``core.fused`` says when it is used).
    """

    residual: Callable[..., Tensor] | None
    optimized: tuple[Variable, ...]
    aux: dict[str, Tensor]
    index: tuple[Tensor, ...]
    weight: Tensor | None = None
    sqrt_info: Tensor | None = None
    loss: RobustLoss | None = None
    name: str = "cost"
    analytic: AnalyticFn | None = None
    indexed: bool = True
    residual_dim: int | None = None
    aux_spaces: tuple[tuple[str, Space], ...] = ()
    kernel: str | None = None

    @property
    def num_factors(self) -> int:
        return int(self.index[0].shape[0])

    @property
    def dofs(self) -> tuple[int, ...]:
        return tuple(v.space.dof for v in self.optimized)

    def replace(self, **changes: object) -> Cost:
        """A copy with some fields changed (values are re-validated)."""
        return _validated(replace(self, **changes))

    def to(self, device: torch.device | str) -> Cost:
        """A copy whose tensors (indices, aux, weight, sqrt_info, robust scale) are on
        ``device``: solving on a GPU then moves nothing between host and device per iteration."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        loss = self.loss
        if loss is not None and isinstance(loss.scale, Tensor):
            loss = loss.with_scale(loss.scale.to(device))
        return replace(
            self,
            index=tuple(i.to(device) for i in self.index),
            aux={k: t.to(device) for k, t in self.aux.items()},
            weight=move(self.weight),
            sqrt_info=move(self.sqrt_info),
            loss=loss,
        )

    def factors(self, start: int, stop: int) -> Cost:
        """Factors ``start:stop`` as a cost of their own: views of the indices, the aux tensors and
        the per-factor weights / sqrt_info / robust scales (shared ones are kept as they are)."""
        num = self.num_factors

        def per_factor(t: Tensor | None, dim: int) -> Tensor | None:
            if t is None or t.ndim < -dim or t.shape[dim] != num or num == 1:
                return t
            return t.narrow(dim, start, stop - start)

        loss = self.loss
        if loss is not None and isinstance(loss.scale, Tensor) and loss.scale.ndim == 2:
            loss = loss.with_scale(per_factor(loss.scale, -1))  # type: ignore[arg-type]
        return replace(
            self,
            index=tuple(i[start:stop] for i in self.index),
            aux={k: t[:, start:stop] for k, t in self.aux.items()},
            weight=per_factor(self.weight, -2),
            sqrt_info=per_factor(self.sqrt_info, -3),
            loss=loss,
        )

    def inputs(self) -> dict[str, Tensor]:
        """The tensors a layer may replace, keyed ``"<name>.<aux>"``, ``.weight``, ``.sqrt_info``,
        ``.loss_scale``."""
        out = {f"{self.name}.{k}": t for k, t in self.aux.items()}
        if self.weight is not None:
            out[f"{self.name}.weight"] = self.weight
        if self.sqrt_info is not None:
            out[f"{self.name}.sqrt_info"] = self.sqrt_info
        if self.loss is not None:
            out[f"{self.name}.loss_scale"] = torch.as_tensor(self.loss.scale)
        return out

    def with_inputs(self, new: Mapping[str, Tensor]) -> Cost:
        """A copy with the tensors named in ``new`` (keys as in ``inputs()``) replaced."""
        prefix = self.name + "."
        mine = {k[len(prefix) :]: v for k, v in new.items() if k.startswith(prefix)}
        if not mine:
            return self
        changes: dict[str, object] = {}
        if any(k in mine for k in self.aux):
            lift = (lambda t: t) if self.indexed else (lambda t: t.unsqueeze(1))
            changes["aux"] = {k: lift(mine[k]) if k in mine else t for k, t in self.aux.items()}
        for field in ("weight", "sqrt_info"):
            if field in mine:
                changes[field] = mine[field]
        if "loss_scale" in mine:
            if self.loss is None:
                raise ValueError(f"cost {self.name!r} has no robust loss to set a scale on")
            changes["loss"] = self.loss.with_scale(mine["loss_scale"])
        return self.replace(**changes)

    def evaluate(self, values: Mapping[str, Tensor], jacobians: bool) -> CostTerms:
        """Residuals, Jacobians and cost at ``values`` (name -> ``(B, F, S)``)."""
        for v, i in zip(self.optimized, self.index):
            if i.device != values[v.name].device:  # no silent host-device copy per evaluation
                raise ValueError(
                    f"cost {self.name!r}: indices on {i.device} but {v.name!r} on "
                    f"{values[v.name].device}; move the objective with objective.to(device) "
                    "(optimizers and OptimizationLayer do it themselves)"
                )
        xs = [values[v.name].index_select(1, i) for v, i in zip(self.optimized, self.index)]
        batch = xs[0].shape[0]
        aux = list(self.aux.values())
        if self.analytic is not None:
            r, Js = self.analytic(xs, aux, jacobians)
            J = torch.cat(Js, dim=-1) if jacobians and Js is not None else None
        else:
            r, J = self._autodiff(xs, [_expand(a, batch, self.num_factors) for a in aux], jacobians)
        if r.ndim != 3 or r.shape[:2] != (batch, self.num_factors):
            raise ValueError(
                f"cost {self.name!r}: residual must have shape (B, E, d) = ({batch}, "
                f"{self.num_factors}, d), got {tuple(r.shape)}"
            )
        return self._weigh(r, J)

    def _autodiff(
        self, xs: list[Tensor], aux: list[Tensor], jacobians: bool
    ) -> tuple[Tensor, Tensor | None]:
        fn, spaces, k = self.residual, [v.space for v in self.optimized], len(xs)
        assert fn is not None
        if not jacobians:
            return vmap(vmap(fn))(*xs, *aux), None

        def one(*args: Tensor) -> tuple[Tensor, Tensor]:
            points, data = args[:k], args[k:]

            def at(*deltas: Tensor) -> tuple[Tensor, Tensor]:
                r = fn(*[s.retract(x, d) for s, x, d in zip(spaces, points, deltas)], *data)
                return r, r

            zeros = [points[a].new_zeros(spaces[a].dof) for a in range(k)]
            Js, r = jacfwd(at, argnums=tuple(range(k)), has_aux=True)(*zeros)
            return r, torch.cat(Js, dim=-1)

        r, J = vmap(vmap(one))(*xs, *aux)
        return r, J

    def _weigh(self, r: Tensor, J: Tensor | None) -> CostTerms:
        _check_weights(self, r.shape[-1])  # shapes only: no host sync
        if self.sqrt_info is not None:  # W = diag(weight) U: a per-factor weight on an information
            U = self.sqrt_info
            r = (U @ r[..., None])[..., 0]
            J = None if J is None else U @ J
        if self.weight is not None:
            w = self.weight
            r = w * r
            J = None if J is None else w[..., None] * J if w.ndim else w * J
        s = (r * r).sum(-1)
        if self.loss is None:
            per = 0.5 * s  # (exact: the same sum as 0.5 * s.sum(-1))
            return CostTerms(r, J, per.sum(-1), per)
        rho, drho = self.loss(s)
        root = torch.sqrt(drho)[..., None]
        per = 0.5 * rho
        return CostTerms(r * root, None if J is None else J * root[..., None], per.sum(-1), per)


def _expand(a: Tensor, batch: int, num_factors: int) -> Tensor:
    """``(B|1, E, ...)`` -> ``(B, E, ...)`` as a view."""
    return a.expand(batch, num_factors, *a.shape[2:])


def _as_tensor(x: float | Tensor | None) -> Tensor | None:
    return None if x is None else torch.as_tensor(x)


def make_cost(
    residual: Callable[..., Tensor] | None,
    optimized: Sequence[Variable],
    aux: Sequence[Tensor] | Mapping[str, Tensor] = (),
    *,
    index: Sequence[Tensor] | None = None,
    weight: float | Tensor | None = None,
    sqrt_info: Tensor | None = None,
    loss: RobustLoss | None = None,
    name: str | None = None,
    analytic: AnalyticFn | None = None,
    residual_dim: int | None = None,
    aux_spaces: Mapping[str, Space] | None = None,
    kernel: str | None = None,
) -> Cost:
    """Build and validate a :class:`Cost` (this is ``core.Cost``'s constructor).

    ``weight``: a scalar, ``(d|1,)``, ``(E, d|1)`` or ``(B|1, E, d|1)``; ``sqrt_info``:
    ``(d, d)``, ``(E, d, d)`` or ``(B|1, E, d, d)``, ``d`` the residual dimension (checked here
    when ``residual_dim`` is given, else at the first evaluation). ``aux_spaces``: aux names
    holding group elements, checked for unit rotations.
    """
    optimized = tuple(optimized)
    if not optimized:
        raise ValueError(f"cost {name!r}: needs at least one optimized variable")
    if name is None:
        fn_name = getattr(residual or analytic, "__name__", "cost")
        name = "cost" if fn_name.startswith("<") else fn_name
    if (residual is None) == (analytic is None):
        raise ValueError(f"cost {name!r}: give exactly one of residual= and analytic=")
    if isinstance(aux, Mapping):
        aux_dict = dict(aux)
    else:
        aux_dict = {str(k): t for k, t in enumerate(aux)}
    indexed = index is not None
    if index is None:
        index = [torch.zeros(1, dtype=torch.long) for _ in optimized]
        aux_dict = {k: t.unsqueeze(1) if t.ndim >= 1 else t for k, t in aux_dict.items()}
    cost = Cost(
        residual,
        optimized,
        aux_dict,
        tuple(index),
        _as_tensor(weight),
        sqrt_info,
        loss,
        name,
        analytic,
        indexed,
        residual_dim,
        tuple((aux_spaces or {}).items()),
        kernel,
    )
    if kernel is not None:
        from core import fused  # here: core.fused imports this module

        fused.prepare(kernel)
    return _validated(cost)


def _validated(cost: Cost) -> Cost:
    name, indexed = cost.name, cost.indexed
    if len(cost.index) != len(cost.optimized):
        raise ValueError(
            f"cost {name!r}: {len(cost.optimized)} variables but {len(cost.index)} index tensors"
        )
    num = cost.index[0].shape[0] if cost.index[0].ndim == 1 else -1
    for v, i in zip(cost.optimized, cost.index):
        if not isinstance(i, Tensor) or i.ndim != 1 or i.dtype != torch.long:
            raise ValueError(
                f"cost {name!r}: index for variable {v.name!r} must be a 1-D int64 "
                f"tensor, got {getattr(i, 'dtype', type(i))} {tuple(getattr(i, 'shape', ()))}"
            )
        if num == 0:
            raise ValueError(
                f"cost {name!r}: no factors: the index for variable {v.name!r} is empty (E = 0); "
                "a cost needs at least one factor (leave an empty cost out of the objective)"
            )
        if i.shape[0] != num:
            raise ValueError(
                f"cost {name!r}: index tensors must share one non-zero length E; "
                f"variable {v.name!r} has {i.shape[0]}, expected {num} (like the first index)"
            )
        if v.count == 1 and not indexed:
            continue
        lo, hi = int(i.min()), int(i.max())
        if lo < 0 or hi >= v.count:
            raise ValueError(
                f"cost {name!r}: index for variable {v.name!r} has values in "
                f"[{lo}, {hi}], outside [0, {v.count})"
            )
    if not indexed:
        for v in cost.optimized:
            if v.count != 1:
                raise ValueError(
                    f"cost {name!r}: variable {v.name!r} has count {v.count}; "
                    "pass index= to say which element each factor reads"
                )
    for k, t in cost.aux.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"cost {name!r}: aux {k!r} must be a tensor, got {type(t).__name__}")
        if t.ndim < 2 or t.shape[1] != num:
            raise ValueError(
                f"cost {name!r}: aux {k!r} must have shape (B|1, E={num}, ...), "
                f"got {tuple(t.shape)}"
            )
    _check_weights(cost, cost.residual_dim)
    for key, space in cost.aux_spaces:
        check_on_group(space, cost.aux[key], f"cost {name!r}: aux {key!r}")
    return cost


def _describe(cost: Cost) -> str:
    names = ", ".join(dict.fromkeys(repr(v.name) for v in cost.optimized))
    return f"cost {cost.name!r} on {names}"


def _check_weights(cost: Cost, d: int | None) -> None:
    """Raise ``ValueError`` unless ``weight`` and ``sqrt_info`` fit ``E`` factors of residual
    dimension ``d`` (``None``: only what does not depend on ``d``); see ``make_cost``."""
    num, w, U = cost.num_factors, cost.weight, cost.sqrt_info
    dd = "d" if d is None else str(d)
    if w is not None and w.ndim:
        want = f"a scalar, ({dd}|1,), (E, {dd}|1) or (B|1, E, {dd}|1) with E = {num}"
        last_ok = d is None or w.shape[-1] in (1, d)
        if w.ndim > 3 or not last_ok or (w.ndim >= 2 and w.shape[-2] not in (1, num)):
            raise ValueError(f"{_describe(cost)}: weight must be {want}, got {tuple(w.shape)}")
    if U is not None:
        want = f"({dd}, {dd}), (E, {dd}, {dd}) or (B|1, E, {dd}, {dd}) with E = {num}"
        square = U.ndim >= 2 and U.shape[-1] == U.shape[-2] and (d is None or U.shape[-1] == d)
        if U.ndim > 4 or not square or (U.ndim >= 3 and U.shape[-3] not in (1, num)):
            raise ValueError(f"{_describe(cost)}: sqrt_info must be {want}, got {tuple(U.shape)}")
