"""Benchmark Ariadne against GTSAM and Ceres on the same problems, side by side in one run.

    python -m bench [--json] [--quick] [--cases NAME ...] [--solvers NAME ...] [--all-solvers]
                    [--threads N] [--tiny] [--repeats N] [--markdown FILE] [--list]

Cases (``--cases`` takes names or prefixes, e.g. ``--cases synthetic_pg scaling``):
  sphere2500      the g2o file from ../shared/data (skipped when absent)
  synthetic_pg    256-pose helix pose graphs (bench.synthetic), batches of 1, 16 and 64:
                  Ariadne solves the batch in one call, GTSAM and Ceres one problem after another
  synthetic_ba    50 cameras, 8,000 points, BAL cameras (bench.synthetic)
  scaling_<N>     helix pose graphs of 1k, 10k, 100k poses, 5 LM iterations: time per iteration
                  (--quick skips 100k)

Each row is the median of ``--repeats`` timed runs (3; 1 with --quick) after a warm-up run of at
most 2 iterations; the solvers of a case run interleaved, round after round. Times cover the solve
only (graph building and file parsing excluded; symbolic analysis included). For a batch, time and
costs are sums over the batch and iterations the maximum. ``vs best peer`` is the row's time (time
per iteration for scaling cases) divided by the faster of GTSAM and Ceres on that case in this run.
With ``--json`` the last line is a JSON list of rows ``{case, solver, batch, time_s, iterations,
initial_cost, final_cost, ratio_to_best_peer, time_per_iter_s, note}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Literal

import torch

import core
from bench import ceres, peers
from bench.peers import PeerResult
from bench.synthetic import PoseGraphBatch, bal_scene, pose_graph_batch
from core.io import BALProblem, read_g2o

Kind = Literal["pose_graph", "bal"]
Problem = PoseGraphBatch | BALProblem
Runner = Callable[[int], PeerResult]  # max_iters -> result

DENSE_MAX_N = 2000  # "dense" only where n <= this and
DENSE_MAX_FLOPS = 2e10  # batch * n^3 (the Cholesky's work) <= this
PCG_MAX_N = 2000  # "pcg" only where batch * n <= this (seconds per iteration beyond; README)
PEERS = ("gtsam", "ceres")
DATA_DIR = Path(
    os.environ.get("ARIADNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
WARMUP_ITERS = 2
SCALING_ITERS = 5


class Skip(Exception):
    """A row that cannot run here; the message says why."""


@dataclass(frozen=True)
class Case:
    """One problem (``make`` builds it) and how to run it."""

    name: str
    kind: Kind
    batch: int
    make: Callable[[], Problem]
    max_iters: int = 100
    per_iteration: bool = False  # compare time per iteration (scaling series)


@dataclass
class Row:
    """One line of the table (and of the JSON output)."""

    case: str
    solver: str
    batch: int
    time_s: float | None = None
    iterations: int | None = None
    initial_cost: float | None = None
    final_cost: float | None = None
    ratio_to_best_peer: float | None = None
    time_per_iter_s: float | None = None
    note: str = ""
    per_iteration: bool = field(default=False, repr=False)

    @property
    def metric(self) -> float | None:
        """What the ratio compares: time, or time per iteration for scaling cases."""
        return self.time_per_iter_s if self.per_iteration else self.time_s


@dataclass(frozen=True)
class SolverSpec:
    """An Ariadne linear solver as a bench row ``ariadne-<name>``.

    ``make(objective)``: the ``solver=`` argument of ``core.LevenbergMarquardt`` (a name or a
    ``LinearSolver``); ``available()``: whether this core has it (rows of missing solvers are left
    out); ``applies(case, n)``: whether to run it on a case with ``n`` unknowns (``--all-solvers``
    ignores this).
    """

    name: str
    make: Callable[[core.Objective], object]
    available: Callable[[], bool]
    applies: Callable[[Case, int], bool] = lambda case, n: True
    device: str = "cpu"


def _named(name: str) -> SolverSpec:
    """A solver ``core.solvers.make_solver`` knows by ``name``."""

    def available() -> bool:
        try:
            core.solvers.make_solver(name, 10)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return False
        return True

    return SolverSpec(name, lambda objective: name, available)


def _dense_applies(case: Case, n: int) -> bool:
    return n <= DENSE_MAX_N and case.batch * float(n) ** 3 <= DENSE_MAX_FLOPS


def _pcg_applies(case: Case, n: int) -> bool:
    return case.batch * n <= PCG_MAX_N


def _schur(objective: core.Objective) -> object:
    return core.solvers.Schur(objective, eliminate="points")  # type: ignore[attr-defined]


# Ariadne solvers per kind of case, in row order: add a SolverSpec here for a new solver.
ARIADNE_SOLVERS: dict[Kind, tuple[SolverSpec, ...]] = {
    "pose_graph": (
        _named("sparse"),
        replace(_named("dense"), applies=_dense_applies),
        replace(_named("pcg"), applies=_pcg_applies),
    ),
    "bal": (
        SolverSpec("schur", _schur, lambda: hasattr(core.solvers, "Schur")),
        _named("sparse"),
    ),
}
# On a machine with CUDA and nvmath-python: the same problems on the GPU with cuDSS.
ARIADNE_SOLVERS["pose_graph"] += (
    SolverSpec("cudss-gpu", lambda objective: "cudss", core.solvers.cudss.available, device="cuda"),
)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def _size_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def make_cases(tiny: bool = False, quick: bool = False) -> list[Case]:
    """All cases; ``tiny``: small sizes for smoke tests; ``quick``: no 100k scaling case."""
    poses, batches = (32, (1, 4)) if tiny else (256, (1, 16, 64))
    ba = (5, 200) if tiny else (50, 8000)
    scaling = (200, 400) if tiny else (1000, 10_000, 100_000)
    if quick:
        scaling = tuple(n for n in scaling if n <= 10_000)
    cases = [Case("sphere2500", "pose_graph", 1, _sphere2500)]
    for b in batches:
        cases.append(
            Case("synthetic_pg", "pose_graph", b, lambda b=b: pose_graph_batch(poses, b, seed=b))
        )
    cases.append(
        Case("synthetic_ba", "bal", 1, lambda: bal_scene(*ba, views=(3, min(8, ba[0]))).problem)
    )
    for n in scaling:
        cases.append(
            Case(
                f"scaling_{_size_label(n)}",
                "pose_graph",
                1,
                lambda n=n: pose_graph_batch(n, 1, seed=n),
                SCALING_ITERS,
                True,
            )
        )
    return cases


def _sphere2500() -> PoseGraphBatch:
    path = DATA_DIR / "sphere2500.g2o"
    if not path.exists():
        raise Skip(f"{path} not found (set ARIADNE_DATA to the folder holding sphere2500.g2o)")
    return PoseGraphBatch.from_graph(read_g2o(path))


def select_cases(cases: Sequence[Case], names: Sequence[str] | None) -> list[Case]:
    """Cases whose name starts with one of ``names`` (comma-separated items allowed)."""
    if not names:
        return list(cases)
    wanted = [n for item in names for n in item.split(",") if n]
    unknown = [w for w in wanted if not any(c.name.startswith(w) for c in cases)]
    if unknown:
        known = sorted({c.name for c in cases})
        raise SystemExit(f"unknown case(s) {unknown}; known: {known}")
    return [c for c in cases if any(c.name.startswith(w) for w in wanted)]


# ---------------------------------------------------------------------------------------------
# Ariadne
# ---------------------------------------------------------------------------------------------


def pose_graph_objective(
    problem: PoseGraphBatch, prior_sqrt_info: float = 1e3
) -> tuple[core.Objective, dict[str, torch.Tensor]]:
    """The batched objective: one ``Between`` cost over all edges (measurements ``(B, E, 7)``,
    shared ``U``) and a prior on pose 0 at each element's initial value; values ``(B, N, 7)``."""
    poses = core.Variable("poses", core.SE3, count=problem.num_poses)
    between = core.costs.Between(
        poses,
        problem.i,
        problem.j,
        problem.measurements,
        sqrt_info=problem.sqrt_information(),
        name="between",
    )
    prior = core.costs.Prior(
        poses, problem.init[:, :1], index=0, sqrt_info=float(prior_sqrt_info), name="prior"
    )
    return core.Objective([between, prior]), {"poses": problem.init.clone()}


def ariadne_bal_objective(problem: BALProblem) -> tuple[core.Objective, dict[str, torch.Tensor]]:
    """The BA objective from ``core.costs.bal_objective`` (cameras SE3 world-to-camera,
    intrinsics ``(f, k1, k2)``, points; residual ``pred - observed`` as in
    ../shared/data/README.md); a Skip while core has no reprojection cost."""
    if not any(hasattr(core.costs, n) for n in ("Reprojection", "BALReprojection")):
        raise Skip("Ariadne BA cost not available yet")
    make = getattr(core.costs, "bal_objective", None)
    if make is None:
        raise Skip(
            "core.costs has a reprojection cost but no bal_objective(problem); adapt "
            "bench.__main__.ariadne_bal_objective"
        )
    return make(problem)


def _problem_dim(problem: Problem) -> int:
    if isinstance(problem, BALProblem):
        return 9 * problem.num_cameras + 3 * problem.num_points
    return 6 * problem.num_poses


def ariadne_solvers(case: Case, problem: Problem, everywhere: bool = False) -> list[SolverSpec]:
    """The solvers of ``ARIADNE_SOLVERS`` that this core has and that apply to ``case``."""
    n = _problem_dim(problem)
    return [
        spec
        for spec in ARIADNE_SOLVERS[case.kind]
        if spec.available() and (everywhere or spec.applies(case, n))
    ]


def ariadne_runner(problem: Problem, spec: SolverSpec, threads: int = 0) -> Runner:
    """Solve with ``core.LevenbergMarquardt(solver=spec.make(objective))``; the objective is built
    per call outside the timer (like the peers' graphs), its pattern and symbolic analysis (and
    the solver's index maps) inside."""

    def run(max_iters: int) -> PeerResult:
        if isinstance(problem, BALProblem):
            objective, init = ariadne_bal_objective(problem)
        else:
            objective, init = pose_graph_objective(problem)
        if spec.device != "cpu":  # moved outside the timer, like the peers' graph building
            objective = objective.to(spec.device)
            init = {k: v.to(spec.device) for k, v in init.items()}
            torch.cuda.synchronize(spec.device)
        start = time.perf_counter()
        solver = spec.make(objective)
        optimizer = core.LevenbergMarquardt(  # threads: core's automatic rule unless --threads
            max_iters=max_iters, solver=solver, threads=threads or None  # type: ignore[arg-type]
        )
        info = optimizer.solve(objective, init).info
        final = float(info.final_cost.sum())  # reading it waits for the device
        elapsed = time.perf_counter() - start
        return PeerResult(
            f"ariadne-{spec.name}",
            elapsed,
            int(info.iterations.max()),
            float(info.initial_cost.sum()),
            final,
        )

    return run


# ---------------------------------------------------------------------------------------------
# Peers (prepared once per case: graphs built, files written; each call only solves)
# ---------------------------------------------------------------------------------------------


COLD_SCRIPT = """
import json, sys, time
import torch
from bench.__main__ import pose_graph_objective
from bench.synthetic import PoseGraphBatch
from core import LevenbergMarquardt, io
graph = PoseGraphBatch.from_graph(io.read_g2o(sys.argv[1]))
objective, init = pose_graph_objective(graph)
lm = LevenbergMarquardt(max_iters=int(sys.argv[2]), solver="sparse")
out = []
for _ in range(2):  # the first solve of this process, then a warm one
    start = time.perf_counter()
    info = lm.solve(objective, {k: v.clone() for k, v in init.items()}).info
    out.append([time.perf_counter() - start, int(info.iterations.max()),
                float(info.initial_cost.sum()), float(info.final_cost.sum())])
print(json.dumps(out))
"""


def cold_runner(path: Path) -> Runner:
    """``ariadne-sparse-cold``: the first solve in a fresh Python process (imports and reading
    the file outside the timer, everything a first solve pays inside: pattern, symbolic
    analysis, first calls of the compiled kernels); the note gives the warm second solve."""
    warm: list[float] = []

    def run(max_iters: int) -> PeerResult:
        out = subprocess.run(
            [sys.executable, "-c", COLD_SCRIPT, str(path), str(max_iters)],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
        )
        if out.returncode != 0:
            raise RuntimeError(f"cold solve failed: {out.stderr.strip().splitlines()[-1:]}")
        (cold, iters, initial, final), second = json.loads(out.stdout.strip().splitlines()[-1])
        warm.append(second[0])
        return PeerResult("ariadne-sparse-cold", cold, iters, initial, final)

    run.warm = warm  # type: ignore[attr-defined]
    return run


def _lazy(prepare: Callable[[], object], solve: Callable[[object, int], PeerResult]) -> Runner:
    state: list[object] = []

    def run(max_iters: int) -> PeerResult:
        if not state:
            state.append(prepare())
        return solve(state[0], max_iters)

    return run


def peer_runners(
    problem: Problem, stack: contextlib.ExitStack, threads: int = 0
) -> dict[str, Runner]:
    """GTSAM and Ceres runners for ``problem``; files live until ``stack`` closes; ``threads``:
    Ceres's thread count (0: all cores)."""

    def folder() -> Path:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ariadne_bench_")))

    def ceres_ready() -> None:
        try:
            ceres.build()
        except ceres.CeresUnavailable as e:
            raise Skip(str(e).splitlines()[0]) from e

    if isinstance(problem, BALProblem):

        def bal_file() -> Path:
            ceres_ready()
            path = folder() / "problem.bal"
            core.io.write_bal(path, problem)
            return path

        return {
            "gtsam": _lazy(
                lambda: peers.gtsam_bal_problem(problem),
                lambda p, it: peers.gtsam_solve(p[0], p[1], it, p[2]),
            ),
            "ceres": _lazy(bal_file, lambda path, it: peers.ceres_bal_file(path, it, threads)),
        }
    graphs = [problem.graph(b) for b in range(problem.batch)]

    def g2o_files() -> list[Path]:
        ceres_ready()
        return peers.write_pose_graphs(graphs, folder())

    def gtsam_solve(built: list, max_iters: int) -> PeerResult:
        return peers.combine("gtsam", [peers.gtsam_solve(fg, v, max_iters) for fg, v in built])

    return {
        "gtsam": _lazy(lambda: [peers.gtsam_pose_graph_problem(g) for g in graphs], gtsam_solve),
        "ceres": _lazy(
            g2o_files, lambda files, it: peers.ceres_pose_graph_files(files, it, threads=threads)
        ),
    }


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _matches(name: str, filters: Sequence[str] | None) -> bool:
    return not filters or any(name.startswith(f) for f in filters)


def run_case(
    case: Case,
    repeats: int,
    solvers: Sequence[str] | None = None,
    all_solvers: bool = False,
    threads: int = 0,
) -> list[Row]:
    """Warm up, then ``repeats`` interleaved rounds over the case's solvers; median rows."""
    try:
        problem = case.make()
    except Skip as e:
        return [Row(case.name, "-", case.batch, note=f"skipped: {e}")]
    with contextlib.ExitStack() as stack:
        runners = {
            f"ariadne-{spec.name}": ariadne_runner(problem, spec, threads)
            for spec in ariadne_solvers(case, problem, all_solvers)
        }
        if case.name == "sphere2500" and _matches("ariadne-sparse-cold", solvers):
            runners["ariadne-sparse-cold"] = cold_runner(DATA_DIR / "sphere2500.g2o")
        runners.update(peer_runners(problem, stack, threads))
        runners = {n: r for n, r in runners.items() if _matches(n, solvers)}
        results: dict[str, list[PeerResult]] = {n: [] for n in runners}
        notes: dict[str, str] = {}
        for rnd in range(repeats + 1):
            for name, run in runners.items():
                if name in notes:
                    continue
                _log(
                    f"  {case.name} (batch {case.batch}) {name} "
                    f"{'warm-up' if rnd == 0 else f'run {rnd}/{repeats}'}"
                )
                try:
                    result = run(min(WARMUP_ITERS, case.max_iters) if rnd == 0 else case.max_iters)
                except Skip as e:
                    notes[name] = f"skipped: {e}"
                    continue
                except Exception as e:  # a failing solver is a row, not a crash
                    notes[name] = f"error: {type(e).__name__}: {e}"
                    continue
                if rnd > 0:
                    results[name].append(result)
    for name, run in runners.items():
        warm = getattr(run, "warm", None)
        if warm and name not in notes:  # the cold row's own warm solve, same processes
            notes[name] = (f"cold first solve; warm second solve in the same process "
                           f"{statistics.median(warm[1:] or warm):.3f} s")
    rows = [_median_row(case, n, results[n], notes.get(n, "")) for n in runners]
    return _with_ratios(rows)


def _median_row(case: Case, name: str, results: list[PeerResult], note: str) -> Row:
    row = Row(case.name, name, case.batch, note=note, per_iteration=case.per_iteration)
    if not results:
        return row

    def key(r: PeerResult) -> float:
        return r.time_s / max(r.iterations, 1) if case.per_iteration else r.time_s

    best = sorted(results, key=key)[(len(results) - 1) // 2]
    row.time_s, row.iterations = best.time_s, best.iterations
    row.initial_cost, row.final_cost = best.initial_cost, best.final_cost
    row.time_per_iter_s = best.time_s / max(best.iterations, 1)
    return row


def _with_ratios(rows: list[Row]) -> list[Row]:
    """Fill ``ratio_to_best_peer`` and flag initial costs that differ from the first row's."""
    initial = [r.initial_cost for r in rows if r.initial_cost is not None]
    for r in rows:
        if r.initial_cost is not None and not math.isclose(
            r.initial_cost, initial[0], rel_tol=1e-6
        ):
            r.note = (r.note + "; " if r.note else "") + "INITIAL COST DIFFERS"
    peer_metrics = [r.metric for r in rows if r.solver in PEERS and r.metric]
    if peer_metrics:
        best = min(peer_metrics)
        for r in rows:
            if r.metric is not None:
                r.ratio_to_best_peer = r.metric / best
    return rows


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    """CPU, cores, library versions and the BLAS CHOLMOD loads."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    blas = sorted({str(p.resolve()) for p in Path("/usr/lib").glob("*/libblas.so.3")})
    ceres_ok, ceres_where = ceres.available()
    ceres_version = _ceres_version() if ceres_ok else f"unavailable ({ceres_where.splitlines()[0]})"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "threads": f"torch {torch.get_num_threads()}, OPENBLAS_NUM_THREADS "
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}",
        "ariadne": _core_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gtsam": version("gtsam"),
        "ceres": ceres_version,
        "scikit-sparse (CHOLMOD)": version("scikit-sparse"),
        "system BLAS (CHOLMOD, Ceres)": ", ".join(blas) or "unknown",
        "sparse backends": ", ".join(core.solvers.available_backends()),
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _core_version() -> str:
    """The repository commit and whether core/ has uncommitted changes (read-only git calls)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "core"],
            cwd=root,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes in core/" if dirty else "")


def _ceres_version() -> str:
    header = Path("/usr/include/ceres/version.h")
    major = minor = patch = "?"
    with contextlib.suppress(OSError):
        for line in header.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "#define":
                major = parts[2] if parts[1] == "CERES_VERSION_MAJOR" else major
                minor = parts[2] if parts[1] == "CERES_VERSION_MINOR" else minor
                patch = parts[2] if parts[1] == "CERES_VERSION_REVISION" else patch
    return f"{major}.{minor}.{patch} (system, SuiteSparse)"


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = (
    "case",
    "batch",
    "solver",
    "time [s]",
    "iters",
    "s/iter",
    "initial cost",
    "final cost",
    "vs best peer",
    "note",
)


def _cells(r: Row) -> tuple[str, ...]:
    ratio = "-" if r.ratio_to_best_peer is None else f"{r.ratio_to_best_peer:.2f}x"
    if r.per_iteration and r.ratio_to_best_peer is not None:
        ratio += " /it"
    return (
        r.case,
        str(r.batch),
        r.solver,
        _fmt(r.time_s, ".3f"),
        _fmt(r.iterations, "d"),
        _fmt(r.time_per_iter_s, ".4f"),
        _fmt(r.initial_cost, ".10g"),
        _fmt(r.final_cost, ".10g"),
        ratio,
        r.note,
    )


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width text table."""
    cells = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(c[k]) for c in cells) for k in range(len(HEADER) - 1)]
    lines = []
    for k, c in enumerate(cells):
        left = [c[0].ljust(widths[0]), c[1].rjust(widths[1]), c[2].ljust(widths[2])]
        right = [c[i].rjust(widths[i]) for i in range(3, len(widths))]
        lines.append("  ".join(left + right + [c[-1]]).rstrip())
        if k == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def format_markdown(rows: Sequence[Row], info: dict[str, str], command: str) -> str:
    """The table and the machine as Markdown (for bench/RESULTS.md)."""
    out = ["# Benchmark results", "", f"Command: `{command}`", "", "## Machine", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [
        "",
        "## Results",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _row_json(r: Row) -> dict:
    d = asdict(r)
    d.pop("per_iteration")
    return d


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen]]:
    """``n`` processes spinning a Python loop for the duration (``--load``); ended (by their own
    ids) on exit, also when the bench fails."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark; returns the rows (also printed)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="last line: the rows as JSON")
    parser.add_argument("--quick", action="store_true", help="1 repeat, no 100k case (< 3 min)")
    parser.add_argument("--cases", nargs="+", help="case names or prefixes")
    parser.add_argument(
        "--solvers",
        nargs="+",
        help="row solver names or prefixes (ariadne, ariadne-sparse, gtsam, ceres)",
    )
    parser.add_argument(
        "--all-solvers",
        action="store_true",
        help="run every Ariadne solver on every case (pcg on sphere2500 is slow)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads and Ceres threads (default: all cores); "
        "set OPENBLAS_NUM_THREADS for CHOLMOD, GTSAM's TBB is not limited",
    )
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        help="run N busy processes (one spinning Python loop each) beside the bench, as another "
        "job or a data loader would",
    )
    parser.add_argument("--tiny", action="store_true", help="small sizes (smoke tests)")
    parser.add_argument("--repeats", type=int, help="timed runs per row (default 3, quick 1)")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    cases = select_cases(make_cases(args.tiny, args.quick), args.cases)
    if args.list:
        print("\n".join(f"{c.name} (batch {c.batch})" for c in cases))
        return []
    repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    solvers = [s for item in args.solvers or [] for s in item.split(",") if s]
    info = machine_info()
    info["threads"] += f", Ceres {args.threads or 'all cores'}, GTSAM TBB default"
    if args.load < 0:
        parser.error(f"--load must be >= 0, got {args.load}")
    info["extra load"] = f"{args.load} busy process(es) beside the bench"
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    rows: list[Row] = []
    with busy_processes(args.load):
        for case in cases:
            _log(f"{case.name} (batch {case.batch})")
            rows += run_case(case, repeats, solvers, args.all_solvers, args.threads)
    print(format_table(rows))
    info["load average at end (1, 5, 15 min)"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.markdown:
        command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
        args.markdown.write_text(format_markdown(rows, info, command.strip()))
    if args.json:
        print(json.dumps([_row_json(r) for r in rows]))
    return rows


if __name__ == "__main__":
    main()
