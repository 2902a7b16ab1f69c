"""The bundle-adjustment app's scenes ready to solve, its scores, and its references: the
unlearned baselines (uniform weights, a robust-loss scale tuned on the training scenes, per loss
kind) and the oracle that knows the outliers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from apps import common
from apps import gnc as gnc_lib
from apps.bundle_adjustment.data import Scene
from apps.bundle_adjustment.problem import BAObjective, ba_objective, inlier_rmse, pose_errors
from apps.config import make_layer, make_optimizer, make_solver_from, value

log = logging.getLogger(__name__)
OUTLIER_WEIGHT = 1e-3  # the oracle's weight of an outlier (0 could leave a point unobserved)


def aim_of(cfg: Any) -> float:
    """Distance of the aim points of the similarity alignment (``cfg.aim``, else the scenes')."""
    return float(cfg.aim) if cfg.aim is not None else float(cfg.data.distance)


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

    def metrics(self, suffix: str = "") -> dict[str, float]:
        n = max(self.scenes, 1.0)
        return {f"rot_err_deg{suffix}": self.rot / n, f"center_err{suffix}": self.center / n,
                f"rmse_px{suffix}": self.rmse / n, f"loss{suffix}": self.loss / n,
                f"solve_time_s{suffix}": self.time_s / n,
                f"iterations{suffix}": self.iterations / n}


@dataclass
class Prepared:
    """Scenes on the device with their objectives and layers (built once, reused every epoch)."""

    scenes: list[Scene]
    problems: list[BAObjective]
    layers: list[torch.nn.Module]


def to_device(s: Scene, device: torch.device) -> Scene:
    if s.features.device == device:
        return s
    return Scene(s.problem.to(device), s.true_cameras.to(device), s.true_points.to(device),
                 s.is_outlier.to(device), s.features.to(device), s.layout)


def prepare(scenes: Sequence[Scene], loss: str | None, cfg: Any, device: torch.device
            ) -> Prepared:
    """Each scene on ``device`` with its objective (robust loss ``loss``, None: least squares)
    and its layer as ``cfg.optimizer`` and ``cfg.solver`` say (``schur``: points eliminated)."""
    moved, problems, layers = [], [], []
    for s in scenes:
        s = to_device(s, device)
        p = ba_objective(s.problem, loss, 1.0, cfg.gauge_weight)
        moved.append(s)
        problems.append(p)
        layers.append(make_layer(p.objective, cfg, eliminate="points"))
    return Prepared(moved, problems, layers)


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


def tune_scale(scenes: Sequence[Scene], kind: str, cfg: Any, device: torch.device,
               d: common.Dist) -> dict[str, Any]:
    """Grid search of the robust-loss scale (uniform weights) on ``scenes``, all scales solved
    as one batch per scene; returns the best scale and the mean rotation error of every one."""
    scales = torch.tensor(list(cfg.baseline.scales), dtype=torch.float64, device=device)
    sums = torch.zeros(len(scales), dtype=torch.float64)
    for s in common.shard(list(scenes), d):
        s = to_device(s, device)
        p = ba_objective(s.problem, kind, 1.0, cfg.gauge_weight)
        inputs = p.inputs(s.features.new_ones(p.num_observations), scales, batch=len(scales))
        names = {v.name for v in p.objective.variables}
        objective = p.objective.with_inputs({k: v for k, v in inputs.items() if k not in names})
        lm = make_optimizer(cfg, make_solver_from(cfg.solver, p.objective, "points"))
        with torch.no_grad():
            solution = lm.solve(objective, {k: inputs[k] for k in names})
        sums += pose_errors(solution.values, s, aim_of(cfg)).rot_deg.mean(-1).cpu()
    grid = [t / len(scenes) for t in common.all_reduce_sum(sums.tolist(), d)]
    k = min(range(len(grid)), key=grid.__getitem__)
    return {"loss": kind, "scale": float(scales[k]), "train_rot_err_deg": grid[k], "grid": grid,
            "scales": scales.tolist()}


def run_baselines(train: Sequence[Scene], val: Sequence[Scene], cfg: Any, device: torch.device,
                  d: common.Dist, reduce: Callable[[Scores], Scores]) -> dict[str, Any]:
    """Tune and score the baselines (``apps.bundle_adjustment.train``'s docstring) on this rank's
    ``val`` scenes; ``reduce`` sums scores over ranks."""
    tune = list(train[: cfg.baseline.tune_scenes or len(train)])
    kinds = [str(value(cfg.baseline.loss))]
    kinds += [str(value(k)) for k in cfg.baseline.also if str(value(k)) not in kinds]
    out: dict[str, Any] = {"tuned": {}}
    for n, kind in enumerate(kinds):
        best = tune_scale(tune, kind, cfg, device, d)
        scores, _ = evaluate_fixed(prepare(val, kind, cfg, device), best["scale"], cfg)
        suffix = "_baseline" if n == 0 else f"_baseline_{kind}"
        out.update(reduce(scores).metrics(suffix))
        out["tuned"][kind] = best
        log.info("baseline %s: scale %g (train rot %.4f deg), val rot %.4f deg, centre %.4f",
                 kind, best["scale"], best["train_rot_err_deg"], out[f"rot_err_deg{suffix}"],
                 out[f"center_err{suffix}"])
    if cfg.baseline.oracle:
        scores, _ = evaluate_fixed(prepare(val, None, cfg, device), 1.0, cfg, oracle_weight)
        out.update(reduce(scores).metrics("_oracle"))
    out["strongest"] = {}
    if cfg.baseline.best_fixed:
        found = run_best_fixed(tune, val, dict(out["tuned"]), cfg, device, d, reduce)
        out["strongest"]["best_fixed"] = found.pop("setting")
        out.update(found)
    if cfg.baseline.gnc.ariadne:
        found = run_gnc(train, val, cfg, device, d, reduce)
        out["strongest"]["gnc"] = found.pop("setting")
        out.update(found)
    return out


# ------------------------------------------------------------------------------------------
# the strongest classical baselines: the best fixed loss of every family, and GNC
# ------------------------------------------------------------------------------------------


def _batched(s: Scene, kind: str, scales: torch.Tensor, cfg: Any
             ) -> tuple[BAObjective, dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    """Scene ``s``'s objective (loss ``kind``), its non-variable inputs and initial values for
    uniform weights and one batch element per scale of ``scales (B,)``, and the LM."""
    p = ba_objective(s.problem, kind, 1.0, cfg.gauge_weight)
    inputs = p.inputs(s.features.new_ones(p.num_observations), scales, batch=len(scales))
    names = {v.name for v in p.objective.variables}
    lm = make_optimizer(cfg, make_solver_from(cfg.solver, p.objective, "points"))
    return (p, {k: v for k, v in inputs.items() if k not in names},
            {k: inputs[k] for k in names}, lm)


@torch.no_grad()
def gnc_solve(s: Scene, cfg: Any, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batched Ariadne GNC-GM (``apps.gnc``) on scene ``s`` (on the device of ``target``),
    uniform weights, one batch element per target scale ``target (B,)``: the solution values."""
    gnc = cfg.baseline.gnc
    p, aux, init, lm = _batched(s, "geman_mcclure", target, cfg)
    key = next(k for k in aux if k.endswith("loss_scale"))

    def solve(scale: torch.Tensor, values: dict[str, torch.Tensor], iters: int
              ) -> dict[str, torch.Tensor]:
        objective = p.objective.with_inputs({**aux, key: scale})
        return replace(lm, max_iters=iters).solve(objective, values).values

    return gnc_lib.graduated(solve, init, target, gnc.start, gnc.factor, gnc.stage_iters,
                             lm.max_iters)


def run_gnc(train: Sequence[Scene], val: Sequence[Scene], cfg: Any, device: torch.device,
            d: common.Dist, reduce: Callable[[Scores], Scores]) -> dict[str, Any]:
    """Ariadne's GNC-GM: the target scale of ``cfg.baseline.gnc.scales`` with the lowest mean
    rotation error on the first ``tune_items`` training scenes, scored on ``val``
    (``*_gnc`` metrics; ``setting``: the tuned scale and grid)."""
    gnc = cfg.baseline.gnc
    scales = torch.tensor(list(gnc.scales), dtype=torch.float64, device=device)
    sums = torch.zeros(len(scales), dtype=torch.float64)
    tune = list(train[: gnc.tune_items])
    for s in common.shard(tune, d):
        s = to_device(s, device)
        sums += pose_errors(gnc_solve(s, cfg, scales), s, aim_of(cfg)).rot_deg.mean(-1).cpu()
    grid = [t / len(tune) for t in common.all_reduce_sum(sums.tolist(), d)]
    k = min(range(len(grid)), key=grid.__getitem__)
    scores = Scores()
    for s in val:
        s = to_device(s, device)
        start = time.perf_counter()
        sol = gnc_solve(s, cfg, scales[k: k + 1])
        scores.add(sol, s, time.perf_counter() - start, 0, aim_of(cfg), cfg.center_weight)
    out = reduce(scores).metrics("_gnc")
    del out["iterations_gnc"]  # the stages' iterations are not counted
    log.info("GNC-GM (Ariadne): scale %g (train rot %.4f deg), val rot %.4f deg",
             float(scales[k]), grid[k], out["rot_err_deg_gnc"])
    return {**out, "setting": {"scale": float(scales[k]), "train_rot_err_deg": grid[k],
                               "grid": grid}}


def run_best_fixed(tune: Sequence[Scene], val: Sequence[Scene], tuned: dict[str, Any], cfg: Any,
                   device: torch.device, d: common.Dist, reduce: Callable[[Scores], Scores]
                   ) -> dict[str, Any]:
    """The best (kind, scale) over ``cfg.baseline.best_fixed`` x ``cfg.baseline.scales`` on the
    training scenes ``tune`` (kinds in ``tuned`` are not solved again), scored on ``val``
    (``*_best_fixed`` metrics; ``setting``: the winner's tuning)."""
    for kind in (str(value(k)) for k in cfg.baseline.best_fixed):
        if kind not in tuned:
            tuned[kind] = tune_scale(tune, kind, cfg, device, d)
    kinds = [str(value(k)) for k in cfg.baseline.best_fixed]
    best = min((tuned[k] for k in kinds), key=lambda t: t["train_rot_err_deg"])
    scores, _ = evaluate_fixed(prepare(val, best["loss"], cfg, device), best["scale"], cfg)
    out = reduce(scores).metrics("_best_fixed")
    log.info("best fixed loss: %s scale %g (train rot %.4f deg), val rot %.4f deg", best["loss"],
             best["scale"], best["train_rot_err_deg"], out["rot_err_deg_best_fixed"])
    return {**out, "setting": best}


def strongest_solution(run: Any, s: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Scene ``s`` solved by the baseline with the lowest held-out rotation error among the
    documented one (``*_baseline``), the best fixed loss and GNC-GM; and its label."""
    ref, cfg = run.reference, run.cfg
    names = [n for n in ("baseline", "best_fixed", "gnc") if f"rot_err_deg_{n}" in ref]
    name = min(names, key=lambda n: ref[f"rot_err_deg_{n}"])
    if name == "gnc":
        scale = ref["strongest"]["gnc"]["scale"]
        target = torch.tensor([scale], dtype=torch.float64, device=run.device)
        return gnc_solve(s, cfg, target), f"GNC-GM, scale {scale:g}"
    kind = str(value(cfg.baseline.loss))
    best = ref["tuned"][kind] if name == "baseline" else ref["strongest"]["best_fixed"]
    _, base = evaluate_fixed(prepare([s], best["loss"], cfg, run.device),
                                         best["scale"], cfg)
    label = "tuned" if name == "baseline" else "best fixed"
    return base[0], f"{label} {best['loss']}, scale {best['scale']:g}"


def curve_lines(ref: dict[str, Any]) -> list[tuple[str, str, float]]:
    """Reference lines of the curves: each tuned baseline (the first of ``tuned`` is the
    ``*_baseline`` one), the best fixed loss, GNC-GM and the oracle (those that were run)."""
    lines = []
    for m in ("rot_err_deg", "center_err"):
        for n, kind in enumerate(ref["tuned"]):
            suffix = "_baseline" if n == 0 else f"_baseline_{kind}"
            lines.append((f"val_{m}", f"baseline ({kind})", ref[f"{m}{suffix}"]))
        if f"{m}_best_fixed" in ref:
            best = ref["strongest"]["best_fixed"]["loss"]
            lines.append((f"val_{m}", f"best fixed ({best})", ref[f"{m}_best_fixed"]))
        if f"{m}_gnc" in ref:
            lines.append((f"val_{m}", "GNC-GM", ref[f"{m}_gnc"]))
        if f"{m}_oracle" in ref:
            lines.append((f"val_{m}", "oracle (outliers known)", ref[f"{m}_oracle"]))
    return lines
