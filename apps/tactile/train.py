"""Train the tactile measurement network end to end through an SE(2) pushing smoother.

``python -m apps.tactile [overrides]`` (Hydra, ``conf/tactile.yaml``; ``preset=smoke`` for a run
of seconds); the loop, checkpoints and metrics files are ``apps.harness.fit``'s. Per step the
network maps the image pairs ``(t - k, t)`` of every episode of the batch to relative-pose
measurements and weights; ONE batched LM problem (``apps.tactile.problem.Smoother``, B = batch
size) smooths all trajectories; the loss is the SE(2) error of the solution against ground truth,
back-propagated through the solve (``optimizer.backward``).

Held-out metrics: translation RMSE (mm) and rotation RMSE (deg) over all frames. Baselines on the
same held-out episodes (``apps.tactile.baseline``): two-stage (the same network trained alone on
the relative-pose targets, then used in the smoother with a tuned weight; also the harness's
``<metric>_baseline``), motion-only (no tactile measurements) and oracle (noise-free
measurements).

Outputs: ``metrics.json``, ``metrics.csv``, ``checkpoint.pt``, ``curves.png``,
``tactile_topview.png`` and ``tactile_strip.png``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apps.config import TrainConfig, register, spec_from_config
from apps.harness import Run, Task, fit, main_for
from apps.tactile import baseline as tb
from apps.tactile.data import Episode, TactileSpec, make_dataset
from apps.tactile.model import TactileNet
from apps.tactile.problem import Smoother, relative, trajectory_loss, weights_from

APP = "tactile"


@dataclass
class ModelConfig:
    """The measurement network (``apps.tactile.model.TactileNet``).

    Fields:
        channels: convolution channels (doubled after the first layer).
        hidden: width of the fully connected layer.
        warm_start: start from the two-stage baseline's network (trained alone on the
            relative-pose targets, weights times the tuned multiplier) instead of from scratch.
    """

    channels: int = 16
    hidden: int = 64
    warm_start: bool = True


@dataclass
class ProblemConfig:
    """The smoother (``apps.tactile.problem``).

    Fields:
        window: measurement window ``k``: the network sees frames ``t - k`` and ``t``.
        w_push, w_still, w_contact, w_prior: weights of the motion model, of the object staying
            put when untouched, of the contact cost and of the first-pose prior.
        c_square: ``c^2`` of the limit surface (m^2).
        enter: on the step into contact, the push and still models both apply with their weights
            times this.
        loss_trans, loss_rot: translation (m) and rotation (rad) scales of the outer loss.
        eval_batch: episodes per batched solve in evaluation.
    """

    window: int = 2
    w_push: float = 1000.0
    w_still: float = 1000.0
    w_contact: float = 300.0
    w_prior: float = 1e4
    c_square: float = 0.003
    enter: float = 0.3
    loss_trans: float = 0.005
    loss_rot: float = 0.05
    eval_batch: int = 32


@dataclass
class BaselineConfig:
    """The two-stage baseline and the oracle.

    Fields:
        epochs: epochs of training the network alone (Gaussian negative log-likelihood).
        lr: its learning rate; batch: image pairs per step.
        weight_scales: multipliers of its predicted weights tried in the smoother.
        tune_episodes: training episodes the multiplier is tuned on (translation RMSE).
        oracle_weight: weight of the oracle's noise-free measurements (all axes).
    """

    epochs: int = 15
    lr: float = 3e-3
    batch: int = 256
    weight_scales: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    tune_episodes: int = 32
    oracle_weight: float = 1e4


@dataclass
class TactileConfig(TrainConfig):
    """``conf/tactile.yaml``'s schema: the common training fields plus

    Fields:
        data: the simulation's settings (``apps.tactile.data.TactileSpec``).
        model, problem, baseline: see their classes.
        viz_episode: which held-out episode to draw; null: the median error one.
    """

    epochs: int = 20
    batch_size: int = 8
    num_train: int = 160
    num_val: int = 48
    lr: float = 3e-4
    data: TactileSpec = field(default_factory=TactileSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    problem: ProblemConfig = field(default_factory=ProblemConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    viz_episode: int | None = None


register(APP, TactileConfig)


def check(cfg: Any) -> None:
    """The app's own config checks."""
    spec = spec_from_config(TactileSpec, cfg.data)
    if not 1 <= cfg.problem.window < spec.frames:
        raise ValueError(f"problem.window must be in [1, data.frames = {spec.frames}), got "
                         f"{cfg.problem.window}")
    scales = list(cfg.baseline.weight_scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"baseline.weight_scales must be positive, got {scales}")
    if cfg.viz_episode is not None and not 0 <= cfg.viz_episode < cfg.num_val:
        raise ValueError(f"viz_episode must be null or in [0, num_val), got {cfg.viz_episode}")


def dataset(cfg: Any, seeds: Sequence[int], cache: Path | None, held_out: bool
            ) -> list[Episode]:
    """Simulated episodes; held-out ones push in the held-out band of directions."""
    return make_dataset(spec_from_config(TactileSpec, cfg.data), seeds,
                        [held_out] * len(seeds), cache)


def prepare(cfg: Any, samples: Sequence[Episode], device: torch.device) -> tb.Prepared:
    window = cfg.problem.window
    for e in samples:
        if e.frames <= window:
            raise ValueError(f"episode {e.seed} has {e.frames} frames, not more than the "
                             f"measurement window {window}")
    spec = spec_from_config(TactileSpec, cfg.data)
    smoother = Smoother(spec.frames, window, weights_from(cfg), spec.probe_radius, cfg)
    return tb.Prepared(list(samples), smoother, device)


def model(cfg: Any, train: tb.Prepared) -> TactileNet:
    """The network, its output scale fitted to the training targets' spread; with
    ``model.warm_start`` the two-stage network (trained here, seeded) with its weights times the
    tuned multiplier, i.e. the two-stage baseline's smoother as the starting point."""
    net = TactileNet(train.target_scale(), cfg.model.hidden, cfg.model.channels).to(train.device)
    if cfg.model.warm_start:
        net.load_state_dict(tb.two_stage_net(cfg, train).state_dict())
        with torch.no_grad():
            net.features[-1].bias[3:] += math.log(tb.tune(cfg, train)["weight_scale"])
    return net


def loss(cfg: Any, net: torch.nn.Module, prep: tb.Prepared, batch: Sequence[int]
         ) -> list[torch.Tensor]:
    """Per episode of ``batch``: the outer loss of its smoothed trajectory (one batched solve)."""
    b = prep.select(batch)
    k = prep.smoother.window
    z, w = net(b.pairs(k))
    if not batch:
        return []
    B = len(batch)
    est = prep.smoother.solve(b, z.view(B, -1, 4), w.view(B, -1, 3))
    p = cfg.problem
    return list(trajectory_loss(est, b.obj, p.loss_trans, p.loss_rot).unbind(0))


@torch.no_grad()
def evaluate(cfg: Any, net: torch.nn.Module, prep: tb.Prepared
             ) -> tuple[tb.Scores, list[dict[str, torch.Tensor]]]:
    """Scores of the learned smoother on ``prep``; outputs per episode: the estimate ``(T, 4)``,
    the measurements ``z (M, 4)`` and weights ``w (M, 3)``."""
    return tb.evaluate_with(cfg, prep, tb.network_measure(net, prep.smoother.window))


def baseline(run: Run) -> dict[str, Any]:
    return tb.baselines(run)


def report(run: Run, metrics: dict[str, float], outputs: list[Any], net: torch.nn.Module
           ) -> tuple[dict[str, float], dict[str, Any]]:
    ref = run.reference
    val = {"trans_rmse_mm": metrics["trans_rmse_mm"], "rot_rmse_deg": metrics["rot_rmse_deg"]}
    for key in ("trans_rmse_mm_two_stage", "rot_rmse_deg_two_stage", "trans_rmse_mm_motion_only",
                "rot_rmse_deg_motion_only", "trans_rmse_mm_oracle", "rot_rmse_deg_oracle",
                "trans_rmse_mm_baseline", "rot_rmse_deg_baseline"):
        val[key] = ref[key]
    val["loss"] = metrics["loss"]
    return val, {"baseline": {k: ref[k] for k in ("weight_scale", "tune_trans_rmse_mm")}}


def pictures(run: Run, outputs: list[Any], net: torch.nn.Module) -> None:
    from apps.tactile import viz

    viz.draw(run, outputs)


TASK = Task(
    name=APP, metric="trans_rmse_mm", title="tactile: learned tactile measurement model",
    schema=TactileConfig, dataset=dataset, prepare=prepare, model=model, loss=loss,
    evaluate=evaluate, baseline=baseline, report=report, pictures=pictures, check=check,
    curves=(("train_loss", "val_loss"), ("val_trans_rmse_mm",), ("val_rot_rmse_deg",)),
    curve_lines=lambda ref: [
        ("val_trans_rmse_mm", "two-stage", ref["trans_rmse_mm_two_stage"]),
        ("val_trans_rmse_mm", "motion only", ref["trans_rmse_mm_motion_only"]),
        ("val_trans_rmse_mm", "oracle", ref["trans_rmse_mm_oracle"]),
        ("val_rot_rmse_deg", "two-stage", ref["rot_rmse_deg_two_stage"]),
        ("val_rot_rmse_deg", "motion only", ref["rot_rmse_deg_motion_only"]),
        ("val_rot_rmse_deg", "oracle", ref["rot_rmse_deg_oracle"])],
    keys=("trans_rmse_mm", "rot_rmse_deg", "trans_rmse_mm_two_stage", "rot_rmse_deg_two_stage",
          "trans_rmse_mm_motion_only", "rot_rmse_deg_motion_only", "trans_rmse_mm_oracle"),
)
main = main_for(TASK)


def run(cfg: Any) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says (``apps.harness.fit``)."""
    return fit(TASK, cfg)


__all__ = ["TASK", "main", "relative", "run"]
