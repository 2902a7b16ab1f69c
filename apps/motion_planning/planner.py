"""Plan on a user's map: check the query, build the SDF, solve (``plan``).

Bad input raises ``ValueError`` naming the value: an occupancy grid that is not a
``(size, size)`` bool array, a start or goal that is not a finite ``(2,)`` point, lies outside
the map, or lies within the robot radius of an obstacle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

import core
from apps.motion_planning import problem
from apps.motion_planning.data import signed_distance
from apps.motion_planning.spec import MapSpec


def check_map(occupancy: Any, spec: MapSpec) -> np.ndarray:
    """``occupancy`` as a ``(size, size)`` bool array, or ``ValueError`` naming its shape or
    dtype."""
    arr = occupancy.detach().cpu().numpy() if isinstance(occupancy, Tensor) else np.asarray(
        occupancy)
    if arr.dtype != np.bool_:
        raise ValueError(f"occupancy map must be a bool array (True = obstacle), got dtype "
                         f"{arr.dtype}")
    if arr.shape != (spec.size, spec.size):
        raise ValueError(f"occupancy map must have shape ({spec.size}, {spec.size}) (data.size), "
                         f"got {arr.shape}")
    return arr


def check_point(name: str, p: Any, sdf: Tensor, spec: MapSpec) -> Tensor:
    """``p`` as a float64 ``(2,)`` tensor inside the map and clear of obstacles by the robot
    radius, or ``ValueError`` naming it."""
    t = torch.as_tensor(p, dtype=torch.float64).cpu()
    if t.shape != (2,) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be a finite (x, y) point, got {t.tolist()}")
    if bool((t.abs() > spec.extent).any()):
        raise ValueError(f"{name} {t.tolist()} is outside the map [-{spec.extent}, "
                         f"{spec.extent}]^2")
    d, _ = core.costs.sdf_lookup(sdf.double()[None], t[None, None], spec.origin, spec.cell)
    if float(d) <= spec.robot_radius:
        where = "inside an obstacle" if float(d) <= 0 else "too close to an obstacle"
        raise ValueError(f"{name} {t.tolist()} is {where}: clearance {float(d):.3f} m, the "
                         f"robot radius is {spec.robot_radius} m")
    return t


@dataclass
class Plan:
    """A planned trajectory ``(N, 4)``, whether it succeeds, and the iterations taken."""

    states: Tensor
    success: bool
    iterations: int


def plan(occupancy: Any, start: Any, goal: Any, spec: MapSpec, init: Tensor | None = None,
         max_iters: int = 100) -> Plan:
    """Plan from ``start`` to ``goal`` on ``occupancy`` (``(size, size)`` bool over
    ``[-extent, extent]^2``) with the planner of ``spec``, from ``init (N, 4)`` (default: the
    straight line)."""
    occ = check_map(occupancy, spec)
    sdf = torch.as_tensor(signed_distance(occ, spec.cell))
    s, g = check_point("start", start, sdf, spec), check_point("goal", goal, sdf, spec)
    if init is None:
        init = problem.straight_line(s[None], g[None], spec)[0]
    if init.shape != (spec.num_states, 4):
        raise ValueError(f"init must be ({spec.num_states}, 4), got {tuple(init.shape)}")
    aux = problem.inputs(init[None].double(), sdf[None], s[None], g[None])
    states = aux.pop("states")
    lm = core.LevenbergMarquardt(max_iters=max_iters, solver="sparse")
    sol = lm.solve(problem.make_objective(spec).with_inputs(aux), {"states": states})
    x = sol.values["states"]
    ok = bool(problem.success(x, sdf[None], s[None], g[None], spec)[0])
    return Plan(x[0], ok, int(sol.info.iterations[0]))
