"""Learn initial trajectories for a GPMP2-style planner that work on maps never seen in training.

``python -m apps.motion_planning [overrides]`` (Hydra, ``conf/motion_planning.yaml``;
``preset=smoke`` for a run of seconds); the loop, checkpoints and metrics files are
``apps.harness.fit``'s. Per step, for a batch of maps (each randomly flipped/transposed): the
network (``apps.motion_planning.model.InitNet``, a U-Net over the map seen along the start-goal
line) gives, per hypothesis, lane logits per column, the trajectory decoded from them and a score;
each hypothesis is rated against the expert by ``loss.lanes * CE(lanes, expert's lanes) +
loss.initial * |p_h - p_expert|^2``, and the best one (winner takes all) is trained, the scores
learn to name it (``loss.score * CE(scores, win)``). With ``model.refine`` (the default) a second
stage (``apps.motion_planning.model.Refiner``) reads the map on a tube along the hypothesis closest
to the expert (detached) and moves its states across it, trained by ``loss.refine * (CE(tube
logits, expert's offsets) + |p_refined - p_expert|^2)`` where the expert lies inside the tube; the
refined trajectory then replaces the winner below. For the first ``loss.solve_maps`` maps of the
batch the winner is also handed to the layer, which runs ``optimizer.max_iters`` (K, default 10)
Levenberg-Marquardt iterations of the planner (``apps.motion_planning.problem``) on them as one
batched problem, adding ``loss.solution * |p_K - p_expert|^2 + loss.objective * F(x_K) / N`` (mean
squared position errors over the states; ``F`` the planner's objective at the K-iteration
solution). The solution terms reach the network through the iterations (``optimizer.backward``:
``unroll``, the default, or ``truncated``; their gradient is clipped per map, ``loss.clip``); with
``implicit`` they carry no gradient to the initialization (the optimum does not depend on where the
solver starts) and only the imitation terms train the network. At evaluation the planner starts
from the collision-free candidate of lowest planner objective (``model.select=cost``), the one
that keeps farthest from obstacles (``clearance``; both evaluate each candidate once, no solve)
or of best score (``score``); with ``model.symmetries`` the candidates are the network's
hypotheses on the map in each of its 8 symmetries, joined by the mean of those within
``model.consensus`` of each (the same way round the obstacles); with ``model.refine`` the refiner
corrects the chosen one where it comes closer to an obstacle than the robot radius (kept unless
the correction comes closer still).

Held-out maps (new maps, other seeds), with ``K`` iterations: ``success_rate`` (collision-free at
the robot radius along the densely interpolated path, inside the map, ends on start and goal),
``path_length_ratio`` (to the expert's, over successful plans), ``gp_error`` (the GP prior's cost
at the plan); ``iterations``: iterations to converge (the optimizer's own test,
``optimizer.rel_tol``) from the learned initialization, capped only at ``converge_iters`` (1000;
``iterations_capped`` says how often it was reached). Baselines, the same planner from the straight
line: with K iterations (``success_rate_baseline``) and with ``eval_iters``
(``success_rate_baseline_100``); ``iterations_baseline``: its iterations to converge, measured as
the learned one's. The harness's headline ``metric`` is ``failure_rate = 1 - success_rate`` (lower
is better).

Outputs in the run folder: ``metrics.json``, ``metrics.csv``, ``checkpoint.pt``, ``curves.png`` and
``motion_planning.png`` (a grid of held-out maps with expert, initial and final plans).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from apps.config import TrainConfig, register, spec_from_config
from apps.harness import Run, Task, fit, main_for, reduce_scores
from apps.motion_planning import evaluation
from apps.motion_planning.data import Sample, make_dataset
from apps.motion_planning.evaluation import Maps, prepare_maps
from apps.motion_planning.model import InitNet, Refiner, augment, lane_loss
from apps.motion_planning.spec import MapSpec

APP = "motion_planning"
Select = Enum("Select", [(k, k) for k in ("clearance", "cost", "score")],  # type: ignore[misc]
              type=str, module=__name__)


@dataclass
class ModelConfig:
    """The initialization network (``apps.motion_planning.model.InitNet``).

    Fields:
        channels: widths of the U-Net's levels over the corridor along the straight line.
        basis: sine offsets per axis of the predicted trajectory (``4 basis + 1`` columns
            along the line).
        lanes: lanes across the corridor (the classes of the lane logits).
        width: the corridor's half-width (metres).
        hypotheses: candidate trajectories the network proposes.
        window: lanes either side of a column's best lane that its decoded offset averages.
        select: which one the planner starts from: ``cost``, the lowest planner objective
            (among those inside the map), ``clearance``, the one whose densely interpolated
            path keeps farthest from obstacles (inside the map), or ``score``, the network's
            best-scored one; the first two evaluate each candidate once, no solve.
        consensus: the selection also weighs, for each candidate, the mean of the
            candidates within this root-mean-square distance of it (metres; 0: none): those
            taking the same way round the obstacles, whose mean averages out the network's
            noise (``apps.motion_planning.evaluation.consensus``; no solve).
        augment: train on randomly flipped/transposed maps (the square's 8 symmetries).
        symmetries: at evaluation, also read each map in its 7 other symmetries: ``8 *
            hypotheses`` candidates for the selection (8 network passes, no solve).
        refine: a second stage (``apps.motion_planning.model.Refiner``) reads the map on a
            tube along the selected candidate and moves its states across it; used at
            evaluation where the candidate comes closer to an obstacle than the robot radius,
            unless the refined path comes closer still (no solve).
        refine_width: the tube's half-width (metres).
        refine_lanes: offsets across the tube (the classes of the refiner's logits).
    """

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    basis: int = 12
    lanes: int = 49
    width: float = 6.0
    hypotheses: int = 12
    window: int = 3
    select: Select = Select.cost  # type: ignore[attr-defined,valid-type]
    consensus: float = 0.5
    augment: bool = True
    symmetries: bool = True
    refine: bool = True
    refine_width: float = 1.0
    refine_lanes: int = 25


@dataclass
class LossConfig:
    """Weights of the outer loss's terms (``apps.motion_planning.train``'s docstring).

    Fields:
        lanes: cross-entropy of the winning hypothesis's lane logits to the expert's lanes.
        initial: imitation of the expert by the winning hypothesis's trajectory.
        score: cross-entropy teaching the scores to name the winner.
        solution: imitation of the expert by the K-iteration solution.
        objective: the planner's objective at the K-iteration solution (per state).
        refine: cross-entropy of the refiner's logits to the expert's offsets across the tube
            plus the imitation of the expert by the refined trajectory (on the hypothesis
            closest to the expert, where the expert lies inside its tube).
        solve_maps: maps of each batch (the first ones) that are also solved by the layer for
            the two solution terms (0: none; the unrolled solve costs far more than the
            network, so the imitation terms see more maps per second).
        clip: the gradient that the solution terms send back through the K iterations to the
            initial trajectory is clipped to this norm per map (0: not clipped); unrolled
            Levenberg-Marquardt steps on hinge costs can amplify it by orders of magnitude.
    """

    lanes: float = 1.0
    initial: float = 1.0
    score: float = 0.1
    solution: float = 1.0
    objective: float = 1e-3
    refine: float = 1.0
    solve_maps: int = 2
    clip: float = 1.0


@dataclass
class MotionPlanningConfig(TrainConfig):
    """``conf/motion_planning.yaml``'s schema: the common training fields plus

    Fields:
        data: maps and planner (``apps.motion_planning.spec.MapSpec``).
        model, loss: see their classes.
        eval_iters: the iterations of the long baseline (``success_rate_baseline_100``).
        converge_iters: the cap of "iterations to converge" (learned and baseline alike): far
            above what any solve needs, so that the count is not truncated
            (``iterations_capped``: the fraction of maps that reached it).
        eval_batch: held-out maps solved per batch.
        viz_maps: held-out maps in ``motion_planning.png`` (the first ones of this rank).
    """

    epochs: int = 10
    batch_size: int = 16
    num_train: int = 1536
    num_val: int = 64
    lr: float = 2e-3
    data: MapSpec = field(default_factory=MapSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval_iters: int = 100
    converge_iters: int = 1000
    eval_batch: int = 32
    viz_maps: int = 6


register(APP, MotionPlanningConfig)


def check(cfg: Any) -> None:
    """The app's own config checks (the data spec's run in ``MapSpec``)."""
    spec_from_config(MapSpec, cfg.data)
    checks = [
        (cfg.eval_iters >= 1, f"eval_iters must be >= 1, got {cfg.eval_iters}"),
        (cfg.converge_iters >= 1, f"converge_iters must be >= 1, got {cfg.converge_iters}"),
        (cfg.eval_batch >= 1, f"eval_batch must be >= 1, got {cfg.eval_batch}"),
        (cfg.model.consensus >= 0, f"model.consensus must be >= 0, got {cfg.model.consensus}"),
        (cfg.viz_maps >= 0, f"viz_maps must be >= 0, got {cfg.viz_maps}"),
        (cfg.optimizer.max_iters >= 1,
         f"optimizer.max_iters (K) must be >= 1, got {cfg.optimizer.max_iters}"),
        (min(cfg.loss.lanes, cfg.loss.initial, cfg.loss.score, cfg.loss.solution,
             cfg.loss.objective, cfg.loss.refine, cfg.loss.solve_maps) >= 0,
         f"loss weights and loss.solve_maps must be >= 0, got {dict(cfg.loss)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def dataset(cfg: Any, seeds: Sequence[int], cache: Path | None, held_out: bool
            ) -> list[Sample]:
    """One sample per seed (held-out ones from the same generator)."""
    return make_dataset(spec_from_config(MapSpec, cfg.data), seeds, cache)


def prepare(cfg: Any, samples: Sequence[Sample], device: torch.device) -> Maps:
    return prepare_maps(cfg, spec_from_config(MapSpec, cfg.data), samples, device)


def model(cfg: Any, train: Maps) -> InitNet:
    m = cfg.model
    refiner = Refiner(train.spec, m.refine_width, m.refine_lanes, channels=16) if m.refine else None
    return InitNet(train.spec, tuple(m.channels), m.basis, m.lanes, m.width, m.hypotheses,
                   m.window, refiner).to(train.sdf.device)


def loss(cfg: Any, net: torch.nn.Module, maps: Maps, batch: Sequence[int]
         ) -> list[torch.Tensor]:
    """The outer loss of each map of ``batch`` (module docstring), solved as one batch."""
    idx = torch.as_tensor(list(batch), dtype=torch.long, device=maps.sdf.device)
    sdf, start, goal, expert = (maps.sdf[idx], maps.start[idx], maps.goal[idx],
                                maps.expert[idx])
    if cfg.model.augment:
        code = torch.randint(0, 8, (len(batch),)).to(idx.device)
        sdf, start, goal, expert = augment(sdf, start, goal, expert, code)
    inner = getattr(net, "module", net)  # DDP wraps the net
    refining = inner.refiner is not None
    trajs, scores, logits, *second = net(sdf, start, goal, lanes=True,
                                         expert=expert if refining else None)
    if not len(batch):
        return []
    w = cfg.loss
    target = inner.targets(start, goal, expert)
    per_hypothesis = (w.lanes * lane_loss(logits, target)
                      + w.initial * evaluation.imitation(trajs, expert[:, None]))  # (B, Hy)
    best = per_hypothesis.detach().argmin(-1)  # the winner takes all
    total = (per_hypothesis.gather(1, best[:, None])[:, 0]
             + w.score * torch.nn.functional.cross_entropy(scores, best, reduction="none"))
    init = trajs[torch.arange(len(batch), device=best.device), best]
    if refining:
        near, refine_logits, refined = second
        tube, inside = inner.refiner.targets(near, expert)
        ce = -(tube * torch.log_softmax(refine_logits, 1)).sum(1).mean(-1)
        total = total + w.refine * inside * (ce + evaluation.imitation(refined, expert))
        init = refined
    n = min(int(w.solve_maps), len(batch))
    if n and (w.solution > 0 or w.objective > 0):  # the solve only when its terms count
        init = init[:n]
        solver_init = clip_gradient(init, w.clip) if w.clip > 0 else init
        final, _ = maps.layer(evaluation.layer_inputs(solver_init, sdf[:n], start[:n], goal[:n]))
        solved = (w.solution * evaluation.imitation(final["states"], expert[:n])
                  + w.objective * maps.cost(final["states"], sdf[:n], start[:n], goal[:n])
                  / maps.spec.num_states)
        total = torch.cat([total[:n] + solved, total[n:]])
    return list(total)


class _ClipGradient(torch.autograd.Function):
    """Identity forward; backward clips each sample's gradient to norm ``max_norm``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, max_norm: float) -> torch.Tensor:  # type: ignore
        ctx.max_norm = max_norm
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore
        norm = g.flatten(1).norm(dim=1).clamp(min=1e-30)
        scale = (ctx.max_norm / norm).clamp(max=1.0)
        return g * scale.view(-1, *([1] * (g.ndim - 1))), None


def clip_gradient(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``x (B, ...)`` unchanged, its gradient clipped to ``max_norm`` per sample."""
    return _ClipGradient.apply(x, max_norm)  # type: ignore[no-any-return]


def baseline(run: Run) -> dict[str, Any]:
    """The planner from the straight line: K iterations and ``eval_iters`` iterations."""
    short, long = evaluation.straight_line_scores(run.cfg, run.val)
    return {**reduce_scores(short, run.dist).metrics("_baseline"),
            **reduce_scores(long, run.dist).metrics("_baseline_100")}


def report(run: Run, metrics: dict[str, float], outputs: list[Any], net: torch.nn.Module
           ) -> tuple[dict[str, float], dict[str, Any]]:
    ref = run.reference
    learned = ("failure_rate", "success_rate", "iterations", "path_length_ratio", "gp_error",
               "loss", "success_rate_initial", "iterations_capped")
    base = ("failure_rate_baseline", "success_rate_baseline", "path_length_ratio_baseline",
            "gp_error_baseline", "success_rate_baseline_100", "path_length_ratio_baseline_100",
            "gp_error_baseline_100")
    val = {**{k: metrics[k] for k in learned}, **{k: ref[k] for k in base},
           "iterations_baseline": ref["iterations_baseline"],
           "iterations_capped_baseline": ref["iterations_capped_baseline"]}
    val["iterations_ratio"] = val["iterations"] / max(val["iterations_baseline"], 1e-12)
    return val, {"K": int(run.cfg.optimizer.max_iters), "eval_iters": int(run.cfg.eval_iters),
                 "converge_iters": int(run.cfg.converge_iters)}


def pictures(run: Run, outputs: list[Any], net: torch.nn.Module) -> None:
    """``motion_planning.png``: the first ``viz_maps`` held-out maps of this rank."""
    evaluation.draw(run, outputs, run.out / "motion_planning.png")


TASK = Task(
    name=APP, metric="failure_rate",
    title="motion planning: learned initial trajectories for a GPMP2 planner",
    schema=MotionPlanningConfig, dataset=dataset, prepare=prepare, model=model, loss=loss,
    evaluate=evaluation.evaluate, baseline=baseline, report=report, pictures=pictures,
    check=check,
    curves=(("train_loss", "val_loss"), ("val_success_rate", "val_success_rate_initial"),
            ("val_iterations",)),
    curve_lines=lambda ref: [
        ("val_success_rate", "straight line, K iterations", ref["success_rate_baseline"]),
        ("val_success_rate", "straight line, 100 iterations", ref["success_rate_baseline_100"]),
        ("val_iterations", "straight line", ref["iterations_baseline"])],
    keys=("success_rate", "success_rate_baseline", "success_rate_baseline_100", "iterations",
          "iterations_baseline", "path_length_ratio", "gp_error"),
)
main = main_for(TASK)


def run(cfg: Any) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says (``apps.harness.fit``)."""
    return fit(TASK, cfg)
