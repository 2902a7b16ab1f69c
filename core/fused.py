"""When and how a cost is linearized by a compiled kernel (``core._kernels``) instead of torch.

A library cost names its kernel (``Cost.kernel``: ``"between_se3"``, ``"prior_se3"``,
``"between_se2"``, ``"prior_se2"``, ``"reprojection_bal"``). ``linearize`` uses the kernel when
:func:`applies`: Numba is installed, every tensor the cost reads (its robust loss's scale too) is
a float64 CPU tensor, and autograd needs no gradient through it (grad mode off, or nothing it
reads requires grad). Everywhere else (GPU, float32, unroll/implicit backward, custom costs) the
torch path runs: it is the reference, and the kernels compute the same numbers.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from core import _kernels, parallel
from core.cost import Cost

log = logging.getLogger(__name__)

KERNELS = ("between_se3", "prior_se3", "between_se2", "prior_se2", "reprojection_bal")
_NO_U = np.zeros((1, 1, 1, 1))
_NO_GROUPS = np.zeros(0, np.int64)
# (storage size, tangent size) of each slot's variable, per kernel
_SLOTS = {
    "between_se3": ((7, 6), (7, 6)),
    "prior_se3": ((7, 6),),
    "between_se2": ((4, 3), (4, 3)),
    "prior_se2": ((4, 3),),
    "reprojection_bal": ((7, 6), (3, 3), (3, 3)),
}


_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _inputs(cost: Cost) -> tuple[bool, list[Tensor]]:
    """Whether the cost's own tensors (indices, aux, weights) are all CPU and float64 (a 0-dim
    weight of any float dtype), kept per cost, and those tensors (``requires_grad`` can change in
    place, so it is read at every call)."""
    hit = _INPUTS.get(cost)
    if hit is not None:
        return hit
    scale = None if cost.loss is None else cost.loss.scale
    tensors = list(cost.aux.values()) + [t for t in (cost.weight, cost.sqrt_info, scale)
                                         if isinstance(t, Tensor)]
    usable = all(
        t.device.type == "cpu" and (t.dtype == torch.float64 or (t.ndim == 0 and
                                                                 t.is_floating_point()))
        for t in tensors
    ) and all(i.device.type == "cpu" for i in cost.index)
    _INPUTS[cost] = (usable, tensors)
    return usable, tensors


def applies(cost: Cost, values: Mapping[str, Tensor]) -> bool:
    """Whether ``cost`` can be linearized by its kernel at ``values`` (see the module doc)."""
    if cost.kernel is None or not _kernels.AVAILABLE:
        return False
    usable, tensors = _inputs(cost)
    if not usable:
        return False
    grad = torch.is_grad_enabled()
    if grad:
        for t in tensors:  # a loop, not any(<generator>): no Python call per tensor
            if t.requires_grad:
                return False
    for v in cost.optimized:
        x = values[v.name]
        if x.device.type != "cpu" or x.dtype != torch.float64 or (grad and x.requires_grad):
            return False
    scale = None if cost.loss is None else cost.loss.scale
    if isinstance(scale, Tensor) and scale.ndim:  # (B|1,) or (B|1, E|1), as the kernel reads it
        batch = values[cost.optimized[0].name].shape[0]
        if scale.ndim > 2 or scale.shape[0] not in (1, batch) or (
                scale.ndim == 2 and scale.shape[1] not in (1, cost.num_factors)):
            return False
    return True


def _array(t: Tensor) -> np.ndarray:
    a = t.detach().numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _lead(t: Tensor, ndim: int) -> np.ndarray:
    """``t`` with leading singleton dimensions up to ``ndim``, as a float64 array."""
    t = t.detach().to(torch.float64)
    return _array(t.reshape((1,) * (ndim - t.ndim) + tuple(t.shape)))


@functools.cache
def prepare(kind: str) -> float:
    """Load kernel ``kind``'s compiled code (from Numba's disk cache, or compile it: seconds, once
    per installation) by running it on a one-factor problem; returns the seconds it took.

    Cost constructors call this, once per kernel and process, so the first solve pays nothing
    for it (``bench`` reports it as part of the set-up; loading from the cache takes 0.3-0.9 s
    in a fresh process, most of it Numba importing its own registries)."""
    if not _kernels.AVAILABLE:
        return 0.0
    if kind not in _SLOTS:
        raise ValueError(f"unknown kernel {kind!r}; known: {KERNELS}")
    start = time.perf_counter()
    D = sum(dof for _, dof in _SLOTS[kind])
    xs = [np.zeros((1, 2, storage)) for storage, _ in _SLOTS[kind]]
    for x in xs:  # identities (unit rotation parts), points in front of the camera
        x[..., -1] = 1.0
        if x.shape[-1] == 4:
            x[..., 2], x[..., 3] = 1.0, 0.0
    index = [np.array([0], np.int64), np.array([1], np.int64), np.array([0], np.int64)]
    aux = np.ones((1, 1, 2)) if kind == "reprojection_bal" else xs[0][:, :1].copy()
    top, rowmap = np.zeros((1, 1, D), np.int64), np.zeros((2, D), np.int64)
    col = np.zeros((1, D), np.int64)
    tail = (_NO_U, False, np.ones((1, 1, 1)), top, rowmap, col, np.zeros((1, 1)), np.zeros((1, 1)),
            np.zeros((1, 1)), 0, np.ones((1, 1)), _NO_GROUPS)
    _call(kind, xs, index[: len(xs)], aux, tail)
    retract = _kernels.se2_retract if xs[0].shape[-1] == 4 else _kernels.se3_retract
    retract(xs[0], np.zeros((1, 2, _SLOTS[kind][0][1])), np.empty_like(xs[0]))
    one = np.ones(1, np.int64)  # the pattern's rows (Objective._cpu_pattern): a 1 x 1 pattern
    _kernels.csc_block_rows(one - 1, one, one - 1, np.array([0, 1]), np.array([0, 1]),
                            np.empty(1, np.int64))
    # the factor split's helpers (_by_factor): loading them inside a first solve's threaded
    # linearization took 24 ms on a pool thread, holding the GIL the calling thread waited for
    _renumber(np.zeros((1, 1, 1), np.int64), np.zeros((2, 1), np.int64), np.zeros((1, 1),
              np.int64), 1, 1)
    _scatter_add(np.zeros(1), one - 1, np.zeros(1))
    seconds = time.perf_counter() - start
    log.debug("kernel %s ready in %.3f s", kind, seconds)
    return seconds


def _call(kind: str | None, xs: list[np.ndarray], index: list[np.ndarray], aux: np.ndarray,
          tail: tuple) -> None:
    if kind in ("between_se3", "between_se2"):
        fn = _kernels.se3_between if kind == "between_se3" else _kernels.se2_between
        fn(xs[0], xs[1], index[0], index[1], aux, *tail)
    elif kind in ("prior_se3", "prior_se2"):
        fn = _kernels.se3_prior if kind == "prior_se3" else _kernels.se2_prior
        fn(xs[0], index[0], aux, *tail)
    elif kind == "reprojection_bal":
        _kernels.bal_reprojection(*xs, *index, aux, *tail)
    else:
        raise ValueError(f"unknown kernel {kind!r}; known: {KERNELS}")


def accumulate(
    cost: Cost,
    values: Mapping[str, Tensor],
    tops: tuple[Tensor, Tensor],
    columns: Tensor,
    H: Tensor,
    g: Tensor,
    total: Tensor,
    groups: Tensor | None = None,
) -> None:
    """Add ``cost``'s ``J^T J`` into ``H (B, nnz)``, ``J^T r`` into ``g (B, n)`` and its cost into
    ``total (B,)`` in place (CPU float64 tensors; ``tops`` (``(E, k, D)``, ``(2, D)``: see
    ``Pattern.tops``) and ``columns (E, D)`` the pattern's maps for this cost); with ``groups
    (E,)``, each factor's problem of a ragged batch (``Grouping.factors``), into ``total (B,
    P)`` per problem, in the same one call.

    On the free cores (``core.parallel``) when the work is large enough (:data:`SECONDS`,
    :data:`MIN_CHUNK`): a batch by batch elements (each thread its own rows of ``H``, ``g`` and
    the cost: the same numbers as one call, bit for bit), one problem by factors
    (:func:`_by_factor`: equal up to the order of the sums)."""
    xs = [_array(values[v.name]) for v in cost.optimized]
    index, aux, static, loss = _static(cost, tops, columns)
    cost_out = total.numpy().reshape(total.shape[0], -1)
    grp = _NO_GROUPS if groups is None else _array(groups)
    H_, g_ = H.numpy(), g.numpy()
    batch, num = xs[0].shape[0], index[0].shape[0]
    k = parallel.threads(batch * num * SECONDS.get(cost.kernel or "", 1e-6), MIN_CHUNK,
                         batch if batch > 1 else num // MIN_FACTORS)
    if k == 1:
        _call(cost.kernel, xs, index, aux, (*static, H_, g_, cost_out, *loss, grp))
    elif batch > 1:
        _by_batch(cost.kernel, k, xs, index, aux, static, loss, grp, (H_, g_, cost_out))
    else:
        _by_factor(cost.kernel, _plan(cost, tops[0], k), xs, index, aux, static, loss, grp,
                   (H_, g_, cost_out))


SECONDS = {
    "between_se3": 0.45e-6,
    "prior_se3": 0.3e-6,
    "between_se2": 0.17e-6,
    "prior_se2": 0.07e-6,
    "reprojection_bal": 0.4e-6,
}
"""Seconds per factor and batch element of each kernel (2-core bench machine, one thread: a
256-pose helix's 376 SE3 edges 0.17-0.18 ms, sphere2500's 4949 2.5 ms, M3500's 5453 SE2 edges
0.9 ms, 44k BAL observations 16.5 ms; a work estimate for :func:`core.parallel.threads`)."""
MIN_CHUNK = 5e-4
"""Seconds of kernel work per thread below which a call stays on one thread (a hand-off costs
~20-80 us; a 256-pose pose graph, ~0.2 ms, stays on the calling thread)."""
MIN_FACTORS = 2048
"""Factors per chunk at the least when one problem is cut by factors (each further chunk adds
its touched entries of ``H`` back, and its maps are made once per cost)."""


def _rows(a: np.ndarray, b0: int, b1: int) -> np.ndarray:
    """Batch elements ``b0:b1`` of an array that is per batch element (first dim > 1)."""
    return a[b0:b1] if a.shape[0] > 1 else a


def _by_batch(kind: str | None, k: int, xs: list[np.ndarray], index: list[np.ndarray],
              aux: np.ndarray, static: tuple, loss: tuple, grp: np.ndarray,
              out: tuple[np.ndarray, ...]) -> None:
    """One kernel call per chunk of batch elements, on ``k`` threads; every per-element array
    (values, measurements, weights, scale, outputs) sliced along its first axis (C-contiguous
    rows: the kernels' argument types do not change)."""
    U, has_u, w, top, rowmap, col = static
    calls = [
        (kind, [x[b0:b1] for x in xs], index, _rows(aux, b0, b1),
         (_rows(U, b0, b1), has_u, _rows(w, b0, b1), top, rowmap, col, *(o[b0:b1] for o in out),
          loss[0], _rows(loss[1], b0, b1), grp))
        for b0, b1 in parallel.bounds(xs[0].shape[0], k)
    ]
    parallel.run(_call, calls)


def _edges(a: np.ndarray, e0: int, e1: int) -> np.ndarray:
    """Factors ``e0:e1`` of a ``(1, E|1, ...)`` array (one batch element: contiguous)."""
    if a.shape[1] == 1:
        return a
    part = a[:, e0:e1]
    return part if part.flags.c_contiguous else np.ascontiguousarray(part)


def _by_factor(kind: str | None, plan: list, xs: list[np.ndarray], index: list[np.ndarray],
               aux: np.ndarray, static: tuple, loss: tuple, grp: np.ndarray,
               out: tuple[np.ndarray, ...]) -> None:
    """One problem (``B = 1``) cut into ``len(plan)`` runs of factors, one kernel call each at
    once: the first adds into ``H``, ``g`` and the cost directly, each other one into zeroed
    buffers of its own that hold only the entries it touches (its maps renumbered, ``plan[k]``,
    made by the run's own thread at the first call: :func:`_renumber`), added into ``H`` and
    ``g`` afterwards. Only the entries several runs share (for BA the cameras' blocks) are
    summed in another order than by one call."""
    U, has_u, w, top, rowmap, col = static
    H, g, total = out
    runs = parallel.bounds(index[0].shape[0], len(plan))
    buffers: list = [None] * len(plan)

    def part(k: int) -> None:
        e0, e1 = runs[k]
        if k == 0:
            p, c, outs = top[e0:e1], col[e0:e1], out
        else:
            if plan[k] is None:
                plan[k] = _renumber(top[e0:e1], rowmap, col[e0:e1], H.shape[1], g.shape[1])
            p, c, rows, cols = plan[k]
            outs = (np.zeros((1, rows.shape[0])), np.zeros((1, cols.shape[0])),
                    np.zeros_like(total))
            buffers[k] = (rows, cols, *outs)
        _call(kind, xs, [i[e0:e1] for i in index], _edges(aux, e0, e1),
              (_edges(U, e0, e1), has_u, _edges(w, e0, e1), p, rowmap, c, *outs, loss[0],
               _edges(loss[1], e0, e1), grp[e0:e1] if grp.shape[0] else grp))

    parallel.run(part, [(k,) for k in range(len(plan))])
    for rows, cols, Hk, gk, ck in buffers[1:]:
        _scatter_add(H[0], rows, Hk[0])
        _scatter_add(g[0], cols, gk[0])
        total += ck


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(cost: Cost, top: Tensor, k: int) -> list:
    """The ``k`` runs of :func:`_by_factor` for ``cost``: None for the first, then each run's
    renumbered maps once made; kept per cost (for its pattern's ``top`` and ``k``)."""
    hit = _PLANS.get(cost)
    if hit is not None and hit[0] is top and len(hit[1]) == k:
        return hit[1]
    plan: list = [None] * k
    _PLANS[cost] = (top, plan)
    return plan


def _renumber(top: np.ndarray, rowmap: np.ndarray, col: np.ndarray, nnz: int, n: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A run's maps, ``top (E', k, D)`` with ``rowmap (2, D)`` (``Pattern.tops``) and ``col (E',
    D)``, renumbered densely (in increasing order) into buffers of its own, and the entries of
    ``H`` and ``g`` the buffers' entries stand for: ``(top', col', rows, cols)`` with
    ``rows[pos'] == pos`` for the positions ``pos`` the block form stands for, ``cols[col'] ==
    col``. A block's rows are consecutive entries of its column, all touched by the run, so
    they stay consecutive in the dense numbering and ``top'`` is the numbering of the blocks'
    first rows (:func:`_compact_blocks`: no ``(E', D, D)`` positions are made; at 100k poses
    they were 170 MB and 0.1-0.9 s a run)."""
    work, wcol = np.empty(nnz, np.int32), np.empty(n, np.int32)
    new_top, new_col = np.empty_like(top), np.empty_like(col)
    m, mc = _compact_blocks(top, rowmap, col, work, wcol, new_top, new_col)
    rows, cols = np.empty(m, np.int64), np.empty(mc, np.int64)
    _touched(work, rows)
    _touched(wcol, cols)
    return new_top, new_col, rows, cols


@_kernels._jit
def _compact_blocks(top: np.ndarray, rowmap: np.ndarray, col: np.ndarray, work: np.ndarray,
                    wcol: np.ndarray, new_top: np.ndarray, new_col: np.ndarray
                    ) -> tuple[int, int]:
    """Number the positions the block form ``top, rowmap`` stands for and for
    ``col``: ``work (nnz,)``, ``wcol (n,)`` become each entry's and column's number (-1: not
    touched), ``new_top``, ``new_col`` the maps' numbers; returns the numbers' counts."""
    work[:] = -1
    wcol[:] = -1
    E, _, D = top.shape
    for e in range(E):
        for p in range(D):
            base, w = top[e, rowmap[0, p]], rowmap[1, p]
            for q in range(D):
                work[base[q] + w] = 0
        for q in range(D):
            wcol[col[e, q]] = 0
    m = 0
    for v in range(work.shape[0]):
        if work[v] == 0:
            work[v] = m
            m += 1
    mc = 0
    for v in range(wcol.shape[0]):
        if wcol[v] == 0:
            wcol[v] = mc
            mc += 1
    for e in range(E):
        for s in range(top.shape[1]):
            for q in range(D):
                new_top[e, s, q] = work[top[e, s, q]]
        for q in range(D):
            new_col[e, q] = wcol[col[e, q]]
    return m, mc


@_kernels._jit
def _touched(work: np.ndarray, old: np.ndarray) -> None:
    """The value each number of :func:`_compact_blocks` stands for."""
    for v in range(work.shape[0]):
        if work[v] >= 0:
            old[work[v]] = v


@_kernels._jit
def _scatter_add(dst: np.ndarray, idx: np.ndarray, src: np.ndarray) -> None:
    """``dst[idx] += src`` (``idx`` distinct)."""
    for i in range(idx.shape[0]):
        dst[idx[i]] += src[i]


_STATIC: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static(cost: Cost, tops: tuple[Tensor, Tensor], columns: Tensor
            ) -> tuple[list, np.ndarray, tuple, tuple[int, np.ndarray]]:
    """The arrays of ``cost`` that do not change between iterations: indices, measurements,
    weights, the pattern maps (``tops``, ``columns``) and the robust loss (its kernel code and
    scale ``(B|1, E|1)``).
    Kept per cost (weakly): an array that is a view of its tensor sees an in-place change of it;
    one that is a copy (an expanded ``sqrt_info (E, d, d)`` made contiguous) is rebuilt when its
    tensor's version counter (shared with the tensor's base) has moved; copies of tensors that
    require grad (a parameter may change through ``.data``, which has a counter of its own) are
    not kept."""
    weight = cost.weight
    scalar = weight is not None and weight.ndim == 0  # a copy: its value is checked at each hit
    hit = _STATIC.get(cost)
    if hit is not None and hit[0] is tops[0] and (not scalar or hit[1][2][2][0, 0, 0] == weight):
        for t, version in hit[2]:  # a loop, not all(<generator>): no Python call per tensor
            if t._version != version:
                break
        else:
            return hit[1]
    index = [_array(i) for i in cost.index]
    aux_t = next(iter(cost.aux.values()))
    U = _NO_U if cost.sqrt_info is None else _lead(cost.sqrt_info, 4)
    w = _lead(weight if weight is not None else torch.ones(()), 3)
    kind, scale_t, scale = _loss(cost)
    out = (index, _array(aux_t), (U, cost.sqrt_info is not None, w, _array(tops[0]),
                                  _array(tops[1]), _array(columns)), (kind, scale))
    pairs = [*zip(cost.index, index), (aux_t, out[1]), (tops[0], out[2][3]),
             (tops[1], out[2][4]), (columns, out[2][5])]
    if cost.sqrt_info is not None:
        pairs.append((cost.sqrt_info, U))
    if weight is not None and not scalar:
        pairs.append((weight, w))
    if scale_t is not None:
        pairs.append((scale_t, scale))
    copies = [(t, t._version) for t, a in pairs if a.ctypes.data != t.data_ptr()]
    if not any(t.requires_grad for t, _ in copies):  # a parameter may change through .data
        _STATIC[cost] = (tops[0], out, copies)
    return out


def _loss(cost: Cost) -> tuple[int, Tensor | None, np.ndarray]:
    """The robust loss's kernel code (0: none), its scale tensor (None for a float) and the scale
    as ``(B|1, E|1)`` (``RobustLoss.__call__``'s broadcasting: ``(B,)`` is per batch element)."""
    if cost.loss is None:
        return 0, None, np.ones((1, 1))
    c = cost.loss.scale
    if not isinstance(c, Tensor):
        return _kernels.LOSSES[cost.loss.kind], None, np.full((1, 1), float(c))
    t = c[:, None] if c.ndim == 1 else c
    return _kernels.LOSSES[cost.loss.kind], c, _lead(t, 2)


def retract(space: object, x: Tensor, delta: Tensor) -> Tensor | None:
    """``x * Exp(delta)`` for ``x (B, F, S)``, ``delta (B, F, dof)`` by the SE3/SE2 kernel, or
    None where no kernel applies (another space, not CPU float64, or autograd needs the graph)."""
    kernel = {"SE3": _kernels.se3_retract, "SE2": _kernels.se2_retract}.get(str(space))
    if kernel is None or not _kernels.AVAILABLE:
        return None
    grad = torch.is_grad_enabled()
    for t in (x, delta):
        if t.device.type != "cpu" or t.dtype != torch.float64 or (grad and t.requires_grad):
            return None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    kernel(_array(x), _array(delta), out.numpy())
    return out
