"""``python -m bench.paper backward``: the backward modes against the number of inner iterations.

Two studies, one figure (a row each), one CSV and one table:

- ``tactile``: the tactile app's backward-mode study, run through ``apps.study`` (one Hydra
  multirun of ``python -m apps.tactile`` over ``optimizer.backward`` in unroll, truncated,
  implicit, dlm and ``optimizer.max_iters``; every run takes exactly its iterations). Columns:
  the app's held-out metric (``val_metric`` / ``val_value``), the mean wall time of one training
  step (``time_s``) and the most memory a step kept for its backward (``memory_mb``, measure
  ``autograd_saved``: the tensors autograd saved, ``apps.common.saved_bytes``). Sizes: ``--quick``
  ``epochs=2 num_train=16 num_val=8``; the full run ``epochs=4 num_train=64 num_val=24`` (the
  setting of ``bench/RESULTS.md``); ``--tiny`` the app's smoke preset. The runs share one
  dataset cache (``cache_dir``), so the episodes are simulated once.
- ``pose_graph_layer``: ``bench.backward`` on a batch of synthetic SE(3) pose graphs: forward +
  backward time through ``core.OptimizationLayer`` (``time_s``, median), the process's
  resident-set high-water mark above its level before the forward (``memory_mb``, measure
  ``rss``) and the gradient's relative error against the implicit gradient at 50 iterations
  (``grad_rel_err``; ``grad_rel_err_exact``: against the implicit gradient with the exact
  Hessian, the figure's), for unroll, truncated, implicit and implicit with the exact Hessian.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from bench.paper_apps import unit
from bench.paper_output import Context, Result, data_ticks, log, log_axis

COLUMNS = ("study", "backward", "iterations", "val_metric", "val_value", "time_s", "memory_mb",
           "memory_measure", "grad_rel_err", "grad_rel_err_exact", "note")
FIGSIZE = (12.0, 7.6)  # inches
APP = "tactile"
TACTILE = {  # (modes, iterations, the app's smoke preset?, overrides)
    "tiny": (("unroll", "implicit"), (2, 4), True, []),
    "quick": (("unroll", "truncated", "implicit", "dlm"), (2, 5, 10, 20), False,
              ["epochs=2", "num_train=16", "num_val=8"]),
    "full": (("unroll", "truncated", "implicit", "dlm"), (2, 5, 10, 20), False,
             ["epochs=4", "num_train=64", "num_val=24"]),
}
LAYER = {  # (batch, poses, iterations, repeats)
    "tiny": (2, 24, (2, 5), 1),
    "quick": (4, 64, (2, 5, 10, 20), 1),
    "full": (16, 256, (5, 10, 20, 50), 3),
}


def tactile(ctx: Context) -> tuple[list[dict[str, Any]], list[str]]:
    """The app's study rows (``apps.study``); its files stay in ``ctx.out/backward_tactile``."""
    import apps
    from apps import study

    modes, iters, smoke, overrides = TACTILE[ctx.size]
    out = (ctx.out / "backward_tactile").resolve()
    device = "cuda" if ctx.gpu else "cpu"
    argv = [APP, "--out", str(out), "--modes", ",".join(modes), "--iters",
            ",".join(map(str, iters)), *(["--quick"] if smoke else []), f"device={device}",
            "viz=false", f"cache_dir={out / 'cache'}", *overrides]
    if (out / "runs").is_dir():  # an earlier sweep's run folders would be collected too
        log(f"backward: removing the earlier sweep {out / 'runs'}")
        shutil.rmtree(out / "runs")
    log(f"backward: python -m apps.study {' '.join(argv)}")
    try:
        found = study.main(argv)
    except SystemExit as e:  # the sweep failed: a row of the table says so; exit status 1
        ctx.errors.append(f"backward: the tactile study failed: {e}")
        return [{"study": APP, "note": f"error: {e}"}], []
    metric = apps.task(APP).metric
    rows = [{"study": APP, "backward": r["backward"], "iterations": r["iterations"],
             "val_metric": metric, "val_value": r[metric], "time_s": r["step_time_s"],
             "memory_mb": r["saved_mb"], "memory_measure": "autograd_saved"} for r in found]
    notes = [f"tactile: `python -m apps.study {' '.join(argv)}` (its own files in "
             f"`{out.name}/`); `time_s` = mean training step, `memory_mb` = most memory a step "
             "kept for its backward (autograd's saved tensors)."]
    return rows, notes


def layer(ctx: Context) -> tuple[list[dict[str, Any]], list[str]]:
    """``bench.backward``'s rows for the pose-graph layer."""
    from bench import backward

    batch, poses, iters, repeats = LAYER[ctx.size]
    argv = ["--batch", str(batch), "--poses", str(poses), "--repeats", str(repeats),
            "--threads", str(ctx.threads), "--iterations", *map(str, iters)]
    log(f"backward: python -m bench.backward {' '.join(argv)}")
    found = backward.main(argv)
    rows = [{"study": "pose_graph_layer", "backward": r.mode, "iterations": r.iterations,
             "val_metric": "", "val_value": None, "time_s": r.time_s,
             "memory_mb": r.peak_mem_mb, "memory_measure": "rss",
             "grad_rel_err": r.grad_rel_err, "grad_rel_err_exact": r.grad_rel_err_exact}
            for r in found]
    notes = [f"pose_graph_layer: `python -m bench.backward {' '.join(argv)}` (B={batch} graphs "
             f"of {poses} poses, on the CPU); `time_s` = forward + backward, `memory_mb` = "
             "resident-set high-water mark above the level before the forward, `grad_rel_err` "
             "(`grad_rel_err_exact`) = relative error against the implicit gradient at 50 "
             "iterations with the Gauss-Newton (exact) Hessian."]
    if ctx.device == "cuda":
        notes.append("bench.backward runs on the CPU (its layer uses the CPU sparse solver).")
    return rows, notes


def run(ctx: Context) -> Result:
    """The experiment; see the module docstring."""
    app_rows, app_notes = tactile(ctx)
    layer_rows, layer_notes = layer(ctx)
    notes = [*app_notes, *layer_notes]
    if ctx.device == "cuda" and not ctx.gpu:
        notes.append("--device cuda: no CUDA device on this machine; the tactile study ran on "
                     "the CPU.")
    what = ("Backward modes against the number of inner LM iterations: the tactile app's "
            "study (held-out error, time per training step, memory kept for the backward) and "
            "the pose-graph layer of `bench.backward` (time, peak memory, gradient error). "
            "Memory measures differ between the two studies (column `memory_measure`).")
    return Result("Backward modes: unroll, truncated, implicit, dlm", what, COLUMNS,
                  [*app_rows, *layer_rows], figure, figsize=FIGSIZE, notes=notes)


def _panel(ax: Any, rows: Sequence[Mapping[str, Any]], key: str, ylabel: str,
           title: str, positive: bool = False) -> None:
    """One quantity against the iterations, a line per mode; ``positive``: leave out zeros
    (the reference gradient against itself) so that a log axis can show the rest."""
    mine = [r for r in rows if isinstance(r.get(key), float | int) and math.isfinite(r[key])
            and (r[key] > 0 or not positive)]
    for mode in dict.fromkeys(r["backward"] for r in mine):
        line = [r for r in mine if r["backward"] == mode]
        ax.plot([r["iterations"] for r in line], [r[key] for r in line], marker="o", label=mode)
    data_ticks(ax, [r["iterations"] for r in mine])
    log_axis(ax, [r[key] for r in mine])
    ax.set_xlabel("inner LM iterations")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if mine:
        ax.legend(fontsize=7)


def figure(fig: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Draw the experiment's figure from its rows (as written to the CSV)."""
    axes = fig.subplots(2, 3)
    app = [r for r in rows if r["study"] == APP]
    pg = [r for r in rows if r["study"] == "pose_graph_layer"]
    metric = next((r["val_metric"] for r in app if r.get("val_metric")), "held-out metric")
    _panel(axes[0, 0], app, "val_value", f"held-out {metric} [{unit(metric)}]",
           "tactile: held-out error")
    _panel(axes[0, 1], app, "time_s", "time per training step [s]", "tactile: step time")
    _panel(axes[0, 2], app, "memory_mb", "memory kept for backward [MB]",
           "tactile: autograd saved tensors")
    _panel(axes[1, 0], pg, "grad_rel_err_exact", "rel. error vs exact-Hessian implicit@50",
           "pose-graph layer: gradient error (0 omitted)", positive=True)
    _panel(axes[1, 1], pg, "time_s", "forward + backward time [s]", "pose-graph layer: time")
    _panel(axes[1, 2], pg, "memory_mb", "peak RSS above start [MB]",
           "pose-graph layer: peak memory (RSS)")
    fig.suptitle("Backward modes against inner iterations (top: tactile app; bottom: "
                 "bench.backward pose-graph layer)", fontsize=10)


if __name__ == "__main__":
    raise SystemExit("run it as: python -m bench.paper backward [--quick]")
