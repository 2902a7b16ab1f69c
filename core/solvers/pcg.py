"""Block-Jacobi preconditioned conjugate gradient in torch: batched, any device, matrix-free.

Algorithm: PCG as in Saad, *Iterative Methods for Sparse Linear Systems* (2003), Alg. 9.1, with
the block-Jacobi preconditioner ``M = blockdiag(A_11, ..., A_KK)`` whose blocks are the diagonal
blocks of the damped matrix ``A = H + diag(damping)`` on each variable element (Saad sec. 10.2).
Products ``A p`` use ``Pattern.matvec``; the block index maps are computed once per pattern.

Every batch element runs its own CG: an element stops moving (its step size is set to 0) once
``||r|| <= tol ||b||``; the loop ends when all elements have converged (tested on the host only
every ``check_every`` iterations) or after ``max_iters``. Elements that did not converge, whose
curvature ``p^T A p`` became non-positive, or whose diagonal blocks are not positive definite get
``ok = False``, so the optimizer rejects their step rather than taking an inaccurate one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from core.objective import Objective, Pattern
from core.solvers.base import damped


@dataclass(frozen=True)
class BlockMaps:
    """Block-Jacobi index maps for one pattern, one entry per distinct block size ``d``.

    ``columns[k] (K, d)``: global columns of the ``K`` blocks of size ``d``;
    ``positions[k] (K, d, d)``: where entry ``(a, b)`` of each block lives in the pattern values
    (``nnz`` where the pattern has no such entry; it is read as 0).
    """

    columns: tuple[Tensor, ...]
    positions: tuple[Tensor, ...]


def block_sizes_of(objective: Objective) -> list[int]:
    """One block per variable element, in the objective's unknown order."""
    return [v.space.dof for v in objective.variables for _ in range(v.count)]


def infer_block_sizes(pattern: Pattern, max_block: int = 16) -> list[int]:
    """Blocks from the structure alone: maximal runs of adjacent columns with identical row sets
    (the columns of one variable element always share their rows), split at ``max_block``."""
    indptr = pattern.indptr.cpu().numpy()
    rows = pattern.rows.cpu().numpy()
    counts = np.diff(indptr)
    n = pattern.n
    same = np.zeros(max(n - 1, 0), dtype=bool)
    cand = np.nonzero(counts[:-1] == counts[1:])[0]  # columns c with count(c) == count(c + 1)
    if cand.size:  # compare column c's rows with column c + 1's, entry by entry
        lengths = counts[cand]
        seg = np.cumsum(lengths) - lengths
        entry = np.repeat(indptr[cand] - seg, lengths) + np.arange(lengths.sum())
        equal = rows[entry] == rows[entry + np.repeat(lengths, lengths)]
        same[cand] = np.logical_and.reduceat(equal, seg)
    sizes, run = [], 1
    for c in range(n - 1):
        if same[c] and run < max_block:
            run += 1
        else:
            sizes.append(run)
            run = 1
    sizes.append(run)
    return sizes


def build_block_maps(pattern: Pattern, block_sizes: Sequence[int]) -> BlockMaps:
    """Index maps of the diagonal blocks (see :class:`BlockMaps`); ``sum(block_sizes) == n``."""
    sizes = np.asarray(block_sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 1).any() or int(sizes.sum()) != pattern.n:
        raise ValueError(f"PCG: block sizes must be positive and sum to n = {pattern.n}, got "
                         f"{len(sizes)} blocks summing to {int(sizes.sum())}")
    starts = np.cumsum(sizes) - sizes
    n, nnz = pattern.n, pattern.nnz
    keys = (pattern.cols * n + pattern.rows).cpu()  # sorted: the pattern is in CSC order
    columns, positions = [], []
    for d in np.unique(sizes):
        first = torch.from_numpy(starts[sizes == d])
        cols = first[:, None] + torch.arange(int(d))  # (K, d)
        want = (cols[:, None, :] * n + cols[:, :, None]).reshape(-1)  # entry (a, b): col b, row a
        pos = torch.searchsorted(keys, want).clamp_max(nnz - 1)
        pos = torch.where(keys[pos] == want, pos, torch.full_like(pos, nnz))
        columns.append(cols.to(pattern.rows.device))
        positions.append(pos.view(-1, int(d), int(d)).to(pattern.rows.device))
    return BlockMaps(tuple(columns), tuple(positions))


@dataclass
class PCGFactor:
    """The damped matrix and its block-Jacobi preconditioner for ``B`` elements.

    ``values (B, nnz)``: ``H + diag(damping)``; ``inverses[k] (B, K, d, d)``: inverted diagonal
    blocks; ``blocks_ok (B,)``: all diagonal blocks positive definite. ``converged (B,)`` and
    ``iterations (B,)`` describe the most recent :meth:`solve` (before any: True and 0);
    ``ok = blocks_ok & converged``.
    """

    values: Tensor
    pattern: Pattern
    maps: BlockMaps
    inverses: tuple[Tensor, ...]
    blocks_ok: Tensor
    tol: float
    max_iters: int
    check_every: int
    converged: Tensor = field(init=False)
    iterations: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.converged = torch.ones_like(self.blocks_ok)
        self.iterations = torch.zeros(self.blocks_ok.shape, dtype=torch.long,
                                      device=self.blocks_ok.device)

    @property
    def ok(self) -> Tensor:
        """``(B,)``: positive definite blocks and a converged last solve."""
        return self.blocks_ok & self.converged

    def precondition(self, r: Tensor) -> Tensor:
        """``M^-1 r`` for ``r (B, n)``."""
        z = torch.zeros_like(r)
        for cols, inv in zip(self.maps.columns, self.inverses):
            zk = (inv @ r[:, cols][..., None])[..., 0]  # (B, K, d)
            z = z.index_copy(1, cols.reshape(-1), zk.reshape(r.shape[0], -1))
        return z

    def solve(self, b: Tensor) -> Tensor:
        """Solve ``A x = b`` for ``b (B, n)`` by PCG from ``x = 0``; updates ``converged`` and
        ``iterations``. Elements that are not ``ok`` return finite but meaningless ``x``."""
        A, pattern = self.values, self.pattern
        x = torch.zeros_like(b)
        r = b
        threshold = (self.tol * torch.linalg.vector_norm(b, dim=-1)) ** 2
        done = (r * r).sum(-1) <= threshold
        broken = torch.zeros_like(done)
        z = self.precondition(r)
        p, rz = z, (r * z).sum(-1)
        iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        for it in range(self.max_iters):
            if it % self.check_every == 0 and bool((done | broken).all()):
                break
            Ap = pattern.matvec(A, p)
            pAp = (p * Ap).sum(-1)
            active = ~done & ~broken
            broken = broken | (active & ~(pAp > 0))  # also catches NaN
            active = active & (pAp > 0)
            alpha = torch.where(active, rz / torch.where(active, pAp, 1.0), 0.0)
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * Ap
            iterations = iterations + active.long()
            done = done | (active & ((r * r).sum(-1) <= threshold))
            z = self.precondition(r)
            rz_new = (r * z).sum(-1)
            beta = torch.where(active, rz_new / torch.where(active, rz, 1.0), 0.0)
            p = z + beta[:, None] * p
            rz = rz_new
        self.converged = done & ~broken
        self.iterations = iterations
        return torch.where(self.ok[:, None], x, torch.zeros_like(x))


class PCG:
    """Block-Jacobi preconditioned conjugate gradient (any device); see the module docstring.

    Args:
        objective: gives the blocks: one per variable element (preferred).
        block_sizes: or the block sizes explicitly, in unknown order, summing to ``n``.
            With neither, blocks are inferred from the pattern (:func:`infer_block_sizes`).
        tol: relative residual ``||b - A x|| / ||b||`` at which an element has converged.
            Reachable values depend on the dtype and conditioning (float32: about 1e-5 at best).
        max_iters: iteration cap; elements not converged by then are reported ``ok = False``.
        check_every: iterations between host-side "all converged?" checks (the only syncs).
    """

    def __init__(
        self,
        objective: Objective | None = None,
        *,
        block_sizes: Sequence[int] | None = None,
        tol: float = 1e-8,
        max_iters: int = 1000,
        check_every: int = 10,
    ) -> None:
        if objective is not None and block_sizes is not None:
            raise ValueError("PCG: give objective or block_sizes, not both")
        if not tol > 0 or max_iters < 1 or check_every < 1:
            raise ValueError(f"PCG: need tol > 0, max_iters >= 1, check_every >= 1; got tol={tol}, "
                             f"max_iters={max_iters}, check_every={check_every}")
        self.block_sizes = None if block_sizes is None else [int(s) for s in block_sizes]
        if objective is not None:
            self.block_sizes = block_sizes_of(objective)
        self.tol, self.max_iters, self.check_every = tol, max_iters, check_every
        self._maps: dict[int, tuple[Pattern, BlockMaps]] = {}

    def __repr__(self) -> str:
        return f"PCG(tol={self.tol}, max_iters={self.max_iters}, check_every={self.check_every})"

    def block_maps(self, pattern: Pattern) -> BlockMaps:
        """The block index maps of ``pattern`` (computed on first use, then cached)."""
        cached = self._maps.get(id(pattern))
        if cached is None or cached[0] is not pattern:
            sizes = self.block_sizes or infer_block_sizes(pattern)
            cached = (pattern, build_block_maps(pattern, sizes))
            self._maps[id(pattern)] = cached
        return cached[1]

    def factor(self, H: Tensor, pattern: Pattern, damping: Tensor) -> PCGFactor:
        """Damp ``H (B, nnz)`` with ``damping (B, n)`` and invert its diagonal blocks."""
        maps = self.block_maps(pattern)
        values = damped(H, pattern, damping)
        padded = torch.cat([values, values.new_zeros(values.shape[0], 1)], dim=1)
        inverses, ok = [], torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
        for pos in maps.positions:
            blocks = padded[:, pos]  # (B, K, d, d)
            L, info = torch.linalg.cholesky_ex(blocks)
            good = info == 0
            ok = ok & good.all(-1)
            eye = torch.eye(pos.shape[-1], dtype=values.dtype, device=values.device)
            inverses.append(torch.cholesky_inverse(torch.where(good[..., None, None], L, eye)))
        return PCGFactor(values, pattern, maps, tuple(inverses), ok, self.tol, self.max_iters,
                         self.check_every)
