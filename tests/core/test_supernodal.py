"""The batched supernodal Cholesky (core.solvers.supernodal) against CHOLMOD (scikit-sparse).

Structures: SE(3) helix pose graphs (bench.synthetic), a full BA normal matrix (cameras, intrinsics
and points) and its reduced camera system (the Schur solver's pattern of ``S``). Values: random
symmetric diagonally dominant matrices in the pattern (SPD) and the real linearized ``H`` plus
damping. The CUDA tests carry the ``cuda`` marker and skip without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

import core
from bench.__main__ import pose_graph_objective
from bench.synthetic import bal_scene, pose_graph_batch
from core.linearize import linearize
from core.solvers import Schur, SparseCholesky
from core.solvers import supernodal as sn
from core.solvers.base import solve as differentiable_solve
from core.solvers.supernodal import SupernodalCholesky

cholmod = pytest.importorskip("sksparse.cholmod")
F64 = torch.float64


def cuda(test):
    """The ``cuda`` marker and a skip without a GPU."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    return pytest.mark.cuda(skip(test))


def random_spd(pattern: core.Pattern, batch: int, g: torch.Generator, shift: float = 1.0) -> Tensor:
    """Pattern values ``(B, nnz)`` of symmetric, strictly diagonally dominant (so SPD) matrices,
    built entry by entry in the pattern (no dense ``n x n``)."""
    n, rows, cols = pattern.n, pattern.rows, pattern.cols
    key = cols * n + rows  # CSC order: ascending
    transpose = torch.searchsorted(key, rows * n + cols)
    v = torch.randn(batch, pattern.nnz, generator=g, dtype=F64)
    v = v + v[:, transpose]
    v[:, pattern.diag] = 0.0
    row_sum = torch.zeros(batch, n, dtype=F64).index_add_(1, rows, v.abs())
    v[:, pattern.diag] = row_sum + shift
    return v


def cholmod_solve(pattern: core.Pattern, values: Tensor, b: Tensor) -> Tensor:
    """``A_k^-1 b_k`` for every element with CHOLMOD (one factorization each), ``(B, n)``."""
    import scipy.sparse as sp

    indptr, rows = pattern.indptr.cpu().numpy(), pattern.rows.cpu().numpy()
    out = []
    for k in range(values.shape[0]):
        A = sp.csc_matrix((values[k].cpu().numpy(), rows, indptr), shape=(pattern.n,) * 2)
        out.append(cholmod.cholesky(A)(b[k].cpu().numpy()))
    return torch.from_numpy(np.stack(out))


def relative_error(x: Tensor, ref: Tensor) -> float:
    return float(((x.cpu() - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


def helix_pattern(poses: int = 256) -> core.Pattern:
    ring = min(16, poses // 2)
    objective, _ = pose_graph_objective(pose_graph_batch(poses, 1, ring=ring, seed=0))
    return objective.pattern()


def ba_objective(cameras: int = 10, points: int = 120) -> tuple[core.Objective, dict]:
    scene = bal_scene(cameras, points, views=(2, 5), seed=1)
    return core.costs.bal_objective(scene.problem)


def ba_full_pattern() -> core.Pattern:
    return ba_objective()[0].pattern()


def ba_reduced_pattern() -> core.Pattern:
    objective, _ = ba_objective()
    return Schur(objective, eliminate="points").maps(objective.pattern()).reduced


STRUCTURES = {
    "helix256": helix_pattern,
    "ba_full": ba_full_pattern,
    "ba_reduced": ba_reduced_pattern,
}


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("batch", [1, 5])
def test_matches_cholmod_on_random_spd(structure: str, batch: int, gen: torch.Generator) -> None:
    pattern = STRUCTURES[structure]()
    values = random_spd(pattern, batch, gen)
    b = torch.randn(batch, pattern.n, generator=gen, dtype=F64)
    factor = SupernodalCholesky().factor(values, pattern, torch.zeros(batch, pattern.n, dtype=F64))
    assert factor.ok.tolist() == [True] * batch and factor.failures() == {}
    x = factor.solve(b)
    assert x.shape == b.shape and x.dtype == F64
    assert relative_error(x, cholmod_solve(pattern, values, b)) < 1e-10
    # a second right-hand side (the implicit backward) reuses the factor
    b2 = torch.randn(batch, pattern.n, generator=gen, dtype=F64)
    assert relative_error(factor.solve(b2), cholmod_solve(pattern, values, b2)) < 1e-10


def test_linearized_pose_graph_matches_cholmod(gen: torch.Generator) -> None:
    """The real damped normal equations of 4 helix graphs of 1,000 poses (cond. ~1e6)."""
    objective, init = pose_graph_objective(pose_graph_batch(1000, 4, seed=3))
    lin = linearize(objective, init)
    damping = torch.full((4, lin.pattern.n), 1e-4, dtype=F64)
    A = lin.H.index_add(1, lin.pattern.diag, damping)
    x = SupernodalCholesky().factor(lin.H, lin.pattern, damping).solve(lin.g)
    assert relative_error(x, cholmod_solve(lin.pattern, A, lin.g)) < 1e-10
    # and the same as core's sparse solver (CHOLMOD on the block-diagonal batch)
    ref = SparseCholesky(backend="cholmod").factor(lin.H, lin.pattern, damping).solve(lin.g)
    assert relative_error(x, ref) < 1e-10


def test_linearized_bundle_adjustment_matches_cholmod() -> None:
    objective, init = ba_objective(12, 300)
    init = {k: v.expand(3, *v.shape[1:]).clone() for k, v in init.items()}
    lin = linearize(objective, init)
    damping = 1e-3 * lin.H[:, lin.pattern.diag] + 1e-6
    A = lin.H.index_add(1, lin.pattern.diag, damping)
    x = SupernodalCholesky().factor(lin.H, lin.pattern, damping).solve(lin.g)
    assert relative_error(x, cholmod_solve(lin.pattern, A, lin.g)) < 1e-10


@pytest.mark.parametrize("ordering", ["amd", "nesdis", "metis", "minimum_degree", "natural"])
def test_every_ordering_solves(ordering: str, gen: torch.Generator) -> None:
    pattern = helix_pattern(200)
    values = random_spd(pattern, 3, gen)
    b = torch.randn(3, pattern.n, generator=gen, dtype=F64)
    solver = SupernodalCholesky(ordering=ordering)
    x = solver.factor(values, pattern, torch.zeros(3, pattern.n, dtype=F64)).solve(b)
    assert solver.symbolic(pattern).ordering == ordering
    assert relative_error(x, cholmod_solve(pattern, values, b)) < 1e-10


def test_minimum_degree_is_fill_reducing() -> None:
    """The own ordering (used without scikit-sparse) fills within 15% of CHOLMOD's AMD on a
    1,000-pose helix, and far less than the natural (banded) order."""
    pattern = helix_pattern(1000)
    fill = {o: sn.analyze(pattern, o).nnz_L for o in ("amd", "minimum_degree", "natural")}
    assert fill["minimum_degree"] <= 1.15 * fill["amd"]
    assert fill["minimum_degree"] < 0.6 * fill["natural"]


def test_minimum_degree_on_small_graphs() -> None:
    """A path eliminates from its ends (no fill); a star eliminates its leaves first."""
    path = np.array([0, 1, 3, 5, 7, 8]), np.array([1, 0, 2, 1, 3, 2, 4, 3])
    order = sn.minimum_degree(*path)
    assert sorted(order.tolist()) == list(range(5)) and order[0] in (0, 4)
    star = np.array([0, 4, 5, 6, 7, 8]), np.array([1, 2, 3, 4, 0, 0, 0, 0])
    assert sn.minimum_degree(*star)[-2:].tolist().count(0) == 1  # the hub is among the last two


def test_supernodes_and_levels_are_consistent() -> None:
    """Every supernode is in exactly one group; a group's supernodes share a level and every
    supernode's parent is on a higher level; the torch calls follow the levels, not the
    supernodes (far fewer groups than supernodes)."""
    pattern = helix_pattern(1000)
    solver = SupernodalCholesky()
    sym = solver.symbolic(pattern)
    sched = solver.schedule(pattern, 8, torch.device("cpu"))
    members = np.concatenate([g.supernodes for g in sched.groups])
    assert sorted(members.tolist()) == list(range(sym.num_supernodes))
    for g in sched.groups:
        assert len(set(sym.level[g.supernodes].tolist())) == 1
    has_parent = sym.parent >= 0
    assert (sym.level[sym.parent[has_parent]] > sym.level[has_parent]).all()
    assert len(sched.groups) < sym.num_supernodes / 3
    assert np.diff(sym.starts).sum() == pattern.n and sym.nnz_panels >= sym.nnz_L


def test_torch_calls_follow_levels_not_supernodes(gen: torch.Generator) -> None:
    """4x the poses: about 4x the supernodes, a similar depth, and far fewer than 4x the torch
    calls of one factorization (counted through ``__torch_function__``)."""
    from bench.supernodal import CallCounter

    found = {}
    for poses in (1000, 4000):
        pattern = helix_pattern(poses)
        solver = SupernodalCholesky()
        values, zero = random_spd(pattern, 2, gen), torch.zeros(2, pattern.n, dtype=F64)
        solver.factor(values, pattern, zero)  # analysis and index maps
        counter = CallCounter()
        with counter:
            solver.factor(values, pattern, zero)
        found[poses] = (counter.calls, solver.symbolic(pattern))
    (calls_1k, sym_1k), (calls_4k, sym_4k) = found[1000], found[4000]
    assert sym_4k.num_supernodes > 3.5 * sym_1k.num_supernodes
    assert sym_4k.depth < 1.5 * sym_1k.depth
    sn_ratio = sym_4k.num_supernodes / sym_1k.num_supernodes
    assert calls_4k / calls_1k < 0.6 * sn_ratio


@pytest.mark.parametrize("kind", ["forest", "dense", "mixed"])
def test_edge_structures(kind: str, gen: torch.Generator) -> None:
    """A forest (priors only: every block its own root), one dense block, and SE(2) poses with
    R^5 landmarks (blocks of 3 and 5)."""
    poses = core.Variable("x", core.SE3, count=7)
    if kind == "forest":
        costs = [core.costs.Prior(poses, core.SE3.identity(7, dtype=F64), index=torch.arange(7))]
    elif kind == "dense":
        one = core.Variable("y", core.SE3, count=1)
        costs = [core.costs.Prior(one, core.SE3.identity(1, dtype=F64), index=torch.tensor([0]))]
    else:
        x = core.Variable("x", core.SE2, count=5)
        m = core.Variable("m", core.Vector(5), count=3)
        between = core.costs.Between(x, torch.arange(4), torch.arange(1, 5),
                                     core.SE2.identity(4, dtype=F64))
        link = core.Cost(lambda x, m: m[..., :2] - x[..., :2], optimized=(x, m),
                         index=(torch.tensor([0, 2, 4, 1]), torch.tensor([0, 1, 2, 2])))
        costs = [between, link]
    pattern = core.Objective(costs).pattern()
    values = random_spd(pattern, 3, gen)
    b = torch.randn(3, pattern.n, generator=gen, dtype=F64)
    x = SupernodalCholesky().factor(values, pattern, torch.zeros(3, pattern.n, dtype=F64)).solve(b)
    assert relative_error(x, cholmod_solve(pattern, values, b)) < 1e-10


def test_symbolic_analysis_is_cached_per_pattern(monkeypatch, gen: torch.Generator) -> None:
    calls = []
    real = sn.analyze
    monkeypatch.setattr(sn, "analyze", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    solver = SupernodalCholesky()
    p1, p2 = helix_pattern(64), helix_pattern(80)
    for batch in (2, 2, 3):
        solver.factor(random_spd(p1, batch, gen), p1, torch.zeros(batch, p1.n, dtype=F64))
    assert calls == [p1]
    assert solver.symbolic(p1) is solver.symbolic(p1)
    cpu = torch.device("cpu")
    assert solver.schedule(p1, 2, cpu) is solver.schedule(p1, 2, cpu)
    solver.factor(random_spd(p2, 2, gen), p2, torch.zeros(2, p2.n, dtype=F64))
    assert calls == [p1, p2]


def test_factor_survives_later_factorizations(gen: torch.Generator) -> None:
    """The panel buffer is reused across factorizations; a factor keeps its own blocks."""
    pattern = helix_pattern(64)
    solver = SupernodalCholesky()
    zero = torch.zeros(2, pattern.n, dtype=F64)
    v1, v2 = random_spd(pattern, 2, gen), random_spd(pattern, 2, gen)
    f1 = solver.factor(v1, pattern, zero)
    solver.factor(v2, pattern, zero)
    b = torch.randn(2, pattern.n, generator=gen, dtype=F64)
    assert relative_error(f1.solve(b), cholmod_solve(pattern, v1, b)) < 1e-10


def test_non_spd_element_is_flagged_by_index(gen: torch.Generator) -> None:
    pattern = helix_pattern(64)
    values = random_spd(pattern, 5, gen)
    values[2] = -values[2]  # negative definite
    values[4, pattern.diag[37]] = float("nan")
    b = torch.randn(5, pattern.n, generator=gen, dtype=F64)
    factor = SupernodalCholesky().factor(values, pattern, torch.zeros(5, pattern.n, dtype=F64))
    assert factor.ok.tolist() == [True, True, False, True, False]
    failures = factor.failures()
    assert sorted(failures) == [2, 4]
    assert failures[2].startswith("batch element 2: not positive definite (pivot")
    assert "batch element 4" in failures[4] and "not finite" in failures[4]
    assert 0 <= int(factor.pivot[2]) < pattern.n and int(factor.pivot[0]) == -1
    x = factor.solve(b)
    assert bool(torch.isfinite(x).all()) and bool((x[[2, 4]] == 0).all())
    good = [0, 1, 3]
    assert relative_error(x[good], cholmod_solve(pattern, values[good], b[good])) < 1e-10


def test_indefinite_pivot_is_located(gen: torch.Generator) -> None:
    """A matrix that is SPD except for one unknown's diagonal: the reported supernode holds it."""
    pattern = helix_pattern(64)
    values = random_spd(pattern, 1, gen)
    values[0, pattern.diag[100]] = -1.0
    solver = SupernodalCholesky()
    factor = solver.factor(values, pattern, torch.zeros(1, pattern.n, dtype=F64))
    assert not bool(factor.ok[0])
    sym = solver.symbolic(pattern)
    start = int(factor.pivot[0])
    s = int(np.nonzero(sym.perm[sym.starts[:-1]] == start)[0][0])
    assert 100 in sym.perm[sym.starts[s] : sym.starts[s + 1]].tolist() or s in sym.parent


def test_float32(gen: torch.Generator) -> None:
    pattern = helix_pattern(128)
    values = random_spd(pattern, 3, gen, shift=10.0)
    b = torch.randn(3, pattern.n, generator=gen, dtype=F64)
    zero = torch.zeros(3, pattern.n, dtype=torch.float32)
    x = SupernodalCholesky().factor(values.float(), pattern, zero).solve(b.float())
    assert x.dtype == torch.float32
    assert relative_error(x.double(), cholmod_solve(pattern, values, b)) < 1e-5


def test_bad_input_raises() -> None:
    pattern = helix_pattern(16)
    solver = SupernodalCholesky()
    with pytest.raises(ValueError, match=r"H has shape \(2, 5\)"):
        solver.factor(torch.zeros(2, 5, dtype=F64), pattern, torch.zeros(2, pattern.n, dtype=F64))
    with pytest.raises(ValueError, match="damping has shape"):
        solver.factor(torch.zeros(2, pattern.nnz, dtype=F64), pattern, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="torch.int64"):
        solver.factor(torch.zeros(2, pattern.nnz, dtype=torch.int64), pattern,
                      torch.zeros(2, pattern.n, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown ordering 'rcm'"):
        SupernodalCholesky(ordering="rcm")  # type: ignore[arg-type]
    values = torch.eye(pattern.n, dtype=F64)[pattern.rows, pattern.cols][None]
    factor = solver.factor(values, pattern, torch.zeros(1, pattern.n, dtype=F64))
    with pytest.raises(ValueError, match=r"b has shape \(2, 96\)"):
        factor.solve(torch.zeros(2, pattern.n, dtype=F64))


def test_implicit_gradients_through_the_factor(gen: torch.Generator) -> None:
    """``core.solvers.solve`` (the adjoint solve with the same factor) passes gradcheck."""
    pattern = helix_pattern(6)
    values = random_spd(pattern, 2, gen).requires_grad_()
    b = torch.randn(2, pattern.n, generator=gen, dtype=F64, requires_grad=True)
    solver = SupernodalCholesky()

    key = pattern.cols * pattern.n + pattern.rows
    transpose = torch.searchsorted(key, pattern.rows * pattern.n + pattern.cols)

    def f(values: Tensor, b: Tensor) -> Tensor:
        A = 0.5 * (values + values[:, transpose])  # a symmetric matrix, as the protocol assumes
        factor = solver.factor(A, pattern, torch.zeros(2, pattern.n, dtype=F64))
        return differentiable_solve(factor, A, pattern, b)

    assert torch.autograd.gradcheck(f, (values, b))


def test_levenberg_marquardt_matches_sparse() -> None:
    objective, init = pose_graph_objective(pose_graph_batch(100, 3, seed=2))
    costs = {}
    assert isinstance(core.solvers.make_solver("supernodal", 10), SupernodalCholesky)
    for name, solver in (("sparse", "sparse"), ("supernodal", "supernodal")):
        lm = core.LevenbergMarquardt(max_iters=8, solver=solver)
        info = lm.solve(objective, {k: v.clone() for k, v in init.items()}).info
        costs[name] = info.cost_history
    torch.testing.assert_close(costs["supernodal"], costs["sparse"], rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------- CUDA


@cuda
@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_cuda_matches_cholmod(structure: str, gen: torch.Generator) -> None:
    pattern = STRUCTURES[structure]()
    values = random_spd(pattern, 4, gen)
    b = torch.randn(4, pattern.n, generator=gen, dtype=F64)
    pattern_gpu = core.Pattern(pattern.n, *(t.cuda() for t in (pattern.indptr, pattern.rows,
                                                              pattern.cols, pattern.diag)), (), ())
    factor = SupernodalCholesky().factor(values.cuda(), pattern_gpu,
                                         torch.zeros(4, pattern.n, dtype=F64, device="cuda"))
    x = factor.solve(b.cuda())
    assert x.device.type == "cuda" and bool(factor.ok.all())
    assert relative_error(x, cholmod_solve(pattern, values, b)) < 1e-10


@cuda
def test_cuda_non_spd_element_is_flagged(gen: torch.Generator) -> None:
    objective, _ = pose_graph_objective(pose_graph_batch(64, 1, seed=0))
    pattern = objective.pattern("cuda")
    values = random_spd(objective.pattern(), 3, gen)
    values[1] = -values[1]
    factor = SupernodalCholesky().factor(values.cuda(), pattern,
                                         torch.zeros(3, pattern.n, dtype=F64, device="cuda"))
    assert factor.ok.tolist() == [True, False, True] and sorted(factor.failures()) == [1]


@cuda
def test_cuda_factor_and_solve_do_not_synchronize(gen: torch.Generator) -> None:
    """After the first call (analysis and index maps), factor + solve stay on the device."""
    objective, _ = pose_graph_objective(pose_graph_batch(128, 1, seed=0))
    pattern = objective.pattern("cuda")
    values = random_spd(objective.pattern(), 4, gen).cuda()
    zero = torch.zeros(4, pattern.n, dtype=F64, device="cuda")
    b = torch.randn(4, pattern.n, generator=gen, dtype=F64).cuda()
    solver = SupernodalCholesky()
    solver.factor(values, pattern, zero).solve(b)
    torch.cuda.set_sync_debug_mode("error")
    try:
        solver.factor(values, pattern, zero).solve(b)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_block_graph_matches_numpy() -> None:
    """The compiled block graph equals the NumPy construction it replaced (first column of each
    block, rows to blocks by searchsorted, self loops and repeats dropped)."""
    patterns = [pose_graph_objective(pose_graph_batch(60, 1, seed=2))[0].pattern()]
    scene = bal_scene(8, 60, views=(2, 4), seed=3)
    full = core.costs.bal_objective(scene.problem)[0].pattern()
    patterns += [full, Schur(core.costs.bal_objective(scene.problem)[0],
                             eliminate="points").maps(full).reduced]
    for pattern in patterns:
        starts = sn.pattern_blocks(pattern)
        indptr, rows = pattern.indptr.numpy(), pattern.rows.numpy()
        first = starts[:-1]
        count = indptr[first + 1] - indptr[first]
        owner = np.repeat(np.arange(first.shape[0]), count)
        pos = np.arange(owner.shape[0]) - np.repeat(np.cumsum(count) - count, count)
        other = np.searchsorted(starts, rows[pos + indptr[first][owner]], side="right") - 1
        keep = other != owner
        keep[1:] &= (other[1:] != other[:-1]) | (owner[1:] != owner[:-1])
        ref_ptr = np.concatenate([[0], np.cumsum(np.bincount(owner[keep],
                                                             minlength=first.shape[0]))])
        ptr, idx = sn.block_graph(pattern, starts)
        assert ptr.tolist() == ref_ptr.tolist() and idx.tolist() == other[keep].tolist()


def test_analyze_each_equals_one_analysis_per_ordering() -> None:
    pattern = pose_graph_objective(pose_graph_batch(120, 1, seed=4))[0].pattern()
    orderings = ("amd", "nesdis", "minimum_degree")
    for sym, ordering in zip(sn.analyze_each(pattern, orderings), orderings):
        one = sn.analyze(pattern, ordering)  # type: ignore[arg-type]
        assert sym.ordering == ordering
        for name in ("perm", "starts", "below_ptr", "below_rows", "parent"):
            assert np.array_equal(getattr(sym, name), getattr(one, name))
    with pytest.raises(ValueError, match="unknown ordering 'auto'"):
        sn.analyze_each(pattern, ("auto",))


def test_compiled_ranges_match_python() -> None:
    rng = np.random.default_rng(5)
    begin = rng.integers(0, 1000, 50)
    length = rng.integers(0, 7, 50)
    ref = [b + k for b, n in zip(begin.tolist(), length.tolist()) for k in range(n)]
    assert sn._ranges(begin, length).tolist() == ref
    assert sn._ranges(begin[:0], length[:0]).tolist() == []
