"""The pose-graph app's references: the unlearned baseline (uniform weights, the best fixed robust
loss), the oracle (outliers removed), the evaluation on a real g2o file, and the picture that
compares the learned solution with the baseline's."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from apps import common
from apps.config import make_optimizer, spec_from_config, value
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


def tune(samples: Sequence[Sample], cfg: Any, device: torch.device, d: common.Dist
         ) -> dict[str, Any]:
    """Grid search of (kind, scale) with uniform weights on ``samples`` (every scale solved as
    one batch per graph); returns the best and the mean training ATE of every setting."""
    lm = make_optimizer(cfg)
    scales = torch.tensor(list(cfg.baseline.scales), dtype=torch.float64, device=device)
    table: dict[str, list[float]] = {}
    for kind in cfg.baseline.losses:
        kind = str(value(kind))
        sums = torch.zeros(len(scales), dtype=torch.float64)
        for s in common.shard(samples, d):
            p = GraphProblem.build(s.graph, s.is_loop, kind, cfg.prior_sqrt_info)
            ones = torch.ones(1, p.num_loops, dtype=torch.float64, device=device)
            inputs = p.inputs(ones, scales, batch=len(scales))
            aux = {k: v for k, v in inputs.items() if k != "poses"}
            solution = lm.solve(p.objective.with_inputs(aux), {"poses": inputs["poses"]})
            sums += ate(solution.values["poses"], s.truth, s.space).cpu()
        total = common.all_reduce_sum(sums.tolist(), d)
        table[kind] = [t / len(samples) for t in total]
    kind, k = min(((kind, k) for kind in table for k in range(len(scales))),
                  key=lambda kk: table[kk[0]][kk[1]])
    log.info("baseline: %s scale %g (train ATE %.3f)", kind, float(scales[k]), table[kind][k])
    return {"loss": kind, "scale": float(scales[k]), "train_ate": table[kind][k], "grid": table,
            "scales": scales.tolist()}


@dataclass
class BaselineRun:
    """The baseline's scores and solutions on some graphs, and the oracle's scores."""

    scores: Scores
    solutions: list[torch.Tensor]
    ates: list[float]
    oracle: Scores


@torch.no_grad()
def evaluate(graphs: Graphs, best: dict[str, Any], oracle: bool = False) -> BaselineRun:
    """The baseline (uniform weights, ``best`` loss and scale; ``graphs`` built with that loss)
    on ``graphs``; its rejections are the loop closures the robust loss keeps less than half of
    (``rho'(s) < 0.5``). With ``oracle``, also the oracle: the outliers removed, least squares on
    the rest with the same LM (a floor for any weighting)."""
    run = BaselineRun(Scores(), [], [], Scores())
    for s, p, layer in zip(graphs.samples, graphs.problems, graphs.layers):
        ones = torch.ones(p.num_loops, dtype=s.truth.dtype, device=s.truth.device)
        start = time.perf_counter()
        sol, _ = layer(p.inputs(ones, best["scale"]))
        elapsed = time.perf_counter() - start
        kept = p.irls_weight(sol["poses"], best["scale"])[0]
        run.scores.add(sol["poses"], s, elapsed, kept < 0.5)
        run.solutions.append(sol["poses"][0])
        run.ates.append(float(ate(sol["poses"], s.truth, s.space)[0]))
        if oracle:
            start = time.perf_counter()
            sol, _ = layer(p.inputs((~s.loop_outlier).to(s.truth.dtype), 1e8))  # quadratic
            run.oracle.add(sol["poses"], s, time.perf_counter() - start, s.loop_outlier)
    return run


def draw(run: Any, path: Path, graphs: Graphs, k: int, outputs: list[Any],
         name: str = "held-out") -> None:
    """A picture of graph ``k`` of ``graphs`` solved by the learned layer (``outputs[k]``: its
    weights and solution) and by the baseline of ``run.reference``."""
    from apps.pose_graph import viz

    ref, s = run.reference, graphs.samples[k]
    best = {"loss": ref["loss"], "scale": ref["scale"]}
    base_graphs = build_graphs([s], best["loss"], run.cfg, s.truth.device)
    base = evaluate(base_graphs, best)
    kept = base_graphs.problems[0].irls_weight(base.solutions[0][None], best["scale"])[0]
    weight, est = outputs[k]
    kind = f" {s.kind} graph" if s.kind != "g2o" else ""
    title = (f"{name}{kind}, {s.graph.num_poses} poses, "
             f"{int(s.loop_outlier.sum())}/{s.loop_outlier.numel()} outlier loop closures: "
             f"ATE {float(ate(est[None], s.truth, s.space)[0]):.3f} m learned, "
             f"{base.ates[0]:.3f} m baseline ({best['loss']}, scale {best['scale']:g})")
    i, j = s.graph.i[s.is_loop], s.graph.j[s.is_loop]
    viz.draw_solution(path, est, s.truth, i, j, s.loop_outlier, weight, title=title,
                      baseline=base.solutions[0], baseline_weight=kept, show=run.cfg.show)


def evaluate_g2o(run: Any, net: torch.nn.Module, evaluate_learned: Callable[..., Any]
                 ) -> dict[str, Any]:
    """The trained network (scored by ``evaluate_learned(cfg, net, graphs)``) and the baseline
    on ``cfg.eval_g2o`` with injected outliers (``apps.pose_graph.train.PoseGraphConfig``);
    ground truth: the file's graph solved by the same LM (100 iterations, no outliers). Draws
    ``pose_graph_g2o.png`` when ``cfg.viz``."""
    cfg, ref, device = run.cfg, run.reference, run.device
    t = time.perf_counter()
    graph = io.read_g2o(cfg.eval_g2o)
    objective, init = pose_graph_objective(graph, cfg.prior_sqrt_info)
    truth = replace(make_optimizer(cfg), max_iters=100).solve(objective, init).values["poses"][0]
    sample = pg_data.from_graph(graph, truth, spec_from_config(GraphSpec, cfg.data), cfg.seed)
    graphs = build_graphs([sample], str(value(cfg.model.loss)), cfg, device)
    scores, outputs = evaluate_learned(cfg, net, graphs)
    best = {"loss": ref["loss"], "scale": ref["scale"]}
    base = evaluate(build_graphs([sample], best["loss"], cfg, device), best, oracle=True)
    lo, g = sample.loop_outlier, graphs.samples[0]
    result = {
        "file": str(cfg.eval_g2o), "poses": graph.num_poses, "edges": graph.num_edges,
        "loop_closures": int(lo.numel()), "outliers": int(lo.sum()),
        **{k: v for k, v in scores.metrics().items() if k != "loss"},
        **{k: v for k, v in base.scores.metrics("_baseline").items() if k != "loss_baseline"},
        "ate_oracle": base.oracle.metrics()["ate"],
        "ate_initial": float(ate(g.graph.poses[None], g.truth, g.space)[0]),
        "score_auc": common.roc_auc(sample.features[:, 0], ~lo),
        "weight_auc": common.roc_auc(outputs[0][0], ~lo), "time_s": time.perf_counter() - t,
    }
    log.info("%s with %d injected outliers: ATE %.3f learned, %.3f baseline, %.3f oracle",
             cfg.eval_g2o, result["outliers"], result["ate"], result["ate_baseline"],
             result["ate_oracle"])
    if cfg.viz:
        try:
            draw(run, run.out / "pose_graph_g2o.png", graphs, 0, outputs,
                 name=Path(cfg.eval_g2o).name)
        except Exception:  # a picture never fails a run
            log.exception("could not draw pose_graph_g2o.png")
    return result

