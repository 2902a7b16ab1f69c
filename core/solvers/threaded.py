"""Supernodal Cholesky of one sparse matrix on the CPU: BLAS-3 per supernode, subtrees on threads.

The symbolic analysis is :func:`core.solvers.supernodal.analyze` and the panel layout
:func:`core.solvers.compiled.plan`'s (one batch element). The numeric phase is the right-looking
supernodal method with one LAPACK/BLAS call per step (``core._blas``: SciPy's BLAS): per
supernode ``s`` of width ``W`` with ``M`` rows below, ``L11 = chol(A11)`` (``dpotrf``),
``L21 = A21 L11^-T`` (``dtrsm``), ``U = L21 L21^T`` (``dsyrk``), and ``U`` subtracted from the
ancestors' panels through the rows' positions there. A row-major ``(W + M) x W`` panel is the
column-major ``W x (W + M)`` matrix ``[L11^T, L21^T]``, so the Fortran routines work on the panels
in place.

Threads (:func:`split`): the elimination tree is cut into a *top* (the supernodes nearest the
roots) and disjoint subtrees below it, dealt to ``K`` parts by their estimated work (largest
first, to the least loaded part; the top is grown from the roots while that lowers the
estimated time ``max(part) + top``). The parts run at once (``core.parallel``; the kernel
releases the GIL): a subtree's updates land in its own panels or in the top's. Part 0 writes the
top's panels directly; the others write their top updates into private buffers, added into the
top's panels after the parts finish (:func:`_gather`); then the top is factored on the calling
thread. Every BLAS call runs on one OpenBLAS thread, the top's too: OpenBLAS's idle threads spin
for ~0.1 s after a threaded call and so take the core the next kernel's threads need (sphere2500's
factorization 28 ms with the top on two OpenBLAS threads against 20 ms on one, the parts on two
threads; its LM solve 0.32-0.36 s against 0.25-0.26 s; the 10k helix's 5 iterations 0.44-0.49 s
against 0.32-0.42 s; the top's own time the same, 2 ms). Each part's arithmetic is the
sequential method's for its supernodes, and the top's sums add the same terms in another order,
so the factor equals the one-thread factor to rounding (``tests/core/test_threaded.py``).

The solve of a split plan uses the same parts (:func:`solve_parts`): the forward substitution of
the parts at once (parts 1.. subtract their updates of the top's rows into private buffers), the
top's forward and backward on the calling thread, then the parts' backward substitutions at once
(100k-pose helix: 62-64 ms against 80-114 ms on one thread). The split's tree walk and the
grouping of the entries are compiled too (that helix: ~1 s of Python per plan before).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from core import parallel
from core._blas import blas_threads, dpotrf, dsyrk, dtrsm
from core._kernels import _jit
from core.objective import Pattern
from core.solvers import compiled
from core.solvers.compiled import target_rows
from core.solvers.supernodal import Symbolic

SECONDS_PER_FLOP = 1.2e-10
"""Seconds per multiply-add of one part (the split's work unit to time: 370 M for sphere2500's
factorization, ~45 ms on one thread of the 2-core bench machine)."""
CALL_FLOPS = 2000.0
"""Multiply-adds one supernode's three library calls and bookkeeping are worth."""
PATIENCE = 16
"""Expansions of the top tried past the last one that lowered the estimate by 1% or more."""
MIN_PART = 2e-3
"""Seconds of work per part below which the matrix is factored on one thread."""


@dataclass(frozen=True, eq=False)
class Part:
    """One thread's share: ``sns`` its supernodes (ascending: children first); ``ranges (R, 2)``
    the panel entries it zeroes; ``src, dst`` the matrix entries it scatters into them;
    ``priv_off (S,)`` where its updates of a top supernode go in its private buffer (-1: into
    ``L`` itself); ``priv_size`` that buffer's length; ``max_below`` its largest ``M``."""

    sns: np.ndarray
    ranges: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    priv_off: np.ndarray
    priv_size: int
    max_below: int


@dataclass(frozen=True, eq=False)
class TreePlan:
    """:func:`split`'s result: ``plan`` the panel layout; ``parts`` the threads' shares (part 0
    also zeroes and fills the top's panels); ``top`` the supernodes factored after them (all of
    them when there is one part); ``top_offsets (T + 1,)`` the top panels' offsets in the
    private buffers; ``estimate`` the estimated seconds of one factorization; ``top_cols``
    the top's columns (new order, ascending) and ``top_index (n,)`` each column's place among
    them (-1: a part's; empty with one part), for the solve's private buffers."""

    plan: compiled.Plan
    parts: list[Part]
    top: Part
    top_offsets: np.ndarray
    estimate: float
    top_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    top_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def pattern(self) -> Pattern:
        """The pattern this plan factors (``PlanCache`` checks it)."""
        return self.plan.pattern


def _work(W: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Per supernode (widths ``W (S,)``, rows below ``M (S,)``) the multiply-adds of its three
    calls and its scatter, plus the calls' overhead (``CALL_FLOPS``): the split's estimate of
    its time."""
    W, M = W.astype(np.float64), M.astype(np.float64)
    return W**3 / 3 + M * W**2 + M**2 * (W + 4) / 2 + CALL_FLOPS


@_jit
def _subtrees(parent: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per supernode (postorder: children before parents) its subtree's work and first
    supernode."""
    sub, first = work.copy(), np.arange(parent.shape[0])
    for s in range(parent.shape[0]):
        p = parent[s]
        if p >= 0:
            sub[p] += sub[s]
            if first[s] < first[p]:
                first[p] = first[s]
    return sub, first


@_jit
def _deal(roots: np.ndarray, sub: np.ndarray, parts: int) -> tuple[np.ndarray, float]:
    """The subtrees ``roots`` to ``parts`` bins, largest first (ties: in ``roots``' order) to
    the least loaded (ties: the lowest bin); per root its bin, and the largest bin's work."""
    load = np.zeros(parts)
    bins = np.empty(roots.shape[0], dtype=np.int64)
    for i in np.argsort(-sub[roots], kind="mergesort"):
        k = np.argmin(load)
        bins[i] = k
        load[k] += sub[roots[i]]
    return bins, load.max()


@_jit
def _grow(parent: np.ndarray, work: np.ndarray, panel: np.ndarray, sub: np.ndarray, parts: int,
          steps: int, patience: int, seconds_per_flop: float
          ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """The top grown from the roots, largest subtree first (ties: the first in the frontier),
    for at most ``steps`` expansions and ``patience`` past the last one that lowered the
    estimate ``max(part) + top + private buffers`` by 1%: the best estimate (multiply-adds),
    the top's supernodes (in the order taken), the frontier's subtree roots and their bins."""
    S = parent.shape[0]
    cptr = np.zeros(S + 1, dtype=np.int64)  # children, ascending, as CSR
    for s in range(S):
        if parent[s] >= 0:
            cptr[parent[s] + 1] += 1
    cptr = np.cumsum(cptr)
    child, fill = np.empty(max(cptr[S], 1), dtype=np.int64), cptr[:-1].copy()
    for s in range(S):
        if parent[s] >= 0:
            child[fill[parent[s]]] = s
            fill[parent[s]] += 1
    frontier = np.empty(S, dtype=np.int64)
    size = 0
    for s in range(S):
        if parent[s] < 0:
            frontier[size] = s
            size += 1
    top = np.empty(min(steps, S) + 1, dtype=np.int64)
    taken = 0
    top_work = top_size = 0.0
    best, best_taken = np.inf, 0
    best_roots, best_bins = frontier[:0].copy(), np.zeros(0, dtype=np.int64)
    since = 0  # expansions since the best estimate
    for _ in range(min(steps, S) + 1):
        bins, most = _deal(frontier[:size], sub, parts)
        # private buffers: zeroed by parts 1.., added by the caller (~1 ns per entry each)
        estimate = most + top_work + top_size * parts * 1e-9 / seconds_per_flop
        if estimate < best:
            if estimate < 0.99 * best:  # worth `patience` more steps
                since = 0
            best, best_taken = estimate, taken
            best_roots, best_bins = frontier[:size].copy(), bins
        since += 1
        if size == 0 or since > patience:
            break
        at = 0
        for i in range(1, size):
            if sub[frontier[i]] > sub[frontier[at]]:
                at = i
        r = frontier[at]
        frontier[at : size - 1] = frontier[at + 1 : size].copy()
        size -= 1
        for e in range(cptr[r], cptr[r + 1]):
            frontier[size] = child[e]
            size += 1
        top[taken] = r
        taken += 1
        top_work += work[r]
        top_size += panel[r]
    return best, top[:best_taken].copy(), best_roots, best_bins


@_jit
def _entries(src: np.ndarray, dst: np.ndarray, indptr: np.ndarray, perm: np.ndarray,
             owner: np.ndarray, part_of: np.ndarray,
             parts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plan's entries ``src, dst`` (``src`` ascending: column by column of the pattern's
    ``indptr``) grouped by the part of the supernode they fill (``part_of``, through the
    entry's new column; ascending within a part): ``src, dst`` and the parts' bounds
    ``(parts + 1,)``."""
    n = indptr.shape[0] - 1
    inv = np.empty(n, dtype=np.int64)
    for i in range(n):
        inv[perm[i]] = i
    col_part = np.empty(n, dtype=np.int64)  # per original column (no per-entry array)
    for j in range(n):
        col_part[j] = part_of[owner[inv[j]]]
    bounds = np.zeros(parts + 1, dtype=np.int64)
    j = 0
    for e in range(src.shape[0]):
        while src[e] >= indptr[j + 1]:
            j += 1
        bounds[col_part[j] + 1] += 1
    bounds = np.cumsum(bounds)
    fill = bounds[:-1].copy()
    out_src, out_dst = np.empty_like(src), np.empty_like(dst)
    j = 0
    for e in range(src.shape[0]):
        while src[e] >= indptr[j + 1]:
            j += 1
        k = col_part[j]
        out_src[fill[k]], out_dst[fill[k]] = src[e], dst[e]
        fill[k] += 1
    return out_src, out_dst, bounds


def _cut(sym: Symbolic, parts: int, max_top: int, min_gain: float
         ) -> tuple[float, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None]:
    """:func:`split`'s tree walk on ``sym`` alone: the estimated seconds of one factorization
    and, where a split saves ``min_gain`` seconds, the top (in the order taken), the frontier's
    subtree roots (in the order dealt: largest first) and their bins, and each supernode's
    first descendant; else None."""
    parent = sym.parent.astype(np.int64)
    W, M = np.diff(sym.starts), np.diff(sym.below_ptr)
    work = _work(W, M)
    serial = float(work.sum())
    if parts <= 1 or serial * SECONDS_PER_FLOP < 2 * min_gain:  # one part: no tree walk
        return serial * SECONDS_PER_FLOP, None
    sub, first = _subtrees(parent, work)
    panel = ((W + M) * W).astype(np.float64)
    best, top, roots, bins = _grow(parent, work, panel, sub, parts, max_top, PATIENCE,
                                   SECONDS_PER_FLOP)
    gain = serial - best
    if gain <= 0 or gain * SECONDS_PER_FLOP < min_gain:
        return serial * SECONDS_PER_FLOP, None
    dealt = np.argsort(-sub[roots], kind="stable")  # _deal's order
    return best * SECONDS_PER_FLOP, (top, roots[dealt], bins[dealt], first)


def estimate(sym: Symbolic, parts: int, max_top: int = 256, min_gain: float = MIN_PART) -> float:
    """The estimated seconds of one factorization of ``sym``'s matrix split for ``parts``
    threads (:func:`split`'s estimate, without the panel layout: an ordering's score)."""
    return _cut(sym, parts, max_top, min_gain)[0]


def split(sym: Symbolic, plan: compiled.Plan, parts: int, max_top: int = 256,
          min_gain: float = MIN_PART) -> TreePlan:
    """The threads' shares of ``plan`` (``sym``'s tree) for ``parts`` threads: the top grown
    from the roots (largest subtree first; at most ``max_top`` supernodes, ``PATIENCE`` past the
    best) to the least estimated time ``max(part) + top + private buffers``; one part (all of
    it the top) unless that saves ``min_gain`` seconds. The tree walk and the entries' grouping
    are compiled (100k-pose helix, 55k supernodes, 7 M entries: ~0.5 s each in Python)."""
    S = sym.parent.shape[0]
    seconds, cut = _cut(sym, parts, max_top, min_gain)
    if cut is None:  # one part (no split pays): everything is the top
        whole = Part(np.arange(S, dtype=np.int64), np.array([[0, int(plan.poff[-1])]], np.int64),
                     plan.src, plan.dst, np.full(S, -1, dtype=np.int64), 0,
                     int(np.diff(plan.rptr).max(initial=0)))
        return TreePlan(plan, [], whole, np.zeros(1, np.int64), seconds)
    top, roots, bins, first = cut
    top_sns = np.sort(top)
    panel = np.diff(plan.poff)
    top_offsets = np.concatenate([[0], np.cumsum(panel[top_sns])]).astype(np.int64)
    priv_off = np.full(S, -1, dtype=np.int64)
    priv_off[top_sns] = top_offsets[:-1]
    none = np.full(S, -1, dtype=np.int64)
    # each supernode's part (the top's panels are filled by part 0)
    part_of = np.zeros(S, dtype=np.int64)
    for r, k in zip(roots.tolist(), bins.tolist()):
        part_of[first[r] : r + 1] = k
    label = part_of.copy()
    label[top_sns] = -1
    part_of[top_sns] = 0
    src, dst, bounds = _entries(plan.src, plan.dst, np.asarray(plan.pattern.indptr.numpy(),
                                dtype=np.int64), plan.perm, plan.owner, part_of, parts)
    M = np.diff(plan.rptr)
    shares = []
    for k in range(parts):
        sns = np.flatnonzero(label == k).astype(np.int64)
        ranges = [[plan.poff[first[r]], plan.poff[r + 1]] for r in roots[bins == k].tolist()]
        if k == 0:
            ranges += [[plan.poff[t], plan.poff[t + 1]] for t in top_sns]
        shares.append(Part(sns, np.array(ranges, dtype=np.int64).reshape(-1, 2),
                           src[bounds[k] : bounds[k + 1]], dst[bounds[k] : bounds[k + 1]],
                           none if k == 0 else priv_off,
                           0 if k == 0 else int(top_offsets[-1]),
                           int(M[sns].max(initial=0))))
    top_part = Part(top_sns, np.zeros((0, 2), np.int64), np.zeros(0, np.int64),
                    np.zeros(0, np.int64), none, 0, int(M[top_sns].max(initial=0)))
    top_cols = np.concatenate([np.arange(plan.starts[t], plan.starts[t + 1]) for t in top_sns]
                              or [np.zeros(0, np.int64)]).astype(np.int64)
    top_index = np.full(plan.pattern.n, -1, dtype=np.int64)
    top_index[top_cols] = np.arange(top_cols.shape[0])
    return TreePlan(plan, shares, top_part, top_offsets, seconds, top_cols, top_index)


@_jit
def _factor_part(values: np.ndarray, src: np.ndarray, dst: np.ndarray, ranges: np.ndarray,
                 sns: np.ndarray, starts: np.ndarray, rptr: np.ndarray, rows: np.ndarray,
                 poff: np.ndarray, owner: np.ndarray, L: np.ndarray, priv: np.ndarray,
                 priv_off: np.ndarray, max_below: int, beta: float, fail: np.ndarray) -> None:
    """Zero ``L[ranges]`` and ``priv``, scatter ``values[src]`` to ``L[dst]``, then factor the
    supernodes ``sns`` in order, each with ``beta`` added to its diagonal first; ``fail[0]``: the
    new column of the first non-finite value or failed pivot (-1: none; the part stops
    there)."""
    for r in range(ranges.shape[0]):
        L[ranges[r, 0] : ranges[r, 1]] = 0.0
    priv[:] = 0.0
    fail[0] = -1
    for e in range(src.shape[0]):
        v = values[src[e]]
        if not np.isfinite(v):
            s = np.searchsorted(poff, dst[e], side="right") - 1
            fail[0] = starts[s] + (dst[e] - poff[s]) % (starts[s + 1] - starts[s])
            return
        L[dst[e]] = v
    C = np.empty(max(max_below * max_below, 1))
    pos = np.empty(max(max_below, 1), dtype=np.int64)
    ints = np.empty(8, dtype=np.int32)
    chars = np.array([76, 85, 84, 78], dtype=np.uint8)  # "L", "U", "T", "N"
    sc = np.array([1.0, 0.0])
    for sn in sns:
        c0, W = starts[sn], starts[sn + 1] - starts[sn]
        r0, M = rptr[sn], rptr[sn + 1] - rptr[sn]
        base = poff[sn]
        if beta != 0.0:
            for j in range(W):
                L[base + j * W + j] += beta
        ints[0], ints[1], ints[2] = W, M, 0
        # L11^T (upper, column-major W x W) = chol(A11)
        dpotrf(chars[1:].ctypes, ints[0:].ctypes, L[base:].ctypes, ints[0:].ctypes,
               ints[2:].ctypes)
        if ints[2] != 0:
            fail[0] = c0 + ints[2] - 1
            return
        for j in range(W):  # LAPACK passes NaN pivots: a pivot must be positive and finite
            d = L[base + j * W + j]
            if not (d > 0.0 and np.isfinite(d)):
                fail[0] = c0 + j
                return
        if M == 0:
            continue
        # L21^T = L11^-1 A21^T (column-major W x M, right after the diagonal block)
        dtrsm(chars[0:].ctypes, chars[1:].ctypes, chars[2:].ctypes, chars[3:].ctypes,
              ints[0:].ctypes, ints[1:].ctypes, sc[0:].ctypes, L[base:].ctypes,
              ints[0:].ctypes, L[base + W * W :].ctypes, ints[0:].ctypes)
        # C = L21 L21^T (lower triangle, column-major M x M)
        dsyrk(chars[0:].ctypes, chars[2:].ctypes, ints[1:].ctypes, ints[0:].ctypes,
              sc[0:].ctypes, L[base + W * W :].ctypes, ints[0:].ctypes, sc[1:].ctypes,
              C.ctypes, ints[1:].ctypes)
        j2 = 0
        while j2 < M:  # -C into the ancestors, one target supernode at a time
            tgt = owner[rows[r0 + j2]]
            t0, tW = starts[tgt], starts[tgt + 1] - starts[tgt]
            jend = target_rows(rows, r0, j2, M, starts, rptr, tgt, pos)
            if priv_off[tgt] >= 0:
                out, tb = priv, priv_off[tgt]
            else:
                out, tb = L, poff[tgt]
            for jj in range(j2, jend):
                col = rows[r0 + jj] - t0
                cj = jj * M
                for i1 in range(jj, M):
                    out[tb + pos[i1] * tW + col] -= C[cj + i1]
            j2 = jend


@_jit
def _gather(top: np.ndarray, poff: np.ndarray, offsets: np.ndarray, L: np.ndarray,
            priv: np.ndarray) -> None:
    """Add the private buffers ``priv (K, size)`` into the top supernodes' panels of ``L``."""
    for t in range(top.shape[0]):
        base, off, size = poff[top[t]], offsets[t], offsets[t + 1] - offsets[t]
        for k in range(priv.shape[0]):
            for i in range(size):
                L[base + i] += priv[k, off + i]


@_jit
def _forward_part(L: np.ndarray, starts: np.ndarray, rptr: np.ndarray, rows: np.ndarray,
                  poff: np.ndarray, sns: np.ndarray, y: np.ndarray, priv: np.ndarray,
                  top_index: np.ndarray) -> None:
    """``L y = y`` over the supernodes ``sns`` (ascending; ``y (n,)`` in the new order, in
    place), each panel read row by row (contiguous), with the updates of the top's rows
    subtracted into ``priv`` (at ``top_index``) instead where ``priv`` is not empty."""
    own = priv.shape[0] == 0
    for sn in sns:
        c0, W = starts[sn], starts[sn + 1] - starts[sn]
        r0, M = rptr[sn], rptr[sn + 1] - rptr[sn]
        base = poff[sn]
        for i in range(W):
            e = base + i * W
            acc = y[c0 + i]
            for k in range(i):
                acc -= L[e + k] * y[c0 + k]
            y[c0 + i] = acc / L[e + i]
        for i in range(M):
            e = base + (W + i) * W
            acc = 0.0
            for k in range(W):
                acc += L[e + k] * y[c0 + k]
            r = rows[r0 + i]
            if own or top_index[r] < 0:
                y[r] -= acc
            else:
                priv[top_index[r]] -= acc


@_jit
def _backward_part(L: np.ndarray, starts: np.ndarray, rptr: np.ndarray, rows: np.ndarray,
                   poff: np.ndarray, sns: np.ndarray, y: np.ndarray) -> None:
    """``L^T x = y`` over the supernodes ``sns`` (their ancestors solved already), descending:
    each panel read row by row; writes only the supernodes' own columns of ``y``."""
    for t in range(sns.shape[0] - 1, -1, -1):
        sn = sns[t]
        c0, W = starts[sn], starts[sn + 1] - starts[sn]
        r0, M = rptr[sn], rptr[sn + 1] - rptr[sn]
        base = poff[sn]
        for i in range(M):
            e = base + (W + i) * W
            xi = y[rows[r0 + i]]
            for k in range(W):
                y[c0 + k] -= L[e + k] * xi
        for i in range(W - 1, -1, -1):
            e = base + i * W
            xi = y[c0 + i] / L[e + i]
            y[c0 + i] = xi
            for k in range(i):
                y[c0 + k] -= L[e + k] * xi


SOLVE_SECONDS_PER_ENTRY = 2e-9
"""Seconds per panel entry of one solve (read twice: forward and backward; 100k-pose helix,
26 M entries: ~115 ms on one thread of the 2-core bench machine)."""


def solve_parts(tp: TreePlan, L: np.ndarray, y: np.ndarray, threads: int | None = None) -> None:
    """``y = A^-1 y`` in place (``y (n,)`` in the new order) with the panels ``L`` of ``tp``:
    the parts' forward solves at once (the top's rows' updates of parts 1.. into private
    buffers, added after them), the top forward and backward on the calling thread, then the
    parts' backward solves at once (one part: all of it the top). On one thread the parts run
    in turn: the same arithmetic, the same solution bit for bit."""
    p = tp.plan
    privs = np.zeros((max(len(tp.parts) - 1, 0), tp.top_cols.shape[0]))
    none = privs[:0].reshape(-1)
    k = (parallel.threads(float(p.poff[-1]) * SOLVE_SECONDS_PER_ENTRY, MIN_PART, len(tp.parts))
         if threads is None else max(1, min(threads, len(tp.parts))))
    forward = [(L, p.starts, p.rptr, p.rows, p.poff, q.sns, y, privs[i - 1] if i else none,
                tp.top_index) for i, q in enumerate(tp.parts)]
    backward = [(L, p.starts, p.rptr, p.rows, p.poff, q.sns, y) for q in tp.parts]
    if k > 1:
        parallel.run(_forward_part, forward, helpers=k - 1)
    else:
        for c in forward:
            _forward_part(*c)
    for priv in privs:
        y[tp.top_cols] += priv
    _forward_part(L, p.starts, p.rptr, p.rows, p.poff, tp.top.sns, y, none, tp.top_index)
    _backward_part(L, p.starts, p.rptr, p.rows, p.poff, tp.top.sns, y)
    if k > 1:
        parallel.run(_backward_part, backward, helpers=k - 1)
    else:
        for c in backward:
            _backward_part(*c)


@dataclass
class ThreadedFactor:
    """The panels ``L (entries,)`` of one factor of ``tree``'s plan; ``ok (1,)``; ``pivot``:
    the original unknown of the first non-finite value or failed pivot (-1 where ok)."""

    tree: TreePlan
    L: np.ndarray
    ok: Tensor
    pivot: int

    @property
    def plan(self) -> compiled.Plan:
        return self.tree.plan

    def solve(self, b: Tensor, threads: int | None = None) -> Tensor:
        """``A^-1 b`` for ``b (1, n)`` in ``b``'s dtype and device; zeros if not ok. On up to
        as many threads as the plan has parts (:func:`solve_parts`; ``threads`` as in
        :func:`factor`)."""
        p = self.plan
        rhs = np.ascontiguousarray(b.detach().to("cpu", torch.float64).numpy())
        if rhs.shape != (1, p.pattern.n):
            raise ValueError(f"b must be (1, {p.pattern.n}), got {tuple(b.shape)}")
        out = np.zeros_like(rhs)
        if self.pivot < 0:
            y = rhs[0][p.perm]
            solve_parts(self.tree, self.L, y, threads)
            out[0][p.perm] = y
        return torch.from_numpy(out).to(b.device, b.dtype)

    def failures(self) -> dict[int, str]:
        """Why the element failed; empty when ok."""
        if self.pivot < 0:
            return {}
        return {0: f"batch element 0: not positive definite (pivot at unknown {self.pivot})"}


def factor(tp: TreePlan, values: np.ndarray, device: torch.device | str = "cpu",
           beta: float = 0.0, threads: int | None = None) -> ThreadedFactor:
    """Factor ``values (1, nnz)`` (float64, damped) plus ``beta I`` of ``tp``'s pattern on up
    to ``len(tp.parts)`` threads (``core.parallel``'s rule, or ``threads``; on one thread the
    parts run one after the other: the same arithmetic, the same factor bit for bit)."""
    p = tp.plan
    if values.ndim != 2 or values.shape[0] != 1 or values.shape[1] != p.pattern.nnz:
        raise ValueError(f"values must be (1, {p.pattern.nnz}), got {tuple(values.shape)}")
    v = values[0]
    L = np.empty(int(p.poff[-1]))
    fail = np.full((len(tp.parts) + 1, 1), -1, dtype=np.int64)
    if tp.parts:
        privs = np.empty((len(tp.parts) - 1, tp.parts[-1].priv_size))
        calls = [(v, q.src, q.dst, q.ranges, q.sns, p.starts, p.rptr, p.rows, p.poff, p.owner,
                  L, privs[k - 1] if k else privs[:0].reshape(-1), q.priv_off, q.max_below,
                  beta, fail[k]) for k, q in enumerate(tp.parts)]
        k = (parallel.threads(tp.estimate, MIN_PART, len(calls)) if threads is None
             else max(1, min(threads, len(calls))))
    q = tp.top
    with blas_threads(1):  # the top too: see the module doc
        if tp.parts:
            if k > 1:
                parallel.run(_factor_part, calls, helpers=k - 1)
            else:
                for c in calls:
                    _factor_part(*c)
            if (fail[:-1] < 0).all():
                _gather(q.sns, p.poff, tp.top_offsets, L, privs)
        if (fail[:-1] < 0).all():
            _factor_part(v, q.src, q.dst, q.ranges, q.sns, p.starts, p.rptr, p.rows, p.poff,
                         p.owner, L, L[:0], q.priv_off, q.max_below, beta, fail[-1])
    failed = fail[fail >= 0]
    pivot = int(p.perm[int(failed.min())]) if failed.size else -1
    return ThreadedFactor(tp, L, torch.tensor([pivot < 0], device=device), pivot)
