"""Ragged batches (core.ragged, OptimizationLayer.ragged): problems of different structures in one
solve equal their separate solves; per-problem state; every backward mode; bad inputs."""

from __future__ import annotations

import pytest
import torch

import core
from core import ragged
from core.optimizer import CONVERGED, FAILED


def graph(n: int, space: core.LieGroup, extra: int, seed: int, weight: bool = False
          ) -> tuple[core.Objective, dict[str, torch.Tensor]]:
    """A random pose graph: odometry chain plus ``extra`` random edges, a gauge prior."""
    g = torch.Generator().manual_seed(seed)
    poses = core.Variable("poses", space, count=n)
    d = space.dof
    truth = space.exp(0.3 * torch.randn(n, d, generator=g, dtype=torch.float64))
    i = torch.cat([torch.arange(n - 1), torch.randint(0, n, (extra,), generator=g)])
    j = torch.cat([torch.arange(1, n), torch.randint(0, n, (extra,), generator=g)])
    keep = i != j
    i, j = i[keep], j[keep]
    meas = space.compose(space.inverse(truth[i]), truth[j])
    meas = space.compose(meas, space.exp(0.05 * torch.randn(len(i), d, generator=g,
                                                            dtype=torch.float64)))
    w = torch.ones(len(i), 1, dtype=torch.float64) if weight else None
    between = core.costs.Between(poses, i, j, meas, weight=w, name="between")
    prior = core.costs.Prior(poses, truth[0], index=0, sqrt_info=1e3, name="prior")
    init = space.compose(truth, space.exp(0.2 * torch.randn(n, d, generator=g,
                                                            dtype=torch.float64)))
    return core.Objective([between, prior]), {"poses": init[None]}


def vector_fit(order: str, n: int, seed: int) -> tuple[core.Objective, dict[str, torch.Tensor]]:
    """Two vector variables ``a``, ``b`` fitted by two custom (autodiff) costs, listed in
    ``order`` ("ab" or "ba"): the merged column order differs from one problem's own."""
    g = torch.Generator().manual_seed(seed)
    a, b = core.Variable("a", core.Vector(2)), core.Variable("b", core.Vector(1))
    x = torch.rand(1, n, generator=g, dtype=torch.float64)
    y = 2 * x**2 + 0.5 + 0.01 * torch.randn(1, n, generator=g, dtype=torch.float64)
    fit_a = core.Cost(lambda a, x, y: y - (a[0] * x**2 + a[1]), [a], {"x": x, "y": y},
                      name="fit_a")
    fit_b = core.Cost(lambda b, a: (b - a[:1]).reshape(1) * 0.1, [b, a], name="fit_b")
    costs = [fit_a, fit_b] if order == "ab" else [fit_b, fit_a]
    init = {"a": torch.zeros(1, 1, 2, dtype=torch.float64),
            "b": torch.zeros(1, 1, 1, dtype=torch.float64)}
    return core.Objective(costs), init


LM = core.LevenbergMarquardt(max_iters=40, rel_tol=1e-10)


@pytest.mark.parametrize("fused", [True, False])
def test_ragged_equals_per_problem(fused: bool) -> None:
    problems = [graph(12, core.SE2, 6, 1), graph(20, core.SE3, 10, 2), graph(8, core.SE2, 3, 3),
                vector_fit("ab", 8, 4), vector_fit("ba", 8, 5)]
    lm = core.LevenbergMarquardt(max_iters=40, rel_tol=1e-10, fused=fused)
    batch = ragged.merge([o for o, _ in problems])
    # same kinds merged: one between and one prior per space, fit_a and fit_b once each
    assert len(batch.objective.costs) == 6
    assert batch.objective.groups is not None and batch.objective.groups.count == 5
    sol = lm.solve(batch.objective, batch.join_values([v for _, v in problems]))
    info = sol.info
    assert info.status.shape == (5,) and info.cost_history.shape[1] == 5
    for p, ((o, v), mine) in enumerate(zip(problems, batch.split_values(sol.values))):
        ref = lm.solve(o, v)
        assert int(info.status[p]) == int(ref.info.status[0]) == CONVERGED
        assert int(info.iterations[p]) == int(ref.info.iterations[0])
        T = ref.info.cost_history.shape[0]
        torch.testing.assert_close(info.cost_history[:T, p], ref.info.cost_history[:, 0],
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(float(info.damping[p]), float(ref.info.damping[0]),
                                   rtol=1e-10, atol=0)
        for k in v:
            torch.testing.assert_close(mine[k], ref.values[k], rtol=1e-10, atol=1e-10)


def test_join_split_and_pattern() -> None:
    problems = [graph(5, core.SE2, 2, 1), graph(4, core.SE3, 2, 2), graph(6, core.SE2, 1, 3)]
    batch = ragged.merge([o for o, _ in problems])
    joined = batch.join_values([v for _, v in problems])
    assert joined["poses"].shape == (1, 11, 4) and joined["poses:SE3"].shape == (1, 4, 7)
    for (_, v), back in zip(problems, batch.split_values(joined)):
        assert torch.equal(v["poses"], back["poses"])
    # the merged pattern is the components' block-diagonal concatenation: compare dense H
    values = joined
    lin = core.linearize(batch.objective, values)
    dense = lin.pattern.to_dense(lin.H)[0]
    cols = batch.objective.groups.columns
    for p, (o, v) in enumerate(problems):
        own = core.linearize(o, v)
        block = dense[cols == p][:, cols == p]
        torch.testing.assert_close(block, own.pattern.to_dense(own.H)[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.cost[p], own.cost[0], rtol=1e-12, atol=0)
    assert float(dense[cols == 0][:, cols != 0].abs().max()) == 0.0


def test_cache_keyed_by_structure_and_bounded() -> None:
    cache = ragged.RaggedCache(size=2)
    a, b, c = (graph(5, core.SE2, 2, s)[0] for s in (1, 2, 3))
    first = ragged.merge([a, b], cache=cache)
    again = ragged.merge([a.with_inputs({}), b], cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    assert again.objective.solvers is first.objective.solvers  # symbolic analyses shared
    assert again.objective.pattern() is first.objective.pattern()
    ragged.merge([b, a], cache=cache)  # another order: another combination
    ragged.merge([a, c], cache=cache)
    assert len(cache) == 2 and cache.misses == 3
    # same structure, other measurements: a hit (the key is the structure, not the data)
    other = a.with_inputs({"between.measured": a.costs[0].aux["measured"].flip(1)})
    ragged.merge([other, c], cache=cache)
    assert cache.hits == 2


def _layer_inputs(problems: list, weights: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{"poses": v["poses"], "between.weight": w} for (_, v), w in zip(problems, weights)]


@pytest.mark.parametrize("backward", ["implicit", "unroll", "truncated", "dlm"])
def test_layer_ragged_matches_per_problem_gradients(backward: str) -> None:
    problems = [graph(6, core.SE2, 3, 1, weight=True), graph(5, core.SE3, 2, 2, weight=True)]
    weights = [o.costs[0].weight.clone().requires_grad_() for o, _ in problems]
    layer = core.OptimizationLayer(problems[0][0], LM, backward=backward)
    out, info = layer.ragged([o for o, _ in problems], _layer_inputs(problems, weights))
    assert info.status.tolist() == [CONVERGED, CONVERGED]
    loss = sum((o["poses"][..., :2] ** 2).sum() for o in out)
    grads = torch.autograd.grad(loss, weights)
    for (o, v), w, gr, mine in zip(problems, weights, grads, out):
        one = core.OptimizationLayer(o, LM, backward=backward)
        sol, _ = one({"poses": v["poses"], "between.weight": w})
        torch.testing.assert_close(mine["poses"], sol["poses"], rtol=1e-10, atol=1e-10)
        (ref,) = torch.autograd.grad((sol["poses"][..., :2] ** 2).sum(), w)
        torch.testing.assert_close(gr, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backward", ["implicit", "unroll"])
def test_layer_ragged_gradcheck(backward: str) -> None:
    problems = [graph(4, core.SE2, 2, 1, weight=True), graph(3, core.SE3, 1, 2, weight=True)]
    lm = core.LevenbergMarquardt(max_iters=60, rel_tol=1e-14, step_tol=1e-14, grad_tol=1e-13)
    # implicit with the exact Hessian: the Gauss-Newton one is exact only at zero residuals
    layer = core.OptimizationLayer(problems[0][0], lm, backward=backward, implicit_hessian="exact")
    objectives = [o for o, _ in problems]

    def f(w0: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, _ = layer.ragged(objectives, _layer_inputs(problems, [w0, w1]))
        return tuple(o["poses"][..., :2] for o in out)

    weights = [(1 + 0.1 * torch.rand(o.costs[0].num_factors, 1, dtype=torch.float64))
               .requires_grad_() for o in objectives]
    assert torch.autograd.gradcheck(f, weights, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_failing_problem_does_not_affect_others() -> None:
    problems = [graph(6, core.SE2, 3, 1, weight=True), graph(5, core.SE3, 2, 2, weight=True),
                graph(7, core.SE2, 2, 3, weight=True)]
    weights = [o.costs[0].weight.clone().requires_grad_() for o, _ in problems]
    inputs = _layer_inputs(problems, weights)
    bad = weights[1].detach().clone()
    bad[0, 0] = float("nan")
    inputs[1] = {**inputs[1], "between.weight": bad.requires_grad_()}
    layer = core.OptimizationLayer(problems[0][0], LM, backward="implicit")
    out, info = layer.ragged([o for o, _ in problems], inputs)
    assert info.status.tolist() == [CONVERGED, FAILED, CONVERGED]
    assert "non-finite" in info.messages[1]
    assert torch.isnan(out[1]["poses"]).all()
    good, _ = layer.ragged([problems[0][0], problems[2][0]], [inputs[0], inputs[2]])
    for k, ref in zip((0, 2), good):
        torch.testing.assert_close(out[k]["poses"], ref["poses"], rtol=0, atol=0)
    loss = sum(o["poses"].nan_to_num().sum() for o in out)
    g0, g1 = torch.autograd.grad(loss, [weights[0], inputs[1]["between.weight"]],
                                 allow_unused=True)
    assert g0 is not None and torch.isfinite(g0).all()
    assert g1 is None or float(g1.abs().max()) == 0.0


def test_optimizer_isolates_a_nan_problem() -> None:
    """Without the layer's setting aside: a problem whose start is NaN fails alone."""
    problems = [graph(6, core.SE2, 3, 1), graph(5, core.SE2, 2, 2)]
    batch = ragged.merge([o for o, _ in problems])
    init = [dict(v) for _, v in problems]
    init[0] = {"poses": torch.full_like(init[0]["poses"], float("nan"))}
    sol = LM.solve(batch.objective, batch.join_values(init))
    ref = LM.solve(*problems[1])
    assert sol.info.status.tolist() == [FAILED, CONVERGED]
    torch.testing.assert_close(batch.split_values(sol.values)[1]["poses"], ref.values["poses"],
                               rtol=1e-10, atol=1e-10)


def test_bad_inputs() -> None:
    (a, va), (b, vb) = graph(5, core.SE2, 2, 1), graph(4, core.SE3, 1, 2)
    layer = core.OptimizationLayer(a, LM)
    with pytest.raises(ValueError, match="at least one"):
        layer.ragged([], [])
    with pytest.raises(ValueError, match="at least one"):
        ragged.merge([])
    with pytest.raises(ValueError, match="2 objectives but 1 inputs"):
        layer.ragged([a, b], [va])
    with pytest.raises(ValueError, match="problem 1: .*float32"):
        layer.ragged([a, b], [va, {"poses": vb["poses"].float()}])
    with pytest.raises(ValueError, match="problem 1: .*meta"):
        layer.ragged([a, b], [va, {"poses": vb["poses"].to("meta")}])
    with pytest.raises(ValueError, match="problem 1: missing initial values"):
        layer.ragged([a, b], [va, {}])
    with pytest.raises(ValueError, match="problem 0: batch size must be 1"):
        layer.ragged([a, b], [{"poses": va["poses"].expand(2, -1, -1)}, vb])
    batch = ragged.merge([a, b])
    with pytest.raises(ValueError, match="problem 1: variable 'poses' is torch.float32"):
        batch.join_values([va, {"poses": vb["poses"].float()}])
    with pytest.raises(ValueError, match="problem 0 is itself a ragged batch"):
        ragged.merge([batch.objective])
