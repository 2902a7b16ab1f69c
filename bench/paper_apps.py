"""``python -m bench.paper apps``: every app's held-out metric against its baselines.

For each registered app (``apps.APPS``) the numbers come from a run folder's ``metrics.json``:
the folder given with ``--runs APP=DIR``, else a fresh run ``python -m apps.APP device=...
viz=false`` into ``OUT/apps_runs/APP`` (``--quick`` and ``--tiny``: with ``preset=smoke``, a run
of seconds whose numbers only show that the pipeline works; the full run: the app's default
config). Read generically: the headline metric is the app's ``Task.metric`` (lower is better);
``learned`` is ``val[metric]``, ``untrained`` the untrained network's ``val_<metric>``, and every
other method is a key ``<metric>_<name>`` of ``val`` (``baseline``, ``best_fixed``, ``gnc``,
``oracle``, ``orb``, ...), except ratios (``*ratio``) and evaluation variants (a ``<name>`` with
its own ``<metric>_<name>_baseline``, e.g. ``median`` or another test set).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.paper_output import Context, Result, log

COLUMNS = ("app", "metric", "method", "value", "vs_learned", "run_dir", "source")
FIGSIZE = (14.0, 4.8)  # inches
RUN_TIMEOUT_S = 3 * 3600


def methods(doc: Mapping[str, Any], metric: str) -> dict[str, float]:
    """``{method: value}`` of ``metric`` in a ``metrics.json`` object: ``learned``, ``untrained``
    (when recorded) and every comparison ``val[<metric>_<name>]`` (see the module docstring).

    Raises:
        ValueError: ``val`` lacks ``metric`` or ``<metric>_baseline``, or a value is not finite.
    """
    val = doc.get("val")
    if not isinstance(val, Mapping) or metric not in val or f"{metric}_baseline" not in val:
        raise ValueError(f"metrics.json of {doc.get('app', '?')!r}: val must hold {metric!r} "
                         f"and {metric + '_baseline'!r}; it has {sorted(val or {})}")
    out = {"learned": float(val[metric])}
    untrained = doc.get("untrained", {}).get(f"val_{metric}")
    if untrained is not None:
        out["untrained"] = float(untrained)
    prefix = f"{metric}_"
    names = {k[len(prefix):]: v for k, v in val.items() if k.startswith(prefix)}
    variants = {n for n in names if f"{prefix}{n}_baseline" in val}
    for name, value in names.items():
        if (name.endswith("ratio") or not isinstance(value, int | float)
                or any(name == v or name.startswith(f"{v}_") for v in variants)):
            continue
        out[name] = float(value)
    bad = {k: v for k, v in out.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"metrics.json of {doc.get('app', '?')!r}: non-finite {metric}: {bad}")
    return out


def _overrides(folder: Path) -> str:
    """``"; overrides: ..."`` from the run's ``.hydra/overrides.yaml`` (without the run folder),
    or ``""`` when the folder has none."""
    import yaml

    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    where = ("hydra.", "out_dir=", "cache_dir=")  # where the run was written, not how it ran
    items = [o for o in yaml.safe_load(path.read_text()) or [] if not o.startswith(where)]
    return f"; overrides: {' '.join(items) or 'none'}"


def _fresh_run(app: str, ctx: Context) -> Path:
    """Run the app (smoke preset unless full) into ``ctx.out/apps_runs/app``."""
    folder = (ctx.out / "apps_runs" / app).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if ctx.gpu else "cpu"
    command = [sys.executable, "-m", f"apps.{app}", f"device={device}", "viz=false",
               *(["preset=smoke"] if ctx.size != "full" else []), f"hydra.run.dir={folder}"]
    log(f"apps: {' '.join(command[1:])}")
    with (folder.parent / f"{app}.log").open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"python -m apps.{app} failed (exit {done.returncode}); see "
                           f"{folder.parent / f'{app}.log'}")
    return folder


def run(ctx: Context) -> Result:
    """The experiment; see the module docstring."""
    import apps

    unknown = sorted(set(ctx.runs) - set(apps.APPS))
    if unknown:
        raise ValueError(f"--runs names unknown apps {unknown}; the apps are {apps.APPS}")
    rows: list[dict[str, Any]] = []
    notes = []
    for app in apps.APPS:
        metric = apps.task(app).metric
        source = "given run" if app in ctx.runs else (
            "default run" if ctx.size == "full" else "preset=smoke run")
        try:
            folder = ctx.runs[app] if app in ctx.runs else _fresh_run(app, ctx)
            doc = json.loads((folder / "metrics.json").read_text())
            found = methods(doc, metric)
        except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as e:
            ctx.errors.append(f"apps {app}: {e}")
            rows.append({"app": app, "metric": metric, "method": "error", "source": str(e)})
            continue
        source += _overrides(folder)
        learned = found["learned"]
        for method, value in found.items():
            rows.append({"app": app, "metric": metric, "method": method, "value": value,
                         "vs_learned": value / learned if learned else None,
                         "run_dir": str(folder), "source": source})
        epochs = doc.get("epochs")
        notes.append(f"{app}: {source} `{folder}` (epochs: {epochs}), metric `{metric}` "
                     f"[{unit(metric)}].")
    if ctx.size != "full" and len(ctx.runs) < len(apps.APPS):
        notes.insert(0, "Apps without --runs ran their smoke preset (seconds of training on a "
                        "few samples): the numbers show the pipeline, not the apps' "
                        "performance; the full run uses each app's default config.")
    if ctx.device == "cuda" and not ctx.gpu:
        notes.append("--device cuda: no CUDA device on this machine; the apps ran on the CPU.")
    what = ("Each app's held-out headline metric (lower is better) for the learned model, the "
            "untrained network and every baseline the app reports in `metrics.json`; "
            "`vs_learned` = value / learned value (above 1: the learned model is better).")
    return Result("Apps: held-out metric against the baselines", what, COLUMNS, rows, figure,
                  figsize=FIGSIZE, notes=notes,
                  table_columns=("app", "metric", "method", "value", "vs_learned", "source"))


_UNITS = {"deg": "deg", "px": "px", "mm": "mm", "m": "m", "s": "s", "rate": "fraction",
          "frac": "fraction"}


def unit(metric: str) -> str:
    """The unit a metric's name ends with (``rot_err_deg`` -> ``deg``), else ``data units``."""
    return _UNITS.get(metric.rsplit("_", 1)[-1], "data units")


def figure(fig: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Draw the experiment's figure from its rows (as written to the CSV)."""
    apps_ = list(dict.fromkeys(r["app"] for r in rows))
    axes = fig.subplots(1, max(len(apps_), 1), squeeze=False)[0]
    for ax, app in zip(axes, apps_):
        mine = [r for r in rows if r["app"] == app and r.get("value") is not None]
        if not mine:  # the run failed: say so where its bars would be
            ax.text(0.5, 0.5, "no numbers:\nthe run failed\n(see apps.md)", ha="center",
                    va="center", transform=ax.transAxes, color="C3")
            ax.set_title(app, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        names = [r["method"] for r in mine]
        values = [float(r["value"]) for r in mine]
        colors = ["C2" if n == "learned" else "0.6" if n == "untrained" else "C0"
                  for n in names]
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.bar_label(bars, [f"{v:.3g}" for v in values], fontsize=6.5)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7.5)
        metric = mine[0]["metric"]
        ax.set_ylabel(f"held-out {metric} [{unit(metric)}] (lower is better)", fontsize=8)
        positive = [v for v in values if v > 0]
        if len(positive) == len(values) and max(values) / min(values) > 30:
            ax.set_yscale("log")
        ax.set_title(app, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    sources = ", ".join(sorted({str(r["source"]) for r in rows if r.get("value") is not None}))
    fig.suptitle(textwrap.fill("Apps: held-out metric of the learned model (green), the untrained "
                               f"network (grey) and the baselines (blue); from: {sources}", 180),
                 fontsize=10)


if __name__ == "__main__":
    raise SystemExit("run it as: python -m bench.paper apps [--quick] [--runs APP=DIR ...]")
