"""Train the loop-closure weight network end to end through Levenberg-Marquardt.

``python -m apps.pose_graph [overrides]`` (Hydra, ``conf/pose_graph.yaml``; ``preset=smoke`` for
a run of seconds); the loop, checkpoints and metrics files are ``apps.harness.fit``'s. Per step,
for each graph of the batch: the network maps the loop closures' features to weights ``w`` and a
robust-loss scale; the layer solves the weighted, robust pose graph
(``apps.pose_graph.problem.GraphProblem``) from the Ariadne GNC-TLS solution (``model.warm_start``;
computed once per graph, without gradient, the features recomputed against it) or from the
odometry; the loss is the RMS pose error of the solution against ground truth, back-propagated
through the solve (``optimizer.backward``). ``solve_time_s`` is the learned layer's solve alone;
``ate_warm_start`` the warm start's own held-out ATE.

Evaluation on held-out graphs: ATE/RPE of the learned solution; ``outlier_precision`` /
``outlier_recall`` of the learned weights (``w < 0.5`` = rejected); the ROC AUC of the
place-recognition score alone and of the learned weight; solve time. The baseline is the same LM
with uniform weights and the best fixed robust loss, kind and scale tuned on the training graphs
by grid search (``apps.pose_graph.baseline``); the oracle solves without the outliers. The
strongest classical baselines beside it (``*_best_fixed``: the best fixed loss over every family
of ``core``; ``*_gnc_ariadne``: the batched GNC-GM of ``apps.gnc``; ``*_gnc_tls``, ``*_gnc_gm``:
GTSAM's ``GncLMOptimizer``, ``ate_gnc`` the better; each tuned on training graphs) are
``baseline.best_fixed`` and ``baseline.gnc``. ``eval_g2o`` adds real g2o files with injected
outliers, scored for the learned layer and every baseline.

Outputs in the run folder: ``metrics.json``, ``metrics.csv``, ``checkpoint.pt``, ``curves.png``
and ``pose_graph.png`` (Open3D; ``show=true`` also opens it in a window).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

import core
from apps import common
from apps.config import RobustLossKind, TrainConfig, enum_of, register, spec_from_config, value
from apps.gnc import GncConfig
from apps.gnc import check_config as check_gnc
from apps.harness import Run, Task, fit, main_for
from apps.pose_graph import baseline as pg_baseline
from apps.pose_graph.data import GraphSpec, Sample, make_dataset
from apps.pose_graph.model import EdgeWeightNet
from apps.pose_graph.problem import Graphs, Scores, ate, pose_loss

APP = "pose_graph"
#: what the learned layer starts from (``ModelConfig.warm_start``)
WarmStart = enum_of("WarmStart", Literal["none", "gm", "tls"])
log = logging.getLogger(__name__)
#: the strongest baselines' held-out metric keys, copied from the reference into ``val``
STRONG = tuple(f"{m}_{b}" for m in ("ate", "rpe", "outlier_precision", "outlier_recall",
                                     "solve_time_s")
               for b in ("best_fixed", "gnc"))


@dataclass
class ModelConfig:
    """The edge-weight network (``apps.pose_graph.model.EdgeWeightNet``).

    Fields:
        hidden, layers: MLP width and depth.
        loss: the robust loss on loop closures.
        init_scale: initial robust-loss scale.
        init_bias: initial output bias (initial weights about ``sigmoid(init_bias)``).
        learn_scale: train the robust-loss scale too.
        warm_start: start the learned layer from the Ariadne GNC solution, ``tls`` (GNC-TLS,
            ``apps.gnc.graduated_tls``) or ``gm`` (GNC-GM, the schedule of ``baseline.gnc``),
            with the features recomputed against it (``apps.pose_graph.baseline.warm_start``);
            ``none``: from the odometry.
        warm_start_scale: the warm start's GNC target scale (whitened residual norm).
    """

    hidden: int = 32
    layers: int = 2
    loss: RobustLossKind = RobustLossKind.cauchy  # type: ignore[attr-defined,valid-type]
    init_scale: float = 4.0
    init_bias: float = 2.0
    learn_scale: bool = True
    warm_start: WarmStart = WarmStart.tls  # type: ignore[attr-defined,valid-type]
    warm_start_scale: float = 4.0


@dataclass
class BaselineConfig:
    """The unlearned baseline: uniform weights, the best of ``losses`` x ``scales`` on the
    training graphs (mean ATE).

    Fields:
        losses: robust loss kinds tried.
        scales: robust-loss scales tried (whitened residual norm).
        tune_graphs: how many training graphs to tune on (null: all).
        best_fixed: the families of the best fixed loss (``*_best_fixed`` metrics): the best
            (kind, scale) of ``best_fixed`` x ``scales`` on the training graphs (empty: none).
        gnc: the GNC baselines (``*_gnc_ariadne``, ``*_gnc_tls``, ``*_gnc_gm``; ``ate_gnc``
            is the better of GTSAM's TLS and GM).
    """

    losses: list[RobustLossKind] = field(  # type: ignore[valid-type]
        default_factory=lambda: [RobustLossKind.huber, RobustLossKind.cauchy])  # type: ignore
    scales: list[float] = field(
        default_factory=lambda: [0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    tune_graphs: int | None = None
    best_fixed: list[RobustLossKind] = field(  # type: ignore[valid-type]
        default_factory=lambda: [RobustLossKind.huber, RobustLossKind.cauchy,  # type: ignore
                                 RobustLossKind.welsch, RobustLossKind.geman_mcclure])  # type: ignore
    gnc: GncConfig = field(default_factory=GncConfig)


@dataclass
class PoseGraphConfig(TrainConfig):
    """``conf/pose_graph.yaml``'s schema: the common training fields plus

    Fields:
        data: the graph generator's settings (``apps.pose_graph.data.GraphSpec``).
        model, baseline: see their classes.
        prior_sqrt_info: square-root information of the gauge prior on the first pose.
        viz_graph: which held-out graph to draw; null: the one whose ATE gain over the baseline
            is the median (a representative graph, not the best case).
        eval_g2o: real g2o files to evaluate on after training, with the model trained on the
            synthetic graphs (empty: none; an absent file is skipped with a logged note;
            ``conf/pose_graph.yaml`` gives the command for the shared sphere2500, intel,
            M3500): each file's loop closures are the inliers, its clean optimum the ground
            truth, and outliers are injected as in the synthetic data
            (``apps.pose_graph.data.from_graph``); the learned layer and every baseline (their
            settings tuned on the synthetic training graphs) are scored on it; results go to
            ``metrics.json``'s ``g2o`` keyed by file name (and ``pose_graph_<file>.png``).
        eval_g2o_outlier_ratio: the fraction of a real file's loop closures that are injected
            outliers.
        eval_g2o_gtsam: also run GTSAM's GNC on the real files (slow on the large ones: more
            than 9 minutes for sphere2500 with 20% outliers on 2 CPU cores).
        ragged: solve a batch's graphs (training and evaluation) in one
            ``OptimizationLayer.ragged`` call (``core.ragged``) instead of one layer call per
            graph; same metrics. Off by default: measured no faster for the default run
            (train 54.8 s both; held-out solve time 0.18 s vs 0.08 s per graph, 2026-12-02,
            2-core machine under load 4): batches of 4 warm-started graphs of different
            iteration counts are all carried to the slowest one's (``bench.train_step``'s 16
            cold-started graphs gain).
        workers: processes beside this one (spawned once, kept until exit) that share the
            independent solves of the baselines (tuning and held-out, GTSAM's GNC included) and
            of the warm starts (``apps.common.map_calls``): the same results, on more cores
            (0: all in this process; none under torchrun or off the CPU). The default run
            on 2 cores: baselines 147 -> 80 s, warm starts 33 -> 15 s, all 218 -> 130 s
            (2026-12-02).
    """

    epochs: int = 6
    num_train: int = 32
    num_val: int = 24
    data: GraphSpec = field(default_factory=GraphSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    prior_sqrt_info: float = 1e3
    viz_graph: int | None = None
    eval_g2o: list[str] = field(default_factory=list)
    eval_g2o_outlier_ratio: float = 0.2
    eval_g2o_gtsam: bool = True
    ragged: bool = False
    workers: int = 1


register(APP, PoseGraphConfig)


def check(cfg: Any) -> None:
    """The app's own config checks (the generator's run in :func:`dataset`)."""
    scales, losses = list(cfg.baseline.scales), list(cfg.baseline.losses)
    if not scales or min(scales) <= 0:
        raise ValueError(f"baseline.scales must be positive, got {scales}")
    if not losses:
        raise ValueError("baseline.losses must not be empty")
    if cfg.viz_graph is not None and not 0 <= cfg.viz_graph < cfg.num_val:
        raise ValueError(f"viz_graph must be null or in [0, num_val), got {cfg.viz_graph}")
    check_gnc(cfg.baseline.gnc)
    if cfg.workers < 0:
        raise ValueError(f"workers must be >= 0, got {cfg.workers}")
    if not cfg.model.warm_start_scale > 0:
        raise ValueError(f"model.warm_start_scale must be > 0, got {cfg.model.warm_start_scale}")
    if not 0 < cfg.eval_g2o_outlier_ratio < 1:
        raise ValueError(f"eval_g2o_outlier_ratio must be in (0, 1), got "
                         f"{cfg.eval_g2o_outlier_ratio}")
    spec_from_config(GraphSpec, cfg.data)


def dataset(cfg: Any, seeds: Sequence[int], cache: Path | None, held_out: bool
            ) -> list[Sample]:
    """One sample per seed (held-out ones from the same generator)."""
    return make_dataset(spec_from_config(GraphSpec, cfg.data), seeds, cache)


def prepare(cfg: Any, samples: Sequence[Sample], device: torch.device) -> Graphs:
    """The learned layer's graphs (their warm starts shared with ``cfg.workers`` processes)."""
    return pg_baseline.learned_graphs(samples, cfg, device,
                                      common.worker_pool(cfg.workers, device))


def model(cfg: Any, train: Graphs) -> EdgeWeightNet:
    features = torch.cat(train.features)  # (L, len(FEATURES))
    return EdgeWeightNet.from_config(cfg.model, features)  # type: ignore[return-value]


def loss(cfg: Any, net: torch.nn.Module, graphs: Graphs, batch: Sequence[int]
         ) -> list[torch.Tensor]:
    """The RMS pose error of each graph of ``batch`` solved with the network's weights: one
    layer call per graph, or (``cfg.ragged``) all of them in one ragged call (``core.ragged``)."""
    weights, scale = common.weights_per_item(net, [graphs.features[k] for k in batch])
    if not batch:
        return []
    sols = common.solve_items(
        lambda items, ws: solve_graphs(graphs, items, ws, scale, graphs.starts), batch, weights,
        cfg.ragged)
    return [pose_loss(sol["poses"], graphs.samples[k].truth, graphs.samples[k].space)[0]
            for sol, k in zip(sols, batch)]


def solve_graphs(graphs: Graphs, items: list[int], weights: Sequence[torch.Tensor],
                 scale: torch.Tensor, starts: Sequence[torch.Tensor]
                 ) -> tuple[list[dict[str, torch.Tensor]], core.Info]:
    """Graphs ``items`` with loop weights ``weights[i] (L_k,)`` and the robust-loss ``scale``,
    started from ``starts[k]``, solved together by one ``OptimizationLayer.ragged`` call (the
    layers of all graphs share one configuration; one graph: its own layer); each graph's
    solution and the per-graph info ``(len(items),)``."""
    problems = [graphs.problems[k] for k in items]
    inputs = [p.inputs(w, scale, init=starts[k]) for p, w, k in zip(problems, weights, items)]
    if len(items) == 1:  # its own layer (a same-structure solve)
        sol, info = graphs.layers[items[0]](inputs[0])
        return [sol], info
    return graphs.layers[items[0]].ragged([p.objective for p in problems], inputs)


@torch.no_grad()
def evaluate(cfg: Any, net: torch.nn.Module, graphs: Graphs
             ) -> tuple[Scores, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Scores of the learned layer on ``graphs``, one layer call per graph (``cfg.ragged``:
    ``batch_size`` graphs per ragged call, a graph's ``solve_time_s`` its share of the call);
    outputs: each graph's weights and solution."""
    scores, outputs = Scores(), []
    size = max(1, int(cfg.batch_size)) if cfg.ragged else 1
    for first in range(0, len(graphs.samples), size):
        items = list(range(first, min(first + size, len(graphs.samples))))
        weights, scale = common.weights_per_item(net, [graphs.features[k] for k in items])
        start = time.perf_counter()
        sols, _ = solve_graphs(graphs, items, weights, scale, graphs.starts)
        share = (time.perf_counter() - start) / len(items)
        for k, w, sol in zip(items, weights, sols):
            scores.add(sol["poses"], graphs.samples[k], share, w < 0.5)
            outputs.append((w, sol["poses"][0]))
    return scores, outputs


def baseline(run: Run) -> dict[str, Any]:
    """Every baseline (``apps.pose_graph.baseline.reference``; its solves shared with
    ``cfg.workers`` processes)."""
    cfg = run.cfg
    tune = run.train.samples[: cfg.baseline.tune_graphs or len(run.train.samples)]
    return pg_baseline.reference(run, tune, common.worker_pool(cfg.workers, run.device))


def report(run: Run, metrics: dict[str, float], outputs: list[Any], net: torch.nn.Module
           ) -> tuple[dict[str, float], dict[str, Any]]:
    ref, cfg = run.reference, run.cfg
    lo = torch.cat([s.loop_outlier for s in run.val_samples])
    score = torch.cat([s.features[:, 0] for s in run.val_samples])
    val = {
        **{k: metrics[k] for k in ("ate", "rpe", "outlier_precision", "outlier_recall")},
        **{k: ref[k] for k in ("ate_baseline", "rpe_baseline", "outlier_precision_baseline",
                               "outlier_recall_baseline", "ate_oracle")},
        **{k: v for k, v in ref.items() if k.startswith(STRONG)},
        "solve_time_s": metrics["solve_time_s"],
        "solve_time_s_baseline": ref["solve_time_s_baseline"],
        "loss": metrics["loss"],
        "score_auc": common.roc_auc(score, ~lo),
    }
    if not run.dist.enabled:  # the weights of every held-out graph are on this rank
        val["weight_auc"] = common.roc_auc(torch.cat([w for w, _ in outputs]), ~lo)
        if str(value(cfg.model.warm_start)) != "none":  # the learned layer's start alone
            val["ate_warm_start"] = sum(
                float(ate(x[None], s.truth, s.space)[0])
                for x, s in zip(run.val.starts, run.val.samples)) / len(run.val.samples)
    val["ate_ratio"] = val["ate"] / max(val["ate_baseline"], 1e-12)
    extra: dict[str, Any] = {
        "baseline": {k: ref[k] for k in ("loss", "scale", "train_ate", "grid", "scales")},
        "strongest": ref["chosen"]}
    if len(cfg.eval_g2o) and run.dist.is_main:
        extra["g2o"] = pg_baseline.evaluate_g2o(run, net, evaluate)
    return val, extra


def pictures(run: Run, outputs: list[Any], net: torch.nn.Module) -> None:
    """``pose_graph.png``: the held-out graph ``viz_graph`` (default: median ATE gain over the
    baseline), when this rank holds it."""
    k = pg_baseline.picture_graph(run, outputs)
    if k is not None:
        pg_baseline.draw(run, run.out / "pose_graph.png", run.val, k, outputs)


TASK = Task(
    name=APP, metric="ate", title="pose graph: learned loop-closure weights",
    schema=PoseGraphConfig, dataset=dataset, prepare=prepare, model=model, loss=loss,
    evaluate=evaluate, baseline=baseline, report=report, pictures=pictures, check=check,
    curves=(("train_loss", "val_loss"), ("val_ate",),
            ("val_outlier_precision", "val_outlier_recall")),
    curve_lines=lambda ref: [("val_ate", "baseline (tuned robust loss)", ref["ate_baseline"]),
                             ("val_ate", "oracle (outliers removed)", ref["ate_oracle"])],
    extras=lambda net: {"scale": float(net.scale.detach())},
    keys=("ate", "ate_baseline", "rpe", "rpe_baseline", "outlier_precision", "outlier_recall",
          "ate_oracle", "score_auc"),
)
main = main_for(TASK)


def run(cfg: Any) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says (``apps.harness.fit``)."""
    return fit(TASK, cfg)
