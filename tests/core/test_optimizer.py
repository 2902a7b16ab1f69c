"""Tests for core.optimizer: Levenberg-Marquardt and Gauss-Newton reach known optima.

Known optima: linear least squares (``torch.linalg.lstsq``), the quadratic-fit example,
Rosenbrock as a 2-residual problem, and synthetic SE2/SE3 pose graphs with zero noise (the ground
truth, pinned by a prior on the first pose). Batching must not couple the elements.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import core
from core.lie import SE2, SE3, Vector

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]
OPTIMIZERS = {
    "lm": lambda **kw: core.LevenbergMarquardt(**kw),
    "gn": lambda **kw: core.GaussNewton(**kw),
}


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------


def linear_problem(g: torch.Generator, batch: int = 2, m: int = 12, n: int = 4):
    x = core.Variable("x", Vector(n))
    A = torch.randn(batch, m, n, generator=g, dtype=F64)
    b = torch.randn(batch, m, generator=g, dtype=F64)
    cost = core.Cost(lambda x, A, b: A @ x - b, optimized=(x,), aux={"A": A, "b": b}, name="lin")
    return core.Objective([cost]), {"x": torch.zeros(batch, 1, n, dtype=F64)}, A, b


def rosenbrock(start: tuple[float, float] = (-1.2, 1.0), batch: int = 1):
    """f = 0.5 (r1^2 + r2^2) with r1 = 10 (y - x^2), r2 = 1 - x: minimum 0 at (1, 1)."""
    p = core.Variable("p", Vector(2))

    def residual(p: Tensor) -> Tensor:
        return torch.stack([10 * (p[1] - p[0] ** 2), 1 - p[0]])

    init = torch.tensor(start, dtype=F64).expand(batch, 1, 2).clone()
    return core.Objective([core.Cost(residual, optimized=(p,), name="rosenbrock")]), {"p": init}


def synthetic_graph(
    space,
    n: int,
    loops: list[tuple[int, int]],
    seed: int,
    batch: int = 1,
    noise: Tensor | float = 0.0,
    perturb: float = 0.1,
):
    """Ground-truth trajectory (random walk), exact (or noisy) relative measurements along a
    chain plus loop closures, a prior pinning pose 0 at the truth, and a perturbed start."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(n - 1, space.dof, generator=g, dtype=F64)
    rot = 2 if space == SE2 else slice(3, 6)
    steps[:, rot] *= 0.3
    truth = [space.random(generator=g, dtype=F64)]
    for k in range(n - 1):
        truth.append(space.retract(truth[-1], steps[k]))
    gt = torch.stack(truth)  # (N, S)
    pairs = [(k, k + 1) for k in range(n - 1)] + [(a, b) for a, b in loops if a != b]
    i, j = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
    exact = space.compose(space.inverse(gt[i]), gt[j])  # (E, S)
    noise = torch.as_tensor(noise, dtype=F64).reshape(-1, 1, 1)
    eps = torch.randn(batch, len(pairs), space.dof, generator=g, dtype=F64)
    measured = space.retract(exact.expand(batch, -1, -1), noise * eps)
    poses = core.Variable("poses", space, count=n)
    between = core.costs.Between(poses, i, j, measured, name="between")
    prior = core.costs.Prior(poses, gt[0], index=0, sqrt_info=100.0, name="prior")
    delta = perturb * torch.randn(batch, n, space.dof, generator=g, dtype=F64)
    init = space.retract(gt.expand(batch, -1, -1), delta)
    return core.Objective([between, prior]), {"poses": init}, gt


def pose_error(space, gt: Tensor, x: Tensor) -> float:
    return float(space.local(gt.expand_as(x), x).abs().max())


# ------------------------------------------------------------------------------------------
# known optima
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lm", "gn"])
def test_linear_least_squares(method: str, gen: torch.Generator) -> None:
    objective, init, A, b = linear_problem(gen)
    solution = OPTIMIZERS[method]().solve(objective, init)
    expected = torch.linalg.lstsq(A, b[..., None]).solution[..., 0]
    torch.testing.assert_close(solution.values["x"][:, 0], expected, atol=1e-8, rtol=1e-8)
    residual = (A @ expected[..., None])[..., 0] - b
    torch.testing.assert_close(solution.info.final_cost, 0.5 * (residual**2).sum(-1))
    assert solution.info.status_names == ["converged", "converged"]
    if method == "gn":  # one Newton step solves a linear problem (then the gradient is ~0)
        assert solution.info.iterations.tolist() == [1, 1]


def test_quadratic_fit_example() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quadratic_fit.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    last = out.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"a=(\S+) b=(\S+)", last)
    assert match, last
    a, b = float(match[1]), float(match[2])
    assert abs(a - 1.0) < 0.02 and abs(b - 0.5) < 0.01
    assert "status=converged" in out.stdout


@pytest.mark.parametrize(
    ("method", "mode"), [("lm", "levenberg"), ("lm", "marquardt"), ("gn", "levenberg")]
)
def test_rosenbrock(method: str, mode: str) -> None:
    objective, init = rosenbrock()
    solution = OPTIMIZERS[method](damping_mode=mode, max_iters=100).solve(objective, init)
    torch.testing.assert_close(
        solution.values["p"][0, 0], torch.ones(2, dtype=F64), atol=1e-5, rtol=0
    )
    assert float(solution.info.final_cost[0]) < 1e-11  # abs_tol = 1e-12 stops it
    assert solution.info.status_names == ["converged"]


@pytest.mark.parametrize("method", ["lm", "gn"])
@pytest.mark.parametrize("space", [SE2, SE3], ids=repr)
def test_pose_graph_zero_noise_reaches_ground_truth(method: str, space) -> None:
    loops = [(0, 5), (2, 9), (4, 11), (1, 7)]
    objective, init, gt = synthetic_graph(space, 12, loops, seed=3, perturb=0.15)
    assert pose_error(space, gt, init["poses"]) > 0.1
    solution = OPTIMIZERS[method](max_iters=30).solve(objective, init)
    assert solution.info.status_names == ["converged"]
    assert float(solution.info.final_cost[0]) < 1e-14
    assert pose_error(space, gt, solution.values["poses"]) < 1e-7


@given(
    space=st.sampled_from([SE2, SE3]),
    n=st.integers(3, 8),
    loops=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=12, deadline=None)
def test_random_pose_graphs_reach_ground_truth(space, n: int, loops, seed: int) -> None:
    loops = [(a % n, b % n) for a, b in loops]
    objective, init, gt = synthetic_graph(space, n, loops, seed, perturb=0.05)
    # abs_tol far below the cost a 1e-6 pose error gives, so convergence implies accuracy
    solution = core.LevenbergMarquardt(max_iters=50, abs_tol=1e-20).solve(objective, init)
    assert solution.info.status_names == ["converged"]
    assert float(solution.info.final_cost[0]) < 1e-12
    assert pose_error(space, gt, solution.values["poses"]) < 1e-6


# ------------------------------------------------------------------------------------------
# batching: elements are independent
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["dense", "sparse"])
@pytest.mark.parametrize("space", [SE2, SE3], ids=repr)
def test_batch_elements_are_solved_independently(space, solver: str) -> None:
    """Different noise (so different damping histories, rejections and iteration counts) per
    element: the batched solve equals solving each element alone."""
    noise = torch.tensor([0.0, 0.02, 0.1, 0.3], dtype=F64)
    objective, init, _ = synthetic_graph(
        space, 10, [(0, 6), (3, 9), (2, 8)], seed=11, batch=4, noise=noise, perturb=0.3
    )
    lm = core.LevenbergMarquardt(max_iters=40, solver=solver)
    batched = lm.solve(objective, init)
    between, prior = objective.costs
    iterations = []
    for b in range(4):
        one_between = between.replace(aux={"measured": between.aux["measured"][b : b + 1]})
        alone = lm.solve(core.Objective([one_between, prior]), {"poses": init["poses"][b : b + 1]})
        torch.testing.assert_close(
            batched.values["poses"][b : b + 1], alone.values["poses"], atol=1e-9, rtol=1e-9
        )
        assert int(batched.info.iterations[b]) == int(alone.info.iterations[0])
        assert batched.info.status_names[b] == alone.info.status_names[0]
        T = alone.info.cost_history.shape[0]
        torch.testing.assert_close(batched.info.cost_history[:T, b], alone.info.cost_history[:, 0])
        # once converged, an element's cost stays put while the others keep iterating
        tail = batched.info.cost_history[T - 1 :, b]
        assert bool((tail == tail[0]).all())
        torch.testing.assert_close(batched.info.damping[b], alone.info.damping[0])
        iterations.append(int(alone.info.iterations[0]))
    assert len(set(iterations)) > 1, iterations  # the elements really behaved differently
    assert float(batched.info.final_cost[0]) < 1e-12  # the noise-free element is exact


def test_gauss_newton_batch_independent(gen: torch.Generator) -> None:
    objective, init = rosenbrock(batch=3)
    init["p"][1] = torch.tensor([0.5, 0.5], dtype=F64)
    init["p"][2] = torch.tensor([3.0, -2.0], dtype=F64)
    batched = core.GaussNewton(max_iters=30).solve(objective, init)
    for b in range(3):
        alone = core.GaussNewton(max_iters=30).solve(objective, {"p": init["p"][b : b + 1]})
        torch.testing.assert_close(batched.values["p"][b], alone.values["p"][0])
        assert int(batched.info.iterations[b]) == int(alone.info.iterations[0])


# ------------------------------------------------------------------------------------------
# Info and statuses
# ------------------------------------------------------------------------------------------


def test_info_fields() -> None:
    objective, init, _ = synthetic_graph(
        SE3, 8, [(0, 5), (2, 7)], seed=5, batch=2, noise=torch.tensor([0.05, 0.2]), perturb=0.3
    )
    before = {k: v.clone() for k, v in init.items()}
    solution = core.LevenbergMarquardt(max_iters=50).solve(objective, init)
    info = solution.info
    torch.testing.assert_close(init["poses"], before["poses"], rtol=0, atol=0)  # not mutated
    assert info.status_names == ["converged", "converged"]
    assert info.status.shape == (2,) and info.iterations.shape == (2,)
    assert bool((info.iterations > 1).all())
    T = int(info.iterations.max()) + 1
    assert info.cost_history.shape == (T, 2)
    torch.testing.assert_close(info.initial_cost, objective.cost(init))
    torch.testing.assert_close(info.final_cost, objective.cost(solution.values))
    steps = info.cost_history[1:] - info.cost_history[:-1]
    # LM never accepts an increase (beyond rounding noise of the cost itself)
    assert bool((steps <= 1e-13 * info.cost_history[:-1]).all()), info.cost_history
    assert float(info.final_cost.max()) < float(info.initial_cost.min())
    assert info.damping.shape == (2,) and bool((info.damping > 0).all())
    assert info.time_s > 0
    assert solution.linearization is not None
    torch.testing.assert_close(solution.linearization.cost, info.final_cost)
    for k, v in info.best_values.items():
        torch.testing.assert_close(v, solution.values[k])


def test_max_iters_status() -> None:
    objective, init = rosenbrock()
    solution = core.LevenbergMarquardt(max_iters=1).solve(objective, init)
    assert solution.info.status_names == ["max_iters"]
    assert solution.info.iterations.tolist() == [1]
    assert solution.info.cost_history.shape == (2, 1)
    zero = core.LevenbergMarquardt(max_iters=0).solve(objective, init)
    assert zero.info.status_names == ["max_iters"]
    torch.testing.assert_close(zero.values["p"], init["p"])


@pytest.mark.parametrize("method", ["lm", "gn"])
def test_nan_initial_cost_fails_only_that_element(method: str, gen: torch.Generator) -> None:
    objective, init, A, b = linear_problem(gen, batch=3)
    b[1, 4] = float("nan")  # NaN in the aux of element 1 only
    solution = OPTIMIZERS[method]().solve(objective, init)
    assert solution.info.status_names == ["converged", "failed", "converged"]
    assert int(solution.info.iterations[1]) == 0
    torch.testing.assert_close(solution.values["x"][1], init["x"][1])
    for k in (0, 2):
        expected = torch.linalg.lstsq(A[k], b[k][:, None]).solution[:, 0]
        torch.testing.assert_close(solution.values["x"][k, 0], expected, atol=1e-8, rtol=1e-8)


def test_all_failed_stops_immediately(gen: torch.Generator) -> None:
    objective, init, _, b = linear_problem(gen, batch=1)
    b[0, 0] = float("nan")
    solution = core.LevenbergMarquardt(max_iters=10).solve(objective, init)
    assert solution.info.status_names == ["failed"]
    assert solution.info.cost_history.shape == (1, 1)


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="max_iters"):
        core.LevenbergMarquardt(max_iters=-1)
    with pytest.raises(ValueError, match="damping_mode"):
        core.LevenbergMarquardt(damping_mode="ceres")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="check_every"):
        core.LevenbergMarquardt(check_every=0)
    with pytest.raises(TypeError):
        core.LevenbergMarquardt(max_iter=3)  # type: ignore[call-arg]


def test_no_work_after_every_element_converged(monkeypatch, gen: torch.Generator) -> None:
    import core.optimizer

    calls = []
    real = core.optimizer.linearize

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(core.optimizer, "linearize", counting)
    objective, init, _, _ = linear_problem(gen)
    solution = core.GaussNewton().solve(objective, init)
    assert solution.info.iterations.tolist() == [1, 1]  # one exact step, then gradient ~ 0
    assert len(calls) == 2  # the start and the one trial
    assert solution.info.cost_history.shape[0] == 2


def test_named_solver_made_once_per_structure() -> None:
    """Solving the same objective (or a copy with new inputs) again reuses the sparse solver and
    its symbolic analysis; the results are the same as with a fresh solver."""
    x = core.Variable("x", core.SE3, 6)
    gen = torch.Generator().manual_seed(0)
    z = core.SE3.random(5, generator=gen, dtype=torch.float64)
    between = core.costs.Between(x, torch.arange(5), torch.arange(1, 6), z)
    prior = core.costs.Prior(x, core.SE3.identity(dtype=torch.float64), index=0)
    objective = core.Objective([between, prior])
    init = {"x": core.SE3.random(1, 6, generator=gen, dtype=torch.float64)}
    lm = core.LevenbergMarquardt(solver="sparse")
    first = lm.solve(objective, init)
    (solver,) = objective.solvers.values()
    plans = dict(solver._symbolic)
    again = lm.solve(objective.with_inputs({between.name + ".measured": z[None]}), init)
    assert list(objective.solvers.values()) == [solver] and dict(solver._symbolic) == plans
    torch.testing.assert_close(again.values["x"], first.values["x"], rtol=0, atol=0)
    fresh = core.LevenbergMarquardt(solver=core.solvers.SparseCholesky()).solve(objective, init)
    torch.testing.assert_close(fresh.values["x"], first.values["x"], rtol=0, atol=0)
