"""The objective: costs over variables, the ordering of the unknowns and the sparsity pattern.

Unknowns are ordered variable by variable (in order of first appearance), element by element,
tangent coordinate by coordinate: variable ``v`` occupies columns ``offset[v] + f * dof + c``.
The normal matrix ``H = J^T J`` is stored as the values ``(B, nnz)`` of ONE fixed symmetric
pattern (both triangles, compressed sparse column order, rows sorted), computed once per structure.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from core import _kernels
from core import fused as _fused
from core.cost import Cost
from core.variable import Variable


@dataclass(frozen=True, eq=False)
class Pattern:
    """Symmetric block-sparsity pattern of ``H`` (n x n) in CSC order.

    ``indptr (n+1,)``, ``rows (nnz,)``, ``cols (nnz,)``: the structure; ``diag (n,)``: the position
    of each diagonal entry; ``positions[c] (E_c, D_c, D_c)``: where entry ``(p, q)`` of factor
    ``e``'s block ``J_e^T J_e`` goes; ``columns[c] (E_c, D_c)``: the global columns of factor ``e``.

    ``tops[c]`` is ``positions[c]`` in block form, ``(top (E_c, k_c, D_c), rowmap (2, D_c))``:
    ``positions[c][e, p, q] = top[e, rowmap[0, p], q] + rowmap[1, p]``, ``top[e, s, q]`` the
    position of the first row of slot ``s``'s block in column ``q`` (the rows of a block are
    consecutive in each column), ``rowmap`` each row's slot and its place in the slot. The
    compiled kernels read ``tops`` (BA: 9x less memory than ``positions``), the torch path
    ``positions``. A pattern is made with either (``given_positions`` or ``given_tops``) and with
    or without ``given_cols``; what is missing is derived on first use, on the pattern's device
    (given positions are their own tops: one row per slot).
    """

    n: int
    indptr: Tensor
    rows: Tensor
    given_cols: Tensor | None
    diag: Tensor
    given_positions: tuple[Tensor, ...] | None
    columns: tuple[Tensor, ...]
    given_tops: tuple[tuple[Tensor, Tensor], ...] | None = None

    @property
    def nnz(self) -> int:
        return int(self.rows.shape[0])

    @cached_property
    def cols(self) -> Tensor:
        """``(nnz,)``: the column of each entry."""
        if self.given_cols is not None:
            return self.given_cols
        ids = torch.arange(self.n, device=self.indptr.device)
        return torch.repeat_interleave(ids, self.indptr.diff(), output_size=self.nnz)

    @cached_property
    def positions(self) -> tuple[Tensor, ...]:
        if self.given_positions is not None:
            return self.given_positions
        assert self.given_tops is not None, "a Pattern needs positions or tops"
        return tuple(top[:, rowmap[0], :] + rowmap[1][None, :, None]
                     for top, rowmap in self.given_tops)

    @cached_property
    def tops(self) -> tuple[tuple[Tensor, Tensor], ...]:
        if self.given_tops is not None:
            return self.given_tops
        out = []
        for pos in self.positions:
            D = pos.shape[-1]
            rowmap = torch.stack([torch.arange(D), torch.zeros(D, dtype=torch.long)])
            out.append((pos, rowmap.to(pos.device)))
        return tuple(out)

    def to_dense(self, values: Tensor) -> Tensor:
        """``(B, nnz)`` values -> dense ``(B, n, n)``."""
        dense = values.new_zeros(values.shape[0], self.n * self.n)
        dense = dense.index_copy(1, self.rows * self.n + self.cols, values)
        return dense.view(-1, self.n, self.n)

    def matvec(self, values: Tensor, x: Tensor) -> Tensor:
        """``H x`` for ``values (B, nnz)`` and ``x (B, n)``."""
        prod = values * x[:, self.cols]
        return prod.new_zeros(x.shape).index_add(1, self.rows, prod)


@dataclass(frozen=True)
class Grouping:
    """The problems of a ragged batch (``core.ragged``): which of the ``count`` problems ``P``
    each unknown, pattern entry, factor and variable element belongs to.

    ``columns (n,)``, ``entries (nnz,)``: problem of each column and of each entry of the
    pattern; ``factors[c] (E_c,)``: of each factor of cost ``c`` (sorted: a cost's factors are
    stored problem by problem) with ``factor_ptr[c]`` the ``P + 1`` boundaries as ints;
    ``elements[v] (F_v,)``: of each element of variable ``v``.
    """

    count: int
    columns: Tensor
    entries: Tensor
    factors: tuple[Tensor, ...]
    factor_ptr: tuple[tuple[int, ...], ...]
    elements: dict[str, Tensor]

    def to(self, device: torch.device | str) -> Grouping:
        if self.columns.device == torch.device(device):
            return self
        return Grouping(self.count, self.columns.to(device), self.entries.to(device),
                        tuple(f.to(device) for f in self.factors), self.factor_ptr,
                        {k: e.to(device) for k, e in self.elements.items()})


class Elements:
    """The LM loop's elements: one per batch element ``b`` and problem ``p`` (``P = 1`` without
    a grouping), flattened ``b * P + p``; maps per-element quantities ``(B * P,)`` to and from
    the per-batch tensors over columns ``(B, n)``, pattern entries ``(B, nnz)`` and variable
    elements ``(B, F)``. Without a grouping every map is the identity of a same-structure
    batch (``x.sum(-1)``, ``e[:, None]``), at no extra cost."""

    def __init__(self, groups: Grouping | None, batch: int) -> None:
        self.groups, self.batch = groups, batch
        self.problems = 1 if groups is None else groups.count
        self.count = batch * self.problems

    def sum_columns(self, x: Tensor) -> Tensor:
        """``x (B, n)`` -> per-element sums ``(B * P,)`` (differentiable)."""
        if self.groups is None:
            return x.sum(-1)
        out = x.new_zeros(self.batch, self.problems)
        return out.index_add(1, self.groups.columns, x).reshape(-1)

    def max_columns(self, x: Tensor) -> Tensor:
        """``x (B, n)`` -> per-element maxima ``(B * P,)``."""
        if self.groups is None:
            return x.amax(-1)
        out = x.new_full((self.batch, self.problems), -float("inf"))
        index = self.groups.columns.expand(self.batch, -1)
        return out.scatter_reduce(1, index, x, "amax").reshape(-1)

    def of_batch(self, e: Tensor) -> Tensor:
        """``e (B,)`` per batch element -> ``(B * P,)``."""
        return e if self.groups is None else e.repeat_interleave(self.problems)

    def columns(self, e: Tensor) -> Tensor:
        """``e (B * P,)`` -> ``(B, n)`` (``(B, 1)`` without a grouping: it broadcasts)."""
        if self.groups is None:
            return e[:, None]
        return e.view(self.batch, self.problems)[:, self.groups.columns]

    def entries(self, e: Tensor) -> Tensor:
        """``e (B * P,)`` -> ``(B, nnz)`` over the pattern's entries (``(B, 1)`` ungrouped)."""
        if self.groups is None:
            return e[:, None]
        return e.view(self.batch, self.problems)[:, self.groups.entries]

    def variable(self, name: str, e: Tensor) -> Tensor:
        """``e (B * P,)`` -> ``(B, F)`` over variable ``name``'s elements (``(B, 1)`` ungrouped)."""
        if self.groups is None:
            return e[:, None]
        return e.view(self.batch, self.problems)[:, self.groups.elements[name]]

    def all_finite(self, values: Mapping[str, Tensor]) -> Tensor:
        """``(B * P,)``: True where every value ``(B, F, S)`` of the element is finite."""
        if self.groups is None:
            finite = [torch.isfinite(v.detach()).flatten(1).all(1) for v in values.values()]
            return torch.stack(finite).all(0)
        bad = torch.zeros(self.batch, self.problems, device=self.groups.columns.device)
        for name, v in values.items():
            nonfinite = (~torch.isfinite(v.detach()).all(-1)).to(bad.dtype)
            bad = bad.index_add(1, self.groups.elements[name], nonfinite)
        return (bad == 0).reshape(-1)


class Objective:
    """A sum of costs ``sum_c sum_e 0.5 rho(||W r||^2)`` over the variables the costs name.

    ``groups``: None, or the problems of a ragged batch (``core.ragged.merge`` sets it): the
    optimizers then keep one LM state per problem (``Elements``).
    """

    groups: Grouping | None = None

    def __init__(self, costs: Sequence[Cost]) -> None:
        if not costs:
            raise ValueError("Objective needs at least one cost")
        self.costs: tuple[Cost, ...] = tuple(costs)
        names = [c.name for c in self.costs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"Objective: cost names must be unique; repeated: {sorted(dup)}")
        variables: dict[str, Variable] = {}
        for c in self.costs:
            for v in c.optimized:
                seen = variables.setdefault(v.name, v)
                if seen is not v:
                    raise ValueError(f"Objective: two different variables are named {v.name!r}")
        self.variables: tuple[Variable, ...] = tuple(variables.values())
        offsets, n = {}, 0
        for v in self.variables:
            offsets[v.name] = n
            n += v.dof
        self.offsets: dict[str, int] = offsets
        self.dim: int = n
        self._patterns: dict[torch.device, Pattern] = {}
        # solvers made from a name, per (name, device), shared by every copy of this objective
        # (to, with_inputs, select): their symbolic analyses are made once per structure
        self.solvers: dict[tuple[str, str], object] = {}
        self._check_aux()

    def _check_aux(self) -> None:
        ref = None
        for c in self.costs:
            for key, t in c.inputs().items():
                if not t.is_floating_point():
                    raise ValueError(
                        f"cost {c.name!r}: {key} must be floating point, got {t.dtype}"
                    )
                if _cpu_scalar(t):  # a float weight or robust scale: works on any device
                    continue
                ref = ref or (key, t)
                if t.device != ref[1].device:
                    raise ValueError(f"{key} is on {t.device} but {ref[0]} is on {ref[1].device}")
        self._aux_ref = ref

    @property
    def device(self) -> torch.device:
        """Where the costs' tensors (indices, aux) live."""
        return self.costs[0].index[0].device

    def to(self, device: torch.device | str) -> Objective:
        """The same objective with every cost's tensors on ``device`` (pattern cache shared)."""
        device = torch.device(device)
        if all(i.device == device for c in self.costs for i in c.index) and all(
            t.device == device or _cpu_scalar(t) for c in self.costs for t in c.inputs().values()
        ):
            return self
        new = Objective.__new__(Objective)
        new.__dict__.update(self.__dict__)
        new.costs = tuple(c.to(device) for c in self.costs)
        if self.groups is not None:
            new.groups = self.groups.to(device)
        new._check_aux()
        return new

    def elements(self, batch: int) -> Elements:
        """The LM loop's elements for a batch of ``B = batch`` (see ``Elements``)."""
        return Elements(self.groups, batch)

    def with_inputs(self, inputs: Mapping[str, Tensor]) -> Objective:
        """A new objective whose costs' auxiliary tensors are replaced by ``inputs`` (same
        structure: the cached pattern is shared)."""
        known = {k for c in self.costs for k in c.inputs()}
        unknown = set(inputs) - known - {v.name for v in self.variables}
        if unknown:
            raise ValueError(f"unknown inputs {sorted(unknown)}; known: {sorted(known)}")
        new = Objective.__new__(Objective)
        new.__dict__.update(self.__dict__)
        new.costs = tuple(c.with_inputs(inputs) for c in self.costs)
        new._check_aux()
        return new

    def check_names(self, values: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` unless ``values`` has exactly one entry per variable; a misspelt
        or extra name is reported with the closest variable name. Optimizers call this first."""
        names = [v.name for v in self.variables]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"initial values name an unknown variable {key!r}{hint}; the "
                                 f"objective's variables are {names}")
        for name in names:
            if name not in values:
                raise ValueError(f"missing initial value for variable {name!r}")

    def check_values(self, values: Mapping[str, Tensor]) -> int:
        """Validate ``values`` (name -> ``(B, F, S)``: names, shapes, dtypes, devices, unit
        rotations, see ``Variable.check``) and return the batch size ``B``."""
        self.check_names(values)
        batch, ref = None, None
        for v in self.variables:
            x = values[v.name]
            v.check(x)
            if not x.is_floating_point():
                raise ValueError(
                    f"variable {v.name!r}: values must be floating point, got {x.dtype}"
                )
            if ref is None:
                batch, ref = x.shape[0], (v.name, x)
            elif x.shape[0] != batch or x.dtype != ref[1].dtype or x.device != ref[1].device:
                raise ValueError(
                    f"variable {v.name!r} has batch {x.shape[0]}, {x.dtype}, {x.device} but "
                    f"{ref[0]!r} has batch {batch}, {ref[1].dtype}, {ref[1].device}"
                )
        assert batch is not None and ref is not None
        for c in self.costs:
            for key, t in c.inputs().items():
                # aux (B|1, E, ...); weight (B|1, E, d) and sqrt_info (B|1, E, d, d) when batched
                if has_batch_dim(key, t):
                    if t.shape[0] not in (1, batch):
                        raise ValueError(
                            f"{key} has batch dimension {t.shape[0]}, expected 1 or {batch}"
                        )
                if t.ndim and t.dtype != ref[1].dtype:
                    raise ValueError(
                        f"{key} is {t.dtype} but variable {ref[0]!r} is {ref[1].dtype}"
                    )
                if t.device != ref[1].device and not _cpu_scalar(t):
                    raise ValueError(f"{key} is on {t.device} but {ref[0]!r} is on {ref[1].device}")
        return batch

    def select(self, index: Tensor, batch: int) -> Objective:
        """The objective of batch elements ``index (K,)`` of a batch of ``B = batch``: inputs
        with a batch dimension of size ``B`` (see ``has_batch_dim``) are indexed, shared ones
        kept. Differentiable: unselected elements' inputs get exactly zero gradient."""
        picked = {}
        for c in self.costs:
            for key, t in c.inputs().items():
                if has_batch_dim(key, t) and t.shape[0] == batch:
                    t = t.index_select(0, index.to(t.device))
                    if not c.indexed and key[len(c.name) + 1 :] in c.aux:
                        t = t.squeeze(1)  # with_inputs adds the factor dimension back
                    picked[key] = t
        return self.with_inputs(picked) if picked else self

    def cost(self, values: Mapping[str, Tensor]) -> Tensor:
        """Total cost per batch element, ``(B,)``."""
        return sum(c.evaluate(values, jacobians=False).cost for c in self.costs)

    def retract(
        self, values: Mapping[str, Tensor], delta: Tensor, fused: bool = True
    ) -> dict[str, Tensor]:
        """``x_v * Exp(delta_v)`` for every variable; ``delta (B, n)`` in the objective's order.
        ``fused``: SE3/SE2 variables by a compiled kernel where it applies (``core.fused``)."""
        out = {}
        for v in self.variables:
            d = delta[:, self.offsets[v.name] : self.offsets[v.name] + v.dof]
            d = d.reshape(d.shape[0], v.count, -1)
            x = values[v.name]
            new = _fused.retract(v.space, x, d) if fused else None
            out[v.name] = v.space.retract(x, d) if new is None else new
        return out

    def pattern(self, device: torch.device | str = "cpu") -> Pattern:
        """The symmetric pattern of ``H`` and the scatter maps on ``device``, computed once."""
        device = torch.device(device)
        if device not in self._patterns:
            base = self._cpu_pattern
            if device.type == "cpu":
                self._patterns[device] = base
                return base
            tops = base.given_tops
            self._patterns[device] = Pattern(
                base.n,
                *(t.to(device) for t in (base.indptr, base.rows)),
                None if base.given_cols is None else base.given_cols.to(device),
                base.diag.to(device),
                None if base.given_positions is None else tuple(
                    t.to(device) for t in base.given_positions),
                tuple(t.to(device) for t in base.columns),
                None if tops is None else tuple((t.to(device), m.to(device)) for t, m in tops),
            )
        return self._patterns[device]

    @cached_property
    def _cpu_pattern(self) -> Pattern:
        """Block-level symbolic assembly: every variable element is a block; the unique block
        pairs (one sort over ``E k^2`` keys, not ``E D^2``) give the scalar CSC structure. In
        NumPy: dozens of small index operations, each of which in torch could wake its OpenMP
        threads (on a loaded machine that cost more than the arithmetic)."""
        sizes = np.concatenate([np.full(v.count, v.space.dof, np.int64) for v in self.variables])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        num_blocks, first, k = sizes.size, {}, 0
        for v in self.variables:
            first[v.name], k = k, k + v.count
        blocks = [
            np.stack([first[v.name] + i.cpu().numpy().astype(np.int64)
                      for v, i in zip(c.optimized, c.index)], 1)
            for c in self.costs
        ]  # (E, k): block of each slot
        keys = np.concatenate([(b[:, None, :] * num_blocks + b[:, :, None]).reshape(-1)
                               for b in blocks])
        unique, inverse = _unique_inverse(keys)  # CSC block order
        R, C = unique % num_blocks, unique // num_blocks
        dR = sizes[R]
        below = np.cumsum(dR) - dR
        per_block_column = np.bincount(C, minlength=num_blocks)  # unique blocks per column
        column_first = np.cumsum(per_block_column) - per_block_column
        row_offset = below - below[column_first[C]]  # rows above, in the block column
        col_nnz = np.bincount(C, weights=dR, minlength=num_blocks).astype(np.int64)
        if bool((col_nnz == 0).any()):
            free = int(starts[np.flatnonzero(col_nnz == 0)[0]])
            raise ValueError(f"unknown {free} ({self.describe_column(free)}) appears in no cost")
        per_column = np.repeat(col_nnz, sizes)
        indptr = np.concatenate([[0], np.cumsum(per_column)]).astype(np.int64)
        n = self.dim
        if _kernels.AVAILABLE:  # one pass writing the rows (NumPy: several 20 MB passes for BA)
            rows = np.empty(int(indptr[-1]), np.int64)
            bounds = np.append(column_first, unique.size)
            _kernels.csc_block_rows(R, sizes, starts, indptr, bounds, rows)
        else:
            rows = _csc_rows(R, below, sizes, starts, indptr, column_first)
        own = np.searchsorted(unique, np.arange(num_blocks) * (num_blocks + 1))
        local = np.arange(n) - np.repeat(starts, sizes)
        diag = indptr[:-1] + np.repeat(row_offset[own], sizes) + local
        tops, columns, done = [], [], 0
        for c, b in zip(self.costs, blocks):
            E, slots = b.shape
            dofs = np.array([v.space.dof for v in c.optimized], np.int64)
            slot = np.repeat(np.arange(slots), dofs)  # (D,)
            within = np.arange(int(dofs.sum())) - (np.cumsum(dofs) - dofs)[slot]
            u = inverse[done : done + E * slots * slots].reshape(E, slots, slots)
            done += E * slots * slots
            # C order (the compiled kernels read these in place: core.fused keeps views, no
            # copy per linearization)
            col = np.ascontiguousarray(starts[b][:, slot] + within)  # (E, D) global columns
            # per slot pair the rows above its block in its column, (E, k, k) -> (E, k, D), plus
            # the column starts: the block form of the positions (``Pattern.tops``; the (E, D,
            # D) positions, 50 MB of fresh pages for BA, are made only if the torch path asks)
            top = np.repeat(row_offset[u], dofs, axis=2)
            top += indptr[col][:, None, :]
            tops.append((torch.from_numpy(top), torch.from_numpy(np.stack([slot, within]))))
            columns.append(torch.from_numpy(col))
        t = torch.from_numpy
        return Pattern(n, t(indptr), t(rows), None, t(diag), None, tuple(columns), tuple(tops))

    def describe_column(self, col: int) -> str:
        """Human-readable name of unknown ``col``, e.g. ``poses[12].3``."""
        for v in self.variables:
            off = self.offsets[v.name]
            if off <= col < off + v.dof:
                f, c = divmod(col - off, v.space.dof)
                return f"{v.name}[{f}].{c}"
        raise IndexError(col)


def _unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` for ``keys (K,)`` int64, by a stable argsort:
    NumPy's stable sort finds the runs of presorted keys that a factor list is made of (BA
    50 x 8,000, 400k keys: 11 ms against 37 ms for ``np.unique``'s quicksort)."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    new = np.empty(keys.size, dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    inverse = np.empty(keys.size, dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


def _csc_rows(R: np.ndarray, below: np.ndarray, sizes: np.ndarray, starts: np.ndarray,
              indptr: np.ndarray, column_first: np.ndarray) -> np.ndarray:
    """The row of each entry ``(nnz,)`` of a block CSC pattern from its unique blocks' row
    blocks ``R (U,)`` (in CSC block order) with ``below (U,)`` the scalar rows of the blocks
    before each; ``sizes, starts (num_blocks,)``, ``indptr (n + 1,)``; ``column_first
    (num_blocks,)`` the first unique block of each block column.

    Blocks are dense, so every scalar column of a block column has the same rows: those of one
    column (a run of ``sizes[R]`` consecutive rows per block, at ``below``) are made once, and
    each scalar column reads its block column's: two repeats, no per-run index arithmetic."""
    dR = sizes[R]
    one = np.repeat(starts[R] - below, dR)  # (sum dR,): row - position within the run list
    one += np.arange(one.size)
    at = np.repeat(np.repeat(below[column_first], sizes) - indptr[:-1], np.diff(indptr))
    at += np.arange(at.size)  # (nnz,): each entry's place in ``one``
    return one[at]


def has_batch_dim(key: str, t: Tensor) -> bool:
    """Whether input ``key`` (``"<cost>.<field>"``) has a leading batch dimension ``B|1``: aux
    tensors ``(B|1, E, ...)`` always, ``weight`` as ``(B|1, E, d)``, ``sqrt_info`` as
    ``(B|1, E, d, d)``, ``loss_scale`` as ``(B,)`` or ``(B|1, E)``."""
    field = key.rsplit(".", 1)[1]
    return t.ndim >= {"weight": 3, "sqrt_info": 4}.get(field, 1)


def _cpu_scalar(t: Tensor) -> bool:
    """A 0-dim CPU tensor (a Python float made a tensor): torch uses it with tensors anywhere."""
    return t.ndim == 0 and t.device.type == "cpu"
