"""A ragged batch's sparse factorizations (core.solvers.sparse.RaggedCholesky): one block per
problem, only the problems still running; results equal the whole block-diagonal factorization's
and the per-problem solves'; failures (not positive definite) stay in their block."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import core
from core import ragged
from core.linearize import linearize
from core.optimizer import CONVERGED, FAILED
from core.solvers import SparseCholesky
from core.solvers.sparse import RaggedCholesky, RaggedFactor, split_blocks

# sizes give every problem its own number of unknowns, so a factorization's size names it
SIZES = (40, 12, 25)
NOISE = (0.3, 0.01, 0.1)  # initial errors: the problems converge after different iterations
LM = core.LevenbergMarquardt(max_iters=60, rel_tol=1e-10, solver="sparse")


def graph(n: int, noise: float, seed: int, weight: bool
          ) -> tuple[core.Objective, dict[str, torch.Tensor]]:
    """An SE(2) pose graph: odometry chain plus ``n // 2`` random edges, a gauge prior, the
    start ``noise`` away from the truth."""
    g = torch.Generator().manual_seed(seed)
    space = core.SE2
    poses = core.Variable("poses", space, count=n)
    truth = space.exp(0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64))
    i = torch.cat([torch.arange(n - 1), torch.randint(0, n, (n // 2,), generator=g)])
    j = torch.cat([torch.arange(1, n), torch.randint(0, n, (n // 2,), generator=g)])
    i, j = i[i != j], j[i != j]
    meas = space.compose(space.compose(space.inverse(truth[i]), truth[j]), space.exp(
        0.05 * torch.randn(len(i), 3, generator=g, dtype=torch.float64)))
    w = torch.ones(len(i), 1, dtype=torch.float64) if weight else None
    between = core.costs.Between(poses, i, j, meas, weight=w, name="between")
    prior = core.costs.Prior(poses, truth[0], index=0, sqrt_info=1e3, name="prior")
    init = space.compose(truth, space.exp(noise * torch.randn(n, 3, generator=g,
                                                              dtype=torch.float64)))
    return core.Objective([between, prior]), {"poses": init[None]}


def problems(weight: bool = False) -> list[tuple[core.Objective, dict[str, torch.Tensor]]]:
    return [graph(n, e, seed, weight) for seed, (n, e) in enumerate(zip(SIZES, NOISE))]


class Spy:
    """Counts ``SparseCholesky.factor_values`` calls by the size of the factored matrix; a
    factorization of the whole block-diagonal matrix counts for every problem."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: Counter[int] = Counter()
        original = SparseCholesky.factor_values

        def spy(solver: SparseCholesky, pattern: core.objective.Pattern, values, device,  # noqa: ANN001, ANN202
                *args):  # noqa: ANN002
            self.sizes[pattern.n] += values.shape[0]
            return original(solver, pattern, values, device, *args)

        monkeypatch.setattr(SparseCholesky, "factor_values", spy)

    def per_problem(self) -> list[int]:
        whole = self.sizes[3 * sum(SIZES)]
        return [self.sizes[3 * n] + whole for n in SIZES]


def test_converged_problems_are_not_factored_again(monkeypatch: pytest.MonkeyPatch) -> None:
    probs = problems()
    batch = ragged.merge([o for o, _ in probs])
    spy = Spy(monkeypatch)
    sol = LM.solve(batch.objective, batch.join_values([v for _, v in probs]))
    iterations = sol.info.iterations.tolist()
    assert sol.info.status.tolist() == [CONVERGED] * 3
    assert len(set(iterations)) > 1  # they stop at different iterations
    # one factorization per iteration each problem ran, none after it converged
    assert spy.per_problem() == iterations
    # the whole matrix while all three run, then the running problems' blocks only
    whole = spy.sizes[3 * sum(SIZES)]
    assert whole == min(iterations)
    assert sum(spy.sizes.values()) == sum(iterations) - 2 * whole


def test_equals_whole_matrix_factorization_and_per_problem_solves() -> None:
    probs = problems()
    batch = ragged.merge([o for o, _ in probs])
    init = batch.join_values([v for _, v in probs])
    mine = LM.solve(batch.objective, init)
    whole = core.LevenbergMarquardt(max_iters=60, rel_tol=1e-10, solver=SparseCholesky()).solve(
        batch.objective, init)  # a solver instance: one factorization of the whole matrix
    assert mine.info.status.tolist() == whole.info.status.tolist()
    assert mine.info.iterations.tolist() == whole.info.iterations.tolist()
    torch.testing.assert_close(mine.info.cost_history, whole.info.cost_history, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(mine.values["poses"], whole.values["poses"], rtol=1e-10,
                               atol=1e-10)
    for (o, v), got in zip(probs, batch.split_values(mine.values)):
        ref = LM.solve(o, v)
        torch.testing.assert_close(got["poses"], ref.values["poses"], rtol=1e-10, atol=1e-10)


def test_layer_implicit_factors_every_problem_once_at_its_solution(
        monkeypatch: pytest.MonkeyPatch) -> None:
    probs = problems(weight=True)
    weights = [o.costs[0].weight.clone().requires_grad_() for o, _ in probs]
    inputs = [{"poses": v["poses"], "between.weight": w} for (_, v), w in zip(probs, weights)]
    layer = core.OptimizationLayer(probs[0][0], LM, backward="implicit")
    spy = Spy(monkeypatch)
    out, info = layer.ragged([o for o, _ in probs], inputs)
    assert spy.per_problem() == [k + 1 for k in info.iterations.tolist()]
    grads = torch.autograd.grad(sum((o["poses"][..., :2] ** 2).sum() for o in out), weights)
    for (o, v), w, g, mine in zip(probs, weights, grads, out):
        sol, _ = core.OptimizationLayer(o, LM, backward="implicit")(
            {"poses": v["poses"], "between.weight": w})
        torch.testing.assert_close(mine["poses"], sol["poses"], rtol=1e-10, atol=1e-10)
        (ref,) = torch.autograd.grad((sol["poses"][..., :2] ** 2).sum(), w)
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-10)


def _system(probs: list) -> tuple[core.Objective, core.linearize.Linearization]:
    batch = ragged.merge([o for o, _ in probs])
    return batch.objective, linearize(batch.objective, batch.join_values([v for _, v in probs]))


def test_factor_skips_inactive_blocks_and_solves_the_active_ones() -> None:
    objective, lin = _system(problems())
    damping = torch.full_like(lin.g, 1e-3)
    solver = RaggedCholesky(objective.groups)
    active = torch.tensor([True, False, True])
    factor = solver.factor(lin.H, lin.pattern, damping, active)
    assert isinstance(factor, RaggedFactor) and factor.factors[1] is None
    assert factor.ok.tolist() == [True] and factor.problem_ok.tolist() == [True] * 3
    x = factor.solve(lin.g)
    A = lin.pattern.to_dense(lin.H + 0)[0] + torch.diag(damping[0])
    cols = objective.groups.columns
    for p in range(3):
        mine = cols == p
        if p == 1:
            assert float(x[0, mine].abs().max()) == 0.0
        else:
            ref = torch.linalg.solve(A[mine][:, mine], lin.g[0, mine])
            torch.testing.assert_close(x[0, mine], ref, rtol=1e-9, atol=1e-12)


def test_a_block_not_positive_definite_fails_alone() -> None:
    objective, lin = _system(problems())
    cols = objective.groups.columns
    damping = torch.where(cols == 2, -1e9, 1e-3)[None].to(lin.g.dtype)  # problem 2 indefinite
    factor = RaggedCholesky(objective.groups).factor(lin.H, lin.pattern, damping)
    assert factor.problem_ok.tolist() == [True, True, False] and factor.ok.tolist() == [False]
    x = factor.solve(lin.g)
    assert float(x[0, cols == 2].abs().max()) == 0.0 and bool(torch.isfinite(x).all())
    assert float(x[0, cols == 0].abs().max()) > 0.0


def test_singular_problem_is_set_aside_alone() -> None:
    """At the solution a problem without its gauge prior is singular: only it is FAILED."""
    probs = problems()
    o, v = probs[1]
    probs[1] = (core.Objective([o.costs[0]]), v)  # between only: a gauge freedom
    layer = core.OptimizationLayer(probs[0][0], LM, backward="implicit")
    inputs = [dict(v) for _, v in probs]
    out, info = layer.ragged([o for o, _ in probs], inputs)
    assert info.status.tolist() == [CONVERGED, FAILED, CONVERGED]
    assert "singular" in info.messages[1]
    assert torch.isnan(out[1]["poses"]).all() and torch.isfinite(out[0]["poses"]).all()


def test_split_blocks() -> None:
    objective, lin = _system(problems())
    pattern, cols = lin.pattern, objective.groups.columns
    blocks = split_blocks(pattern, cols.numpy(), 3)
    dense = pattern.to_dense(lin.H)[0]
    for p, block in enumerate(blocks):
        assert block.columns.tolist() == torch.nonzero(cols == p).flatten().tolist()
        own = block.pattern.to_dense(lin.H[:, torch.from_numpy(block.entries)])[0]
        index = torch.from_numpy(block.columns)
        torch.testing.assert_close(own, dense[index][:, index], rtol=0, atol=0)
        assert (block.pattern.rows[block.pattern.diag] == torch.arange(block.pattern.n)).all()
    with pytest.raises(ValueError, match="not block-diagonal"):
        split_blocks(pattern, (cols.numpy() + torch.arange(cols.shape[0]).numpy()) % 3, 3)
