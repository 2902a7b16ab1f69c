"""Sparse Cholesky on the CPU, one symbolic analysis per pattern, one numeric factor per element.

Backends, fastest first (measured in ``bench/``): CHOLMOD supernodal (scikit-sparse, on
OpenBLAS), cholespy, SciPy's SuperLU. The symbolic analysis (fill-reducing ordering, supernodes)
is computed once per pattern and reused by every factorization of every batch element.
"""

from __future__ import annotations

import functools
import importlib.util
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from core import parallel
from core._kernels import AVAILABLE as KERNELS
from core.objective import Grouping, Pattern
from core.solvers import compiled, threaded
from core.solvers.base import PlanCache, damped
from core.solvers.supernodal import Ordering

Backend = Literal["auto", "cholmod", "cholespy", "scipy"]
THREADED_ND_FROM = 5000
"""Unknowns from which the one-matrix kernel also analyses the nested-dissection ordering and
keeps the one with the lower estimated time (AMD alone below: 1,000-pose helix 6.6 M flops
against 8.8 M; sphere2500 AMD 391 M, nested dissection 371 M and a tree that splits evenly)."""


def available_backends() -> list[str]:
    """Installed sparse backends, fastest first."""
    return list(_found_backends())


@functools.cache
def _found_backends() -> tuple[str, ...]:
    """The installed backends, looked up once per process (``find_spec`` reads the file
    system: 0.16 ms, paid by every solver made, i.e. every solve of a new objective)."""
    found = []
    if importlib.util.find_spec("sksparse") is not None:
        found.append("cholmod")
    if importlib.util.find_spec("cholespy") is not None:
        found.append("cholespy")
    found.append("scipy")
    return tuple(found)


def block_ordering() -> Ordering:
    """The block ordering of the compiled kernels' analyses: CHOLMOD's AMD where scikit-sparse
    is installed, else minimum degree (:func:`core.solvers.supernodal.minimum_degree`)."""
    return "amd" if "cholmod" in _found_backends() else "minimum_degree"


@dataclass
class SparseFactor:
    """Per-element factors; ``solve`` runs on the CPU in float64 and returns ``b``'s dtype."""

    factors: list[Any]
    ok: Tensor
    backend: str

    def solve(self, b: Tensor) -> Tensor:
        rhs = b.detach().to("cpu", torch.float64).numpy()
        out = np.zeros_like(rhs)
        for k, f in enumerate(self.factors):
            if f is None:
                continue
            if self.backend == "cholespy":
                x = torch.zeros(rhs.shape[1], dtype=torch.float64)
                f.solve(torch.from_numpy(rhs[k]), x)
                out[k] = x.numpy()
            else:
                out[k] = f(rhs[k]) if self.backend == "cholmod" else f.solve(rhs[k])
        return torch.from_numpy(out).to(b.device, b.dtype)


@dataclass
class _Plan:
    """CHOLMOD state for one pattern and batch size: the symbolic analysis, the block-diagonal
    CSC structure (int32) and ONE numeric factor refactorized in place (its memory, hundreds of
    MB for large problems, is reused instead of re-faulted every iteration). ``generation``
    counts factorizations, so a :class:`BlockFactor` can tell whether it is still current."""

    pattern: Pattern
    symbolic: Any
    indptr: np.ndarray
    rows: np.ndarray
    mode: str
    numeric: Any = None
    generation: int = 0
    _matrix: Any = None

    def matrix(self, values: np.ndarray) -> Any:
        """The CSC matrix with ``values (B, nnz)``: built (and its structure checked by SciPy)
        once, then only its data array is swapped."""
        data = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        if self._matrix is None:
            import scipy.sparse as sp

            n = self.indptr.shape[0] - 1
            self._matrix = sp.csc_matrix((data, self.rows, self.indptr), shape=(n, n))
        elif data.shape != self._matrix.data.shape:
            raise ValueError(f"sparse Cholesky: {data.shape[0]} values for a pattern of "
                             f"{self._matrix.data.shape[0]} entries")
        self._matrix.data = data
        return self._matrix

    def refactor(self, values: np.ndarray, beta: float = 0.0) -> bool:
        """Factor ``values (B, nnz)`` plus ``beta I`` in place; False if not positive
        definite."""
        A, numeric = self.matrix(values), self.numeric
        self.generation += 1

        def factorize() -> Any:
            if numeric is None:
                return self.symbolic.cholesky(A, beta)
            numeric.cholesky_inplace(A, beta)
            return numeric

        self.numeric = _checked(factorize, self.mode)  # None after a failure: no usable factor
        return self.numeric is not None


@dataclass
class BlockFactor:
    """The in-place CHOLMOD factor of the block-diagonal ``diag(A_1, ..., A_B) + beta I``
    (values ``(B, nnz)``): the whole batch is factored and solved in one call each. If the plan
    has been refactorized since (another factorization of the same structure before this
    factor's backward), the factor is recomputed from its own values first."""

    plan: _Plan
    values: np.ndarray
    generation: int
    ok: Tensor
    beta: float = 0.0

    def solve(self, b: Tensor) -> Tensor:
        if self.plan.generation != self.generation or self.plan.numeric is None:
            if not self.plan.refactor(self.values, self.beta):  # pragma: no cover - was PD
                raise RuntimeError("sparse Cholesky: refactorization failed")
            self.generation = self.plan.generation
        rhs = b.detach().to("cpu", torch.float64).numpy()
        x = self.plan.numeric(rhs.reshape(-1)).reshape(rhs.shape)
        return torch.from_numpy(x).to(b.device, b.dtype)


@dataclass
class SparseCholesky:
    """Sparse direct solver (CPU). ``backend="auto"`` picks the fastest installed one.

    With CHOLMOD a batch is factored as one block-diagonal matrix (one call, one symbolic
    analysis per pattern and batch size). ``mode="auto"`` lets CHOLMOD choose supernodal or
    simplicial from its analysis (supernodal when flops / nnz(L) >= 40), which picked the faster
    mode on every matrix measured (bench/RESULTS.md: sphere2500 supernodal 70 ms vs 145 ms
    simplicial; helix graphs of 256 to 10,000 poses simplicial, 1.5-1.75x faster than
    supernodal); a simplicial factor is LDL^T, so positive definiteness is checked on D (for
    every mode: D of a supernodal LL^T is read without conversion).

    Batches of ``batched_from`` elements or more, of problems of at most ``batched_up_to``
    unknowns, go to the compiled batched supernodal Cholesky (``core.solvers.compiled``, Numba;
    any backend): factor + solve of 64 graphs of 256 poses 23 ms against CHOLMOD's 66 ms on the
    block-diagonal matrix; even at B = 6, 3.4x slower at B = 1; B = 8 x 5,000 poses 0.66x
    CHOLMOD's time (bench/RESULTS.md, "Batched factorization"). ``mode="compiled"`` forces it
    (needs Numba).

    One matrix (``B = 1``) of at most ``threaded_up_to`` unknowns goes to the one-matrix
    supernodal kernel (``core.solvers.threaded``, Numba calling SciPy's BLAS, subtrees of the
    elimination tree on the free cores; any backend): sphere2500's damped ``H`` 27-37 ms
    against CHOLMOD's 62-79 ms, its LM solve 0.28-0.31 s against 0.43-0.54 s; helix graphs of
    256 to 10,000 poses on par or faster (bench/RESULTS.md, "One-matrix kernel"); 5 LM
    iterations of the 20k-, 50k- and 100k-pose helices (120k-600k unknowns, solver made inside
    the time) 0.59-0.68 s, 1.8-2.2 s and 3.6-3.7 s against CHOLMOD's 0.92-1.05 s, 2.3-3.1 s and
    6.3 s (100k: factorization 0.15-0.24 s against 0.69-0.96 s). ``threaded_up_to`` is the
    largest size measured, rounded up; above it, untried, CHOLMOD. ``mode="threaded"`` forces
    it for one matrix.
    """

    backend: Backend = "auto"
    ordering: str = "default"
    mode: Literal["auto", "supernodal", "simplicial", "compiled", "threaded"] = "auto"
    batched_from: int = 8
    batched_up_to: int = 30000
    threaded_up_to: int = 1_000_000
    _symbolic: PlanCache = field(default_factory=PlanCache, repr=False)
    _compiled: PlanCache = field(default_factory=PlanCache, repr=False)
    _threaded: PlanCache = field(default_factory=PlanCache, repr=False)

    def __post_init__(self) -> None:
        have = available_backends()
        if self.backend == "auto":
            self.backend = have[0]  # type: ignore[assignment]
        elif self.backend not in have:
            raise ValueError(f"sparse backend {self.backend!r} is not installed; have {have}")
        if self.backend == "cholmod":  # the bindings (and SciPy's sparse modules behind them,
            import sksparse.cholmod  # noqa: F401  ~0.25 s) load here, not in the first solve
        if self.mode in ("compiled", "threaded") and not KERNELS:
            raise ValueError(f"mode={self.mode!r} needs Numba (and ARIADNE_KERNELS not 0)")
        if KERNELS and self.mode in ("auto", "threaded") and self.threaded_up_to > 0:
            prepare_threaded()  # its compiled code loads here, not in the first solve

    def factor(self, H: Tensor, pattern: Pattern, damping: Tensor) -> Any:
        if H.device.type == "cpu" and H.dtype == torch.float64 and damping.dtype == H.dtype:
            # NumPy: no OpenMP region (its wake-up costs ms on a machine other jobs load)
            h, d = H.detach().numpy(), damping.detach().numpy()
            beta = self._uniform(pattern, h, d)
            if beta is not None:  # CHOLMOD factors H + beta I from H's own values: no copy
                factor = self.factor_values(pattern, h, H.device, beta)
                if factor is not None:
                    return factor
            values = h.copy()  # (the damped copy; also where H + beta I was not PD)
            values[:, pattern.diag.numpy()] += d
        else:
            values = damped(H, pattern, damping).detach().to("cpu", torch.float64).numpy()
        return self.factor_values(pattern, values, H.device)

    def factor_values(
        self, pattern: Pattern, values: np.ndarray, device: torch.device,
        beta: float | None = None,
    ) -> Any:
        """Factor the damped values ``(B, nnz)`` (float64, owned by the factor); or, with
        ``beta``, the undamped finite values plus ``beta I`` (CHOLMOD, one element: see
        :meth:`_uniform`). ``ok`` on ``device``. A :class:`SparseFactor`, :class:`BlockFactor`,
        ``compiled.CompiledFactor`` or ``threaded.ThreadedFactor``; with ``beta`` on CHOLMOD,
        None where the matrix is not positive definite (the caller factors a damped copy)."""
        batch = values.shape[0]
        if self._use_threaded(pattern.n, batch):
            return threaded.factor(self._threaded_plan(pattern), values, device, beta or 0.0)
        if self._use_compiled(pattern.n, batch):
            return compiled.factor(self._compiled_plan(pattern), values, device)
        if self.backend == "cholmod" and (beta is not None or np.isfinite(values).all()):
            plan = self._plan(pattern, batch)
            if plan.refactor(values, beta or 0.0):
                ok = torch.ones(batch, dtype=torch.bool, device=device)
                return BlockFactor(plan, values, plan.generation, ok, beta or 0.0)
            if beta is not None:
                return None
            # some element is not positive definite: factor one by one to find which
        factors = [self._factor_one(pattern, values[k : k + 1]) for k in range(batch)]
        ok = torch.tensor([f is not None for f in factors], device=device)
        return SparseFactor(factors, ok, self.backend)

    def _factor_one(self, pattern: Pattern, v: np.ndarray) -> Any:
        """Factor one element, values ``(1, nnz)``; None if not positive definite."""
        if not np.isfinite(v).all():
            return None
        if self.backend == "cholmod":
            return self._cholmod(pattern, v)  # a factor of its own (not the plan's in-place one)
        indptr, rows, n = _structure(pattern, 1) + (pattern.n,)
        if self.backend == "cholespy":
            from cholespy import CholeskySolverD, MatrixType

            # int32 indices (cholespy's signature) and a private copy of the values: a view into
            # the (B, nnz) array (k >= 1) corrupts the heap
            try:
                return CholeskySolverD(
                    n,
                    torch.from_numpy(indptr.astype(np.int32)),
                    torch.from_numpy(rows.astype(np.int32)),
                    torch.from_numpy(v[0].copy()),
                    MatrixType.CSC,
                )
            except ValueError:  # "Matrix is not positive definite!"
                return None
        import scipy.sparse as sp
        from scipy.sparse.linalg import splu

        A = sp.csc_matrix((v[0], rows, indptr), shape=(n, n))
        try:  # symmetric mode, diagonal pivots: A is SPD iff every pivot is positive
            lu = splu(
                A,
                permc_spec="MMD_AT_PLUS_A",
                diag_pivot_thresh=0.0,
                options={"SymmetricMode": True},
            )
        except RuntimeError:  # exactly singular
            return None
        return lu if bool((lu.U.diagonal() > 0).all()) else None

    def _plan(self, pattern: Pattern, batch: int) -> _Plan:
        """The CHOLMOD plan of this pattern and batch size (symbolic analysis done once)."""
        from sksparse.cholmod import analyze

        key = (id(pattern), batch)
        plan = self._symbolic.lookup(key, pattern)
        if plan is None:
            indptr, rows = _structure(pattern, batch)
            mode = self._mode(pattern.n)
            plan = _Plan(pattern, None, indptr, rows, mode)
            # analysis reads the structure only: values never written (not faulted in; np.ones
            # of the 100k-pose helix's 115 MB took 85 ms of every fresh objective's analysis)
            dummy = np.empty((batch, pattern.nnz))
            plan.symbolic = analyze(plan.matrix(dummy), mode=mode, ordering_method=self.ordering)
            self._symbolic.store(key, plan)
        return plan

    def _cholmod(self, pattern: Pattern, values: np.ndarray) -> Any:
        """A fresh CHOLMOD factor of ``values (1, nnz)`` (the per-element fallback, which must
        not share the plan's in-place factor); None if not positive definite."""
        plan = self._plan(pattern, values.shape[0])
        return _checked(lambda: plan.symbolic.cholesky(plan.matrix(values)), plan.mode)

    def _uniform(self, pattern: Pattern, h: np.ndarray, d: np.ndarray) -> float | None:
        """The damping as one ``beta`` for ``A + beta I`` where that applies: one batch element
        on CHOLMOD or the one-matrix kernel, the same damping on every unknown (LM's ``lambda
        I``), finite values for CHOLMOD. BA-size ``H`` copies cost as much as a tenth of a
        factorization (100k poses: 43 ms against 0.5-0.9 s)."""
        if (h.shape[0] != 1 or d.size == 0 or self._use_compiled(pattern.n, 1)
                or not (self.backend == "cholmod" or self._use_threaded(pattern.n, 1))):
            return None
        beta = float(d.flat[0])
        if not (d.min() == beta == d.max()):
            return None
        # CHOLMOD needs finite values; the one-matrix kernel checks every value it scatters
        if not self._use_threaded(pattern.n, 1) and not np.isfinite(h).all():
            return None
        return beta

    def _use_compiled(self, n: int, batch: int) -> bool:
        if self.mode != "auto":
            return self.mode == "compiled"
        return KERNELS and batch >= self.batched_from and n <= self.batched_up_to

    def _use_threaded(self, n: int, batch: int) -> bool:
        if self.mode != "auto":
            return self.mode == "threaded" and batch == 1
        return KERNELS and batch == 1 and n <= self.threaded_up_to

    def _threaded_plan(self, pattern: Pattern) -> threaded.TreePlan:
        """The one-matrix kernel's plan of ``pattern`` (analysis, panels and the threads'
        shares; computed once)."""
        from core.solvers.supernodal import analyze_each

        plan = self._threaded.lookup((id(pattern),), pattern)
        if plan is None:
            orderings = (block_ordering(),)  # AMD's fill is the least on small graphs; large
            if orderings == ("amd",) and pattern.n >= THREADED_ND_FROM:  # ones try nested
                orderings += ("nesdis",)  # dissection too
            parts = parallel.pool_size() + 1
            # the orderings scored on their analyses; the panels laid out for the best only
            syms = analyze_each(pattern, orderings)
            sym = min(syms, key=lambda sym: threaded.estimate(sym, parts))
            plan = threaded.split(sym, compiled.plan(sym), parts)
            self._threaded.store((id(pattern),), plan)
        return plan

    def _compiled_plan(self, pattern: Pattern) -> compiled.Plan:
        """The compiled kernel's plan of ``pattern`` (block AMD ordering; computed once)."""
        from core.solvers.supernodal import analyze

        plan = self._compiled.lookup((id(pattern),), pattern)
        if plan is None:
            plan = compiled.plan(analyze(pattern, block_ordering()))
            self._compiled.store((id(pattern),), plan)
        return plan

    def _mode(self, n: int) -> str:
        return self.mode  # "auto": CHOLMOD's own choice from the symbolic analysis


@functools.cache
def prepare_threaded() -> float:
    """Load the one-matrix kernel's compiled code (its symbolic analysis, plan, split,
    factorization and solves, one part or several; from Numba's disk cache, or compiled once per
    installation) by running it on a small graph of two separate chains, which splits into two
    parts; returns the seconds it took. Once per process, when a :class:`SparseCholesky` that
    may use it, or an optimizer that may make one, is made: loading the functions from the cache
    inside a fresh process's first sphere2500 solve took ~0.1 s (cProfile: llvmlite calls),
    compiling them with an empty cache ~10 s, both inside the solve's time."""
    import core
    from core.linearize import linearize
    from core.solvers.supernodal import analyze

    start = time.perf_counter()
    x = core.Variable("x", core.SE3, 6)
    poses = core.SE3.identity(1, 6, dtype=torch.float64)
    between = core.costs.Between(x, torch.tensor([0, 1, 3, 4]), torch.tensor([1, 2, 4, 5]),
                                 poses[:, :4])
    objective = core.Objective([between, core.costs.Prior(x, poses[:, :2], index=[0, 3])])
    lin = linearize(objective, {"x": poses})
    solver = SparseCholesky(mode="threaded", threaded_up_to=0)  # (0: no recursion)
    pattern = lin.pattern
    h = lin.H.numpy().copy()
    h[:, pattern.diag.numpy()] += 1.0
    whole = solver._threaded_plan(pattern)  # analysis and plan (one part: too small to split)
    threaded.factor(whole, h, "cpu", 0.5).solve(lin.g)
    sym = analyze(pattern, block_ordering())
    parts = threaded.split(sym, compiled.plan(sym), 2, min_gain=0.0)  # two chains: two parts
    threaded.factor(parts, h, "cpu", 0.5, threads=1).solve(lin.g, threads=1)
    return time.perf_counter() - start


@dataclass(frozen=True, eq=False)
class _Block:
    """One problem's diagonal block of a ragged batch's pattern: its merged ``columns (n_p,)``
    (increasing), the merged ``entries (nnz_p,)`` of those columns in CSC order, and the block
    as a pattern of its own (``pattern``, local rows and columns, no factor maps)."""

    columns: np.ndarray
    entries: np.ndarray
    pattern: Pattern


def split_blocks(pattern: Pattern, problem: np.ndarray, count: int) -> list[_Block]:
    """The diagonal blocks of a block-diagonal ``pattern`` whose column ``j`` belongs to problem
    ``problem[j]`` (``(n,)``, ``0 <= problem < count``); ``ValueError`` if an entry joins two
    problems. NumPy, once per pattern."""
    indptr, rows = pattern.indptr.cpu().numpy(), pattern.rows.cpu().numpy()
    if bool((problem[rows] != np.repeat(problem, np.diff(indptr))).any()):
        raise ValueError("split_blocks: the pattern is not block-diagonal over the problems")
    order = np.argsort(problem, kind="stable")  # each problem's columns, increasing
    bounds = np.concatenate([[0], np.cumsum(np.bincount(problem, minlength=count))])
    local = np.empty(pattern.n, np.int64)
    local[order] = np.arange(pattern.n) - np.repeat(bounds[:-1], np.diff(bounds))
    blocks = []
    for p in range(count):
        cols = order[bounds[p]: bounds[p + 1]]
        lengths = np.diff(indptr)[cols]
        ptr = np.concatenate([[0], np.cumsum(lengths)])
        entries = np.repeat(indptr[cols] - ptr[:-1], lengths) + np.arange(ptr[-1])
        r = local[rows[entries]]
        c = np.repeat(np.arange(cols.shape[0]), lengths)
        t = torch.from_numpy
        block = Pattern(cols.shape[0], t(ptr), t(r), t(c), t(np.flatnonzero(r == c)), (), ())
        blocks.append(_Block(cols, entries, block))
    return blocks


@dataclass
class RaggedFactor:
    """The factors of a ragged batch's diagonal blocks: ``factors[p]`` is ``(elements, factor)``
    with the batch elements ``(k,)`` whose block ``p`` was factored (None: none was).
    ``ok (B,)``: every factored block of the element positive definite; ``problem_ok (B * P,)``:
    per block (True where not factored). ``solve`` gives zeros in the blocks not factored."""

    blocks: list[_Block]
    factors: list[tuple[np.ndarray, Any] | None]
    ok: Tensor
    problem_ok: Tensor

    def solve(self, b: Tensor) -> Tensor:
        rhs = b.detach().to("cpu", torch.float64).numpy()
        out = np.zeros_like(rhs)
        for block, entry in zip(self.blocks, self.factors):
            if entry is None:
                continue
            elements, factor = entry
            at = np.ix_(elements, block.columns)
            out[at] = factor.solve(torch.from_numpy(rhs[at])).numpy()
        return torch.from_numpy(out).to(b.device, b.dtype)


@dataclass(frozen=True, eq=False)
class _Split:
    """A pattern's blocks and their solvers, and the gathers that put its values ``(B, nnz)``
    in block order: ``order (nnz,)`` the merged entries block after block (block ``p`` at
    ``ptr[p]:ptr[p + 1]``), ``diag (n,)`` the diagonal's places in that order and ``columns
    (n,)`` their merged columns."""

    pattern: Pattern
    blocks: list[_Block]
    solvers: list[SparseCholesky]
    order: np.ndarray
    ptr: np.ndarray
    diag: np.ndarray
    columns: np.ndarray


@dataclass
class RaggedCholesky:
    """Sparse Cholesky of a ragged batch's block-diagonal normal matrix (``core.ragged``).

    While every problem runs, the whole matrix in one factorization by ``template`` (one
    CHOLMOD call: sixteen per-block calls cost 20% more, ``bench.train_step``); once some have
    stopped, one diagonal block (problem) at a time, each with its own :class:`SparseCholesky`
    (made from ``template``; its symbolic analysis done once per block), and only the blocks
    of the problems still running: ``factor(..., active)`` skips the others (their steps are
    zero), so a problem that has converged costs no more factorizations while the slowest one
    runs. Where the whole matrix is not positive definite, the blocks are factored one by one,
    so that only the failing problem fails. ``groups``: the merged objective's grouping (which
    problem each column belongs to)."""

    groups: Grouping
    template: SparseCholesky = field(default_factory=SparseCholesky)
    _split: _Split | None = field(default=None, repr=False)

    def factor(self, H: Tensor, pattern: Pattern, damping: Tensor,
               active: Tensor | None = None
               ) -> RaggedFactor | SparseFactor | BlockFactor | compiled.CompiledFactor:
        """Factor the blocks of ``H + diag(damping)`` (``H (B, nnz)``, ``damping (B, n)``) of
        the elements ``active (B * P,)`` (flattened ``b * P + p``; None: all): the whole
        matrix's factor where all are active and it is positive definite, else a
        :class:`RaggedFactor`."""
        if active is None or bool(active.all()):
            whole = self.template.factor(H, pattern, damping)
            if bool(whole.ok.all()):
                return whole
        split = self._blocks(pattern)
        B, P = H.shape[0], len(split.blocks)
        # the damped values in block order: one gather (a copy the factors own), one scatter
        values = H.detach().to("cpu", torch.float64).numpy()[:, split.order]
        values[:, split.diag] += damping.detach().to("cpu", torch.float64).numpy()[
            :, split.columns]
        run = (np.ones((B, P), dtype=bool) if active is None
               else active.detach().cpu().numpy().reshape(B, P))
        ok = np.ones((B, P), dtype=bool)
        factors: list[tuple[np.ndarray, Any] | None] = []
        cpu = torch.device("cpu")
        for p, (block, solver) in enumerate(zip(split.blocks, split.solvers)):
            elements = np.flatnonzero(run[:, p])
            if elements.shape[0] == 0:
                factors.append(None)
                continue
            mine = slice(split.ptr[p], split.ptr[p + 1])
            v = values[:, mine] if elements.shape[0] == B else values[elements, mine]
            f = solver.factor_values(block.pattern, v, cpu)
            ok[elements, p] = f.ok.numpy()
            factors.append((elements, f))
        return RaggedFactor(split.blocks, factors, torch.from_numpy(ok.all(1)).to(H.device),
                            torch.from_numpy(ok.reshape(-1)).to(H.device))

    def _blocks(self, pattern: Pattern) -> _Split:
        """The blocks of ``pattern`` and their solvers, split once (a merged objective has one
        pattern; another one replaces it)."""
        if self._split is None or self._split.pattern is not pattern:
            blocks = split_blocks(pattern, self.groups.columns.cpu().numpy(), self.groups.count)
            solvers = [replace(self.template, _symbolic=PlanCache(), _compiled=PlanCache(),
                               _threaded=PlanCache()) for _ in blocks]
            ptr = np.concatenate([[0], np.cumsum([b.entries.shape[0] for b in blocks])])
            self._split = _Split(
                pattern, blocks, solvers, np.concatenate([b.entries for b in blocks]), ptr,
                np.concatenate([o + b.pattern.diag.numpy() for o, b in zip(ptr, blocks)]),
                np.concatenate([b.columns for b in blocks]))
        return self._split


def _structure(pattern: Pattern, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """CSC ``indptr, rows`` of the block-diagonal matrix of ``batch`` copies of ``pattern``: in
    CSC order the blocks' values are simply the ``(B, nnz)`` values concatenated."""
    n, nnz = pattern.n, pattern.nnz
    index = np.int32 if batch * nnz < 2**31 else np.int64  # CHOLMOD's int32 interface if it fits
    indptr = pattern.indptr.cpu().numpy().astype(index)
    rows = pattern.rows.cpu().numpy().astype(index)
    if batch == 1:
        return indptr, rows
    offsets = np.arange(batch, dtype=index)[:, None]
    big_indptr = np.concatenate([(indptr[:-1] + nnz * offsets).reshape(-1), [batch * nnz]])
    return big_indptr.astype(index), (rows + n * offsets).reshape(-1)


def _checked(factorize: Callable[[], Any], mode: str) -> Any:
    """The CHOLMOD factor ``factorize()`` returns, or None if ``A`` is not positive definite: a
    supernodal LL^T raises (or warns on a non-positive pivot); a simplicial LDL^T has a
    non-positive entry in D."""
    from sksparse.cholmod import CholmodNotPositiveDefiniteError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            factor = factorize()
    except (CholmodNotPositiveDefiniteError, Warning):
        return None
    if mode != "supernodal" and not bool((factor.D() > 0).all()):
        return None
    return factor
