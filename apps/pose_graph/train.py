"""Train the loop-closure weight network end to end through Levenberg-Marquardt.

``python -m apps.pose_graph [overrides]`` (Hydra, ``conf/pose_graph.yaml``; ``preset=smoke`` for
a run of seconds). Per step, for each graph of the batch: the network maps the loop closures'
features to weights ``w`` and a robust-loss scale; the layer solves the weighted, robust pose
graph from the odometry initialization (``apps.pose_graph.problem.GraphProblem``); the loss is
the RMS pose error of the solution against ground truth, back-propagated through the solve
(``optimizer.backward``, implicit by default).

Evaluation on held-out graphs: ATE/RPE of the learned solution; ``outlier_precision`` /
``outlier_recall`` of the learned weights (``w < 0.5`` = rejected); the ROC AUC of the
place-recognition score alone and of the learned weight; solve time. The baseline is the same LM
with uniform weights and the best fixed robust loss, kind and scale tuned on the training graphs
by grid search; it is scored on the same held-out graphs (its ``outlier_*_baseline`` use the
robust loss's own weight ``rho'(s) < 0.5`` at its solution).

Outputs in the run folder: ``metrics.json``, ``metrics.csv``, ``checkpoint.pt`` (every epoch,
atomic; ``resume=true`` continues from it), ``curves.png`` and ``pose_graph.png`` (Open3D).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from apps import common
from apps.config import (
    OptimizerConfig,
    RobustLossKind,
    SolverConfig,
    TrainConfig,
    check_keys,
    make_layer,
    make_optimizer,
    register,
    value,
)
from apps.pose_graph import data as pg_data
from apps.pose_graph.data import FEATURES, GraphSpec, Sample, make_dataset, roc_auc
from apps.pose_graph.model import EdgeWeightNet
from apps.pose_graph.problem import (
    GraphProblem,
    ate,
    pose_graph_objective,
    pose_loss,
    rpe,
)
from core import io

log = logging.getLogger(__name__)
APP = "pose_graph"
CONF = Path(__file__).resolve().parents[2] / "conf"
METRIC_KEYS = ("ate", "ate_baseline", "rpe", "rpe_baseline", "outlier_precision",
               "outlier_recall")


@dataclass
class DataConfig:
    """Synthetic graphs (``apps.pose_graph.data.GraphSpec`` documents the generator's fields).

    Fields:
        num_train, num_val: training and held-out graphs (seeds differ, same generator).
    """

    num_train: int = 32
    num_val: int = 24
    dim: int = GraphSpec.dim
    trajectories: list[str] = field(default_factory=lambda: list(GraphSpec.trajectories))
    num_poses: list[int] = field(default_factory=lambda: list(GraphSpec.num_poses))
    step: float = GraphSpec.step
    loops_per_pose: float = GraphSpec.loops_per_pose
    loop_radius: float = GraphSpec.loop_radius
    min_gap: int = GraphSpec.min_gap
    outlier_ratio: float = GraphSpec.outlier_ratio
    sigma_t: float = GraphSpec.sigma_t
    sigma_r: float = GraphSpec.sigma_r
    loop_sigma_t: float = GraphSpec.loop_sigma_t
    loop_sigma_r: float = GraphSpec.loop_sigma_r
    score_separation: float = GraphSpec.score_separation
    outlier_group: int = GraphSpec.outlier_group
    outlier_mix: list[float] = field(default_factory=lambda: list(GraphSpec.outlier_mix))
    offset: list[float] = field(default_factory=lambda: list(GraphSpec.offset))
    offset_yaw: float = GraphSpec.offset_yaw


@dataclass
class ModelConfig:
    """The edge-weight network (``apps.pose_graph.model.EdgeWeightNet``).

    Fields:
        hidden, layers: MLP width and depth.
        loss: the robust loss on loop closures.
        init_scale: initial robust-loss scale.
        init_bias: initial output bias (initial weights about ``sigmoid(init_bias)``).
        learn_scale: train the robust-loss scale too.
    """

    hidden: int = 32
    layers: int = 2
    loss: RobustLossKind = RobustLossKind.cauchy
    init_scale: float = 4.0
    init_bias: float = 2.0
    learn_scale: bool = True


@dataclass
class BaselineConfig:
    """The unlearned baseline: uniform weights, the best of ``losses`` x ``scales`` on the
    training graphs (mean ATE).

    Fields:
        losses: robust loss kinds tried.
        scales: robust-loss scales tried (whitened residual norm).
        tune_graphs: how many training graphs to tune on (null: all).
    """

    losses: list[RobustLossKind] = field(
        default_factory=lambda: [RobustLossKind.huber, RobustLossKind.cauchy])
    scales: list[float] = field(
        default_factory=lambda: [0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    tune_graphs: int | None = None


@dataclass
class PoseGraphConfig(TrainConfig):
    """``conf/pose_graph.yaml``'s schema: the common training fields plus

    Fields:
        data, model, baseline: see their classes.
        prior_sqrt_info: square-root information of the gauge prior on the first pose.
        viz: draw ``pose_graph.png`` (a held-out graph's solution) at the end.
        viz_graph: which held-out graph to draw; null: the one whose ATE gain over the baseline
            is the median (a representative graph, not the best case).
        eval_g2o: a real g2o file to evaluate on after training (null: none): its loop
            closures are the inliers, its clean optimum the ground truth, and outliers are
            injected as in the synthetic data (``apps.pose_graph.data.from_graph``); results
            go to ``metrics.json``'s ``g2o`` (and ``pose_graph_g2o.png``).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    prior_sqrt_info: float = 1e3
    viz: bool = True
    viz_graph: int | None = None
    eval_g2o: str | None = None


register(APP, PoseGraphConfig)


def graph_spec(cfg: DataConfig | DictConfig) -> GraphSpec:
    """The generator's settings from the ``data`` config."""
    return common.spec_from_config(GraphSpec, cfg)


def check_config(cfg: Any) -> None:
    """Raise ValueError on unknown keys and on values the schema's types cannot rule out."""
    check_keys(cfg, PoseGraphConfig)
    checks = [
        (cfg.epochs >= 0, f"epochs must be >= 0, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.data.num_train >= 1, f"data.num_train must be >= 1, got {cfg.data.num_train}"),
        (cfg.data.num_val >= 1, f"data.num_val must be >= 1, got {cfg.data.num_val}"),
        (len(cfg.baseline.scales) >= 1 and min(cfg.baseline.scales) > 0,
         f"baseline.scales must be positive, got {list(cfg.baseline.scales)}"),
        (len(cfg.baseline.losses) >= 1, "baseline.losses must not be empty"),
        (cfg.viz_graph is None or 0 <= cfg.viz_graph < cfg.data.num_val,
         f"viz_graph must be null or in [0, data.num_val), got {cfg.viz_graph}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Sums over graphs (combined across ranks by summing), turned into metrics by
    :meth:`metrics`."""

    graphs: float = 0.0
    ate: float = 0.0
    rpe: float = 0.0
    loss: float = 0.0
    time_s: float = 0.0
    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0

    def add(self, est: torch.Tensor, sample: Sample, time_s: float,
            rejected: torch.Tensor | None) -> None:
        space = sample.space
        self.graphs += 1
        self.ate += float(ate(est, sample.truth, space)[0])
        self.rpe += float(rpe(est, sample.truth, space)[0])
        self.loss += float(pose_loss(est, sample.truth, space)[0])
        self.time_s += time_s
        if rejected is not None:
            out = sample.loop_outlier.to(rejected.device)
            self.tp += float((rejected & out).sum())
            self.fp += float((rejected & ~out).sum())
            self.fn += float((~rejected & out).sum())

    def reduced(self, d: common.Dist) -> Scores:
        names = [f.name for f in fields(self)]
        return Scores(*common.all_reduce_sum([getattr(self, n) for n in names], d))

    def metrics(self, suffix: str = "") -> dict[str, float]:
        n = max(self.graphs, 1.0)
        detected = self.tp + self.fp
        return {
            f"ate{suffix}": self.ate / n,
            f"rpe{suffix}": self.rpe / n,
            f"loss{suffix}": self.loss / n,
            f"solve_time_s{suffix}": self.time_s / n,
            f"outlier_precision{suffix}": self.tp / detected if detected else 1.0,
            f"outlier_recall{suffix}": self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0,
        }


@dataclass
class Graphs:
    """Samples with their problems and layers (built once, reused every epoch)."""

    samples: list[Sample]
    problems: list[GraphProblem]
    layers: list[torch.nn.Module]


def build_graphs(samples: Sequence[Sample], loss: str, cfg: Any, device: torch.device) -> Graphs:
    problems, layers = [], []
    for s in samples:
        p = GraphProblem.build(s.graph.to(device), s.is_loop.to(device), loss, cfg.prior_sqrt_info)
        problems.append(p)
        layers.append(make_layer(p.objective, cfg.optimizer, cfg.solver))
    return Graphs([_to(s, device) for s in samples], problems, layers)


def _to(s: Sample, device: torch.device) -> Sample:
    return Sample(s.graph.to(device), s.truth.to(device), s.is_loop.to(device),
                  s.is_outlier.to(device), s.features.to(device), s.kind)


@torch.no_grad()
def evaluate(model: EdgeWeightNet, graphs: Graphs) -> tuple[Scores, list[torch.Tensor],
                                                           list[torch.Tensor]]:
    """Scores of the learned layer on ``graphs``; also each graph's weights and solution."""
    scores, weights, solutions = Scores(), [], []
    for s, p, layer in zip(graphs.samples, graphs.problems, graphs.layers):
        w, scale = model(s.features)
        start = time.perf_counter()
        sol, _ = layer(p.inputs(w, scale))
        scores.add(sol["poses"], s, time.perf_counter() - start, w < 0.5)
        weights.append(w)
        solutions.append(sol["poses"][0])
    return scores, weights, solutions


# ------------------------------------------------------------------------------------------
# baseline
# ------------------------------------------------------------------------------------------


def tune_baseline(samples: Sequence[Sample], cfg: Any, device: torch.device, d: common.Dist
                  ) -> dict[str, Any]:
    """Grid search of (kind, scale) with uniform weights on ``samples``; returns the best and
    the mean training ATE of every setting."""
    lm = make_optimizer(cfg.optimizer, cfg.solver)
    scales = torch.tensor(list(cfg.baseline.scales), dtype=torch.float64, device=device)
    table: dict[str, list[float]] = {}
    for kind in cfg.baseline.losses:
        kind = str(value(kind))
        sums = torch.zeros(len(scales), dtype=torch.float64)
        for s in common.shard(samples, d):
            p = GraphProblem.build(s.graph, s.is_loop, kind, cfg.prior_sqrt_info)
            ones = torch.ones(1, p.num_loops, dtype=torch.float64, device=device)
            inputs = p.inputs(ones, scales, batch=len(scales))
            solution = lm.solve(p.objective.with_inputs(_aux(inputs)), {"poses": inputs["poses"]})
            sums += ate(solution.values["poses"], s.truth, s.space).cpu()
        total = common.all_reduce_sum(sums.tolist(), d)
        table[kind] = [t / len(samples) for t in total]
    kind, k = min(((kind, k) for kind in table for k in range(len(scales))),
                  key=lambda kk: table[kk[0]][kk[1]])
    return {"loss": kind, "scale": float(scales[k]), "train_ate": table[kind][k], "grid": table,
            "scales": scales.tolist()}


def _aux(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if k != "poses"}


@dataclass
class BaselineRun:
    """The baseline's scores and solutions on some graphs, and the oracle's scores."""

    scores: Scores
    solutions: list[torch.Tensor]
    ates: list[float]
    oracle: Scores


@torch.no_grad()
def evaluate_baseline(graphs: Graphs, best: dict[str, Any], oracle: bool = False) -> BaselineRun:
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


def references(cfg: Any, train: Sequence[Sample], val: Graphs, net: EdgeWeightNet,
               device: torch.device, d: common.Dist) -> dict[str, Any]:
    """What the curves and metrics compare with, computed once (kept in the checkpoint): the
    tuned baseline and its held-out scores, the oracle, and the untrained network."""
    t = time.perf_counter()
    best = tune_baseline(train[: cfg.baseline.tune_graphs or len(train)], cfg, device, d)
    run = evaluate_baseline(build_graphs(val.samples, best["loss"], cfg, device), best,
                            oracle=True)
    untrained, _, _ = evaluate(net, val)
    ref = {**best, **run.scores.reduced(d).metrics("_baseline"),
           "ate_oracle": run.oracle.reduced(d).metrics()["ate"], "ate_per_graph": run.ates,
           "untrained": {f"val_{k}": v for k, v in untrained.reduced(d).metrics().items()},
           "time_s": time.perf_counter() - t}
    log.info("baseline: %s scale %g (train ATE %.3f), val ATE %.3f, oracle %.3f [%.1f s]",
             best["loss"], best["scale"], best["train_ate"], ref["ate_baseline"],
             ref["ate_oracle"], ref["time_s"])
    return ref


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


def train_step(model: torch.nn.Module, graphs: Graphs, batch: Sequence[int], batch_size: int,
               world: int, opt: torch.optim.Optimizer) -> float:
    """One optimizer step on this rank's graphs ``batch`` (of a global batch of ``batch_size``
    graphs); returns the sum of their losses."""
    net = common.unwrap_model(model)
    feats = [graphs.samples[k].features for k in batch]
    if feats:
        features = torch.cat(feats)
    else:
        features = net.mean.new_zeros(0, net.mean.shape[0])
    w_all, scale = model(features)  # one forward: DistributedDataParallel's contract
    total = w_all.sum() * 0 + scale * 0  # keeps every parameter in the graph on an empty rank
    losses = 0.0
    for w, k in zip(torch.split(w_all, [f.shape[0] for f in feats]), batch):
        s, p, layer = graphs.samples[k], graphs.problems[k], graphs.layers[k]
        sol, _ = layer(p.inputs(w, scale))
        loss = pose_loss(sol["poses"], s.truth, s.space)[0]
        total = total + loss * world / batch_size
        losses += float(loss.detach())
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return losses


@dataclass
class State:
    """What a checkpoint restores."""

    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    train_time_s: float = 0.0
    reference: dict[str, Any] | None = None


def run(cfg: Any) -> dict[str, Any]:
    """Train and evaluate as configured; returns the ``metrics.json`` object (rank 0) or the
    validation metrics (other ranks)."""
    check_config(cfg)
    common.set_threads(cfg.threads)
    device = common.select_device(cfg.device)
    d = common.setup_distributed(device)
    device = common.rank_device(device, d)
    if not d.is_main:
        log.setLevel(logging.WARNING)  # one rank reports
    finished = False
    try:
        result = _run(cfg, device, d)
        finished = True
        return result
    finally:
        common.teardown_distributed(d, finished)


def _run(cfg: Any, device: torch.device, d: common.Dist) -> dict[str, Any]:
    out = common.output_dir(cfg.out_dir)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    spec = graph_spec(cfg.data)
    base = 1_000_003 * cfg.seed
    train_samples = [_to(s, device) for s in make_dataset(
        spec, [base + k for k in range(cfg.data.num_train)], cache)]
    val_samples = make_dataset(spec, [base + 500_000 + k for k in range(cfg.data.num_val)], cache)
    mine = common.shard(list(range(len(val_samples))), d)
    loss_kind = str(value(cfg.model.loss))
    train = build_graphs(train_samples, loss_kind, cfg, device)
    val = build_graphs([val_samples[k] for k in mine], loss_kind, cfg, device)

    torch.manual_seed(cfg.seed)
    net = EdgeWeightNet(len(FEATURES), cfg.model.hidden, cfg.model.layers, cfg.model.init_scale,
                        cfg.model.init_bias).double().to(device)
    net.log_scale.requires_grad_(cfg.model.learn_scale)
    net.fit_normalization(torch.cat([s.features for s in train_samples]))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr)
    state = _resume(cfg, out, net, opt)
    model = common.wrap_model(net, d)
    if state.reference is None:
        state.reference = references(cfg, train_samples, val, net, device, d)

    bar = tqdm(range(state.epoch, cfg.epochs), initial=state.epoch, total=cfg.epochs,
               desc=APP, disable=not d.is_main, dynamic_ncols=True)
    for epoch in bar:
        row = _epoch(cfg, epoch, model, net, opt, train, val, d)
        state.history.append(row)
        state.epoch, state.train_time_s = epoch + 1, state.train_time_s + row["epoch_time_s"]
        if d.is_main:
            common.save_checkpoint(out / common.CHECKPOINT, {
                "model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": state.epoch,
                "history": state.history, "train_time_s": state.train_time_s,
                "reference": state.reference, "rng": common.rng_state(),
                "config": OmegaConf.to_container(OmegaConf.create(cfg), resolve=True,
                                                 enum_to_str=True)})
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", ate=f"{row['val_ate']:.3f}")
        log.info("epoch %d/%d  train_loss %.4f  val_ate %.3f (baseline %.3f)  precision %.2f  "
                 "recall %.2f  scale %.2f  %.1f s", epoch + 1, cfg.epochs, row["train_loss"],
                 row["val_ate"], state.reference["ate_baseline"], row["val_outlier_precision"],
                 row["val_outlier_recall"], row["scale"], row["epoch_time_s"])
    return _finish(cfg, out, d, net, val, val_samples, mine, state, spec)


def _resume(cfg: Any, out: Path, net: EdgeWeightNet, opt: torch.optim.Optimizer) -> State:
    """The state to start from: the checkpoint's with ``resume=true``, else a fresh one."""
    saved = common.load_checkpoint(out / common.CHECKPOINT) if cfg.resume else None
    if saved is None:
        if cfg.resume:
            log.warning("resume=true but %s has no checkpoint: starting afresh", out)
        return State()
    net.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    common.set_rng_state(saved["rng"])
    log.info("resumed from %s at epoch %d", out / common.CHECKPOINT, saved["epoch"])
    return State(list(saved["history"]), int(saved["epoch"]), float(saved["train_time_s"]),
                 saved["reference"])


def _epoch(cfg: Any, epoch: int, model: torch.nn.Module, net: EdgeWeightNet,
           opt: torch.optim.Optimizer, train: Graphs, val: Graphs, d: common.Dist
           ) -> dict[str, float]:
    """One pass over the training graphs (shuffled by a generator seeded per epoch, so a resumed
    run takes the same batches), then the held-out scores: the epoch's history row."""
    t = time.perf_counter()
    num = len(train.samples)
    order = torch.randperm(num, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
    loss_sum = 0.0
    for b in range(0, num, cfg.batch_size):
        batch = order[b : b + cfg.batch_size].tolist()
        loss_sum += train_step(model, train, batch[d.rank :: d.world_size], len(batch),
                               d.world_size, opt)
    (loss_sum,) = common.all_reduce_sum([loss_sum], d)
    scores, _, _ = evaluate(net, val)
    return {"epoch": epoch + 1, "train_loss": loss_sum / num,
            **{f"val_{k}": v for k, v in scores.reduced(d).metrics().items()},
            "scale": float(net.scale.detach()), "epoch_time_s": time.perf_counter() - t}


def _finish(cfg: Any, out: Path, d: common.Dist, net: EdgeWeightNet, val: Graphs,
            val_samples: list[Sample], mine: list[int], state: State, spec: GraphSpec
            ) -> dict[str, Any]:
    """Final held-out metrics; on rank 0 also ``metrics.json``/``.csv``, the curves, the
    pictures and the optional g2o evaluation."""
    ref = state.reference
    assert ref is not None
    scores, weights, solutions = evaluate(net, val)
    metrics = scores.reduced(d).metrics()
    lo = torch.cat([s.loop_outlier for s in val_samples])
    score = torch.cat([s.features[:, 0] for s in val_samples])
    val_metrics = {
        **{k: metrics[k] for k in ("ate", "rpe", "outlier_precision", "outlier_recall")},
        **{k: ref[k] for k in ("ate_baseline", "rpe_baseline", "outlier_precision_baseline",
                               "outlier_recall_baseline", "ate_oracle")},
        "solve_time_s": metrics["solve_time_s"],
        "solve_time_s_baseline": ref["solve_time_s_baseline"],
        "loss": metrics["loss"],
        "score_auc": roc_auc(score, ~lo),
    }
    if not d.enabled:  # the weights of every held-out graph are on this rank
        val_metrics["weight_auc"] = roc_auc(torch.cat(weights).cpu(), ~lo)
    val_metrics["ate_ratio"] = val_metrics["ate"] / max(val_metrics["ate_baseline"], 1e-12)
    log.info("val: %s", {k: round(v, 4) for k, v in val_metrics.items()})
    if not d.is_main:
        return val_metrics
    extra: dict[str, Any] = {
        "baseline": {k: ref[k] for k in ("loss", "scale", "train_ate", "grid", "scales")},
        "untrained": ref["untrained"],
        "backward": str(value(cfg.optimizer.backward)),
        "implicit_hessian": str(value(cfg.optimizer.implicit_hessian)),
    }
    if cfg.eval_g2o:
        extra["g2o"] = evaluate_g2o(cfg, net, ref, spec, solutions[0].device, out)
    doc = common.write_metrics(out, APP, cfg.epochs, state.train_time_s, val_metrics,
                               state.history, **extra)
    if state.history:
        common.plot_curves(
            out / "curves.png", [{"epoch": 0, **ref["untrained"]}, *state.history],
            [["train_loss", "val_loss"], ["val_ate"], ["val_outlier_precision",
                                                      "val_outlier_recall"]],
            references=[("val_ate", "baseline (tuned robust loss)", ref["ate_baseline"]),
                        ("val_ate", "oracle (outliers removed)", ref["ate_oracle"])],
            title=f"pose graph: learned loop-closure weights ({cfg.data.num_train} graphs)")
    if cfg.viz:
        k = _picture_graph(cfg.viz_graph, mine, val, solutions, ref["ate_per_graph"])
        if k is not None:
            _draw(cfg, out / "pose_graph.png", val, k, weights, solutions, ref)
    return doc


def _picture_graph(choice: int | None, mine: list[int], val: Graphs,
                   solutions: list[torch.Tensor], baseline_ates: list[float]) -> int | None:
    """Index into this rank's held-out graphs of the one to draw (None: not on this rank)."""
    if choice is not None:
        return mine.index(choice) if choice in mine else None
    gains = [b - float(ate(x[None], s.truth, s.space)[0])
             for x, s, b in zip(solutions, val.samples, baseline_ates)]
    order = sorted(range(len(gains)), key=gains.__getitem__)
    return order[len(order) // 2] if order else None


def _draw(cfg: Any, path: Path, val: Graphs, k: int, weights: list[torch.Tensor],
          solutions: list[torch.Tensor], ref: dict[str, Any], name: str = "held-out") -> None:
    """A picture of graph ``k`` of ``val`` solved by the learned layer (its ``solutions`` and
    ``weights``) and by the baseline."""
    from apps.pose_graph import viz

    s = val.samples[k]
    best = {"loss": ref["loss"], "scale": ref["scale"]}
    base = build_graphs([s], best["loss"], cfg, s.truth.device)
    run = evaluate_baseline(base, best)
    kept = base.problems[0].irls_weight(run.solutions[0][None], best["scale"])[0]
    est = solutions[k][None]
    kind = f" {s.kind} graph" if s.kind != "g2o" else ""
    title = (f"{name}{kind}, {s.graph.num_poses} poses, "
             f"{int(s.loop_outlier.sum())}/{s.loop_outlier.numel()} outlier loop closures: "
             f"ATE {float(ate(est, s.truth, s.space)[0]):.3f} m learned, {run.ates[0]:.3f} m "
             f"baseline ({best['loss']}, scale {best['scale']:g})")
    i, j = s.graph.i[s.is_loop], s.graph.j[s.is_loop]
    try:
        viz.draw_solution(path, solutions[k], s.truth, i, j, s.loop_outlier, weights[k],
                          title=title, baseline=run.solutions[0], baseline_weight=kept)
    except Exception:  # a picture never fails a run
        log.exception("could not draw %s", path)


def evaluate_g2o(cfg: Any, net: EdgeWeightNet, ref: dict[str, Any], spec: GraphSpec,
                 device: torch.device, out: Path) -> dict[str, Any]:
    """The trained network and the baseline on ``cfg.eval_g2o`` with injected outliers (see
    :class:`PoseGraphConfig`); ground truth: the file's graph solved by the same LM (100
    iterations, no outliers). Draws ``pose_graph_g2o.png`` when ``cfg.viz``."""
    t = time.perf_counter()
    graph = io.read_g2o(cfg.eval_g2o)
    objective, init = pose_graph_objective(graph, cfg.prior_sqrt_info)
    clean = replace(make_optimizer(cfg.optimizer, cfg.solver), max_iters=100)
    truth = clean.solve(objective, init).values["poses"][0]
    sample = _to(pg_data.from_graph(graph, truth, spec, cfg.seed), device)
    graphs = build_graphs([sample], str(value(cfg.model.loss)), cfg, device)
    scores, weights, solutions = evaluate(net, graphs)
    best = {"loss": ref["loss"], "scale": ref["scale"]}
    run = evaluate_baseline(build_graphs([sample], best["loss"], cfg, device), best, oracle=True)
    lo = sample.loop_outlier.cpu()
    result = {
        "file": str(cfg.eval_g2o), "poses": graph.num_poses, "edges": graph.num_edges,
        "loop_closures": int(lo.numel()), "outliers": int(lo.sum()),
        **{k: v for k, v in scores.metrics().items() if k != "loss"},
        **{k: v for k, v in run.scores.metrics("_baseline").items() if k != "loss_baseline"},
        "ate_oracle": run.oracle.metrics()["ate"],
        "ate_initial": float(ate(sample.graph.poses[None], sample.truth, sample.space)[0]),
        "score_auc": roc_auc(sample.features[:, 0].cpu(), ~lo),
        "weight_auc": roc_auc(weights[0].cpu(), ~lo), "time_s": time.perf_counter() - t,
    }
    log.info("%s with %d injected outliers: ATE %.3f learned, %.3f baseline, %.3f oracle",
             cfg.eval_g2o, result["outliers"], result["ate"], result["ate_baseline"],
             result["ate_oracle"])
    if cfg.viz:
        _draw(cfg, out / "pose_graph_g2o.png", graphs, 0, weights, solutions, ref,
              name=Path(cfg.eval_g2o).name)
    return result


@hydra.main(config_path=str(CONF), config_name=APP, version_base=None)
def main(cfg: DictConfig) -> None:
    doc = run(cfg)
    val = doc.get("val", doc)
    if not math.isfinite(val.get("ate", float("nan"))):
        raise RuntimeError(f"non-finite validation ATE: {val}")


__all__ = ["BaselineConfig", "DataConfig", "ModelConfig", "OptimizerConfig", "PoseGraphConfig",
           "SolverConfig", "main", "run"]
