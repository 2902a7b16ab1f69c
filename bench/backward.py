"""Backward modes compared: time, peak memory and gradient error vs. inner iterations.

    python -m bench.backward [--json] [--repeats N] [--iterations 5 10 20 50]

A batch of 16 synthetic SE(3) pose graphs of 256 poses (``bench.synthetic.pose_graph_batch``) is
solved by the layer with each backward mode for a FIXED number of LM iterations (convergence
tests disabled, so unrolling really stores every iteration). The loss is the squared translation
error against ground truth; its gradient w.r.t. the measurements is compared with the implicit
gradient at 50 iterations (``grad_rel_err``). Peak memory is the process's resident-set high-water
mark above its level before the forward pass (Linux ``/proc/self/clear_refs`` resets it), so it
counts every allocation, torch's included; time is the median of ``--repeats`` runs after a
warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import core
from bench.synthetic import PoseGraphBatch, pose_graph_batch

MODES = ("unroll", "truncated", "implicit", "implicit_exact")
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        match = re.search(rf"{field}:\s+(\d+) kB", f.read())
    assert match is not None, f"/proc/self/status has no {field}"
    return int(match.group(1)) / 1024


def reset_peak() -> None:
    """Return freed heap to the OS (so reused cached memory counts again), then reset VmHWM."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass
class Row:
    mode: str
    iterations: int
    time_s: float
    forward_s: float
    backward_s: float
    peak_mem_mb: float
    grad_rel_err: float = float("nan")
    grad_rel_err_exact: float = float("nan")


def make_layer(data: PoseGraphBatch, mode: str, iterations: int) -> core.OptimizationLayer:
    poses = core.Variable("poses", core.SE3, count=data.num_poses)
    between = core.costs.Between(poses, data.i, data.j, data.measurements,
                                 sqrt_info=data.sqrt_information(), name="between")
    prior = core.costs.Prior(poses, data.init[:, :1], index=0, sqrt_info=1e3, name="prior")
    never = -1.0  # disable the convergence tests: run exactly `iterations` iterations
    optimizer = core.LevenbergMarquardt(max_iters=iterations, solver="sparse", rel_tol=never,
                                        abs_tol=never, step_tol=never, grad_tol=never)
    exact = mode == "implicit_exact"
    return core.OptimizationLayer(core.Objective([between, prior]), optimizer,
                                  backward="implicit" if exact else mode,  # type: ignore[arg-type]
                                  backward_iters=min(5, iterations),
                                  implicit_hessian="exact" if exact else "gauss_newton")


def run_once(layer: core.OptimizationLayer, data: PoseGraphBatch) -> tuple[torch.Tensor, float,
                                                                             float, float]:
    """Forward + backward; returns the gradient, forward and backward seconds, peak MB."""
    measured = data.measurements.clone().requires_grad_()
    reset_peak()
    base = rss_mb("VmRSS")
    start = time.perf_counter()
    solution, _ = layer({"poses": data.init, "between.measured": measured})
    assert data.truth is not None
    loss = (solution["poses"][..., :3] - data.truth[..., :3]).square().sum()
    mid = time.perf_counter()
    (grad,) = torch.autograd.grad(loss, measured)
    end = time.perf_counter()
    return grad, mid - start, end - mid, rss_mb("VmHWM") - base


def measure(data: PoseGraphBatch, mode: str, iterations: int, repeats: int) -> tuple[Row,
                                                                                      torch.Tensor]:
    layer = make_layer(data, mode, iterations)
    run_once(layer, data)  # warm-up (symbolic analysis, allocator)
    runs = [run_once(layer, data) for _ in range(repeats)]
    fwd = statistics.median(r[1] for r in runs)
    bwd = statistics.median(r[2] for r in runs)
    row = Row(mode, iterations, fwd + bwd, fwd, bwd, max(r[3] for r in runs))
    return row, runs[-1][0]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench.backward", description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--poses", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = pose_graph_batch(args.poses, args.batch, seed=0)
    rows, grads = [], {}
    for iterations in args.iterations:
        for mode in MODES:
            row, grad = measure(data, mode, iterations, args.repeats)
            rows.append(row)
            grads[mode, iterations] = grad
    refs = {}
    for mode in ("implicit", "implicit_exact"):
        refs[mode] = grads.get((mode, 50))
        if refs[mode] is None:
            refs[mode] = measure(data, mode, 50, 1)[1]
    for row in rows:
        g = grads[row.mode, row.iterations]
        ref, exact = refs["implicit"], refs["implicit_exact"]
        row.grad_rel_err = float((g - ref).norm() / ref.norm())
        row.grad_rel_err_exact = float((g - exact).norm() / exact.norm())
    print(f"B={args.batch} SE(3) pose graphs of {args.poses} poses, {data.num_edges} edges each; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("grad_rel_err: vs the implicit (Gauss-Newton) gradient at 50 iterations; "
          "vs_exact: vs the implicit gradient with the exact Hessian at 50 iterations")
    print(f"{'mode':<15}{'iters':>6}{'time_s':>9}{'fwd_s':>8}{'bwd_s':>8}{'peak_MB':>9}"
          f"{'grad_rel_err':>14}{'vs_exact':>11}")
    for r in rows:
        print(f"{r.mode:<15}{r.iterations:>6}{r.time_s:>9.3f}{r.forward_s:>8.3f}"
              f"{r.backward_s:>8.3f}{r.peak_mem_mb:>9.1f}{r.grad_rel_err:>14.3e}"
              f"{r.grad_rel_err_exact:>11.3e}")
    if args.json:
        print(json.dumps([{"mode": r.mode, "iterations": r.iterations, "time_s": r.time_s,
                           "peak_mem_mb": r.peak_mem_mb, "grad_rel_err": r.grad_rel_err,
                           "grad_rel_err_exact": r.grad_rel_err_exact,
                           "forward_s": r.forward_s, "backward_s": r.backward_s}
                          for r in rows]))
    return rows


if __name__ == "__main__":
    main()
