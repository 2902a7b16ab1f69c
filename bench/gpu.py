"""Batch throughput: B pose graphs of N poses, K Levenberg-Marquardt iterations each.

    python -m bench.gpu [--batch 256] [--poses 1024] [--iters 10] [--device cuda]
                        [--solvers cudss pcg] [--peers ceres gtsam] [--repeats 3]
                        [--ceres-rate R] [--json]

Ariadne solves the whole batch in one call on ``--device`` (each solver of ``--solvers``), with
every convergence test off, so every problem runs exactly ``--iters`` iterations. Ceres
(SPARSE_NORMAL_CHOLESKY, all CPU cores) and GTSAM solve the problems one after another on this
machine's CPU with ``--iters`` as their iteration cap (they may stop earlier, which only helps
them). Throughput is problem-iterations per second: the sum over problems of the iterations each
ran, divided by the wall time. ``speedup`` is a row's throughput over Ceres's, measured in the
same run, or given by ``--ceres-rate`` (problem-iterations/s measured elsewhere, e.g. on the CPU
machine when the GPU machine has no Ceres). Each row is the median of ``--repeats`` runs after a
warm-up; Ariadne's time includes its solver's setup (symbolic analysis) and device syncs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import core
from bench import ceres, peers
from bench.__main__ import pose_graph_objective
from bench.synthetic import PoseGraphBatch, pose_graph_batch

FIXED = dict(rel_tol=0.0, abs_tol=0.0, step_tol=0.0, grad_tol=0.0)  # run every iteration


@dataclass
class Row:
    solver: str
    device: str
    batch: int
    poses: int
    time_s: float
    problem_iterations: int
    rate: float  # problem-iterations per second
    initial_cost: float
    final_cost: float
    speedup_vs_ceres: float | None = None
    note: str = ""


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def ariadne(problem: PoseGraphBatch, solver: str, iters: int, device: str) -> Row:
    """One timed solve of the whole batch (fresh solver: its setup is timed too)."""
    objective, init = pose_graph_objective(problem)
    objective = objective.to(device)
    init = {k: v.to(device) for k, v in init.items()}
    _sync(device)
    start = time.perf_counter()
    if solver == "pcg":
        made: object = core.solvers.PCG(objective)
    else:
        made = core.solvers.make_solver(solver, objective.dim, device)  # type: ignore[arg-type]
    optimizer = core.LevenbergMarquardt(max_iters=iters, solver=made, **FIXED)  # type: ignore[arg-type]
    info = optimizer.solve(objective, init).info
    _sync(device)
    elapsed = time.perf_counter() - start
    total = int(info.iterations.sum())
    return Row(
        f"ariadne-{solver}",
        device,
        problem.batch,
        problem.num_poses,
        elapsed,
        total,
        total / elapsed,
        float(info.initial_cost.sum()),
        float(info.final_cost.sum()),
        note=f"failed solves {int(info.solver_failures.sum())}"
        if info.solver_failures is not None and int(info.solver_failures.sum())
        else "",
    )


def ceres_rows(problem: PoseGraphBatch, iters: int, files: list[Path]) -> Row:
    out = ceres.solve_files("pose_graph", files, max_iters=iters)
    total = sum(int(p["iterations"]) for p in out.get("problems", [])) or out["iterations"]
    return Row(
        "ceres",
        "cpu",
        problem.batch,
        problem.num_poses,
        float(out["time_s"]),
        total,
        total / float(out["time_s"]),
        float(out["initial_cost"]),
        float(out["final_cost"]),
    )


def gtsam_row(problem: PoseGraphBatch, iters: int, built: list) -> Row:
    results = [peers.gtsam_solve(fg, v, iters) for fg, v in built]
    time_s = sum(r.time_s for r in results)
    total = sum(r.iterations for r in results)
    return Row(
        "gtsam",
        "cpu",
        problem.batch,
        problem.num_poses,
        time_s,
        total,
        total / time_s,
        sum(r.initial_cost for r in results),
        sum(r.final_cost for r in results),
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--poses", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--solvers",
        nargs="*",
        default=None,
        help="Ariadne solvers (default: cudss and pcg on CUDA, sparse on the CPU)",
    )
    parser.add_argument("--peers", nargs="*", default=["ceres", "gtsam"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ceres-rate", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    on_cuda = torch.device(args.device).type == "cuda"
    solvers = (
        args.solvers if args.solvers is not None else (["cudss", "pcg"] if on_cuda else ["sparse"])
    )
    problem = pose_graph_batch(args.poses, args.batch, seed=7)
    runs: dict[str, list[Row]] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ariadne_gpu_bench_") as tmp:
        jobs = {}
        for s in solvers:
            jobs[f"ariadne-{s}"] = lambda it, s=s: ariadne(problem, s, it, args.device)
        if "ceres" in args.peers:
            try:
                ceres.build()
                graphs = [problem.graph(b) for b in range(problem.batch)]
                files = peers.write_pose_graphs(graphs, tmp)
                jobs["ceres"] = lambda it: ceres_rows(problem, it, files)
            except ceres.CeresUnavailable as e:
                notes["ceres"] = f"skipped: {str(e).splitlines()[0]}"
        if "gtsam" in args.peers:
            try:
                built = [
                    peers.gtsam_pose_graph_problem(problem.graph(b)) for b in range(problem.batch)
                ]
                jobs["gtsam"] = lambda it: gtsam_row(problem, it, built)
            except ImportError as e:
                notes["gtsam"] = f"skipped: {e}"
        for rnd in range(args.repeats + 1):
            for name, job in jobs.items():
                if name in notes:
                    continue
                _log(f"  {name} {'warm-up' if rnd == 0 else f'run {rnd}/{args.repeats}'}")
                try:
                    row = job(2 if rnd == 0 else args.iters)
                except Exception as e:  # a failing solver is a row, not a crash
                    notes[name] = f"error: {type(e).__name__}: {e}"
                    continue
                if rnd > 0:
                    runs.setdefault(name, []).append(row)
    rows = []
    for name in jobs:
        if name in runs:
            group = sorted(runs[name], key=lambda r: r.time_s)
            row = group[len(group) // 2]
            row.time_s = statistics.median(r.time_s for r in group)
            row.rate = row.problem_iterations / row.time_s
            rows.append(row)
        else:
            rows.append(
                Row(
                    name,
                    "",
                    args.batch,
                    args.poses,
                    float("nan"),
                    0,
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    note=notes.get(name, ""),
                )
            )
    ceres_rate = args.ceres_rate
    if ceres_rate is None and "ceres" in runs:
        ceres_rate = next(r.rate for r in rows if r.solver == "ceres")
    for r in rows:
        if ceres_rate and r.rate == r.rate:
            r.speedup_vs_ceres = r.rate / ceres_rate
    _print(rows, args)
    return rows


def _print(rows: list[Row], args: argparse.Namespace) -> None:
    device = (
        torch.cuda.get_device_name(args.device)
        if torch.device(args.device).type == "cuda"
        else "cpu"
    )
    print(
        f"# {args.batch} pose graphs x {args.poses} poses, {args.iters} LM iterations; "
        f"Ariadne on {args.device} ({device}), peers on this CPU"
    )
    head = (
        "solver",
        "device",
        "time_s",
        "prob_iters",
        "prob_iters/s",
        "initial_cost",
        "final_cost",
        "speedup_vs_ceres",
        "note",
    )
    print(" | ".join(head))
    for r in rows:
        print(
            " | ".join(
                [
                    r.solver,
                    r.device,
                    f"{r.time_s:.3f}",
                    str(r.problem_iterations),
                    f"{r.rate:.1f}",
                    f"{r.initial_cost:.6e}",
                    f"{r.final_cost:.6e}",
                    "-" if r.speedup_vs_ceres is None else f"{r.speedup_vs_ceres:.1f}x",
                    r.note,
                ]
            )
        )
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))


if __name__ == "__main__":
    main()
