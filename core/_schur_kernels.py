"""Compiled (Numba) CPU kernels of the Schur complement solver (``core.solvers.schur``).

Symbols as in that module: ``P`` points of ``d`` unknowns each (the eliminated blocks), ``NE``
reduced elements of at most ``dmax`` unknowns, ``T`` ``W`` blocks (one per (point, element) pair
that a factor couples), ``NB`` upper element blocks of ``S``, ``m`` reduced unknowns.

Set-up (:func:`point_runs`, :func:`point_couplings`, :func:`point_blocks`, :func:`u_entries`,
:func:`pair_keys`, :func:`unique_ids`) reads the CSC block pattern of ``H`` one column per point
and per (unmerged) reduced element, one row block at a time: every column of a block column
holds the same rows, so column ``c + a`` of a point holds its entries at the first column's
positions plus ``a * stride``. Per point ``p``, its ``W`` blocks ``t`` in ``pt_ptr[p] :
pt_ptr[p + 1]`` are sorted by element, so every pair ``i <= j`` of them updates the upper block
``(w_elem[i], w_elem[j])``.

The factor (:func:`factor`) works with the Cholesky factor ``V_p = L_p L_p^T`` and ``Z_t = W_t
L_p^-T`` (``dof_e x d``, stored transposed): ``W V^-1 W^T = Z Z^T``, so ``S = U +
diag(damping_c) - sum_p Z_p Z_p^T`` is accumulated straight into the ``(NB, dmax, dmax)`` block
storage of ``S`` (the torch path's layout), and the solve (:func:`forward`, :func:`backward`)
reads ``W V^-1 b_p = Z (L^-1 b_p)`` and ``x_p = L^-T (L^-1 b_p - Z^T x_c)``. A point block that
is not numerically positive definite (a pivot not ``> 0``, LAPACK ``potrf``'s test) marks its
batch element not ok and is replaced by the identity, as the torch path does. Nothing here is
differentiable.

Array conventions: values float64, indices int64, all C-contiguous.
"""

from __future__ import annotations

import math

import numpy as np

from core._kernels import AVAILABLE, _jit

__all__ = ["AVAILABLE"]


@_jit
def point_runs(
    indptr: np.ndarray, rows: np.ndarray, first: np.ndarray, point: np.ndarray,
    elem: np.ndarray, run: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The reduced row blocks of each point's first column ``first (P,)``, read once (the
    pattern's columns are scattered in memory): ``run_ptr (P + 1,)``, and per block its first
    position ``run_pos`` in ``H``'s values and row ``run_row``; and the first point whose column
    holds another point's row (-1: none, the point block of ``H`` is block diagonal). ``run
    (n,)``: the size of each row's (unmerged) element or point; ``point, elem (n,)`` as in
    ``schur._Layout``."""
    num_points = first.shape[0]
    cap = 0
    for p in range(num_points):
        cap += indptr[first[p] + 1] - indptr[first[p]]
    run_ptr = np.zeros(num_points + 1, np.int64)
    run_pos = np.empty(cap, np.int64)
    run_row = np.empty(cap, np.int64)
    k, bad = 0, -1
    for p in range(num_points):
        c = first[p]
        q = indptr[c]
        while q < indptr[c + 1]:
            r = rows[q]
            if elem[r] >= 0:
                run_pos[k], run_row[k] = q, r
                k += 1
            elif point[r] != p and bad < 0:
                bad = p
            q += run[r]
        run_ptr[p + 1] = k
    return run_ptr, run_pos[:k].copy(), run_row[:k].copy(), bad


@_jit
def point_couplings(
    run_ptr: np.ndarray, run_row: np.ndarray, elem: np.ndarray, num_elems: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (unmerged reduced element, point) couplings of ``W`` from :func:`point_runs`,
    sorted by element, then point."""
    count = np.zeros(num_elems + 1, np.int64)
    for k in range(run_row.shape[0]):
        count[elem[run_row[k]] + 1] += 1
    for e in range(num_elems):
        count[e + 1] += count[e]
    e_out = np.empty(run_row.shape[0], np.int64)
    p_out = np.empty(run_row.shape[0], np.int64)
    for p in range(run_ptr.shape[0] - 1):
        for k in range(run_ptr[p], run_ptr[p + 1]):
            e = elem[run_row[k]]
            e_out[count[e]], p_out[count[e]] = e, p
            count[e] += 1
    return e_out, p_out


@_jit
def point_blocks(
    run_ptr: np.ndarray, run_pos: np.ndarray, run_row: np.ndarray, elem: np.ndarray,
    local: np.ndarray, run: np.ndarray, num_elems: int, dmax: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point its ``W`` blocks, sorted by (merged) element: ``pt_ptr (P + 1,)``, ``w_elem
    (T,)`` and ``w_row (T, dmax)`` the position in ``H``'s values of the block's entry (local
    row ``r``, the point's first column) (-1: padding); from :func:`point_runs` (a merged
    element's rows are several runs)."""
    num_points = run_ptr.shape[0] - 1
    stamp = np.full(num_elems, -1, np.int64)
    pt_ptr = np.zeros(num_points + 1, np.int64)
    for p in range(num_points):
        k = 0
        for i in range(run_ptr[p], run_ptr[p + 1]):
            e = elem[run_row[i]]
            if stamp[e] != p:
                stamp[e] = p
                k += 1
        pt_ptr[p + 1] = pt_ptr[p] + k
    total = pt_ptr[num_points]
    w_elem = np.empty(total, np.int64)
    w_row = np.full((total, dmax), -1, np.int64)
    slot = np.empty(num_elems, np.int64)
    stamp[:] = -1
    for p in range(num_points):
        t0, k = pt_ptr[p], 0
        for i in range(run_ptr[p], run_ptr[p + 1]):
            r, q = run_row[i], run_pos[i]
            e = elem[r]
            if stamp[e] != p:
                stamp[e], slot[e] = p, t0 + k
                w_elem[t0 + k] = e
                k += 1
            for a in range(run[r]):
                w_row[slot[e], local[r] + a] = q + a
        for i in range(1, k):  # insertion sort by element (a point sees few elements)
            j = t0 + i
            while j > t0 and w_elem[j - 1] > w_elem[j]:
                w_elem[j - 1], w_elem[j] = w_elem[j], w_elem[j - 1]
                for r in range(dmax):
                    w_row[j - 1, r], w_row[j, r] = w_row[j, r], w_row[j - 1, r]
                j -= 1
    return pt_ptr, w_elem, w_row


@_jit
def u_entries(
    indptr: np.ndarray, rows: np.ndarray, firsts: np.ndarray, width: np.ndarray,
    elem: np.ndarray, local: np.ndarray, run: np.ndarray, num_elems: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The entries of ``U`` in upper element blocks (``elem[row] <= elem[col]``), read from the
    first columns ``firsts (K,)`` of the unmerged reduced elements of ``width (K,)`` columns:
    per entry its block key ``elem_row * num_elems + elem_col``, position in ``H``'s values and
    local row and column inside the (merged) elements. ``run (n,)`` as in
    :func:`point_couplings` (the points' rows are skipped block by block)."""
    count = 0
    for k in range(firsts.shape[0]):
        f = firsts[k]
        ec = elem[f]
        q = indptr[f]
        while q < indptr[f + 1]:
            r = rows[q]
            er = elem[r]
            if er >= 0 and er <= ec:
                count += width[k] * run[r]
            q += run[r]
    key = np.empty(count, np.int64)
    src = np.empty(count, np.int64)
    l_r = np.empty(count, np.int64)
    l_c = np.empty(count, np.int64)
    i = 0
    for k in range(firsts.shape[0]):
        f = firsts[k]
        ec, step = elem[f], indptr[f + 1] - indptr[f]
        q0 = indptr[f]
        while q0 < indptr[f + 1]:
            r0 = rows[q0]
            er, size = elem[r0], run[r0]
            if er >= 0 and er <= ec:
                for q in range(q0, q0 + size):
                    for b in range(width[k]):
                        key[i], src[i] = er * num_elems + ec, q + b * step
                        l_r[i], l_c[i] = local[r0] + q - q0, local[f + b]
                        i += 1
            q0 += size
    return key, src, l_r, l_c


@_jit
def pair_keys(pt_ptr: np.ndarray, w_elem: np.ndarray, num_elems: int) -> np.ndarray:
    """The block key ``w_elem[i] * num_elems + w_elem[j]`` of every pair ``i <= j`` of ``W``
    blocks on the same point, in the order :func:`factor` visits them."""
    total = 0
    for p in range(pt_ptr.shape[0] - 1):
        k = pt_ptr[p + 1] - pt_ptr[p]
        total += k * (k + 1) // 2
    keys = np.empty(total, np.int64)
    q = 0
    for p in range(pt_ptr.shape[0] - 1):
        for i in range(pt_ptr[p], pt_ptr[p + 1]):
            for j in range(i, pt_ptr[p + 1]):
                keys[q] = w_elem[i] * num_elems + w_elem[j]
                q += 1
    return keys


@_jit
def unique_ids(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct non-negative ``keys (K,)`` in order of first appearance and each key's index
    among them (an open-addressing hash table: no sort of the ``K`` keys). Kept beside
    ``core.objective._unique_inverse`` (a stable sort, fast on the presorted runs of a factor
    list) because these keys are not presorted: BA 50 x 8,000's Schur maps took 14.5-15.5 ms
    with this against 22.5-28.4 ms with that (alternated processes)."""
    size = keys.shape[0]
    cap = 2
    while cap < 2 * size:
        cap *= 2
    mask = cap - 1
    table = np.full(cap, -1, np.int64)
    slot_id = np.empty(cap, np.int64)
    ids = np.empty(size, np.int64)
    distinct = np.empty(size, np.int64)
    num = 0
    for i in range(size):
        key = keys[i]
        h = key * 0x9E3779B1  # Fibonacci hashing (int64 wraps around)
        h = (h ^ (h >> 29)) & mask
        while table[h] != -1 and table[h] != key:
            h = (h + 1) & mask
        if table[h] == -1:
            table[h], slot_id[h] = key, num
            distinct[num] = key
            num += 1
        ids[i] = slot_id[h]
    return distinct[:num].copy(), ids


@_jit
def _cholesky(A: np.ndarray, d: int) -> bool:
    """In place: the lower Cholesky factor of ``A (d, d)`` from its lower triangle (the upper
    triangle is left as it is); False at the first pivot that is not ``> 0`` (LAPACK)."""
    for j in range(d):
        s = A[j, j]
        for k in range(j):
            s -= A[j, k] * A[j, k]
        if not s > 0.0:
            return False
        s = math.sqrt(s)
        A[j, j] = s
        for i in range(j + 1, d):
            t = A[i, j]
            for k in range(j):
                t -= A[i, k] * A[j, k]
            A[i, j] = t / s
    return True


@_jit
def factor(
    H: np.ndarray, damping: np.ndarray, v_pos: np.ndarray, elim: np.ndarray,
    pt_ptr: np.ndarray, w_elem: np.ndarray, w_row: np.ndarray, stride: np.ndarray,
    elem_dof: np.ndarray, pair_block: np.ndarray, pair_start: int, u_src: np.ndarray,
    u_dst: np.ndarray, diag_dst: np.ndarray, keep: np.ndarray, start: int, stop: int,
    L: np.ndarray, Z: np.ndarray, blocks: np.ndarray, ok: np.ndarray,
) -> None:
    """Eliminate points ``start : stop`` of ``H (B, nnz) + diag(damping (B, n))``: their
    ``L (B, P, d, d)`` and the ``Z^T (B, T, d, dmax)`` of their ``W`` blocks, written in place;
    ``blocks (B, NB, dmax, dmax)`` (zero on entry) gets these points' ``-Z Z^T`` and, if
    ``u_src`` is not empty, ``U + diag(damping_c)``; ``ok (B,)`` (True on entry) is set False
    where one of these point blocks failed.

    ``v_pos (P, d, d)``: the ``V`` blocks' positions; ``pair_block``: the ``S`` block of each
    pair of :func:`pair_keys` (``pair_start``: the first pair of point ``start``); ``u_src,
    u_dst``: ``U`` entries -> flat block positions; ``diag_dst (m,)``: each reduced unknown's
    diagonal in the blocks."""
    batch, d = H.shape[0], elim.shape[1]
    for b in range(batch):
        Hb, Sb = H[b], blocks[b]
        if u_src.shape[0] > 0:
            flat = Sb.reshape(-1)
            for u in range(u_src.shape[0]):
                flat[u_dst[u]] += Hb[u_src[u]]
            for i in range(keep.shape[0]):
                flat[diag_dst[i]] += damping[b, keep[i]]
        q = pair_start
        for p in range(start, stop):
            Lp = L[b, p]
            for r in range(d):
                for c in range(r + 1):
                    Lp[r, c] = Hb[v_pos[p, r, c]]
                Lp[r, r] += damping[b, elim[p, r]]
            if not _cholesky(Lp, d):
                ok[b] = False
                Lp[:] = 0.0
                for r in range(d):
                    Lp[r, r] = 1.0
            t0, t1, s = pt_ptr[p], pt_ptr[p + 1], stride[p]
            for t in range(t0, t1):  # Z_t^T = L^-1 W_t^T (stored transposed: rows contiguous)
                Zt, dof = Z[b, t], elem_dof[w_elem[t]]
                for a in range(d):
                    inv = 1.0 / Lp[a, a]
                    for r in range(dof):
                        acc = Hb[w_row[t, r] + a * s]
                        for c in range(a):
                            acc -= Lp[a, c] * Zt[c, r]
                        Zt[a, r] = acc * inv
            for i in range(t0, t1):  # S -= Z_i Z_j^T on the upper blocks
                Zi, di = Z[b, i], elem_dof[w_elem[i]]
                for j in range(i, t1):
                    Zj, dj = Z[b, j], elem_dof[w_elem[j]]
                    Sk = Sb[pair_block[q]]
                    q += 1
                    if d == 3:  # points in 3D: one pass over each row of the block
                        Zj0, Zj1, Zj2 = Zj[0], Zj[1], Zj[2]
                        for r in range(di):
                            Sr, z0, z1, z2 = Sk[r], Zi[0, r], Zi[1, r], Zi[2, r]
                            for c in range(dj):
                                Sr[c] -= z0 * Zj0[c] + z1 * Zj1[c] + z2 * Zj2[c]
                    else:
                        for r in range(di):
                            Sr = Sk[r]
                            for a in range(d):
                                z, Zja = Zi[a, r], Zj[a]
                                for c in range(dj):
                                    Sr[c] -= z * Zja[c]


@_jit
def dense_reduced(
    blocks: np.ndarray, block_elems: np.ndarray, elem_rows: np.ndarray, elem_dof: np.ndarray,
    m: int,
) -> np.ndarray:
    """``S (B, m, m)`` from its upper element blocks ``(B, NB, dmax, dmax)`` of elements
    ``block_elems (NB, 2)``: a diagonal block as it is, an off-diagonal one and its transpose."""
    batch = blocks.shape[0]
    S = np.zeros((batch, m, m))
    for b in range(batch):
        for k in range(block_elems.shape[0]):
            er, ec = block_elems[k, 0], block_elems[k, 1]
            blk = blocks[b, k]
            for r in range(elem_dof[er]):
                i = elem_rows[er, r]
                for c in range(elem_dof[ec]):
                    j = elem_rows[ec, c]
                    S[b, i, j] = blk[r, c]
                    if er != ec:
                        S[b, j, i] = blk[r, c]
    return S


@_jit
def forward(
    rhs: np.ndarray, y: np.ndarray, L: np.ndarray, Z: np.ndarray, elim: np.ndarray,
    pt_ptr: np.ndarray, w_elem: np.ndarray, elem_rows: np.ndarray, elem_dof: np.ndarray,
    b: np.ndarray, start: int, stop: int,
) -> None:
    """Points ``start : stop`` of ``b (B, n)``: ``y_p = L^-1 b_p`` into ``y (B, P, d)`` and
    ``rhs (B, m) -= W V^-1 b_p = Z y_p``."""
    batch, d = b.shape[0], elim.shape[1]
    for bb in range(batch):
        for p in range(start, stop):
            Lp, yp = L[bb, p], y[bb, p]
            for a in range(d):
                acc = b[bb, elim[p, a]]
                for c in range(a):
                    acc -= Lp[a, c] * yp[c]
                yp[a] = acc / Lp[a, a]
            for t in range(pt_ptr[p], pt_ptr[p + 1]):
                e, Zt = w_elem[t], Z[bb, t]
                for r in range(elem_dof[e]):
                    acc = 0.0
                    for a in range(d):
                        acc += Zt[a, r] * yp[a]
                    rhs[bb, elem_rows[e, r]] -= acc


@_jit
def backward(
    x: np.ndarray, xc: np.ndarray, y: np.ndarray, L: np.ndarray, Z: np.ndarray,
    elim: np.ndarray, pt_ptr: np.ndarray, w_elem: np.ndarray, elem_rows: np.ndarray,
    elem_dof: np.ndarray, keep: np.ndarray, start: int, stop: int,
) -> None:
    """Points ``start : stop`` of ``x (B, n)``: ``x_p = L^-T (y_p - Z^T x_c)`` for ``x_c = xc
    (B, m)`` and ``y`` from :func:`forward`; and ``x[:, keep] = xc`` (``keep`` may be empty)."""
    batch, d = xc.shape[0], elim.shape[1]
    u = np.empty(d)
    for bb in range(batch):
        for i in range(keep.shape[0]):
            x[bb, keep[i]] = xc[bb, i]
        for p in range(start, stop):
            Lp = L[bb, p]
            for a in range(d):
                u[a] = y[bb, p, a]
            for t in range(pt_ptr[p], pt_ptr[p + 1]):
                e, Zt = w_elem[t], Z[bb, t]
                for r in range(elem_dof[e]):
                    v = xc[bb, elem_rows[e, r]]
                    for a in range(d):
                        u[a] -= Zt[a, r] * v
            for a in range(d - 1, -1, -1):
                acc = u[a]
                for c in range(a + 1, d):
                    acc -= Lp[c, a] * u[c]
                u[a] = acc / Lp[a, a]
                x[bb, elim[p, a]] = u[a]
