"""Linear solvers for the damped normal equations, behind one protocol (``base.LinearSolver``)."""

from __future__ import annotations

from typing import Literal

import torch

from core.solvers import cudss
from core.solvers.base import Factor, LinearSolver, damped, solve
from core.solvers.cudss import CuDSS
from core.solvers.dense import DenseCholesky
from core.solvers.pcg import PCG
from core.solvers.schur import Schur
from core.solvers.sparse import SparseCholesky, available_backends
from core.solvers.supernodal import SupernodalCholesky

SolverName = Literal["auto", "dense", "sparse", "cholmod", "cholespy", "scipy", "pcg", "cudss",
                     "supernodal"]

__all__ = [
    "CuDSS",
    "DenseCholesky",
    "Factor",
    "LinearSolver",
    "PCG",
    "Schur",
    "SolverName",
    "SparseCholesky",
    "SupernodalCholesky",
    "available_backends",
    "damped",
    "make_solver",
    "solve",
]


#: the largest system ``"auto"`` factors densely on CUDA without cuDSS (``make_solver``)
DENSE_CUDA_MAX = 4000


def make_solver(name: SolverName | LinearSolver, n: int, device: str = "cpu") -> LinearSolver:
    """A solver from its name. ``"auto"``: dense for ``n <= 500``; above, sparse Cholesky on the
    CPU; on CUDA cuDSS when installed, else dense up to ``DENSE_CUDA_MAX`` unknowns and the
    batched supernodal Cholesky above (a dense factor needs ``8 n^2`` bytes per batch element:
    3.2 GB at 20,000 unknowns, which is where a GPU batch runs out of memory; the sparse factor
    grows with its fill). ``"supernodal"``: the batched supernodal Cholesky in torch
    (``core.solvers.supernodal``; CPU or CUDA, one symbolic analysis for a same-structure batch;
    on the CPU ``"sparse"`` runs its compiled form for batches, see bench/RESULTS.md)."""
    if not isinstance(name, str):
        return name
    if name == "auto":
        on_cpu = torch.device(device).type == "cpu"
        if n <= 500:
            name = "dense"
        elif on_cpu:
            name = "sparse"
        else:
            name = "cudss" if cudss.available() else (
                "dense" if n <= DENSE_CUDA_MAX else "supernodal")
    if name == "dense":
        return DenseCholesky()
    if name == "sparse":
        return SparseCholesky()
    if name in ("cholmod", "cholespy", "scipy"):
        return SparseCholesky(backend=name)
    if name == "cudss":
        return CuDSS()
    if name == "pcg":
        return PCG()  # blocks inferred from the pattern; PCG(objective) to name them
    if name == "supernodal":
        return SupernodalCholesky()
    raise ValueError(f"unknown solver {name!r}; use one of auto, dense, sparse, cholmod, "
                     "cholespy, scipy, pcg, cudss, supernodal or pass a LinearSolver")
