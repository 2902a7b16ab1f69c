"""The bundle-adjustment app's scenes ready to solve, its scores, and its references: the
unlearned baselines (uniform weights, a robust-loss scale tuned on the training scenes, per loss
kind) and the oracle that knows the outliers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
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
def solve_fixed(s: Scene, p: BAObjective, layer: torch.nn.Module, scale: float,
                weight: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], float, int]:
    """Scene ``s`` solved by ``layer`` (over ``p``) with uniform weights (or ``weight (O,)``)
    and the robust-loss ``scale``: the solution, its time and LM's iterations."""
    w = weight if weight is not None else s.features.new_ones(p.num_observations)
    start = time.perf_counter()
    sol, info = layer(p.inputs(w, scale))
    return sol, time.perf_counter() - start, int(info.iterations[0])


def fixed_scene(s: Scene, loss: str | None, scale: float, cfg: Any, device: torch.device,
                oracle: bool = False) -> tuple[dict[str, torch.Tensor], float, int]:
    """:func:`solve_fixed` on scene ``s`` with its objective (robust loss ``loss``) and layer
    built here (a call of ``apps.common.map_calls``); ``oracle``: :func:`oracle_weight`."""
    prepared = prepare([s], loss, cfg, device)
    s = prepared.scenes[0]
    return solve_fixed(s, prepared.problems[0], prepared.layers[0], scale,
                       oracle_weight(s) if oracle else None)


@torch.no_grad()
def evaluate_fixed(prepared: Prepared, scale: float, cfg: Any,
                   weight: Callable[[Scene], torch.Tensor] | None = None
                   ) -> tuple[Scores, list[dict[str, torch.Tensor]]]:
    """Scores of the unlearned layer: uniform weights (or ``weight(scene)``), a fixed scale."""
    found = [solve_fixed(s, p, layer, scale, weight(s) if weight is not None else None)
             for s, p, layer in zip(prepared.scenes, prepared.problems, prepared.layers)]
    return scores_of(prepared.scenes, found, cfg)


def scores_of(scenes: Sequence[Scene], found: Sequence[tuple[dict[str, torch.Tensor], float, int]],
              cfg: Any) -> tuple[Scores, list[dict[str, torch.Tensor]]]:
    """The scores of ``scenes``' solutions ``found`` (:func:`solve_fixed`'s) and the solutions."""
    scores = Scores()
    for s, (sol, elapsed, iterations) in zip(scenes, found):
        scores.add(sol, s, elapsed, iterations, aim_of(cfg), cfg.center_weight)
    return scores, [sol for sol, _, _ in found]


def oracle_weight(scene: Scene) -> torch.Tensor:
    """``(O,)`` 1 for inliers, :data:`OUTLIER_WEIGHT` for outliers."""
    one = scene.features.new_ones(scene.is_outlier.shape[0])
    return torch.where(scene.is_outlier, OUTLIER_WEIGHT * one, one)


def tune_scene(s: Scene, kind: str, cfg: Any, device: torch.device) -> torch.Tensor:
    """``(S,)`` the mean camera rotation error of scene ``s`` solved with uniform weights and
    the robust loss ``kind`` at each scale of ``cfg.baseline.scales`` (one batch element per
    scale), on the CPU."""
    s = to_device(s, device)
    scales = torch.tensor(list(cfg.baseline.scales), dtype=torch.float64, device=device)
    p, aux, init, lm = _batched(s, kind, scales, cfg)
    with torch.no_grad():
        solution = lm.solve(p.objective.with_inputs(aux), init)
    return pose_errors(solution.values, s, aim_of(cfg)).rot_deg.mean(-1).cpu()


def scale_choice(scenes: Sequence[Scene], kind: str, cfg: Any, d: common.Dist,
                 errors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The scale with the lowest mean rotation error from this rank's :func:`tune_scene`
    results ``errors`` (``scenes``: all tuning scenes)."""
    scales = [float(c) for c in cfg.baseline.scales]
    sums = torch.zeros(len(scales), dtype=torch.float64)
    for e in errors:
        sums += e
    grid = [t / len(scenes) for t in common.all_reduce_sum(sums.tolist(), d)]
    k = min(range(len(grid)), key=grid.__getitem__)
    return {"loss": kind, "scale": scales[k], "train_rot_err_deg": grid[k], "grid": grid,
            "scales": scales}


def tune_scale(scenes: Sequence[Scene], kind: str, cfg: Any, device: torch.device,
               d: common.Dist, pool: Executor | None = None) -> dict[str, Any]:
    """Grid search of the robust-loss scale (uniform weights) on ``scenes``, all scales solved
    as one batch per scene (:func:`tune_scene`, the scenes shared with ``pool``); returns the
    best scale and the mean rotation error of every one."""
    calls = [(tune_scene, (s, kind, cfg, device)) for s in common.shard(list(scenes), d)]
    return scale_choice(scenes, kind, cfg, d, common.map_calls(calls, pool))


def run_baselines(train: Sequence[Scene], val: Sequence[Scene], cfg: Any, device: torch.device,
                  d: common.Dist, reduce: Callable[[Scores], Scores],
                  pool: Executor | None = None) -> dict[str, Any]:
    """Tune and score the baselines (``apps.bundle_adjustment.train``'s docstring) on this rank's
    ``val`` scenes; ``reduce`` sums scores over ranks. The solves are independent, so they go
    in two rounds of ``apps.common.map_calls`` shared with ``pool``'s processes: every tuning
    solve (every loss kind, GNC), then every held-out one; the results are those of the
    one-by-one functions (:func:`tune_scale`, :func:`evaluate_fixed`, :func:`run_gnc`). The
    best fixed loss reuses the held-out solutions of the tuned kind it names (the same
    solves)."""
    tune = list(train[: cfg.baseline.tune_scenes or len(train)])
    kinds = [str(value(cfg.baseline.loss))]
    kinds += [str(value(k)) for k in cfg.baseline.also if str(value(k)) not in kinds]
    fixed = [str(value(k)) for k in cfg.baseline.best_fixed]
    gnc = cfg.baseline.gnc
    few = list(train[: gnc.tune_items])
    solved = kinds + [k for k in fixed if k not in kinds]
    mine = common.shard(tune, d)
    calls: list[common.Call] = [(tune_scene, (s, kind, cfg, device))
                                for kind in solved for s in mine]
    if gnc.ariadne:
        calls += [(gnc_tune_scene, (s, cfg, device)) for s in common.shard(few, d)]
    found = common.map_calls(calls, pool)
    tuned = {kind: scale_choice(tune, kind, cfg, d, found[n * len(mine): (n + 1) * len(mine)])
             for n, kind in enumerate(solved)}
    best = min((tuned[k] for k in fixed), key=lambda t: t["train_rot_err_deg"]) if fixed \
        else None
    gnc_setting = gnc_choice(few, cfg, d, found[len(solved) * len(mine):]) if gnc.ariadne \
        else None

    jobs = {kind: [(fixed_scene, (s, kind, tuned[kind]["scale"], cfg, device)) for s in val]
            for kind in kinds}
    if cfg.baseline.oracle:
        jobs["oracle"] = [(fixed_scene, (s, None, 1.0, cfg, device, True)) for s in val]
    if best is not None and best["loss"] not in kinds:
        jobs["best_fixed"] = [(fixed_scene, (s, best["loss"], best["scale"], cfg, device))
                              for s in val]
    if gnc_setting is not None:
        jobs["gnc"] = [(gnc_scene, (s, cfg, gnc_setting["scale"], device)) for s in val]
    results = common.map_calls([c for js in jobs.values() for c in js], pool)
    held = {name: results[n * len(val): (n + 1) * len(val)] for n, name in enumerate(jobs)}
    val = [to_device(s, device) for s in val]

    out: dict[str, Any] = {"tuned": {}}
    for n, kind in enumerate(kinds):
        scores, _ = scores_of(val, held[kind], cfg)
        suffix = "_baseline" if n == 0 else f"_baseline_{kind}"
        out.update(reduce(scores).metrics(suffix))
        out["tuned"][kind] = tuned[kind]
        log.info("baseline %s: scale %g (train rot %.4f deg), val rot %.4f deg, centre %.4f",
                 kind, tuned[kind]["scale"], tuned[kind]["train_rot_err_deg"],
                 out[f"rot_err_deg{suffix}"], out[f"center_err{suffix}"])
    if cfg.baseline.oracle:
        out.update(reduce(scores_of(val, held["oracle"], cfg)[0]).metrics("_oracle"))
    out["strongest"] = {}
    if best is not None:
        scores, _ = scores_of(val, held.get("best_fixed", held.get(best["loss"], [])), cfg)
        out.update(reduce(scores).metrics("_best_fixed"))
        log.info("best fixed loss: %s scale %g (train rot %.4f deg), val rot %.4f deg",
                 best["loss"], best["scale"], best["train_rot_err_deg"],
                 out["rot_err_deg_best_fixed"])
        out["strongest"]["best_fixed"] = best
    if gnc_setting is not None:
        out.update(gnc_metrics(val, held["gnc"], gnc_setting, cfg, reduce))
        out["strongest"]["gnc"] = gnc_setting
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


def gnc_tune_scene(s: Scene, cfg: Any, device: torch.device) -> torch.Tensor:
    """``(len(cfg.baseline.gnc.scales),)`` the mean rotation error of GNC-GM on scene ``s`` at
    each target scale (one batch element per scale), on the CPU."""
    s = to_device(s, device)
    scales = torch.tensor(list(cfg.baseline.gnc.scales), dtype=torch.float64, device=device)
    return pose_errors(gnc_solve(s, cfg, scales), s, aim_of(cfg)).rot_deg.mean(-1).cpu()


def gnc_choice(scenes: Sequence[Scene], cfg: Any, d: common.Dist,
               errors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """GNC-GM's target scale with the lowest mean rotation error from this rank's
    :func:`gnc_tune_scene` results ``errors`` (``scenes``: all tuning scenes)."""
    scales = [float(c) for c in cfg.baseline.gnc.scales]
    sums = torch.zeros(len(scales), dtype=torch.float64)
    for e in errors:
        sums += e
    grid = [t / len(scenes) for t in common.all_reduce_sum(sums.tolist(), d)]
    k = min(range(len(grid)), key=grid.__getitem__)
    return {"scale": scales[k], "train_rot_err_deg": grid[k], "grid": grid}


def gnc_scene(s: Scene, cfg: Any, scale: float, device: torch.device
              ) -> tuple[dict[str, torch.Tensor], float, int]:
    """GNC-GM at target ``scale`` on scene ``s``: the solution, its time and 0 (the stages'
    iterations are not counted)."""
    s = to_device(s, device)
    target = torch.tensor([scale], dtype=torch.float64, device=device)
    start = time.perf_counter()
    sol = gnc_solve(s, cfg, target)
    return sol, time.perf_counter() - start, 0


def gnc_metrics(val: Sequence[Scene], found: Sequence[tuple[dict[str, torch.Tensor], float, int]],
                setting: dict[str, Any], cfg: Any, reduce: Callable[[Scores], Scores]
                ) -> dict[str, float]:
    """The ``*_gnc`` metrics of :func:`gnc_scene`'s results ``found`` on ``val``."""
    out = reduce(scores_of(val, found, cfg)[0]).metrics("_gnc")
    del out["iterations_gnc"]  # the stages' iterations are not counted
    log.info("GNC-GM (Ariadne): scale %g (train rot %.4f deg), val rot %.4f deg",
             setting["scale"], setting["train_rot_err_deg"], out["rot_err_deg_gnc"])
    return out


def run_gnc(train: Sequence[Scene], val: Sequence[Scene], cfg: Any, device: torch.device,
            d: common.Dist, reduce: Callable[[Scores], Scores], pool: Executor | None = None
            ) -> dict[str, Any]:
    """Ariadne's GNC-GM: the target scale of ``cfg.baseline.gnc.scales`` with the lowest mean
    rotation error on the first ``tune_items`` training scenes, scored on ``val``
    (``*_gnc`` metrics; ``setting``: the tuned scale and grid)."""
    tune = list(train[: cfg.baseline.gnc.tune_items])
    calls = [(gnc_tune_scene, (s, cfg, device)) for s in common.shard(tune, d)]
    setting = gnc_choice(tune, cfg, d, common.map_calls(calls, pool))
    found = common.map_calls([(gnc_scene, (s, cfg, setting["scale"], device)) for s in val],
                             pool)
    val = [to_device(s, device) for s in val]
    return {**gnc_metrics(val, found, setting, cfg, reduce), "setting": setting}


def run_best_fixed(tune: Sequence[Scene], val: Sequence[Scene], tuned: dict[str, Any], cfg: Any,
                   device: torch.device, d: common.Dist, reduce: Callable[[Scores], Scores],
                   pool: Executor | None = None) -> dict[str, Any]:
    """The best (kind, scale) over ``cfg.baseline.best_fixed`` x ``cfg.baseline.scales`` on the
    training scenes ``tune`` (kinds in ``tuned`` are not solved again), scored on ``val``
    (``*_best_fixed`` metrics; ``setting``: the winner's tuning)."""
    for kind in (str(value(k)) for k in cfg.baseline.best_fixed):
        if kind not in tuned:
            tuned[kind] = tune_scale(tune, kind, cfg, device, d, pool)
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
