"""``python -m bench.paper vectorization``: why factor tables win.

The same SE(3) helix pose graph (:func:`bench.synthetic.pose_graph_batch`, batch 1) is written two
ways: ``table``, one ``core.costs.Between`` over all E edges (index tensors of length E, as
``bench.__main__.pose_graph_objective`` builds it), and ``per_factor``, E ``Between`` costs of one
edge each (the object-per-factor style of Theseus and GTSAM's Python API). Both have the same
prior on pose 0, the same values and the same sparse normal equations; LM (sparse CHOLMOD solver
on the CPU, ``solver="auto"`` on the GPU) runs a fixed number of iterations (convergence tests
off). ``time_per_iter_s`` is the solve's wall time over its iterations (median of the repeats
after a warm-up), ``build_s`` the time to construct the ``Objective``; both objectives must reach
the same cost (``final_cost``), which the experiment checks.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import core
from bench.paper_output import Context, Result, data_ticks, log, log_axis
from bench.synthetic import PoseGraphBatch, pose_graph_batch

COLUMNS = ("layout", "device", "poses", "factors", "costs", "iterations", "build_s",
           "time_per_iter_s", "final_cost", "speedup_table")
FIGSIZE = (11.0, 4.6)  # inches
POSES = {"tiny": (24, 40), "quick": (32, 128, 512, 2048),
         "full": (32, 64, 128, 256, 512, 1024, 2048, 4096)}
PER_FACTOR_MAX_POSES = {"tiny": 40, "quick": 2048, "full": 4096}
ITERS = {"tiny": 2, "quick": 3, "full": 5}
REPEATS = {"tiny": 1, "quick": 1, "full": 3}
NEVER = -1.0  # a tolerance that switches the convergence test off


def objective(data: PoseGraphBatch, layout: str) -> core.Objective:
    """The graph's objective, one ``Between`` for all edges (``table``) or one per edge
    (``per_factor``), plus the prior on pose 0."""
    poses = core.Variable("poses", core.SE3, count=data.num_poses)
    U = data.sqrt_information()
    if layout == "table":
        edges = [core.costs.Between(poses, data.i, data.j, data.measurements, sqrt_info=U,
                                    name="between")]
    elif layout == "per_factor":
        edges = [core.costs.Between(poses, data.i[k:k + 1], data.j[k:k + 1],
                                    data.measurements[:, k:k + 1], sqrt_info=U[k:k + 1],
                                    name=f"between_{k}")
                 for k in range(data.num_edges)]
    else:
        raise ValueError(f"layout must be 'table' or 'per_factor', got {layout!r}")
    prior = core.costs.Prior(poses, data.init[:, :1], index=0, sqrt_info=1e3, name="prior")
    return core.Objective([*edges, prior])


def measure(data: PoseGraphBatch, layout: str, iters: int, repeats: int,
            device: str) -> dict[str, Any]:
    """Build the objective (timed), warm up, then ``repeats`` fixed-iteration solves."""
    start = time.perf_counter()
    obj = objective(data, layout)
    build_s = time.perf_counter() - start
    obj = obj.to(device)
    init = {"poses": data.init.to(device)}
    solver = "sparse" if device == "cpu" else "auto"
    lm = core.LevenbergMarquardt(max_iters=iters, solver=solver, rel_tol=NEVER, abs_tol=NEVER,
                                 step_tol=NEVER, grad_tol=NEVER)
    core.LevenbergMarquardt(max_iters=1, solver=solver).solve(obj, init)  # warm-up
    times, info = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        info = lm.solve(obj, init).info
        final = float(info.final_cost.sum())  # waits for the device
        times.append(time.perf_counter() - start)
    assert info is not None
    iterations = int(info.iterations.max())
    if iterations != iters:
        raise RuntimeError(f"vectorization: {layout} at {data.num_poses} poses ran {iterations} "
                           f"iterations, expected {iters} (convergence tests are off)")
    if not math.isfinite(final):
        raise RuntimeError(f"vectorization: {layout} at {data.num_poses} poses: final cost "
                           f"{final}")
    return {"layout": layout, "device": device, "poses": data.num_poses,
            "factors": data.num_edges + 1, "costs": len(obj.costs), "iterations": iterations,
            "build_s": build_s, "time_per_iter_s": statistics.median(times) / iterations,
            "final_cost": final}


def run(ctx: Context) -> Result:
    """The experiment; see the module docstring."""
    devices = ["cpu", *(["cuda"] if ctx.gpu else [])]
    rows: list[dict[str, Any]] = []
    warm = pose_graph_batch(24, 1, seed=0)
    for layout in ("table", "per_factor"):  # first-call costs (imports) out of build_s
        objective(warm, layout)
    for device in devices:
        for n in POSES[ctx.size]:
            data = pose_graph_batch(n, 1, seed=n)
            table = measure(data, "table", ITERS[ctx.size], REPEATS[ctx.size], device)
            rows.append(table)
            log(f"vectorization: {n} poses table {table['time_per_iter_s']:.4f} s/iter")
            if n > PER_FACTOR_MAX_POSES[ctx.size]:
                continue
            per = measure(data, "per_factor", ITERS[ctx.size], REPEATS[ctx.size], device)
            if not math.isclose(per["final_cost"], table["final_cost"], rel_tol=1e-6,
                                abs_tol=1e-9):
                raise RuntimeError(f"vectorization: at {n} poses the per-factor objective ends "
                                   f"at cost {per['final_cost']}, the table at "
                                   f"{table['final_cost']}: not the same problem")
            per["speedup_table"] = per["time_per_iter_s"] / table["time_per_iter_s"]
            rows.append(per)
            log(f"vectorization: {n} poses per_factor {per['time_per_iter_s']:.4f} s/iter")
    notes = [] if ctx.gpu or ctx.device == "cpu" else [
        "--device cuda: no CUDA device on this machine; CPU rows only."]
    what = ("Time per LM iteration of one SE(3) pose graph written as one `Cost` over all "
            "factors (`table`) or one `Cost` per factor (`per_factor`), same values, same "
            f"solver, {ITERS[ctx.size]} iterations with the convergence tests off; "
            "`speedup_table` = per-factor time / table time at the same size; `build_s` = "
            f"time to construct the Objective. Torch threads: {ctx.threads}. No memory is "
            "measured here.")
    return Result("Vectorization: one Cost per factor vs one Cost for all factors", what,
                  COLUMNS, rows, figure, figsize=FIGSIZE, notes=notes)


def figure(fig: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Draw the experiment's figure from its rows (as written to the CSV)."""
    left, right = fig.subplots(1, 2)
    for (layout, device), style in _lines(rows).items():
        mine = [r for r in rows if r["layout"] == layout and r["device"] == device]
        label = f"{'one Cost per factor' if layout == 'per_factor' else 'one Cost for all'}"
        label += f" ({device})"
        left.plot([r["factors"] for r in mine], [r["time_per_iter_s"] for r in mine],
                  label=label, **style)
        right.plot([r["factors"] for r in mine], [r["build_s"] for r in mine], label=label,
                   **style)
    for ax, key, ylabel in ((left, "time_per_iter_s", "time per LM iteration [s]"),
                            (right, "build_s", "time to build the Objective [s]")):
        data_ticks(ax, [r["factors"] for r in rows], base=10)
        log_axis(ax, [r[key] for r in rows], decades=0.0)
        ax.set_xlabel("number of factors (edges + prior)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    speed = [r for r in rows if r.get("speedup_table")]
    if speed:
        best = max(speed, key=lambda r: r["factors"])
        left.set_title(f"{best['speedup_table']:.0f}x faster per iteration at "
                       f"{best['factors']} factors", fontsize=9)
    fig.suptitle("Factor tables: the same pose graph as one Cost or as one Cost per factor",
                 fontsize=10)


def _lines(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    styles = {"table": dict(marker="o", color="C0"), "per_factor": dict(marker="s", color="C3")}
    keys = dict.fromkeys((r["layout"], r["device"]) for r in rows)
    return {k: {**styles[k[0]], "ls": "-" if k[1] == "cpu" else ":"} for k in keys}


if __name__ == "__main__":
    raise SystemExit("run it as: python -m bench.paper vectorization [--quick]")
