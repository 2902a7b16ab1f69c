"""The compiled CPU path of the Schur solver (``core._schur_kernels``) against the torch path:
``S``'s values, solves, failure flags, ragged batches, both reduced solvers, other block sizes,
gradients through the solve, and an LM solve of the bench's synthetic BA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_schur import DT, ba_system, dense_solve, synthetic_ba  # tests/core is on sys.path

import core
from core import _schur_kernels
from core.solvers.schur import CompiledSchurFactor, Schur, SchurFactor

pytestmark = pytest.mark.skipif(not _schur_kernels.AVAILABLE, reason="Numba kernels disabled")


def random_values(lin: core.Linearization, gen: torch.Generator) -> torch.Tensor:
    """Random symmetric values in ``lin``'s pattern, diagonally dominant (SPD), ``(B, nnz)``."""
    p = lin.pattern
    A = p.to_dense(torch.randn(lin.H.shape, generator=gen, dtype=DT))
    A = A + A.mT
    A = A + torch.diag_embed(A.abs().sum(-1) + 1)
    return A[:, p.rows, p.cols]


def torch_reduced_values(solver: Schur, H: torch.Tensor, pattern: core.objective.Pattern,
                         damping: torch.Tensor) -> torch.Tensor:
    """``S``'s values by the torch path's own maps and products."""
    mp = solver.maps(pattern)
    batch = H.shape[0]
    V = H[:, mp.v_pos] + torch.diag_embed(damping[:, mp.elim])
    v_inv = torch.cholesky_inverse(torch.linalg.cholesky(V))
    Wt = H[:, mp.wt_pos].view(batch, -1).index_fill_(1, mp.wt_zero, 0)
    return solver._reduced_values(H, damping, Wt.view(batch, *mp.wt_pos.shape), v_inv, mp)


def compiled_reduced_values(solver: Schur, H: torch.Tensor, pattern: core.objective.Pattern,
                            damping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S``'s values by the compiled kernel, and ``S`` as the dense reduced path builds it."""
    cm = solver._compiled_maps(pattern)
    _, _, blocks, ok = solver._compiled_blocks(H, damping, cm)
    assert ok.all()
    reduced, s_gather = cm.reduced()
    dense = _schur_kernels.dense_reduced(blocks, cm.block_elems, cm.elem_rows, cm.elem_dof,
                                         reduced.n)
    return torch.from_numpy(blocks.reshape(H.shape[0], -1)[:, s_gather]), torch.from_numpy(dense)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shared", [False, True])
def test_reduced_values_equal_torch(gen: torch.Generator, batch: int, shared: bool) -> None:
    """Same reduced pattern, same ``S`` values (random SPD values in a BA pattern with camera
    coupling and point priors; ``shared``: 6-dof cameras and one 3-dof intrinsics element)."""
    objective, lin = ba_system(gen, batch=batch, shared_intrinsics=shared)
    H = random_values(lin, gen)
    damping = torch.rand(lin.g.shape, generator=gen, dtype=DT)
    solver = Schur(objective, "points")
    expected = torch_reduced_values(solver, H, lin.pattern, damping)
    values, dense = compiled_reduced_values(solver, H, lin.pattern, damping)
    torch_pattern = solver.maps(lin.pattern).reduced
    pattern, _ = solver._compiled_maps(lin.pattern).reduced()
    for field in ("indptr", "rows", "cols", "diag"):
        assert torch.equal(getattr(pattern, field), getattr(torch_pattern, field)), field
    assert solver._compiled_maps(lin.pattern).nnz_s == pattern.nnz
    assert_rel(values, expected)
    assert torch.equal(dense, pattern.to_dense(values))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("reduced", ["dense", "sparse", "auto"])
def test_solve_equals_torch(gen: torch.Generator, batch: int, reduced: str) -> None:
    objective, lin = ba_system(gen, batch=batch)
    damping = 1 + torch.rand(lin.g.shape, generator=gen, dtype=DT)
    compiled = Schur(objective, "points", reduced=reduced)
    reference = Schur(objective, "points", reduced=reduced, compiled=False)
    fc = compiled.factor(lin.H, lin.pattern, damping)
    ft = reference.factor(lin.H, lin.pattern, damping)
    assert isinstance(fc, CompiledSchurFactor) and isinstance(ft, SchurFactor)
    assert not compiled._maps  # the torch maps are not built for the compiled path
    assert fc.ok.tolist() == ft.ok.tolist() == [True] * batch
    for b in (-lin.g, torch.randn(lin.g.shape, generator=gen, dtype=DT)):
        x = fc.solve(b)
        assert_rel(x, ft.solve(b), 1e-11)  # cond(A) ~ 1e4: rounding of two summation orders
        assert_rel(x, dense_solve(lin, damping, b), 1e-9)
    # the torch path, once asked for, builds its maps for the same pattern and agrees
    assert isinstance(compiled.factor(lin.H.requires_grad_(), lin.pattern, damping),
                      SchurFactor)
    assert compiled._maps


def test_not_positive_definite_point_flags_its_element_only(gen: torch.Generator) -> None:
    objective, lin = ba_system(gen, batch=3)
    damping = torch.full_like(lin.g, 1e-2)
    damping[1, objective.offsets["points"] + 4] = -1e9  # point 1's second unknown
    fc = Schur(objective, "points").factor(lin.H, lin.pattern, damping)
    ft = Schur(objective, "points", compiled=False).factor(lin.H, lin.pattern, damping)
    assert fc.ok.tolist() == ft.ok.tolist() == [True, False, True]
    xc, xt = fc.solve(-lin.g), ft.solve(-lin.g)
    assert torch.isfinite(xc).all()
    # the failed point block is replaced by the identity on both paths
    torch.testing.assert_close(xc, xt, rtol=1e-9, atol=1e-9 * float(xt.abs().max()))


def test_ragged_batch(gen: torch.Generator) -> None:
    """A block-diagonal pattern over scenes of 5-9 cameras: the sparse reduced path by
    ``auto``, with the dense one forced too."""
    from core import ragged

    scenes = [synthetic_ba(gen, num_cameras=c, num_points=20 + c) for c in (5, 6, 7, 8, 9)]
    batch = ragged.merge([core.Objective([cost]) for _, cost, _ in scenes],
                         cache=ragged.RaggedCache(1))
    lin = core.linearize(batch.objective, batch.join_values([init for _, _, init in scenes]))
    damping = torch.full_like(lin.g, 1e-2)
    expected = dense_solve(lin, damping, -lin.g)
    for reduced in ("auto", "dense"):
        solver = Schur(batch.objective, "points", reduced=reduced)
        fc = solver.factor(lin.H, lin.pattern, damping)
        ft = Schur(batch.objective, "points", reduced=reduced, compiled=False).factor(
            lin.H, lin.pattern, damping)
        assert isinstance(fc, CompiledSchurFactor) and fc.ok.all()
        assert isinstance(fc.reduced, core.solvers.dense.DenseFactor) == (reduced == "dense")
        x = fc.solve(-lin.g)
        assert_rel(x, ft.solve(-lin.g), 1e-10)
        assert_rel(x, expected, 1e-8)


def test_other_block_sizes(gen: torch.Generator) -> None:
    """Eliminating the 6-dof cameras (the generic kernel loops; reduced: intrinsics and
    points) and the 3-dof intrinsics (reduced: cameras, points, of 6 and 3 unknowns)."""
    v, cost, init = synthetic_ba(gen, batch=2)
    objective = core.Objective([cost])
    lin = core.linearize(objective, init)
    damping = 1 + torch.rand(lin.g.shape, generator=gen, dtype=DT)
    for eliminate in ("cameras", "intrinsics"):
        fc = Schur(objective, eliminate).factor(lin.H, lin.pattern, damping)
        ft = Schur(objective, eliminate, compiled=False).factor(lin.H, lin.pattern, damping)
        assert isinstance(fc, CompiledSchurFactor) and fc.ok.all()
        x = fc.solve(-lin.g)
        assert_rel(x, ft.solve(-lin.g), 1e-10)
        assert_rel(x, dense_solve(lin, damping, -lin.g), 1e-8)


def test_torch_path_where_the_compiled_one_does_not_apply(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    objective, lin = ba_system(gen, batch=1)
    damping = torch.ones_like(lin.g)
    solver = Schur(objective, "points")
    assert isinstance(solver.factor(lin.H.float(), lin.pattern, damping.float()), SchurFactor)
    assert isinstance(solver.factor(lin.H, lin.pattern, damping.requires_grad_()), SchurFactor)
    with torch.no_grad():  # no gradient asked: compiled
        assert isinstance(solver.factor(lin.H, lin.pattern, damping), CompiledSchurFactor)
    monkeypatch.setattr(_schur_kernels, "AVAILABLE", False)  # ARIADNE_KERNELS=0
    assert isinstance(solver.factor(lin.H, lin.pattern, damping.detach()), SchurFactor)


def test_solve_is_differentiable_in_b(gen: torch.Generator) -> None:
    """``x = A^-1 b``: the gradient ``A^-1 w`` of ``w . x``, and its own gradient in ``w``
    (double backward), as through the torch path's solve."""
    objective, lin = ba_system(gen, batch=2)
    damping = 1 + torch.rand(lin.g.shape, generator=gen, dtype=DT)
    v = torch.randn(lin.g.shape, generator=gen, dtype=DT)
    grads = []
    for compiled in (True, False):
        factor = Schur(objective, "points", compiled=compiled).factor(lin.H, lin.pattern, damping)
        b = lin.g.detach().clone().requires_grad_()
        w = v.flip(-1).clone().requires_grad_()
        (gb,) = torch.autograd.grad((w * factor.solve(b)).sum(), b, create_graph=True)
        (gw,) = torch.autograd.grad((gb * v).sum(), w)
        grads.append((gb.detach(), gw))
    assert_rel(grads[0][0], grads[1][0], 1e-11)
    assert_rel(grads[0][0], factor.solve(v.flip(-1)), 1e-11)  # A symmetric: A^-1 w
    assert_rel(grads[0][1], grads[1][1], 1e-11)


def test_lm_on_bench_ba_reaches_the_same_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's synthetic BA (small): the same LM iterations and final cost."""
    from bench.__main__ import ariadne_bal_objective
    from bench.synthetic import bal_scene

    problem = bal_scene(8, 300, views=(3, 6)).problem
    infos = []
    for compiled in (True, False):
        objective, init = ariadne_bal_objective(problem)
        solver = Schur(objective, "points", compiled=compiled)
        lm = core.LevenbergMarquardt(max_iters=15, solver=solver)
        infos.append(lm.solve(objective, init).info)
        assert bool(solver._maps) != compiled and bool(solver._cmaps) == compiled
    assert infos[0].iterations.tolist() == infos[1].iterations.tolist()
    assert (infos[0].final_cost < 1e-2 * infos[0].initial_cost).all()
    torch.testing.assert_close(infos[0].final_cost, infos[1].final_cost, rtol=1e-9, atol=0)


def test_unique_ids() -> None:
    rng = np.random.default_rng(0)
    for keys in (rng.integers(0, 50, 1000), rng.integers(0, 1 << 40, 300), np.arange(5)[::-1],
                 np.zeros(0, np.int64)):
        keys = np.ascontiguousarray(keys, np.int64)
        distinct, ids = _schur_kernels.unique_ids(keys)
        assert np.array_equal(distinct[ids], keys)
        assert np.array_equal(distinct, keys[np.sort(np.unique(keys, return_index=True)[1])])


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_the_points(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
                                  threads: int) -> None:
    """Chunks of points on several threads, each into its own ``S`` blocks: the same ``L`` and
    ``Z``, the same ``S`` to rounding, and the same solves."""
    from core.solvers import schur

    objective, lin = ba_system(gen, batch=2)
    damping = 1 + torch.rand(lin.g.shape, generator=gen, dtype=DT)
    damping[1, objective.offsets["points"] + 7] = -1e9  # one failed point
    solver = Schur(objective, "points")
    cm = solver._compiled_maps(lin.pattern)
    one = solver._compiled_blocks(lin.H, damping, cm, threads=1)
    many = solver._compiled_blocks(lin.H, damping, cm, threads=threads)
    assert np.array_equal(one[0], many[0]) and np.array_equal(one[1], many[1])
    assert one[3].tolist() == many[3].tolist() == [True, False]
    assert_rel(torch.from_numpy(many[2]), torch.from_numpy(one[2]))
    factor = solver.factor(lin.H, lin.pattern, damping)
    expected = factor.solve(-lin.g)
    monkeypatch.setattr(schur.parallel, "threads", lambda *args: threads)
    assert_rel(solver.factor(lin.H, lin.pattern, damping).solve(-lin.g), expected)
