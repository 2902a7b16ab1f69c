"""Solve a BAL file with Levenberg-Marquardt and the Schur solver, and print a summary.

python -m apps.bundle_adjustment.solve FILE.txt [--json] [--viz out.png] [--export out.ply]
    [--show] [--max-iters N]
    [--damping-mode marquardt|levenberg] [--damping D] [--rel-tol R] [--abs-tol A]
    [--loss none|huber|cauchy|...]
    [--loss-scale S] [--reduced auto|dense|sparse] [--threads N] [--quiet]

The cost is BAL's (``../shared/data/README.md``): ``0.5 sum ||pred - observed||^2`` over all
observations, cameras (angle-axis, t, f, k1, k2) and points all optimized, no gauge prior (as Ceres
and GTSAM solve it; LM's damping copes with the 7-dof gauge). ``--loss`` makes it robust. The
summary has ``cameras, points, observations, iterations, initial_cost, final_cost, rmse_px``
(``sqrt(mean ||r||^2)`` over the observations at the solution), ``time_s`` (the solve, symbolic
analysis included; reading the file excluded: ``load_s``) and ``status``; with ``--json`` it is
also printed as one line of valid JSON (``null`` for a non-finite number) last. A malformed file
exits with status 1 and a ``FILE:LINE: ...`` message on stderr; so does a failed solve
(non-finite cost), after its summary.

``--export out.ply`` writes the solution as files Open3D opens: the point cloud to ``out.ply``
(``open3d.io.read_point_cloud``) and the camera frustums as a line set to ``out_lines.ply``
(``open3d.io.read_line_set``); the summary's ``export`` lists both. ``--show`` opens the same
drawing in an interactive Open3D window (needs a display).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

import core
from apps import common, viewer
from apps.bundle_adjustment.problem import ba_objective, values_to_cameras
from core import io
from core.costs.reprojection import project

PROG = "python -m apps.bundle_adjustment.solve"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="a BAL problem (.txt, or .bz2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--viz", metavar="PNG", help="draw the solution (Open3D) into this file")
    parser.add_argument("--export", metavar="PLY",
                        help="write the solved points to PLY and the camera frustums to "
                             "PLY's name + _lines (Open3D files)")
    parser.add_argument("--show", action="store_true",
                        help="open the solution in an Open3D window (needs a display)")
    parser.add_argument("--max-iters", type=int, default=200)
    parser.add_argument("--damping-mode", choices=["marquardt", "levenberg"], default="marquardt")
    parser.add_argument("--damping", type=float, default=1e-4, help="initial LM damping")
    parser.add_argument("--rel-tol", type=float, default=1e-6,
                        help="converged when a step decreases the cost by less than this * cost")
    parser.add_argument("--abs-tol", type=float, default=0.0,
                        help="converged when the cost is below this (0: no floor, as Ceres)")
    parser.add_argument("--loss", choices=["none", "huber", "cauchy", "welsch", "geman_mcclure"],
                        default="none")
    parser.add_argument("--loss-scale", type=float, default=1.0, help="robust scale (pixels)")
    parser.add_argument("--reduced", choices=["auto", "dense", "sparse"], default="auto",
                        help="how the reduced camera system is factored")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quiet", action="store_true", help="no per-iteration log")
    return parser


def rmse_px(problem: io.BALProblem, values: dict[str, torch.Tensor]) -> float:
    """``sqrt(mean ||pred - observed||^2)`` over all observations of ``problem``."""
    cam, pt = problem.camera_index, problem.point_index
    pred, _, _ = project(values["cameras"][0, cam], values["intrinsics"][0, cam],
                         values["points"][0, pt])
    r = pred - problem.observations
    return float((r * r).sum(-1).mean().sqrt())


def solve(problem: io.BALProblem, args: argparse.Namespace) -> tuple[dict, dict]:
    """Solve ``problem`` as ``args`` say; returns the summary and the solution values."""
    loss = None if args.loss == "none" else args.loss
    ba = ba_objective(problem, loss, args.loss_scale, gauge_weight=None, reduced=args.reduced)
    lm = core.LevenbergMarquardt(max_iters=args.max_iters, damping_init=args.damping,
                                 damping_mode=args.damping_mode, rel_tol=args.rel_tol,
                                 abs_tol=args.abs_tol, verbose=not args.quiet)
    solution = ba.optimizer(lm).solve(ba.objective, ba.init)
    info = solution.info
    summary = {
        "cameras": problem.num_cameras,
        "points": problem.num_points,
        "observations": problem.num_observations,
        "iterations": int(info.iterations[0]),
        "initial_cost": float(info.initial_cost[0]),
        "final_cost": float(info.final_cost[0]),
        "rmse_px": rmse_px(problem, solution.values),
        "time_s": round(info.time_s, 4),
        "status": info.status_names[0],
    }
    return summary, solution.values


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if (args.max_iters < 0 or not args.damping > 0 or not args.loss_scale > 0
            or args.rel_tol < 0 or args.abs_tol < 0):
        sys.exit(f"{PROG}: error: need --max-iters >= 0, --damping > 0, --loss-scale > 0 and "
                 "non-negative tolerances")
    if args.show:
        try:
            viewer.check_display()  # before solving, not after
        except RuntimeError as exc:
            sys.exit(f"{PROG}: error: {exc}")
    start = time.perf_counter()
    try:
        problem = io.read_bal(args.file)
        load_s = time.perf_counter() - start
        summary, values = solve(problem, args)
    except (ValueError, OSError) as exc:
        sys.exit(f"{PROG}: error: {exc}")
    summary = {"file": args.file, **summary, "load_s": round(load_s, 4)}
    print(f"{args.file}: {summary['cameras']} cameras, {summary['points']} points, "
          f"{summary['observations']} observations")
    print(f"  cost {summary['initial_cost']:.6g} -> {summary['final_cost']:.6g} in "
          f"{summary['iterations']} iterations, {summary['time_s']:.3f} s ({summary['status']}); "
          f"RMSE {summary['rmse_px']:.4g} px")
    common.exit_if_failed(PROG, summary, args.json)
    if args.viz:
        from apps.bundle_adjustment import viz

        cams = values_to_cameras(values)[0]
        viz.draw_problem(Path(args.viz), cams, values["points"][0],
                         title=f"{Path(args.file).name}: cost {summary['final_cost']:.4g}, "
                               f"RMSE {summary['rmse_px']:.3g} px",
                         initial=(problem.cameras, problem.points))
    if args.export or args.show:
        from apps.bundle_adjustment.viz import FRONT, ZOOM, problem_layers

        layers = problem_layers(values_to_cameras(values)[0], values["points"][0])
    if args.export:
        viewer.cli_export(PROG, args.export, layers, summary)
    if args.json:
        print(common.json_line(summary))
    if args.show:
        viewer.cli_show(PROG, layers, f"{Path(args.file).name}: solution", front=FRONT, zoom=ZOOM)
    return summary


if __name__ == "__main__":
    main()
