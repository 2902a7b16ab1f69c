"""Solve a g2o pose graph with Levenberg-Marquardt and print a summary.

python -m apps.pose_graph.solve FILE.g2o [--solver sparse|dense|...] [--max-iters N] [--json]
                                [--viz OUT.png] [--export OUT.ply] [--show]

``--viz`` draws the initial estimate and the solution (trajectory and loop closures) with Open3D
(offscreen when there is no display; matplotlib if Open3D cannot render). ``--export`` writes the
solved graph as one Open3D line set (PLY): its points are the N pose positions (z = 0 for SE(2)),
its lines the E edges (odometry blue, loop closures orange); ``open3d.io.read_line_set`` reads it.
``--show`` opens the solved graph in an interactive Open3D window (needs a display).
``--information nearest|diagonal`` repairs edges whose information matrix is not positive definite
(``core.io.read_g2o``; the default ``strict`` refuses such a file, naming its line).

Exit status: 0 after a solve that did not fail; 1, with one line on stderr, for a file that cannot
be read or parsed (``FILE:LINE: ...``) and for a failed solve (non-finite cost; the summary and
its ``--json`` line are printed first). ``--json`` prints valid JSON (``null`` for a non-finite
number).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import get_args

from apps import common, viewer
from apps.pose_graph.problem import pose_graph_objective
from core import LevenbergMarquardt, io
from core.solvers import make_solver


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m apps.pose_graph.solve", description=__doc__)
    parser.add_argument(
        "file", help="a g2o file (VERTEX_SE2/EDGE_SE2 or VERTEX_SE3:QUAT/EDGE_SE3:QUAT)"
    )
    parser.add_argument(
        "--solver",
        default="sparse",
        choices=["auto", "sparse", "dense", "cholmod", "cholespy", "scipy"],
    )
    parser.add_argument("--max-iters", type=int, default=100)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-iteration log")
    parser.add_argument("--viz", metavar="OUT.png", default=None,
                        help="draw the initial estimate and the solved graph into this PNG")
    parser.add_argument("--export", metavar="OUT.ply", default=None,
                        help="write the solved graph as an Open3D line set (PLY)")
    parser.add_argument("--show", action="store_true",
                        help="open the solved graph in an Open3D window (needs a display)")
    parser.add_argument("--information", choices=list(get_args(io.Information)),
                        default="strict", help="edges whose information matrix is not positive "
                        "definite: refuse the file (strict), or repair them (nearest, diagonal)")
    args = parser.parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.show:
        try:
            viewer.check_display()  # before solving, not after
        except RuntimeError as exc:
            sys.exit(f"{parser.prog}: error: {exc}")

    if args.max_iters < 0:
        sys.exit(f"{parser.prog}: error: --max-iters must be >= 0, got {args.max_iters}")
    start = time.perf_counter()
    try:
        graph = io.read_g2o(args.file, information=args.information)
        load_s = time.perf_counter() - start
        objective, init = pose_graph_objective(graph)
        # the solver is made before the timed solve, as the graph is built: its backend's
        # bindings load here (CHOLMOD's: ~0.25 s of SciPy imports), not inside ``time_s``
        solver = make_solver(args.solver, objective.dim)
        optimizer = LevenbergMarquardt(
            max_iters=args.max_iters, solver=solver, verbose=not args.quiet
        )
        solution = optimizer.solve(objective, init)
    except (ValueError, OSError) as exc:
        hint = ("; on the command line: --information nearest or --information diagonal"
                if "not positive definite" in str(exc) and args.information == "strict" else "")
        sys.exit(f"{parser.prog}: error: {exc}{hint}")
    info = solution.info
    summary = {
        "file": args.file,
        "poses": graph.num_poses,
        "edges": graph.num_edges,
        "iterations": int(info.iterations[0]),
        "initial_cost": float(info.initial_cost[0]),
        "final_cost": float(info.final_cost[0]),
        "time_s": round(info.time_s, 4),
        "load_s": round(load_s, 4),
        "status": info.status_names[0],
    }
    print(f"{args.file}: {graph.num_poses} poses, {graph.num_edges} edges, SE({graph.dim})")
    print(
        f"  cost {summary['initial_cost']:.6f} -> {summary['final_cost']:.6f} in "
        f"{summary['iterations']} iterations, {summary['time_s']:.3f} s ({summary['status']})"
    )
    common.exit_if_failed(parser.prog, summary, args.json)
    if args.viz:
        from apps.pose_graph.viz import draw_graph

        name = Path(args.file).name
        draw_graph(args.viz, solution.values["poses"][0], graph.i, graph.j, initial=graph.poses,
                   title=f"{name}: {graph.num_poses} poses, {graph.num_edges} edges, cost "
                         f"{summary['initial_cost']:.6g} -> {summary['final_cost']:.6g}")
        summary["viz"] = args.viz
        print(f"  picture: {args.viz}")
    if args.export or args.show:
        from apps.pose_graph.viz import graph_layers

        layers = graph_layers(solution.values["poses"][0], graph.i, graph.j)
    if args.export:
        viewer.cli_export(parser.prog, args.export, layers, summary)
    if args.json:
        print(common.json_line(summary))
    if args.show:
        viewer.cli_show(parser.prog, layers, f"{Path(args.file).name}: solution",
                        planar=graph.dim == 2)
    return summary


if __name__ == "__main__":
    main()
