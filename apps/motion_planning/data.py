"""Seeded procedural maps, their signed distance fields, start/goal pairs and expert trajectories.

A sample (one per seed; held-out samples come from other seeds, so they are new maps):

* an occupancy grid ``(H, W)`` over ``[-extent, extent]^2`` (``apps.motion_planning.spec``; row
  ``r``, column ``c`` is the cell centred at ``(-extent + (c + 0.5) cell, -extent + (r + 0.5)
  cell)``) of kind ``forest`` (random rectangles), ``tarpit`` (one or two walls across the map,
  each with one or two gaps, plus a few rectangles) or ``mixed`` (one wall and a sparser forest);
* its SDF by ``scipy.ndimage.distance_transform_edt`` (metres, negative inside obstacles);
* start and goal: free points with clearance above the hinge threshold, at least
  ``min_distance`` apart, whose straight segment collides whenever such a pair is found in 200
  draws (almost always);
* the expert: the planner itself (``apps.motion_planning.problem``) solved for ``expert_iters``
  Levenberg-Marquardt iterations from two initializations, a grid path found by
  ``skimage.graph.route_through_array`` on a clearance-weighted cost (resampled by arc length to
  the support states) and the straight line; the collision-free result (at the robot radius,
  densely interpolated) of lower cost is kept. A seed whose solves all collide draws a new
  start/goal pair (and after a few failures a new map) from the same seed's generator.

Samples are cached (``apps.common.cached``) under a key of the settings and seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

import core
from apps.common import cached
from apps.motion_planning import problem
from apps.motion_planning.spec import MapSpec

_ROUNDS = 12
_PAIR_DRAWS = 200


@dataclass(frozen=True)
class Sample:
    """One map and its plan.

    Attributes:
        occupancy: ``(H, W)`` bool, True in obstacles.
        sdf: ``(H, W)`` float32 signed distance (metres).
        start, goal: ``(2,)`` float64 positions.
        expert: ``(N, 4)`` float64 expert trajectory ``(x, y, vx, vy)``.
        kind: the map kind.
    """

    occupancy: Tensor
    sdf: Tensor
    start: Tensor
    goal: Tensor
    expert: Tensor
    kind: str

    def as_dict(self) -> dict:
        return {"occupancy": self.occupancy, "sdf": self.sdf, "start": self.start,
                "goal": self.goal, "expert": self.expert, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        return cls(d["occupancy"], d["sdf"], d["start"], d["goal"], d["expert"], d["kind"])


def cell_centres(spec: MapSpec) -> tuple[np.ndarray, np.ndarray]:
    """``x (H, W)``, ``y (H, W)``: the cell centres' coordinates."""
    c = -spec.extent + (np.arange(spec.size) + 0.5) * spec.cell
    return np.meshgrid(c, c, indexing="xy")


def signed_distance(occupancy: np.ndarray, cell: float) -> np.ndarray:
    """``(H, W)`` metres to the nearest obstacle cell (free cells, positive) minus metres to the
    nearest free cell (obstacle cells, negative)."""
    occ = np.asarray(occupancy, dtype=bool)
    if not occ.any():
        return np.full(occ.shape, 1e3 * cell)
    outside = ndimage.distance_transform_edt(~occ) * cell
    inside = ndimage.distance_transform_edt(occ) * cell if (~occ).any() else np.full(
        occ.shape, 1e3 * cell)
    return outside - inside


def _rectangles(occ: np.ndarray, count: int, rng: np.random.Generator, spec: MapSpec) -> None:
    x, y = cell_centres(spec)
    lo, hi = spec.obstacle_size
    for _ in range(count):
        cx, cy = rng.uniform(-spec.extent + 0.5, spec.extent - 0.5, 2)
        hx, hy = rng.uniform(lo, hi, 2) / 2
        occ |= (np.abs(x - cx) < hx) & (np.abs(y - cy) < hy)


def _walls(occ: np.ndarray, count: int, rng: np.random.Generator, spec: MapSpec) -> None:
    """``count`` walls across the map (all vertical or all horizontal), 1-2 gaps each."""
    x, y = cell_centres(spec)
    along, across = (x, y) if rng.random() < 0.5 else (y, x)
    span = 0.5 * spec.extent
    positions = [rng.uniform(-span, span)] if count == 1 else [rng.uniform(-span, -0.2 * span),
                                                              rng.uniform(0.2 * span, span)]
    for pos in positions:
        wall = np.abs(along - pos) < spec.wall_thickness / 2
        for g in rng.uniform(-spec.extent + spec.gap, spec.extent - spec.gap, rng.integers(1, 3)):
            wall &= np.abs(across - g) >= spec.gap / 2
        occ |= wall


def make_map(kind: str, rng: np.random.Generator, spec: MapSpec) -> np.ndarray:
    """``(H, W)`` bool occupancy of ``kind``."""
    occ = np.zeros((spec.size, spec.size), dtype=bool)
    lo, hi = spec.obstacles
    if kind == "forest":
        _rectangles(occ, int(rng.integers(lo, hi + 1)), rng, spec)
    elif kind == "tarpit":
        _walls(occ, int(rng.integers(1, 3)), rng, spec)
        _rectangles(occ, int(rng.integers(0, 3)), rng, spec)
    elif kind == "mixed":
        _walls(occ, 1, rng, spec)
        _rectangles(occ, int(rng.integers(lo, hi + 1)) // 2, rng, spec)
    else:
        raise ValueError(f"unknown map kind {kind!r}; use one of forest, tarpit, mixed")
    return occ


def _segment_clearance(sdf: Tensor, a: np.ndarray, b: np.ndarray, spec: MapSpec) -> float:
    s = torch.linspace(0, 1, 200, dtype=torch.float64)[:, None]
    p = torch.as_tensor(a) + s * torch.as_tensor(b - a)
    d, _ = core.costs.sdf_lookup(sdf[None].double(), p[None], spec.origin, spec.cell)
    return float(d.min())


def start_goal(sdf: Tensor, rng: np.random.Generator, spec: MapSpec
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """A free start/goal pair at least ``min_distance`` apart whose segment collides (if any of
    ``_PAIR_DRAWS`` draws does; else the last valid pair; None: no free pair at all)."""
    free = torch.nonzero(sdf > spec.eps + 0.1).numpy()  # (row, col)
    if len(free) < 2:
        return None
    last = None
    for _ in range(_PAIR_DRAWS):
        i, j = rng.integers(0, len(free), 2)
        a = -spec.extent + (free[i][::-1] + 0.5) * spec.cell
        b = -spec.extent + (free[j][::-1] + 0.5) * spec.cell
        if np.linalg.norm(a - b) < spec.min_distance:
            continue
        last = (a, b)
        if _segment_clearance(sdf, a, b, spec) < spec.robot_radius:
            return a, b
    return last


def grid_path(sdf: Tensor, start: np.ndarray, goal: np.ndarray, spec: MapSpec) -> Tensor:
    """``(N, 4)``: the cheapest 8-connected grid path (``skimage.graph.route_through_array``)
    on the cost ``1 + 4 exp(-(d - eps) / 0.5)`` in free space and ``1e4`` within ``eps`` of an
    obstacle, resampled by arc length to the support states and lightly smoothed; velocities by
    central differences."""
    from skimage.graph import route_through_array

    d = sdf.double().numpy()
    cost = np.where(d < spec.eps, 1e4, 1 + 4 * np.exp(-(d - spec.eps) / 0.5))

    def cell(p: np.ndarray) -> tuple[int, int]:
        rc = np.floor((p[::-1] + spec.extent) / spec.cell).astype(int)
        return tuple(np.clip(rc, 0, spec.size - 1))  # type: ignore[return-value]

    rc, _ = route_through_array(cost, cell(start), cell(goal), fully_connected=True,
                                geometric=True)
    xy = -spec.extent + (np.asarray(rc, dtype=np.float64)[:, ::-1] + 0.5) * spec.cell
    xy = np.concatenate([start[None], xy[1:-1], goal[None]]) if len(xy) > 2 else np.stack(
        [start, goal])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
    s = np.linspace(0, arc[-1], spec.num_states)
    p = np.stack([np.interp(s, arc, xy[:, 0]), np.interp(s, arc, xy[:, 1])], 1)
    kernel = np.ones(5) / 5
    for axis in range(2):
        smooth = np.convolve(np.pad(p[:, axis], 2, mode="edge"), kernel, mode="valid")
        p[2:-2, axis] = smooth[2:-2]
    v = np.gradient(p, spec.dt, axis=0)
    return torch.as_tensor(np.concatenate([p, v], 1))


def refine(spec: MapSpec, init: Tensor, sdf: Tensor, start: Tensor, goal: Tensor,
           chunk: int = 128) -> Tensor:
    """``(B, N, 4)``: ``expert_iters`` LM iterations of the planner from ``init (B, N, 4)`` on
    maps ``sdf (B, H, W)`` (float64), in chunks of ``chunk`` maps."""
    objective = problem.make_objective(spec)
    lm = core.LevenbergMarquardt(max_iters=spec.expert_iters, solver="sparse", rel_tol=1e-8)
    out = []
    for b in range(0, init.shape[0], chunk):
        sl = slice(b, b + chunk)
        aux = problem.inputs(init[sl], sdf[sl], start[sl], goal[sl])
        states = aux.pop("states")
        out.append(lm.solve(objective.with_inputs(aux), {"states": states}).values["states"])
    return torch.cat(out)


def _candidates(spec: MapSpec, pending: list[int], rngs: list[np.random.Generator],
                maps: dict[int, tuple[str, np.ndarray]], kinds: list[str], attempt: int
                ) -> list[tuple[int, str, np.ndarray, Tensor, np.ndarray, np.ndarray]]:
    """One start/goal draw (and a new map every fourth attempt) per pending sample."""
    found = []
    for k in pending:
        if k not in maps or attempt % 4 == 3:
            maps[k] = (kinds[k], make_map(kinds[k], rngs[k], spec))
        occ = maps[k][1]
        sdf = torch.as_tensor(signed_distance(occ, spec.cell), dtype=torch.float32)
        pair = start_goal(sdf, rngs[k], spec)
        if pair is None:
            maps.pop(k)
            continue
        found.append((k, kinds[k], occ, sdf, *pair))
    return found


def make_samples(spec: MapSpec, seeds: Sequence[int]) -> list[Sample]:
    """One sample per seed (module docstring); the kinds cycle with the seed."""
    rngs = [np.random.default_rng(s) for s in seeds]
    kinds = [spec.kinds[s % len(spec.kinds)] for s in seeds]
    out: list[Sample | None] = [None] * len(seeds)
    maps: dict[int, tuple[str, np.ndarray]] = {}
    pending = list(range(len(seeds)))
    for attempt in range(_ROUNDS):
        found = _candidates(spec, pending, rngs, maps, kinds, attempt)
        if not found:
            continue
        sdf = torch.stack([f[3] for f in found]).double()
        start = torch.as_tensor(np.stack([f[4] for f in found]))
        goal = torch.as_tensor(np.stack([f[5] for f in found]))
        grid = torch.stack([grid_path(f[3], f[4], f[5], spec) for f in found])
        line = problem.straight_line(start, goal, spec)
        both = refine(spec, torch.cat([grid, line]), sdf.repeat(2, 1, 1), start.repeat(2, 1),
                      goal.repeat(2, 1))
        _keep(spec, found, both, sdf, start, goal, out)
        pending = [k for k in pending if out[k] is None]
        if not pending:
            return [s for s in out if s is not None]
    raise RuntimeError(f"motion_planning data: no collision-free expert for seeds "
                       f"{[seeds[k] for k in pending]} after {_ROUNDS} attempts; the maps are too "
                       "crowded for these settings (fewer obstacles, a wider gap)")


def _keep(spec: MapSpec, found: list, both: Tensor, sdf: Tensor, start: Tensor, goal: Tensor,
          out: list[Sample | None]) -> None:
    """Store, per candidate, the collision-free refined plan of lower planner cost."""
    C = len(found)
    objective = problem.make_objective(spec)
    aux = problem.inputs(both, sdf.repeat(2, 1, 1), start.repeat(2, 1), goal.repeat(2, 1))
    aux.pop("states")
    cost = objective.with_inputs(aux).cost({"states": both})
    ok = problem.success(both, sdf.repeat(2, 1, 1), start.repeat(2, 1), goal.repeat(2, 1), spec)
    cost = torch.where(ok, cost, torch.full_like(cost, float("inf")))
    for c, (k, kind, occ, sdf_k, a, b) in enumerate(found):
        pick = c if cost[c] <= cost[C + c] else C + c
        if bool(ok[pick]):
            out[k] = Sample(torch.as_tensor(occ), sdf_k, torch.as_tensor(a), torch.as_tensor(b),
                            both[pick].clone(), kind)


def make_dataset(spec: MapSpec, seeds: Sequence[int], cache_dir: str | Path | None = None
                 ) -> list[Sample]:
    """Samples for ``seeds``, read from / written to ``cache_dir`` when given."""
    key = {"spec": asdict(spec), "seeds": list(seeds), "version": 1}
    return cached(cache_dir, "motion_planning", key, lambda: make_samples(spec, seeds),
                  Sample.as_dict, Sample.from_dict)
