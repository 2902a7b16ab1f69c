"""Batched supernodal Cholesky vs CHOLMOD on the block-diagonal batch (python -m bench.supernodal).

Per case (SE(3) helix pose graphs from ``bench.synthetic``, the real normal equations at the
initial estimate plus a Levenberg damping of ``1e-4``): the time of one factorization + one solve
with :class:`core.solvers.supernodal.SupernodalCholesky` and with ``SparseCholesky`` (CHOLMOD
factoring the ``B`` matrices as one block-diagonal matrix, what core does today for a batch of
one structure), timed in alternation (A B A B ...) in one process, median of each and median of
the pairwise ratios; the torch calls of one factorization (every call through
``__torch_function__``: tensor methods, views and indexing included); the tree's depth, the
number of supernodes and padded groups, and the relative difference of the two solutions.

Quote the ratios and the load printed on the first line: on a shared machine single times drift.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from bench.__main__ import pose_graph_objective
from bench.synthetic import pose_graph_batch
from core.linearize import linearize
from core.solvers import SparseCholesky
from core.solvers.supernodal import SupernodalCholesky

CASES = {  # name -> (poses, batch, timed pairs)
    "helix256x1": (256, 1, 15),
    "helix256x16": (256, 16, 9),
    "helix256x64": (256, 64, 7),
    "helix1k": (1000, 1, 9),
    "helix10k": (10000, 1, 5),
}


class CallCounter(TorchFunctionMode):
    """Counts the torch calls (functions, methods, indexing) made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.calls += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Row:
    case: str
    n: int
    batch: int
    depth: int
    supernodes: int
    groups: int
    calls: int
    analysis_ms: float
    supernodal_ms: float
    cholmod_ms: float
    ratio: float
    rel_diff: float


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_case(name: str, poses: int, batch: int, pairs: int) -> Row:
    objective, init = pose_graph_objective(pose_graph_batch(poses, batch, seed=0))
    lin = linearize(objective, init)
    pattern, H, g = lin.pattern, lin.H, lin.g
    damping = torch.full((batch, pattern.n), 1e-4, dtype=H.dtype)
    ours, cholmod = SupernodalCholesky(), SparseCholesky(backend="cholmod")

    def supernodal() -> torch.Tensor:
        return ours.factor(H, pattern, damping).solve(g)

    def block_diagonal() -> torch.Tensor:
        return cholmod.factor(H, pattern, damping).solve(g)

    first, x = _timed(supernodal)  # analysis + schedule + the first factorization
    _, ref = _timed(block_diagonal)
    counter = CallCounter()
    with counter:
        ours.factor(H, pattern, damping)
    a_times, b_times = [], []
    for _ in range(pairs):
        a_times.append(_timed(supernodal)[0])
        b_times.append(_timed(block_diagonal)[0])
    sym = ours.symbolic(pattern)
    sched = ours.schedule(pattern, batch, H.device)
    a, b = statistics.median(a_times), statistics.median(b_times)
    ratio = statistics.median(x / y for x, y in zip(a_times, b_times))
    rel = float(((x - ref).norm(dim=-1) / ref.norm(dim=-1)).max())
    return Row(name, pattern.n, batch, sym.depth, sym.num_supernodes, len(sched.groups),
               counter.calls, 1e3 * (first - a), 1e3 * a, 1e3 * b, ratio, rel)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's); set OMP_NUM_THREADS for CHOLMOD's BLAS as well")
    parser.add_argument("--pairs", type=int, default=None, help="timed A/B pairs per case")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {load}")
    print("# time = one factorization + one solve; ratio = median of pairwise supernodal/cholmod")
    header = (f"{'case':<12} {'n':>6} {'B':>3} {'depth':>5} {'supern.':>7} {'groups':>6} "
              f"{'calls':>6} {'analysis ms':>11} {'supernodal ms':>13} {'cholmod ms':>10} "
              f"{'ratio':>6} {'rel diff':>8}")
    print(header)
    rows = []
    for name in args.cases:
        poses, batch, pairs = CASES[name]
        r = run_case(name, poses, batch, args.pairs or pairs)
        rows.append(r)
        print(f"{r.case:<12} {r.n:>6} {r.batch:>3} {r.depth:>5} {r.supernodes:>7} {r.groups:>6} "
              f"{r.calls:>6} {r.analysis_ms:>11.1f} {r.supernodal_ms:>13.1f} "
              f"{r.cholmod_ms:>10.1f} {r.ratio:>6.2f} {r.rel_diff:>8.1e}", flush=True)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# load average at the end {load}")
    return rows


if __name__ == "__main__":
    main()
