"""Linear solvers for the damped normal equations, behind one protocol (``base.LinearSolver``)."""

from __future__ import annotations

from typing import Literal

from core.solvers.base import Factor, LinearSolver, damped, solve
from core.solvers.dense import DenseCholesky
from core.solvers.pcg import PCG
from core.solvers.schur import Schur
from core.solvers.sparse import SparseCholesky, available_backends

SolverName = Literal["auto", "dense", "sparse", "cholmod", "cholespy", "scipy", "pcg"]

__all__ = [
    "DenseCholesky",
    "Factor",
    "LinearSolver",
    "PCG",
    "Schur",
    "SolverName",
    "SparseCholesky",
    "available_backends",
    "damped",
    "make_solver",
    "solve",
]


def make_solver(name: SolverName | LinearSolver, n: int, device: str = "cpu") -> LinearSolver:
    """A solver from its name; ``"auto"``: dense for ``n <= 500`` or off the CPU, else sparse."""
    if not isinstance(name, str):
        return name
    if name == "auto":
        name = "dense" if n <= 500 or str(device) != "cpu" else "sparse"
    if name == "dense":
        return DenseCholesky()
    if name == "sparse":
        return SparseCholesky()
    if name in ("cholmod", "cholespy", "scipy"):
        return SparseCholesky(backend=name)
    if name == "pcg":
        return PCG()  # blocks inferred from the pattern; PCG(objective) to name them
    raise ValueError(f"unknown solver {name!r}; use one of auto, dense, sparse, cholmod, "
                     "cholespy, scipy, pcg or pass a LinearSolver")
