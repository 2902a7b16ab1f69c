"""A training step through the solver: one ragged call versus the per-problem loop.

    python -m bench.train_step [--graphs 16] [--repeats 5] [--max-iters 30]

The pose-graph app's problem (``apps.pose_graph``: odometry, robust loop closures whose
per-edge weights and loss scale are the layer's inputs, a gauge prior) on ``--graphs`` synthetic
SE(3) graphs of 150-250 poses, all of different structures (``apps.pose_graph.data``). One step
is the forward solve plus the implicit backward of the mean pose loss against ground truth, with
respect to every graph's loop weights and the shared scale:

* ``loop``: ``OptimizationLayer(objective_k)(inputs_k)`` for each graph (what the apps did);
* ``ragged``: one ``OptimizationLayer.ragged(objectives, inputs)`` call, its merged structure
  and symbolic analysis cached (``core.ragged``: a training set reuses combinations);
* ``ragged-new``: the same with an empty cache every step (a combination never seen: merging
  the patterns and CHOLMOD's analyses are paid in the step);
* ``ragged-merged``: the ragged call with one ``SparseCholesky`` of the whole block-diagonal
  matrix (the ``solver`` argument), which factors every problem every iteration until the
  slowest converges (the default, ``RaggedCholesky``, factors the whole matrix while every
  problem runs and then only the running problems' blocks).

The modes are timed interleaved (median of ``--repeats``), after one warm-up each. The table
gives the time per step, the ratio to ``loop``, the part of the step spent in the sparse
factorizations (``SparseCholesky.factor``, ``RaggedCholesky.factor``), the problems factored
per step (one per LM iteration of each running problem and one at each solution for the
backward; ``ragged-merged`` factors all ``--graphs`` every iteration), the LM iterations (sum
over graphs for the loop, the longest problem's for a ragged call) and the largest relative
gradient difference to the loop's (``max |g - g_loop| / max |g_loop|`` over the weight tensors
and the scale).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import core
from apps.pose_graph.data import GraphSpec, make_sample
from apps.pose_graph.problem import GraphProblem, pose_loss
from core import ragged
from core.solvers import SparseCholesky
from core.solvers.sparse import RaggedCholesky


def problems(graphs: int, seed: int = 0) -> tuple[list[GraphProblem], list]:
    """``graphs`` pose-graph problems of different sizes and structures, and their samples."""
    spec = GraphSpec()
    samples = [make_sample(spec, seed + k) for k in range(graphs)]
    return [GraphProblem.build(s.graph, s.is_loop) for s in samples], samples


def make_step(mode: str, probs: list[GraphProblem], samples: list, max_iters: int
              ) -> Callable[[], tuple[list[torch.Tensor], list[int]]]:
    """A function running one step; returns the gradients (per-graph weights, then the scale)
    and the iterations."""
    lm = core.LevenbergMarquardt(max_iters=max_iters)
    layers = [core.OptimizationLayer(p.objective, lm, backward="implicit") for p in probs]
    objectives = [p.objective for p in probs]

    def step() -> tuple[list[torch.Tensor], list[int]]:
        weights = [torch.full((p.num_loops,), 0.8, dtype=torch.float64, requires_grad=True)
                   for p in probs]
        scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        inputs = [p.inputs(w, scale) for p, w in zip(probs, weights)]
        if mode == "loop":
            outs, iters = [], []
            for layer, x in zip(layers, inputs):
                sol, info = layer(x)
                outs.append(sol["poses"])
                iters.append(int(info.iterations.sum()))
        else:
            cache = ragged.RaggedCache(1) if mode == "ragged-new" else None
            solver = _merged_solver if mode == "ragged-merged" else None
            sols, info = layers[0].ragged(objectives, inputs, cache=cache, solver=solver)
            outs = [s["poses"] for s in sols]
            iters = [int(info.iterations.max())]
        loss = sum(pose_loss(x, s.truth, s.space).sum() for x, s in zip(outs, samples))
        grads = torch.autograd.grad(loss / len(probs), [*weights, scale])
        return list(grads), iters

    return step


def _merged_solver(objective: core.Objective) -> SparseCholesky:
    """One sparse Cholesky of a ragged batch's whole block-diagonal matrix."""
    return SparseCholesky()


class _FactorClock:
    """Seconds spent inside ``SparseCholesky.factor`` and ``RaggedCholesky.factor`` (the
    outermost call: a ``RaggedCholesky`` factors through ``SparseCholesky``), and the problems
    factored (``SparseCholesky.factor_values`` calls; one of the whole block-diagonal matrix,
    ``merged_n`` unknowns, counts ``graphs``), while installed (wrappers on the classes, removed
    on exit)."""

    def __init__(self, merged_n: int, graphs: int) -> None:
        self.seconds, self.calls, self._depth = 0.0, 0, 0
        self.merged_n, self.graphs = merged_n, graphs

    def __enter__(self) -> _FactorClock:
        self._originals = {(cls, "factor"): cls.factor for cls in (SparseCholesky, RaggedCholesky)}
        for (cls, _), original in self._originals.items():
            cls.factor = self._timed(original)  # type: ignore[method-assign]
        self._originals[(SparseCholesky, "factor_values")] = counted = SparseCholesky.factor_values

        def count(*args: object) -> object:
            pattern = args[1]
            self.calls += self.graphs if pattern.n == self.merged_n else 1  # type: ignore[attr-defined]
            return counted(*args)  # type: ignore[arg-type]

        SparseCholesky.factor_values = count  # type: ignore[method-assign,assignment]
        return self

    def _timed(self, original: Callable[..., object]) -> Callable[..., object]:
        def timed(*args: object) -> object:
            start = time.perf_counter()
            self._depth += 1
            try:
                return original(*args)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start

        return timed

    def __exit__(self, *exc: object) -> None:
        for (cls, name), original in self._originals.items():
            setattr(cls, name, original)


def run(graphs: int = 16, repeats: int = 5, max_iters: int = 30) -> list[dict[str, object]]:
    """The table's rows (see the module docstring)."""
    probs, samples = problems(graphs)
    modes = ("loop", "ragged", "ragged-new", "ragged-merged")
    steps = {m: make_step(m, probs, samples, max_iters) for m in modes}
    merged_n = sum(p.objective.dim for p in probs)
    grads, iters = {}, {}
    for m in modes:  # warm-up: patterns, symbolic analyses, kernels
        grads[m], iters[m] = steps[m]()
    times: dict[str, list[float]] = {m: [] for m in modes}
    factor: dict[str, list[float]] = {m: [] for m in modes}
    factored: dict[str, int] = {}
    for _ in range(repeats):
        for m in modes:
            with _FactorClock(merged_n, graphs) as clock:
                start = time.perf_counter()
                steps[m]()
                times[m].append(time.perf_counter() - start)
            factor[m].append(clock.seconds)
            factored[m] = clock.calls
    base = statistics.median(times["loop"])
    rows = []
    for m in modes:
        diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
                   for a, b in zip(grads[m], grads["loop"]))
        t = statistics.median(times[m])
        rows.append({"mode": m, "step_s": t, "speedup": base / t,
                     "factor_s": statistics.median(factor[m]), "factored": factored[m],
                     "iterations": sum(iters[m]),
                     "grad_rel_diff": diff})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graphs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-iters", type=int, default=30)
    args = parser.parse_args()
    probs, _ = problems(args.graphs)
    sizes = [p.graph.num_poses for p in probs]
    load = os.getloadavg()[0]
    print(f"{args.graphs} SE(3) pose graphs, {min(sizes)}-{max(sizes)} poses "
          f"({sum(sizes)} in all), forward + implicit backward, torch threads "
          f"{torch.get_num_threads()}, 1-min load {load:.1f}, median of {args.repeats}")
    rows = run(args.graphs, args.repeats, args.max_iters)
    print(f"{'mode':<14}{'step (s)':>10}{'speedup':>9}{'factor (s)':>12}{'factored':>10}"
          f"{'LM iters':>10}{'grad rel diff':>15}")
    for r in rows:
        print(f"{r['mode']:<14}{r['step_s']:>10.3f}{r['speedup']:>8.2f}x{r['factor_s']:>12.3f}"
              f"{r['factored']:>10}{r['iterations']:>10}{r['grad_rel_diff']:>15.2e}")


if __name__ == "__main__":
    main()
