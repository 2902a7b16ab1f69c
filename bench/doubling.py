"""Python work per LM iteration does not grow with the number of factors.

    python -m bench.doubling [--poses N] [--repeats R]

A helix pose graph (odometry and loop closures) and the same graph with every edge measured
twice: twice the factors on the same sparsity pattern, so the factorization costs the same and
the difference is the per-factor work. Both are solved for a fixed number of LM iterations
(convergence tests off), interleaved; the table gives the median time per iteration and the
number of Python function calls (cProfile) per iteration (a solve of ``--iterations`` minus a
solve of one, per extra iteration), which must not depend on E, the calls a solve makes once
whatever its iterations (set-up checks, the result), and the two together per iteration of the
timed solve.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from dataclasses import replace

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
    calls, fixed = [], []
    one = replace(lm, max_iters=1)
    for objective, init, _ in problems:
        lm.solve(objective, init)  # warm-up: pattern, symbolic analysis
        n_one, n_all = (_calls(opt, objective, init) for opt in (one, lm))
        per_iter = (n_all - n_one) / max(args.iterations - 1, 1)
        calls.append(per_iter)
        fixed.append(n_one - per_iter)
    for _ in range(args.repeats):
        for k, (objective, init, _) in enumerate(problems):
            start = time.perf_counter()
            lm.solve(objective, init)
            times[k].append((time.perf_counter() - start) / args.iterations)
    rows = []
    print(f"{'edges':>8}{'s/iter':>10}{'py calls/iter':>15}{'per solve':>11}"
          f"{'all/iters':>11}")
    for k, (_, _, edges) in enumerate(problems):
        per_iter = statistics.median(times[k])
        average = calls[k] + fixed[k] / args.iterations
        rows.append({"edges": edges, "time_per_iter_s": per_iter, "calls_per_iter": calls[k],
                     "calls_per_solve": fixed[k], "calls_average": average})
        print(f"{edges:>8}{per_iter:>10.4f}{calls[k]:>15.0f}{fixed[k]:>11.0f}{average:>11.0f}")
    ratio = rows[1]["time_per_iter_s"] / rows[0]["time_per_iter_s"]
    print(f"time ratio (2x edges / 1x edges): {ratio:.2f}")
    return rows


def _calls(lm: core.LevenbergMarquardt, objective: core.Objective,
           init: dict[str, torch.Tensor]) -> int:
    """Python function calls (cProfile) of one warm ``lm.solve``."""
    profile = cProfile.Profile()
    profile.enable()
    lm.solve(objective, init)
    profile.disable()
    return pstats.Stats(profile).total_calls  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
