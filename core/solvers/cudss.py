"""Sparse Cholesky on CUDA: NVIDIA cuDSS through nvmath-python's bindings, uniform batching.

A batch of ``B`` damped normal matrices shares one structure (``Pattern``), which is exactly
cuDSS's *uniform batch* (``CUDSS_CONFIG_UBATCH_SIZE``): one CSR structure, ``B`` value arrays
stored one after another. Per pattern, batch size, dtype and device a :class:`_Plan` runs the
analysis (fill-reducing reordering + symbolic factorization) once; then every ``factor`` copies
the new values into the plan's device buffer and refactorizes the whole batch in one call, and
every ``solve`` copies ``b`` into the plan's right-hand-side buffer and runs the solve phase.
Nothing leaves the device: no host copies in the inner loop, no per-element Python.

Why nvmath's low-level ``nvmath.bindings.cudss`` and not its ``DirectSolver`` class: the class
batches a 3-D CSR tensor as cuDSS's *non-uniform* batch (one pointer per matrix, analysed matrix
by matrix), while uniform batching (``UBATCH_SIZE``: one analysis, values side by side) is what a
batch of same-structure normal equations needs; the class also re-wraps operands per call.

The pattern is stored in full (both triangles, CSC); for a symmetric matrix the CSC arrays are
the CSR arrays of the same matrix, so they are handed to cuDSS as they are.

Positive definiteness: cuDSS perturbs tiny pivots instead of failing, so a factor cannot say by
itself whether a matrix was positive definite. ``ok (B,)`` is therefore checked on the device
after every solve: the solution is finite and its residual ``||A x - b|| <= check_tol ||b||``.
Before the first solve ``ok`` is all True (like PCG's ``converged``); the optimizer reads it
after its solve, and the adjoint solve raises on ``ok == False``.

A plan holds one factorization at a time. A factor whose plan has since been refactorized with
other values (another forward pass with the same structure before this factor's backward) is
refactorized from its own values when it is solved again: stale factors never give wrong answers.

Install the extra ``ariadne-nls[cuda]`` (nvmath-python and the cuDSS wheel for your CUDA).
"""

from __future__ import annotations

import importlib.util
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from core.objective import Pattern
from core.solvers.base import PlanCache, damped

_VALUE_TYPES = {torch.float64: "R_64F", torch.float32: "R_32F"}
_CHECK_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}


def available() -> bool:
    """Whether nvmath-python with cuDSS bindings is installed (a GPU is checked when used)."""
    return importlib.util.find_spec("nvmath") is not None and torch.cuda.is_available()


def _bindings() -> Any:
    try:
        from nvmath.bindings import cudss
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "solver 'cudss' needs nvmath-python and NVIDIA cuDSS: pip install 'ariadne-nls[cuda]'"
        ) from e
    return cudss


class _Handle:
    """A cuDSS library handle for one device; destroyed when the last plan using it is gone."""

    def __init__(self, device: torch.device) -> None:
        cudss = _bindings()
        with torch.cuda.device(device):
            self.ptr: int = cudss.create()
        self.device = device
        weakref.finalize(self, cudss.destroy, self.ptr)


class _Plan:
    """cuDSS objects and device buffers for one (pattern, batch, dtype, device).

    ``values (B * nnz,)``, ``rhs (B * n,)``, ``sol (B * n,)``: the buffers cuDSS reads and
    writes (batch-major: element ``k``'s values at ``[k * nnz, (k + 1) * nnz)``);
    ``generation``: bumped by every factorization, so factors can tell whether they are current.
    """

    def __init__(
        self,
        handle: _Handle,
        pattern: Pattern,
        batch: int,
        dtype: torch.dtype,
        matrix_type: str = "SPD",
        view: str = "FULL",
    ) -> None:
        cudss = _bindings()
        if dtype not in _VALUE_TYPES:
            raise TypeError(f"solver 'cudss': dtype {dtype} is not supported (float32, float64)")
        device = handle.device
        n, nnz = pattern.n, pattern.nnz
        self.handle, self.pattern, self.batch, self.generation = handle, pattern, batch, 0
        self.indptr = pattern.indptr.to(device, torch.int32).contiguous()
        self.indices = pattern.rows.to(device, torch.int32).contiguous()
        self.values = torch.zeros(batch * nnz, dtype=dtype, device=device)
        self.rhs = torch.zeros(batch * n, dtype=dtype, device=device)
        self.sol = torch.zeros(batch * n, dtype=dtype, device=device)
        value_type = getattr(cudss.DataType, _VALUE_TYPES[dtype])
        i32 = cudss.DataType.R_32I
        self.config = cudss.config_create()
        self.data = cudss.data_create(handle.ptr)
        if batch > 1:
            ubatch = torch.tensor([batch], dtype=torch.int32).numpy()
            cudss.config_set(self.config, cudss.ConfigParam.UBATCH_SIZE, ubatch.ctypes.data, 4)
        self.A = cudss.matrix_create_csr(
            n, n, nnz, self.indptr.data_ptr(), 0, self.indices.data_ptr(),
            self.values.data_ptr(), i32, i32, value_type, getattr(cudss.MatrixType, matrix_type),
            getattr(cudss.MatrixViewType, view), cudss.IndexBase.ZERO,
        )  # fmt: skip
        self.B = cudss.matrix_create_dn(
            n, 1, n, self.rhs.data_ptr(), value_type, cudss.Layout.COL_MAJOR
        )
        self.X = cudss.matrix_create_dn(
            n, 1, n, self.sol.data_ptr(), value_type, cudss.Layout.COL_MAJOR
        )
        weakref.finalize(
            self, _destroy, cudss, handle, self.config, self.data, (self.A, self.B, self.X)
        )
        self.analyzed = False

    def run(self, phase: str) -> None:
        """Run one cuDSS phase (``ANALYSIS``, ``FACTORIZATION``, ``SOLVE``) on torch's stream."""
        cudss = _bindings()
        stream = torch.cuda.current_stream(self.handle.device).cuda_stream
        cudss.set_stream(self.handle.ptr, stream)
        cudss.execute(
            self.handle.ptr, getattr(cudss.Phase, phase), self.config, self.data,
            self.A, self.X, self.B,
        )  # fmt: skip

    def factorize(self, values: Tensor) -> int:
        """Factor the ``(B, nnz)`` ``values``; returns the new generation."""
        self.values.copy_(values.reshape(-1))
        if not self.analyzed:
            self.run("ANALYSIS")
            self.analyzed = True
        self.run("FACTORIZATION")
        self.generation += 1
        return self.generation


def _destroy(
    cudss: Any, handle: _Handle, config: int, data: int, matrices: tuple[int, ...]
) -> None:
    for m in matrices:
        cudss.matrix_destroy(m)
    cudss.data_destroy(handle.ptr, data)
    cudss.config_destroy(config)


@dataclass
class CuDSSFactor:
    """A uniform-batch cuDSS factorization of the damped values ``A (B, nnz)``.

    ``ok (B,)``: False where the last solve's residual showed the matrix was not (numerically)
    positive definite; all True before the first solve.
    """

    plan: _Plan
    A: Tensor
    generation: int
    check_tol: float
    ok: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.ok = torch.ones(self.A.shape[0], dtype=torch.bool, device=self.A.device)

    def solve(self, b: Tensor) -> Tensor:
        """``A^-1 b`` for ``b (B, n)`` on the device; updates ``ok``."""
        plan, pattern = self.plan, self.plan.pattern
        if plan.generation != self.generation:  # the plan has factored other values since
            self.generation = plan.factorize(self.A)
        rhs = b.detach().to(self.A.dtype)
        plan.rhs.copy_(rhs.reshape(-1))
        plan.run("SOLVE")
        x = plan.sol.view(rhs.shape).clone()
        residual = pattern.matvec(self.A, x) - rhs
        scale = rhs.abs().amax(-1).clamp_min(torch.finfo(rhs.dtype).tiny)
        good = torch.isfinite(x).all(-1) & (residual.abs().amax(-1) <= self.check_tol * scale)
        # x = A^-1 b with A positive definite has b.x > 0 (a descent direction for LM)
        good = good & (((rhs * x).sum(-1) > 0) | (rhs == 0).all(-1))
        self.ok = self.ok & good
        return torch.where(good[:, None], x, torch.zeros_like(x)).to(b.dtype)


@dataclass
class CuDSS:
    """Batched sparse Cholesky on a CUDA device with cuDSS (see the module docstring).

    Fields:
        check_tol: a solve whose max-norm residual exceeds ``check_tol * ||b||_max`` marks its
            element not ok (not positive definite, or too ill-conditioned to trust); default
            1e-6 in float64, 1e-3 in float32.
        matrix_type: cuDSS's matrix type: ``"SPD"`` (Cholesky), ``"SYMMETRIC"`` (LDL^T) or
            ``"GENERAL"`` (LU).
        view: which stored triangle(s) cuDSS reads: ``"FULL"``, ``"LOWER"``, ``"UPPER"``.
    """

    check_tol: float | None = None
    matrix_type: Literal["SPD", "SYMMETRIC", "GENERAL"] = "SPD"
    view: Literal["FULL", "LOWER", "UPPER"] = "FULL"
    _handles: dict[torch.device, _Handle] = field(default_factory=dict, repr=False)
    _plans: PlanCache = field(default_factory=PlanCache, repr=False)

    def factor(self, H: Tensor, pattern: Pattern, damping: Tensor) -> CuDSSFactor:
        if H.device.type != "cuda":
            raise ValueError(
                f"solver 'cudss' runs on CUDA tensors; H is on {H.device} (use 'sparse' on the CPU)"
            )
        A = damped(H, pattern, damping).detach().contiguous()
        plan = self._plan(pattern, A)
        tol = self.check_tol if self.check_tol is not None else _CHECK_TOL[A.dtype]
        return CuDSSFactor(plan, A, plan.factorize(A), tol)

    def _plan(self, pattern: Pattern, A: Tensor) -> _Plan:
        key = (id(pattern), A.shape[0], A.dtype, A.device)
        plan = self._plans.lookup(key, pattern)
        if plan is None:
            handle = self._handles.get(A.device)
            if handle is None:
                handle = self._handles[A.device] = _Handle(A.device)
            plan = _Plan(handle, pattern, A.shape[0], A.dtype, self.matrix_type, self.view)
            self._plans.store(key, plan)
        return plan
