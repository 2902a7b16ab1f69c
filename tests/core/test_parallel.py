"""core.parallel: compiled kernels split over threads equal the one-thread path (bit for bit when
split over the batch, to 1e-12 when one problem is split over its factors), exceptions reach
the caller, and the rule keeps small problems on the calling thread."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import numpy as np
import pytest
import torch

import core
from core import fused, parallel
from core import threads as core_threads
from core.linearize import Linearization, linearize
from core.solvers import SparseCholesky, compiled

pytestmark = pytest.mark.skipif(not core._kernels.AVAILABLE, reason="Numba not installed")

DT = torch.float64
needs_pool = pytest.mark.skipif(parallel.pool_size() < 1, reason="one core: no pool threads")


@pytest.fixture
def split(monkeypatch: pytest.MonkeyPatch):
    """``split(k)``: every kernel call from now on runs on ``k`` threads where its chunks allow
    (thresholds down, ``k`` free cores); ``split(1)``: one thread (``ARIADNE_KERNEL_THREADS``)."""

    def setup(k: int) -> None:
        if k == 1:
            monkeypatch.setenv("ARIADNE_KERNEL_THREADS", "1")
            return
        monkeypatch.delenv("ARIADNE_KERNEL_THREADS", raising=False)
        monkeypatch.setattr(core_threads, "free_cores", lambda: k)
        monkeypatch.setattr(parallel, "pool_size", lambda: k - 1)
        monkeypatch.setattr(fused, "MIN_CHUNK", 1e-12)
        monkeypatch.setattr(fused, "MIN_FACTORS", 1)
        monkeypatch.setattr(compiled, "MIN_CHUNK", 1e-12)
        monkeypatch.setattr(compiled, "MIN_BATCH", 1)

    return setup


def upper(gen: torch.Generator, *shape: int, d: int) -> torch.Tensor:
    a = torch.randn(*shape, d, d, generator=gen, dtype=DT)
    return torch.linalg.cholesky(a @ a.mT + d * torch.eye(d, dtype=DT), upper=True)


def pose_objective(G: core.lie.LieGroup, gen: torch.Generator, batch: int, poses: int,
                   loss: str | None = None) -> tuple[core.Objective, dict[str, torch.Tensor]]:
    """A random pose graph (chain plus random loop edges) with per-edge (per-element where
    ``batch > 1``) sqrt information, per-edge measurements and, with ``loss``, a robust loss of
    per-factor scale; a prior on every pose with a diagonal weight."""
    x = G.random(batch, poses, generator=gen, dtype=DT)
    extra = 2 * poses
    i = torch.cat([torch.arange(poses - 1), torch.randint(0, poses, (extra,), generator=gen)])
    j = torch.cat([torch.arange(1, poses), (i[poses - 1:] + 1 + torch.randint(
        0, poses - 1, (extra,), generator=gen)) % poses])
    E, d = i.shape[0], G.dof
    noise = 0.3 * torch.randn(batch, E, d, generator=gen, dtype=DT)
    z = G.compose(G.compose(G.inverse(x[:, i]), x[:, j]), G.exp(noise))
    var = core.Variable("x", G, poses)
    robust = None if loss is None else core.RobustLoss(
        loss, torch.rand(1, E, generator=gen, dtype=DT) + 0.2)
    between = core.costs.Between(var, i, j, z, sqrt_info=upper(gen, batch, E, d=d), loss=robust,
                                 name="between")
    target = G.compose(x, G.exp(0.1 * torch.randn(batch, poses, d, generator=gen, dtype=DT)))
    prior = core.costs.Prior(var, target, weight=torch.rand(poses, d, generator=gen,
                                                             dtype=DT) + 0.5, name="prior")
    return core.Objective([between, prior]), {"x": x}


def bal_objective(gen: torch.Generator, batch: int, loss: str | None = None
                  ) -> tuple[core.Objective, dict[str, torch.Tensor]]:
    """A random BAL scene (every point in front of its first camera), per-observation weights
    and, with ``loss``, a robust loss of per-element scale."""
    C, P, O = 5, 60, 240  # noqa: E741
    T = core.SE3.random(batch, C, generator=gen, dtype=DT)
    ci = torch.randint(0, C, (O,), generator=gen)
    pi = torch.randint(0, P, (O,), generator=gen)
    pi[:P] = torch.arange(P)
    first = torch.zeros(P, dtype=torch.long).index_copy(0, pi[:P], ci[:P])
    X = torch.randn(batch, P, 3, generator=gen, dtype=DT)
    X = core.lie.se3.act(core.lie.se3.inverse(T[:, first]),
                         X * 0.3 + torch.tensor([0, 0, -5.0], dtype=DT))
    K = torch.tensor([500.0, 0.1, -0.05], dtype=DT) + 0.01 * torch.randn(batch, C, 3,
                                                                          generator=gen, dtype=DT)
    v = (core.Variable("cameras", core.SE3, C), core.Variable("intrinsics", core.Vector(3), C),
         core.Variable("points", core.Vector(3), P))
    robust = None if loss is None else core.RobustLoss(
        loss, torch.rand(batch, generator=gen, dtype=DT) * 20 + 5)
    cost = core.costs.Reprojection(*v, ci, pi, torch.randn(batch, O, 2, generator=gen,
                                                           dtype=DT) * 50,
                                   weight=torch.rand(batch, O, 1, generator=gen, dtype=DT) + 0.5,
                                   loss=robust)
    assert cost.kernel == "reprojection_bal"
    return core.Objective([cost]), {"cameras": T, "intrinsics": K, "points": X}


def relative_equal(fast: Linearization, ref: Linearization, tol: float = 1e-12) -> None:
    """Cost, ``g`` and ``H`` equal to ``tol`` relative to each one's largest entry."""
    for what in ("cost", "g", "H"):
        a, b = getattr(fast, what), getattr(ref, what)
        err = float((a - b).abs().max() / b.abs().max())
        assert err <= tol, f"{what}: max relative difference {err:.3e}"


def spy_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of chunks of every ``parallel.run`` call from now on."""
    chunks: list[int] = []
    original = parallel.run

    def run(fn, calls, helpers=None):
        chunks.append(len(calls))
        return original(fn, calls, helpers)

    monkeypatch.setattr(parallel, "run", run)
    return chunks


@pytest.mark.parametrize("G", [core.SE3, core.SE2], ids=repr)
@pytest.mark.parametrize("loss", [None, "huber", "cauchy"])
def test_pose_kernels_split_over_the_batch_are_bitwise_equal(
        G: core.lie.LieGroup, loss: str | None, split, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(7 + (loss or "").__len__())
    objective, values = pose_objective(G, gen, batch=5, poses=12, loss=loss)
    split(1)
    ref = linearize(objective, values)
    split(3)
    chunks = spy_runs(monkeypatch)
    fast = linearize(objective, values)
    assert chunks == [3, 3]  # both costs, three chunks of the batch each
    for what in ("cost", "g", "H"):
        assert torch.equal(getattr(fast, what), getattr(ref, what)), what


@pytest.mark.parametrize("G", [core.SE3, core.SE2], ids=repr)
@pytest.mark.parametrize("loss", [None, "welsch"])
def test_pose_kernels_split_over_the_factors_equal_one_call(
        G: core.lie.LieGroup, loss: str | None, split, monkeypatch: pytest.MonkeyPatch) -> None:
    """One problem cut into runs of factors (per-edge sqrt information, measurements and loss
    scales sliced with them); a second call reuses the runs' renumbered maps."""
    gen = torch.Generator().manual_seed(11)
    objective, values = pose_objective(G, gen, batch=1, poses=40, loss=loss)
    split(1)
    ref = linearize(objective, values)
    split(3)
    chunks = spy_runs(monkeypatch)
    for _ in range(2):
        relative_equal(linearize(objective, values), ref)
    assert chunks == [3, 3, 3, 3]


@pytest.mark.parametrize("loss", [None, "huber"])
def test_reprojection_kernel_split(loss: str | None, split) -> None:
    """BAL reprojection: over a batch of 4 bit for bit, and one scene over its observations."""
    gen = torch.Generator().manual_seed(5)
    for batch in (4, 1):
        objective, values = bal_objective(gen, batch, loss)
        split(1)
        ref = linearize(objective, values)
        split(2 if batch == 1 else 3)
        fast = linearize(objective, values)
        if batch > 1:
            assert torch.equal(fast.H, ref.H) and torch.equal(fast.g, ref.g)
            assert torch.equal(fast.cost, ref.cost)
        else:
            relative_equal(fast, ref)


def test_ragged_batch_split_over_factors_keeps_each_problems_cost(split) -> None:
    """A ragged batch (one element, ``groups`` gives each factor's problem): the runs of factors
    add each factor's cost to its own problem, as one call does."""
    from core import ragged

    gen = torch.Generator().manual_seed(23)
    objectives, inits = [], []
    for poses in (9, 14, 6, 11):
        objective, values = pose_objective(core.SE3, gen, batch=1, poses=poses, loss="cauchy")
        objectives.append(objective)
        inits.append(values)
    batch = ragged.merge(objectives, cache=ragged.RaggedCache(1))
    values = batch.join_values(inits)
    split(1)
    ref = linearize(batch.objective, values)
    split(4)
    fast = linearize(batch.objective, values)
    assert fast.cost.shape == (4,)
    relative_equal(fast, ref)


def test_groups_sliced_with_the_batch(split) -> None:
    """``accumulate`` with ``groups`` and a batch of 3 split over the batch: per-problem costs
    ``(B, P)`` bit for bit."""
    gen = torch.Generator().manual_seed(3)
    objective, values = pose_objective(core.SE2, gen, batch=3, poses=10, loss="huber")
    cost = objective.costs[0]
    pattern = objective.pattern()
    groups = torch.randint(0, 4, (cost.num_factors,), generator=gen)
    out = []
    for k in (1, 3):
        split(k)
        H, g = torch.zeros(3, pattern.nnz, dtype=DT), torch.zeros(3, pattern.n, dtype=DT)
        total = torch.zeros(3, 4, dtype=DT)
        fused.accumulate(cost, values, pattern.tops[0], pattern.columns[0], H, g, total,
                         groups)
        out.append((H, g, total))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def helix(batch: int) -> tuple[core.Pattern, torch.Tensor, torch.Tensor]:
    from bench.__main__ import pose_graph_objective
    from bench.synthetic import pose_graph_batch

    objective, init = pose_graph_objective(pose_graph_batch(48, batch, seed=1))
    lin = linearize(objective, init)
    return lin.pattern, lin.H, lin.g


def test_compiled_factor_and_solve_split_over_the_batch(split) -> None:
    """The batched supernodal factorization in chunks of the batch: panels, ``ok``, ``pivot``
    and solutions bit for bit those of one call, a failing element included."""
    pattern, H, g = helix(7)
    H = H.clone()
    H[4] = -H[4]  # negative definite: fails alone
    damping = torch.full((7, pattern.n), 1e-4, dtype=DT)
    out = []
    for k in (1, 3):
        split(k)
        factor = SparseCholesky(mode="compiled").factor(H, pattern, damping)
        assert len(factor.L) == k and factor.chunks == parallel.bounds(7, k)
        out.append((factor, factor.solve(-g)))
    (one, x1), (three, x3) = out
    assert np.array_equal(np.concatenate(one.L, 1), np.concatenate(three.L, 1), equal_nan=True)
    assert torch.equal(one.ok, three.ok) and torch.equal(one.pivot, three.pivot)
    assert one.ok.tolist() == [True] * 4 + [False] + [True] * 2
    assert torch.equal(x1, x3) and bool((x3[4] == 0).all())


def test_lm_solve_threaded_same_iterates(split) -> None:
    """A whole LM solve with every kernel split gives the one-thread iterates (bitwise for the
    batch split)."""
    gen = torch.Generator().manual_seed(9)
    objective, values = pose_objective(core.SE3, gen, batch=9, poses=10, loss="huber")
    runs = []
    for k in (1, 2):
        split(k)
        lm = core.LevenbergMarquardt(max_iters=8, solver=SparseCholesky(mode="compiled"))
        runs.append(lm.solve(objective, values))
    assert torch.equal(runs[0].values["x"], runs[1].values["x"])
    assert torch.equal(runs[0].info.cost_history, runs[1].info.cost_history)


@needs_pool
def test_exceptions_from_a_pool_thread_reach_the_caller() -> None:
    """A chunk that raises on a pool thread: ``run`` waits for every chunk, then raises it."""
    done = []

    def chunk(k: int) -> None:
        if threading.current_thread().name.startswith("ariadne-kernel"):
            raise ValueError(f"chunk {k} failed on a pool thread")
        time.sleep(0.05)  # (the GIL is free: a pool thread takes the other chunk)
        done.append(k)

    with pytest.raises(ValueError, match="failed on a pool thread"):
        parallel.run(chunk, [(0,), (1,)])
    assert done == [0]
    parallel.run(lambda k: done.append(k), [(2,), (3,)])  # the pool still works
    assert sorted(done) == [0, 2, 3]


@needs_pool
def test_exceptions_from_a_compiled_kernel_reach_the_caller() -> None:
    import numba

    @numba.njit(nogil=True)
    def kernel(a: np.ndarray, k: int) -> None:
        if k == 1:
            raise ValueError("kernel chunk 1")
        a[k] = 1.0

    a = np.zeros(4)
    with pytest.raises(ValueError, match="kernel chunk 1"):
        parallel.run(kernel, [(a, 0), (a, 1), (a, 2), (a, 3)])
    assert a.tolist() == [1.0, 0.0, 1.0, 1.0]  # every other chunk ran
    with pytest.raises(numba.core.errors.TypingError):  # the dispatcher's own (no signature)
        parallel.run(kernel, [(a, 0), ("not an array", 1)])


def test_threads_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARIADNE_KERNEL_THREADS", raising=False)
    monkeypatch.setattr(core_threads, "free_cores", lambda: 4)
    monkeypatch.setattr(parallel, "pool_size", lambda: 3)
    assert parallel.threads(1.5, 1.0) == 1  # below two chunks' worth
    assert parallel.threads(2.0, 1.0) == 2
    assert parallel.threads(100.0, 1.0) == 4  # the free cores
    assert parallel.threads(100.0, 1.0, chunks=3) == 3
    monkeypatch.setattr(core_threads, "free_cores", lambda: 1)
    assert parallel.threads(100.0, 1.0) == 1
    monkeypatch.setattr(core_threads, "free_cores", lambda: 4)
    monkeypatch.setenv("ARIADNE_KERNEL_THREADS", "2")
    assert parallel.threads(100.0, 1.0) == 2
    monkeypatch.setenv("ARIADNE_KERNEL_THREADS", "1")
    assert parallel.threads(100.0, 1.0) == 1
    monkeypatch.setenv("ARIADNE_KERNEL_THREADS", "zero")
    with pytest.raises(ValueError, match="ARIADNE_KERNEL_THREADS"):
        parallel.threads(100.0, 1.0)
    monkeypatch.delenv("ARIADNE_KERNEL_THREADS")
    with core_threads.solve_threads(10, threads=1):  # the user's threads cap the kernels too
        assert parallel.threads(100.0, 1.0) == 1
    with core_threads.solve_threads(10, threads=3):
        assert parallel.threads(100.0, 1.0) == 3
    seen = []

    def chunk() -> None:
        time.sleep(0.02)  # (the pool threads take some of the chunks)
        seen.append((threading.current_thread().name, parallel.threads(100.0, 1.0)))

    parallel.run(chunk, [()] * 6)
    assert {k for name, k in seen if name.startswith("ariadne-kernel")} == {1}  # never nested
    assert {k for name, k in seen if not name.startswith("ariadne-kernel")} == {4}
    assert len(seen) == 6 and any(name.startswith("ariadne-kernel") for name, _ in seen)


def test_small_problems_stay_on_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the measured thresholds and free cores: a 256-pose pose graph (B = 1) and a batch of
    8 such factorizations run on the calling thread; 64 such graphs are split."""
    from bench.__main__ import pose_graph_objective
    from bench.synthetic import pose_graph_batch

    monkeypatch.delenv("ARIADNE_KERNEL_THREADS", raising=False)
    monkeypatch.setattr(core_threads, "free_cores", lambda: 2)
    monkeypatch.setattr(parallel, "pool_size", lambda: 1)
    chunks = spy_runs(monkeypatch)
    objective, init = pose_graph_objective(pose_graph_batch(256, 1, seed=1))
    linearize(objective, init)
    assert chunks == []
    objective, init = pose_graph_objective(pose_graph_batch(256, 8, seed=1))
    lin = linearize(objective, init)
    assert chunks == [2]  # the between cost of 8 graphs (~3 ms), not their priors
    chunks.clear()
    damping = torch.full((8, lin.pattern.n), 1e-4, dtype=DT)
    factor = SparseCholesky(mode="compiled").factor(lin.H, lin.pattern, damping)
    assert len(factor.L) == 1 and chunks in ([], [1])
    objective, init = pose_graph_objective(pose_graph_batch(256, 64, seed=1))
    lin = linearize(objective, init)
    factor = SparseCholesky(mode="compiled").factor(
        lin.H, lin.pattern, torch.full((64, lin.pattern.n), 1e-4, dtype=DT))
    assert len(factor.L) == 2


def test_threaded_kernels_drop_torchs_pool_for_the_solve(split) -> None:
    omp = core_threads._openmp()
    if omp is None:
        pytest.skip("torch without an OpenMP runtime")
    before = int(omp.omp_get_max_threads())
    omp.omp_set_num_threads(2)
    try:
        split(2)
        with core_threads.solve_threads(10):
            assert int(omp.omp_get_max_threads()) == 2
            parallel.run(lambda: None, [(), ()])
            assert int(omp.omp_get_max_threads()) == 1
        assert int(omp.omp_get_max_threads()) == 2
        with core_threads.solve_threads(10, threads=2):  # the user's choice stays
            parallel.run(lambda: None, [(), ()])
            assert int(omp.omp_get_max_threads()) == 2
    finally:
        omp.omp_set_num_threads(before)


def _child(queue) -> None:
    out = []
    parallel.run(lambda k: out.append(k), [(0,), (1,), (2,)])
    queue.put(sorted(out))


@needs_pool
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_pool_works_in_a_forked_child() -> None:
    """A forked child (a data loader's worker) has none of the parent's pool threads: it starts
    its own instead of waiting for threads that do not exist."""
    parallel.run(lambda k: None, [(0,), (1,)])  # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert queue.get(timeout=5) == [0, 1, 2]


def test_pool_threads_end_at_exit() -> None:
    """``_stop`` (registered with atexit) ends every pool thread, so none wakes while the
    interpreter finalizes; the pool starts again on the next use."""
    seen: list[str] = []
    barrier = threading.Barrier(2, timeout=10)

    def chunk(k: int) -> None:
        barrier.wait()  # both chunks at once: one ran on a pool thread
        seen.append(threading.current_thread().name)

    parallel.run(chunk, [(0,), (1,)])
    workers = list(parallel._workers)
    assert workers and any(name.startswith("ariadne-kernel") for name in seen)
    parallel._stop()
    assert not parallel._workers and not any(t.is_alive() for t in workers)
    barrier.reset()
    parallel.run(chunk, [(0,), (1,)])  # a fresh pool
    assert parallel._workers


@pytest.mark.parametrize("space", [core.SE3, core.SE2])
def test_renumber_maps_a_run_onto_its_touched_entries(space, gen: torch.Generator) -> None:
    """``fused._renumber``: the run's block form renumbered onto the entries it touches (in
    increasing order), standing for the same positions of ``H`` and columns of ``g``."""
    objective, _ = pose_objective(space, gen, batch=1, poses=30)
    pattern = objective.pattern()
    (top, rowmap), col = (t.numpy() for t in pattern.tops[0]), pattern.columns[0].numpy()
    e0 = top.shape[0] // 3
    new_top, new_col, rows, cols = fused._renumber(top[e0:], rowmap, col[e0:], pattern.nnz,
                                                   pattern.n)
    pos = top[e0:][:, rowmap[0], :] + rowmap[1][None, :, None]
    new_pos = new_top[:, rowmap[0], :] + rowmap[1][None, :, None]
    assert np.array_equal(rows[new_pos], pos) and np.array_equal(cols[new_col], col[e0:])
    assert np.array_equal(rows, np.unique(pos)) and np.array_equal(cols, np.unique(col[e0:]))
