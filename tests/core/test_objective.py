"""Tests for core.objective and core.linearize: validation, ordering, pattern, normal equations.

The normal equations are checked against a dense Jacobian computed by autograd through
``objective.retract`` (a tangent perturbation of all variables at once).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.autograd.functional import jacobian

import core
from core.lie import SE2, SE3, Vector

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def stacked_residuals(objective: core.Objective, values: dict[str, Tensor]) -> Tensor:
    """All weighted residuals, ``(B, M)``."""
    rs = [c.evaluate(values, jacobians=False).r for c in objective.costs]
    return torch.cat([r.reshape(r.shape[0], -1) for r in rs], dim=1)


def dense_normal_equations(
    objective: core.Objective, values: dict[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """``(J^T J, J^T r, r)`` with ``J (B, M, n)`` from autograd over a tangent perturbation."""
    first = values[objective.variables[0].name]
    batch = first.shape[0]
    zero = first.new_zeros(batch, objective.dim)

    def residuals(delta: Tensor) -> Tensor:
        return stacked_residuals(objective, objective.retract(values, delta))

    full = jacobian(residuals, zero)  # (B, M, B, n)
    J = torch.stack([full[b, :, b, :] for b in range(batch)])
    r = residuals(zero)
    return J.mT @ J, (J.mT @ r[..., None])[..., 0], r


def mixed_problem(g: torch.Generator, batch: int = 2):
    """SE3 poses + Vector(3) landmarks: between and prior costs plus a user observation cost."""
    poses = core.Variable("poses", SE3, count=3)
    points = core.Variable("points", Vector(3), count=4)
    values = {
        "poses": SE3.random(batch, 3, generator=g, dtype=F64),
        "points": torch.randn(batch, 4, 3, generator=g, dtype=F64),
    }
    i, j = torch.tensor([0, 1, 0]), torch.tensor([1, 2, 2])
    rel = SE3.compose(SE3.inverse(values["poses"][:, i]), values["poses"][:, j])
    measured = SE3.retract(rel, 0.3 * torch.randn(batch, 3, 6, generator=g, dtype=F64))
    A = torch.randn(3, 6, 6, generator=g, dtype=F64)
    U = torch.linalg.cholesky(A @ A.mT + torch.eye(6, dtype=F64), upper=True)
    between = core.costs.Between(poses, i, j, measured, sqrt_info=U, name="between")
    prior = core.costs.Prior(
        poses, SE3.random(generator=g, dtype=F64), index=0, sqrt_info=5.0, name="prior"
    )
    obs_pose, obs_point = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 3, 0])
    seen = torch.randn(1, 6, 3, generator=g, dtype=F64)

    def observe(T: Tensor, p: Tensor, m: Tensor) -> Tensor:
        return SE3.act(SE3.inverse(T), p) - m

    obs = core.Cost(
        observe,
        optimized=(poses, points),
        aux={"seen": seen},
        index=[obs_pose, obs_point],
        weight=torch.tensor([1.0, 2.0, 0.5], dtype=F64),
        name="observe",
    )
    return core.Objective([between, obs, prior]), values


def assert_csc_symmetric(pattern: core.Pattern) -> None:
    n, rows, cols = pattern.n, pattern.rows, pattern.cols
    assert pattern.indptr.shape == (n + 1,) and int(pattern.indptr[0]) == 0
    assert int(pattern.indptr[-1]) == pattern.nnz
    # column-major order, rows strictly increasing within each column
    torch.testing.assert_close(
        pattern.indptr[1:] - pattern.indptr[:-1], torch.bincount(cols, minlength=n)
    )
    assert bool((cols[1:] >= cols[:-1]).all())
    same_col = cols[1:] == cols[:-1]
    assert bool((rows[1:][same_col] > rows[:-1][same_col]).all())
    for c in range(n):
        lo, hi = int(pattern.indptr[c]), int(pattern.indptr[c + 1])
        assert bool((cols[lo:hi] == c).all())
    # symmetric: (r, c) present iff (c, r) present
    keys = set((rows * n + cols).tolist())
    assert keys == set((cols * n + rows).tolist())
    # diagonal positions
    assert pattern.diag.shape == (n,)
    torch.testing.assert_close(rows[pattern.diag], torch.arange(n))
    torch.testing.assert_close(cols[pattern.diag], torch.arange(n))


# ------------------------------------------------------------------------------------------
# normal equations
# ------------------------------------------------------------------------------------------


def test_linearize_matches_dense_autograd(gen: torch.Generator) -> None:
    objective, values = mixed_problem(gen)
    assert objective.dim == 3 * 6 + 4 * 3
    lin = core.linearize(objective, values)
    H, g, r = dense_normal_equations(objective, values)
    torch.testing.assert_close(lin.pattern.to_dense(lin.H), H, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lin.g, g, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lin.cost, 0.5 * (r**2).sum(-1))
    torch.testing.assert_close(lin.cost, objective.cost(values))
    # the dense H really has off-diagonal blocks between poses and points
    assert float(H[:, :18, 18:].abs().max()) > 1e-3


def test_gradient_is_gradient_of_cost(gen: torch.Generator) -> None:
    objective, values = mixed_problem(gen, batch=3)
    lin = core.linearize(objective, values)
    grad = jacobian(
        lambda d: objective.cost(objective.retract(values, d)).sum(),
        torch.zeros(3, objective.dim, dtype=F64),
    )
    torch.testing.assert_close(lin.g, grad, atol=1e-9, rtol=1e-8)


def test_pattern_structure_and_caching(gen: torch.Generator) -> None:
    objective, values = mixed_problem(gen)
    pattern = objective.pattern()
    assert_csc_symmetric(pattern)
    assert objective.pattern() is pattern
    assert objective.pattern("cpu") is pattern
    lin1 = core.linearize(objective, values)
    lin2 = core.linearize(objective, {k: v.clone() for k, v in values.items()})
    assert lin1.pattern is pattern and lin2.pattern is pattern
    # exactly the entries of the block structure: pose-pose blocks for between/prior edges and
    # observations, pose-point blocks for observations, point-point diagonal blocks
    dense = torch.zeros(objective.dim, objective.dim, dtype=torch.bool)
    dense[pattern.rows, pattern.cols] = True
    assert not bool(dense[18:21, 21:24].any())  # points 0 and 1 never share a factor
    assert bool(dense[0:6, 18:24].all())  # pose 0 observes points 0 and 1
    assert bool(dense[12:18, 18:21].all())  # pose 2 observes point 0
    assert not bool(dense[6:12, 27:30].any())  # pose 1 never observes point 3
    assert bool(dense[:18, :18].all())  # between edges (0,1), (1,2), (0,2): all pose blocks


def test_pattern_block_form_is_lazy_and_equals_positions(gen: torch.Generator) -> None:
    """The objective's pattern holds the block form ``tops`` only (no ``(E, D, D)`` positions,
    no per-entry columns: BA's would be 70 MB of fresh pages per objective); the derived
    positions and columns are those of the definition, and a pattern made from positions
    derives the trivial block form (one row per slot) with the same entries."""
    objective, _ = mixed_problem(gen)
    pattern = objective.pattern()
    assert pattern.given_positions is None and pattern.given_cols is None
    assert "positions" not in vars(pattern) and "cols" not in vars(pattern)
    n = objective.dim
    counts = pattern.indptr.diff()
    torch.testing.assert_close(pattern.cols, torch.repeat_interleave(torch.arange(n), counts))
    for c, pos, (top, rowmap), col in zip(objective.costs, pattern.positions, pattern.tops,
                                          pattern.columns, strict=True):
        D = col.shape[1]
        assert pos.shape == (c.num_factors, D, D) and top.shape[1] == len(c.optimized)
        # entry (p, q) of factor e's block sits in column col[e, q] at row col[e, p]
        assert bool((pattern.rows[pos] == col[:, :, None]).all())
        assert bool((pattern.cols[pos] == col[:, None, :]).all())
        again = core.Pattern(n, pattern.indptr, pattern.rows, None, pattern.diag, (pos,),
                             (col,))
        (top2, rowmap2), = again.tops
        assert torch.equal(top2[:, rowmap2[0], :] + rowmap2[1][None, :, None], pos)
        assert torch.equal(top[:, rowmap[0], :] + rowmap[1][None, :, None], pos)


@pytest.mark.parametrize("seed", range(6))
def test_pattern_rows_kernel_equals_numpy(seed: int, monkeypatch) -> None:
    """The compiled pass writing the pattern's rows equals the NumPy reference on random
    structures (mixed block sizes, repeated and missing block pairs)."""
    if not core._kernels.AVAILABLE:
        pytest.skip("Numba kernels disabled")
    g = torch.Generator().manual_seed(seed)
    objective, _ = mixed_problem(g)
    extra = core.Variable("extra", SE2, count=5)
    i = torch.randint(0, 5, (7,), generator=g)
    j = (i + torch.randint(1, 5, (7,), generator=g)) % 5
    between = core.costs.Between(extra, i, j, SE2.random(1, 7, generator=g, dtype=F64),
                                 name="extra")
    objective = core.Objective([*objective.costs, between])
    rows = objective.pattern().rows
    monkeypatch.setattr(core._kernels, "AVAILABLE", False)
    again = core.Objective(objective.costs)
    assert torch.equal(again.pattern().rows, rows)


def test_pattern_matvec_and_to_dense(gen: torch.Generator) -> None:
    objective, values = mixed_problem(gen)
    lin = core.linearize(objective, values)
    x = torch.randn(2, objective.dim, generator=gen, dtype=F64)
    dense = lin.pattern.to_dense(lin.H)
    torch.testing.assert_close(lin.pattern.matvec(lin.H, x), (dense @ x[..., None])[..., 0])
    torch.testing.assert_close(dense, dense.mT)


def test_ordering_and_retract(gen: torch.Generator) -> None:
    """Variables in order of first appearance; ``retract`` moves only the block it is given."""
    objective, values = mixed_problem(gen)
    assert [v.name for v in objective.variables] == ["poses", "points"]
    assert objective.offsets == {"poses": 0, "points": 18}
    assert objective.describe_column(0) == "poses[0].0"
    assert objective.describe_column(17) == "poses[2].5"
    assert objective.describe_column(25) == "points[2].1"
    delta = torch.zeros(2, objective.dim, dtype=F64)
    delta[1, 25] = 0.5
    moved = objective.retract(values, delta)
    torch.testing.assert_close(moved["poses"], values["poses"])
    expected = values["points"].clone()
    expected[1, 2, 1] += 0.5
    torch.testing.assert_close(moved["points"], expected)


def _random_graph(space, n: int, extra: list[tuple[int, int]], seed: int):
    g = torch.Generator().manual_seed(seed)
    x = core.Variable("x", space, count=n)
    pairs = [(k, k + 1) for k in range(n - 1)] + [(a, b) for a, b in extra if a != b]
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    values = {"x": space.random(2, n, generator=g, dtype=F64)}
    measured = space.random(len(pairs), generator=g, dtype=F64)
    between = core.costs.Between(
        x,
        i,
        j,
        measured,
        sqrt_info=torch.rand(len(pairs), space.dof, generator=g, dtype=F64).add(0.5).diag_embed(),
    )
    prior = core.costs.Prior(x, space.identity(dtype=F64), index=0)
    return core.Objective([between, prior]), values


@given(
    space=st.sampled_from([SE2, SE3]),
    n=st.integers(2, 5),
    extra=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=10, deadline=None)
def test_linearize_random_graphs(space, n: int, extra, seed: int) -> None:
    extra = [(a % n, b % n) for a, b in extra]
    objective, values = _random_graph(space, n, extra, seed)
    lin = core.linearize(objective, values)
    assert_csc_symmetric(lin.pattern)
    H, g, _ = dense_normal_equations(objective, values)
    torch.testing.assert_close(lin.pattern.to_dense(lin.H), H, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(lin.g, g, atol=1e-8, rtol=1e-8)
    # entries of H outside the pattern are structurally zero: the pattern covers H exactly
    blocks = {(a, b) for a, b in [(k, k + 1) for k in range(n - 1)] + extra}
    blocks |= {(b, a) for a, b in blocks} | {(k, k) for k in range(n)}
    assert lin.pattern.nnz == len(blocks) * space.dof**2


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _vec_cost(var: core.Variable, name: str, index=None, aux=None) -> core.CostTable:
    if index is None:
        index = torch.arange(var.count)
    m = aux if aux is not None else torch.zeros(1, index.shape[0], var.space.dim, dtype=F64)
    return core.Cost(lambda x, m: x - m, optimized=(var,), aux={"m": m}, index=[index], name=name)


def test_empty_objective() -> None:
    with pytest.raises(ValueError, match="at least one cost"):
        core.Objective([])


def test_duplicate_cost_names() -> None:
    x = core.Variable("x", Vector(2), count=2)
    with pytest.raises(ValueError, match=r"unique.*'fit'"):
        core.Objective([_vec_cost(x, "fit"), _vec_cost(x, "other"), _vec_cost(x, "fit")])


def test_two_variables_with_one_name() -> None:
    a, b = core.Variable("x", Vector(2), count=2), core.Variable("x", Vector(2), count=2)
    with pytest.raises(ValueError, match="two different variables are named 'x'"):
        core.Objective([_vec_cost(a, "a"), _vec_cost(b, "b")])


def test_missing_initial_value() -> None:
    x, y = core.Variable("x", Vector(2), count=2), core.Variable("y", Vector(1))
    objective = core.Objective([_vec_cost(x, "a"), _vec_cost(y, "b")])
    with pytest.raises(ValueError, match="missing initial value for variable 'y'"):
        objective.check_values({"x": torch.zeros(1, 2, 2, dtype=F64)})
    with pytest.raises(ValueError, match="'y'"):
        core.LevenbergMarquardt().solve(objective, {"x": torch.zeros(1, 2, 2, dtype=F64)})


@pytest.mark.parametrize("shape", [(2, 2), (1, 3, 2), (1, 2, 3), (1, 1, 2, 2)])
def test_wrong_value_shape(shape: tuple[int, ...]) -> None:
    x = core.Variable("x", Vector(2), count=2)
    objective = core.Objective([_vec_cost(x, "a")])
    msg = r"'x'.*\(B, 2, 2\), got " + str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=msg):
        objective.check_values({"x": torch.zeros(shape, dtype=F64)})


def test_dtype_mismatch_between_variables() -> None:
    x, y = core.Variable("x", Vector(2), count=2), core.Variable("y", Vector(1))
    objective = core.Objective([_vec_cost(x, "a"), _vec_cost(y, "b", aux=torch.zeros(1, 1, 1))])
    with pytest.raises(ValueError, match=r"'y'.*float32.*'x'.*float64"):
        objective.check_values(
            {"x": torch.zeros(1, 2, 2, dtype=F64), "y": torch.zeros(1, 1, 1, dtype=torch.float32)}
        )


def test_dtype_mismatch_between_aux_and_values() -> None:
    x = core.Variable("x", Vector(2), count=2)
    objective = core.Objective([_vec_cost(x, "a", aux=torch.zeros(1, 2, 2, dtype=torch.float32))])
    with pytest.raises(ValueError, match=r"a\.m is torch.float32.*'x' is torch.float64"):
        objective.check_values({"x": torch.zeros(1, 2, 2, dtype=F64)})


def test_integer_values_rejected() -> None:
    x = core.Variable("x", Vector(2), count=2)
    objective = core.Objective([_vec_cost(x, "a")])
    with pytest.raises(ValueError, match="'x'.*floating point"):
        objective.check_values({"x": torch.zeros(1, 2, 2, dtype=torch.long)})


def test_integer_aux_rejected() -> None:
    x = core.Variable("x", Vector(2), count=2)
    with pytest.raises(ValueError, match=r"'a'.*a\.m.*floating point"):
        core.Objective([_vec_cost(x, "a", aux=torch.zeros(1, 2, 2, dtype=torch.long))])


def test_batch_mismatch_between_variables() -> None:
    x, y = core.Variable("x", Vector(2), count=2), core.Variable("y", Vector(1))
    objective = core.Objective([_vec_cost(x, "a"), _vec_cost(y, "b")])
    with pytest.raises(ValueError, match=r"'y' has batch 3.*'x' has batch 2"):
        objective.check_values(
            {"x": torch.zeros(2, 2, 2, dtype=F64), "y": torch.zeros(3, 1, 1, dtype=F64)}
        )


def test_batch_mismatch_between_aux_and_values() -> None:
    x = core.Variable("x", Vector(2), count=2)
    objective = core.Objective([_vec_cost(x, "a", aux=torch.zeros(3, 2, 2, dtype=F64))])
    assert objective.check_values({"x": torch.zeros(3, 2, 2, dtype=F64)}) == 3
    with pytest.raises(ValueError, match=r"a\.m has batch dimension 3, expected 1 or 2"):
        objective.check_values({"x": torch.zeros(2, 2, 2, dtype=F64)})


@pytest.mark.parametrize("field", ["sqrt_info", "weight"])
def test_batched_weight_batch_mismatch(field: str) -> None:
    x = core.Variable("x", SE3, count=3)
    i, j = torch.tensor([0, 1]), torch.tensor([1, 2])
    w = (
        torch.eye(6, dtype=F64).expand(3, 2, 6, 6)
        if field == "sqrt_info"
        else torch.ones(3, 2, 6, dtype=F64)
    )
    between = core.costs.Between(x, i, j, SE3.identity(2, dtype=F64), name="b", **{field: w})
    objective = core.Objective([between, core.costs.Prior(x, SE3.identity(dtype=F64), index=0)])
    with pytest.raises(ValueError, match=rf"b\.{field}.*batch"):
        objective.check_values({"x": SE3.identity(2, 3, dtype=F64)})


def test_variable_column_in_no_cost() -> None:
    """An element that no factor reads would make H singular: an error naming it."""
    x = core.Variable("x", Vector(2), count=3)
    cost = _vec_cost(x, "a", index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"x\[1\]\.0.*appears in no cost"):
        objective = core.Objective([cost])
        objective.pattern()


def test_with_inputs_shares_the_pattern(gen: torch.Generator) -> None:
    objective, values = mixed_problem(gen)
    pattern = objective.pattern()
    seen = torch.randn(1, 6, 3, generator=gen, dtype=F64)
    new = objective.with_inputs({"observe.seen": seen})
    assert new.pattern() is pattern
    assert new.costs[1].aux["seen"] is seen and objective.costs[1].aux["seen"] is not seen
    assert not torch.allclose(new.cost(values), objective.cost(values))
    with pytest.raises(ValueError, match=r"unknown inputs \['observe\.typo'\]"):
        objective.with_inputs({"observe.typo": seen})


@pytest.mark.parametrize("chunk", [1, 5, 24])
def test_chunked_linearization_equals_whole(chunk: int, gen: torch.Generator, monkeypatch) -> None:
    """Costs evaluated a few factors at a time (``Cost.factors`` views) assemble exactly the
    same normal equations: per-factor weights, sqrt_info, aux and robust scales are sliced,
    shared ones kept."""
    import importlib

    lin_module = importlib.import_module("core.linearize")  # core.linearize is also the function

    B, n, E = 3, 7, 11
    x = core.Variable("x", SE3, count=n)
    i = torch.randint(0, n, (E,), generator=gen)
    j = (i + 1 + torch.randint(0, n - 1, (E,), generator=gen)) % n
    z = SE3.random(B, E, generator=gen, dtype=torch.float64)
    M = torch.randn(E, 6, 6, generator=gen, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.eye(6, dtype=torch.float64) + 0.1 * M @ M.mT, upper=True)
    scale = 0.5 + torch.rand(B, E, generator=gen, dtype=torch.float64)
    costs = [
        core.costs.Between(
            x, i, j, z, sqrt_info=U, name="per_factor", loss=core.RobustLoss("cauchy", scale)
        ),
        core.costs.Between(
            x, j, i, z, weight=torch.rand(1, E, 6, generator=gen).double(), name="weighted"
        ),
        core.costs.Prior(x, SE3.identity(dtype=torch.float64), index=0, sqrt_info=3.0),
    ]
    objective = core.Objective(costs)
    values = {"x": SE3.random(B, n, generator=gen, dtype=torch.float64)}
    whole = core.linearize(objective, values)
    monkeypatch.setattr(lin_module, "CHUNK", chunk * B)
    parts = core.linearize(objective, values)
    torch.testing.assert_close(parts.H, whole.H)
    torch.testing.assert_close(parts.g, whole.g)
    torch.testing.assert_close(parts.cost, whole.cost)


def test_float_weights_and_scales_work_with_aux_on_any_device() -> None:
    """A float weight or robust scale (a 0-dim CPU tensor) does not pin the objective to the CPU;
    a real CPU tensor next to aux on another device still raises."""
    x = core.Variable("x", SE3, count=3)
    i, j = torch.tensor([0, 1]), torch.tensor([1, 2])
    z = torch.zeros(1, 2, 7, dtype=torch.float64, device="meta")
    loss = core.RobustLoss("cauchy", 2.0)
    core.Objective([core.costs.Between(x, i, j, z, sqrt_info=3.0, loss=loss)])  # no raise
    w = torch.ones(1, 2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight is on cpu but .*measured is on meta"):
        core.Objective([core.costs.Between(x, i, j, z, weight=w, name="b")])


def test_to_returns_the_same_objective_when_already_there() -> None:
    """``Objective.to`` is called by every solve: it must not copy an objective whose tensors are
    already on the device (float robust scales, 0-dim CPU tensors, count as anywhere)."""
    x = core.Variable("x", SE3, count=3)
    z = SE3.identity(1, 2, dtype=torch.float64)
    loss = core.RobustLoss("huber", 1.0)
    cost = core.costs.Between(x, torch.tensor([0, 1]), torch.tensor([1, 2]), z, loss=loss)
    objective = core.Objective([cost])
    assert objective.to("cpu") is objective
    moved = objective.to("meta")
    assert moved is not objective and moved.costs[0].index[0].device.type == "meta"
    assert moved.to("meta") is moved


def test_values_on_another_device_than_the_indices_raise_clearly(gen: torch.Generator) -> None:
    """``linearize`` on values away from the objective's indices names the fix instead of copying
    the indices at every evaluation; the optimizer moves the objective itself."""
    x = core.Variable("x", SE3, count=3)
    cost = core.costs.Between(x, torch.tensor([0, 1]), torch.tensor([1, 2]),
                              SE3.identity(1, 2, dtype=torch.float64), name="b")
    objective = core.Objective([cost])
    values = {"x": SE3.random(1, 3, generator=gen, dtype=torch.float64).to("meta")}
    with pytest.raises(ValueError, match=r"cost 'b': indices on cpu but 'x' on meta.*\.to"):
        core.linearize(objective, values)


@pytest.mark.parametrize("d", [1, 2, 3, 6])
def test_normal_blocks_match_einsum_and_are_differentiable(d: int, gen: torch.Generator) -> None:
    """J^T J and J^T r per factor: outer products for d <= 3, a batched matmul above."""
    from core.linearize import normal_blocks

    J = torch.randn(2, 5, d, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, d, generator=gen, dtype=torch.float64, requires_grad=True)
    JtJ, Jtr = normal_blocks(J, r)
    torch.testing.assert_close(JtJ, torch.einsum("bedp,bedq->bepq", J, J))
    torch.testing.assert_close(Jtr, torch.einsum("bedp,bed->bep", J, r))
    assert torch.autograd.gradcheck(normal_blocks, (J, r))
