"""Solve a g2o pose graph with Levenberg-Marquardt and print a summary.

python -m apps.pose_graph.solve FILE.g2o [--solver sparse|dense|...] [--max-iters N] [--json]
                                [--viz OUT.png]

``--viz`` draws the initial estimate and the solution (trajectory and loop closures) with Open3D
(offscreen when there is no display; matplotlib if Open3D cannot render).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from apps.pose_graph.problem import pose_graph_objective
from core import LevenbergMarquardt, io


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
    args = parser.parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    start = time.perf_counter()
    graph = io.read_g2o(args.file)
    load_s = time.perf_counter() - start
    objective, init = pose_graph_objective(graph)
    optimizer = LevenbergMarquardt(
        max_iters=args.max_iters, solver=args.solver, verbose=not args.quiet
    )
    solution = optimizer.solve(objective, init)
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
    if args.viz:
        from apps.pose_graph.viz import draw_graph

        name = Path(args.file).name
        draw_graph(args.viz, solution.values["poses"][0], graph.i, graph.j, initial=graph.poses,
                   title=f"{name}: {graph.num_poses} poses, {graph.num_edges} edges, cost "
                         f"{summary['initial_cost']:.6g} -> {summary['final_cost']:.6g}")
        summary["viz"] = args.viz
        print(f"  picture: {args.viz}")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
