"""Batched supernodal Cholesky on the CPU, compiled with Numba: ``B`` matrices of one pattern.

The symbolic analysis is :func:`core.solvers.supernodal.analyze` (block ordering of the variable
graph, supernodes by relaxed amalgamation, computed once per pattern). The numeric phase here is
the classic right-looking supernodal method (Ng and Peyton, "Block sparse Cholesky algorithms on
advanced uniprocessor computers", 1993) written as loops whose innermost index is the batch
element: every panel entry is stored as ``B`` contiguous values, so each multiply-add of the
factorization runs over the whole batch in SIMD, and one compiled call factors all ``B``
matrices (no per-element Python or library call). Per supernode ``s`` (children first): the
column Cholesky of its dense panel ``[L11; L21]`` (``(W + M) x W``), then ``-L21 L21^T``
subtracted from the ancestors' panels through the rows' positions there.

Measured (bench/RESULTS.md, "Batched factorization"): for many small problems of one structure
(64 pose graphs of 256 poses) it factors the batch faster than CHOLMOD on the block-diagonal
matrix; for one large problem CHOLMOD's BLAS-3 supernodes win, so :class:`SparseCholesky` uses
this kernel only for batches (``batched_from``).

Failures are per batch element: a pivot that is not positive (or not finite) marks the element
failed (``ok = False``), is replaced by 1 so the element's later columns stay finite, and never
touches the other elements; the failed element's solutions are zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from core import parallel
from core._kernels import _jit
from core.objective import Pattern
from core.solvers.supernodal import Symbolic


@dataclass(frozen=True, eq=False)
class Plan:
    """The numeric layout of one pattern: ``starts (S + 1,)`` the supernodes' first columns (new
    order); ``rptr (S + 1,)`` and ``rows`` their rows below the diagonal block (new order);
    ``poff (S + 1,)`` each panel's first entry (row-major ``(W + M) x W``, batch last);
    ``src, dst`` the lower-triangle pattern entries and their panel entries; ``perm (n,)`` new ->
    original unknown; ``owner (n,)`` the supernode of each new column; ``flops`` the
    multiply-adds of one element's factorization (a work estimate for the threads)."""

    pattern: Pattern
    starts: np.ndarray
    rptr: np.ndarray
    rows: np.ndarray
    poff: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    perm: np.ndarray
    owner: np.ndarray
    flops: int = 0


def _ints(a: np.ndarray) -> np.ndarray:
    """``a`` as int64, copied only if it is not (100k poses: the pattern's rows are 115 MB)."""
    return np.asarray(a, dtype=np.int64)


def plan(sym: Symbolic) -> Plan:
    """The :class:`Plan` of a symbolic analysis (NumPy, once per pattern)."""
    pattern = sym.pattern
    starts = _ints(sym.starts)
    W = np.diff(starts)
    rptr = _ints(sym.below_ptr)
    M = np.diff(rptr)
    rows = _ints(sym.below_rows)
    poff = _ints(np.concatenate([[0], np.cumsum((W + M) * W)]))
    owner = _ints(np.repeat(np.arange(W.shape[0]), W))
    perm = _ints(sym.perm)
    src, dst = _entries(_ints(pattern.indptr.cpu().numpy()), _ints(pattern.rows.cpu().numpy()),
                        perm, starts, rptr, rows, poff, owner)
    return Plan(
        pattern,
        starts,
        rptr,
        rows,
        poff,
        src,
        dst,
        perm,
        owner,
        int((W * W * (W + M) // 2 + M * M * W // 2).sum()),
    )


@_jit
def _entries(indptr: np.ndarray, prows: np.ndarray, perm: np.ndarray, starts: np.ndarray,
             rptr: np.ndarray, rows: np.ndarray, poff: np.ndarray,
             owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pattern's lower entries in the new order (``src``, ascending) and their panel entries
    ``dst``: row ``r`` of new column ``c`` in supernode ``t`` is panel row ``r - starts[t]``
    inside the diagonal block, else ``W + `` its position in ``t``'s rows below (binary
    search)."""
    n = indptr.shape[0] - 1
    inv = np.empty(n, dtype=np.int64)
    for i in range(n):
        inv[perm[i]] = i
    src = np.empty(prows.shape[0], dtype=np.int64)
    dst = np.empty(prows.shape[0], dtype=np.int64)
    k = 0
    for j in range(n):
        c = inv[j]
        t = owner[c]
        t0, W, end = starts[t], starts[t + 1] - starts[t], starts[t + 1]
        for e in range(indptr[j], indptr[j + 1]):
            r = inv[prows[e]]
            if r < c:
                continue
            if r < end:
                row = r - t0
            else:
                lo, hi = rptr[t], rptr[t + 1]
                while lo < hi:
                    mid = (lo + hi) // 2
                    if rows[mid] < r:
                        lo = mid + 1
                    else:
                        hi = mid
                row = W + lo - rptr[t]
            src[k] = e
            dst[k] = poff[t] + row * W + (c - t0)
            k += 1
    return src[:k].copy(), dst[:k].copy()


@_jit
def target_rows(rows: np.ndarray, r0: int, j2: int, M: int, starts: np.ndarray,
                rptr: np.ndarray, tgt: int, pos: np.ndarray) -> int:
    """Where the rows ``rows[r0 + j2 : r0 + M]`` of a supernode's update (ascending) sit in the
    panel of their target supernode ``tgt`` (the owner of row ``rows[r0 + j2]``): ``pos[i]``
    its panel row (inside the diagonal block, or ``W`` + its place among ``tgt``'s rows below,
    found by one forward scan); returns the end of the rows that are ``tgt``'s own columns."""
    t0, tW, tend = starts[tgt], starts[tgt + 1] - starts[tgt], starts[tgt + 1]
    q, qend = rptr[tgt], rptr[tgt + 1]
    for i1 in range(j2, M):
        r1 = rows[r0 + i1]
        if r1 < tend:
            pos[i1] = r1 - t0
        else:
            while q < qend and rows[q] != r1:
                q += 1
            pos[i1] = tW + q - rptr[tgt]
    jend = j2
    while jend < M and rows[r0 + jend] < tend:
        jend += 1
    return jend


@_jit
def _factor(
    values: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    starts: np.ndarray,
    rptr: np.ndarray,
    rows: np.ndarray,
    poff: np.ndarray,
    owner: np.ndarray,
    L: np.ndarray,
    ok: np.ndarray,
    pivot: np.ndarray,
) -> None:
    """Factor ``values (B, nnz)`` (damped, lower entries ``src`` go to panel entries ``dst``) into
    the panels ``L (entries, B)``; ``ok (B,)`` False and ``pivot (B,)`` the new column of the
    first failed pivot for each element that is not positive definite."""
    B = values.shape[0]
    L[:] = 0.0
    for k in range(src.shape[0]):
        d, s = dst[k], src[k]
        for b in range(B):
            L[d, b] = values[b, s]
    piv = np.empty(B)
    acc = np.empty(B)
    pos = np.empty(max(rows.shape[0], 1), dtype=np.int64)
    S = starts.shape[0] - 1
    for sn in range(S):
        c0, W = starts[sn], starts[sn + 1] - starts[sn]
        r0, M = rptr[sn], rptr[sn + 1] - rptr[sn]
        base = poff[sn]
        for j in range(W):  # column Cholesky of the (W + M) x W panel
            dj = base + j * W + j
            for b in range(B):
                v = L[dj, b]
                if not v > 0.0 or not np.isfinite(v):  # NaN fails the comparison
                    if ok[b]:
                        pivot[b] = c0 + j
                    ok[b] = False
                    v = 1.0
                piv[b] = 1.0 / np.sqrt(v)
                L[dj, b] = np.sqrt(v)
            for i in range(j + 1, W + M):
                e = base + i * W + j
                for b in range(B):
                    L[e, b] *= piv[b]
            for k in range(j + 1, W):
                ek = base + k * W + j
                for i in range(k, W + M):
                    ei, t = base + i * W + j, base + i * W + k
                    for b in range(B):
                        L[t, b] -= L[ei, b] * L[ek, b]
        j2 = 0
        while j2 < M:  # -L21 L21^T into the ancestors, one target supernode at a time
            tgt = owner[rows[r0 + j2]]
            t0, tW = starts[tgt], starts[tgt + 1] - starts[tgt]
            jend = target_rows(rows, r0, j2, M, starts, rptr, tgt, pos)
            tb = poff[tgt]
            for jj in range(j2, jend):
                col = rows[r0 + jj] - t0
                a2 = base + (W + jj) * W
                for i1 in range(jj, M):
                    a1 = base + (W + i1) * W
                    for b in range(B):
                        acc[b] = 0.0
                    for k in range(W):
                        for b in range(B):
                            acc[b] += L[a1 + k, b] * L[a2 + k, b]
                    e = tb + pos[i1] * tW + col
                    for b in range(B):
                        L[e, b] -= acc[b]
            j2 = jend


@_jit
def _solve(
    L: np.ndarray,
    starts: np.ndarray,
    rptr: np.ndarray,
    rows: np.ndarray,
    poff: np.ndarray,
    perm: np.ndarray,
    rhs: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out = A^-1 rhs`` for ``rhs, out (B, n)`` with the panels ``L (entries, B)``."""
    B, n = rhs.shape
    y = np.empty((n, B))
    for i in range(n):
        for b in range(B):
            y[i, b] = rhs[b, perm[i]]
    S = starts.shape[0] - 1
    for sn in range(S):  # L y = P rhs
        c0, W = starts[sn], starts[sn + 1] - starts[sn]
        r0, M = rptr[sn], rptr[sn + 1] - rptr[sn]
        base = poff[sn]
        for j in range(W):
            dj = base + j * W + j
            for b in range(B):
                y[c0 + j, b] /= L[dj, b]
            for i in range(j + 1, W + M):
                row = c0 + i if i < W else rows[r0 + i - W]
                e = base + i * W + j
                for b in range(B):
                    y[row, b] -= L[e, b] * y[c0 + j, b]
    for sn in range(S - 1, -1, -1):  # L^T x = y
        c0, W = starts[sn], starts[sn + 1] - starts[sn]
        r0, M = rptr[sn], rptr[sn + 1] - rptr[sn]
        base = poff[sn]
        for j in range(W - 1, -1, -1):
            for i in range(j + 1, W + M):
                row = c0 + i if i < W else rows[r0 + i - W]
                e = base + i * W + j
                for b in range(B):
                    y[c0 + j, b] -= L[e, b] * y[row, b]
            dj = base + j * W + j
            for b in range(B):
                y[c0 + j, b] /= L[dj, b]
    for i in range(n):
        for b in range(B):
            out[b, perm[i]] = y[i, b]


SECONDS_PER_FLOP = 2.5e-10
"""Seconds per multiply-add of :func:`_factor` per batch element, a work estimate for
:func:`core.parallel.threads` (64 pose graphs of 256 poses, 0.82 M each: 13 ms estimated,
17-21 ms measured on the 2-core bench machine)."""
MIN_CHUNK = 1e-3
"""Seconds of factorization per thread below which the batch is factored on one thread (the
solves of each chunk follow its factor's chunks: a solve is about a third of a factor)."""
MIN_BATCH = 4
"""Batch elements per chunk at the least (the loops over them are the SIMD lanes)."""


@dataclass
class CompiledFactor:
    """The panels of ``B`` factors, in chunks of batch elements (``chunks[k] = (b0, b1)``, panels
    ``L[k] (entries, b1 - b0)``: factored and solved on a thread each); ``ok (B,)``; ``pivot
    (B,)``: the original unknown of the first failed pivot (-1 where ok)."""

    plan: Plan
    L: list[np.ndarray]
    ok: Tensor
    pivot: Tensor
    chunks: list[tuple[int, int]]

    def solve(self, b: Tensor) -> Tensor:
        """``A^-1 b`` for ``b (B, n)`` (float64 on the CPU inside), in ``b``'s dtype and device;
        zeros for failed elements."""
        p = self.plan
        rhs = np.ascontiguousarray(b.detach().to("cpu", torch.float64).numpy())
        out = np.empty_like(rhs)
        parallel.run(_solve, [(L, p.starts, p.rptr, p.rows, p.poff, p.perm, rhs[b0:b1],
                               out[b0:b1]) for L, (b0, b1) in zip(self.L, self.chunks)])
        x = torch.from_numpy(out)
        if not bool(self.ok.all()):
            x[~self.ok.cpu()] = 0.0
        return x.to(b.device, b.dtype)

    def failures(self) -> dict[int, str]:
        """Per failed batch element, why; empty when all are ok."""
        out = {}
        for k in torch.nonzero(~self.ok).flatten().tolist():
            u = int(self.pivot[k])
            where = f" (pivot at unknown {u})" if u >= 0 else ""
            out[k] = f"batch element {k}: not positive definite{where}"
        return out


def factor(p: Plan, values: np.ndarray, device: torch.device | str = "cpu") -> CompiledFactor:
    """Factor the damped ``values (B, nnz)`` (float64, C-contiguous) of ``p``'s pattern, in
    chunks of batch elements on the free cores (``core.parallel``; each element's arithmetic
    is the same whatever the chunks: the same numbers as one call, bit for bit)."""
    batch = values.shape[0]
    k = parallel.threads(batch * p.flops * SECONDS_PER_FLOP, MIN_CHUNK, batch // MIN_BATCH)
    chunks = parallel.bounds(batch, k)
    L = [np.empty((int(p.poff[-1]), b1 - b0)) for b0, b1 in chunks]
    ok = np.ones(batch, dtype=np.bool_)
    pivot = np.full(batch, -1, dtype=np.int64)
    parallel.run(_factor, [(values[b0:b1], p.src, p.dst, p.starts, p.rptr, p.rows, p.poff,
                            p.owner, Lk, ok[b0:b1], pivot[b0:b1])
                           for Lk, (b0, b1) in zip(L, chunks)])
    failed = pivot >= 0
    pivot[failed] = p.perm[pivot[failed]]
    return CompiledFactor(p, L, torch.from_numpy(ok).to(device), torch.from_numpy(pivot), chunks)
