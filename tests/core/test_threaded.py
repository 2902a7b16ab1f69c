"""The one-matrix supernodal Cholesky (core.solvers.threaded) and the compiled symbolic analysis:
solutions against dense solves and CHOLMOD, the threads' split against one thread (bit for bit),
failures, ``A + beta I``, and the analysis against plain-Python references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as la
import torch

import core
from bench.__main__ import pose_graph_objective
from bench.synthetic import bal_scene, pose_graph_batch
from core import _blas
from core._kernels import AVAILABLE as KERNELS
from core.solvers import Schur, SparseCholesky, available_backends, compiled, threaded
from core.solvers import supernodal as sn

F64 = torch.float64
pytestmark = pytest.mark.skipif(not KERNELS, reason="needs Numba (ARIADNE_KERNELS not 0)")


def helix(poses: int, damping: float = 1e-4):
    """Real damped normal equations of a helix pose graph (loop closures: fill-in, a deep
    tree): pattern, ``H (1, nnz)``, ``g (1, n)``, ``damping (1, n)``."""
    objective, init = pose_graph_objective(pose_graph_batch(poses, 1, seed=0))
    lin = core.linearize(objective, init)
    return lin.pattern, lin.H, lin.g, torch.full((1, lin.pattern.n), damping, dtype=F64)


def random_spd(pattern: core.Pattern, g: torch.Generator) -> torch.Tensor:
    """Values ``(1, nnz)`` of a symmetric, strictly diagonally dominant matrix of ``pattern``."""
    n, rows, cols = pattern.n, pattern.rows, pattern.cols
    transpose = torch.searchsorted(cols * n + rows, rows * n + cols)
    v = torch.randn(1, pattern.nnz, generator=g, dtype=F64)
    v = v + v[:, transpose]
    v[:, pattern.diag] = 0.0
    v[:, pattern.diag] = torch.zeros(1, n, dtype=F64).index_add_(1, rows, v.abs()) + 1.0
    return v


def ba_patterns() -> dict[str, core.Pattern]:
    scene = bal_scene(10, 120, views=(2, 5), seed=1)
    objective, _ = core.costs.bal_objective(scene.problem)
    full = objective.pattern()
    return {"ba_full": full, "ba_reduced": Schur(objective, eliminate="points").maps(full).reduced}


def tree_plan(pattern: core.Pattern, parts: int, min_gain: float = 0.0) -> threaded.TreePlan:
    sym = sn.analyze(pattern, "auto" if "cholmod" in available_backends() else "minimum_degree")
    return threaded.split(sym, compiled.plan(sym), parts, min_gain=min_gain)


def dense_solve(pattern: core.Pattern, values: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(pattern.to_dense(values), b[..., None])[..., 0]


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_real_pose_graph_matches_dense_and_cholmod(parts: int) -> None:
    pattern, H, g, damping = helix(300)
    values = (H + 0).index_add(1, pattern.diag, damping).numpy()
    tp = tree_plan(pattern, parts)
    assert len(tp.parts) == (parts if parts > 1 else 0)
    factor = threaded.factor(tp, values, threads=parts)
    assert factor.ok.tolist() == [True] and factor.failures() == {}
    x = factor.solve(-g)
    assert x.shape == g.shape and x.dtype == F64
    assert relative(x, dense_solve(pattern, torch.from_numpy(values), -g)) < 1e-10
    if "cholmod" in available_backends():
        ref = SparseCholesky(backend="cholmod", threaded_up_to=0).factor(H, pattern, damping)
        assert relative(x, ref.solve(-g)) < 1e-10


@pytest.mark.parametrize("structure", ["ba_full", "ba_reduced"])
def test_random_spd_of_bundle_adjustment_structure(structure: str, gen: torch.Generator) -> None:
    pattern = ba_patterns()[structure]
    values = random_spd(pattern, gen)
    b = torch.randn(1, pattern.n, generator=gen, dtype=F64)
    for parts in (1, 2):
        factor = threaded.factor(tree_plan(pattern, parts), values.numpy(), threads=parts)
        assert relative(factor.solve(b), dense_solve(pattern, values, b)) < 1e-10


def test_threads_give_the_same_factor_bit_for_bit() -> None:
    """The parts' arithmetic is the same on one thread or several; the split's factor equals
    the one-part factor to rounding (the top's updates are summed in another order)."""
    pattern, H, _, damping = helix(400)
    values = (H + 0).index_add(1, pattern.diag, damping).numpy()
    tp = tree_plan(pattern, 2)
    assert len(tp.parts) == 2 and tp.top.sns.size > 0
    assert all(q.sns.size for q in tp.parts)
    one = threaded.factor(tp, values, threads=1)
    two = threaded.factor(tp, values, threads=2)
    assert np.array_equal(one.L, two.L)
    whole = threaded.factor(tree_plan(pattern, 1), values)
    assert np.abs(two.L - whole.L).max() <= 1e-12 * np.abs(whole.L).max()


def test_split_covers_every_supernode_once() -> None:
    pattern, *_ = helix(400)
    tp = tree_plan(pattern, 3)
    sns = np.concatenate([q.sns for q in tp.parts] + [tp.top.sns])
    assert sorted(sns.tolist()) == list(range(tp.plan.starts.shape[0] - 1))
    # every entry of the matrix is scattered by exactly one part; panels zeroed exactly once
    src = np.concatenate([q.src for q in tp.parts])
    assert sorted(src.tolist()) == sorted(tp.plan.src.tolist())
    covered = np.zeros(int(tp.plan.poff[-1]), dtype=int)
    for q in tp.parts:
        for a, b in q.ranges:
            covered[a:b] += 1
    assert (covered == 1).all()
    # a part's supernodes are whole subtrees: their parents are in the part or the top
    top = set(tp.top.sns.tolist())
    owner = {s: k for k, q in enumerate(tp.parts) for s in q.sns.tolist()}
    sym = sn.analyze(pattern, "auto" if "cholmod" in available_backends() else "minimum_degree")
    for s, k in owner.items():
        p = int(sym.parent[s])
        assert p < 0 or p in top or owner.get(p) == k


def test_small_problems_stay_on_one_part() -> None:
    pattern, *_ = helix(64)
    assert tree_plan(pattern, 2, min_gain=threaded.MIN_PART).parts == []


def test_beta_is_the_damping_added_to_the_diagonal() -> None:
    pattern, H, g, _ = helix(200)
    h = H.numpy()
    damped = h.copy()
    damped[:, pattern.diag.numpy()] += 0.25
    tp = tree_plan(pattern, 2)
    a = threaded.factor(tp, h, beta=0.25, threads=2)
    b = threaded.factor(tp, damped, threads=2)
    assert np.array_equal(a.L, b.L)


@pytest.mark.parametrize("where", ["part", "top"])
def test_indefinite_or_non_finite_fails_with_its_pivot(where: str) -> None:
    pattern, H, g, damping = helix(400)
    tp = tree_plan(pattern, 2)
    q = tp.parts[0] if where == "part" else tp.top
    column = int(tp.plan.starts[int(q.sns[len(q.sns) // 2])])  # a new column in that share
    unknown = int(tp.plan.perm[column])
    values = (H + 0).index_add(1, pattern.diag, damping).numpy()
    diag_entry = int(pattern.diag[unknown])
    bad = values.copy()
    bad[0, diag_entry] = -1e6  # not positive definite at that pivot at the latest
    factor = threaded.factor(tp, bad, threads=2)
    assert factor.ok.tolist() == [False]
    assert "not positive definite (pivot at unknown" in factor.failures()[0]
    assert bool((factor.solve(g) == 0).all())
    nan = values.copy()
    nan[0, diag_entry] = float("nan")
    factor = threaded.factor(tp, nan, threads=2)
    assert factor.ok.tolist() == [False] and factor.pivot == unknown


def test_bad_shapes_raise() -> None:
    pattern, H, g, _ = helix(64)
    tp = tree_plan(pattern, 1)
    with pytest.raises(ValueError, match=r"values must be \(1, "):
        threaded.factor(tp, H.numpy()[:, :-1])
    factor = threaded.factor(tp, H.numpy(), beta=1.0)
    with pytest.raises(ValueError, match=r"b must be \(1, "):
        factor.solve(g[:, :-1])


def test_sparse_cholesky_uses_it_for_one_matrix(gen: torch.Generator) -> None:
    """``SparseCholesky()`` factors one matrix with the threaded kernel (``lambda I`` without a
    damped copy, other damping with one), batches as before; LM reaches the same solution with
    the same iterations as with CHOLMOD."""
    pattern, H, g, damping = helix(200)
    solver = SparseCholesky()
    factor = solver.factor(H, pattern, damping)
    assert isinstance(factor, threaded.ThreadedFactor)
    diag = torch.rand(1, pattern.n, generator=gen, dtype=F64)
    x = solver.factor(H, pattern, diag).solve(-g)
    assert relative(x, dense_solve(pattern, H.index_add(1, pattern.diag, diag), -g)) < 1e-10
    assert not isinstance(solver.factor(H.expand(2, -1), pattern, damping.expand(2, -1)),
                          threaded.ThreadedFactor)
    if "cholmod" not in available_backends():
        return
    results = []
    for up_to in (0, 10**9):
        objective, init = pose_graph_objective(pose_graph_batch(300, 1, seed=2))
        lm = core.LevenbergMarquardt(max_iters=30, solver=SparseCholesky(threaded_up_to=up_to))
        info = lm.solve(objective, init).info
        results.append((int(info.iterations.max()), float(info.final_cost.sum())))
    assert results[0][0] == results[1][0]
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-9)


def test_blas_threads_are_restored() -> None:
    lib = _blas._library()
    if lib is None:
        pytest.skip("SciPy without its own OpenBLAS")
    before = int(lib.scipy_openblas_get_num_threads())
    with _blas.blas_threads(1):
        assert int(lib.scipy_openblas_get_num_threads()) == 1
    assert int(lib.scipy_openblas_get_num_threads()) == before


# ------------------------------------------------------------------------------------------
# the compiled symbolic analysis against plain-Python references
# ------------------------------------------------------------------------------------------


def reference_structure(indptr: np.ndarray, indices: np.ndarray, order: np.ndarray):
    """Elimination by sets: ``struct(k)`` = later neighbours plus children's structures."""
    nb = order.shape[0]
    inv = np.empty(nb, dtype=np.int64)
    inv[order] = np.arange(nb)
    pending: list[set[int]] = [set() for _ in range(nb)]
    struct, parent = [], np.full(nb, -1)
    for k in range(nb):
        nbrs = inv[indices[indptr[order[k]] : indptr[order[k] + 1]]]
        s = pending[k] | set(nbrs[nbrs > k].tolist())
        struct.append(sorted(s))
        if s:
            parent[k] = min(s)
            pending[parent[k]] |= s - {parent[k]}
    return struct, parent


def random_graph(nb: int, edges: int, rng: np.random.Generator):
    a, b = rng.integers(0, nb, edges), rng.integers(0, nb, edges)
    keep = a != b
    adj = np.zeros((nb, nb), dtype=bool)
    adj[a[keep], b[keep]] = adj[b[keep], a[keep]] = True
    indptr = np.concatenate([[0], np.cumsum(adj.sum(1))]).astype(np.int64)
    return indptr, np.nonzero(adj)[1].astype(np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_compiled_structure_matches_sets(seed: int) -> None:
    rng = np.random.default_rng(seed)
    nb = int(rng.integers(1, 60))
    indptr, indices = random_graph(nb, int(rng.integers(0, 3 * nb)), rng)
    order = rng.permutation(nb).astype(np.int64)
    ptr, rows, parent = sn._structure_csr(indptr, indices, order)
    struct, ref_parent = reference_structure(indptr, indices, order)
    assert [rows[ptr[k] : ptr[k + 1]].tolist() for k in range(nb)] == struct
    assert parent.tolist() == ref_parent.tolist()
    post = sn._postorder(parent)
    assert sorted(post.tolist()) == list(range(nb))
    where = np.empty(nb, dtype=np.int64)
    where[post] = np.arange(nb)
    assert all(parent[k] < 0 or where[k] < where[parent[k]] for k in range(nb))


def test_compiled_blocks_match_column_comparison() -> None:
    for pattern in [helix(50)[0], *ba_patterns().values()]:
        indptr, rows = pattern.indptr.numpy(), pattern.rows.numpy()
        cols = [tuple(rows[indptr[j] : indptr[j + 1]]) for j in range(pattern.n)]
        ref = [0] + [j for j in range(1, pattern.n) if cols[j] != cols[j - 1]] + [pattern.n]
        assert sn.pattern_blocks(pattern).tolist() == ref


def test_ragged_blocks_keep_their_own_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block of a ragged batch has its own plan cache: sixteen blocks once shared one
    eight-plan cache with the template and were analysed again at every step."""
    from core import ragged
    from core.solvers.sparse import RaggedCholesky

    objectives, values = [], []
    for k in range(12):  # more problems than a PlanCache holds
        objective, init = pose_graph_objective(pose_graph_batch(20 + k, 1, seed=k))
        objectives.append(objective)
        values.append(init)
    batch = ragged.merge(objectives)
    lin = core.linearize(batch.objective, batch.join_values(values))
    solver = RaggedCholesky(batch.objective.groups)
    active = torch.ones(len(objectives), dtype=torch.bool)
    active[0] = False  # per-block factors
    damping = torch.full_like(lin.g, 1e-3)
    calls = []
    original = threaded.split
    monkeypatch.setattr(threaded, "split", lambda *a, **k: calls.append(1) or original(*a, **k))
    solver.factor(lin.H, lin.pattern, damping, active)
    first = len(calls)
    assert first >= len(objectives) - 1
    solver.factor(lin.H, lin.pattern, damping, active)
    assert len(calls) == first


def reference_split(sym: sn.Symbolic, plan: compiled.Plan, parts: int, max_top: int = 256,
                    min_gain: float = threaded.MIN_PART) -> threaded.TreePlan:
    """``threaded.split`` in plain Python (lists, one supernode at a time), as first written."""
    parent = sym.parent.astype(np.int64)
    S = parent.shape[0]
    W = np.diff(plan.starts).astype(np.float64)
    Mf = np.diff(plan.rptr).astype(np.float64)
    work = W**3 / 3 + Mf * W**2 + Mf**2 * (W + 4) / 2 + threaded.CALL_FLOPS
    serial = float(work.sum())
    spf = threaded.SECONDS_PER_FLOP

    def deal(roots: list[int]) -> tuple[list[list[int]], float]:
        bins: list[list[int]] = [[] for _ in range(parts)]
        load = [0.0] * parts
        for r in sorted(roots, key=lambda r: -sub[r]):
            k = load.index(min(load))
            bins[k].append(r)
            load[k] += float(sub[r])
        return bins, max(load)

    best = None
    if parts > 1 and serial * spf >= 2 * min_gain:
        sub, first = work.copy(), np.arange(S)
        for s, p in enumerate(parent.tolist()):
            if p >= 0:
                sub[p] += sub[s]
                first[p] = min(first[p], first[s])
        children: list[list[int]] = [[] for _ in range(S)]
        for s, p in enumerate(parent.tolist()):
            if p >= 0:
                children[p].append(s)
        panel = np.diff(plan.poff).astype(np.float64)
        frontier = [int(s) for s in np.nonzero(parent < 0)[0]]
        top: list[int] = []
        top_work = top_size = 0.0
        since = 0
        for _ in range(min(max_top, S) + 1):
            bins, most = deal(frontier)
            estimate = most + top_work + top_size * parts * 1e-9 / spf
            if best is None or estimate < best[0]:
                if best is None or estimate < 0.99 * best[0]:
                    since = 0
                best = (estimate, list(top), bins)
            since += 1
            if not frontier or since > threaded.PATIENCE:
                break
            r = max(frontier, key=lambda s: sub[s])
            frontier.remove(r)
            frontier.extend(children[r])
            top.append(r)
            top_work += float(work[r])
            top_size += float(panel[r])
    gain = 0.0 if best is None else serial - best[0]
    if best is None or gain <= 0 or gain * spf < min_gain:
        whole = threaded.Part(np.arange(S), np.array([[0, int(plan.poff[-1])]]), plan.src,
                              plan.dst, np.full(S, -1), 0, int(np.diff(plan.rptr).max(initial=0)))
        return threaded.TreePlan(plan, [], whole, np.zeros(1, np.int64), serial * spf)
    estimate, top, bins = best
    top_sns = np.array(sorted(top), dtype=np.int64)
    top_offsets = np.concatenate([[0], np.cumsum(np.diff(plan.poff)[top_sns])])
    priv_off = np.full(S, -1)
    priv_off[top_sns] = top_offsets[:-1]
    part_of = np.zeros(S, dtype=np.int64)
    for k, roots in enumerate(bins):
        for r in roots:
            part_of[first[r] : r + 1] = k
    part_of[top_sns] = 0
    entry_part = part_of[np.searchsorted(plan.poff, plan.dst, side="right") - 1]
    M = np.diff(plan.rptr)
    shares = []
    for k, roots in enumerate(bins):
        sns = np.sort(np.concatenate([np.arange(first[r], r + 1) for r in roots] or
                                     [np.zeros(0, np.int64)]))
        ranges = [[plan.poff[first[r]], plan.poff[r + 1]] for r in roots]
        if k == 0:
            ranges += [[plan.poff[t], plan.poff[t + 1]] for t in top_sns]
        mine = np.nonzero(entry_part == k)[0]
        shares.append(threaded.Part(sns, np.array(ranges).reshape(-1, 2), plan.src[mine],
                                    plan.dst[mine], np.full(S, -1) if k == 0 else priv_off,
                                    0 if k == 0 else int(top_offsets[-1]),
                                    int(M[sns].max(initial=0))))
    top_part = threaded.Part(top_sns, np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.full(S, -1),
                             0, int(M[top_sns].max(initial=0)))
    return threaded.TreePlan(plan, shares, top_part, top_offsets, estimate * spf)


@pytest.mark.parametrize("parts,max_top", [(1, 256), (2, 256), (3, 256), (2, 3), (4, 40)])
def test_compiled_split_matches_python_reference(parts: int, max_top: int) -> None:
    """The compiled tree walk and entry grouping give the plain-Python split's plan exactly."""
    ordering = "auto" if "cholmod" in available_backends() else "minimum_degree"
    patterns = [helix(400)[0], helix(1500)[0], *ba_patterns().values()]
    split_up = 0
    for pattern in patterns:
        sym = sn.analyze(pattern, ordering)
        plan = compiled.plan(sym)
        for min_gain in (0.0, threaded.MIN_PART):
            got = threaded.split(sym, plan, parts, max_top, min_gain)
            ref = reference_split(sym, plan, parts, max_top, min_gain)
            assert got.estimate == pytest.approx(ref.estimate, rel=1e-12)
            assert threaded.estimate(sym, parts, max_top, min_gain) == got.estimate
            assert len(got.parts) == len(ref.parts)
            assert np.array_equal(got.top_offsets, ref.top_offsets)
            for a, b in zip(got.parts + [got.top], ref.parts + [ref.top]):
                for name in ("sns", "ranges", "src", "dst", "priv_off"):
                    assert np.array_equal(getattr(a, name), getattr(b, name)), name
                assert (a.priv_size, a.max_below) == (b.priv_size, b.max_below)
        split_up += bool(threaded.split(sym, plan, parts, max_top, 0.0).parts)
    assert split_up >= (2 if parts > 1 else 0)  # the helices split: the parts were compared


def test_split_deals_ties_like_python() -> None:
    """Equal subtrees: dealt in frontier order, each to the lowest least-loaded bin."""
    sub = np.array([5.0, 7.0, 5.0, 7.0, 1.0])
    roots = np.array([0, 1, 2, 3, 4])
    bins, most = threaded._deal(roots, sub, 2)
    assert bins.tolist() == [0, 0, 1, 1, 0] and most == 13.0


def dense_lower(plan: compiled.Plan, L: np.ndarray) -> np.ndarray:
    """The factor's dense lower triangle (new order) read from the row-major panels, in plain
    Python."""
    n = plan.pattern.n
    out = np.zeros((n, n))
    for s in range(plan.starts.shape[0] - 1):
        c0, c1 = int(plan.starts[s]), int(plan.starts[s + 1])
        W = c1 - c0
        panel_rows = list(range(c0, c1)) + plan.rows[plan.rptr[s] : plan.rptr[s + 1]].tolist()
        panel = L[plan.poff[s] : plan.poff[s + 1]].reshape(-1, W)
        for i, r in enumerate(panel_rows):
            for j in range(W):
                if r >= c0 + j:
                    out[r, c0 + j] = panel[i, j]
    return out


@pytest.mark.parametrize("parts", [2, 3])
def test_solve_on_parts_matches_triangular_solves_and_is_the_same_on_any_threads(
        parts: int, gen: torch.Generator) -> None:
    """The parts' solve (forward in parts, the top, backward in parts) gives the dense
    triangular solves' answer with the same panels, the same bits on one thread or several,
    and the one-part solve's answer to rounding."""
    for pattern, values in [(helix(400)[0], None), (ba_patterns()["ba_full"], None)]:
        if values is None:
            values = random_spd(pattern, gen).numpy()
        tp = tree_plan(pattern, parts, min_gain=0.0)
        assert len(tp.parts) == parts
        factor = threaded.factor(tp, values, threads=1)
        b = torch.randn(1, pattern.n, generator=gen, dtype=F64)
        one = factor.solve(b, threads=1)
        many = factor.solve(b, threads=parts)
        assert torch.equal(one, many)
        low, perm = dense_lower(tp.plan, factor.L), tp.plan.perm
        y = la.solve_triangular(low, b[0].numpy()[perm], lower=True)
        ref = np.empty(pattern.n)
        ref[perm] = la.solve_triangular(low.T, y, lower=False)
        assert relative(one[0], torch.from_numpy(ref)) < 1e-12
        whole = threaded.ThreadedFactor(tree_plan(pattern, 1), factor.L, factor.ok, factor.pivot)
        assert relative(one, whole.solve(b)) < 1e-12  # the same panels as one part
        assert relative(one, dense_solve(pattern, torch.from_numpy(values), b)) < 1e-10


def test_set_up_runs_without_cholmod(monkeypatch: pytest.MonkeyPatch) -> None:
    """``prepare_threaded`` (run when a solver or an optimizer is made) orders by minimum degree
    where scikit-sparse (CHOLMOD's AMD) is not installed, and splits its graph all the same."""
    import importlib.util

    from core.solvers import sparse

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("sksparse") else real(name, *a))
    monkeypatch.setattr(sparse, "_found_backends", lambda: ("scipy",))
    assert sparse.prepare_threaded.__wrapped__() > 0
