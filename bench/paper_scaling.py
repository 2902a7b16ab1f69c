"""``python -m bench.paper scaling``: forward time and peak memory of one LM solve against the
number of poses and against the batch size, per linear solver, with GTSAM and Ceres.

Problems: the synthetic SE(3) helix pose graphs of :func:`bench.synthetic.pose_graph_batch`
(odometry and loop closures, noisy odometry as the start). Ariadne solves a batch in one call
(``bench.__main__.ariadne_runner``: ``core.LevenbergMarquardt``, at most 100 iterations, the
default tolerances); GTSAM and Ceres (``bench.__main__.peer_runners``) solve the same problems one
after another on the CPU. A solver runs where ``bench``'s applicability rules allow it (dense:
``n <= 2000`` unknowns and ``batch * n^3 <= 2e10``; PCG: ``batch * n <= 2000``).

Each solver runs in its own worker process (``python -m bench.paper_scaling --worker SPEC``)
over all its points, smallest first; per point: a warm-up solve of 2 iterations, then
``repeats`` timed solves (median time). Peak memory, per point:

- Ariadne and GTSAM on the CPU (``rss``): the worker's resident-set high-water mark during the
  solve above its resident set just before it (the high-water mark is reset per point through
  ``/proc/self/clear_refs`` after ``malloc_trim``, as in ``bench.backward``); it counts every
  allocation (torch's, CHOLMOD's, GTSAM's).
- Ceres (``runner_rss``): the peak resident set of the native runner process (the whole process:
  its code, the parsed problems and the solve), read with ``getrusage(RUSAGE_CHILDREN)`` in a
  process forked per solve, so that no other child counts.
- GPU rows (``cuda_allocated``): torch's CUDA allocator peak above its level before the solve
  (``torch.cuda.max_memory_allocated``; memory cuDSS allocates itself is not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from bench.paper_output import Context, Result, data_ticks, log, log_axis

COLUMNS = ("sweep", "solver", "device", "poses", "batch", "unknowns", "time_s", "vs_best_peer",
           "iterations", "time_per_iter_s", "initial_cost", "final_cost", "peak_mem_mb",
           "memory_measure", "note")
FIGSIZE = (11.0, 8.5)  # inches
BATCH_POSES = {"tiny": 24, "quick": 64, "full": 64}
POSES = {"tiny": (32,), "quick": (64, 256, 1024, 4096),
         "full": (64, 128, 256, 512, 1024, 2048, 4096)}
BATCHES = {"tiny": (2,), "quick": (1, 16, 256), "full": (1, 4, 16, 64, 256)}
REPEATS = {"tiny": 1, "quick": 1, "full": 3}
MAX_ITERS = 100
WORKER_TIMEOUT_S = 1800
PEERS = ("gtsam", "ceres")
CPU_SOLVERS = ("sparse", "dense", "pcg")
GPU_SOLVERS = ("cudss-gpu", "dense-gpu", "pcg-gpu")


def _specs() -> dict[str, Any]:
    """Ariadne's pose-graph solvers by row name (``bench.__main__.ARIADNE_SOLVERS``), with the
    dense and PCG solvers also on the GPU."""
    from bench.__main__ import ARIADNE_SOLVERS

    specs = {s.name: s for s in ARIADNE_SOLVERS["pose_graph"]}
    for name in ("dense", "pcg"):
        specs[f"{name}-gpu"] = replace(specs[name], name=f"{name}-gpu", device="cuda")
    return specs


def points(size: str) -> list[dict[str, Any]]:
    """The sweep points: poses at batch 1, then batch sizes at ``BATCH_POSES`` poses."""
    out = [{"sweep": "poses", "poses": n, "batch": 1} for n in POSES[size]]
    return out + [{"sweep": "batch", "poses": BATCH_POSES[size], "batch": b}
                  for b in BATCHES[size]]


def applies(solver: str, poses: int, batch: int) -> bool:
    """Whether ``bench``'s rules run ``solver`` on a batch of ``batch`` graphs of ``poses``."""
    if solver in PEERS:
        return True
    from bench.__main__ import Case

    case = Case("paper_scaling", "pose_graph", batch, lambda: None)  # type: ignore[arg-type,return-value]
    return bool(_specs()[solver].applies(case, 6 * poses))


# ---------------------------------------------------------------------------------------------
# the worker: one solver, all its points
# ---------------------------------------------------------------------------------------------


def _problem(poses: int, batch: int) -> Any:
    from bench.synthetic import pose_graph_batch

    return pose_graph_batch(poses, batch, seed=1000 * poses + batch)


_CERES_LAUNCHER = """
import json, resource, sys
from bench import ceres
args = json.loads(sys.argv[1])
out = ceres.solve_files("pose_graph", args["files"], max_iters=args["max_iters"],
                        threads=args["threads"])
out["peak_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps(out))
"""


def _ceres_solve(files: list[str], threads: int) -> tuple[Any, float]:
    """One Ceres solve (``bench.ceres.solve_files``) launched from a small Python process that
    imports nothing but ``bench.ceres`` (no torch), so that its ``getrusage(RUSAGE_CHILDREN)``
    is the runner's peak resident set (MB; at least the launcher's own ~10 MB)."""
    from bench.peers import PeerResult

    args = json.dumps({"files": files, "max_iters": MAX_ITERS, "threads": threads})
    done = subprocess.run([sys.executable, "-c", _CERES_LAUNCHER, args], capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"the Ceres launcher failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    result = PeerResult("ceres", float(out["time_s"]), int(out["iterations"]),
                        float(out["initial_cost"]), float(out["final_cost"]))
    return result, out["peak_kb"] / 1024


def _measure(solver: str, run: Any, device: str) -> tuple[Any, float, str]:
    """One timed solve and its peak memory (MB) and the measure's name."""
    from bench.backward import reset_peak, rss_mb

    if solver == "ceres":
        result, peak = _ceres_solve(run.files, run.threads)
        return result, peak, "runner_rss"
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = run(MAX_ITERS)
        return result, (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda_allocated"
    reset_peak()
    base = rss_mb("VmRSS")
    result = run(MAX_ITERS)
    return result, rss_mb("VmHWM") - base, "rss"


class _CeresFiles:
    """The batch's graphs as g2o files for the Ceres runner (``bench.peers``); calling it solves
    them in this process (the warm-up), :func:`_ceres_solve` in a small launcher (measured)."""

    def __init__(self, problem: Any, stack: contextlib.ExitStack, threads: int) -> None:
        from bench import ceres, peers
        from bench.__main__ import Skip

        try:
            ceres.build()
        except ceres.CeresUnavailable as e:
            raise Skip(str(e).splitlines()[0]) from e
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="ariadne_paper_"))
        graphs = [problem.graph(b) for b in range(problem.batch)]
        self.files = [str(f) for f in peers.write_pose_graphs(graphs, folder)]
        self.threads = threads

    def __call__(self, max_iters: int) -> Any:
        from bench import peers

        return peers.ceres_pose_graph_files(self.files, max_iters, threads=self.threads)


def _runner(solver: str, problem: Any, stack: contextlib.ExitStack, threads: int) -> Any:
    from bench.__main__ import Skip, ariadne_runner, peer_runners

    if solver == "ceres":
        return _CeresFiles(problem, stack, threads)
    if solver in PEERS:
        return peer_runners(problem, stack, threads)[solver]
    spec = _specs()[solver]
    if not spec.available():
        raise Skip(f"solver {solver} is not available in this core")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA device")
    return ariadne_runner(problem, spec)


def _point(solver: str, point: Mapping[str, Any], repeats: int, threads: int) -> dict[str, Any]:
    """All numbers of one point (the row), or a row whose note says why it did not run."""
    from bench.__main__ import WARMUP_ITERS, Skip

    device = "cuda" if solver.endswith("-gpu") else "cpu"
    row: dict[str, Any] = {**point, "solver": solver, "device": device,
                           "unknowns": 6 * point["poses"] * point["batch"], "note": ""}
    problem = _problem(point["poses"], point["batch"])
    with contextlib.ExitStack() as stack:
        try:
            run = _runner(solver, problem, stack, threads)
            run(WARMUP_ITERS)
            runs = [_measure(solver, run, device) for _ in range(repeats)]
        except Skip as e:
            return {**row, "note": f"skipped: {e}"}
    result = sorted((r[0] for r in runs), key=lambda r: r.time_s)[(len(runs) - 1) // 2]
    return {**row, "time_s": statistics.median(r[0].time_s for r in runs),
            "iterations": result.iterations,
            "time_per_iter_s": result.time_s / max(result.iterations, 1),
            "initial_cost": result.initial_cost, "final_cost": result.final_cost,
            "peak_mem_mb": max(r[1] for r in runs), "memory_measure": runs[0][2]}


def worker(spec: Mapping[str, Any]) -> None:
    """Run ``spec['solver']`` on ``spec['points']``; one JSON line per point on stdout. A point
    that raises is a row whose note is ``error: ...`` (its traceback on stderr); the parent
    makes the command's exit status 1."""
    torch.set_num_threads(int(spec["threads"]))
    solver = spec["solver"]
    for point in spec["points"]:
        try:
            row = _point(solver, point, int(spec["repeats"]), int(spec["threads"]))
        except Exception as e:  # this point failed; the next may not
            traceback.print_exc()
            row = {**point, "solver": solver, "device": "cuda" if "gpu" in solver else "cpu",
                   "unknowns": 6 * point["poses"] * point["batch"],
                   "note": f"error: {type(e).__name__}: {e}"}
        print("ROW " + json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------


def _run_worker(solver: str, todo: list[dict[str, Any]], ctx: Context) -> list[dict[str, Any]]:
    spec = {"solver": solver, "points": todo, "repeats": REPEATS[ctx.size],
            "threads": ctx.threads}
    log(f"scaling: {solver} on {len(todo)} points")
    command = [sys.executable, "-m", "bench.paper_scaling", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        stdout, stderr, failed = proc.stdout, proc.stderr, proc.returncode != 0
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        stderr, failed = f"timed out after {WORKER_TIMEOUT_S} s", True
    rows = [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("ROW ")]
    errors = [f"scaling {solver} at {r['poses']} poses x batch {r['batch']}: {r['note']}"
              for r in rows if str(r.get("note", "")).startswith("error:")]
    if failed:
        reason = (stderr.strip().splitlines() or ["no output"])[-1]
        for point in todo[len(rows):]:
            rows.append({**point, "solver": solver, "device": "cuda" if "gpu" in solver
                         else "cpu", "unknowns": 6 * point["poses"] * point["batch"],
                         "note": f"error: {reason}"})
        errors.append(f"scaling {solver}: the worker failed: {reason}")
    if errors:
        log(f"scaling: {solver}'s worker reported errors; its stderr:\n{stderr[-4000:]}")
        ctx.errors += errors
    return rows


def solvers(ctx: Context) -> list[str]:
    """The Ariadne solvers this run tries (GPU ones with ``--device cuda`` and a GPU), then the
    peers."""
    return [*CPU_SOLVERS, *(GPU_SOLVERS if ctx.gpu else ()), *PEERS]


def run(ctx: Context) -> Result:
    """The experiment; see the module docstring."""
    from bench import ceres

    with contextlib.suppress(ceres.CeresUnavailable):
        ceres.build()  # compiled once here, not inside a timed worker
    rows: list[dict[str, Any]] = []
    for solver in solvers(ctx):
        todo = [p for p in points(ctx.size) if applies(solver, p["poses"], p["batch"])]
        if todo:
            rows += _run_worker(solver, todo, ctx)
    _ratios(rows)
    from bench.__main__ import machine_info

    info = machine_info()
    versions = ", ".join(f"{k}: {info[k]}" for k in ("gtsam", "ceres", "scikit-sparse (CHOLMOD)",
                                                     "sparse backends") if k in info)
    notes = [f"Peers and sparse libraries: {versions}.",
             "Memory measures: `rss` = resident-set high-water mark of the worker process "
             "during the solve above its level just before it; `runner_rss` = peak resident set "
             "of the whole Ceres runner process; `cuda_allocated` = torch's CUDA allocator "
             "peak above its level before the solve."]
    if ctx.device == "cuda" and not ctx.gpu:
        notes.append("--device cuda: no CUDA device on this machine "
                     f"({torch.cuda.is_available()=}); the GPU rows (cuDSS, dense and PCG on "
                     "the GPU) did not run.")
    elif not ctx.gpu:
        notes.append("CPU only (--device cpu); `--device cuda` adds cuDSS, dense and PCG on "
                     "the GPU.")
    notes += [f"{r['solver']} at {r['poses']} poses x batch {r['batch']}: {r['note']}"
              for r in rows if r.get("note")]
    what = (f"One Levenberg-Marquardt solve (at most {MAX_ITERS} iterations, default "
            "tolerances) of synthetic SE(3) helix pose graphs, per linear solver; the peers "
            "solve the batch's graphs one after another on the CPU. `time_s`: wall time of the "
            f"whole batch (median of {REPEATS[ctx.size]}), solver set-up included; "
            "`vs_best_peer`: time over the faster of GTSAM and Ceres at the same point; "
            f"`peak_mem_mb`: see the measures below. Torch and Ceres threads: {ctx.threads}; "
            "GTSAM's TBB is not limited. Dense runs where n <= 2000 and batch n^3 <= 2e10, PCG "
            "where batch n <= 2000 (the rules of `python -m bench`).")
    return Result("Scaling: one LM solve against problem size and batch size", what, COLUMNS,
                  rows, figure, figsize=FIGSIZE, notes=notes)


def _ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_best_peer``: a row's time over the faster peer's at the same point."""
    for r in rows:
        peers = [p["time_s"] for p in rows if p["solver"] in PEERS and p.get("time_s")
                 and (p["sweep"], p["poses"], p["batch"]) == (r["sweep"], r["poses"], r["batch"])]
        if r.get("time_s") and peers:
            r["vs_best_peer"] = r["time_s"] / min(peers)


_STYLE = {"gtsam": dict(ls="--", marker="s", color="0.25"),
          "ceres": dict(ls="--", marker="^", color="0.55")}


def figure(fig: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Draw the experiment's figure from its rows (as written to the CSV)."""
    axes = fig.subplots(2, 2)
    per = sorted({r["poses"] for r in rows if r["sweep"] == "batch"})
    batch_label = f"batch size (graphs of {', '.join(map(str, per))} poses)"
    panels = [("poses", "time_s", "poses per graph (batch 1)", "time of one LM solve [s]"),
              ("poses", "peak_mem_mb", "poses per graph (batch 1)", "peak memory [MB]"),
              ("batch", "time_s", batch_label, "time of the whole batch's solve [s]"),
              ("batch", "peak_mem_mb", batch_label, "peak memory [MB]")]
    for ax, (sweep, key, xlabel, ylabel) in zip(axes.flat, panels):
        mine = [r for r in rows if r["sweep"] == sweep and r.get(key) not in (None, "")]
        for solver in dict.fromkeys(r["solver"] for r in mine):
            line = [r for r in mine if r["solver"] == solver]
            label = solver if solver in PEERS else f"ariadne {solver}"
            ax.plot([r[sweep] for r in line], [float(r[key]) for r in line], label=label,
                    **_STYLE.get(solver, dict(marker="o")))
        data_ticks(ax, [r[sweep] for r in mine])
        log_axis(ax, [float(r[key]) for r in mine], decades=0.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if mine:
            ax.legend(fontsize=7)
    fig.suptitle("Scaling of one LM solve on SE(3) pose graphs (peers one by one on the CPU; "
                 "memory: rss / runner_rss / cuda_allocated, see the table)", fontsize=10)


def main(argv: Sequence[str] | None = None) -> None:
    """The worker's entry point (``--worker SPEC``); the experiment runs through
    ``python -m bench.paper scaling``."""
    parser = argparse.ArgumentParser(prog="python -m bench.paper_scaling")
    parser.add_argument("--worker", required=True, help="JSON: solver, points, repeats, threads")
    args = parser.parse_args(argv)
    worker(json.loads(args.worker))


if __name__ == "__main__":
    main()
