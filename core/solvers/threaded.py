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
"""

from __future__ import annotations

from dataclasses import dataclass

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
    private buffers; ``estimate`` the estimated seconds of one factorization."""

    plan: compiled.Plan
    parts: list[Part]
    top: Part
    top_offsets: np.ndarray
    estimate: float

    @property
    def pattern(self) -> Pattern:
        """The pattern this plan factors (``PlanCache`` checks it)."""
        return self.plan.pattern


def _work(plan: compiled.Plan) -> np.ndarray:
    """Per supernode the multiply-adds of its three calls and its scatter, plus the calls'
    overhead (``CALL_FLOPS``): the split's estimate of its time."""
    W = np.diff(plan.starts).astype(np.float64)
    M = np.diff(plan.rptr).astype(np.float64)
    return W**3 / 3 + M * W**2 + M**2 * (W + 4) / 2 + CALL_FLOPS


def _subtrees(parent: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per supernode (postorder) its subtree's work and first supernode."""
    sub, first = work.copy(), np.arange(parent.shape[0])
    for s, p in enumerate(parent.tolist()):  # children before parents
        if p >= 0:
            sub[p] += sub[s]
            first[p] = min(first[p], first[s])
    return sub, first


def _deal(roots: list[int], sub: np.ndarray, parts: int) -> tuple[list[list[int]], float]:
    """Subtrees to ``parts`` bins, largest first to the least loaded; the largest bin's work."""
    bins: list[list[int]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    for r in sorted(roots, key=lambda r: -sub[r]):
        k = load.index(min(load))
        bins[k].append(r)
        load[k] += float(sub[r])
    return bins, max(load)


def split(sym: Symbolic, plan: compiled.Plan, parts: int, max_top: int = 256,
          min_gain: float = MIN_PART) -> TreePlan:
    """The threads' shares of ``plan`` (``sym``'s tree) for ``parts`` threads: the top grown
    from the roots (largest subtree first; at most ``max_top`` supernodes, ``PATIENCE`` past the
    best) to the least estimated time ``max(part) + top + private buffers``; one part (all of
    it the top) unless that saves ``min_gain`` seconds."""
    parent = sym.parent.astype(np.int64)
    S = parent.shape[0]
    work = _work(plan)
    serial = float(work.sum())
    best: tuple[float, list[int], list[list[int]]] | None = None
    if parts > 1 and serial * SECONDS_PER_FLOP >= 2 * min_gain:  # (else one part: no tree walk)
        sub, first = _subtrees(parent, work)
        children: list[list[int]] = [[] for _ in range(S)]
        for s, p in enumerate(parent.tolist()):
            if p >= 0:
                children[p].append(s)
        panel = np.diff(plan.poff).astype(np.float64)
        frontier = [int(s) for s in np.nonzero(parent < 0)[0]]
        top: list[int] = []
        top_work = top_size = 0.0
        since = 0  # expansions since the best estimate
        for _ in range(min(max_top, S) + 1):
            bins, most = _deal(frontier, sub, parts)
            # private buffers: zeroed by parts 1.., added by the caller (~1 ns per entry each)
            estimate = most + top_work + top_size * parts * 1e-9 / SECONDS_PER_FLOP
            if best is None or estimate < best[0]:
                if best is None or estimate < 0.99 * best[0]:  # worth PATIENCE more steps
                    since = 0
                best = (estimate, list(top), bins)
            since += 1
            if not frontier or since > PATIENCE:
                break
            r = max(frontier, key=lambda s: sub[s])
            frontier.remove(r)
            frontier.extend(children[r])
            top.append(r)
            top_work += float(work[r])
            top_size += float(panel[r])
    gain = 0.0 if best is None else serial - best[0]
    if best is None or gain <= 0 or gain * SECONDS_PER_FLOP < min_gain:
        # one part (no split pays): everything is the top
        whole = Part(np.arange(S, dtype=np.int64), np.array([[0, int(plan.poff[-1])]], np.int64),
                     plan.src, plan.dst, np.full(S, -1, dtype=np.int64), 0,
                     int(np.diff(plan.rptr).max(initial=0)))
        return TreePlan(plan, [], whole, np.zeros(1, np.int64), serial * SECONDS_PER_FLOP)
    estimate, top, bins = best
    top_sns = np.array(sorted(top), dtype=np.int64)
    top_sizes = panel[top_sns].astype(np.int64)
    top_offsets = np.concatenate([[0], np.cumsum(top_sizes)]).astype(np.int64)
    priv_off = np.full(S, -1, dtype=np.int64)
    priv_off[top_sns] = top_offsets[:-1]
    none = np.full(S, -1, dtype=np.int64)
    # which part fills each panel entry: the owner supernode's part (the top's: part 0)
    part_of = np.zeros(S, dtype=np.int64)
    for k, roots in enumerate(bins):
        for r in roots:
            part_of[first[r] : r + 1] = k
    part_of[top_sns] = 0
    entry_sn = np.searchsorted(plan.poff, plan.dst, side="right") - 1
    entry_part = part_of[entry_sn]
    M = np.diff(plan.rptr)
    shares = []
    for k, roots in enumerate(bins):
        sns = np.concatenate([np.arange(first[r], r + 1) for r in roots] or
                             [np.zeros(0, np.int64)]).astype(np.int64)
        sns.sort()
        ranges = [[plan.poff[first[r]], plan.poff[r + 1]] for r in roots]
        if k == 0:
            ranges += [[plan.poff[t], plan.poff[t + 1]] for t in top_sns]
        mine = np.nonzero(entry_part == k)[0]
        shares.append(Part(sns, np.array(ranges, dtype=np.int64).reshape(-1, 2),
                           plan.src[mine], plan.dst[mine], none if k == 0 else priv_off,
                           0 if k == 0 else int(top_offsets[-1]),
                           int(M[sns].max(initial=0))))
    top_part = Part(top_sns, np.zeros((0, 2), np.int64), np.zeros(0, np.int64),
                    np.zeros(0, np.int64), none, 0, int(M[top_sns].max(initial=0)))
    return TreePlan(plan, shares, top_part, top_offsets, estimate * SECONDS_PER_FLOP)


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
def _solve(L: np.ndarray, starts: np.ndarray, rptr: np.ndarray, rows: np.ndarray,
           poff: np.ndarray, perm: np.ndarray, rhs: np.ndarray, out: np.ndarray) -> None:
    """``out = A^-1 rhs`` for ``rhs, out (n,)`` with the panels ``L (entries,)``, reading each
    row-major panel row by row (contiguous): ``L y = P rhs`` then ``L^T x = y``."""
    n = rhs.shape[0]
    y = np.empty(n)
    for i in range(n):
        y[i] = rhs[perm[i]]
    S = starts.shape[0] - 1
    for sn in range(S):
        c0, W = starts[sn], starts[sn + 1] - starts[sn]
        r0, M = rptr[sn], rptr[sn + 1] - rptr[sn]
        base = poff[sn]
        for i in range(W):  # L11 x1 = y1, row by row
            e = base + i * W
            acc = y[c0 + i]
            for k in range(i):
                acc -= L[e + k] * y[c0 + k]
            y[c0 + i] = acc / L[e + i]
        for i in range(M):  # y2 -= L21 x1
            e = base + (W + i) * W
            acc = 0.0
            for k in range(W):
                acc += L[e + k] * y[c0 + k]
            y[rows[r0 + i]] -= acc
    for sn in range(S - 1, -1, -1):
        c0, W = starts[sn], starts[sn + 1] - starts[sn]
        r0, M = rptr[sn], rptr[sn + 1] - rptr[sn]
        base = poff[sn]
        for i in range(M):  # y1 -= L21^T x2
            e = base + (W + i) * W
            xi = y[rows[r0 + i]]
            for k in range(W):
                y[c0 + k] -= L[e + k] * xi
        for i in range(W - 1, -1, -1):  # L11^T x1 = y1, column i of L11^T is row i of L11
            e = base + i * W
            xi = y[c0 + i] / L[e + i]
            y[c0 + i] = xi
            for k in range(i):
                y[c0 + k] -= L[e + k] * xi
    for i in range(n):
        out[perm[i]] = y[i]


@dataclass
class ThreadedFactor:
    """The panels ``L (entries,)`` of one factor; ``ok (1,)``; ``pivot``: the original unknown
    of the first non-finite value or failed pivot (-1 where ok)."""

    plan: compiled.Plan
    L: np.ndarray
    ok: Tensor
    pivot: int

    def solve(self, b: Tensor) -> Tensor:
        """``A^-1 b`` for ``b (1, n)`` in ``b``'s dtype and device; zeros if not ok."""
        p = self.plan
        rhs = np.ascontiguousarray(b.detach().to("cpu", torch.float64).numpy())
        if rhs.shape != (1, p.pattern.n):
            raise ValueError(f"b must be (1, {p.pattern.n}), got {tuple(b.shape)}")
        out = np.zeros_like(rhs)
        if self.pivot < 0:
            _solve(self.L, p.starts, p.rptr, p.rows, p.poff, p.perm, rhs[0], out[0])
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
    return ThreadedFactor(p, L, torch.tensor([pivot < 0], device=device), pivot)
