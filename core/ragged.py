"""Ragged batches: ``P`` objectives of different structures solved as ONE objective.

``merge(objectives, inputs)`` returns a :class:`RaggedBatch` whose ``objective`` is a batch-1
``Objective`` over the problems' variables put end to end, with a block-diagonal normal matrix
(after the ordering, one block per problem) and a ``Grouping`` (``Objective.groups``): the
optimizers then keep one LM state per problem (damping, acceptance, convergence, status,
iterations, cost history: ``Info`` fields of shape ``(P,)``), exactly the loop of a
same-structure batch with elements ``(B, P)`` flattened (``core.objective.Elements``).

* Variables: those of the same name and space are concatenated (problem ``p``'s elements after
  those of problems ``0..p-1``); a name that comes with two spaces is split, the second one
  renamed ``"<name>:<space>"``.
* Costs: costs of the same *kind* (name, residual function (code and closure), kernel, slot
  variables, robust-loss kind, aux layout, weight form) become ONE cost whose factor table is the
  concatenation of theirs, indices offset: the number of cost evaluations per iteration does not
  grow with ``P`` (a compiled kernel, ``core.fused``, runs once too, adding each factor's cost to
  its problem's through ``Grouping.factors``). Kinds that differ stay separate costs (a name met
  with two kinds: the second is ``"<name>#1"``).
* Pattern: the block-diagonal concatenation of the components' cached patterns
  (``Objective._cpu_pattern``) through each problem's column map, ``O(nnz)`` gathers, no
  symbolic assembly from scratch.
* Factorization: the sparse Cholesky an optimizer makes by name for a merged objective
  (``"sparse"``, or ``"auto"`` above 500 unknowns; ``core.optimizer.resolve_solver``) is a
  ``core.solvers.sparse.RaggedCholesky``: the whole matrix in one factorization while every
  problem runs, then one per diagonal block of the problems still running, so a converged
  problem costs no more factorizations while the slowest one runs; a block that is not
  positive definite fails its problem alone.
  A solver instance passed in is used as it is (e.g. one ``SparseCholesky`` of the whole
  block-diagonal matrix, every problem every iteration).
* Cache (:class:`RaggedCache`): the merged structure (variables, offset indices, pattern,
  grouping) and the solvers made for it (their symbolic analyses: ``Objective.solvers``) per
  combination, keyed by the tuple of the components' structure fingerprints
  (:func:`fingerprint`: variables' names, spaces and counts, costs' kinds and index tensors),
  least recently used evicted beyond ``size`` entries (``DEFAULT_CACHE``: 32).

``join_values`` / ``split_values`` turn per-problem value dicts (``{name: (1, F_p, S)}``) into the
merged dict and back; ``join_inputs`` does the same for layer inputs (``"<cost>.<field>"``).
Every problem has batch size 1. ``OptimizationLayer.ragged`` is the differentiable entry point.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from core.cost import Cost
from core.loss import RobustLoss
from core.objective import Grouping, Objective, Pattern
from core.variable import Variable

__all__ = ["DEFAULT_CACHE", "RaggedBatch", "RaggedCache", "fingerprint", "merge"]


def _fn_key(fn: object) -> object:
    """A residual function's identity for merging: its code and closure values (library costs
    make a new closure per cost over the same space), else the object itself."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return fn
    cells = []
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        try:
            hash(value)
        except TypeError:
            value = id(value)
        if isinstance(value, Tensor):
            value = id(value)
        cells.append(value)
    return (code, tuple(cells))


def _weight_form(t: Tensor | None) -> object:
    return None if t is None else ("scalar" if t.ndim == 0 else t.shape[-1])


def _kind(c: Cost) -> tuple:
    """What costs must share to be merged into one factor table."""
    return (
        c.name, _fn_key(c.analytic if c.analytic is not None else c.residual), c.kernel,
        tuple((v.name, str(v.space)) for v in c.optimized),
        None if c.loss is None else c.loss.kind,
        tuple((k, tuple(t.shape[2:]), t.dtype) for k, t in c.aux.items()),
        _weight_form(c.weight), None if c.sqrt_info is None else c.sqrt_info.shape[-1],
        c.residual_dim, tuple((k, str(s)) for k, s in c.aux_spaces),
    )


def fingerprint(objective: Objective) -> str:
    """The structure's digest (variables' names, spaces and counts; costs' kinds and index
    tensors), kept on the objective (``with_inputs``/``to`` copies share it)."""
    cached = objective.__dict__.get("_fingerprint")
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    for v in objective.variables:
        h.update(repr((v.name, str(v.space), v.count)).encode())
    for c in objective.costs:
        h.update(repr(_kind(c)).encode())
        for i in c.index:
            h.update(i.detach().cpu().contiguous().numpy().tobytes())
    objective.__dict__["_fingerprint"] = digest = h.hexdigest()
    return digest


@dataclass
class _Structure:
    """What a combination of structures shares between calls: the merged variables, for each
    merged cost its members ``(problem, cost position)`` and offset indices, the pattern, the
    grouping, and the per-device pattern and solver caches of ``Objective``."""

    variables: dict[tuple[str, str], Variable]
    names: list[dict[str, str]]  # problem -> its variable name -> merged variable name
    costs: list[tuple[str, list[tuple[int, int]], tuple[Tensor, ...]]]
    pattern: Pattern
    groups: Grouping
    patterns: dict = field(default_factory=dict)
    solvers: dict = field(default_factory=dict)


class RaggedCache:
    """Merged structures per combination, keyed by the components' fingerprints (in order),
    the ``size`` most recently used kept (an evicted entry's solvers and patterns are freed;
    an objective made from it stays valid)."""

    def __init__(self, size: int = 32) -> None:
        if size < 1:
            raise ValueError(f"RaggedCache size must be >= 1, got {size}")
        self.size = size
        self._entries: OrderedDict[tuple[str, ...], _Structure] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, objectives: Sequence[Objective]) -> _Structure:
        key = tuple(fingerprint(o) for o in objectives)
        hit = self._entries.get(key)
        if hit is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return hit
        self.misses += 1
        built = self._entries[key] = _build(objectives)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return built


DEFAULT_CACHE = RaggedCache(32)


def _build(objectives: Sequence[Objective]) -> _Structure:
    """Merge the structures (see the module docstring)."""
    variables: dict[tuple[str, str], Variable] = {}
    counts: dict[tuple[str, str], int] = {}
    names: list[dict[str, str]] = []
    spaces_of: dict[str, list[str]] = {}
    start: list[dict[str, int]] = []  # problem -> its variable name -> first merged element
    for o in objectives:
        mine, first = {}, {}
        for v in o.variables:
            key = (v.name, str(v.space))
            seen = spaces_of.setdefault(v.name, [])
            if key[1] not in seen:
                seen.append(key[1])
            first[v.name] = counts.get(key, 0)
            counts[key] = counts.get(key, 0) + v.count
            mine[v.name] = v.name if seen.index(key[1]) == 0 else f"{v.name}:{key[1]}"
            variables.setdefault(key, v)
        names.append(mine)
        start.append(first)
    merged_vars = {key: Variable(v.name if spaces_of[v.name].index(key[1]) == 0
                                 else f"{v.name}:{key[1]}", v.space, counts[key])
                   for key, v in variables.items()}
    # costs: group by kind, in order of first appearance
    kinds: dict[tuple, list[tuple[int, int]]] = {}
    for p, o in enumerate(objectives):
        for k, c in enumerate(o.costs):
            kinds.setdefault(_kind(c), []).append((p, k))
    costs, used = [], {}
    for kind, members in kinds.items():
        name = kind[0]
        n_used = used.get(name, 0)
        used[name] = n_used + 1
        c0 = objectives[members[0][0]].costs[members[0][1]]
        index = tuple(
            torch.cat([objectives[p].costs[k].index[a].cpu()
                       + start[p][objectives[p].costs[k].optimized[a].name]
                       for p, k in members])
            for a in range(len(c0.optimized))
        )
        costs.append((name if n_used == 0 else f"{name}#{n_used}", members, index))
    order = _merged_order(costs, objectives, merged_vars)
    pattern, groups = _merge_patterns(objectives, costs, order, names, start, merged_vars)
    return _Structure(merged_vars, names, costs, pattern, groups)


def _merged_order(costs: list, objectives: Sequence[Objective],
                  merged_vars: dict[tuple[str, str], Variable]) -> dict[str, tuple[int, int]]:
    """Merged variable name -> (column offset, dof per element), in the order ``Objective``
    gives its variables (first appearance in the merged costs)."""
    by_name = {v.name: v for v in merged_vars.values()}
    order, n = {}, 0
    for _, members, _ in costs:
        p, k = members[0]
        c = objectives[p].costs[k]
        for v in c.optimized:
            merged = by_name[_merged_name(v, merged_vars)]
            if merged.name not in order:
                order[merged.name] = (n, merged.space.dof)
                n += merged.dof
    return order


def _merged_name(v: Variable, merged_vars: dict[tuple[str, str], Variable]) -> str:
    return merged_vars[(v.name, str(v.space))].name


def _merge_patterns(objectives: Sequence[Objective], costs: list, order: dict,
                    names: list[dict[str, str]], start: list[dict[str, int]],
                    merged_vars: dict) -> tuple[Pattern, Grouping]:
    """The merged pattern from the components' cached ones, and the grouping.

    Problem ``p``'s column map ``m_p (n_p,)`` sends its unknowns to the merged order. Each
    merged column comes from exactly one problem's column, so its entries are that column's
    with rows mapped; where ``m_p`` is increasing (variables in the same relative order), the
    rows stay sorted and entry ``k`` of problem ``p`` lands at
    ``indptr[m_p[col_k]] + (k - indptr_p[col_k])``; otherwise the entries are sorted once.
    In NumPy: no OpenMP region per operation (each wakes torch's threads, milliseconds on a
    loaded machine; this runs for every new combination)."""
    n = sum(v.dof for v in merged_vars.values())
    maps, parts = [], []
    column_problem = np.empty(n, np.int64)
    for p, o in enumerate(objectives):
        segs = []
        for v in o.variables:
            off, dof = order[names[p][v.name]]
            first = off + start[p][v.name] * dof
            segs.append(np.arange(first, first + v.dof))
        m = np.concatenate(segs)
        maps.append(m)
        column_problem[m] = p
        pat = o._cpu_pattern
        parts.append(tuple(t.numpy() for t in (pat.indptr, pat.rows, pat.cols, pat.diag)))
    per_column = np.zeros(n, np.int64)
    for m, (ptr, _, _, _) in zip(maps, parts):
        per_column[m] = np.diff(ptr)
    indptr = np.concatenate([np.zeros(1, np.int64), np.cumsum(per_column)])
    nnz = int(indptr[-1])
    rows, cols = np.empty(nnz, np.int64), np.empty(nnz, np.int64)
    diag = np.empty(n, np.int64)
    where = []
    for m, (ptr, r, c, _) in zip(maps, parts):
        w = indptr[m[c]] + (np.arange(r.shape[0]) - ptr[c])
        rows[w], cols[w] = m[r], m[c]
        where.append(w)
    if not all(bool((m[1:] > m[:-1]).all()) for m in maps):  # sort each column's rows
        perm = np.argsort(cols * n + rows, kind="stable")
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(nnz)
        rows, cols = rows[perm], cols[perm]
        where = [inverse[w] for w in where]
    for m, (_, _, _, d), w in zip(maps, parts, where):
        diag[m] = w[d]
    positions, columns, factors, ptrs = [], [], [], []
    P = len(objectives)
    for _, members, _ in costs:
        pats = [objectives[p]._cpu_pattern for p, _ in members]
        # C order: the compiled kernels read the maps in place (core.fused keeps views)
        positions.append(torch.from_numpy(np.ascontiguousarray(np.concatenate(
            [where[p][pat.positions[k].numpy()] for (p, k), pat in zip(members, pats)]))))
        columns.append(torch.from_numpy(np.ascontiguousarray(np.concatenate(
            [maps[p][pat.columns[k].numpy()] for (p, k), pat in zip(members, pats)]))))
        sizes = np.zeros(P, np.int64)
        for p, k in members:
            sizes[p] += objectives[p].costs[k].num_factors
        factors.append(torch.from_numpy(np.repeat(np.arange(P), sizes)))
        ptrs.append(tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)])))
    elements = {}
    for key, v in merged_vars.items():
        owner = np.empty(v.count, np.int64)
        for p, o in enumerate(objectives):
            for u in o.variables:
                if (u.name, str(u.space)) == key:
                    owner[start[p][u.name]: start[p][u.name] + u.count] = p
        elements[v.name] = torch.from_numpy(owner)
    t = torch.from_numpy
    pattern = Pattern(n, t(indptr), t(rows), t(cols), t(diag), tuple(positions), tuple(columns))
    return pattern, Grouping(P, t(column_problem), t(column_problem[cols]), tuple(factors),
                             tuple(ptrs), elements)


@dataclass
class RaggedBatch:
    """``P`` problems as one objective (see the module docstring).

    ``objective``: the merged batch-1 ``Objective`` (``groups`` set); ``problems``: the
    components, their inputs applied. Use :meth:`join_values` / :meth:`split_values` for values
    and :meth:`join_inputs` for layer inputs; ``Info`` of a solve is per problem, ``(P,)``.
    """

    objective: Objective
    problems: tuple[Objective, ...]
    structure: _Structure

    @property
    def count(self) -> int:
        return len(self.problems)

    def join_values(self, values: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Per-problem values ``{name: (1, F_p, S)}`` -> merged ``{name: (1, sum F_p, S)}``;
        ``ValueError`` naming the problem for a wrong count, a missing or extra name, a batch
        other than 1, or a dtype/device unlike problem 0's."""
        if len(values) != self.count:
            raise ValueError(f"ragged batch of {self.count} problems got {len(values)} values")
        parts: dict[str, list[Tensor]] = {}
        ref = None
        for p, (o, vals) in enumerate(zip(self.problems, values)):
            names = {v.name for v in o.variables}
            if set(vals) != names:
                raise ValueError(f"problem {p}: values name {sorted(vals)} but its variables "
                                 f"are {sorted(names)}")
            for v in o.variables:
                x = vals[v.name]
                if x.ndim != 3 or x.shape[0] != 1:
                    raise ValueError(f"problem {p}: variable {v.name!r} must be (1, "
                                     f"{v.count}, S) in a ragged batch, got {tuple(x.shape)}")
                ref = ref or (p, v.name, x)
                if x.dtype != ref[2].dtype or x.device != ref[2].device:
                    raise ValueError(
                        f"problem {p}: variable {v.name!r} is {x.dtype} on {x.device} but "
                        f"problem {ref[0]}'s {ref[1]!r} is {ref[2].dtype} on {ref[2].device}")
                parts.setdefault(self.structure.names[p][v.name], []).append(x)
        return {k: torch.cat(xs, 1) if len(xs) > 1 else xs[0] for k, xs in parts.items()}

    def split_values(self, values: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        """Merged ``{name: (B, sum F_p, S)}`` -> per problem ``{name: (B, F_p, S)}`` (views,
        differentiable)."""
        out: list[dict[str, Tensor]] = []
        taken: dict[str, int] = {}
        for p, o in enumerate(self.problems):
            mine = {}
            for v in o.variables:
                merged = self.structure.names[p][v.name]
                at = taken.get(merged, 0)
                mine[v.name] = values[merged][:, at: at + v.count]
                taken[merged] = at + v.count
            out.append(mine)
        return out

    def join_inputs(self, inputs: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Per-problem layer inputs (``"<cost>.<field>"`` of each component) -> the merged
        objective's inputs: each merged cost field that any problem sets, concatenated over its
        members (the others' defaults filling in)."""
        if len(inputs) != self.count:
            raise ValueError(f"ragged batch of {self.count} problems got {len(inputs)} inputs")
        applied = [o.with_inputs(i) if i else o for o, i in zip(self.problems, inputs)]
        out = {}
        for (_, members, _), merged in zip(self.structure.costs,
                                           _merged_costs(self.structure, applied)):
            base = self.problems[members[0][0]].costs[members[0][1]].name
            given = {k.rsplit(".", 1)[1] for p, _ in members for k in inputs[p]
                     if k.rsplit(".", 1)[0] == base}
            out.update({k: t for k, t in merged.inputs().items()
                        if k.rsplit(".", 1)[1] in given})
        return out


def _common(ts: list[Tensor | None]) -> Tensor | None:
    """The one tensor every member shares (the same object, or equal scalars without grad)."""
    first = ts[0]
    if first is None or all(t is first for t in ts):
        return first
    if all(t is not None and t.ndim == 0 and not t.requires_grad for t in ts) and all(
        float(t) == float(first) for t in ts  # type: ignore[arg-type]
    ):
        return first
    return None


def _per_factor(t: Tensor, num: int, tail: int, dtype: torch.dtype, what: str) -> Tensor:
    """A member's ``weight`` (``tail = 1``: ``()``, ``(d|1,)``, ``(E, d|1)``, ``(1, E, d|1)``)
    or ``sqrt_info`` (``tail = 2``: ``(d, d)``, ``(E, d, d)``, ``(1, E, d, d)``) as
    ``(1, E, ...)``."""
    if t.ndim == 0:
        t = t.to(dtype).reshape(1, 1, 1)
    elif t.ndim == tail:
        t = t[None, None]
    elif t.ndim == tail + 1:
        t = t[None]
    elif t.shape[0] != 1:
        raise ValueError(f"{what}: a ragged batch's problems have batch size 1, got "
                         f"{tuple(t.shape)}")
    return t.expand(1, num, *t.shape[2:])


def _merged_costs(structure: _Structure, problems: Sequence[Objective]) -> list[Cost]:
    """The merged costs over ``problems``' current tensors (structure from the cache)."""
    by_key = structure.variables
    out = []
    for name, members, index in structure.costs:
        cs = [problems[p].costs[k] for p, k in members]
        c0 = cs[0]
        dtype = next((t.dtype for t in c0.aux.values()), torch.get_default_dtype())
        aux = {}
        for key in c0.aux:
            parts = []
            for p, c in zip(members, cs):
                t = c.aux[key]
                if t.shape[0] != 1:
                    raise ValueError(f"problem {p[0]}: cost {c.name!r} aux {key!r} has batch "
                                     f"{t.shape[0]}; a ragged batch's problems have batch 1")
                parts.append(t)
            aux[key] = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        fields: dict[str, object] = {}
        for fld, tail in (("weight", 1), ("sqrt_info", 2)):
            ts = [getattr(c, fld) for c in cs]
            shared = _common(ts)
            fields[fld] = shared if shared is not None or ts[0] is None else torch.cat(
                [_per_factor(t, c.num_factors, tail, dtype, f"problem {p}: cost {c.name!r} {fld}")
                 for (p, _), c, t in zip(members, cs, ts)], 1)
        loss = c0.loss
        if loss is not None:
            scales = [c.loss.scale if isinstance(c.loss.scale, Tensor)  # type: ignore[union-attr]
                      else torch.tensor(float(c.loss.scale), dtype=dtype)  # type: ignore[union-attr]
                      for c in cs]
            shared = _common(scales)
            if shared is None:
                shared = torch.cat([_scale(s, c.num_factors, p) for (p, _), c, s
                                    in zip(members, cs, scales)], 1)
            loss = RobustLoss(loss.kind, shared)
        optimized = tuple(by_key[(v.name, str(v.space))] for v in c0.optimized)
        out.append(replace(c0, optimized=optimized, index=index, aux=aux, loss=loss, name=name,
                           indexed=True, **fields))
    return out


def _scale(s: Tensor, num: int, p: int) -> Tensor:
    """A member's robust-loss scale ``()``, ``(1,)`` or ``(1|B, E|1)`` as ``(1, E)``."""
    if s.ndim == 0:
        return s.reshape(1, 1).expand(1, num)
    if s.ndim == 1 and s.shape[0] == 1:
        return s.reshape(1, 1).expand(1, num)
    if s.ndim == 2 and s.shape[0] == 1:
        return s.expand(1, num)
    raise ValueError(f"problem {p}: robust-loss scale of shape {tuple(s.shape)}; a ragged "
                     "batch's problems have batch size 1")


def merge(objectives: Sequence[Objective],
          inputs: Sequence[Mapping[str, Tensor]] | None = None,
          cache: RaggedCache | None = None) -> RaggedBatch:
    """The ragged batch of ``objectives`` (their tensors replaced by ``inputs[p]`` where given:
    layer-style ``"<cost>.<field>"`` keys of problem ``p``); the merged structure comes from
    ``cache`` (default ``DEFAULT_CACHE``). ``ValueError`` for an empty list, a problem with a
    batch other than 1, or problems on different devices or of different dtypes (naming the
    problem)."""
    if not objectives:
        raise ValueError("merge: a ragged batch needs at least one objective")
    for p, o in enumerate(objectives):
        if not isinstance(o, Objective):
            raise ValueError(f"merge: problem {p} is a {type(o).__name__}, not an Objective")
        if o.groups is not None:
            raise ValueError(f"merge: problem {p} is itself a ragged batch")
    if inputs is not None and len(inputs) != len(objectives):
        raise ValueError(f"merge: {len(objectives)} objectives but {len(inputs)} inputs")
    _check_alike(objectives)
    structure = (cache if cache is not None else DEFAULT_CACHE).get(objectives)
    problems = tuple(o.with_inputs(i) if i else o
                     for o, i in zip(objectives, inputs or [None] * len(objectives)))
    if inputs is not None:
        _check_alike(problems)
    costs = _merged_costs(structure, problems)
    objective = Objective(costs)
    objective.__dict__["_cpu_pattern"] = structure.pattern
    objective._patterns = structure.patterns
    objective.solvers = structure.solvers
    objective.groups = structure.groups.to(objectives[0].device)
    return RaggedBatch(objective, problems, structure)


def _check_alike(objectives: Sequence[Objective]) -> None:
    """Same device and floating dtype for every problem's tensors (ValueError naming it)."""
    ref = None
    for p, o in enumerate(objectives):
        dev = o.device
        dtypes = {t.dtype for c in o.costs for t in c.aux.values()}
        if ref is None:
            ref = (p, dev, dtypes)
            continue
        if dev != ref[1]:
            raise ValueError(f"problem {p} is on {dev} but problem {ref[0]} is on {ref[1]}")
        if dtypes and ref[2] and dtypes != ref[2]:
            raise ValueError(f"problem {p} has {sorted(map(str, dtypes))} tensors but problem "
                             f"{ref[0]} has {sorted(map(str, ref[2]))}")
