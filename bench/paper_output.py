"""What every ``python -m bench.paper`` experiment writes, and the stamp on it.

An experiment produces rows (dicts of raw numbers) and a figure; :func:`write` turns them into
``NAME.csv`` (``#`` comment lines with the stamp, then a header and the rows: read it with
``pandas.read_csv(path, comment="#")`` or :func:`read_csv`), ``NAME.md`` (the stamp, notes and a
table) and ``NAME.png`` (the figure, its bottom lines the stamp). The stamp (:func:`stamp`) names
the commit, the machine (CPU model and cores, GPU, torch/CUDA versions, BLAS), the time and the
exact command.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import math
import os
import platform
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Context:
    """How an experiment runs (from the command line).

    Attributes:
        out: the output folder; quick / tiny: the sizes (tiny: smoke tests only).
        device: ``"cpu"`` or ``"cuda"``: ``cuda`` adds the GPU rows when a GPU is present.
        threads: torch intra-op threads and Ceres threads of the timed solves.
        runs: app name -> run folder holding a ``metrics.json`` (the ``apps`` experiment).
        stamp: :func:`stamp` of this invocation.
        errors: what failed (rows with an ``error:`` note); the command exits 1 when any.
    """

    out: Path
    quick: bool = False
    tiny: bool = False
    device: str = "cpu"
    threads: int = 1
    runs: dict[str, Path] = field(default_factory=dict)
    stamp: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def size(self) -> str:
        """``"tiny"``, ``"quick"`` or ``"full"``."""
        return "tiny" if self.tiny else "quick" if self.quick else "full"

    @property
    def gpu(self) -> bool:
        """Whether GPU rows run: ``--device cuda`` and a CUDA device present."""
        return self.device == "cuda" and torch.cuda.is_available()


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[bench.paper] {message}", file=sys.stderr, flush=True)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, text=True, capture_output=True,
                          check=True).stdout.strip()


def commit() -> str:
    """``HEAD``'s hash, with ``+ uncommitted changes`` when tracked files differ from it."""
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``) and core count."""
    name = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def blas() -> str:
    """torch's BLAS (its build settings) and the system BLAS that CHOLMOD and Ceres load."""
    match = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    torch_blas = match.group(1) if match else "unknown"
    system = sorted({str(p.resolve()) for p in Path("/usr/lib").glob("*/libblas.so.3")})
    return f"torch: {torch_blas}; system (CHOLMOD, Ceres): {', '.join(system) or 'unknown'}"


def gpu_name() -> str:
    """The CUDA device's name, or why there is none."""
    if not torch.cuda.is_available():
        return "none (torch.cuda.is_available() is False)"
    return f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"


def stamp(command: str) -> dict[str, str]:
    """The provenance of one invocation: commit, machine, library versions, time, command."""
    cuda = torch.version.cuda or "none (CPU build of torch)"
    return {
        "command": command,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "cuda": cuda,
        "blas": blas(),
        "python": platform.python_version(),
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def stamp_line(info: Mapping[str, str]) -> str:
    """The stamp for a figure's footer: the command (wrapped), then commit, date and machine."""
    command = textwrap.wrap(info["command"], width=170, break_on_hyphens=False) or [""]
    return "\n".join([*command,
                      f"commit {info['commit'][:12]}  |  {info['date']}  |  CPU {info['cpu']}  |  "
                      f"GPU {info['gpu']}",
                      f"torch {info['torch']}, CUDA {info['cuda']}  |  BLAS {info['blas']}"])


def data_ticks(ax: Any, values: Sequence[float], base: int = 2) -> None:
    """A log ``base`` x axis with a plain-number tick at each value of ``values``."""
    ticks = sorted({v for v in values if v is not None})
    ax.set_xscale("log", base=base)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a GitHub markdown table over ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns)
                     + " |")
    return "\n".join(lines)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of a CSV written by :func:`write` (stamp lines skipped)."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


@dataclass(frozen=True)
class Result:
    """What an experiment hands to :func:`write`.

    Attributes:
        title: the markdown heading; what: one paragraph saying what was measured and how
            (the memory measure named).
        columns: the CSV and table columns, in order; rows: dicts over them.
        figure: ``(fig, rows) -> None`` draws the figure on a new matplotlib figure.
        figsize: the figure's size in inches.
        notes: more lines for the markdown (skipped rows and why, GPU absent, ...).
        table_columns: the markdown table's columns (default: ``columns``).
    """

    title: str
    what: str
    columns: Sequence[str]
    rows: Sequence[Mapping[str, Any]]
    figure: Callable[[Any, Sequence[Mapping[str, Any]]], None]
    figsize: tuple[float, float] = (11.0, 4.5)
    notes: Sequence[str] = ()
    table_columns: Sequence[str] | None = None


def write(ctx: Context, name: str, result: Result) -> list[Path]:
    """``ctx.out/name.{csv,md,png}``; returns the three paths."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    unknown = sorted({k for r in result.rows for k in r} - set(result.columns))
    if unknown:
        raise ValueError(f"{name}: row keys {unknown} are not among the columns")
    csv_path, md_path, png_path = (ctx.out / f"{name}.{ext}" for ext in ("csv", "md", "png"))
    with csv_path.open("w", newline="") as f:
        for key, value in ctx.stamp.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=list(result.columns))
        writer.writeheader()
        for r in result.rows:
            writer.writerow({c: _cell(r.get(c)) for c in result.columns})
    md = [f"# {result.title}", "", result.what, ""]
    md += [f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}"
           for key, value in ctx.stamp.items()]
    if result.notes:
        md += ["", "Notes:", "", *(f"- {n}" for n in result.notes)]
    md += ["", markdown_table(result.rows, result.table_columns or result.columns), "",
           f"Raw numbers: `{csv_path.name}`; figure: `{png_path.name}`."]
    md_path.write_text("\n".join(md) + "\n")
    draw(png_path, result.figure, result.figsize, result.rows, ctx.stamp)
    log(f"wrote {csv_path}, {md_path}, {png_path}")
    return [csv_path, md_path, png_path]


def draw(path: Path, figure: Callable[[Any, Sequence[Mapping[str, Any]]], None],
         figsize: tuple[float, float], rows: Sequence[Mapping[str, Any]],
         info: Mapping[str, str]) -> None:
    """``figure(fig, rows)`` with the stamp ``info`` as its footer, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize)
    figure(fig, rows)
    footer = stamp_line(info)
    fig.text(0.005, 0.005, footer, fontsize=6.5, color="0.3", ha="left", va="bottom",
             family="monospace")
    lines = footer.count("\n") + 1
    fig.tight_layout(rect=(0, (9 * lines + 14) / 72 / figsize[1], 1, 1))  # 9 pt a line
    _save_png(fig, path)
    plt.close(fig)


def _typed(cell: str) -> Any:
    """A CSV cell as written by :func:`write`: ``""`` -> None, numbers -> int / float."""
    if cell == "":
        return None
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


def replot(out: Path, name: str, figure: Callable[[Any, Sequence[Mapping[str, Any]]], None],
           figsize: tuple[float, float]) -> Path:
    """Redraw ``out/name.png`` from ``out/name.csv`` (its rows and its stamp: the figure still
    names the command, commit and machine that measured the numbers)."""
    path = out / f"{name}.csv"
    if not path.is_file():
        raise ValueError(f"--replot: {path} does not exist (run the experiment first)")
    info = {}
    for line in path.read_text().splitlines():
        if line.startswith("# ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            info[key] = value
    missing = [k for k in ("command", "commit", "date", "cpu", "gpu", "torch", "cuda", "blas")
               if k not in info]
    if missing:
        raise ValueError(f"--replot: {path} lacks the stamp lines {missing}")
    _, rows = read_csv(path)
    draw(out / f"{name}.png", figure, figsize, [{k: _typed(v) for k, v in r.items()}
                                                for r in rows], info)
    log(f"redrew {out / f'{name}.png'} from {path}")
    return out / f"{name}.png"


def _save_png(fig: Any, path: Path) -> None:
    """The figure as a 256-colour palette PNG (a third of the RGBA file; line plots lose
    nothing visible), so that the README's copies stay small."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)


def log_axis(ax: Any, values: Sequence[float], axis: str = "y", decades: float = 1.0) -> None:
    """Log scale on ``axis`` when the positive ``values`` span more than ``decades`` decades,
    with plain-number tick labels (minor ticks 2 and 5 labelled when the axis spans under 1.5
    decades); otherwise a linear axis without an offset."""
    from matplotlib import ticker

    finite = [v for v in values if v is not None and math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    target = ax.yaxis if axis == "y" else ax.xaxis
    if not (positive and len(positive) == len(finite) and max(positive) / min(positive)
            > 10**decades):
        if (ax.get_yscale() if axis == "y" else ax.get_xscale()) == "linear":
            ax.ticklabel_format(axis=axis, useOffset=False)
        return
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    narrow = max(positive) / min(positive) < 10**1.5
    target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    def minor(v: float, _: int) -> str:
        return f"{v:g}" if narrow and f"{v:e}"[0] in "25" else ""

    target.set_minor_formatter(ticker.FuncFormatter(minor))
