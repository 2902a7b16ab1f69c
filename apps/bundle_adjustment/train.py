"""Train the observation-weight network end to end through a Schur-complement LM.

``python -m apps.bundle_adjustment [overrides]`` (Hydra, ``conf/bundle_adjustment.yaml``;
``preset=smoke`` for a run of seconds); the loop, checkpoints and metrics files are
``apps.harness.fit``'s. Per step, for each scene of the batch: the network maps each
observation's matcher features to a weight ``w_o`` and gives a robust-loss scale; the layer solves
the weighted, robust bundle adjustment (``apps.bundle_adjustment.problem``) from the scene's
initial values with Levenberg-Marquardt and the Schur solver (points eliminated); the loss is
``rotation error (deg) + center_weight * centre error`` of the cameras after a similarity
alignment to the ground truth, back-propagated through the solve (``optimizer.backward``), plus
``model.supervised`` times the binary cross-entropy of the weights against the training scenes'
outlier labels (it gives the weights a direct signal from the first step; the end-to-end term,
whose per-observation gradients are small and noisy, alone left them near their initial value).

Evaluation on held-out scenes: camera rotation error (degrees), camera centre error (scene units)
and the inlier reprojection RMSE (pixels) of the learned layer; the ROC AUC of the matcher features
alone (their log-likelihood ratio) and of the learned weights. The baseline is the same LM with
uniform weights and a Huber loss whose scale is the best of ``baseline.scales`` on the training
scenes (grid search, lowest rotation error); ``baseline.also`` adds the same for other loss kinds
(``*_baseline_<kind>``, e.g. the learned model's own kind, so that the gain from the loss kind and
the gain from learning are told apart), and ``baseline.oracle`` the unattainable reference that
knows which observations are outliers (``*_oracle``). The strongest classical baselines:
``*_best_fixed`` (the best (kind, scale) over every robust-loss family of ``core`` on the tuning
scenes, ``baseline.best_fixed``) and ``*_gnc`` (the batched GNC-GM of ``apps.gnc``, its scale
tuned the same way, ``baseline.gnc``).

Outputs in the run folder: ``metrics.json``, ``metrics.csv``, ``checkpoint.pt``, ``curves.png``
and ``reconstruction.png`` (Open3D; ``show=true`` also opens it in a window).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import core
from apps import common
from apps.bundle_adjustment import baseline as ba_baseline
from apps.bundle_adjustment import problem
from apps.bundle_adjustment.baseline import Prepared, Scores, aim_of
from apps.bundle_adjustment.data import Scene, SceneSpec, feature_auc, make_dataset
from apps.bundle_adjustment.model import ObservationWeightNet
from apps.bundle_adjustment.problem import pose_errors
from apps.config import RobustLossKind, TrainConfig, enum_of, register, spec_from_config, value
from apps.gnc import GncConfig
from apps.gnc import check_config as check_gnc
from apps.harness import Run, Task, fit, main_for, reduce_scores

APP = "bundle_adjustment"
Loss = RobustLossKind


#: how a learned weight enters the cost (``apps.bundle_adjustment.problem.BAObjective.inputs``)
WeightMode = enum_of("WeightMode", problem.WeightMode)


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
        supervised: weight of the auxiliary term ``supervised * BCE(w, inlier)`` of the
            training loss, the binary cross-entropy of the weights against the training scenes'
            inlier labels (deg per nat; 0: end to end only). It shapes the weights from the
            first step; the end-to-end term then sets how they enter the solve.
    """

    hidden: int = 32
    layers: int = 2
    loss: Loss = Loss.geman_mcclure  # type: ignore[attr-defined,valid-type]
    init_scale: float = 6.0
    init_bias: float = 0.0
    learn_scale: bool = True
    weight_mode: WeightMode = WeightMode.scale  # type: ignore[valid-type,attr-defined]
    supervised: float = 0.3


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
        best_fixed: the families of the best fixed loss (``*_best_fixed`` metrics): the best
            (kind, scale) of ``best_fixed`` x ``scales`` on the tuning scenes (empty: none).
        gnc: the batched Ariadne GNC-GM (``*_gnc`` metrics; ``gnc.gtsam`` is not used here:
            GTSAM's GNC runs on pose graphs only); scales in pixels.
    """

    loss: Loss = Loss.huber  # type: ignore[attr-defined,valid-type]
    also: list[Loss] = field(default_factory=lambda: [Loss.cauchy])  # type: ignore
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0])
    tune_scenes: int | None = 12
    oracle: bool = True
    best_fixed: list[Loss] = field(  # type: ignore[valid-type]
        default_factory=lambda: [Loss.huber, Loss.cauchy, Loss.welsch,  # type: ignore
                                 Loss.geman_mcclure])  # type: ignore
    gnc: GncConfig = field(default_factory=lambda: GncConfig(gtsam=[], tune_items=12))


@dataclass
class BundleAdjustmentConfig(TrainConfig):
    """``conf/bundle_adjustment.yaml``'s schema: the common training fields plus

    Fields:
        data: the scene generator's settings (``apps.bundle_adjustment.data.SceneSpec``).
        model, baseline: see their classes.
        gauge_weight: weight of the weak priors on the first two cameras' poses (gauge).
        center_weight: the outer loss is ``rot_err_deg + center_weight * center_err``.
        aim: distance of the aim points of the similarity alignment (null: ``data.distance``).
        viz_scene: which held-out scene to draw.
        ragged: solve a batch's scenes (training and evaluation) in one
            ``OptimizationLayer.ragged`` call (``core.ragged``; a Schur solver made per merged
            combination) instead of one layer call per scene; same metrics. Off by default:
            measured slower for the default run (train 90.7 s vs 39.9 s, 2026-12-02, 2-core
            machine under load 2-4): its batches are 4 small scenes, a new combination each
            (merge, Schur maps and analysis paid per batch), all carried to the slowest one's
            iteration count, with the merged reduced camera system factored as one.
        workers: processes beside this one (spawned once, kept until exit) that share the
            baselines' independent solves (tuning and held-out, ``apps.common.map_calls``):
            the same results, on more cores (0: all in this process; none under torchrun or
            off the CPU).
    """

    epochs: int = 8
    num_train: int = 24
    num_val: int = 12
    lr: float = 0.005
    data: SceneSpec = field(default_factory=SceneSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    gauge_weight: float = 1.0
    center_weight: float = 5.0
    aim: float | None = None
    viz_scene: int = 0
    ragged: bool = False
    workers: int = 1


register(APP, BundleAdjustmentConfig)


def check(cfg: Any) -> None:
    """The app's own config checks (and the generator's)."""
    checks = [
        (len(cfg.baseline.scales) >= 1 and min(cfg.baseline.scales) > 0,
         f"baseline.scales must be positive, got {list(cfg.baseline.scales)}"),
        (cfg.gauge_weight > 0, f"gauge_weight must be > 0, got {cfg.gauge_weight}"),
        (cfg.center_weight >= 0, f"center_weight must be >= 0, got {cfg.center_weight}"),
        (cfg.model.supervised >= 0,
         f"model.supervised must be >= 0, got {cfg.model.supervised}"),
        (cfg.aim is None or cfg.aim > 0, f"aim must be > 0 or null, got {cfg.aim}"),
        (0 <= cfg.viz_scene < cfg.num_val,
         f"viz_scene must be in [0, num_val), got {cfg.viz_scene}"),
        (cfg.workers >= 0, f"workers must be >= 0, got {cfg.workers}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_gnc(cfg.baseline.gnc)
    spec_from_config(SceneSpec, cfg.data)


def dataset(cfg: Any, seeds: Sequence[int], cache: Path | None, held_out: bool
            ) -> list[Scene]:
    """One sample per seed (held-out ones from the same generator)."""
    return make_dataset(spec_from_config(SceneSpec, cfg.data), seeds, cache)


def prepare(cfg: Any, scenes: Sequence[Scene], device: torch.device) -> Prepared:
    """The learned layer's scenes; also starts the baselines' worker processes
    (``cfg.workers``), so that their start-up overlaps this process's work until then."""
    common.worker_pool(cfg.workers, device)
    return ba_baseline.prepare(scenes, str(value(cfg.model.loss)), cfg, device)


def model(cfg: Any, train: Prepared) -> ObservationWeightNet:
    features = torch.cat([s.features for s in train.scenes])  # (O, len(FEATURES))
    return ObservationWeightNet.from_config(cfg.model, features)  # type: ignore[return-value]


def loss(cfg: Any, net: torch.nn.Module, prepared: Prepared, batch: Sequence[int]
         ) -> list[torch.Tensor]:
    """``rot_err_deg + center_weight * center_err`` of each scene of ``batch`` (plus
    ``model.supervised`` times the weights' binary cross-entropy against the inlier labels):
    one layer call per scene, or (``cfg.ragged``) all of them in one ragged call
    (``core.ragged``)."""
    weights, scale = common.weights_per_item(net, [prepared.scenes[k].features for k in batch])
    if not batch:
        return []
    sols = common.solve_items(lambda items, ws: solve_scenes(cfg, prepared, items, ws, scale),
                              batch, weights, cfg.ragged)
    losses = []
    for w, k, sol in zip(weights, batch, sols):
        s = prepared.scenes[k]
        e = pose_errors(sol, s, aim_of(cfg))
        total = e.rot_deg.mean() + cfg.center_weight * e.center.mean()
        if cfg.model.supervised:
            inlier = (~s.is_outlier).to(w.dtype)
            total = total + cfg.model.supervised * torch.nn.functional.binary_cross_entropy(
                w.clamp(1e-12, 1 - 1e-12), inlier)
        losses.append(total)
    return losses


def solve_scenes(cfg: Any, prepared: Prepared, items: list[int],
                 weights: Sequence[torch.Tensor], scale: torch.Tensor
                 ) -> tuple[list[dict[str, torch.Tensor]], core.Info]:
    """Scenes ``items`` with observation weights ``weights[i] (O_k,)`` and the robust-loss
    ``scale`` solved by one ``OptimizationLayer.ragged`` call (a ``schur`` solver is made for
    each merged combination), or a single scene by its own layer; each scene's solution and
    the per-scene info."""
    mode = str(value(cfg.model.weight_mode))
    problems = [prepared.problems[k] for k in items]
    inputs = [p.inputs(w, scale, mode=mode) for p, w in zip(problems, weights)]
    if len(items) == 1:
        sol, info = prepared.layers[items[0]](inputs[0])
        return [sol], info
    make = problem.ragged_solver(str(value(cfg.solver.name)), value(cfg.solver.reduced),
                                 value(cfg.solver.backend))
    layer = prepared.layers[items[0]]
    return layer.ragged([p.objective for p in problems], inputs, solver=make)


@torch.no_grad()
def evaluate(cfg: Any, net: torch.nn.Module, prepared: Prepared
             ) -> tuple[Scores, list[tuple[torch.Tensor, dict[str, torch.Tensor]]]]:
    """Scores of the learned layer, one layer call per scene (``cfg.ragged``: ``batch_size``
    scenes per ragged call, a scene's time its share); outputs: each scene's weights and
    solution."""
    scores, outputs = Scores(), []
    size = max(1, int(cfg.batch_size)) if cfg.ragged else 1
    for first in range(0, len(prepared.scenes), size):
        items = list(range(first, min(first + size, len(prepared.scenes))))
        weights, scale = common.weights_per_item(net, [prepared.scenes[k].features
                                                       for k in items])
        start = time.perf_counter()
        sols, info = solve_scenes(cfg, prepared, items, weights, scale)
        share = (time.perf_counter() - start) / len(items)
        for i, (k, w, sol) in enumerate(zip(items, weights, sols)):
            scores.add(sol, prepared.scenes[k], share, int(info.iterations[i]), aim_of(cfg),
                       cfg.center_weight)
            outputs.append((w, sol))
    return scores, outputs


def baseline(run: Run) -> dict[str, Any]:
    val = [run.val_samples[k] for k in run.mine]
    return ba_baseline.run_baselines(run.train_samples, val, run.cfg, run.device, run.dist,
                                     lambda s: reduce_scores(s, run.dist),
                                     common.worker_pool(run.cfg.workers, run.device))


def report(run: Run, metrics: dict[str, float], outputs: list[Any], net: torch.nn.Module
           ) -> tuple[dict[str, float], dict[str, Any]]:
    ref = run.reference
    val = {k: metrics[k] for k in ("rot_err_deg", "center_err", "rmse_px")}
    val.update({k: v for k, v in ref.items() if isinstance(v, float) and k != "time_s"})
    val.update({k: metrics[k] for k in ("loss", "solve_time_s", "iterations")})
    val["rot_err_ratio"] = val["rot_err_deg"] / max(val["rot_err_deg_baseline"], 1e-12)
    aucs = feature_auc(run.val_samples, spec_from_config(SceneSpec, run.cfg.data))
    val["feature_auc"] = aucs["llr"]
    val.update({f"feature_auc_{k}": v for k, v in aucs.items() if k != "llr"})
    if not run.dist.enabled:  # the weights of every scene are on this rank
        inlier = ~torch.cat([s.is_outlier for s in run.val.scenes])
        val["weight_auc"] = common.roc_auc(torch.cat([w for w, _ in outputs]), inlier)
    val["scale"] = float(net.scale.detach())
    return val, {"baseline": ref["tuned"], "strongest": ref["strongest"]}


def pictures(run: Run, outputs: list[Any], net: torch.nn.Module) -> None:
    """``reconstruction.png``: held-out scene ``viz_scene`` solved by the learned layer and the
    strongest baseline (``baseline.strongest_solution``), when this rank holds it."""
    from apps.bundle_adjustment import viz

    cfg = run.cfg
    if cfg.viz_scene not in run.mine:
        return
    k = run.mine.index(cfg.viz_scene)
    s, (weight, solution) = run.val.scenes[k], outputs[k]
    base, label = ba_baseline.strongest_solution(run, s)
    aim = aim_of(cfg)
    learned, base_err = pose_errors(solution, s, aim), pose_errors(base, s, aim)
    title = (f"held-out {s.layout} scene: rotation error {float(learned.rot_deg.mean()):.3f} "
             f"deg learned, {float(base_err.rot_deg.mean()):.3f} deg {label}")
    viz.draw_solution(run.out / "reconstruction.png", s, solution, base, aim, title=title,
                      weight=weight, baseline_name=f"strongest baseline: {label}",
                      show=cfg.show)


TASK = Task(
    name=APP, metric="rot_err_deg", title="bundle adjustment: learned observation weights",
    schema=BundleAdjustmentConfig, dataset=dataset, prepare=prepare, model=model, loss=loss,
    evaluate=evaluate, baseline=baseline, report=report, pictures=pictures, check=check,
    curves=(("train_loss", "val_loss"), ("val_rot_err_deg",), ("val_center_err",), ("scale",)),
    curve_lines=ba_baseline.curve_lines,
    extras=lambda net: {"scale": float(net.scale.detach())},
    keys=("rot_err_deg", "rot_err_deg_baseline", "center_err", "center_err_baseline", "rmse_px",
          "rmse_px_baseline", "feature_auc"),
)
main = main_for(TASK)


def run(cfg: Any) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says (``apps.harness.fit``)."""
    return fit(TASK, cfg)
