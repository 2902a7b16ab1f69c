"""Tests for core.cost and core.costs: Jacobians vs finite differences, weights, aux, bad input.

Every Jacobian is checked against central finite differences in the tangent space (the
perturbation is ``space.retract(x, delta)``, the same right perturbation the costs differentiate
with respect to), in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import core
from core.cost import Cost as CostTable
from core.lie import SE2, SE3, SO2, SO3, Vector

F64 = torch.float64
GROUPS = [SO2, SE2, SO3, SE3, Vector(3)]
AUTODIFF_SPACES = [SE2, SE3, SO3, Vector(3)]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def distinct_variables(cost: CostTable) -> list[core.Variable]:
    seen: dict[int, core.Variable] = {}
    for v in cost.optimized:
        seen.setdefault(id(v), v)
    return list(seen.values())


def offsets_of(variables: list[core.Variable]) -> tuple[dict[str, int], int]:
    offsets, n = {}, 0
    for v in variables:
        offsets[v.name] = n
        n += v.dof
    return offsets, n


def fd_jacobian(cost: CostTable, values: dict[str, Tensor], eps: float = 1e-6) -> Tensor:
    """Central differences of the flattened weighted residuals ``(B, E*d)`` with respect to the
    tangent perturbation of every element of every variable: ``(B, E*d, n)``."""
    variables = distinct_variables(cost)
    offsets, n = offsets_of(variables)
    columns = []
    for v in variables:
        for f in range(v.count):
            for k in range(v.space.dof):
                out = []
                for sign in (1.0, -1.0):
                    x = values[v.name]
                    delta = x.new_zeros(x.shape[0], v.count, v.space.dof)
                    delta[:, f, k] = sign * eps
                    moved = {**values, v.name: v.space.retract(x, delta)}
                    r = cost.evaluate(moved, jacobians=False).r
                    out.append(r.reshape(r.shape[0], -1))
                columns.append((out[0] - out[1]) / (2 * eps))
    assert len(columns) == n
    return torch.stack(columns, dim=-1)


def dense_from_blocks(cost: CostTable, J: Tensor) -> Tensor:
    """Block Jacobians ``(B, E, d, D)`` -> dense ``(B, E*d, n)`` (duplicates summed)."""
    variables = distinct_variables(cost)
    offsets, n = offsets_of(variables)
    cols = torch.cat(
        [
            offsets[v.name] + i[:, None] * v.space.dof + torch.arange(v.space.dof)
            for v, i in zip(cost.optimized, cost.index)
        ],
        dim=1,
    )
    B, E, d, D = J.shape
    out = J.new_zeros(B, E, d, n)
    out.scatter_add_(3, cols[None, :, None, :].expand(B, E, d, D), J)
    return out.reshape(B, E * d, n)


def noisy_relative(space, xi: Tensor, xj: Tensor, scale: float, g: torch.Generator) -> Tensor:
    """``xi^-1 xj Exp(n)`` with ``n ~ scale * N(0, I)``: residuals of size ~scale, far from pi."""
    rel = space.compose(space.inverse(xi), xj)
    noise = scale * torch.randn(*rel.shape[:-1], space.dof, generator=g, dtype=rel.dtype)
    return space.retract(rel, noise)


def user_residual(space):
    """A two-slot residual mixing a relative-pose error with a point transform."""

    def residual(x: Tensor, y: Tensor, z: Tensor, p: Tensor) -> Tensor:
        return torch.cat([space.local(z, space.compose(space.inverse(x), y)), space.act(x, p)])

    return residual


def point_dim(space) -> int:
    return 2 if space in (SE2, SO2) else 3


def user_cost(space, g: torch.Generator, batch_aux: tuple[int, int] = (1, 2), **kw) -> CostTable:
    x = core.Variable("x", space, count=5)
    i, j = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 2, 3, 4, 4])
    z = space.random(batch_aux[0], 5, generator=g, dtype=F64)
    p = torch.randn(batch_aux[1], 5, point_dim(space), generator=g, dtype=F64)
    return core.Cost(
        user_residual(space),
        optimized=(x, x),
        aux={"z": z, "p": p},
        index=[i, j],
        name="user",
        **kw,
    )


# ------------------------------------------------------------------------------------------
# Jacobians
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", AUTODIFF_SPACES, ids=repr)
def test_autodiff_jacobian_matches_finite_differences(space, gen: torch.Generator) -> None:
    cost = user_cost(space, gen)
    values = {"x": space.random(2, 5, generator=gen, dtype=F64)}
    terms = cost.evaluate(values, jacobians=True)
    d = space.dof + point_dim(space)
    assert terms.r.shape == (2, 5, d)
    assert terms.J is not None and terms.J.shape == (2, 5, d, 2 * space.dof)
    torch.testing.assert_close(
        dense_from_blocks(cost, terms.J), fd_jacobian(cost, values), atol=1e-7, rtol=1e-6
    )
    plain = cost.evaluate(values, jacobians=False)
    assert plain.J is None
    torch.testing.assert_close(plain.r, terms.r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.cost, 0.5 * (terms.r**2).sum((1, 2)))


def test_autodiff_two_variables_of_different_spaces(gen: torch.Generator) -> None:
    """A landmark observation: SE3 pose and Vector(3) point, one factor per observation."""
    poses = core.Variable("poses", SE3, count=3)
    points = core.Variable("points", Vector(3), count=4)
    measured = torch.randn(1, 6, 3, generator=gen, dtype=F64)

    def observe(T: Tensor, p: Tensor, m: Tensor) -> Tensor:
        return SE3.act(SE3.inverse(T), p) - m

    cost = core.Cost(
        observe,
        optimized=(poses, points),
        aux=(measured,),
        index=[torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 3, 0])],
    )
    assert cost.name == "observe"
    values = {
        "poses": SE3.random(2, 3, generator=gen, dtype=F64),
        "points": torch.randn(2, 4, 3, generator=gen, dtype=F64),
    }
    terms = cost.evaluate(values, jacobians=True)
    torch.testing.assert_close(
        dense_from_blocks(cost, terms.J), fd_jacobian(cost, values), atol=1e-7, rtol=1e-6
    )


def test_autodiff_without_index_reads_count_one_variables(gen: torch.Generator) -> None:
    """No ``index``: one factor over count-1 variables; aux ``(B|1, ...)`` is per-factor data."""
    a, b = core.Variable("a", Vector(1)), core.Variable("b", Vector(2))
    t = torch.rand(1, 7, generator=gen, dtype=F64)

    def curve(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
        return torch.sin(a * t) + b[0] * t**2 + b[1] * b[0]

    cost = core.Cost(curve, optimized=(a, b), aux=(t,))
    values = {
        "a": torch.randn(3, 1, 1, generator=gen, dtype=F64),
        "b": torch.randn(3, 1, 2, generator=gen, dtype=F64),
    }
    terms = cost.evaluate(values, jacobians=True)
    assert terms.r.shape == (3, 1, 7)
    for k in range(3):
        r = curve(values["a"][k, 0], values["b"][k, 0], t[0])
        torch.testing.assert_close(terms.r[k, 0], r)
    torch.testing.assert_close(
        dense_from_blocks(cost, terms.J), fd_jacobian(cost, values), atol=1e-7, rtol=1e-6
    )


@pytest.mark.parametrize("space", GROUPS, ids=repr)
def test_prior_analytic_jacobian_matches_finite_differences(space, gen: torch.Generator) -> None:
    x = core.Variable("x", space, count=4)
    index = torch.tensor([0, 2, 3, 2])
    truth = space.random(2, 4, generator=gen, dtype=F64)
    target = noisy_relative(space, space.identity(2, 4, dtype=F64), truth, 0.7, gen)
    target = target[:, index]  # (B, E, S): one target per factor and batch element
    cost = core.costs.Prior(x, target, index=index)
    assert cost.name == "prior_x" and cost.num_factors == 4
    values = {"x": truth}
    terms = cost.evaluate(values, jacobians=True)
    assert terms.r.shape == (2, 4, space.dof)
    # the residual is Log(target^-1 x)
    torch.testing.assert_close(
        terms.r, space.log(space.compose(space.inverse(target), truth[:, index]))
    )
    torch.testing.assert_close(
        dense_from_blocks(cost, terms.J), fd_jacobian(cost, values), atol=1e-7, rtol=1e-6
    )


@pytest.mark.parametrize("space", GROUPS, ids=repr)
def test_between_analytic_jacobian_matches_finite_differences(space, gen: torch.Generator) -> None:
    x = core.Variable("x", space, count=5)
    i, j = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 2, 3, 4, 0, 3])
    values = {"x": space.random(2, 5, generator=gen, dtype=F64)}
    measured = noisy_relative(space, values["x"][:, i], values["x"][:, j], 0.7, gen)
    cost = core.costs.Between(x, i, j, measured)
    terms = cost.evaluate(values, jacobians=True)
    assert terms.J is not None and terms.J.shape == (2, 6, space.dof, 2 * space.dof)
    assert float(terms.r.abs().max()) > 0.05  # a non-trivial residual
    torch.testing.assert_close(
        dense_from_blocks(cost, terms.J), fd_jacobian(cost, values), atol=1e-7, rtol=1e-6
    )


@pytest.mark.parametrize("space", [SE2, SE3], ids=repr)
def test_between_two_variables(space, gen: torch.Generator) -> None:
    """``other=``: x_i from one variable, x_j from another (of the same space)."""
    a, b = core.Variable("a", space, count=2), core.Variable("b", space, count=3)
    i, j = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])
    values = {
        "a": space.random(2, 2, generator=gen, dtype=F64),
        "b": space.random(2, 3, generator=gen, dtype=F64),
    }
    measured = noisy_relative(space, values["a"][:, i], values["b"][:, j], 0.5, gen)
    cost = core.costs.Between(a, i, j, measured, other=b)
    terms = cost.evaluate(values, jacobians=True)
    torch.testing.assert_close(
        dense_from_blocks(cost, terms.J), fd_jacobian(cost, values), atol=1e-7, rtol=1e-6
    )
    with pytest.raises(ValueError, match="'a'.*'c'"):
        core.costs.Between(a, i, j, measured, other=core.Variable("c", SO3, count=3))


@pytest.mark.parametrize("space", [SO2, SE3], ids=repr)
def test_between_analytic_agrees_with_autodiff(space, gen: torch.Generator) -> None:
    x = core.Variable("x", space, count=3)
    i, j = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    values = {"x": space.random(2, 3, generator=gen, dtype=F64)}
    measured = noisy_relative(space, values["x"][:, i], values["x"][:, j], 0.5, gen)
    analytic = core.costs.Between(x, i, j, measured).evaluate(values, jacobians=True)

    def between(xi: Tensor, xj: Tensor, z: Tensor) -> Tensor:
        return space.local(z, space.compose(space.inverse(xi), xj))

    auto = core.Cost(between, optimized=(x, x), aux=(measured,), index=[i, j])
    autodiff = auto.evaluate(values, jacobians=True)
    torch.testing.assert_close(analytic.r, autodiff.r)
    torch.testing.assert_close(analytic.J, autodiff.J)
    torch.testing.assert_close(analytic.cost, autodiff.cost)


def test_analytic_residual_of_wrong_shape_is_an_error() -> None:
    x = core.Variable("x", Vector(2), count=3)

    def bad(xs, aux, jacobians):
        return xs[0].sum(-1), None  # (B, E) instead of (B, E, d)

    cost = core.Cost(None, optimized=(x,), index=[torch.arange(3)], analytic=bad, name="bad")
    with pytest.raises(ValueError, match=r"'bad'.*\(B, E, d\)"):
        cost.evaluate({"x": torch.zeros(2, 3, 2, dtype=F64)}, jacobians=False)


# ------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------

B, E, D = 2, 4, 6  # SE3 between: 6-dimensional residuals


def _weight_variants(g: torch.Generator) -> dict[str, tuple[dict, Tensor]]:
    """name -> (keyword arguments, the equivalent dense U (B, E, d, d))."""
    eye = torch.eye(D, dtype=F64)
    diag = torch.rand(D, generator=g, dtype=F64) + 0.5
    diag_e = torch.rand(E, D, generator=g, dtype=F64) + 0.5
    U_e = torch.linalg.cholesky(_spd(g, E), upper=True)
    U_be = torch.linalg.cholesky(_spd(g, B, E), upper=True)
    U_1 = torch.linalg.cholesky(_spd(g), upper=True)
    return {
        "scalar": ({"weight": 3.0}, (3.0 * eye).expand(B, E, D, D)),
        "scalar_tensor": (
            {"weight": torch.tensor(0.25, dtype=F64)},
            (0.25 * eye).expand(B, E, D, D),
        ),
        "diag": ({"weight": diag}, torch.diag_embed(diag).expand(B, E, D, D)),
        "diag_per_factor": ({"weight": diag_e}, torch.diag_embed(diag_e).expand(B, E, D, D)),
        "sqrt_info_shared": ({"sqrt_info": U_1}, U_1.expand(B, E, D, D)),
        "sqrt_info_per_factor": ({"sqrt_info": U_e}, U_e.expand(B, E, D, D)),
        "sqrt_info_batched": ({"sqrt_info": U_be}, U_be),
    }


def _spd(g: torch.Generator, *shape: int) -> Tensor:
    A = torch.randn(*shape, D, D, generator=g, dtype=F64)
    return A @ A.mT + 0.5 * torch.eye(D, dtype=F64)


WEIGHT_NAMES = [
    "scalar",
    "scalar_tensor",
    "diag",
    "diag_per_factor",
    "sqrt_info_shared",
    "sqrt_info_per_factor",
    "sqrt_info_batched",
]


@pytest.mark.parametrize("analytic", [True, False], ids=["between", "autodiff"])
@pytest.mark.parametrize("variant", WEIGHT_NAMES)
def test_weights_scale_residual_jacobian_and_cost(variant: str, analytic: bool) -> None:
    g = torch.Generator().manual_seed(7)
    kwargs, U = _weight_variants(g)[variant]
    x = core.Variable("x", SE3, count=3)
    i, j = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])
    values = {"x": SE3.random(B, 3, generator=g, dtype=F64)}
    measured = noisy_relative(SE3, values["x"][:, i], values["x"][:, j], 0.5, g)

    def make(**kw):
        if analytic:
            return core.costs.Between(x, i, j, measured, **kw)

        def between(xi: Tensor, xj: Tensor, z: Tensor) -> Tensor:
            return SE3.local(z, SE3.compose(SE3.inverse(xi), xj))

        return core.Cost(between, optimized=(x, x), aux=(measured,), index=[i, j], **kw)

    base = make().evaluate(values, jacobians=True)
    weighted = make(**kwargs).evaluate(values, jacobians=True)
    r_w = torch.einsum("beij,bej->bei", U, base.r)
    torch.testing.assert_close(weighted.r, r_w)
    torch.testing.assert_close(weighted.J, U @ base.J)
    torch.testing.assert_close(weighted.cost, 0.5 * (r_w**2).sum((1, 2)))
    # and the Jacobian of the weighted residual is still the derivative of the weighted residual
    cost = make(**kwargs)
    torch.testing.assert_close(
        dense_from_blocks(cost, weighted.J), fd_jacobian(cost, values), atol=1e-6, rtol=1e-6
    )


def test_scalar_weight_by_hand() -> None:
    """One factor, r = x - m = (3, 4): weight 2 gives r_w = (6, 8) and cost 0.5 * 100 = 50."""
    x = core.Variable("x", Vector(2))
    m = torch.tensor([[1.0, -1.0]], dtype=F64)
    cost = core.Cost(lambda x, m: x - m, optimized=(x,), aux=(m,), weight=2.0, name="w")
    terms = cost.evaluate({"x": torch.tensor([[[4.0, 3.0]]], dtype=F64)}, jacobians=True)
    torch.testing.assert_close(terms.r, torch.tensor([[[6.0, 8.0]]], dtype=F64))
    torch.testing.assert_close(terms.J, 2 * torch.eye(2, dtype=F64).expand(1, 1, 2, 2))
    torch.testing.assert_close(terms.cost, torch.tensor([50.0], dtype=F64))


def test_prior_float_sqrt_info_is_a_scalar_weight(gen: torch.Generator) -> None:
    x = core.Variable("x", SE2, count=2)
    values = {"x": SE2.random(1, 2, generator=gen, dtype=F64)}
    target = SE2.random(2, generator=gen, dtype=F64)
    base = core.costs.Prior(x, target).evaluate(values, jacobians=True)
    scaled = core.costs.Prior(x, target, sqrt_info=10.0).evaluate(values, jacobians=True)
    torch.testing.assert_close(scaled.r, 10 * base.r)
    torch.testing.assert_close(scaled.J, 10 * base.J)
    torch.testing.assert_close(scaled.cost, 100 * base.cost)


# ------------------------------------------------------------------------------------------
# auxiliary tensors: shared (batch 1) vs batched
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", [SE2, SE3], ids=repr)
def test_shared_aux_equals_batched_copy(space, gen: torch.Generator) -> None:
    """An aux of batch 1 is broadcast: same result as the same tensor repeated B times."""
    shared = user_cost(space, gen, batch_aux=(1, 1))
    repeated = shared.replace(
        aux={k: t.expand(3, *t.shape[1:]).clone() for k, t in shared.aux.items()}
    )
    values = {"x": space.random(3, 5, generator=gen, dtype=F64)}
    a, b = shared.evaluate(values, jacobians=True), repeated.evaluate(values, jacobians=True)
    torch.testing.assert_close(a.r, b.r, rtol=0, atol=0)
    torch.testing.assert_close(a.J, b.J, rtol=0, atol=0)
    torch.testing.assert_close(a.cost, b.cost, rtol=0, atol=0)


@pytest.mark.parametrize("analytic", [True, False], ids=["between", "autodiff"])
def test_batched_aux_elements_are_independent(analytic: bool, gen: torch.Generator) -> None:
    """Element b of a batched evaluation equals evaluating element b alone."""
    x = core.Variable("x", SE3, count=3)
    i, j = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    values = {"x": SE3.random(4, 3, generator=gen, dtype=F64)}
    measured = noisy_relative(SE3, values["x"][:, i], values["x"][:, j], 0.5, gen)  # (4, E, 7)
    U = torch.linalg.cholesky(_spd(gen, 4, 3), upper=True)

    def make(z: Tensor, U: Tensor):
        if analytic:
            return core.costs.Between(x, i, j, z, sqrt_info=U)
        return core.Cost(
            lambda a, b, z: SE3.local(z, SE3.compose(SE3.inverse(a), b)),
            optimized=(x, x),
            aux=(z,),
            index=[i, j],
            sqrt_info=U,
        )

    full = make(measured, U).evaluate(values, jacobians=True)
    for b in range(4):
        one = make(measured[b : b + 1], U[b : b + 1]).evaluate(
            {"x": values["x"][b : b + 1]}, jacobians=True
        )
        torch.testing.assert_close(full.r[b : b + 1], one.r)
        torch.testing.assert_close(full.J[b : b + 1], one.J)
        torch.testing.assert_close(full.cost[b : b + 1], one.cost)


def test_prior_target_shapes_are_equivalent(gen: torch.Generator) -> None:
    """``target`` as (S,), (E, S) and (1, E, S) describe the same factors."""
    x = core.Variable("x", SE3, count=3)
    target = SE3.random(generator=gen, dtype=F64)
    values = {"x": SE3.random(2, 3, generator=gen, dtype=F64)}
    results = [
        core.costs.Prior(x, t).evaluate(values, jacobians=True)
        for t in (target, target.expand(3, 7), target.expand(1, 3, 7))
    ]
    for other in results[1:]:
        torch.testing.assert_close(other.r, results[0].r)
        torch.testing.assert_close(other.cost, results[0].cost)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def _landmarks() -> core.Variable:
    return core.Variable("landmarks", Vector(3), count=4)


def _fn(x: Tensor) -> Tensor:
    return x


@pytest.mark.parametrize(
    "index",
    [torch.tensor([0, 4]), torch.tensor([-1, 2])],
    ids=["too_large", "negative"],
)
def test_index_out_of_range(index: Tensor) -> None:
    with pytest.raises(ValueError, match=r"'obs'.*'landmarks'.*outside \[0, 4\)"):
        core.Cost(_fn, optimized=(_landmarks(),), index=[index], name="obs")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.bool])
def test_index_wrong_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=r"'obs'.*'landmarks'.*int64"):
        core.Cost(
            _fn, optimized=(_landmarks(),), index=[torch.tensor([0, 1]).to(dtype)], name="obs"
        )


def test_index_not_one_dimensional() -> None:
    with pytest.raises(ValueError, match=r"'obs'.*'landmarks'.*1-D"):
        core.Cost(
            _fn, optimized=(_landmarks(),), index=[torch.zeros(2, 2, dtype=torch.long)], name="obs"
        )


def test_index_lengths_mismatch() -> None:
    pose = core.Variable("pose", SE3, count=2)
    with pytest.raises(ValueError, match=r"'obs'.*'landmarks' has 3, expected 2"):
        core.Cost(
            lambda T, p: p,
            optimized=(pose, _landmarks()),
            index=[torch.tensor([0, 1]), torch.tensor([0, 1, 2])],
            name="obs",
        )


def test_index_count_differs_from_variables() -> None:
    with pytest.raises(ValueError, match=r"'obs'.*1 variables but 2 index tensors"):
        core.Cost(
            _fn, optimized=(_landmarks(),), index=[torch.tensor([0]), torch.tensor([1])], name="obs"
        )


def test_empty_index() -> None:
    """Says what is wrong (no factors), not 'has 0, expected 0'."""
    with pytest.raises(ValueError, match=r"'obs': no factors.*'landmarks' is empty \(E = 0\)"):
        core.Cost(
            _fn, optimized=(_landmarks(),), index=[torch.zeros(0, dtype=torch.long)], name="obs"
        )


@pytest.mark.parametrize("shape", [(1, 3, 3), (1,), (2, 5, 3)])
def test_aux_with_wrong_number_of_factors(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"'obs'.*aux 'm'.*E=2"):
        core.Cost(
            lambda p, m: p - m,
            optimized=(_landmarks(),),
            aux={"m": torch.zeros(shape, dtype=F64)},
            index=[torch.tensor([0, 1])],
            name="obs",
        )


def test_aux_not_a_tensor() -> None:
    with pytest.raises(ValueError, match=r"'obs'.*aux 'm'.*tensor"):
        core.Cost(
            lambda p, m: p - m,
            optimized=(_landmarks(),),
            aux={"m": [[1.0]]},
            index=[torch.tensor([0])],
            name="obs",
        )


def test_weight_and_sqrt_info_combine() -> None:
    """W = diag(weight) U: the weight scales the information-whitened residual and Jacobian."""
    gen = torch.Generator().manual_seed(0)
    U = torch.triu(torch.randn(2, 3, 3, generator=gen, dtype=F64)) + 3 * torch.eye(3, dtype=F64)
    w = torch.tensor([[0.5], [2.0]], dtype=F64)
    idx = [torch.tensor([0, 2])]
    values = {"landmarks": torch.randn(1, 4, 3, generator=gen, dtype=F64)}
    both = core.Cost(_fn, optimized=(_landmarks(),), index=idx, weight=w, sqrt_info=U, name="obs")
    only = core.Cost(_fn, optimized=(_landmarks(),), index=idx, sqrt_info=U, name="obs")
    a, b = both.evaluate(values, True), only.evaluate(values, True)
    torch.testing.assert_close(a.r, w * b.r)
    torch.testing.assert_close(a.J, w[..., None] * b.J)
    torch.testing.assert_close(a.cost, 0.5 * (w * b.r).square().sum((1, 2)))


def test_sqrt_info_not_square() -> None:
    with pytest.raises(ValueError, match=r"'obs'.*sqrt_info must be \(d, d\).*got \(3, 2\)"):
        core.Cost(
            _fn,
            optimized=(_landmarks(),),
            index=[torch.tensor([0])],
            name="obs",
            sqrt_info=torch.ones(3, 2, dtype=F64),
        )


@pytest.mark.parametrize("field", ["weight", "sqrt_info"])
def test_weight_with_wrong_number_of_factors(field: str) -> None:
    w = (
        torch.ones(3, 3, dtype=F64)
        if field == "weight"
        else torch.eye(3, dtype=F64).repeat(5, 1, 1)
    )
    with pytest.raises(ValueError, match=rf"'obs'.*{field}"):
        core.Cost(
            _fn, optimized=(_landmarks(),), index=[torch.tensor([0, 1])], name="obs", **{field: w}
        )


def test_count_above_one_needs_index() -> None:
    with pytest.raises(ValueError, match=r"'obs'.*'landmarks' has count 4.*index="):
        core.Cost(_fn, optimized=(_landmarks(),), name="obs")


def test_residual_xor_analytic() -> None:
    x = core.Variable("x", Vector(1))
    with pytest.raises(ValueError, match=r"'obs'.*exactly one"):
        core.Cost(None, optimized=(x,), name="obs")
    with pytest.raises(ValueError, match=r"'obs'.*exactly one"):
        core.Cost(_fn, optimized=(x,), name="obs", analytic=lambda xs, aux, jac: (xs[0], None))
    with pytest.raises(ValueError, match=r"'obs'.*at least one"):
        core.Cost(_fn, optimized=(), name="obs")


def test_library_cost_bad_measurement_shapes() -> None:
    x = core.Variable("x", SE3, count=3)
    with pytest.raises(ValueError, match=r"'x'.*storage size 7"):
        core.costs.Prior(x, torch.zeros(6, dtype=F64))
    with pytest.raises(ValueError, match=r"E = 2"):
        core.costs.Between(
            x, torch.tensor([0, 1]), torch.tensor([1, 2]), SE3.identity(3, dtype=F64)
        )
    with pytest.raises(ValueError, match=r"integer"):
        core.costs.Between(x, torch.tensor([0.0]), torch.tensor([1]), SE3.identity(dtype=F64))


# ------------------------------------------------------------------------------------------
# replacing inputs (what OptimizationLayer does)
# ------------------------------------------------------------------------------------------


def test_inputs_lists_replaceable_tensors() -> None:
    x = core.Variable("x", Vector(2), count=3)
    m = torch.zeros(1, 3, 2, dtype=F64)
    cost = core.Cost(
        lambda x, m: x - m,
        optimized=(x,),
        aux={"m": m},
        index=[torch.arange(3)],
        weight=torch.ones(2, dtype=F64),
        loss=core.RobustLoss("huber", 0.5),
        name="c",
    )
    inputs = cost.inputs()
    assert set(inputs) == {"c.m", "c.weight", "c.loss_scale"}
    assert inputs["c.m"] is m
    new_weight = torch.full((2,), 3.0, dtype=F64)
    replaced = cost.with_inputs({"c.weight": new_weight, "other.m": torch.ones(1)})
    assert replaced.weight is new_weight and replaced.aux["m"] is m
    assert cost.with_inputs({"other.m": torch.ones(1)}) is cost


def test_with_inputs_replaces_aux() -> None:
    x = core.Variable("x", Vector(2), count=3)
    cost = core.Cost(
        lambda x, m: x - m,
        optimized=(x,),
        aux={"m": torch.zeros(1, 3, 2)},
        index=[torch.arange(3)],
        name="c",
    )
    new = torch.randn(1, 3, 2)
    assert cost.with_inputs({"c.m": new}).aux["m"] is new
    # an equal-valued tensor (e.g. a network output that requires grad) must replace it too
    same = torch.zeros(1, 3, 2, requires_grad=True)
    assert cost.with_inputs({"c.m": same}).aux["m"] is same


def test_with_inputs_replaces_equal_valued_unindexed_aux() -> None:
    """A replacement equal in value must still be used (its autograd graph matters); for a cost
    without ``index`` it is given in the same shape as at construction."""
    y = core.Variable("y", Vector(1))
    cost = core.Cost(lambda y, m: y - m, optimized=(y,), aux={"m": torch.ones(1, 1)}, name="d")
    new = torch.ones(1, 1, requires_grad=True)
    replaced = cost.with_inputs({"d.m": new})
    out = replaced.evaluate({"y": torch.zeros(1, 1, 1)}, jacobians=False).cost.sum()
    (grad,) = torch.autograd.grad(out, new)
    assert float(grad) == pytest.approx(1.0)
