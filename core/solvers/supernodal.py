"""Batched supernodal sparse Cholesky in torch: ``B`` matrices of one pattern, CPU or CUDA alike.

The design follows BaSpaCho (Meta's batched sparse Cholesky behind Theseus,
github.com/facebookresearch/baspacho) and the classic supernodal method (Liu, Ng and Peyton,
"On finding supernodes for sparse matrix computations", 1993; Ashcraft and Grimes, "The
influence of relaxed supernode partitions on the multifrontal method", 1989).

Symbolic analysis, once per pattern (:func:`analyze`, NumPy on the CPU):

1. Blocks: maximal runs of consecutive unknowns whose columns hold the same rows (a variable
   element of the objective: 6 unknowns for an SE(3) pose, 3 for a point).
2. A fill-reducing ordering of the block graph: with scikit-sparse, CHOLMOD's AMD and nested
   dissection, keeping the one with the least ``flops + LEVEL_FLOPS * depth`` (a long helix:
   AMD's tree is 428 levels deep at 10k poses, nested dissection's 17); else
   :func:`minimum_degree`, written here.
3. The block structure of ``L`` and its elimination tree (``parent(k) = min struct(k)``), then a
   postorder of the tree.
4. Supernodes: chains ``k -> parent(k) = k + 1`` merged while the explicit zeros they add stay
   under the relaxed-amalgamation thresholds (CHOLMOD's ``nrelax`` / ``zrelax`` rule).
5. Levels: a supernode's level is one more than its children's highest (leaves: 0). All the
   supernodes of one level are independent: they are factored together.

Numeric factorization of all ``B`` matrices at once (:class:`SupernodalCholesky`). Per level, the
supernodes are grouped by padded panel size (:func:`group_level`; a group is padded to its
largest member: identity on the padded diagonal, zeros elsewhere). All panels (supernode columns
x (supernode columns + rows below), lower triangle meaningful) live in one buffer ``(T + 1, B)``,
batch last, group after group: one gather from the damped values fills it, and the updates of
every group are subtracted with one ``scatter_add_`` whose rows are ``B`` contiguous values. Per
group, in a fixed number of torch calls: a blocked transpose of its panels to batch-first
``(B, G, Wp + Mp, Wp)``, ``L11 = chol(A11)``, ``L21 = A21 L11^-T``, ``-L21 L21^T`` (as two
products for large groups: the strictly upper quarter is skipped), transposed back and scattered
into the ancestors' panels. The number of torch calls grows with the number of (level, size
group) pairs, not with the number of supernodes. The factor keeps the padded ``L11, L21`` of
every group, so any number of right-hand sides (the implicit backward) reuse it: forward
substitution level by level from the leaves, back substitution from the root.

Failed elements: an element whose matrix is not numerically positive definite (or holds a
non-finite value) gets ``ok = False``; its failed diagonal blocks are replaced by the identity
(so an indefinite element's factor stays finite); batch elements never mix, so the others'
factors are exact; its solutions are zeros. :meth:`SupernodalFactor.failures` names each failed
batch element and the unknown at which its first failed supernode starts.

Measured (``python -m bench.supernodal``, 2-core shared CPU, 1 thread): on par with CHOLMOD on
the block-diagonal batch at B = 64 x 256 poses, slower at B = 1 (torch call overhead); the CPU
time goes to per-matrix LAPACK calls on small diagonal blocks, the layout transposes and the
update scatter. It is meant for GPUs and for CPUs without CHOLMOD (1.5-2.7x faster than cholespy
and SciPy at B = 16).
"""

from __future__ import annotations

import functools
import heapq
import importlib.util
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from core._kernels import _jit
from core.objective import Pattern
from core.solvers.base import PlanCache

Ordering = Literal["auto", "amd", "nesdis", "metis", "minimum_degree", "natural"]
ORDERINGS = ("auto", "amd", "nesdis", "metis", "minimum_degree", "natural")
SPLIT_FROM = 24
"""Updates of groups with at least this many rows below are formed as two products (a quarter
of the ``Mp x Mp`` product, the strictly upper block, is skipped) when that quarter is worth
more than ``call_flops`` (see :class:`SupernodalCholesky`)."""
LEVEL_FLOPS = 5e5
"""Multiply-adds a level of the tree is worth (its torch calls' overhead) when ``"auto"`` picks
the ordering: the one with the least ``flops + LEVEL_FLOPS * depth`` wins."""


# ---------------------------------------------------------------------------------------------
# Symbolic analysis
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Symbolic:
    """The analysis of one pattern (all indices in the *new* scalar order unless stated).

    ``ordering``: the block ordering used (``"amd"``, ``"nesdis"``, ...);
    ``perm (n,)``: new index -> original unknown; ``starts (S + 1,)``: the supernodes' first
    columns (supernode ``s`` holds columns ``starts[s]:starts[s + 1]``); ``below_rows`` with
    ``below_ptr (S + 1,)``: the rows under each diagonal block, ascending (``below[s] (M_s,)``
    as a list); ``parent (S,)``: the supernode tree (-1: a root);
    ``level (S,)``: 0 for leaves, else one more than the highest child; ``block_starts``: the
    original pattern's blocks (first unknowns, ``(num_blocks + 1,)``); ``nnz_L``: stored lower
    entries of ``L`` without amalgamation zeros; ``nnz_panels``: lower panel entries (with them);
    ``flops``: multiply-adds of one factorization (dense-panel count, padding excluded).
    """

    pattern: Pattern
    ordering: str
    perm: np.ndarray
    starts: np.ndarray
    below_ptr: np.ndarray
    below_rows: np.ndarray
    parent: np.ndarray
    level: np.ndarray
    block_starts: np.ndarray
    nnz_L: int
    nnz_panels: int
    flops: float

    @functools.cached_property
    def below(self) -> list[np.ndarray]:
        """Per supernode its rows below the diagonal block."""
        return np.split(self.below_rows, self.below_ptr[1:-1])

    @property
    def num_supernodes(self) -> int:
        return int(self.parent.shape[0])

    @property
    def depth(self) -> int:
        """Number of levels of the supernode tree."""
        return int(self.level.max()) + 1


def pattern_blocks(pattern: Pattern) -> np.ndarray:
    """First unknowns of the blocks ``(num_blocks + 1,)``: maximal runs of consecutive columns with
    identical row sets (found in ``O(nnz)``: column ``j`` is compared entry by entry with
    ``j + 1`` where both hold as many entries)."""
    return _blocks(*_csc(pattern))


def _csc(pattern: Pattern) -> tuple[np.ndarray, np.ndarray]:
    """``indptr, rows`` of ``pattern`` as int64 NumPy arrays (no copy where they already are:
    the 100k-pose helix's rows are 115 MB, ~50 ms a copy)."""
    return (np.asarray(pattern.indptr.cpu().numpy(), dtype=np.int64),
            np.asarray(pattern.rows.cpu().numpy(), dtype=np.int64))


@_jit
def _blocks(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    n = indptr.shape[0] - 1
    out = np.empty(n + 1, dtype=np.int64)
    out[0] = 0
    count = 1
    for j in range(n - 1):
        a, b = indptr[j], indptr[j + 1]
        same = indptr[j + 2] - b == b - a
        if same:
            for e in range(b - a):
                if rows[a + e] != rows[b + e]:
                    same = False
                    break
        if not same:
            out[count] = j + 1
            count += 1
    out[count] = n
    return out[: count + 1].copy()


def block_graph(pattern: Pattern, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The block adjacency (without self loops) as CSR ``indptr (nb + 1,), indices``, from each
    block's first column (compiled: the 100k-pose helix's 2.4 M first-column entries took
    0.15-0.34 s through NumPy's searchsorted and masks)."""
    return _block_graph(*_csc(pattern), np.asarray(starts, dtype=np.int64))


@_jit
def _block_graph(indptr: np.ndarray, rows: np.ndarray,
                 starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nb = starts.shape[0] - 1
    block = np.empty(indptr.shape[0] - 1, dtype=np.int64)  # unknown -> its block
    for b in range(nb):
        block[starts[b] : starts[b + 1]] = b
    ptr = np.zeros(nb + 1, dtype=np.int64)
    first = starts[:-1]
    out = np.empty((indptr[first + 1] - indptr[first]).sum(), dtype=np.int64)
    k = 0
    for b in range(nb):
        last = -1
        for e in range(indptr[starts[b]], indptr[starts[b] + 1]):
            other = block[rows[e]]
            if other != b and other != last:  # rows sorted: equal blocks are adjacent
                out[k] = other
                last = other
                k += 1
        ptr[b + 1] = k
    return ptr, out[:k].copy()


def minimum_degree(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """A fill-reducing ordering of a symmetric graph (CSR, no self loops): minimum degree on the
    quotient graph with element absorption and AMD's approximate external degree
    (Amestoy, Davis and Duff, "An approximate minimum degree ordering algorithm", 1996), without
    supervariable detection (the graph's nodes are already blocks). Returns ``order (nb,)``:
    ``order[k]`` is the node eliminated k-th."""
    nb = indptr.shape[0] - 1
    var_adj = [set(indices[indptr[k] : indptr[k + 1]].tolist()) for k in range(nb)]
    elem_adj: list[set[int]] = [set() for _ in range(nb)]
    members: dict[int, set[int]] = {}  # live element -> its variables
    degree = [len(a) for a in var_adj]
    heap = [(d, k) for k, d in enumerate(degree)]
    heapq.heapify(heap)
    done = np.zeros(nb, dtype=bool)
    order: list[int] = []
    while heap:
        d, p = heapq.heappop(heap)
        if done[p] or d != degree[p]:
            continue
        done[p] = True
        order.append(p)
        absorbed = elem_adj[p]
        Lp = var_adj[p]
        for e in absorbed:
            Lp |= members.pop(e)
        Lp.discard(p)
        members[p] = Lp
        # |Le \ Lp| for the other elements touching Lp (AMD's w(e))
        outside: dict[int, int] = {}
        for v in Lp:
            ev = elem_adj[v]
            ev -= absorbed
            ev.add(p)
            var_adj[v] -= Lp  # edges inside Lp are now implied by element p
            var_adj[v].discard(p)
            for e in ev:
                if e != p:
                    outside[e] = outside.get(e, len(members[e])) - 1
        size = len(Lp)
        for v in Lp:
            ext = len(var_adj[v]) + size - 1
            for e in elem_adj[v]:
                if e != p:
                    ext += outside[e]
            new = min(nb - len(order) - 1, ext)
            if new != degree[v]:
                degree[v] = new
                heapq.heappush(heap, (new, v))
        var_adj[p], elem_adj[p] = set(), set()
    return np.asarray(order, dtype=np.int64)


def _cholmod_order(indptr: np.ndarray, indices: np.ndarray, method: str) -> np.ndarray:
    """CHOLMOD's ordering ``method`` (``"amd"``, ``"nesdis"``, ``"metis"``) of the graph."""
    import scipy.sparse as sp
    from sksparse.cholmod import analyze

    nb = indptr.shape[0] - 1
    # the analysis reads the structure only, and the orderings ignore the diagonal: the graph
    # as it is (adding the identity through SciPy took 0.26 of 0.42 ms at 256 blocks)
    adj = sp.csc_matrix((np.ones(indices.shape[0]), indices, indptr), shape=(nb, nb))
    return np.asarray(analyze(adj, mode="simplicial", ordering_method=method).P(), dtype=np.int64)


def block_ordering(indptr: np.ndarray, indices: np.ndarray, ordering: str) -> np.ndarray:
    """``order (nb,)``: the blocks in elimination order for one named ordering (not "auto")."""
    nb = indptr.shape[0] - 1
    if ordering == "natural":
        return np.arange(nb, dtype=np.int64)
    if ordering == "minimum_degree":
        return minimum_degree(indptr, indices)
    if ordering in ("amd", "nesdis", "metis"):
        if importlib.util.find_spec("sksparse") is None:
            raise ValueError(f"ordering {ordering!r} needs scikit-sparse (CHOLMOD); use "
                             "'minimum_degree' or install ariadne-nls[cholmod]")
        return _cholmod_order(indptr, indices, ordering)
    raise ValueError(f"unknown ordering {ordering!r}; use one of {ORDERINGS}")


@_jit
def _structure_csr(
    indptr: np.ndarray, indices: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The block structure of ``L`` for the elimination ``order`` (compiled, ``O(nnz(L))``): per
    block ``k`` (new labels) the rows below its diagonal block, sorted, as CSR ``ptr (nb + 1,),
    rows`` (``struct(k)``: ``k``'s later neighbours and its children's structures without
    ``k``), and the elimination tree ``parent[k] = min struct(k)`` (-1: a root)."""
    nb = order.shape[0]
    inv = np.empty(nb, dtype=np.int64)
    inv[order] = np.arange(nb)
    head = np.full(nb, -1, dtype=np.int64)  # children as linked lists
    nxt = np.full(nb, -1, dtype=np.int64)
    mark = np.full(nb, -1, dtype=np.int64)
    parent = np.full(nb, -1, dtype=np.int64)
    ptr = np.zeros(nb + 1, dtype=np.int64)
    rows = np.empty(max(16, 2 * indices.shape[0]), dtype=np.int64)
    for k in range(nb):
        old, start = order[k], ptr[k]
        need = indptr[old + 1] - indptr[old]
        c = head[k]
        while c >= 0:
            need += ptr[c + 1] - ptr[c]
            c = nxt[c]
        if start + need > rows.shape[0]:
            grown = np.empty(max(2 * rows.shape[0], start + need), dtype=np.int64)
            grown[:start] = rows[:start]
            rows = grown
        cnt = 0
        mark[k] = k
        for e in range(indptr[old], indptr[old + 1]):
            j = inv[indices[e]]
            if j > k and mark[j] != k:
                mark[j] = k
                rows[start + cnt] = j
                cnt += 1
        c = head[k]
        while c >= 0:
            for e in range(ptr[c], ptr[c + 1]):
                j = rows[e]
                if j > k and mark[j] != k:
                    mark[j] = k
                    rows[start + cnt] = j
                    cnt += 1
            c = nxt[c]
        rows[start : start + cnt] = np.sort(rows[start : start + cnt])
        ptr[k + 1] = start + cnt
        if cnt > 0:
            p = rows[start]
            parent[k] = p
            nxt[k] = head[p]
            head[p] = k
    return ptr, rows[: ptr[nb]].copy(), parent


@_jit
def _postorder(parent: np.ndarray) -> np.ndarray:
    """A postorder of the forest ``parent`` (children in increasing label order; compiled)."""
    nb = parent.shape[0]
    cptr = np.zeros(nb + 1, dtype=np.int64)
    for k in range(nb):
        if parent[k] >= 0:
            cptr[parent[k] + 1] += 1
    cptr = np.cumsum(cptr)
    fill = cptr.copy()
    child = np.empty(max(cptr[nb], 1), dtype=np.int64)
    for k in range(nb):
        p = parent[k]
        if p >= 0:
            child[fill[p]] = k
            fill[p] += 1
    post = np.empty(nb, dtype=np.int64)
    node = np.empty(nb, dtype=np.int64)  # the DFS stack: node and its next child
    nexti = np.empty(nb, dtype=np.int64)
    n = 0
    for r in range(nb):
        if parent[r] >= 0:
            continue
        top = 0
        node[0], nexti[0] = r, cptr[r]
        while top >= 0:
            v = node[top]
            if nexti[top] < cptr[v + 1]:
                c = child[nexti[top]]
                nexti[top] += 1
                top += 1
                node[top], nexti[top] = c, cptr[c]
            else:
                post[n] = v
                n += 1
                top -= 1
    return post


@_jit
def _relabel(ptr: np.ndarray, rows: np.ndarray, post: np.ndarray,
             relabel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR structure in the postorder: block ``i`` holds ``sort(relabel[struct[post[i]]])``."""
    nb = post.shape[0]
    out_ptr = np.zeros(nb + 1, dtype=np.int64)
    out = np.empty_like(rows)
    for i in range(nb):
        k = post[i]
        a, b = ptr[k], ptr[k + 1]
        o = out_ptr[i]
        for e in range(a, b):
            out[o + e - a] = relabel[rows[e]]
        out[o : o + b - a] = np.sort(out[o : o + b - a])
        out_ptr[i + 1] = o + b - a
    return out_ptr, out


@_jit
def _supernodes(parent: np.ndarray, first: np.ndarray, below_size: np.ndarray,
                true_sum: np.ndarray, relax_cols: np.ndarray,
                relax_zeros: np.ndarray) -> np.ndarray:
    """First blocks of the supernodes (and the end), compiled: the chain child ``k - 1 -> k`` is
    merged while CHOLMOD's relaxed amalgamation rule allows (the supernode has at most
    ``relax_cols[r]`` scalar columns and at most a ``relax_zeros[r]`` fraction of explicit zeros,
    for some ``r``)."""
    nb = parent.shape[0]
    out = np.empty(nb + 1, dtype=np.int64)
    count = 0
    for k in range(nb):
        if count > 0 and parent[k - 1] == k:
            a = out[count - 1]
            W, M = first[k + 1] - first[a], below_size[k]
            panel = W * (W + 1) // 2 + W * M
            zeros = panel - (true_sum[k + 1] - true_sum[a])
            ok = False
            for r in range(relax_cols.shape[0]):
                if W <= relax_cols[r] and zeros / panel <= relax_zeros[r]:
                    ok = True
            if ok:
                continue
        out[count] = k
        count += 1
    out[count] = nb
    return out[: count + 1].copy()


def analyze(
    pattern: Pattern,
    ordering: Ordering = "auto",
    relax: tuple[tuple[int, float], ...] = ((4, 1.0), (16, 0.8), (48, 0.1), (1 << 30, 0.05)),
) -> Symbolic:
    """The symbolic analysis of ``pattern`` (see the module docstring); ``relax``: pairs
    ``(max scalar columns, max fraction of explicit zeros)`` under which a child supernode is
    merged into its parent. ``ordering="auto"``: CHOLMOD's AMD and nested dissection when
    scikit-sparse is installed (the one with the least ``flops + LEVEL_FLOPS * depth``), else
    :func:`minimum_degree`."""
    if ordering not in ORDERINGS:
        raise ValueError(f"unknown ordering {ordering!r}; use one of {ORDERINGS}")
    if ordering != "auto":
        return analyze_each(pattern, (ordering,), relax)[0]
    have_cholmod = importlib.util.find_spec("sksparse") is not None
    candidates = ("amd", "nesdis") if have_cholmod else ("minimum_degree",)
    found = analyze_each(pattern, candidates, relax)
    return min(found, key=lambda sym: sym.flops + LEVEL_FLOPS * sym.depth)


def analyze_each(
    pattern: Pattern,
    orderings: tuple[str, ...],
    relax: tuple[tuple[int, float], ...] = ((4, 1.0), (16, 0.8), (48, 0.1), (1 << 30, 0.05)),
) -> list[Symbolic]:
    """:func:`analyze` for each named ordering (not ``"auto"``), the blocks and the block graph
    found once for all of them."""
    bad = [o for o in orderings if o not in ORDERINGS or o == "auto"]
    if bad:
        raise ValueError(f"unknown ordering {bad[0]!r}; use one of {ORDERINGS[1:]}")
    bstarts = pattern_blocks(pattern)
    gptr, gidx = block_graph(pattern, bstarts)
    return [_analyze_order(pattern, bstarts, gptr, gidx, o, relax) for o in orderings]


def _analyze_order(pattern: Pattern, bstarts: np.ndarray, gptr: np.ndarray, gidx: np.ndarray,
                   ordering: str, relax: tuple[tuple[int, float], ...]) -> Symbolic:
    """:func:`analyze` for one named ordering of the block graph ``gptr, gidx``."""
    order = block_ordering(gptr, gidx, ordering)
    nb = bstarts.shape[0] - 1
    if order.shape != (nb,) or not (np.bincount(order, minlength=nb) == 1).all():
        raise RuntimeError(f"ordering {ordering!r} did not return a permutation of the blocks")
    sptr, srows, parent = _structure_csr(gptr, gidx, order)
    post = _postorder(parent)
    relabel = np.empty_like(post)
    relabel[post] = np.arange(post.shape[0])
    order = order[post]
    sptr, srows = _relabel(sptr, srows, post, relabel)
    parent = np.where(parent[post] >= 0, relabel[np.maximum(parent[post], 0)], -1)
    size = np.diff(bstarts)[order]  # scalar width of each (new) block
    first = np.concatenate([[0], np.cumsum(size)])  # new scalar start of each block
    counts = np.diff(sptr)
    owner = np.repeat(np.arange(nb), counts)
    below_size = np.bincount(owner, weights=size[srows], minlength=nb).astype(np.int64)
    true_lower = size * (size + 1) // 2 + size * below_size
    true_sum = np.concatenate([[0], np.cumsum(true_lower)]).astype(np.int64)
    rc = np.array([c for c, _ in relax], dtype=np.int64)
    rz = np.array([z for _, z in relax], dtype=np.float64)
    sn_first_arr = _supernodes(parent, first.astype(np.int64), below_size, true_sum, rc, rz)
    num_sn = sn_first_arr.shape[0] - 1
    sn_of_block = np.repeat(np.arange(num_sn), np.diff(sn_first_arr))
    last = sn_first_arr[1:] - 1
    sn_parent = np.where(parent[last] >= 0, sn_of_block[np.maximum(parent[last], 0)], -1)
    level = _levels(sn_parent)
    # rows below each supernode: its last block's structure, expanded to scalar rows
    blocks = srows[_ranges(sptr[last], counts[last])]
    below_rows = _ranges(first[blocks], size[blocks])
    M = below_size[last]
    below_ptr = np.concatenate([[0], np.cumsum(M)]).astype(np.int64)
    starts = first[sn_first_arr]
    W = np.diff(starts)
    perm = _ranges(bstarts[:-1][order], size)
    flops = float((W**3 / 3 + M * W**2 + M**2 * W).sum())
    return Symbolic(pattern, ordering, perm, starts, below_ptr, below_rows, sn_parent, level,
                    bstarts, int(true_lower.sum()), int((W * (W + 1) // 2 + W * M).sum()), flops)


@_jit
def _levels(parent: np.ndarray) -> np.ndarray:
    """0 for leaves, else one more than the highest child (children before parents)."""
    level = np.zeros(parent.shape[0], dtype=np.int64)
    for s in range(parent.shape[0]):
        p = parent[s]
        if p >= 0 and level[s] + 1 > level[p]:
            level[p] = level[s] + 1
    return level


def _ranges(begin: np.ndarray, length: np.ndarray) -> np.ndarray:
    """``concat(arange(b, b + l) for b, l)`` (int64; compiled: NumPy's repeats and aranges
    took ~0.1 s of the 100k-pose helix's two analyses)."""
    return _ranges_kernel(np.asarray(begin, dtype=np.int64), np.asarray(length, dtype=np.int64))


@_jit
def _ranges_kernel(begin: np.ndarray, length: np.ndarray) -> np.ndarray:
    out = np.empty(length.sum(), dtype=np.int64)
    k = 0
    for i in range(begin.shape[0]):
        for j in range(length[i]):
            out[k] = begin[i] + j
            k += 1
    return out


# ---------------------------------------------------------------------------------------------
# Schedule: the index maps of the numeric phase
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Supernodes of one level padded to one size: ``G`` panels of ``Wp`` columns and ``Mp``
    rows below, stored as rows ``start : start + G * (Wp + Mp) * Wp`` of the panel buffer
    ``(T + 1, B)`` in ``(G, Wp + Mp, Wp)`` order (row ``T``: a dump for discarded updates).
    ``upd_dst (G * (top^2 + (Mp - top) * Mp),)``: where each entry of the update is subtracted
    (``T`` for the upper triangle and the padding), the update being computed as the products
    ``(G, top, top)`` (rows ``[0, top)`` against themselves) and ``(G, Mp - top, Mp)``
    (``top = 0``: one product). Into the solve vector ``(B, n + 2)`` (original unknowns; ``n``
    reads 0, ``n + 1`` is written and never read): ``cols_read, cols_write (G * Wp,)``,
    ``below_read, below_write (G * Mp,)``. ``supernodes (G,)``: which supernodes (for error
    messages)."""

    G: int
    Wp: int
    Mp: int
    top: int
    start: int
    upd_dst: Tensor
    cols_read: Tensor
    cols_write: Tensor
    below_read: Tensor
    below_write: Tensor
    supernodes: np.ndarray

    def to(self, device: torch.device) -> Group:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        return Group(**moved)


@dataclass(frozen=True, eq=False)
class Schedule:
    """The numeric plan for one pattern, batch size and device: ``l_src (T + 1,)`` fills the panel
    buffer from the damped values, transposed and extended by a row of zeros and a row of ones
    (``(nnz + 2, B)``); ``groups`` in processing order (levels ascending); ``sn_start`` per group
    member in that order, the original unknown at which its supernode starts."""

    pattern: Pattern
    symbolic: Symbolic
    l_src: Tensor
    groups: tuple[Group, ...]
    sn_start: Tensor

    _work: dict = field(default_factory=dict, repr=False)

    def to(self, device: torch.device) -> Schedule:
        return Schedule(self.pattern, self.symbolic, self.l_src.to(device),
                        tuple(g.to(device) for g in self.groups), self.sn_start.to(device))

    def workspace(self, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Reused buffers: the transposed values ``(nnz + 2, B)`` (last rows 0 and 1) and the
        panel buffer ``(T + 1, B)``. Reused because fresh pages of tensors this large (over
        glibc's mmap threshold) cost a page fault each at every allocation; a factor keeps its
        own blocks, never these."""
        if dtype not in self._work:
            nnz, device = self.pattern.nnz, self.l_src.device
            At = torch.zeros(nnz + 2, batch, dtype=dtype, device=device)
            At[nnz + 1] = 1.0
            buf = torch.empty(self.l_src.shape[0], batch, dtype=dtype, device=device)
            self._work[dtype] = (At, buf)
        return self._work[dtype]


def group_level(
    W: np.ndarray, M: np.ndarray, batch: int, slack: float, call_flops: float
) -> list[np.ndarray]:
    """Partition one level's supernodes (widths ``W``, rows below ``M``) into padded groups.
    Largest first, each supernode joins the first group it fits in whose padded cost is at most
    ``1 + slack`` times its own, else opens a group; then, while merging two groups (padded to
    the larger of both sizes) wastes fewer than ``call_flops`` multiply-adds over the batch
    (about what a group's torch calls cost), the cheapest such pair is merged."""

    def cost(w: int, m: int) -> float:
        return w**3 / 3 + m * w * w + m * m * w

    Ws, Ms = W.tolist(), M.tolist()
    order = sorted(range(len(Ws)), key=lambda s: -cost(Ws[s], Ms[s]))
    members: list[list[int]] = []
    pads: list[tuple[int, int]] = []
    for s in order:
        w, m = Ws[s], Ms[s]
        own = cost(w, m)
        for g, (wp, mp) in enumerate(pads):
            if wp >= w and mp >= m and cost(wp, mp) <= (1 + slack) * own:
                members[g].append(s)
                break
        else:
            members.append([s])
            pads.append((w, m))
    while len(members) > 1:
        best, pair = call_flops / batch, None
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                wp, mp = max(pads[a][0], pads[b][0]), max(pads[a][1], pads[b][1])
                waste = (len(members[a]) + len(members[b])) * cost(wp, mp)
                waste -= len(members[a]) * cost(*pads[a]) + len(members[b]) * cost(*pads[b])
                if waste <= best:
                    best, pair = waste, (a, b, wp, mp)
        if pair is None:
            break
        a, b, wp, mp = pair
        members[a] += members.pop(b)
        pads.pop(b)
        pads[a] = (wp, mp)
    return [np.asarray(m, dtype=np.int64) for m in members]


def build_schedule(sym: Symbolic, batch: int, slack: float, call_flops: float) -> Schedule:
    """Index maps for ``sym`` (see :class:`Group`); computed on the CPU."""
    n, nnz = sym.pattern.n, sym.pattern.nnz
    starts, below = sym.starts, sym.below
    W = np.diff(starts)
    M = np.array([b.shape[0] for b in below], dtype=np.int64)
    num_sn = W.shape[0]
    parts = []
    for lev in range(sym.depth):
        members = np.nonzero(sym.level == lev)[0]
        parts += [members[p] for p in group_level(W[members], M[members], batch, slack,
                                                   call_flops)]
    # each supernode's place in the buffer: panel origin and padded width
    base, Wpad = np.zeros(num_sn, dtype=np.int64), np.zeros(num_sn, dtype=np.int64)
    pads, start = [], 0
    for sns in parts:
        Wp, Mp = int(W[sns].max()), int(M[sns].max())
        base[sns] = start + np.arange(sns.shape[0]) * (Wp + Mp) * Wp
        Wpad[sns] = Wp
        pads.append((Wp, Mp, start))
        start += sns.shape[0] * (Wp + Mp) * Wp
    total = start
    # (supernode, new row) -> row within its stored panel, by one sorted key per panel row
    keys = np.concatenate([s * n + np.concatenate([np.arange(starts[s], starts[s + 1]), below[s]])
                           for s in range(num_sn)])
    key_start = np.concatenate([[0], np.cumsum(W + M)])

    def position(t: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        local = np.searchsorted(keys, t * n + row) - key_start[t]
        padded = np.where(local < W[t], local, local - W[t] + Wpad[t])
        return base[t] + padded * Wpad[t] + (col - starts[t])

    inv = np.empty(n, dtype=np.int64)
    inv[sym.perm] = np.arange(n)
    p_rows = inv[sym.pattern.rows.cpu().numpy()]
    p_cols = inv[sym.pattern.cols.cpu().numpy()]
    lower = np.nonzero(p_rows >= p_cols)[0]
    sn_of = np.repeat(np.arange(num_sn), W)  # new column -> supernode
    l_src = np.full(total + 1, nnz, dtype=np.int64)  # padding, upper triangle, dump: 0
    l_src[position(sn_of[p_cols[lower]], p_rows[lower], p_cols[lower])] = lower
    groups = []
    for sns, (Wp, Mp, start) in zip(parts, pads):
        a = np.arange(Wp)
        pad = (a[None, :] >= W[sns][:, None]).nonzero()  # identity on the padded diagonal
        l_src[base[sns[pad[0]]] + pad[1] * (Wp + 1)] = nnz + 1
        # split the update where the skipped quarter of its product outweighs the extra calls
        split = Mp >= SPLIT_FROM and batch * sns.shape[0] * Mp * Mp * Wp / 4 >= call_flops
        groups.append(_group(sns, sym, Wp, Mp, start, total, position, split))
    sns = np.concatenate(parts + [np.zeros(1, dtype=np.int64)])
    sn_start = torch.from_numpy(sym.perm[starts[sns]])  # per group member (and a spare)
    return Schedule(sym.pattern, sym, torch.from_numpy(l_src), tuple(groups), sn_start)


def _group(sns: np.ndarray, sym: Symbolic, Wp: int, Mp: int, start: int, dump: int,
           position, split: bool) -> Group:
    """The index maps of one padded group of supernodes ``sns``."""
    n, G = sym.pattern.n, sns.shape[0]
    W, M = np.diff(sym.starts)[sns], np.array([sym.below[s].shape[0] for s in sns])
    upd = np.full((G, Mp, Mp), dump, dtype=np.int64)
    # the lower entries (p >= q) of every member's update, all members at once
    tril = {m: np.tril_indices(m) for m in set(M.tolist()) if m}
    parts = [(g, tril[m], sym.below[s]) for g, (s, m) in enumerate(zip(sns.tolist(), M.tolist()))
             if m]
    if parts:
        gi = np.concatenate([np.full(t[0].shape[0], g) for g, t, _ in parts])
        p = np.concatenate([t[0] for _, t, _ in parts])
        q = np.concatenate([t[1] for _, t, _ in parts])
        row_p = np.concatenate([rows[t[0]] for _, t, rows in parts])
        row_q = np.concatenate([rows[t[1]] for _, t, rows in parts])
        tgt = np.searchsorted(sym.starts, row_q, side="right") - 1
        upd[gi, p, q] = position(tgt, row_p, row_q)
    # the update is computed as two products, rows [0, top) against themselves and rows
    # [top, Mp) against all: the strictly upper block of [0, top) x [top, Mp) is never formed
    top = Mp // 2 if split else 0
    upd = np.concatenate([upd[:, :top, :top].reshape(-1), upd[:, top:, :].reshape(-1)])
    a, b = np.arange(Wp)[None, :], np.arange(Mp)[None, :]
    col_ok = a < W[:, None]
    cols = np.where(col_ok, sym.perm[np.minimum(sym.starts[sns][:, None] + a, n - 1)], n)
    below = np.full((G, Mp), n, dtype=np.int64)
    for g, s in enumerate(sns.tolist()):
        below[g, : M[g]] = sym.perm[sym.below[s]]
    below_ok = b < M[:, None]

    def t(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64).reshape(-1))

    return Group(G, Wp, Mp, top, start, t(upd), t(cols), t(np.where(col_ok, cols, n + 1)), t(below),
                 t(np.where(below_ok, below, n + 1)), sns)


# ---------------------------------------------------------------------------------------------
# Numeric factorization and solves
# ---------------------------------------------------------------------------------------------


@dataclass
class SupernodalFactor:
    """The factor of ``B`` damped matrices: per group the padded ``L11 (B, G, Wp, Wp)`` and
    ``L21 (B, G, Mp, Wp)``. ``ok (B,)``: False where the matrix was not numerically positive
    definite or not finite (its solutions are zeros); ``pivot (B,)``: the original unknown at
    which the first failed supernode starts (-1 where ok)."""

    schedule: Schedule
    blocks: list[tuple[Tensor, Tensor]]
    ok: Tensor
    pivot: Tensor

    def solve(self, b: Tensor) -> Tensor:
        """``A^-1 b`` for ``b (B, n)``; returns ``(B, n)`` in ``b``'s dtype."""
        sched, n = self.schedule, self.schedule.pattern.n
        if b.ndim != 2 or b.shape[1] != n or b.shape[0] != self.ok.shape[0]:
            raise ValueError(f"supernodal solve: b has shape {tuple(b.shape)}, expected "
                             f"({self.ok.shape[0]}, {n})")
        L0 = self.blocks[0][0] if self.blocks else None
        dtype = L0.dtype if L0 is not None else b.dtype
        batch = b.shape[0]
        y = torch.cat([b.detach().to(dtype), b.new_zeros(batch, 2, dtype=dtype)], dim=1)
        for g, (L11, L21) in zip(sched.groups, self.blocks):
            rhs = y[:, g.cols_read].view(batch, g.G, g.Wp, 1)
            ys = torch.linalg.solve_triangular(L11, rhs, upper=False)
            y.index_copy_(1, g.cols_write, ys.view(batch, -1))
            if g.Mp:
                y.index_add_(1, g.below_write, (L21 @ ys).view(batch, -1), alpha=-1)
        for g, (L11, L21) in zip(reversed(sched.groups), reversed(self.blocks)):
            rhs = y[:, g.cols_read].view(batch, g.G, g.Wp, 1)
            if g.Mp:
                rhs = rhs - L21.mT @ y[:, g.below_read].view(batch, g.G, g.Mp, 1)
            xs = torch.linalg.solve_triangular(L11.mT, rhs, upper=True)
            y.index_copy_(1, g.cols_write, xs.view(batch, -1))
        x = torch.where(self.ok[:, None], y[:, :n], 0.0)
        return x.to(b.dtype)

    def failures(self) -> dict[int, str]:
        """Per failed batch element, why (e.g. ``{2: "batch element 2: not positive definite
        (pivot in the supernode starting at unknown 37)"}``); empty when all are ok."""
        bad = torch.nonzero(~self.ok).flatten().tolist()
        pivots = self.pivot.tolist()
        out = {}
        for k in bad:
            where = (f" (pivot in the supernode starting at unknown {pivots[k]})"
                     if pivots[k] >= 0 else " (a value is not finite)")
            out[k] = f"batch element {k}: not positive definite{where}"
        return out


@dataclass
class SupernodalCholesky:
    """Batched supernodal sparse Cholesky in torch (any device); see the module docstring.

    Fields:
        ordering: the block ordering: ``"auto"`` (see :func:`analyze`), CHOLMOD's ``"amd"``,
            ``"nesdis"`` or ``"metis"`` (scikit-sparse), ``"minimum_degree"`` (written here, no
            dependency) or ``"natural"``.
        relax: relaxed amalgamation, pairs (max scalar columns, max zero fraction).
        slack: a supernode joins a padded group if the padded cost is at most ``1 + slack``
            times its own (or the waste is under ``call_flops``).
        call_flops: multiply-adds over the whole batch that a group's torch calls are worth.
    """

    ordering: Ordering = "auto"
    relax: tuple[tuple[int, float], ...] = ((4, 1.0), (16, 0.8), (48, 0.1), (1 << 30, 0.05))
    slack: float = 0.1
    call_flops: float = 5e5
    _symbolic: PlanCache = field(default_factory=PlanCache, repr=False)
    _schedules: PlanCache = field(default_factory=PlanCache, repr=False)

    def __post_init__(self) -> None:
        if self.ordering not in ORDERINGS:
            raise ValueError(f"unknown ordering {self.ordering!r}; use one of {ORDERINGS}")
        if self.slack < 0 or self.call_flops < 0:
            raise ValueError(f"slack and call_flops must be >= 0, got {self.slack}, "
                             f"{self.call_flops}")

    def symbolic(self, pattern: Pattern) -> Symbolic:
        """The symbolic analysis of ``pattern``, computed once and cached."""
        sym = self._symbolic.lookup((id(pattern),), pattern)
        if sym is None:
            sym = self._symbolic.store((id(pattern),), analyze(pattern, self.ordering, self.relax))
        return sym

    def schedule(self, pattern: Pattern, batch: int, device: torch.device) -> Schedule:
        """The numeric plan for ``pattern``, ``batch`` and ``device`` (cached)."""
        key = (id(pattern), batch, device)
        sched = self._schedules.lookup(key, pattern)
        if sched is None:
            sched = build_schedule(self.symbolic(pattern), batch, self.slack, self.call_flops)
            sched = sched.to(device)
            self._schedules.store(key, sched)
        return sched

    def factor(self, H: Tensor, pattern: Pattern, damping: Tensor) -> SupernodalFactor:
        """Factor ``H (B, nnz) + diag(damping (B, n))`` for all ``B`` elements together."""
        if H.ndim != 2 or H.shape[1] != pattern.nnz:
            raise ValueError(f"supernodal: H has shape {tuple(H.shape)}, expected (B, "
                             f"{pattern.nnz}) for this pattern")
        if damping.shape != (H.shape[0], pattern.n):
            raise ValueError(f"supernodal: damping has shape {tuple(damping.shape)}, expected "
                             f"({H.shape[0]}, {pattern.n})")
        if H.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"supernodal: dtype {H.dtype} is not supported (float32, float64)")
        H, damping = H.detach(), damping.detach().to(H.dtype)
        batch = H.shape[0]
        sched = self.schedule(pattern, batch, H.device)
        # a NaN or inf anywhere makes a sum non-finite
        finite = torch.isfinite(H.sum(-1) + damping.sum(-1))
        At, buf = sched.workspace(batch, H.dtype)
        At[: pattern.nnz].copy_(H.T)  # H + diag(damping), transposed: batch last
        At.index_add_(0, pattern.diag, damping.T)
        # the panel buffer, batch last: gathers and scatters move rows of B values
        torch.index_select(At, 0, sched.l_src, out=buf)  # the padded panels, then a dump
        blocks, infos = [], []
        on_cpu = H.device.type == "cpu"
        for g in sched.groups:
            Hp, size = g.Wp + g.Mp, g.G * (g.Wp + g.Mp) * g.Wp
            # one blocked transpose to batch-first: the linear algebra then reads contiguous
            # matrices (reading the batch-last panels directly gathers across cache lines)
            P = buf[g.start : g.start + size].T.contiguous().view(batch, g.G, Hp, g.Wp)
            L11, info = torch.linalg.cholesky_ex(P[:, :, : g.Wp])
            # a failed element's blocks become the identity: its later blocks stay finite (on
            # the CPU only when one failed: there the check costs no device synchronization)
            if not on_cpu or bool(info.any()):
                L11 = torch.where((info == 0)[..., None, None], L11, _eye(g.Wp, L11))
            L21 = torch.linalg.solve_triangular(L11.mT, P[:, :, g.Wp :], upper=True, left=False)
            if g.Mp:
                buf.scatter_add_(0, g.upd_dst[:, None].expand(-1, batch), _update(L21, g.top))
            blocks.append((L11, L21))
            infos.append(info)
        info = torch.cat(infos, dim=1) if infos else H.new_zeros(batch, 0, dtype=torch.int32)
        failed = info != 0
        first = torch.argmax(failed.to(torch.int32), dim=1)  # first failed supernode, in order
        start = sched.sn_start[first]
        ok = finite & ~failed.any(1)
        pivot = torch.where(ok | ~finite, -1, start)
        return SupernodalFactor(sched, blocks, ok, pivot)


def _update(L21: Tensor, top: int) -> Tensor:
    """``-L21 L21^T`` of ``L21 (B, G, Mp, Wp)``, batch last: ``(G * top * top + G * (Mp - top) *
    Mp, B)``, the rows ``[0, top)`` against themselves, then the others against all (the upper
    block ``[0, top) x [top, Mp)`` is not needed: the factor takes the lower triangle)."""
    batch, G, Mp, _ = L21.shape
    minus = L21.neg()
    low = L21[:, :, top:] @ minus.mT  # (B, G, Mp - top, Mp)
    if top == 0:
        return low.view(batch, -1).T.contiguous()  # a blocked 2-D transpose
    out = L21.new_empty(G * (top * top + (Mp - top) * Mp), batch)
    k = G * top * top
    out[:k].copy_((L21[:, :, :top] @ minus[:, :, :top].mT).view(batch, -1).T)
    out[k:].copy_(low.view(batch, -1).T)
    return out


def _eye(k: int, like: Tensor) -> Tensor:
    return torch.eye(k, dtype=like.dtype, device=like.device)
