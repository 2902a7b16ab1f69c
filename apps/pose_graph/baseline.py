"""The pose-graph app's references: the unlearned baseline (uniform weights, the best fixed robust
loss), the oracle (outliers removed), the evaluation on a real g2o file, and the picture that
compares the learned solution with the baseline's."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from apps import common
from apps import gnc as gnc_lib
from apps.config import make_optimizer, spec_from_config, value
from apps.harness import reduce_scores
from apps.pose_graph import data as pg_data
from apps.pose_graph.data import GraphSpec, Sample
from apps.pose_graph.problem import (
    GraphProblem,
    Graphs,
    Scores,
    ate,
    build_graphs,
    pose_graph_objective,
)
from core import io

log = logging.getLogger(__name__)


def tune_graph(s: Sample, kind: str, cfg: Any, device: torch.device) -> torch.Tensor:
    """``(S,)`` the ATE of sample ``s`` solved with uniform weights and the robust loss ``kind``
    at each scale of ``cfg.baseline.scales`` (one batch element per scale), on the CPU."""
    lm = make_optimizer(cfg)
    scales = torch.tensor(list(cfg.baseline.scales), dtype=torch.float64, device=device)
    p = GraphProblem.build(s.graph, s.is_loop, kind, cfg.prior_sqrt_info)
    ones = torch.ones(1, p.num_loops, dtype=torch.float64, device=device)
    inputs = p.inputs(ones, scales, batch=len(scales))
    aux = {k: v for k, v in inputs.items() if k != "poses"}
    solution = lm.solve(p.objective.with_inputs(aux), {"poses": inputs["poses"]})
    return ate(solution.values["poses"], s.truth, s.space).cpu()


def tune_calls(samples: Sequence[Sample], cfg: Any, device: torch.device, d: common.Dist,
               kinds: Sequence[Any]) -> list[common.Call]:
    """The :func:`tune_graph` calls of :func:`tune` (this rank's samples, kind by kind)."""
    return [(tune_graph, (s, str(value(kind)), cfg, device)) for kind in kinds
            for s in common.shard(samples, d)]


def tune_table(samples: Sequence[Sample], cfg: Any, d: common.Dist, kinds: Sequence[Any],
               ates: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """The mean training ATE of every (kind, scale) from :func:`tune_calls`' results."""
    mine, table = len(common.shard(samples, d)), {}
    for n, kind in enumerate(kinds):
        sums = torch.zeros(len(cfg.baseline.scales), dtype=torch.float64)
        for a in ates[n * mine: (n + 1) * mine]:
            sums += a
        total = common.all_reduce_sum(sums.tolist(), d)
        table[str(value(kind))] = [t / len(samples) for t in total]
    return table


def best_of(table: dict[str, list[float]], cfg: Any) -> dict[str, Any]:
    """The (kind, scale) of ``table`` (:func:`tune_table`) with the lowest mean ATE."""
    scales = [float(c) for c in cfg.baseline.scales]
    kind, k = min(((kind, k) for kind in table for k in range(len(scales))),
                  key=lambda kk: table[kk[0]][kk[1]])
    return {"loss": kind, "scale": scales[k], "train_ate": table[kind][k], "grid": table,
            "scales": scales}


def tune(samples: Sequence[Sample], cfg: Any, device: torch.device, d: common.Dist,
         kinds: Sequence[Any] | None = None, pool: Executor | None = None) -> dict[str, Any]:
    """Grid search of (kind, scale) with uniform weights on ``samples`` (every scale solved as
    one batch per graph, :func:`tune_graph`; the graphs shared with ``pool``'s processes) over
    ``kinds`` (default ``cfg.baseline.losses``); returns the best and the mean training ATE of
    every setting."""
    kinds = list(kinds if kinds is not None else cfg.baseline.losses)
    ates = common.map_calls(tune_calls(samples, cfg, device, d, kinds), pool)
    best = best_of(tune_table(samples, cfg, d, kinds, ates), cfg)
    log.info("baseline: %s scale %g (train ATE %.3f)", best["loss"], best["scale"],
             best["train_ate"])
    return best


@dataclass
class BaselineRun:
    """The baseline's scores and solutions on some graphs, and the oracle's scores."""

    scores: Scores
    solutions: list[torch.Tensor]
    ates: list[float]
    oracle: Scores


@torch.no_grad()
def solve_fixed(s: Sample, p: GraphProblem, layer: Any, scale: float, oracle: bool
                ) -> dict[str, Any]:
    """Sample ``s`` solved by ``layer`` (over ``p``) with uniform weights and the robust-loss
    ``scale``: ``poses (1, N, S)``, ``time_s``, ``rejected (L,)`` (``rho'(s) < 0.5`` at the
    solution); with ``oracle`` also ``oracle_poses``, ``oracle_time_s``: the outliers removed,
    least squares on the rest."""
    ones = torch.ones(p.num_loops, dtype=s.truth.dtype, device=s.truth.device)
    start = time.perf_counter()
    sol, _ = layer(p.inputs(ones, scale))
    out = {"poses": sol["poses"], "time_s": time.perf_counter() - start,
           "rejected": p.irls_weight(sol["poses"], scale)[0] < 0.5}
    if oracle:
        start = time.perf_counter()
        sol, _ = layer(p.inputs((~s.loop_outlier).to(s.truth.dtype), 1e8))  # quadratic
        out.update(oracle_poses=sol["poses"], oracle_time_s=time.perf_counter() - start)
    return out


def fixed_graph(s: Sample, kind: str, scale: float, cfg: Any, device: torch.device,
                oracle: bool) -> dict[str, Any]:
    """:func:`solve_fixed` on sample ``s`` with its problem (robust loss ``kind``) and layer
    built here (a call of :func:`apps.common.map_calls`)."""
    graphs = build_graphs([s], kind, cfg, device)
    return solve_fixed(graphs.samples[0], graphs.problems[0], graphs.layers[0], scale, oracle)


def add_solution(run: BaselineRun, s: Sample, found: dict[str, Any], oracle: bool) -> None:
    """Score one graph's :func:`solve_fixed` result (or GNC's: ``poses``, ``time_s``,
    ``rejected``) into ``run``."""
    run.scores.add(found["poses"], s, found["time_s"], found["rejected"])
    run.solutions.append(found["poses"][0])
    run.ates.append(float(ate(found["poses"], s.truth, s.space)[0]))
    if oracle:
        run.oracle.add(found["oracle_poses"], s, found["oracle_time_s"], s.loop_outlier)


@torch.no_grad()
def evaluate(graphs: Graphs, best: dict[str, Any], oracle: bool = False) -> BaselineRun:
    """The baseline (uniform weights, ``best`` loss and scale; ``graphs`` built with that loss)
    on ``graphs``; its rejections are the loop closures the robust loss keeps less than half of
    (``rho'(s) < 0.5``). With ``oracle``, also the oracle: the outliers removed, least squares on
    the rest with the same LM (a floor for any weighting)."""
    run = BaselineRun(Scores(), [], [], Scores())
    for s, p, layer in zip(graphs.samples, graphs.problems, graphs.layers):
        add_solution(run, s, solve_fixed(s, p, layer, best["scale"], oracle), oracle)
    return run


def strongest_name(reference: dict[str, Any], among: Collection[str] | None = None) -> str:
    """The baseline of ``reference`` with the lowest held-out ATE: ``baseline`` (the documented
    tuned loss) or a name of ``reference["chosen"]`` (only those of ``among`` when given)."""
    names = ["baseline", *(n for n in reference.get("chosen", {}) if among is None or n in among)]
    return min(names, key=lambda n: reference.get(f"ate_{n}", math.inf))


def baseline_setting(name: str, reference: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """Baseline ``name``'s tuned setting, the robust loss its rejections are read with and its
    label for pictures."""
    setting = ({"loss": reference["loss"], "scale": reference["scale"]} if name == "baseline"
               else reference["chosen"][name])
    if name in ("baseline", "best_fixed"):
        loss = setting["loss"]
        label = f"{'tuned' if name == 'baseline' else 'best fixed'} {loss}"
    elif name == "gnc_ariadne":
        loss, label = "geman_mcclure", "GNC-GM (Ariadne)"
    else:
        loss, label = "geman_mcclure", f"GNC-{name.removeprefix('gnc_').upper()} (GTSAM)"
    return setting, loss, f"{label}, scale {setting['scale']:g}"


def solve_baseline(name: str, reference: dict[str, Any], s: Sample, cfg: Any,
                   poses: torch.Tensor | None = None) -> tuple[BaselineRun, torch.Tensor, str]:
    """Baseline ``name`` (:func:`strongest_name`'s names) with its tuned settings on sample
    ``s`` (``poses (N, S)``: its solution, already computed): its run, the robust loss's weight
    ``(L,)`` of each loop closure at its solution (for GTSAM's GNC, Geman-McClure's at its
    threshold) and a label for pictures."""
    setting, loss, label = baseline_setting(name, reference)
    device = s.truth.device
    if poses is not None:
        result = BaselineRun(Scores(), [poses], [float(ate(poses[None], s.truth, s.space)[0])],
                             Scores())
    elif name in ("baseline", "best_fixed"):
        result = evaluate(build_graphs([s], loss, cfg, device), setting)
    elif name == "gnc_ariadne":
        result = evaluate_gnc_ariadne(build_graphs([s], loss, cfg, device), cfg,
                                      setting["scale"])
    else:
        result = evaluate_gtsam_gnc([s], cfg, name.removeprefix("gnc_"), setting["scale"])
    p = GraphProblem.build(s.graph, s.is_loop, loss, cfg.prior_sqrt_info)
    kept = p.irls_weight(result.solutions[0][None], setting["scale"])[0]
    return result, kept, label


def draw(run: Any, path: Path, graphs: Graphs, k: int, outputs: list[Any],
         name: str = "held-out", solved: dict[str, Any] | None = None) -> None:
    """A picture of graph ``k`` of ``graphs`` solved by the learned layer (``outputs[k]``: its
    weights and solution) and by the strongest baseline of ``run.reference`` (the lowest
    held-out ATE, :func:`strongest_name`); ``solved``: :func:`solve_baseline`'s results by
    name, where already computed (then the strongest among them)."""
    from apps.pose_graph import viz

    s, strongest = graphs.samples[k], strongest_name(run.reference, solved)
    kept_poses = run.reference.get("strongest_poses", {})
    if solved is not None and strongest in solved:
        base, kept, label = solved[strongest]
    elif graphs is run.val and kept_poses.get("name") == strongest:  # solved by reference()
        base, kept, label = solve_baseline(strongest, run.reference, s, run.cfg,
                                           poses=kept_poses["poses"][k])
    else:
        base, kept, label = solve_baseline(strongest, run.reference, s, run.cfg)
    weight, est = outputs[k]
    kind = f" {s.kind} graph" if s.kind != "g2o" else ""
    title = (f"{name}{kind}, {s.graph.num_poses} poses, "
             f"{int(s.loop_outlier.sum())}/{s.loop_outlier.numel()} outlier loop closures: "
             f"ATE {float(ate(est[None], s.truth, s.space)[0]):.3f} m learned, "
             f"{base.ates[0]:.3f} m {label}")
    i, j = s.graph.i[s.is_loop], s.graph.j[s.is_loop]
    viz.draw_solution(path, est, s.truth, i, j, s.loop_outlier, weight, title=title,
                      baseline=base.solutions[0], baseline_weight=kept, baseline_name=label,
                      show=run.cfg.show)


def evaluate_g2o(run: Any, net: torch.nn.Module, evaluate_learned: Callable[..., Any]
                 ) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_g2o_file` on each file of ``cfg.eval_g2o`` that exists (an absent one is
    skipped with a logged note); keyed by file name."""
    results = {}
    for path in run.cfg.eval_g2o:
        if not Path(path).is_file():
            log.warning("eval_g2o: %s not found, skipped", path)
            continue
        results[Path(path).name] = evaluate_g2o_file(run, net, evaluate_learned, Path(path))
    return results


def evaluate_g2o_file(run: Any, net: torch.nn.Module, evaluate_learned: Callable[..., Any],
                      path: Path) -> dict[str, Any]:
    """The trained network (scored by ``evaluate_learned(cfg, net, graphs)``) and every baseline
    of ``run.reference`` (its tuned settings) on the g2o file ``path`` with injected outliers
    (``eval_g2o_outlier_ratio`` of its loop closures, ``apps.pose_graph.data.from_graph``);
    ground truth: the file's graph solved by the same LM (100 iterations, no outliers). Draws
    ``pose_graph_<file>.png`` when ``cfg.viz``."""
    cfg, ref, device = run.cfg, run.reference, run.device
    t = time.perf_counter()
    graph = io.read_g2o(path)
    objective, init = pose_graph_objective(graph, cfg.prior_sqrt_info)
    truth = replace(make_optimizer(cfg), max_iters=100).solve(objective, init).values["poses"][0]
    spec = replace(spec_from_config(GraphSpec, cfg.data), outlier_ratio=cfg.eval_g2o_outlier_ratio)
    sample = pg_data.from_graph(graph, truth, spec, cfg.seed)
    graphs = learned_graphs([sample], cfg, device)
    scores, outputs = evaluate_learned(cfg, net, graphs)
    best = {"loss": ref["loss"], "scale": ref["scale"]}
    base = evaluate(build_graphs([sample], best["loss"], cfg, device), best, oracle=True)
    lo, g, solved = sample.loop_outlier, graphs.samples[0], {}
    result = {
        "file": str(path), "poses": graph.num_poses, "edges": graph.num_edges,
        "loop_closures": int(lo.numel()), "outliers": int(lo.sum()),
        **{k: v for k, v in scores.metrics().items() if k != "loss"},
        **{k: v for k, v in base.scores.metrics("_baseline").items() if k != "loss_baseline"},
        **strongest_on(g, cfg, ref, solved),
        "ate_oracle": base.oracle.metrics()["ate"],
        "ate_initial": float(ate(g.graph.poses[None], g.truth, g.space)[0]),
        "score_auc": common.roc_auc(sample.features[:, 0], ~lo),
        "ate_warm_start": float(ate(graphs.starts[0][None], g.truth, g.space)[0]),
        "weight_auc": common.roc_auc(outputs[0][0], ~lo), "time_s": time.perf_counter() - t,
    }
    log.info("%s with %d injected outliers: ATE %.3f learned, %.3f baseline, %s, %.3f oracle",
             path.name, result["outliers"], result["ate"], result["ate_baseline"],
             ", ".join(f"{result[k]:.3f} {k[4:]}" for k in result if k.startswith("ate_")
                       and k[4:] in ref.get("chosen", {})), result["ate_oracle"])
    if cfg.viz:
        try:
            draw(run, run.out / f"pose_graph_{path.stem}.png", graphs, 0, outputs,
                 name=path.name, solved=solved)
        except Exception:  # a picture never fails a run
            log.exception("could not draw the picture of %s", path)
    return result


def strongest_on(s: Sample, cfg: Any, reference: dict[str, Any],
                 solved: dict[str, Any] | None = None) -> dict[str, float]:
    """The ATE/RPE of each strongest baseline of ``reference["chosen"]`` (``train.strongest``'s
    tuned settings) on one sample ``s`` (on the device): ``ate_<name>``, ``rpe_<name>``, and
    ``ate_gnc``, the better of GTSAM's; each :func:`solve_baseline` result goes to ``solved``."""
    out: dict[str, float] = {}
    for name in reference.get("chosen", {}):
        if name.startswith(("gnc_tls", "gnc_gm")) and not cfg.eval_g2o_gtsam:
            log.info("eval_g2o_gtsam=false: no GTSAM %s on %d poses", name, s.graph.num_poses)
            continue
        found = solve_baseline(name, reference, s, cfg)
        if solved is not None:
            solved[name] = found
        metrics = found[0].scores.metrics()
        out[f"ate_{name}"], out[f"rpe_{name}"] = metrics["ate"], metrics["rpe"]
    gtsam = [v for k, v in out.items() if k in ("ate_gnc_tls", "ate_gnc_gm")]
    if gtsam:
        out["ate_gnc"] = min(gtsam)
    return out


# ------------------------------------------------------------------------------------------
# the strongest classical baselines: the best fixed loss of every family, and GNC
# ------------------------------------------------------------------------------------------


def best_fixed(samples: Sequence[Sample], tuned: dict[str, Any], cfg: Any, device: torch.device,
               d: common.Dist, pool: Executor | None = None) -> dict[str, Any]:
    """The best (kind, scale) over every family of ``cfg.baseline.best_fixed`` on the training
    ``samples`` (mean ATE); the kinds ``tuned`` (:func:`tune`'s result) already holds are not
    solved again."""
    kinds = [str(value(k)) for k in cfg.baseline.best_fixed]
    grid = {k: tuned["grid"][k] for k in kinds if k in tuned["grid"]}
    missing = [k for k in kinds if k not in grid]
    if missing:
        grid.update(tune(samples, cfg, device, d, missing, pool)["grid"])
    return best_fixed_of(grid, tuned["scales"])


def best_fixed_of(grid: dict[str, list[float]], scales: Sequence[float]) -> dict[str, Any]:
    """The best (kind, scale) of the best-fixed families' ``grid`` (mean training ATE)."""
    kind, k = min(((kind, k) for kind in grid for k in range(len(scales))),
                  key=lambda kk: grid[kk[0]][kk[1]])
    log.info("best fixed loss: %s scale %g (train ATE %.3f)", kind, scales[k], grid[kind][k])
    return {"loss": kind, "scale": float(scales[k]), "train_ate": grid[kind][k], "grid": grid}


def gnc_ariadne(p: GraphProblem, cfg: Any, target: torch.Tensor) -> torch.Tensor:
    """``(B, N, S)`` the batched Ariadne GNC-GM (``apps.gnc``) on ``p`` (built with the
    ``geman_mcclure`` loss), uniform weights, one batch element per target scale ``(B,)``."""
    lm, gnc = make_optimizer(cfg), cfg.baseline.gnc
    ones = torch.ones(1, p.num_loops, dtype=target.dtype, device=target.device)
    inputs = p.inputs(ones, target, batch=len(target))
    aux = {k: v for k, v in inputs.items() if k != "poses"}

    def solve(scale: torch.Tensor, values: dict[str, torch.Tensor], iters: int
              ) -> dict[str, torch.Tensor]:
        objective = p.objective.with_inputs({**aux, "loop.loss_scale": scale})
        return replace(lm, max_iters=iters).solve(objective, values).values

    out = gnc_lib.graduated(solve, {"poses": inputs["poses"]}, target, gnc.start, gnc.factor,
                            gnc.stage_iters, lm.max_iters)
    return out["poses"]


def gnc_tls_ariadne(p: GraphProblem, cfg: Any, target: torch.Tensor) -> torch.Tensor:
    """``(B, N, S)`` the batched Ariadne GNC-TLS (``apps.gnc.graduated_tls``) on ``p``: the
    weighted least-squares stages solved by ``cfg.optimizer``'s LM (the robust loss made
    quadratic by a huge scale), one batch element per truncation scale ``target (B,)``."""
    lm, gnc = make_optimizer(cfg), cfg.baseline.gnc
    ones = torch.ones(1, p.num_loops, dtype=target.dtype, device=target.device)
    inputs = p.inputs(ones, 1e8, batch=len(target))

    def solve(weight: torch.Tensor, values: dict[str, torch.Tensor], iters: int
              ) -> dict[str, torch.Tensor]:
        aux = p.inputs(weight.sqrt(), 1e8, batch=len(target))
        objective = p.objective.with_inputs({k: v for k, v in aux.items() if k != "poses"})
        return replace(lm, max_iters=iters).solve(objective, values).values

    out = gnc_lib.graduated_tls(solve, lambda v: p.squared(v["poses"]),
                                {"poses": inputs["poses"]}, target,
                                stage_iters=gnc.stage_iters, final_iters=lm.max_iters)
    return out["poses"]


@torch.no_grad()
def warm_start_graph(s: Sample, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``s``'s warm start (:func:`warm_start`): the GNC solution ``(N, S)`` and the loop
    closures' features ``(L, F)`` recomputed against it."""
    kind = str(value(cfg.model.warm_start))
    p = GraphProblem.build(s.graph, s.is_loop, "geman_mcclure", cfg.prior_sqrt_info)
    target = torch.tensor([float(cfg.model.warm_start_scale)], dtype=s.truth.dtype,
                          device=s.truth.device)
    solver = gnc_tls_ariadne if kind == "tls" else gnc_ariadne
    start = solver(p, cfg, target)[0]
    if not bool(torch.isfinite(start).all()):
        raise FloatingPointError(f"warm_start: GNC-{kind.upper()} gave non-finite poses "
                                 f"on a {s.kind} graph of {s.graph.num_poses} poses")
    features = pg_data.edge_features(replace(s.graph, poses=start), s.is_loop, s.features[:, 0])
    return start, features


def warm_start(graphs: Graphs, cfg: Any, pool: Executor | None = None) -> Graphs:
    """``graphs`` with the learned layer started from an Ariadne GNC solution
    (``cfg.model.warm_start``: ``tls``, :func:`gnc_tls_ariadne`, or ``gm``, :func:`gnc_ariadne`;
    target scale ``cfg.model.warm_start_scale``) instead of the odometry, and the loop closures'
    features recomputed against it (``apps.pose_graph.data.edge_features``: the residuals of
    the GNC solution, which are small for the inliers when GNC succeeds, on synthetic and real
    graphs alike). The learned layer then builds on the strongest classical solver instead of
    competing with it from the odometry. The graphs are shared with ``pool``'s processes
    (:func:`warm_start_graph` per graph)."""
    found = common.map_calls([(warm_start_graph, (s, cfg)) for s in graphs.samples], pool)
    return Graphs(graphs.samples, graphs.problems, graphs.layers, [x for x, _ in found],
                  [f for _, f in found])


def learned_graphs(samples: Sequence[Sample], cfg: Any, device: torch.device,
                   pool: Executor | None = None) -> Graphs:
    """``samples`` ready for the learned layer: its loss ``cfg.model.loss``, started from the
    odometry (``cfg.model.warm_start=none``) or from GNC's solution (:func:`warm_start`, the
    graphs shared with ``pool``'s processes)."""
    graphs = build_graphs(samples, str(value(cfg.model.loss)), cfg, device)
    if str(value(cfg.model.warm_start)) == "none":
        return graphs
    return warm_start(graphs, cfg, pool)


def gnc_tune_graph(s: Sample, cfg: Any, device: torch.device) -> torch.Tensor:
    """``(len(cfg.baseline.gnc.scales),)`` the ATE of the Ariadne GNC-GM on sample ``s`` at each
    target scale (one batch element per scale), on the CPU."""
    scales = torch.tensor(list(cfg.baseline.gnc.scales), dtype=torch.float64, device=device)
    p = GraphProblem.build(s.graph.to(device), s.is_loop.to(device), "geman_mcclure",
                           cfg.prior_sqrt_info)
    return ate(gnc_ariadne(p, cfg, scales), s.truth.to(device), s.space).cpu()


def gnc_choice(samples: Sequence[Sample], cfg: Any, d: common.Dist,
               ates: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The target scale with the lowest mean ATE from this rank's :func:`gnc_tune_graph`
    results ``ates`` (``samples``: all tuning samples)."""
    scales = [float(c) for c in cfg.baseline.gnc.scales]
    sums = torch.zeros(len(scales), dtype=torch.float64)
    for a in ates:
        sums += a
    grid = [t / len(samples) for t in common.all_reduce_sum(sums.tolist(), d)]
    k = min(range(len(grid)), key=grid.__getitem__)
    log.info("GNC-GM (Ariadne): scale %g (train ATE %.3f)", scales[k], grid[k])
    return {"scale": scales[k], "train_ate": grid[k], "grid": grid}


def tune_gnc_ariadne(samples: Sequence[Sample], cfg: Any, device: torch.device, d: common.Dist,
                     pool: Executor | None = None) -> dict[str, Any]:
    """The target scale of the Ariadne GNC-GM among ``cfg.baseline.gnc.scales``: the lowest mean
    ATE on ``samples`` (every scale one batch element; the graphs shared with ``pool``)."""
    calls = [(gnc_tune_graph, (s, cfg, device)) for s in common.shard(samples, d)]
    return gnc_choice(samples, cfg, d, common.map_calls(calls, pool))


@torch.no_grad()
def solve_gnc(s: Sample, p: GraphProblem, cfg: Any, scale: float) -> dict[str, Any]:
    """The Ariadne GNC-GM at target ``scale`` on sample ``s`` (``p`` built with
    ``geman_mcclure``): ``poses (1, N, S)``, ``time_s`` and ``rejected (L,)``
    (``rho'(s) < 0.5`` at the solution)."""
    target = torch.tensor([scale], dtype=s.truth.dtype, device=s.truth.device)
    start = time.perf_counter()
    poses = gnc_ariadne(p, cfg, target)
    elapsed = time.perf_counter() - start
    return {"poses": poses, "time_s": elapsed,
            "rejected": p.irls_weight(poses, scale)[0] < 0.5}


def gnc_graph(s: Sample, cfg: Any, scale: float, device: torch.device) -> dict[str, Any]:
    """:func:`solve_gnc` with the problem built here (a call of ``apps.common.map_calls``)."""
    graphs = build_graphs([s], "geman_mcclure", cfg, device)
    return solve_gnc(graphs.samples[0], graphs.problems[0], cfg, scale)


@torch.no_grad()
def evaluate_gnc_ariadne(graphs: Graphs, cfg: Any, scale: float) -> BaselineRun:
    """The Ariadne GNC-GM at target ``scale`` on ``graphs`` (built with ``geman_mcclure``);
    rejected: ``rho'(s) < 0.5`` at the solution."""
    run = BaselineRun(Scores(), [], [], Scores())
    for s, p in zip(graphs.samples, graphs.problems):
        add_solution(run, s, solve_gnc(s, p, cfg, scale), False)
    return run


def gtsam_available() -> bool:
    """Whether GTSAM's Python wheel imports (the GTSAM GNC baselines need it)."""
    try:
        import gtsam  # noqa: F401
    except ImportError:
        return False
    return True


def gtsam_gnc(s: Sample, kind: str, scale: float, prior_sqrt_info: float) -> torch.Tensor:
    """``(1, N, S)`` GTSAM's ``GncLMOptimizer`` (``kind``: ``tls`` or ``gm``) on sample ``s``'s
    graph with our cost (``bench.peers.gtsam_pose_graph_problem``): odometry and the prior known
    inliers, the loop closures' inlier threshold ``barcSq = scale^2 / 2`` (GTSAM's factor error
    is ``0.5 ||U r||^2``, so ``scale`` is in our whitened-residual units); GTSAM's default GNC
    and LM settings otherwise."""
    import gtsam
    import numpy as np

    from bench.peers import gtsam_pose_graph_problem

    graph = s.graph.to(torch.device("cpu"))
    fg, values = gtsam_pose_graph_problem(graph, prior_sqrt_info)
    params = gtsam.GncLMParams()
    params.setLossType(gtsam.GncLossType.TLS if kind == "tls" else gtsam.GncLossType.GM)
    odometry = (~s.is_loop.cpu()).nonzero()[:, 0].tolist()
    params.setKnownInliers(odometry + [graph.num_edges])  # the prior is the last factor
    optimizer = gtsam.GncLMOptimizer(fg, values, params)
    optimizer.setInlierCostThresholds(scale * scale / 2)
    result = optimizer.optimize()
    rows = []
    for k in range(graph.num_poses):
        if graph.dim == 3:
            pose = result.atPose3(k)
            q = pose.rotation().toQuaternion()
            rows.append([*pose.translation(), q.x(), q.y(), q.z(), q.w()])
        else:
            pose = result.atPose2(k)
            rows.append([pose.x(), pose.y(), np.cos(pose.theta()), np.sin(pose.theta())])
    return torch.tensor(rows, dtype=s.truth.dtype, device=s.truth.device)[None]


def gtsam_ate(s: Sample, kind: str, scale: float, prior_sqrt_info: float) -> float:
    """The ATE of :func:`gtsam_gnc` on sample ``s`` (a call of ``apps.common.map_calls``)."""
    return float(ate(gtsam_gnc(s, kind, scale, prior_sqrt_info), s.truth, s.space)[0])


def gtsam_tune_calls(samples: Sequence[Sample], cfg: Any, kind: str, d: common.Dist
                     ) -> list[common.Call]:
    """The :func:`gtsam_ate` calls of :func:`tune_gtsam_gnc`: this rank's samples, each at
    every scale of ``cfg.baseline.gnc.scales``."""
    return [(gtsam_ate, (s, kind, float(c), cfg.prior_sqrt_info))
            for s in common.shard(samples, d) for c in cfg.baseline.gnc.scales]


def gtsam_choice(samples: Sequence[Sample], cfg: Any, kind: str, d: common.Dist,
                 ates: Sequence[float]) -> dict[str, Any]:
    """The inlier threshold with the lowest mean ATE from :func:`gtsam_tune_calls`' results."""
    scales = list(cfg.baseline.gnc.scales)
    sums = [0.0] * len(scales)
    for n, a in enumerate(ates):
        sums[n % len(scales)] += a
    grid = [t / len(samples) for t in common.all_reduce_sum(sums, d)]
    k = min(range(len(grid)), key=grid.__getitem__)
    log.info("GNC-%s (GTSAM): scale %g (train ATE %.3f)", kind.upper(), scales[k], grid[k])
    return {"scale": scales[k], "train_ate": grid[k], "grid": grid}


def tune_gtsam_gnc(samples: Sequence[Sample], cfg: Any, kind: str, d: common.Dist,
                   pool: Executor | None = None) -> dict[str, Any]:
    """The inlier threshold (scale) of GTSAM's GNC ``kind`` among ``cfg.baseline.gnc.scales``:
    the lowest mean ATE on ``samples`` (the solves shared with ``pool``)."""
    ates = common.map_calls(gtsam_tune_calls(samples, cfg, kind, d), pool)
    return gtsam_choice(samples, cfg, kind, d, ates)


def gtsam_graph(s: Sample, cfg: Any, kind: str, scale: float) -> dict[str, Any]:
    """GTSAM's GNC ``kind`` at ``scale`` on sample ``s``: ``poses (1, N, S)``, ``time_s`` and
    ``rejected (L,)``: the loop closures whose whitened residual ``||U r||`` exceeds ``scale``
    at the solution (TLS's own rule)."""
    start = time.perf_counter()
    poses = gtsam_gnc(s, kind, scale, cfg.prior_sqrt_info)
    elapsed = time.perf_counter() - start
    p = GraphProblem.build(s.graph, s.is_loop, "geman_mcclure", cfg.prior_sqrt_info)
    return {"poses": poses, "time_s": elapsed,
            "rejected": p.irls_weight(poses, scale)[0] < 0.25}


def evaluate_gtsam_gnc(samples: Sequence[Sample], cfg: Any, kind: str, scale: float,
                       pool: Executor | None = None) -> BaselineRun:
    """GTSAM's GNC ``kind`` at ``scale`` on ``samples`` (:func:`gtsam_graph`, the graphs shared
    with ``pool``)."""
    run = BaselineRun(Scores(), [], [], Scores())
    found = common.map_calls([(gtsam_graph, (s, cfg, kind, scale)) for s in samples], pool)
    for s, f in zip(samples, found):
        add_solution(run, s, f, False)
    return run


def reference(run: Any, tune: Sequence[Sample], pool: Executor | None = None) -> dict[str, Any]:
    """Every baseline of the app on this rank's held-out graphs ``run.val``, tuned on the
    training graphs ``tune``: the documented one (:func:`tune` over ``baseline.losses``,
    :func:`evaluate` with the oracle) and the strongest (:func:`strongest`). Their solves are
    independent, so they go in two rounds of ``apps.common.map_calls`` shared with ``pool``'s
    processes: every tuning solve (every loss kind, Ariadne's and GTSAM's GNC), then every
    held-out solve; the results are those of the one-by-one functions. Returns the tuned
    setting, the ``*_baseline``/``ate_oracle`` metrics, ``ate_per_graph`` and
    :func:`strongest`'s keys."""
    cfg, d, device = run.cfg, run.dist, run.device
    gnc, few = cfg.baseline.gnc, tune[: cfg.baseline.gnc.tune_items]
    losses = [str(value(k)) for k in cfg.baseline.losses]
    fixed = [str(value(k)) for k in cfg.baseline.best_fixed]
    kinds = losses + [k for k in fixed if k not in losses]
    gtsam = list(gnc.gtsam) if gnc.gtsam and gtsam_available() else []
    if gnc.gtsam and not gtsam:
        log.warning("gtsam is not installed: no GTSAM GNC baselines (pip install gtsam)")
    calls = tune_calls(tune, cfg, device, d, kinds)
    ranges = {"kinds": (0, len(calls))}
    if gnc.ariadne:
        calls += [(gnc_tune_graph, (s, cfg, device)) for s in common.shard(few, d)]
        ranges["ariadne"] = (ranges["kinds"][1], len(calls))
    for kind in gtsam:
        start = len(calls)
        calls += gtsam_tune_calls(few, cfg, kind, d)
        ranges[kind] = (start, len(calls))
    found = common.map_calls(calls, pool)

    def part(name: str) -> list[Any]:
        return found[ranges[name][0]: ranges[name][1]]

    table = tune_table(tune, cfg, d, kinds, part("kinds"))
    best = best_of({k: table[k] for k in losses}, cfg)
    log.info("baseline: %s scale %g (train ATE %.3f)", best["loss"], best["scale"],
             best["train_ate"])
    chosen: dict[str, dict[str, Any]] = {}
    if fixed:
        chosen["best_fixed"] = best_fixed_of({k: table[k] for k in fixed}, best["scales"])
    if gnc.ariadne:
        chosen["gnc_ariadne"] = gnc_choice(few, cfg, d, part("ariadne"))
    for kind in gtsam:
        chosen[f"gnc_{kind}"] = gtsam_choice(few, cfg, kind, d, part(kind))
    return {**best, **held_out(run, best, chosen, pool)}


def held_out(run: Any, best: dict[str, Any], chosen: dict[str, dict[str, Any]],
             pool: Executor | None) -> dict[str, Any]:
    """:func:`reference`'s second round: the tuned baseline ``best`` (with the oracle) and each
    strongest baseline of ``chosen`` (its tuned setting) on this rank's held-out graphs, in
    one ``apps.common.map_calls``; the best fixed loss reuses the tuned baseline's solutions
    when it is the same loss and scale (the same solves)."""
    cfg, d, device, val = run.cfg, run.dist, run.device, run.val.samples
    same = "best_fixed" in chosen and all(chosen["best_fixed"][k] == best[k]
                                          for k in ("loss", "scale"))
    jobs: dict[str, list[common.Call]] = {
        "baseline": [(fixed_graph, (s, best["loss"], best["scale"], cfg, device, True))
                     for s in val]}
    for name, setting in chosen.items():
        if name == "best_fixed" and not same:
            jobs[name] = [(fixed_graph, (s, setting["loss"], setting["scale"], cfg, device,
                                         False)) for s in val]
        elif name == "gnc_ariadne":
            jobs[name] = [(gnc_graph, (s, cfg, setting["scale"], device)) for s in val]
        elif name.startswith("gnc_"):
            kind = name.removeprefix("gnc_")
            jobs[name] = [(gtsam_graph, (s, cfg, kind, setting["scale"])) for s in val]
    found = common.map_calls([c for calls in jobs.values() for c in calls], pool)
    runs: dict[str, BaselineRun] = {}
    for n, name in enumerate(jobs):
        runs[name] = BaselineRun(Scores(), [], [], Scores())
        for s, f in zip(val, found[n * len(val): (n + 1) * len(val)]):
            add_solution(runs[name], s, f, name == "baseline")
    if same:
        runs["best_fixed"] = runs["baseline"]
    base = runs["baseline"]
    out: dict[str, Any] = {
        **reduce_scores(base.scores, d).metrics("_baseline"),
        "ate_oracle": reduce_scores(base.oracle, d).metrics()["ate"],
        "ate_per_graph": base.ates, "chosen": {}, "per_graph": {}}
    for name, setting in chosen.items():
        out.update(reduce_scores(runs[name].scores, d).metrics(f"_{name}"))
        out["chosen"][name], out["per_graph"][name] = setting, runs[name].ates
    gtsam = [f"ate_gnc_{k}" for k in ("tls", "gm") if f"gnc_{k}" in chosen]
    if gtsam:
        out["ate_gnc"] = min(out[k] for k in gtsam)
    name = strongest_name(out)  # its solutions, for the picture (not solved again there)
    out["strongest_poses"] = {"name": name, "poses": runs[name].solutions}
    return out


def strongest(run: Any, tune: Sequence[Sample], tuned: dict[str, Any],
              pool: Executor | None = None) -> dict[str, Any]:
    """The strongest classical baselines on this rank's held-out graphs: the best fixed loss
    over ``baseline.best_fixed`` (``*_best_fixed``), Ariadne's GNC-GM (``*_gnc_ariadne``) and
    GTSAM's GNC TLS/GM (``*_gnc_tls``, ``*_gnc_gm``; ``ate_gnc``: the better); ``chosen``: each
    one's tuned settings, ``per_graph``: each one's held-out ATE per graph. (The app's run
    computes them with the tuned baseline in :func:`reference`; this is the same, one baseline
    after the other.)"""
    cfg, d, device = run.cfg, run.dist, run.device
    out: dict[str, Any] = {"chosen": {}, "per_graph": {}}

    def add(name: str, setting: dict[str, Any], result: BaselineRun) -> None:
        out.update(reduce_scores(result.scores, d).metrics(f"_{name}"))
        out["chosen"][name], out["per_graph"][name] = setting, result.ates

    if cfg.baseline.best_fixed:
        fixed = best_fixed(tune, tuned, cfg, device, d, pool)
        add("best_fixed", fixed, evaluate(
            build_graphs(run.val.samples, fixed["loss"], cfg, device), fixed))
    gnc, few = cfg.baseline.gnc, tune[: cfg.baseline.gnc.tune_items]
    if gnc.ariadne:
        best = tune_gnc_ariadne(few, cfg, device, d, pool)
        graphs = build_graphs(run.val.samples, "geman_mcclure", cfg, device)
        add("gnc_ariadne", best, evaluate_gnc_ariadne(graphs, cfg, best["scale"]))
    if gnc.gtsam and not gtsam_available():
        log.warning("gtsam is not installed: no GTSAM GNC baselines (pip install gtsam)")
    elif gnc.gtsam:
        for kind in gnc.gtsam:
            best = tune_gtsam_gnc(few, cfg, kind, d, pool)
            add(f"gnc_{kind}", best,
                evaluate_gtsam_gnc(run.val.samples, cfg, kind, best["scale"], pool))
        out["ate_gnc"] = min(out[f"ate_gnc_{kind}"] for kind in gnc.gtsam)
    return out


def picture_graph(run: Any, outputs: list[Any]) -> int | None:
    """Index into this rank's held-out graphs of the one to draw: ``cfg.viz_graph`` (None when
    another rank holds it), else the graph of median ATE gain over the baseline."""
    choice, mine = run.cfg.viz_graph, run.mine
    if choice is not None:
        return mine.index(choice) if choice in mine else None
    gains = [b - float(ate(x[None], s.truth, s.space)[0])
             for (_, x), s, b in zip(outputs, run.val.samples, run.reference["ate_per_graph"])]
    order = sorted(range(len(gains)), key=gains.__getitem__)
    return order[len(order) // 2] if order else None
