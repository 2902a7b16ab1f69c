"""Held-out evaluation of the motion-planning app: the learned initialization and the
straight-line baselines solved by the same planner, their scores, and the picture.

Every held-out map is solved from each initialization with the same optimizer (``cfg.optimizer``:
the same damping, the same tolerances): K iterations (the layer, as in training: success, path
length, GP error), and up to ``converge_iters`` iterations: how many iterations it takes to
converge by the optimizer's tolerances. That cap is far above what any solve here needs, so the
count is not truncated for either initialization (``iterations_capped`` reports the fraction of
maps that reached it anyway). The straight-line baseline is also solved for exactly
``eval_iters`` (100) iterations: the plan of the "100 iterations" baseline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import core
from apps.config import make_layer, make_optimizer, value
from apps.motion_planning import problem
from apps.motion_planning.data import Sample
from apps.motion_planning.model import augment, chosen, restore
from apps.motion_planning.problem import Scores
from apps.motion_planning.spec import MapSpec

log = logging.getLogger(__name__)


@dataclass
class Maps:
    """Samples stacked on the device, with the planner built once for all of them.

    Attributes:
        spec: the maps' and planner's settings.
        sdf: ``(M, H, W)`` float64; start, goal: ``(M, 2)``; expert: ``(M, N, 4)``.
        kinds: each map's kind.
        objective: the planning objective (``problem.make_objective``).
        layer: ``OptimizationLayer`` with K iterations (``cfg.optimizer``, ``cfg.solver``).
        long: the same optimizer with ``eval_iters`` iterations.
        converge: the same optimizer with ``converge_iters`` iterations (iterations to
            converge).
    """

    spec: MapSpec
    sdf: Tensor
    start: Tensor
    goal: Tensor
    expert: Tensor
    kinds: list[str]
    objective: core.Objective
    layer: core.OptimizationLayer
    long: core.LevenbergMarquardt
    converge: core.LevenbergMarquardt

    def __len__(self) -> int:
        return int(self.sdf.shape[0])

    def cost(self, states: Tensor, sdf: Tensor, start: Tensor, goal: Tensor) -> Tensor:
        """``(B,)`` the planner's objective at ``states (B, N, 4)`` on these maps."""
        aux = layer_inputs(states, sdf, start, goal)
        aux.pop("states")
        return self.objective.with_inputs(aux).cost({"states": states})


def prepare_maps(cfg: Any, spec: MapSpec, samples: Sequence[Sample], device: torch.device
                 ) -> Maps:
    """``samples`` stacked on ``device`` with the objective, the K-iteration layer, the long
    optimizer and the one that runs to convergence."""
    n, size = spec.num_states, spec.size
    f64 = {"dtype": torch.float64, "device": device}

    def stack(name: str, shape: tuple[int, ...]) -> Tensor:
        if not samples:
            return torch.zeros(0, *shape, **f64)  # type: ignore[arg-type]
        return torch.stack([getattr(s, name) for s in samples]).to(**f64)  # type: ignore

    objective = problem.make_objective(spec)
    optimizer = make_optimizer(cfg)
    return Maps(spec, stack("sdf", (size, size)), stack("start", (2,)), stack("goal", (2,)),
                stack("expert", (n, 4)), [s.kind for s in samples], objective,
                make_layer(objective, cfg), replace(optimizer, max_iters=int(cfg.eval_iters)),
                replace(optimizer, max_iters=int(cfg.converge_iters)))


def layer_inputs(init: Tensor, sdf: Tensor, start: Tensor, goal: Tensor) -> dict[str, Tensor]:
    """``problem.inputs`` (kept here so the app has one name for it)."""
    return problem.inputs(init, sdf, start, goal)


def imitation(traj: Tensor, expert: Tensor) -> Tensor:
    """``(B,)`` mean squared position error over the states (m^2)."""
    return (traj[..., :2] - expert[..., :2]).pow(2).sum(-1).mean(-1)


@dataclass
class Plans:
    """One batch's plans from some initialization: initial, K-iteration and ``eval_iters``
    solutions ``(B, N, 4)`` (``long`` is ``final`` when not solved), the iterations to converge
    ``(B,)`` (zero when not solved) and whether they reached ``converge_iters`` ``(B,)``."""

    init: Tensor
    final: Tensor
    iterations: Tensor
    long: Tensor
    capped: Tensor


def solve(maps: Maps, idx: Tensor, init: Tensor, converge: bool = True, long: bool = False
          ) -> Plans:
    """Solve maps ``idx`` from ``init`` for K iterations; with ``converge`` also until converged
    (up to ``converge_iters``: the iterations), with ``long`` also for ``eval_iters``."""
    sdf, start, goal = maps.sdf[idx], maps.start[idx], maps.goal[idx]
    aux = layer_inputs(init, sdf, start, goal)
    final, _ = maps.layer(aux)
    zero = torch.zeros(len(idx), dtype=torch.long, device=init.device)
    plans = Plans(init, final["states"].detach(), zero, final["states"].detach(), zero.bool())
    states = aux.pop("states")
    objective = maps.objective.with_inputs(aux)
    if converge:
        info = maps.converge.solve(objective, {"states": states}).info
        plans.iterations = info.iterations
        plans.capped = info.iterations >= maps.converge.max_iters
    if long:
        plans.long = maps.long.solve(objective, {"states": states}).values["states"]
    return plans


def score(scores: Scores, maps: Maps, idx: Tensor, plans: Plans) -> list[bool]:
    """Add ``plans`` of maps ``idx`` to ``scores``; returns the successes."""
    sdf, start, goal, expert = maps.sdf[idx], maps.start[idx], maps.goal[idx], maps.expert[idx]
    ok = problem.success(plans.final, sdf, start, goal, maps.spec)
    scores.add(ok, plans.iterations, problem.path_length(plans.final),
               problem.path_length(expert), problem.gp_error(plans.final, maps.objective),
               imitation(plans.final, expert), plans.capped)
    scores.initial += float(problem.success(plans.init, sdf, start, goal, maps.spec).sum())
    return ok.tolist()


def initialization(cfg: Any, net: torch.nn.Module, maps: Maps, idx: Tensor) -> Tensor:
    """``(B, N, 4)``: the network's initial trajectories for maps ``idx``: of its hypotheses,
    and the mean of those within ``model.consensus`` of each (:func:`consensus`), the one
    ``model.select`` names (:func:`pick_candidate`: by default the collision-free one of
    lowest planner objective); with ``model.refine``, where that candidate's dense path comes
    closer to an obstacle than the robot radius, the refiner's correction of it, unless the
    correction comes closer still.
    With ``model.symmetries`` the network also reads each map in the square's other seven
    symmetries (``model.augment``), its plans mapped back: ``8 Hy`` candidates."""
    sdf, start, goal = maps.sdf[idx], maps.start[idx], maps.goal[idx]
    if cfg.model.symmetries:
        B, codes = len(idx), torch.arange(8, device=sdf.device)
        code = codes.repeat_interleave(B)
        rep8 = lambda t: t.repeat(8, *([1] * (t.ndim - 1)))  # noqa: E731
        dummy = sdf.new_zeros(8 * B, 1, 4)
        s8, a8, b8, _ = augment(rep8(sdf), rep8(start), rep8(goal), dummy, code)
        trajs, scores = net(s8, a8, b8)  # (8 B, Hy, N, 4), (8 B, Hy)
        trajs = restore(trajs, code)
        trajs = trajs.view(8, B, *trajs.shape[1:]).transpose(0, 1).flatten(1, 2)
        scores = scores.view(8, B, -1).transpose(0, 1).flatten(1, 2)
    else:
        trajs, scores = net(sdf, start, goal)  # (B, Hy, N, 4), (B, Hy)
    radius = float(value(cfg.model.consensus))
    if radius > 0:  # the hypotheses and their consensus means
        trajs = torch.cat([trajs, consensus(trajs, radius)], 1)
        scores = torch.cat([scores, scores], 1)
    pick = pick_candidate(cfg, maps, trajs, scores, sdf, start, goal)
    refiner = getattr(getattr(net, "module", net), "refiner", None)
    if refiner is None:
        return pick
    refined = refiner(pick, sdf)[1]
    before, after = (problem.clearance(t, sdf, maps.spec) for t in (pick, refined))
    r = maps.spec.robot_radius
    keep = (before <= r) & ((after > r) | (after >= before))  # a colliding pick, not made worse
    return torch.where(keep[:, None, None], refined, pick)


def consensus(trajs: Tensor, radius: float) -> Tensor:
    """``(B, C, N, 4)``: each candidate of ``trajs (B, C, N, 4)`` replaced by the mean of the
    candidates within ``radius`` of it (root-mean-square distance between their positions,
    metres; itself included): hypotheses that take the same way round the obstacles agree on it
    up to the network's noise, which their mean averages out. ``radius`` 0: unchanged."""
    if radius <= 0:
        return trajs
    p = trajs[..., :2].flatten(-2)  # (B, C, 2N)
    dist = torch.cdist(p, p) / math.sqrt(trajs.shape[-2])  # (B, C, C) RMS distances
    near = (dist <= radius).to(trajs.dtype)
    return torch.einsum("bij,bjnk->bink", near / near.sum(-1, keepdim=True), trajs)


def pick_candidate(cfg: Any, maps: Maps, trajs: Tensor, scores: Tensor, sdf: Tensor,
                   start: Tensor, goal: Tensor) -> Tensor:
    """``(B, N, 4)``: of the candidates ``trajs (B, C, N, 4)``, the one ``model.select``
    names: ``score``, the best-scored; ``clearance``, the one whose dense path keeps farthest
    from obstacles (``-inf`` where it leaves the map); ``cost``, of the collision-free ones
    (clearance above the robot radius, inside the map) the one of lowest planner objective,
    where none is collision-free the one of largest clearance, where all leave the map the
    cheapest. The objective alone prefers plans that cut a little through an obstacle (the
    hinge costs less than the detour) or leave the map where its edge is far from obstacles
    (the SDF falls only by the distance travelled out): neither is a plan."""
    select = str(value(cfg.model.select))
    if select == "score":
        return chosen(trajs, scores)
    B, C = trajs.shape[:2]
    rep = lambda t: t.repeat_interleave(C, 0)  # noqa: E731
    clear = problem.clearance(trajs.flatten(0, 1), rep(sdf), maps.spec).view(B, C)
    if select == "clearance":
        return chosen(trajs, clear)
    cost = maps.cost(trajs.flatten(0, 1), rep(sdf), rep(start), rep(goal)).view(B, C)
    free = clear > maps.spec.robot_radius
    best_free = torch.where(free, -cost, -math.inf).argmax(-1)
    best = torch.where(clear.isfinite().any(-1), clear.argmax(-1), (-cost).argmax(-1))
    pick = torch.where(free.any(-1), best_free, best)
    return trajs[torch.arange(B, device=trajs.device), pick]


@torch.no_grad()
def evaluate(cfg: Any, net: torch.nn.Module, maps: Maps) -> tuple[Scores, list[Any]]:
    """The learned initialization on ``maps``; outputs per map: ``(init, final, success)``."""
    scores, outputs = Scores(), []
    for b in range(0, len(maps), cfg.eval_batch):
        idx = torch.arange(b, min(b + cfg.eval_batch, len(maps)), device=maps.sdf.device)
        init = initialization(cfg, net, maps, idx)
        plans = solve(maps, idx, init)
        ok = score(scores, maps, idx, plans)
        outputs += [(plans.init[k].cpu(), plans.final[k].cpu(), ok[k]) for k in range(len(idx))]
    return scores, outputs


@torch.no_grad()
def straight_line_scores(cfg: Any, maps: Maps) -> tuple[Scores, Scores]:
    """The baselines on ``maps``: the straight line with K iterations and with
    ``eval_iters`` (their scores; both with the iterations to converge from the line)."""
    short, long = Scores(), Scores()
    for b in range(0, len(maps), cfg.eval_batch):
        idx = torch.arange(b, min(b + cfg.eval_batch, len(maps)), device=maps.sdf.device)
        init = problem.straight_line(maps.start[idx], maps.goal[idx], maps.spec)
        plans = solve(maps, idx, init, long=True)
        score(short, maps, idx, plans)
        score(long, maps, idx, replace(plans, final=plans.long))
    return short, long


def draw(run: Any, outputs: list[Any], path: Path) -> None:
    """A grid of the first ``viz_maps`` held-out maps of this rank: expert, learned initial and
    final plans, the straight-line baseline's K-iteration plan."""
    from apps.motion_planning import viz

    maps, count = run.val, min(run.cfg.viz_maps, len(run.val))
    if count == 0:
        return
    idx = torch.arange(count, device=maps.sdf.device)
    line = problem.straight_line(maps.start[idx], maps.goal[idx], maps.spec)
    with torch.no_grad():
        base = solve(maps, idx, line, converge=False)
        base_ok = problem.success(base.final, maps.sdf[idx], maps.start[idx], maps.goal[idx],
                                  maps.spec).tolist()
    panels = []
    for k in range(count):
        init, final, ok = outputs[k]
        title = (f"held-out map {run.mine[k]} ({maps.kinds[k]}): learned "
                 f"{'ok' if ok else 'COLLIDES'}, baseline {'ok' if base_ok[k] else 'COLLIDES'}")
        panels.append(viz.as_panel(maps.sdf[k], maps.start[k], maps.goal[k], {
            "expert": maps.expert[k], "initial (learned)": init, "final (learned)": final,
            "final (straight-line baseline)": base.final[k]}, title))
    K = int(run.cfg.optimizer.max_iters)
    viz.draw_panels(path, panels, maps.spec,
                    f"held-out maps: plans after K = {K} LM iterations from the learned "
                    "initialization and from the straight line")
    log.info("wrote %s", path)
