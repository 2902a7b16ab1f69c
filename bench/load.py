"""What one busy process does to each solver: quiet and loaded rounds alternate in one run.

    python -m bench.load [--cases NAME ...] [--rounds R] [--repeats K] [--load N] [--ceres]

``python -m bench --load N`` measures a whole loaded run against a quiet run made at another
time, and this machine's speed swings by up to 2x between runs: the ratio of two such ratios is
mostly that swing. Here every round measures each solver ``K`` times quiet, then starts ``N``
processes spinning a Python loop (as ``--load`` does) and measures them ``K`` times again, then
stops them; the table gives per solver the median quiet and loaded times over all rounds and
``loaded / quiet``, and per Ariadne row its ratio to the best peer quiet and loaded and the
ratio of the two (the issue's load line: at most 1.3).

Ariadne runs twice: with its automatic thread rule (``ariadne``) and on one thread
(``ariadne-1``, ``LevenbergMarquardt(threads=1)``): ``ariadne-1 quiet / ariadne quiet`` is what
the second core gives when it is free. Cases are ``python -m bench``'s (names or prefixes;
scaling cases compare time per iteration as there). Ceres is left out unless ``--ceres`` (its
sphere2500 solve takes 2-4 s).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence

from bench.__main__ import (
    ARIADNE_SOLVERS,
    Case,
    Runner,
    Skip,
    ariadne_runner,
    busy_processes,
    make_cases,
    peer_runners,
    select_cases,
)

SETTLE_S = 0.5
"""Seconds after starting or stopping the busy processes before the next measurement."""


def _runners(case: Case, stack: contextlib.ExitStack, with_ceres: bool) -> dict[str, Runner]:
    problem = case.make()
    spec = next(s for s in ARIADNE_SOLVERS[case.kind] if s.name == ("schur" if case.kind == "bal"
                                                                      else "sparse"))
    runners = {"ariadne": ariadne_runner(problem, spec, 0),
               "ariadne-1": ariadne_runner(problem, spec, 1)}
    peers = peer_runners(problem, stack)
    runners["gtsam"] = peers["gtsam"]
    if with_ceres:
        runners["ceres"] = peers["ceres"]
    return runners


def measure(case: Case, rounds: int, repeats: int, load: int, with_ceres: bool
            ) -> dict[tuple[str, int], list[float]]:
    """``{(solver, 0 | load): times}`` (per iteration for scaling cases)."""
    with contextlib.ExitStack() as stack:
        runners = _runners(case, stack, with_ceres)
        for run in runners.values():  # warm-up: compiled kernels, peers' graphs
            run(min(2, case.max_iters))
        times: dict[tuple[str, int], list[float]] = {(n, k): [] for n in runners
                                                     for k in (0, load)}
        for _ in range(rounds):
            for busy in (0, load):
                with busy_processes(busy):
                    time.sleep(SETTLE_S)
                    for name, run in runners.items():
                        for _ in range(repeats):
                            result = run(case.max_iters)
                            per = result.iterations if case.per_iteration else 1
                            times[(name, busy)].append(result.time_s / max(per, 1))
                time.sleep(SETTLE_S)
    return times


def table(case: Case, times: dict[tuple[str, int], list[float]], load: int) -> list[str]:
    """The case's lines: per solver quiet, loaded, loaded / quiet; per Ariadne row its ratios to
    the best peer quiet and loaded and their ratio."""
    med = {k: statistics.median(v) for k, v in times.items()}
    solvers = sorted({n for n, _ in times}, key=lambda n: (not n.startswith("ariadne"), n))
    peers = [n for n in solvers if not n.startswith("ariadne")]
    unit = "s/iter" if case.per_iteration else "s"
    lines = [f"{case.name} (batch {case.batch}), {unit}, medians of {len(times[(solvers[0], 0)])}"]
    for n in solvers:
        q, ld = med[(n, 0)], med[(n, load)]
        lines.append(f"  {n:10s} quiet {q:9.4f}  loaded {ld:9.4f}  loaded / quiet {ld / q:5.2f}")
    best_q = min(med[(p, 0)] for p in peers)
    best_l = min(med[(p, load)] for p in peers)
    for n in solvers:
        if n.startswith("ariadne"):
            rq, rl = med[(n, 0)] / best_q, med[(n, load)] / best_l
            lines.append(f"  {n:10s} vs best peer: quiet {rq:5.2f}x  loaded {rl:5.2f}x  "
                         f"load / quiet {rl / rq:5.2f}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["sphere2500", "synthetic_pg"],
                        help="case names or prefixes (default: sphere2500 synthetic_pg)")
    parser.add_argument("--rounds", type=int, default=4, help="quiet/loaded rounds (4)")
    parser.add_argument("--repeats", type=int, default=3, help="solves per solver and half "
                        "round (3)")
    parser.add_argument("--load", type=int, default=1, help="busy processes when loaded (1)")
    parser.add_argument("--ceres", action="store_true", help="also Ceres")
    args = parser.parse_args(argv)
    for name, value in (("--rounds", args.rounds), ("--repeats", args.repeats),
                        ("--load", args.load)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    cases = [c for c in select_cases(make_cases(quick=True), args.cases)]
    if not cases:
        parser.error(f"no case matches {args.cases}")
    for case in cases:
        try:
            times = measure(case, args.rounds, args.repeats, args.load, args.ceres)
        except Skip as e:
            print(f"{case.name} (batch {case.batch}): skipped: {e}")
            continue
        print("\n".join(table(case, times, args.load)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
