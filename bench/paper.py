"""Reproduce the paper's experiments, one command each.

    python -m bench.paper NAME [--quick] [--device cpu|cuda] [--out DIR] [--threads N]
                          [--runs APP=DIR ...] [--tiny]

NAME is one of:

  scaling        forward time and peak memory of one LM solve against the number of poses (64 to
                 4,096) and the batch size (1 to 256) on synthetic SE(3) pose graphs, for every
                 applicable linear solver (dense, sparse, PCG; cuDSS, dense and PCG on a GPU with
                 ``--device cuda``), GTSAM and Ceres solving the same problems one by one on the
                 CPU (``bench.paper_scaling``)
  backward       the tactile app's backward-mode study (``apps.study``: held-out error, time per
                 step and memory kept for the backward against inner iterations for unroll,
                 truncated, implicit and dlm) and ``bench.backward``'s time / memory / gradient
                 error curves for the pose-graph layer (``bench.paper_backward``)
  vectorization  one ``Cost`` per factor against one ``Cost`` for all factors: time per LM
                 iteration against the number of factors (``bench.paper_vectorization``)
  apps           every app's held-out metric against its baselines, from ``--runs`` folders or
                 fresh runs (``bench.paper_apps``)
  all            all of the above, in this order

Each experiment writes ``DIR/NAME.png`` (the figure), ``DIR/NAME.csv`` (the raw numbers) and
``DIR/NAME.md`` (a table), all stamped with the commit, the machine (CPU model and cores, GPU,
torch/CUDA versions, BLAS), the date and this command (``bench.paper_output``). ``--quick``: small
sizes (``all --quick`` takes about 10 minutes on 2 cores); ``--tiny``: the smallest sizes, for
the smoke test only. ``--replot`` redraws the figures from the CSVs in ``DIR`` (their stamps
kept). ``--device cuda`` adds the GPU rows and runs the apps on the GPU; without a
GPU it says so in the tables and runs the CPU rows. Exit status 1 when a row failed (its note
says why; the files are still written).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from bench import paper_output
from bench.paper_output import Context, log

EXPERIMENTS = ("scaling", "backward", "vectorization", "apps")


def _experiment(name: str) -> ModuleType:
    """The module of experiment ``name``: ``run(ctx) -> Result``, ``figure``, ``FIGSIZE``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; use one of {', '.join(EXPERIMENTS)}, "
                         "all")
    return importlib.import_module(f"bench.paper_{name}")


def _runs(items: Sequence[str]) -> dict[str, Path]:
    """``APP=DIR`` pairs -> {app: folder}, each folder holding a metrics.json."""
    runs = {}
    for item in items:
        app, sep, folder = item.partition("=")
        if not sep or not app or not folder:
            raise SystemExit(f"python -m bench.paper: error: --runs takes APP=DIR, got {item!r}")
        if not (Path(folder) / "metrics.json").is_file():
            raise SystemExit(f"python -m bench.paper: error: --runs {item}: "
                             f"{Path(folder) / 'metrics.json'} does not exist")
        runs[app] = Path(folder)
    return runs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.paper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=(*EXPERIMENTS, "all"))
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes)")
    parser.add_argument("--tiny", action="store_true", help="the smallest sizes (smoke tests)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: also the GPU rows (when a GPU is present)")
    parser.add_argument("--out", type=Path, default=Path("outputs/paper"),
                        help="output folder (default: outputs/paper)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op and Ceres threads of the timed solves (default 1)")
    parser.add_argument("--runs", nargs="+", default=[], metavar="APP=DIR",
                        help="apps: read APP's metrics.json from DIR instead of running it")
    parser.add_argument("--replot", action="store_true",
                        help="measure nothing: redraw DIR/NAME.png from DIR/NAME.csv")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """Run the experiment(s); returns {experiment: [csv, md, png]}."""
    args = _parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"python -m bench.paper: error: --threads must be >= 1, got "
                         f"{args.threads}")
    words = sys.argv[1:] if argv is None else list(argv)
    command = "python -m bench.paper " + shlex.join(words)
    ctx = Context(out=args.out, quick=args.quick, tiny=args.tiny, device=args.device,
                  threads=args.threads, runs=_runs(args.runs),
                  stamp=paper_output.stamp(command))
    if args.device == "cuda" and not torch.cuda.is_available():
        log("--device cuda: no CUDA device here (torch.cuda.is_available() is False); the GPU "
            "rows are skipped and the tables say so")
    torch.set_num_threads(args.threads)
    names = EXPERIMENTS if args.name == "all" else (args.name,)
    if args.replot:
        try:
            return {n: [paper_output.replot(args.out, n, _experiment(n).figure,
                                            _experiment(n).FIGSIZE)] for n in names}
        except ValueError as e:
            raise SystemExit(f"python -m bench.paper: error: {e}") from None
    written = {}
    for name in names:
        start = time.perf_counter()
        log(f"{name} ({ctx.size}) ...")
        result = _experiment(name).run(ctx)
        written[name] = paper_output.write(ctx, name, result)
        log(f"{name} done in {time.perf_counter() - start:.0f} s")
    if ctx.errors:
        raise SystemExit("python -m bench.paper: error: some rows failed (see their notes):\n  "
                         + "\n  ".join(ctx.errors))
    return written


if __name__ == "__main__":
    main()
