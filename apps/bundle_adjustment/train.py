"""Train the observation-weight network end to end through a Schur-complement LM.

``python -m apps.bundle_adjustment [overrides]`` (Hydra, ``conf/bundle_adjustment.yaml``;
``preset=smoke`` for a run of seconds). Per step, for each scene of the batch: the network maps
each observation's matcher features to a weight ``w_o`` and gives a robust-loss scale; the layer
solves the weighted, robust bundle adjustment (``apps.bundle_adjustment.problem``) from the
scene's initial values with Levenberg-Marquardt and the Schur solver (points eliminated); the loss
is ``rotation error (deg) + center_weight * centre error`` of the cameras after a similarity
alignment to the ground truth, back-propagated through the solve (``optimizer.backward``,
implicit by default).

Evaluation on held-out scenes: camera rotation error (degrees), camera centre error (scene units)
and the inlier reprojection RMSE (pixels) of the learned layer; the ROC AUC of the matcher features
alone (their log-likelihood ratio) and of the learned weights. The baseline is the same LM with
uniform weights and a Huber loss whose scale is the best of ``baseline.scales`` on the training
scenes (grid search, lowest rotation error); ``baseline.also`` adds the same for other loss kinds
(``*_baseline_<kind>``, e.g. the learned model's own kind, so that the gain from the loss kind and
the gain from learning are told apart), and ``baseline.oracle`` the unattainable reference that
knows which observations are outliers (``*_oracle``).

Outputs in the run folder: ``metrics.json``, ``metrics.csv``, ``checkpoint.pt`` (every epoch,
atomic; ``resume=true`` continues from it), ``curves.png`` and ``reconstruction.png`` (Open3D).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from apps import common
from apps.bundle_adjustment.data import (
    FEATURES,
    Scene,
    SceneSpec,
    feature_auc,
    make_dataset,
    roc_auc,
)
from apps.bundle_adjustment.model import ObservationWeightNet
from apps.bundle_adjustment.problem import (
    BAObjective,
    ba_objective,
    inlier_rmse,
    pose_errors,
)
from apps.config import (
    OptimizerConfig,
    RobustLossKind,
    SolverConfig,
    TrainConfig,
    check_keys,
    make_optimizer,
    register,
    value,
)

log = logging.getLogger(__name__)
APP = "bundle_adjustment"
CONF = Path(__file__).resolve().parents[2] / "conf"
METRIC_KEYS = ("rot_err_deg", "rot_err_deg_baseline", "center_err", "center_err_baseline",
               "rmse_px", "rmse_px_baseline")
OUTLIER_WEIGHT = 1e-3  # the oracle's weight of an outlier (0 could leave a point unobserved)


@dataclass
class DataConfig:
    """Synthetic scenes (``apps.bundle_adjustment.data.SceneSpec`` documents the generator's
    fields).

    Fields:
        num_train, num_val: training and held-out scenes (seeds differ, same generator).
    """

    num_train: int = 24
    num_val: int = 12
    layouts: list[str] = field(default_factory=lambda: list(SceneSpec.layouts))
    num_cameras: int = SceneSpec.num_cameras
    num_points: int = SceneSpec.num_points
    track: list[int] = field(default_factory=lambda: list(SceneSpec.track))
    distance: float = SceneSpec.distance
    volume: float = SceneSpec.volume
    focal: float = SceneSpec.focal
    image: list[float] = field(default_factory=lambda: list(SceneSpec.image))
    pixel_noise: float = SceneSpec.pixel_noise
    outlier_ratio: float = SceneSpec.outlier_ratio
    outliers: str = SceneSpec.outliers
    outlier_px: list[float] = field(default_factory=lambda: list(SceneSpec.outlier_px))
    alias_jitter: float = SceneSpec.alias_jitter
    rate_power: float = SceneSpec.rate_power
    rotation_noise: float = SceneSpec.rotation_noise
    translation_noise: float = SceneSpec.translation_noise
    point_noise: float = SceneSpec.point_noise
    focal_noise: float = SceneSpec.focal_noise
    desc_separation: float = SceneSpec.desc_separation
    ratio_separation: float = SceneSpec.ratio_separation


class WeightMode(str, Enum):
    """How a learned weight enters the cost (``apps.bundle_adjustment.problem.BAObjective.inputs``):
    scaling the robust loss's width per observation, or the residual."""

    scale = "scale"
    residual = "residual"


@dataclass
class ModelConfig:
    """The observation-weight network (``apps.bundle_adjustment.model.ObservationWeightNet``).

    Fields:
        hidden, layers: MLP width and depth.
        loss: the robust loss of the learned layer.
        init_scale: initial robust-loss scale (pixels).
        init_bias: initial output bias (initial weights ``sigmoid(init_bias)``).
        learn_scale: train the robust-loss scale too.
        weight_mode: ``scale`` (the weight narrows the robust loss of a suspicious observation)
            or ``residual`` (the weight scales the residual).
    """

    hidden: int = 32
    layers: int = 2
    loss: RobustLossKind = RobustLossKind.cauchy
    init_scale: float = 2.0
    init_bias: float = 2.0
    learn_scale: bool = True
    weight_mode: WeightMode = WeightMode.scale


@dataclass
class BaselineConfig:
    """The unlearned baselines: uniform weights, the robust-loss scale that gives the lowest
    mean rotation error on the training scenes among ``scales``.

    Fields:
        loss: the baseline's robust loss (the ``*_baseline`` metrics).
        also: more loss kinds, each tuned the same way (``*_baseline_<kind>`` metrics).
        scales: robust-loss scales tried (pixels).
        tune_scenes: how many training scenes to tune on (null: all).
        oracle: also score the layer with the true outliers weighted ~0 and no robust loss.
    """

    loss: RobustLossKind = RobustLossKind.huber
    also: list[RobustLossKind] = field(default_factory=lambda: [RobustLossKind.cauchy])
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0])
    tune_scenes: int | None = 12
    oracle: bool = True


@dataclass
class BundleAdjustmentConfig(TrainConfig):
    """``conf/bundle_adjustment.yaml``'s schema: the common training fields plus

    Fields:
        data, model, baseline: see their classes.
        gauge_weight: weight of the weak priors on the first two cameras' poses (gauge).
        center_weight: the outer loss is ``rot_err_deg + center_weight * center_err``.
        aim: distance of the aim points of the similarity alignment (null: ``data.distance``).
        viz: draw ``reconstruction.png`` (a held-out scene's solution) at the end.
        viz_scene: which held-out scene to draw.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    gauge_weight: float = 1.0
    center_weight: float = 5.0
    aim: float | None = None
    viz: bool = True
    viz_scene: int = 0


register(APP, BundleAdjustmentConfig)


def scene_spec(cfg: DataConfig | DictConfig) -> SceneSpec:
    """The generator's settings from the ``data`` config."""
    return common.spec_from_config(SceneSpec, cfg)


def schur_options(solver: SolverConfig | DictConfig) -> dict[str, str]:
    """How the Schur solver factors the reduced camera system, from the ``solver`` group:
    ``auto``/``dense``/``sparse``, or a sparse backend (``cholmod``, ``cholespy``, ``scipy``)."""
    name = str(value(solver.name))
    if name in ("auto", "dense", "sparse"):
        return {"reduced": name, "backend": "auto"}
    if name in ("cholmod", "cholespy", "scipy"):
        return {"reduced": "sparse", "backend": name}
    raise ValueError(f"solver={name}: bundle adjustment always uses the Schur complement; its "
                     "reduced system takes auto, dense, sparse, cholmod, cholespy or scipy")


def check_config(cfg: Any) -> None:
    """Raise ValueError on unknown keys (``+key=value``) and on values the schema's types cannot
    rule out."""
    if isinstance(cfg, DictConfig):
        check_keys(cfg, BundleAdjustmentConfig)
    checks = [
        (cfg.epochs >= 0, f"epochs must be >= 0, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.data.num_train >= 1, f"data.num_train must be >= 1, got {cfg.data.num_train}"),
        (cfg.data.num_val >= 1, f"data.num_val must be >= 1, got {cfg.data.num_val}"),
        (len(cfg.baseline.scales) >= 1 and min(cfg.baseline.scales) > 0,
         f"baseline.scales must be positive, got {list(cfg.baseline.scales)}"),
        (cfg.gauge_weight > 0, f"gauge_weight must be > 0, got {cfg.gauge_weight}"),
        (cfg.center_weight >= 0, f"center_weight must be >= 0, got {cfg.center_weight}"),
        (cfg.aim is None or cfg.aim > 0, f"aim must be > 0 or null, got {cfg.aim}"),
        (0 <= cfg.viz_scene < cfg.data.num_val,
         f"viz_scene must be in [0, data.num_val), got {cfg.viz_scene}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    scene_spec(cfg.data)  # the generator's own checks
    schur_options(cfg.solver)


def weight_mode(cfg: Any) -> str:
    return str(value(cfg.model.weight_mode))


def aim_of(cfg: Any) -> float:
    return float(cfg.aim) if cfg.aim is not None else float(cfg.data.distance)


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Sums over scenes (combined across ranks by summing), turned into metrics by
    :meth:`metrics`; per scene: means over its cameras / inlier observations."""

    scenes: float = 0.0
    rot: float = 0.0
    center: float = 0.0
    rmse: float = 0.0
    loss: float = 0.0
    time_s: float = 0.0
    iterations: float = 0.0

    def add(self, values: dict[str, torch.Tensor], scene: Scene, time_s: float, iterations: int,
            aim: float, center_weight: float) -> None:
        e = pose_errors(values, scene, aim)
        rot, center = float(e.rot_deg[0].mean()), float(e.center[0].mean())
        self.scenes += 1
        self.rot += rot
        self.center += center
        self.rmse += float(inlier_rmse(values, scene)[0])
        self.loss += rot + center_weight * center
        self.time_s += time_s
        self.iterations += iterations

    def reduced(self, d: common.Dist) -> Scores:
        names = [f.name for f in fields(self)]
        return Scores(*common.all_reduce_sum([getattr(self, n) for n in names], d))

    def metrics(self, suffix: str = "") -> dict[str, float]:
        n = max(self.scenes, 1.0)
        return {f"rot_err_deg{suffix}": self.rot / n, f"center_err{suffix}": self.center / n,
                f"rmse_px{suffix}": self.rmse / n, f"loss{suffix}": self.loss / n,
                f"solve_time_s{suffix}": self.time_s / n,
                f"iterations{suffix}": self.iterations / n}


@dataclass
class Prepared:
    """Scenes with their objectives and layers (built once, reused every epoch)."""

    scenes: list[Scene]
    problems: list[BAObjective]
    layers: list[torch.nn.Module]


def prepare(scenes: Sequence[Scene], loss: str | None, cfg: Any, device: torch.device
            ) -> Prepared:
    lm = make_optimizer(cfg.optimizer, cfg.solver)
    o = cfg.optimizer
    moved, problems, layers = [], [], []
    for s in scenes:
        s = _to(s, device)
        p = ba_objective(s.problem, loss, 1.0, cfg.gauge_weight, **schur_options(cfg.solver))
        moved.append(s)
        problems.append(p)
        layers.append(p.layer(lm, str(value(o.backward)), str(value(o.implicit_hessian)),
                              o.backward_iters, o.cg_tol, o.cg_iters))
    return Prepared(moved, problems, layers)


def _to(s: Scene, device: torch.device) -> Scene:
    if s.features.device == device:
        return s
    return Scene(s.problem.to(device), s.true_cameras.to(device), s.true_points.to(device),
                 s.is_outlier.to(device), s.features.to(device), s.layout)


@torch.no_grad()
def evaluate(model: ObservationWeightNet, prepared: Prepared, cfg: Any
             ) -> tuple[Scores, list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Scores of the learned layer; also each scene's weights and solution."""
    scores, weights, solutions = Scores(), [], []
    for s, p, layer in zip(prepared.scenes, prepared.problems, prepared.layers):
        w, scale = model(s.features)
        start = time.perf_counter()
        sol, info = layer(p.inputs(w, scale, mode=weight_mode(cfg)))
        scores.add(sol, s, time.perf_counter() - start, int(info.iterations[0]), aim_of(cfg),
                   cfg.center_weight)
        weights.append(w)
        solutions.append(sol)
    return scores, weights, solutions


@torch.no_grad()
def evaluate_fixed(prepared: Prepared, scale: float, cfg: Any,
                   weight: Callable[[Scene], torch.Tensor] | None = None
                   ) -> tuple[Scores, list[dict[str, torch.Tensor]]]:
    """Scores of the unlearned layer: uniform weights (or ``weight(scene)``), a fixed scale."""
    scores, solutions = Scores(), []
    for s, p, layer in zip(prepared.scenes, prepared.problems, prepared.layers):
        w = weight(s) if weight is not None else s.features.new_ones(p.num_observations)
        start = time.perf_counter()
        sol, info = layer(p.inputs(w, scale))
        scores.add(sol, s, time.perf_counter() - start, int(info.iterations[0]), aim_of(cfg),
                   cfg.center_weight)
        solutions.append(sol)
    return scores, solutions


def oracle_weight(scene: Scene) -> torch.Tensor:
    """``(O,)`` 1 for inliers, :data:`OUTLIER_WEIGHT` for outliers."""
    one = scene.features.new_ones(scene.is_outlier.shape[0])
    return torch.where(scene.is_outlier, OUTLIER_WEIGHT * one, one)


# ------------------------------------------------------------------------------------------
# baseline
# ------------------------------------------------------------------------------------------


def tune_scale(scenes: Sequence[Scene], kind: str, cfg: Any, device: torch.device,
               d: common.Dist) -> dict[str, Any]:
    """Grid search of the robust-loss scale (uniform weights) on ``scenes``, all scales solved
    as one batch per scene; returns the best scale and the mean rotation error of every one."""
    lm = make_optimizer(cfg.optimizer, cfg.solver)
    scales = torch.tensor(list(cfg.baseline.scales), dtype=torch.float64, device=device)
    sums = torch.zeros(len(scales), dtype=torch.float64)
    for s in common.shard(list(scenes), d):
        s = _to(s, device)
        p = ba_objective(s.problem, kind, 1.0, cfg.gauge_weight, **schur_options(cfg.solver))
        inputs = p.inputs(s.features.new_ones(p.num_observations), scales, batch=len(scales))
        names = {v.name for v in p.objective.variables}
        objective = p.objective.with_inputs({k: v for k, v in inputs.items() if k not in names})
        with torch.no_grad():
            solution = p.optimizer(lm).solve(objective, {k: inputs[k] for k in names})
        sums += pose_errors(solution.values, s, aim_of(cfg)).rot_deg.mean(-1).cpu()
    grid = [t / len(scenes) for t in common.all_reduce_sum(sums.tolist(), d)]
    k = min(range(len(grid)), key=grid.__getitem__)
    return {"loss": kind, "scale": float(scales[k]), "train_rot_err_deg": grid[k], "grid": grid,
            "scales": scales.tolist()}


def run_baselines(train: Sequence[Scene], val: Sequence[Scene], cfg: Any, device: torch.device,
                  d: common.Dist) -> dict[str, Any]:
    """Tune and score the baselines (module docstring) on this rank's ``val`` scenes."""
    t = time.perf_counter()
    tune = list(train[: cfg.baseline.tune_scenes or len(train)])
    kinds = [str(value(cfg.baseline.loss))]
    kinds += [str(value(k)) for k in cfg.baseline.also if str(value(k)) not in kinds]
    out: dict[str, Any] = {"tuned": {}}
    for n, kind in enumerate(kinds):
        best = tune_scale(tune, kind, cfg, device, d)
        scores, _ = evaluate_fixed(prepare(val, kind, cfg, device), best["scale"], cfg)
        suffix = "_baseline" if n == 0 else f"_baseline_{kind}"
        out.update(scores.reduced(d).metrics(suffix))
        out["tuned"][kind] = best
        log.info("baseline %s: scale %g (train rot %.4f deg), val rot %.4f deg, centre %.4f",
                 kind, best["scale"], best["train_rot_err_deg"], out[f"rot_err_deg{suffix}"],
                 out[f"center_err{suffix}"])
    if cfg.baseline.oracle:
        scores, _ = evaluate_fixed(prepare(val, None, cfg, device), 1.0, cfg, oracle_weight)
        out.update(scores.reduced(d).metrics("_oracle"))
    out["time_s"] = time.perf_counter() - t
    return out


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


def train_step(model: torch.nn.Module, prepared: Prepared, batch: Sequence[int], batch_size: int,
               world: int, opt: torch.optim.Optimizer, cfg: Any) -> float:
    """One optimizer step on this rank's scenes ``batch`` (of a global batch of ``batch_size``
    scenes); returns the sum of their losses."""
    net = common.unwrap_model(model)
    feats = [prepared.scenes[k].features for k in batch]
    features = torch.cat(feats) if feats else net.mean.new_zeros(0, net.mean.shape[0])
    w_all, scale = model(features)  # one forward: DistributedDataParallel's contract
    total = w_all.sum() * 0 + scale * 0  # keeps every parameter in the graph on an empty rank
    losses = 0.0
    for w, k in zip(torch.split(w_all, [f.shape[0] for f in feats]), batch):
        s, p, layer = prepared.scenes[k], prepared.problems[k], prepared.layers[k]
        sol, _ = layer(p.inputs(w, scale, mode=weight_mode(cfg)))
        e = pose_errors(sol, s, aim_of(cfg))
        loss = e.rot_deg.mean() + cfg.center_weight * e.center.mean()
        total = total + loss * world / batch_size
        losses += float(loss.detach())
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return losses


def run(cfg: Any) -> dict[str, Any]:
    """Train and evaluate as configured; returns the ``metrics.json`` object (rank 0) or the
    validation metrics (other ranks)."""
    check_config(cfg)
    common.set_threads(cfg.threads)
    device = common.select_device(cfg.device)
    d = common.setup_distributed(device)
    device = common.rank_device(device, d)
    finished = False
    try:
        result = _run(cfg, device, d)
        finished = True
        return result
    finally:
        common.teardown_distributed(d, finished)


def _datasets(cfg: Any, cache: Path) -> tuple[SceneSpec, list[Scene], list[Scene]]:
    spec = scene_spec(cfg.data)
    base = 1_000_003 * cfg.seed
    train = make_dataset(spec, [base + k for k in range(cfg.data.num_train)], cache)
    val = make_dataset(spec, [base + 500_000 + k for k in range(cfg.data.num_val)], cache)
    return spec, train, val


def _run(cfg: Any, device: torch.device, d: common.Dist) -> dict[str, Any]:
    out = common.output_dir(cfg.out_dir)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    spec, train_scenes, val_scenes = _datasets(cfg, cache)
    loss_kind = str(value(cfg.model.loss))
    mine = common.shard(list(range(len(val_scenes))), d)
    train = prepare(train_scenes, loss_kind, cfg, device)
    val = prepare([val_scenes[k] for k in mine], loss_kind, cfg, device)

    torch.manual_seed(cfg.seed)
    net = ObservationWeightNet(len(FEATURES), cfg.model.hidden, cfg.model.layers,
                               cfg.model.init_scale, cfg.model.init_bias).double().to(device)
    net.log_scale.requires_grad_(cfg.model.learn_scale)
    net.fit_normalization(torch.cat([s.features for s in train.scenes]))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr)
    state = common.load_checkpoint(out / common.CHECKPOINT) if cfg.resume else None
    if cfg.resume and state is None:
        log.warning("resume=true but %s has no checkpoint: starting afresh", out)
    history: list[dict[str, float]] = []
    start_epoch, train_time, baseline = 0, 0.0, None
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        train_time, baseline = float(state["train_time_s"]), state["baseline"]
        common.set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d", out / common.CHECKPOINT, start_epoch)
    model = common.wrap_model(net, d)
    if baseline is None:
        baseline = run_baselines(train_scenes, [val_scenes[k] for k in mine], cfg, device, d)

    bar = tqdm(range(start_epoch, cfg.epochs), initial=start_epoch, total=cfg.epochs,
               desc=APP, disable=not d.is_main, dynamic_ncols=True)
    for epoch in bar:
        t = time.perf_counter()
        order = torch.randperm(len(train_scenes),
                               generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        loss_sum = 0.0
        for b in range(0, len(order), cfg.batch_size):
            batch = order[b : b + cfg.batch_size].tolist()
            loss_sum += train_step(model, train, batch[d.rank :: d.world_size], len(batch),
                                   d.world_size, opt, cfg)
        (loss_sum,) = common.all_reduce_sum([loss_sum], d)
        scores, _, _ = evaluate(net, val, cfg)
        val_metrics = scores.reduced(d).metrics()
        epoch_time = time.perf_counter() - t
        train_time += epoch_time
        row = {"epoch": epoch + 1, "train_loss": loss_sum / len(train_scenes),
               **{f"val_{k}": v for k, v in val_metrics.items()},
               "scale": float(net.scale.detach()), "epoch_time_s": epoch_time}
        history.append(row)
        if d.is_main:
            common.save_checkpoint(out / common.CHECKPOINT, {
                "model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                "history": history, "train_time_s": train_time, "baseline": baseline,
                "rng": common.rng_state(), "config": OmegaConf.to_container(
                    OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg,
                    resolve=True, enum_to_str=True)})
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", rot=f"{row['val_rot_err_deg']:.4f}")
        log.info("epoch %d/%d  train_loss %.4f  val rot %.4f deg (baseline %.4f)  centre %.4f "
                 "(baseline %.4f)  scale %.2f  %.1f s", epoch + 1, cfg.epochs, row["train_loss"],
                 row["val_rot_err_deg"], baseline["rot_err_deg_baseline"],
                 row["val_center_err"], baseline["center_err_baseline"], row["scale"],
                 epoch_time)
    return _finish(cfg, out, d, net, val, val_scenes, mine, spec, baseline, history, train_time)


def _finish(cfg: Any, out: Path, d: common.Dist, net: ObservationWeightNet, val: Prepared,
            val_scenes: list[Scene], mine: list[int], spec: SceneSpec, baseline: dict[str, Any],
            history: list[dict[str, float]], train_time: float) -> dict[str, Any]:
    scores, weights, solutions = evaluate(net, val, cfg)
    metrics = scores.reduced(d).metrics()
    val_metrics = {k: metrics[k] for k in ("rot_err_deg", "center_err", "rmse_px")}
    val_metrics.update({k: v for k, v in baseline.items() if k not in ("tuned", "time_s")})
    val_metrics.update({k: metrics[k] for k in ("loss", "solve_time_s", "iterations")})
    val_metrics["rot_err_ratio"] = val_metrics["rot_err_deg"] / max(
        val_metrics["rot_err_deg_baseline"], 1e-12)
    aucs = feature_auc(val_scenes, spec)
    val_metrics["feature_auc"] = aucs["llr"]
    val_metrics.update({f"feature_auc_{k}": v for k, v in aucs.items() if k != "llr"})
    if not d.enabled:  # the weights of every scene are on this rank
        inlier = ~torch.cat([s.is_outlier for s in val.scenes]).cpu()
        val_metrics["weight_auc"] = roc_auc(torch.cat(weights).cpu(), inlier)
    val_metrics["scale"] = float(net.scale.detach())
    if not d.is_main:
        return val_metrics
    doc = common.write_metrics(
        out, APP, cfg.epochs, train_time, val_metrics, history,
        baseline=baseline["tuned"], baseline_time_s=baseline["time_s"],
        backward=str(value(cfg.optimizer.backward)),
        implicit_hessian=str(value(cfg.optimizer.implicit_hessian)),
    )
    if history:
        common.plot_curves(
            out / "curves.png", history,
            [["train_loss", "val_loss"], ["val_rot_err_deg"], ["val_center_err"], ["scale"]],
            baselines={"val_rot_err_deg": val_metrics["rot_err_deg_baseline"],
                       "val_center_err": val_metrics["center_err_baseline"]},
            title=f"bundle adjustment: learned observation weights ({cfg.data.num_train} scenes)")
    if cfg.viz and cfg.viz_scene in mine:
        _draw(cfg, out / "reconstruction.png", val, mine.index(cfg.viz_scene), weights, solutions,
              baseline)
    log.info("val: %s", {k: round(v, 4) for k, v in val_metrics.items()})
    return doc


def _draw(cfg: Any, path: Path, val: Prepared, k: int, weights: list[torch.Tensor],
          solutions: list[dict[str, torch.Tensor]], baseline: dict[str, Any]) -> None:
    """``reconstruction.png``: this rank's held-out scene ``k`` solved by the learned layer and
    the baseline."""
    from apps.bundle_adjustment import viz

    s = val.scenes[k]
    kind = str(value(cfg.baseline.loss))
    best = baseline["tuned"][kind]
    base = prepare([s], kind, cfg, s.features.device)
    _, base_sol = evaluate_fixed(base, best["scale"], cfg)
    aim = aim_of(cfg)
    learned_err = pose_errors(solutions[k], s, aim)
    base_err = pose_errors(base_sol[0], s, aim)
    title = (f"held-out {s.layout} scene: rotation error {float(learned_err.rot_deg.mean()):.3f} "
             f"deg learned, {float(base_err.rot_deg.mean()):.3f} deg baseline ({kind}, scale "
             f"{best['scale']:g})")
    try:
        viz.draw_solution(path, s, solutions[k], base_sol[0], aim, title=title,
                          weight=weights[k])
    except Exception:  # a picture never fails a run
        log.exception("could not draw %s", path)


@hydra.main(config_path=str(CONF), config_name=APP, version_base=None)
def main(cfg: DictConfig) -> None:
    doc = run(cfg)
    val = doc.get("val", doc)
    if not math.isfinite(val.get("rot_err_deg", float("nan"))):
        raise RuntimeError(f"non-finite validation rotation error: {val}")


__all__ = ["BaselineConfig", "BundleAdjustmentConfig", "DataConfig", "ModelConfig",
           "OptimizerConfig", "SolverConfig", "main", "run"]
