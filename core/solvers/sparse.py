"""Sparse Cholesky on the CPU, one symbolic analysis per pattern, one numeric factor per element.

Backends, fastest first (measured in ``bench/``): CHOLMOD supernodal (scikit-sparse, on
OpenBLAS), cholespy, SciPy's SuperLU. The symbolic analysis (fill-reducing ordering, supernodes)
is computed once per pattern and reused by every factorization of every batch element.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from core.objective import Pattern
from core.solvers.base import damped

Backend = Literal["auto", "cholmod", "cholespy", "scipy"]


def available_backends() -> list[str]:
    """Installed sparse backends, fastest first."""
    found = []
    if importlib.util.find_spec("sksparse") is not None:
        found.append("cholmod")
    if importlib.util.find_spec("cholespy") is not None:
        found.append("cholespy")
    found.append("scipy")
    return found


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
class SparseCholesky:
    """Sparse direct solver (CPU). ``backend="auto"`` picks the fastest installed one."""

    backend: Backend = "auto"
    ordering: str = "default"
    _symbolic: dict[int, tuple[Pattern, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        have = available_backends()
        if self.backend == "auto":
            self.backend = have[0]  # type: ignore[assignment]
        elif self.backend not in have:
            raise ValueError(f"sparse backend {self.backend!r} is not installed; have {have}")

    def factor(self, H: Tensor, pattern: Pattern, damping: Tensor) -> SparseFactor:
        values = damped(H, pattern, damping).detach().to("cpu", torch.float64).numpy()
        indptr = pattern.indptr.cpu().numpy().astype(np.int64)
        rows = pattern.rows.cpu().numpy().astype(np.int64)
        factors, ok = [], []
        for k in range(values.shape[0]):
            f = self._factor_one(pattern, indptr, rows, values[k])
            factors.append(f)
            ok.append(f is not None)
        return SparseFactor(factors, torch.tensor(ok, device=H.device), self.backend)

    def _factor_one(self, pattern: Pattern, indptr: np.ndarray, rows: np.ndarray, v: np.ndarray):
        import scipy.sparse as sp

        if not np.isfinite(v).all():
            return None
        n = pattern.n
        A = sp.csc_matrix((v, rows, indptr), shape=(n, n))
        if self.backend == "cholmod":
            from sksparse.cholmod import CholmodNotPositiveDefiniteError

            symbolic = self._analysis(pattern, A)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # CHOLMOD warns on a non-positive pivot
                    return symbolic.cholesky(A)
            except (CholmodNotPositiveDefiniteError, Warning):
                return None
        if self.backend == "cholespy":
            from cholespy import CholeskySolverD, MatrixType

            # int32 indices (cholespy's signature) and a private copy of the values: a view into
            # the (B, nnz) array (k >= 1) corrupts the heap
            try:
                return CholeskySolverD(
                    n,
                    torch.from_numpy(indptr.astype(np.int32)),
                    torch.from_numpy(rows.astype(np.int32)),
                    torch.from_numpy(v.copy()),
                    MatrixType.CSC,
                )
            except ValueError:  # "Matrix is not positive definite!"
                return None
        from scipy.sparse.linalg import splu

        try:  # symmetric mode, diagonal pivots: A is SPD iff every pivot is positive
            lu = splu(A, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                      options={"SymmetricMode": True})
        except RuntimeError:  # exactly singular
            return None
        return lu if bool((lu.U.diagonal() > 0).all()) else None

    def _analysis(self, pattern: Pattern, A: Any) -> Any:
        key = id(pattern)
        cached = self._symbolic.get(key)
        if cached is None or cached[0] is not pattern:
            from sksparse.cholmod import analyze

            cached = (pattern, analyze(A, mode="supernodal", ordering_method=self.ordering))
            self._symbolic[key] = cached
        return cached[1]
