"""Python work per LM iteration does not grow with the number of factors.

    python -m bench.doubling [--poses N] [--repeats R]

A helix pose graph (odometry and loop closures) and the same graph with every edge measured
twice: twice the factors on the same sparsity pattern, so the factorization costs the same and
the difference is the per-factor work. Both are solved for a fixed number of LM iterations
(convergence tests off), interleaved; the table gives the median time per iteration and the
number of Python function calls per iteration (cProfile), which must not depend on E.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import core
from bench.synthetic import pose_graph_batch


def _problem(poses: int, copies: int) -> tuple[core.Objective, dict[str, torch.Tensor], int]:
    data = pose_graph_batch(poses, 1, seed=0)
    var = core.Variable("poses", core.SE3, count=data.num_poses)
    i, j = data.i.repeat(copies), data.j.repeat(copies)
    between = core.costs.Between(
        var,
        i,
        j,
        data.measurements.repeat(1, copies, 1),
        sqrt_info=data.sqrt_information().repeat(copies, 1, 1),
        name="between",
    )
    prior = core.costs.Prior(var, data.init[:, :1], index=0, sqrt_info=1e3, name="prior")
    return core.Objective([between, prior]), {"poses": data.init}, int(i.shape[0])


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(prog="python -m bench.doubling", description=__doc__)
    parser.add_argument("--poses", type=int, default=5000)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    never = -1.0
    lm = core.LevenbergMarquardt(
        max_iters=args.iterations,
        solver="sparse",
        rel_tol=never,
        abs_tol=never,
        step_tol=never,
        grad_tol=never,
    )
    problems = [_problem(args.poses, copies) for copies in (1, 2)]
    times: list[list[float]] = [[], []]
    calls = []
    for objective, init, _ in problems:
        lm.solve(objective, init)  # warm-up: pattern, symbolic analysis
        profile = cProfile.Profile()
        profile.enable()
        lm.solve(objective, init)
        profile.disable()
        calls.append(pstats.Stats(profile).total_calls / args.iterations)  # type: ignore[attr-defined]
    for _ in range(args.repeats):
        for k, (objective, init, _) in enumerate(problems):
            start = time.perf_counter()
            lm.solve(objective, init)
            times[k].append((time.perf_counter() - start) / args.iterations)
    rows = []
    print(f"{'edges':>8}{'s/iter':>10}{'py calls/iter':>15}")
    for k, (_, _, edges) in enumerate(problems):
        per_iter = statistics.median(times[k])
        rows.append({"edges": edges, "time_per_iter_s": per_iter, "calls_per_iter": calls[k]})
        print(f"{edges:>8}{per_iter:>10.4f}{calls[k]:>15.0f}")
    ratio = rows[1]["time_per_iter_s"] / rows[0]["time_per_iter_s"]
    print(f"time ratio (2x edges / 1x edges): {ratio:.2f}")
    return rows


if __name__ == "__main__":
    main()
