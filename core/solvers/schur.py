"""Schur complement solver: eliminate many small independent blocks first (bundle adjustment).

With the unknowns split into the reduced ones ``c`` (cameras, ...) and the eliminated ones ``p``
(points), whose block ``V`` of ``A = H + diag(damping)`` is block diagonal (each factor touches at
most one point), ``A = [[U, W], [W^T, V]]`` and ``A x = b`` is solved by (Triggs et al., "Bundle
adjustment - a modern synthesis", 2000, sec. 6.1; Agarwal et al., "Bundle adjustment in the
large", ECCV 2010)::

    S = U - W V^-1 W^T                  (reduced camera system, m x m)
    S x_c = b_c - W V^-1 b_p
    x_p = V^-1 (b_p - W^T x_c)

``V^-1`` is a batched Cholesky inverse of the ``P`` point blocks. ``W`` is stored as ``T`` dense
blocks, one per (reduced element, point) pair that a factor couples; ``S`` is accumulated as dense
``dmax x dmax`` blocks over the element pairs of its structure (upper triangle only: one product
``Y_i W_j^T`` per pair of ``W`` blocks sharing a point, ``Y = W V^-1``), then gathered into a CSC
pattern and factored densely (small ``m``) or by ``SparseCholesky`` (symbolic analysis reused).
All index maps are computed once per pattern.

On the CPU in float64, with no gradient asked of ``H``, a compiled path does the same
(:mod:`core._schur_kernels`, :meth:`Schur._factor_compiled`): per point the Cholesky factor
``L`` of ``V`` and ``Z = W L^-T``, ``S -= Z Z^T`` straight into the same ``S`` blocks (chunks of
points on :mod:`core.parallel`'s threads, each into its own blocks), with maps of its own
(:func:`build_compiled_maps`; the torch maps are built only if the torch path is used). BA 50 x
8,000: set-up ~15 ms against ~70, factor ~15 ms against ~40 on one thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from core import _schur_kernels, parallel
from core.objective import Objective, Pattern, _unique_inverse
from core.solvers.dense import DenseCholesky, DenseFactor
from core.solvers.sparse import Backend, SparseCholesky

Reduced = Literal["auto", "dense", "sparse"]


@dataclass(frozen=True)
class SchurMaps:
    """Index maps of one pattern (see the module docstring for the symbols).

    ``keep (m,)``: global columns of the reduced unknowns (ascending); ``elim (P, d)``: columns of
    each point; ``v_pos (P, d, d)``: ``V`` blocks in the values; ``w_pos (T, dmax, d)``: ``W``
    blocks in the values (``nnz``: padding, read as 0); ``wt_pos (T + 1, d, dmax)``: the
    same transposed, plus a zero block (index ``T``), with ``wt_zero (K,)`` the flat indices to
    zero after the gather (padding, read at position 0, and the zero block); ``w_elem,
    w_point (T,)``: their reduced element and point; ``elem_rows (NE, dmax)``: reduced indices
    of each element (``m``: padding);
    ``u_src, u_dst``: ``U`` entries (upper blocks) -> flat positions in the ``(NB, dmax, dmax)``
    blocks of ``S``; ``seg_i, seg_j (NS * SEGMENT,)``: the W-block pairs sharing a point, grouped
    by the ``S`` block they update and cut into segments of ``SEGMENT`` pairs (``T``: padding, a
    zero block); ``seg_block (NS,)``: each segment's ``S`` block; ``s_gather (nnz_S,)``: flat block
    positions in ``reduced``'s order.
    """

    keep: Tensor
    elim: Tensor
    v_pos: Tensor
    w_pos: Tensor
    wt_pos: Tensor
    wt_zero: Tensor
    w_elem: Tensor
    w_point: Tensor
    elem_rows: Tensor
    u_src: Tensor
    u_dst: Tensor
    seg_i: Tensor
    seg_j: Tensor
    seg_block: Tensor
    num_blocks: int
    dmax: int
    s_gather: Tensor
    reduced: Pattern

    def to(self, device: torch.device) -> SchurMaps:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        r = self.reduced
        moved["reduced"] = Pattern(r.n, *(t.to(device) for t in (r.indptr, r.rows, r.cols, r.diag)),
                                   (), ())
        return SchurMaps(**moved)


@dataclass(frozen=True)
class _Layout:
    """The unknowns' roles (NumPy int64). Per global column ``(n,)``: ``elem`` its reduced
    element (-1 for points), ``point`` its point (-1 otherwise), ``local`` its index inside the
    element or point. Per reduced element: ``elem_rows (NE, dmax)`` its reduced indices (``m``:
    padding) and ``elem_dof (NE,)``. ``keep (m,)`` and ``elim (P, d)`` as in :class:`SchurMaps`."""

    elem: np.ndarray
    point: np.ndarray
    local: np.ndarray
    elem_rows: np.ndarray
    elem_dof: np.ndarray
    keep: np.ndarray
    elim: np.ndarray


def _layout(objective: Objective, eliminate: str) -> _Layout:
    """One reduced element per variable element (contiguous reduced indices)."""
    n = objective.dim
    elem, point = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    local = np.zeros(n, np.int64)
    starts, dofs, num_elems, reduced_index = [], [], 0, 0
    for v in objective.variables:
        off, d = objective.offsets[v.name], v.space.dof
        ids = np.repeat(np.arange(v.count), d)
        local[off : off + v.dof] = np.tile(np.arange(d), v.count)
        if v.name == eliminate:
            point[off : off + v.dof] = ids
            continue
        elem[off : off + v.dof] = ids + num_elems
        starts.append(reduced_index + np.arange(v.count) * d)
        dofs.append(np.full(v.count, d, np.int64))
        num_elems, reduced_index = num_elems + v.count, reduced_index + v.dof
    keep = np.flatnonzero(point < 0)
    var = next(v for v in objective.variables if v.name == eliminate)
    elim = objective.offsets[eliminate] + np.arange(var.dof).reshape(var.count, var.space.dof)
    elem_dof = np.concatenate(dofs)
    a = np.arange(int(elem_dof.max()))
    elem_rows = np.where(a < elem_dof[:, None], np.concatenate(starts)[:, None] + a, keep.size)
    return _Layout(elem, point, local, elem_rows, elem_dof, keep, elim)


def _merge_elements(lay: _Layout, w_elem: np.ndarray, w_point: np.ndarray) -> _Layout:
    """Merge the reduced elements that touch exactly the same points (a BA camera's pose and its
    intrinsics) into one: fewer, larger ``W`` blocks, and 4x fewer ``S`` products for BA.

    Point sets are compared by two random hashes, then verified exactly (no merge on a clash).
    ``w_elem, w_point``: the (element, point) couplings of ``W``, repeats allowed."""
    ne, num_points = lay.elem_dof.shape[0], lay.elim.shape[0]
    key = _unique_inverse(w_elem * num_points + w_point)[0]
    e, p = key // num_points, key % num_points
    rnd = torch.randint(1, 2**31, (2, num_points), generator=torch.Generator().manual_seed(0))
    count = np.bincount(e, minlength=ne)
    h = np.zeros((2, ne), np.int64)  # per element the sums of its points' hashes (key: by e)
    present = count > 0
    if p.size:
        at = np.cumsum(count)[present] - count[present]
        h[:, present] = np.add.reduceat(rnd.numpy()[:, p], at, axis=1)
    lonely = np.flatnonzero(~present)
    h[:, lonely] = -1 - lonely  # elements without points stay on their own
    order = np.lexsort((h[1], h[0], count))  # the distinct (count, h0, h1), ascending
    ranked = np.stack([count, h[0], h[1]])[:, order]
    step = np.concatenate([[False], (ranked[:, 1:] != ranked[:, :-1]).any(0)])
    group = np.empty(ne, np.int64)
    group[order] = np.cumsum(step)
    num_groups = int(group.max()) + 1
    distinct = np.bincount(_unique_inverse(group[e] * num_points + p)[0] // num_points,
                           minlength=num_groups)
    if num_groups == ne or not bool((distinct[group[e]] == count[e]).all()):
        return lay
    order = np.argsort(group * ne + np.arange(ne))  # members by element id
    gdof = np.bincount(group, weights=lay.elem_dof, minlength=num_groups).astype(np.int64)
    gstart = np.cumsum(gdof) - gdof
    offset = np.empty_like(group)
    offset[order] = np.cumsum(lay.elem_dof[order]) - lay.elem_dof[order] - gstart[group[order]]
    valid = lay.elem_rows < lay.keep.size
    a = np.arange(lay.elem_rows.shape[1])
    rows = np.full((num_groups, int(gdof.max())), lay.keep.size, np.int64)
    rows[np.broadcast_to(group[:, None], valid.shape)[valid], (offset[:, None] + a)[valid]] = (
        lay.elem_rows[valid])
    red = lay.elem >= 0
    old = np.maximum(lay.elem, 0)
    elem = np.where(red, group[old], -1)
    local = np.where(red, offset[old] + lay.local, lay.local)
    return _Layout(elem, lay.point, local, rows, gdof, lay.keep, lay.elim)


def _w_pairs(w_elem: np.ndarray, w_point: np.ndarray, num_points: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``(i, j)`` of W blocks (sorted by point) on the same point with
    ``elem[i] <= elem[j]`` (each element appears once per point, so ``i == j`` on the diagonal)."""
    counts = np.bincount(w_point, minlength=num_points)
    group_start = np.cumsum(counts) - counts
    reps = counts[w_point]
    i = np.repeat(np.arange(w_point.shape[0]), reps)
    seg = np.repeat(np.cumsum(reps) - reps, reps)
    j = group_start[w_point[i]] + np.arange(i.shape[0]) - seg
    upper = w_elem[i] <= w_elem[j]
    return i[upper], j[upper]


SECONDS_PER_PAIR_ENTRY = 8e-10
"""Seconds of the compiled factor per ``S`` entry that a pair of ``W`` blocks updates (BA 50 x
8,000: 155,513 pairs of 9 x 9 blocks in ~10 ms of its ~13 ms), a work estimate for the threads."""
SECONDS_PER_W_ENTRY = 1e-9
"""Seconds of each of the compiled solve's two passes per ``W`` block entry (BA 50 x 8,000:
44,171 blocks of 9 x 3 in ~1.3 ms)."""
MIN_CHUNK = 1e-3
"""Seconds of compiled factor work per thread below which it runs on one thread (a hand-off to
a pool thread costs ~20 us on the 2-core bench machine, more when it has to wake)."""
MIN_SOLVE_CHUNK = 4e-4
"""The same for each pass of the compiled solve (twice per solve)."""

SEGMENT = 32
"""W-block pairs per segment: each segment's ``S`` update is one matrix product with an inner
dimension of ``SEGMENT * d`` (96 for BA) instead of ``SEGMENT`` products with inner dimension ``d``
whose ``dmax x dmax`` results are scattered one by one (BA 50 x 8,000: 12% padding)."""


def _segments(
    pair_i: np.ndarray, pair_j: np.ndarray, pair_block: np.ndarray, num_blocks: int, pad: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs sorted by their ``S`` block and cut into segments of ``SEGMENT`` (the last segment
    of each block padded with ``pad``). Returns ``seg_i, seg_j (NS * SEGMENT,)``, ``seg_block``."""
    order = np.argsort(pair_block, kind="stable")
    block = pair_block[order]
    count = np.bincount(block, minlength=num_blocks)
    per_block = (count + SEGMENT - 1) // SEGMENT
    rank = np.arange(block.shape[0]) - (np.cumsum(count) - count)[block]
    slot = (np.cumsum(per_block) - per_block)[block] * SEGMENT + rank
    total = int(per_block.sum()) * SEGMENT
    seg_i, seg_j = np.full(total, pad, np.int64), np.full(total, pad, np.int64)
    seg_i[slot], seg_j[slot] = pair_i[order], pair_j[order]
    return seg_i, seg_j, np.repeat(np.arange(num_blocks), per_block)


def _reduced_pattern(blocks: np.ndarray, lay: _Layout, dmax: int) -> tuple[Pattern, np.ndarray]:
    """The CSC pattern of ``S`` from its upper element blocks ``blocks (NB, 2)`` and, per entry,
    the flat position in the ``(NB, dmax, dmax)`` block storage (lower entries read transposed)."""
    ne, m = lay.elem_dof.shape[0], lay.keep.shape[0]
    a = np.arange(dmax)
    both = np.concatenate([blocks, blocks[blocks[:, 0] != blocks[:, 1]][:, ::-1]])  # (row, col)
    key = np.minimum(both[:, 0], both[:, 1]) * ne + np.maximum(both[:, 0], both[:, 1])
    block_id = np.searchsorted(blocks[:, 0] * ne + blocks[:, 1], key)
    er, ec = both[:, 0, None, None], both[:, 1, None, None]
    ar, ac = a[None, :, None], a[None, None, :]  # local row, local column
    valid = (ar < lay.elem_dof[er]) & (ac < lay.elem_dof[ec])
    rows = np.broadcast_to(lay.elem_rows[er, ar], valid.shape)[valid]
    cols = np.broadcast_to(lay.elem_rows[ec, ac], valid.shape)[valid]
    upper = np.broadcast_to(er <= ec, valid.shape)
    first, second = np.where(upper, ar, ac), np.where(upper, ac, ar)
    flat = (block_id[:, None, None] * dmax + first) * dmax + second
    order = np.argsort(cols * m + rows, kind="stable")  # distinct keys; runs: 3x faster
    rows, cols, flat = rows[order], cols[order], flat[valid][order]
    counts = np.bincount(cols, minlength=m)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    diag = np.flatnonzero(rows == cols)
    return Pattern(m, *(torch.from_numpy(x) for x in (indptr, rows, cols, diag)), (), ()), flat


def _column_entries(indptr: np.ndarray, rows: np.ndarray, first: np.ndarray
                    ) -> tuple[np.ndarray, ...]:
    """The stored entries of the columns ``first (K,)``: per entry its ``k``, position and row,
    and per column its entry count. In a block pattern every column of a block column has the
    same rows, so the entries of an element's first column describe the whole element (its
    column ``c + a`` holds the same rows at ``position + a * count``)."""
    start, count = indptr[first], indptr[first + 1] - indptr[first]
    k = np.repeat(np.arange(first.shape[0]), count)
    pos = np.arange(k.shape[0]) + (start - (np.cumsum(count) - count))[k]
    return k, pos, rows[pos], count


def build_schur_maps(objective: Objective, eliminate: str, pattern: Pattern) -> SchurMaps:
    """Index maps for ``pattern`` (computed on the CPU in NumPy, then moved to the pattern's
    device).

    Only the first column of each element is read (see :func:`_column_entries`): a BA pattern's
    millions of entries are never touched one by one."""
    lay = _layout(objective, eliminate)
    indptr, rows, nnz = pattern.indptr.cpu().numpy(), pattern.rows.cpu().numpy(), pattern.nnz
    num_points, d = lay.elim.shape
    a = np.arange(d)
    # V: a point's rows are consecutive in each of its columns, so (r, c) sits at diag[c] + r - c
    v_pos = pattern.diag.cpu().numpy()[lay.elim][:, None, :] + (a[:, None] - a[None, :])
    p_k, p_pos, p_row, p_count = _column_entries(indptr, rows, lay.elim[:, 0])
    other = lay.point[p_row]
    if bool(((other >= 0) & (other != p_k)).any()):
        raise ValueError(f"Schur: the {eliminate!r} block of H is not block diagonal")
    red = lay.elem[p_row] >= 0  # W entries: a reduced row in a point's column
    w_row, w_point_of, w_first = p_row[red], p_k[red], p_pos[red]
    first = lay.local[w_row] == 0  # one entry per (element, point) block
    # reduced elements' first columns, before merging (each spans contiguous columns)
    firsts = lay.keep[lay.local[lay.keep] == 0]
    width = lay.elem_dof[lay.elem[firsts]]
    lay = _merge_elements(lay, lay.elem[w_row[first]], w_point_of[first])
    dmax, ne = lay.elem_rows.shape[1], lay.elem_dof.shape[0]
    # the W blocks (sorted by point, then element) and the block of each W entry
    w_key, w_index = _unique_inverse(w_point_of * ne + lay.elem[w_row])
    w_pos = np.full((w_key.shape[0], dmax, d), nnz, np.int64)
    w_pos.reshape(-1, d)[w_index * dmax + lay.local[w_row]] = (
        w_first[:, None] + a * p_count[w_point_of][:, None])
    w_elem, w_point = w_key % ne, w_key // ne
    pair_i, pair_j = _w_pairs(w_elem, w_point, num_points)
    # U: reduced rows in the reduced elements' columns, upper element blocks
    u_k, u_first, u_row, u_count = _column_entries(indptr, rows, firsts)
    keep = lay.elem[u_row] >= 0
    u_k, u_first, u_row = u_k[keep], u_first[keep], u_row[keep]
    b = np.arange(int(width.max()))
    valid = b < width[u_k][:, None]
    col = (firsts[u_k][:, None] + b)[valid]
    pos = (u_first[:, None] + b * u_count[u_k][:, None])[valid]
    row = np.broadcast_to(u_row[:, None], valid.shape)[valid]
    e_r, e_c, l_r, l_c = lay.elem[row], lay.elem[col], lay.local[row], lay.local[col]
    u = e_r <= e_c
    fill_key = w_elem[pair_i] * ne + w_elem[pair_j]
    block_key, inverse = _unique_inverse(np.concatenate([e_r[u] * ne + e_c[u], fill_key]))
    num_u = int(u.sum())
    u_dst = (inverse[:num_u] * dmax + l_r[u]) * dmax + l_c[u]
    blocks = np.stack([block_key // ne, block_key % ne], axis=1)
    reduced, s_gather = _reduced_pattern(blocks, lay, dmax)
    num_blocks = int(block_key.shape[0])
    segments = _segments(pair_i, pair_j, inverse[num_u:], num_blocks, pad=w_key.shape[0])
    # W^T blocks and a zero block for the S products; what reads 0 is read at 0, then zeroed
    wt_pos = np.concatenate([w_pos.transpose(0, 2, 1), np.full((1, d, dmax), nnz)])
    wt_zero = np.flatnonzero(wt_pos == nnz)
    wt_pos.reshape(-1)[wt_zero] = 0
    t = torch.from_numpy
    maps = SchurMaps(t(lay.keep), t(lay.elim), t(v_pos), t(w_pos), t(wt_pos), t(wt_zero),
                     t(w_elem), t(w_point), t(lay.elem_rows), t(pos[u]), t(u_dst),
                     *(t(x) for x in segments), num_blocks, dmax, t(s_gather), reduced)
    return maps.to(pattern.rows.device)


@dataclass
class CompiledMaps:
    """The compiled path's maps of one pattern (NumPy int64, C-contiguous; symbols as in
    :mod:`core._schur_kernels`): ``keep (m,)``, ``elim (P, d)``, ``v_pos (P, d, d)``; per point
    its ``W`` blocks ``pt_ptr (P + 1,)`` (sorted by element: ``w_elem (T,)``), ``w_row (T,
    dmax)`` their first column's positions and ``stride (P,)``; ``pair_block`` the ``S`` block
    of each pair of ``W`` blocks on a point (``pair_ptr (P + 1,)``: each point's first pair);
    ``u_src, u_dst`` the ``U`` entries -> flat positions in the ``(NB, dmax, dmax)`` blocks of
    ``S``, ``diag_dst (m,)`` the reduced diagonal there; ``block_elems (NB, 2)`` the elements of
    each block (ascending keys, as the torch path's); ``elem_rows, elem_dof`` as in
    :class:`_Layout`; ``nnz_s`` the entries of ``S``'s pattern, which (with ``s_gather``) is only
    built when the sparse reduced solver needs it (:meth:`reduced`)."""

    keep: np.ndarray
    elim: np.ndarray
    v_pos: np.ndarray
    pt_ptr: np.ndarray
    w_elem: np.ndarray
    w_row: np.ndarray
    stride: np.ndarray
    pair_block: np.ndarray
    pair_ptr: np.ndarray
    u_src: np.ndarray
    u_dst: np.ndarray
    diag_dst: np.ndarray
    block_elems: np.ndarray
    elem_rows: np.ndarray
    elem_dof: np.ndarray
    nnz_s: int
    layout: _Layout
    _reduced: tuple[Pattern, np.ndarray] | None = None

    def reduced(self) -> tuple[Pattern, np.ndarray]:
        """``S``'s CSC pattern and, per entry, its flat position in the blocks (cached)."""
        if self._reduced is None:
            self._reduced = _reduced_pattern(self.block_elems, self.layout,
                                             int(self.elem_rows.shape[1]))
        return self._reduced


def build_compiled_maps(objective: Objective, eliminate: str, pattern: Pattern) -> CompiledMaps:
    """:class:`CompiledMaps` for a CPU ``pattern``: one pass over each point's first column and
    each reduced element's first column (:func:`_column_entries`' observation), in Numba."""
    sk, c = _schur_kernels, np.ascontiguousarray
    lay = _layout(objective, eliminate)
    indptr, rows = c(pattern.indptr.numpy(), np.int64), c(pattern.rows.numpy(), np.int64)
    first = c(lay.elim[:, 0])
    # each row's block size (its unmerged element's, or a point's): columns are read by blocks
    run = np.where(lay.point >= 0, lay.elim.shape[1], lay.elem_dof[np.maximum(lay.elem, 0)])
    run_ptr, run_pos, run_row, bad = sk.point_runs(indptr, rows, first, lay.point, lay.elem, run)
    if bad >= 0:
        raise ValueError(f"Schur: the {eliminate!r} block of H is not block diagonal")
    e, p = sk.point_couplings(run_ptr, run_row, lay.elem, lay.elem_dof.shape[0])
    firsts = c(lay.keep[lay.local[lay.keep] == 0])  # unmerged elements' first columns
    width = c(lay.elem_dof[lay.elem[firsts]])
    lay = _merge_elements(lay, e, p)
    dmax, ne = lay.elem_rows.shape[1], lay.elem_dof.shape[0]
    pt_ptr, w_elem, w_row = sk.point_blocks(run_ptr, run_pos, run_row, lay.elem, lay.local, run,
                                            ne, dmax)
    stride = indptr[first + 1] - indptr[first]  # entries per column of each point
    u_key, u_src, u_lr, u_lc = sk.u_entries(indptr, rows, firsts, width, lay.elem, lay.local,
                                            run, ne)
    keys = np.concatenate([np.arange(ne) * (ne + 1), u_key, sk.pair_keys(pt_ptr, w_elem, ne)])
    distinct, ids = sk.unique_ids(keys)
    order = np.argsort(distinct)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    ids, distinct = rank[ids], distinct[order]
    diag_block, u_block, pair_block = np.split(ids, [ne, ne + u_key.shape[0]])
    u_dst = (u_block * dmax + u_lr) * dmax + u_lc
    ke, kl = lay.elem[lay.keep], lay.local[lay.keep]
    diag_dst = (diag_block[ke] * dmax + kl) * dmax + kl
    a = np.arange(lay.elim.shape[1])
    v_pos = pattern.diag.numpy()[lay.elim][:, None, :] + (a[:, None] - a[None, :])
    k = np.diff(pt_ptr)
    pair_ptr = np.concatenate([[0], np.cumsum(k * (k + 1) // 2)])
    block_elems = np.stack([distinct // ne, distinct % ne], axis=1)
    size = lay.elem_dof[block_elems[:, 0]] * lay.elem_dof[block_elems[:, 1]]
    nnz_s = int((size * np.where(block_elems[:, 0] == block_elems[:, 1], 1, 2)).sum())
    return CompiledMaps(c(lay.keep), c(lay.elim), c(v_pos, np.int64), pt_ptr, w_elem, w_row,
                        stride, c(pair_block), pair_ptr, u_src, c(u_dst), c(diag_dst),
                        block_elems, c(lay.elem_rows), c(lay.elem_dof), nnz_s, lay)


def check_eliminable(objective: Objective, eliminate: str) -> None:
    """Raise ``ValueError`` unless ``eliminate`` names a variable of ``objective`` that leaves
    others, and no factor touches two different elements of it."""
    names = [v.name for v in objective.variables]
    if eliminate not in names:
        raise ValueError(f"Schur: no variable {eliminate!r} to eliminate; variables: {names}")
    if len(names) == 1:
        raise ValueError(f"Schur: eliminating {eliminate!r} leaves no reduced system")
    for c in objective.costs:
        slots = [i for v, i in zip(c.optimized, c.index) if v.name == eliminate]
        for other in slots[1:]:
            bad = torch.nonzero(other != slots[0])
            if bad.numel():
                e = int(bad[0, 0])
                raise ValueError(
                    f"Schur: cost {c.name!r} factor {e} touches {eliminate}[{int(slots[0][e])}] "
                    f"and {eliminate}[{int(other[e])}]; the {eliminate!r} block of H must be "
                    "block diagonal (each factor touching at most one element)")


@dataclass
class SchurFactor:
    """``V^-1 (B, P, d, d)``, ``W^T (B, T + 1, d, dmax)`` (the last block zero) and the factor
    of ``S``; ``ok (B,)``."""

    maps: SchurMaps
    v_inv: Tensor
    Wt: Tensor
    reduced: Any
    ok: Tensor

    def solve(self, b: Tensor) -> Tensor:
        """Solve ``A x = b`` for ``b (B, n)`` (any number of times)."""
        mp, batch = self.maps, b.shape[0]
        m = mp.keep.shape[0]
        rows = mp.elem_rows[mp.w_elem]  # (T, dmax)
        bp = b[:, mp.elim]  # (B, P, d)
        u = (self.v_inv @ bp[..., None])[:, mp.w_point]  # (B, T, d, 1)
        Wu = (self.Wt[:, :-1].transpose(-1, -2) @ u)[..., 0]
        rhs = torch.cat([b[:, mp.keep], b.new_zeros(batch, 1)], dim=1)
        rhs = rhs.index_add(1, rows.reshape(-1), -Wu.reshape(batch, -1))[:, :m]
        xc = self.reduced.solve(rhs)
        xe = torch.cat([xc, xc.new_zeros(batch, 1)], dim=1)[:, rows]  # (B, T, dmax)
        Wtx = (self.Wt[:, :-1] @ xe[..., None])[..., 0]  # (B, T, d)
        xp = (self.v_inv @ bp.index_add(1, mp.w_point, -Wtx)[..., None])[..., 0]
        x = torch.zeros_like(b).index_copy(1, mp.keep, xc)
        return x.index_copy(1, mp.elim.reshape(-1), xp.reshape(batch, -1))


class _SymmetricSolve(torch.autograd.Function):
    """``x = A^-1 b`` through a factor of the symmetric ``A``; backward ``grad_b = A^-1 grad_x``
    (by the same factor, so differentiable again)."""

    @staticmethod
    def forward(ctx, b: Tensor, factor: CompiledSchurFactor) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return factor._solve(b)

    @staticmethod
    def backward(ctx, grad_x: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.factor.solve(grad_x), None


@dataclass
class CompiledSchurFactor:
    """The compiled path's factor (:mod:`core._schur_kernels`): ``L (B, P, d, d)`` the point
    blocks' Cholesky factors, ``Z (B, T, d, dmax) = L^-1 W^T`` per ``W`` block, and the factor of
    ``S``; ``ok (B,)``. Solves like :class:`SchurFactor` (to rounding), differentiable in ``b``."""

    maps: CompiledMaps
    L: np.ndarray
    Z: np.ndarray
    reduced: Any
    ok: Tensor

    def solve(self, b: Tensor) -> Tensor:
        """Solve ``A x = b`` for ``b (B, n)`` float64 on the CPU (any number of times)."""
        if b.dtype != torch.float64 or b.device.type != "cpu":
            raise ValueError(f"Schur: the factor is float64 on the CPU; got b {b.dtype} on "
                             f"{b.device}")
        if torch.is_grad_enabled() and b.requires_grad:
            return _SymmetricSolve.apply(b, self)
        return self._solve(b)

    def _solve(self, b: Tensor) -> Tensor:
        cm, sk = self.maps, _schur_kernels
        bn = b.detach().contiguous().numpy()
        batch, (num_points, d) = bn.shape[0], cm.elim.shape
        work = batch * cm.w_row.size * d * SECONDS_PER_W_ENTRY
        threads = parallel.threads(work, MIN_SOLVE_CHUNK, num_points)
        cuts = _cuts(cm.pt_ptr, threads)
        rhs = [np.ascontiguousarray(bn[:, cm.keep])]  # per thread: its share of W V^-1 b_p
        rhs += [np.zeros_like(rhs[0]) for _ in range(threads - 1)]
        y = np.empty((batch, num_points, d))
        common = (self.L, self.Z, cm.elim, cm.pt_ptr, cm.w_elem, cm.elem_rows, cm.elem_dof)
        _run(sk.forward, [(rhs[k], y, *common, bn, cuts[k], cuts[k + 1])
                          for k in range(threads)])
        for k in range(1, threads):
            rhs[0] += rhs[k]
        xc = self.reduced.solve(torch.from_numpy(rhs[0])).contiguous().numpy()
        x = np.empty_like(bn)
        none = np.zeros(0, np.int64)
        _run(sk.backward, [(x, xc, y, *common, cm.keep if k == 0 else none, cuts[k],
                            cuts[k + 1]) for k in range(threads)])
        return torch.from_numpy(x)


def _cuts(ptr: np.ndarray, parts: int) -> list[int]:
    """``parts + 1`` point boundaries that cut ``ptr (P + 1,)``'s total (pairs, ``W`` blocks)
    into about equal parts."""
    cuts = np.searchsorted(ptr, np.arange(parts + 1) * (ptr[-1] / parts))
    cuts[0], cuts[-1] = 0, ptr.shape[0] - 1
    return cuts.tolist()


def _run(fn: Any, calls: list[tuple]) -> None:
    """``fn(*args)`` for each of ``calls``, on :mod:`core.parallel`'s threads if more than one."""
    if len(calls) == 1:
        fn(*calls[0])
    else:
        parallel.run(fn, calls)


class Schur:
    """Schur-complement linear solver for ``objective``, eliminating the variable ``eliminate``.

    Args:
        objective: the objective whose patterns will be factored (gives the unknown layout).
        eliminate: name of the variable to eliminate first (e.g. ``"points"``); each factor must
            touch at most one of its elements (checked here, ``ValueError`` otherwise).
        reduced: how to factor ``S``: ``"dense"`` (batched Cholesky, any device), ``"sparse"``
            (``SparseCholesky``, CPU) or ``"auto"``: dense when ``m <= dense_max`` and ``S``'s
            pattern fills at least ``dense_fill`` of the ``m x m`` matrix, else sparse on the
            CPU. Measured (bundle_adjustment's default scenes, 12 cameras each, factor + solve
            of the Schur system, medians of 20 interleaved, load 1.7 on 2 cores): one scene
            (``m = 108``, fill 1.0) dense 3.9 ms / sparse 2.4 ms (min 1.8 / 2.0); a ragged
            batch of 2 (fill 0.5) 3.2 / 3.7 ms; of 4 (fill 0.25) 6.4 / 6.4 ms; of 8 (fill
            0.125) 24.7 / 14.4 ms: a block-diagonal ``S`` is factored sparsely.
        dense_max: the ``"auto"`` threshold on the reduced size ``m``.
        dense_fill: the ``"auto"`` threshold on the fill ``nnz(S) / m^2``.
        backend: the sparse backend for ``reduced="sparse"``.
        chunk: about this many W-block entries ``(B x pairs x dmax x d)`` are gathered at once
            for the ``S`` products (sized for the CPU cache; 64x more on other devices; at least
            128 segments).
        compiled: use the compiled CPU path (:mod:`core._schur_kernels`, its own maps) where it
            applies: ``H`` float64 on the CPU, Numba available (``ARIADNE_KERNELS`` not 0) and
            no gradient asked of ``H`` or the damping; False: always the torch path.
    """

    def __init__(
        self,
        objective: Objective,
        eliminate: str = "points",
        *,
        reduced: Reduced = "auto",
        dense_max: int = 1500,
        dense_fill: float = 0.25,
        backend: Backend = "auto",
        chunk: int = 1 << 18,
        compiled: bool = True,
    ) -> None:
        if reduced not in ("auto", "dense", "sparse"):
            raise ValueError(f"Schur: reduced must be auto, dense or sparse, got {reduced!r}")
        check_eliminable(objective, eliminate)
        self.objective, self.eliminate = objective, eliminate
        self.reduced, self.dense_max, self.chunk = reduced, dense_max, chunk
        self.dense_fill, self.compiled = dense_fill, compiled
        self._dense = DenseCholesky()
        self._sparse = SparseCholesky(backend=backend) if reduced != "dense" else None
        self._maps: dict[int, tuple[Pattern, SchurMaps]] = {}
        self._cmaps: dict[int, tuple[Pattern, CompiledMaps]] = {}

    def __repr__(self) -> str:
        return f"Schur(eliminate={self.eliminate!r}, reduced={self.reduced!r})"

    def maps(self, pattern: Pattern) -> SchurMaps:
        """The index maps of ``pattern`` (computed on first use, then cached)."""
        return self._cached(self._maps, pattern, build_schur_maps)

    def _compiled_maps(self, pattern: Pattern) -> CompiledMaps:
        """The compiled path's maps of ``pattern`` (computed on first use, then cached)."""
        return self._cached(self._cmaps, pattern, build_compiled_maps)

    def _cached(self, cache: dict, pattern: Pattern, build: Any) -> Any:
        if pattern.n != self.objective.dim:
            raise ValueError(f"Schur: pattern has n = {pattern.n} but the objective has "
                             f"{self.objective.dim} unknowns; pass the objective being solved")
        cached = cache.get(id(pattern))
        if cached is None or cached[0] is not pattern:
            cached = (pattern, build(self.objective, self.eliminate, pattern))
            cache[id(pattern)] = cached
        return cached[1]

    def dense(self, reduced: Pattern, device: torch.device) -> bool:
        """``reduced="auto"``'s choice for the reduced pattern: dense when ``m <= dense_max`` and
        (off the CPU, or ``nnz >= dense_fill * m^2``), or when there is no sparse solver."""
        return self._dense_choice(reduced.n, reduced.nnz, device)

    def _dense_choice(self, m: int, nnz: int, device: torch.device) -> bool:
        fill = device.type != "cpu" or nnz >= self.dense_fill * m * m
        return self._sparse is None or (m <= self.dense_max and fill)

    def _use_compiled(self, H: Tensor, damping: Tensor) -> bool:
        """The compiled path applies: float64 CPU values, Numba, no gradient asked."""
        grad = torch.is_grad_enabled() and (H.requires_grad or damping.requires_grad)
        return (self.compiled and _schur_kernels.AVAILABLE and not grad
                and H.dtype == damping.dtype == torch.float64
                and H.device.type == damping.device.type == "cpu")

    def factor(self, H: Tensor, pattern: Pattern, damping: Tensor
               ) -> SchurFactor | CompiledSchurFactor:
        """Eliminate the points of ``H (B, nnz) + diag(damping (B, n))`` and factor ``S``.

        ``H`` is read in place, never copied: the damping goes onto the diagonals of the ``V``
        blocks and of ``U`` (in :meth:`_reduced_values`); ``W`` is off the diagonal. On the CPU
        in float64 the compiled path does the same (:meth:`_factor_compiled`)."""
        if self._use_compiled(H, damping):
            return self._factor_compiled(H, pattern, damping)
        mp = self.maps(pattern)
        batch = H.shape[0]
        V = H[:, mp.v_pos] + torch.diag_embed(damping[:, mp.elim])  # (B, P, d, d)
        L, info = torch.linalg.cholesky_ex(V)
        good = info == 0
        eye = torch.eye(mp.v_pos.shape[-1], dtype=H.dtype, device=H.device)
        v_inv = torch.cholesky_inverse(torch.where(good[..., None, None], L, eye))
        Wt = H[:, mp.wt_pos].view(batch, -1).index_fill_(1, mp.wt_zero, 0)
        Wt = Wt.view(batch, *mp.wt_pos.shape)  # (B, T + 1, d, dmax)
        S = self._reduced_values(H, damping, Wt, v_inv, mp)
        use_dense = self.reduced == "dense" or (
            self.reduced == "auto" and self.dense(mp.reduced, H.device))
        solver = self._dense if use_dense or self._sparse is None else self._sparse
        factor = solver.factor(S, mp.reduced, S.new_zeros(batch, mp.reduced.n))
        return SchurFactor(mp, v_inv, Wt, factor, good.all(-1) & factor.ok)

    def _factor_compiled(self, H: Tensor, pattern: Pattern, damping: Tensor
                         ) -> CompiledSchurFactor:
        """:meth:`factor` by :mod:`core._schur_kernels`: ``S``'s blocks straight from ``H``
        (:meth:`_compiled_blocks`), then ``S`` dense ``(B, m, m)`` (Cholesky as
        :class:`DenseCholesky`) or as values of its CSC pattern for the sparse solver: the same
        choice as the torch path."""
        cm, sk = self._compiled_maps(pattern), _schur_kernels
        L, Z, blocks, ok = self._compiled_blocks(H, damping, cm)
        batch, m = H.shape[0], cm.keep.shape[0]
        use_dense = self.reduced == "dense" or (
            self.reduced == "auto" and self._dense_choice(m, cm.nnz_s, H.device))
        if use_dense or self._sparse is None:
            S = torch.from_numpy(sk.dense_reduced(blocks, cm.block_elems, cm.elem_rows,
                                                  cm.elem_dof, m))
            Ls, info = torch.linalg.cholesky_ex(S)
            good = info == 0  # failed elements: an identity factor, as DenseCholesky's
            if not bool(good.all()):
                Ls = torch.where(good[:, None, None], Ls, torch.eye(m, dtype=S.dtype))
            reduced = DenseFactor(Ls, good)
        else:
            pattern_s, s_gather = cm.reduced()
            S = torch.from_numpy(blocks.reshape(batch, -1)[:, s_gather])
            reduced = self._sparse.factor(S, pattern_s, S.new_zeros(batch, m))
        return CompiledSchurFactor(cm, L, Z, reduced, torch.from_numpy(ok) & reduced.ok)

    @staticmethod
    def _compiled_blocks(H: Tensor, damping: Tensor, cm: CompiledMaps, threads: int = 0
                         ) -> tuple[np.ndarray, ...]:
        """``L (B, P, d, d)``, ``Z (B, T, d, dmax)``, the ``S`` blocks ``(B, NB, dmax, dmax)``
        and ``ok (B,)`` of :func:`core._schur_kernels.factor` for all points. The points are cut
        into ``threads`` chunks of about equal work (0: :func:`core.parallel.threads`'s rule),
        each on a thread and summing into its own ``S`` blocks, added up afterwards."""
        batch, (num_points, d) = H.shape[0], cm.elim.shape
        Hn, dn = H.detach().contiguous().numpy(), damping.detach().contiguous().numpy()
        dmax, num_blocks = cm.elem_rows.shape[1], cm.block_elems.shape[0]
        work = batch * int(cm.pair_ptr[-1]) * dmax * dmax * SECONDS_PER_PAIR_ENTRY
        if threads <= 0:
            threads = parallel.threads(work, MIN_CHUNK, num_points)
        cuts = _cuts(cm.pair_ptr, threads)  # the pairs (the products of S) split evenly
        L = np.zeros((batch, num_points, d, d))
        Z = np.empty((batch, cm.w_elem.shape[0], d, dmax))
        blocks = [np.zeros((batch, num_blocks, dmax, dmax)) for _ in range(threads)]
        oks = [np.ones(batch, np.bool_) for _ in range(threads)]
        none = np.zeros(0, np.int64)
        calls = [(Hn, dn, cm.v_pos, cm.elim, cm.pt_ptr, cm.w_elem, cm.w_row, cm.stride,
                  cm.elem_dof, cm.pair_block, int(cm.pair_ptr[cuts[k]]),
                  cm.u_src if k == 0 else none, cm.u_dst, cm.diag_dst, cm.keep, cuts[k],
                  cuts[k + 1], L, Z, blocks[k], oks[k]) for k in range(threads)]
        _run(_schur_kernels.factor, calls)
        for k in range(1, threads):
            blocks[0] += blocks[k]
            oks[0] &= oks[k]
        return L, Z, blocks[0], oks[0]

    def _reduced_values(self, H: Tensor, damping: Tensor, Wt: Tensor, v_inv: Tensor,
                        mp: SchurMaps) -> Tensor:
        """``S = U + diag(damping_c) - W V^-1 W^T`` as values ``(B, nnz_S)`` of ``mp.reduced``
        (``H (B, nnz)``, ``damping (B, n)``, ``Wt (B, T + 1, d, dmax)`` as in
        :class:`SchurFactor`, ``v_inv (B, P, d, d)``)."""
        batch, dd, d = H.shape[0], mp.dmax * mp.dmax, Wt.shape[-2]
        blocks = H.new_zeros(batch, mp.num_blocks * dd)
        blocks.index_add_(1, mp.u_dst, H[:, mp.u_src])  # in place: no copy per chunk
        # U's diagonal entries each came from one entry of H: now H_ii + damping_i, as in H
        blocks.index_add_(1, mp.s_gather[mp.reduced.diag], damping[:, mp.keep])
        blocks = blocks.view(batch, -1, dd)
        # (W V^-1)^T = -V^-1 W^T per W block (the zero block's V^-1 is any, here point 0's)
        Vg = v_inv[:, torch.nn.functional.pad(mp.w_point, (0, 1))]  # (B, T + 1, d, d)
        Yt = (Vg @ Wt).neg_()
        budget = self.chunk if H.device.type == "cpu" else 64 * self.chunk
        step = max(128, budget // (batch * SEGMENT * Wt[0, 0].numel()))
        # blocks as rows: index_select copies whole rows (3x faster than indexing (B, T + 1, d,
        # dmax) for BA's 27-value blocks)
        Yr, Wr = Yt.view(batch, Yt.shape[1], -1), Wt.view(batch, Wt.shape[1], -1)
        for s in range(0, mp.seg_block.shape[0], step):
            part = slice(s * SEGMENT, (s + step) * SEGMENT)
            # a segment's sum of Y_i W_j^T is A^T B with A, B (SEGMENT * d, dmax) stacked blocks
            a = Yr.index_select(1, mp.seg_i[part]).view(batch, -1, SEGMENT * d, mp.dmax)
            b = Wr.index_select(1, mp.seg_j[part]).view(batch, -1, SEGMENT * d, mp.dmax)
            fill = a.transpose(-1, -2) @ b  # (B, segments, dmax, dmax)
            blocks.index_add_(1, mp.seg_block[s : s + step], fill.reshape(batch, -1, dd))
        return blocks.reshape(batch, -1)[:, mp.s_gather]
