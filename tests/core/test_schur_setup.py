"""Tests for the symbolic set-up of the BA solve: ``Objective._cpu_pattern`` against the
previous builder (kept here as the reference) on random structures, and the Schur maps of
``core.solvers.schur.build_schur_maps`` read back entry by entry against the pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

import core
from core.lie import SE3, Vector
from core.objective import Pattern, _unique_inverse
from core.solvers.schur import build_schur_maps


def reference_pattern(objective: core.Objective) -> Pattern:
    """The pattern builder before the set-up work of issue 17 (``np.unique`` over the block
    keys, the rows scattered block shape by block shape), verbatim but for the error check."""
    sizes = np.concatenate([np.full(v.count, v.space.dof, np.int64) for v in objective.variables])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    num_blocks, first, k = sizes.size, {}, 0
    for v in objective.variables:
        first[v.name], k = k, k + v.count
    blocks = [
        np.stack([first[v.name] + i.cpu().numpy().astype(np.int64)
                  for v, i in zip(c.optimized, c.index)], 1)
        for c in objective.costs
    ]
    keys = np.concatenate([(b[:, None, :] * num_blocks + b[:, :, None]).reshape(-1)
                           for b in blocks])
    unique, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    R, C = unique % num_blocks, unique // num_blocks
    dR = sizes[R]
    below = np.cumsum(dR) - dR
    row_offset = below - below[np.searchsorted(C, C)]
    col_nnz = np.bincount(C, weights=dR, minlength=num_blocks).astype(np.int64)
    per_column = np.repeat(col_nnz, sizes)
    indptr = np.concatenate([[0], np.cumsum(per_column)]).astype(np.int64)
    n, nnz = objective.dim, int(indptr[-1])
    rows = np.empty(nnz, dtype=np.int64)
    dC = sizes[C]
    top = int(sizes.max()) + 1
    for kind in np.unique(dR * top + dC).tolist():
        dr, dc = divmod(kind, top)
        u = np.flatnonzero((dR == dr) & (dC == dc))
        q, p = np.arange(dc), np.arange(dr)
        at = indptr[starts[C[u]][:, None, None] + q[:, None]] + row_offset[u][:, None, None] + p
        rows[at.reshape(-1)] = np.broadcast_to(starts[R[u]][:, None, None] + p,
                                               at.shape).reshape(-1)
    cols = np.repeat(np.arange(n), per_column)
    own = np.searchsorted(unique, np.arange(num_blocks) * (num_blocks + 1))
    local = np.arange(n) - np.repeat(starts, sizes)
    diag = indptr[:-1] + np.repeat(row_offset[own], sizes) + local
    positions, columns, done = [], [], 0
    for c, b in zip(objective.costs, blocks):
        E, slots = b.shape
        dofs = np.array([v.space.dof for v in c.optimized], np.int64)
        slot = np.repeat(np.arange(slots), dofs)
        within = np.arange(int(dofs.sum())) - (np.cumsum(dofs) - dofs)[slot]
        u = inverse[done : done + E * slots * slots].reshape(E, slots, slots)
        done += E * slots * slots
        col = np.ascontiguousarray(starts[b][:, slot] + within)
        pos = np.ascontiguousarray(row_offset[u][:, slot[:, None], slot[None, :]])
        pos += indptr[col][:, None, :]
        pos += within[:, None]
        positions.append(torch.from_numpy(pos))
        columns.append(torch.from_numpy(col))
    return Pattern(n, *(torch.from_numpy(a) for a in (indptr, rows, cols, diag)),
                   tuple(positions), tuple(columns))


def _residual(*xs: Tensor) -> Tensor:
    return torch.cat([x[..., :1] for x in xs], -1)


def random_objective(gen: torch.Generator) -> core.Objective:
    """2-4 variables (SE3 or vectors of 1-4 dof, 1-12 elements), a one-slot cost over every
    element of each (none is free), and 1-3 random costs of 1-3 slots whose factors repeat
    pairs and may touch one variable twice (even one element twice)."""

    def draw(high: int) -> int:
        return int(torch.randint(high, (), generator=gen))

    variables = [
        core.Variable(f"v{k}", SE3 if draw(3) == 0 else Vector(1 + draw(4)), count=1 + draw(12))
        for k in range(2 + draw(3))
    ]
    costs = [core.Cost(_residual, optimized=(v,), index=[torch.arange(v.count)],
                       name=f"all_{v.name}") for v in variables]
    for k in range(1 + draw(3)):
        slots = [variables[draw(len(variables))] for _ in range(1 + draw(3))]
        E = 1 + draw(40)
        index = [torch.randint(v.count, (E,), generator=gen) for v in slots]
        costs.append(core.Cost(_residual, optimized=tuple(slots), index=index, name=f"c{k}"))
    return core.Objective(costs)


@pytest.mark.parametrize("seed", range(40))
def test_pattern_equals_reference(seed: int) -> None:
    objective = random_objective(torch.Generator().manual_seed(seed))
    new, ref = objective.pattern(), reference_pattern(objective)
    assert new.n == ref.n
    for field in ("indptr", "rows", "cols", "diag"):
        assert torch.equal(getattr(new, field), getattr(ref, field)), field
    for a, b in zip(new.positions + new.columns, ref.positions + ref.columns, strict=True):
        assert a.is_contiguous() and torch.equal(a, b)


def test_unique_inverse_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    for keys in (rng.integers(0, 50, 1000), rng.integers(-5, 5, 7), np.arange(5)[::-1].copy(),
                 np.zeros(0, np.int64)):
        unique, inverse = _unique_inverse(keys.astype(np.int64))
        ref_unique, ref_inverse = np.unique(keys, return_inverse=True)
        np.testing.assert_array_equal(unique, ref_unique)
        np.testing.assert_array_equal(inverse, ref_inverse.reshape(-1))


def ba_objective(gen: torch.Generator, cameras: int, points: int, shared: bool
                 ) -> core.Objective:
    """Cameras (SE3) and intrinsics (3 dof, one shared or one per camera) observing points,
    each point seen by 2-4 distinct cameras."""
    cams = core.Variable("cameras", SE3, count=cameras)
    intr = core.Variable("intrinsics", Vector(3), count=1 if shared else cameras)
    pts = core.Variable("points", Vector(3), count=points)
    views = torch.randint(2, min(4, cameras) + 1, (points,), generator=gen)
    order = torch.rand(points, cameras, generator=gen).argsort(-1)
    cam = torch.cat([order[p, : int(views[p])] for p in range(points)])
    point = torch.repeat_interleave(torch.arange(points), views)
    perm = torch.randperm(cam.shape[0], generator=gen)  # observations in any order
    cam, point = cam[perm], point[perm]
    index = [cam, torch.zeros_like(cam) if shared else cam, point]
    return core.Objective([core.Cost(_residual, optimized=(cams, intr, pts), index=index,
                                     name="reprojection")])


@pytest.mark.parametrize(("seed", "shared"), [(0, False), (1, True), (2, False), (3, True)])
def test_schur_maps_address_the_right_entries(seed: int, shared: bool) -> None:
    """Every map entry that is not padding addresses the pattern entry of the unknowns it
    stands for; every W entry of ``H`` is addressed exactly once; the reduced pattern holds
    each stored ``S`` entry's position in its block."""
    gen = torch.Generator().manual_seed(seed)
    objective = ba_objective(gen, cameras=3 + seed, points=25 + 10 * seed, shared=shared)
    pattern = objective.pattern()
    mp = build_schur_maps(objective, "points", pattern)
    rows, cols, nnz = pattern.rows, pattern.cols, pattern.nnz
    elim, keep = mp.elim, mp.keep
    # V blocks: (r, c) of point p
    d = elim.shape[1]
    assert torch.equal(rows[mp.v_pos], elim[:, :, None].expand(-1, d, d))
    assert torch.equal(cols[mp.v_pos], elim[:, None, :].expand(-1, d, d))
    # W blocks: reduced row elem_rows[w_elem, r] (padding: m), column of point w_point
    m = keep.shape[0]
    red_rows = mp.elem_rows[mp.w_elem]  # (T, dmax) reduced indices
    stored = mp.w_pos < nnz
    assert torch.equal(stored, (red_rows < m)[:, :, None].expand_as(stored))
    want_row = keep[red_rows.clamp_max(m - 1)][:, :, None].expand_as(stored)
    want_col = elim[mp.w_point][:, None, :].expand_as(stored)
    assert torch.equal(rows[mp.w_pos[stored]], want_row[stored])
    assert torch.equal(cols[mp.w_pos[stored]], want_col[stored])
    point_of = torch.full((pattern.n,), -1).index_put_((elim.reshape(-1),), torch.arange(
        elim.numel()) // d)
    is_w = (point_of[cols] >= 0) & (point_of[rows] < 0)
    addressed = torch.zeros(nnz, dtype=torch.long).index_add_(
        0, mp.w_pos[stored], torch.ones_like(mp.w_pos[stored]))
    assert torch.equal(addressed, is_w.long())
    # S = U - W V^-1 W^T from random values, through the maps, against the dense formula
    values = torch.randn(1, nnz, generator=gen, dtype=torch.float64)
    dense = pattern.to_dense(values)
    dense = dense + dense.mT + 100 * torch.eye(pattern.n, dtype=torch.float64)
    values = dense[:, rows, cols]
    solver = core.solvers.Schur(objective, eliminate="points", reduced="dense")
    W = torch.cat([values, values.new_zeros(1, 1)], 1)[:, mp.w_pos]  # padding reads 0
    Wt = values[:, mp.wt_pos].view(1, -1).index_fill_(1, mp.wt_zero, 0).view(1, *mp.wt_pos.shape)
    assert torch.equal(Wt[:, :-1], W.transpose(-1, -2)) and not bool(Wt[:, -1].any())
    v_inv = torch.linalg.inv(values[:, mp.v_pos])
    damping = torch.zeros(1, pattern.n, dtype=torch.float64)
    S = solver._reduced_values(values, damping, Wt, v_inv, mp)
    e = elim.reshape(-1)
    ref = dense[:, keep][:, :, keep] - dense[:, keep][:, :, e] @ torch.linalg.inv(
        dense[:, e][:, :, e]) @ dense[:, e][:, :, keep]
    torch.testing.assert_close(S, ref[:, mp.reduced.rows, mp.reduced.cols])
