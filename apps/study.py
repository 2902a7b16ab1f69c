"""The backward-mode study of an app: held-out error, time per training step and memory kept for
the backward, for each backward mode at several inner iteration counts (the Theseus paper's
study, for any registered app).

``python -m apps.study APP [--quick] [--out DIR] [--modes unroll,truncated,implicit,dlm]
[--iters 2,5,10,20] [OVERRIDE ...]`` runs one Hydra multirun of ``python -m apps.APP`` over
``optimizer.backward`` x ``optimizer.max_iters`` (``--quick``: the app's smoke preset), then
collects every run's ``metrics.json`` into ``DIR/backward_study.md`` (a markdown table),
``DIR/backward_study.csv`` and ``DIR/backward_study.png`` (one panel per quantity against the
iterations, a line per mode). Columns: the app's headline held-out metric, the mean wall time of
one optimizer step (``step_time_s``) and the most memory a step kept for its backward
(``saved_mb``: the tensors autograd saved, ``apps.common.saved_bytes``), over the epochs.
``truncated`` runs its last ``optimizer.backward_iters`` iterations with gradient: at fewer
iterations than that it is ``unroll``. Every run takes exactly its number of iterations (the
convergence tests are switched off: ``optimizer.*_tol=-1``) unless ``--converge`` keeps the app's
tolerances.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

import apps
from apps import common

MODES = ("unroll", "truncated", "implicit", "dlm")
ITERS = (2, 5, 10, 20)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m apps.study", description=__doc__)
    parser.add_argument("app", choices=apps.APPS)
    parser.add_argument("--quick", action="store_true", help="the app's smoke preset")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: study_<app>)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--iters", default=",".join(map(str, ITERS)))
    parser.add_argument("--converge", action="store_true",
                        help="keep the app's convergence tests (default: run every iteration)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    return parser


#: switches the convergence tests off, so that a run takes exactly ``max_iters`` iterations
EVERY_ITERATION = ["optimizer.rel_tol=-1", "optimizer.abs_tol=-1", "optimizer.step_tol=-1",
                   "optimizer.grad_tol=-1"]


def sweep(app: str, out: Path, modes: list[str], iters: list[int], quick: bool,
          overrides: list[str]) -> None:
    """One Hydra multirun of the app into ``out/runs`` (its output in ``out/sweep.log``)."""
    command = [sys.executable, "-m", f"apps.{app}", "-m",
               f"optimizer.backward={','.join(modes)}",
               f"optimizer.max_iters={','.join(map(str, iters))}",
               *(["preset=smoke"] if quick else []), *overrides,
               f"hydra.sweep.dir={out / 'runs'}", "hydra.sweep.subdir=${hydra.job.num}"]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sweep.log").open("w") as log:
        run = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if run.returncode != 0:
        raise SystemExit(f"python -m apps.study: error: the sweep failed (exit {run.returncode});"
                         f" see {out / 'sweep.log'}")


def collect(app: str, runs: Path) -> list[dict[str, Any]]:
    """One row per run folder of ``runs``: its mode, iterations, the headline metric and the
    per-step time and memory."""
    metric = apps.task(app).metric
    rows = []
    for folder in sorted(p for p in runs.iterdir() if (p / "metrics.json").is_file()):
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
        chosen = dict(o.split("=", 1) for o in overrides if "=" in o)
        doc = json.loads((folder / "metrics.json").read_text())
        history = doc["history"]
        if not history:
            raise ValueError(f"{folder / 'metrics.json'}: no epochs (epochs=0?)")
        rows.append({
            "backward": chosen["optimizer.backward"],
            "iterations": int(chosen["optimizer.max_iters"]),
            metric: doc["val"][metric],
            "step_time_s": sum(h["step_time_s"] for h in history) / len(history),
            "saved_mb": max(h["saved_mb"] for h in history),
            "train_time_s": doc["train_time_s"],
        })
    if not rows:
        raise ValueError(f"{runs}: no run folder with a metrics.json")
    return sorted(rows, key=lambda r: (MODES.index(r["backward"]), r["iterations"]))


def write(rows: list[dict[str, Any]], out: Path, app: str) -> None:
    """The markdown table, the CSV and the figure."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "backward_study.md").write_text(
        f"# Backward modes on {app}\n\n" + "\n".join(lines) + "\n")
    common.write_csv(out / "backward_study.csv", rows)
    _figure(rows, out / "backward_study.png", app)


def _figure(rows: list[dict[str, Any]], path: Path, app: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = [k for k in rows[0] if k not in ("backward", "iterations", "train_time_s")]
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.6 * len(quantities), 3.6))
    for ax, q in zip(axes, quantities):
        for mode in dict.fromkeys(r["backward"] for r in rows):
            mine = [r for r in rows if r["backward"] == mode]
            ax.plot([r["iterations"] for r in mine], [r[q] for r in mine], marker="o",
                    label=mode)
        ax.set_xlabel("inner LM iterations")
        ax.set_title(q)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["iterations"] for r in rows})
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{app}: backward modes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parser().parse_intermixed_args(argv)  # overrides may follow the options
    out = args.out or Path(f"study_{args.app}")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"python -m apps.study: error: unknown modes {bad}; use {MODES}")
    try:
        iters = [int(k) for k in args.iters.split(",") if k]
    except ValueError:
        raise SystemExit(f"python -m apps.study: error: --iters must be integers, got "
                         f"{args.iters!r}") from None
    fixed = [] if args.converge else EVERY_ITERATION
    sweep(args.app, out, modes, iters, args.quick, [*fixed, *args.overrides])
    rows = collect(args.app, out / "runs")
    write(rows, out, args.app)
    print((out / "backward_study.md").read_text())
    return rows


if __name__ == "__main__":
    main()
