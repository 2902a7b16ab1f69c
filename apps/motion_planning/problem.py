"""The GPMP2-style planning problem (Mukadam et al., IJRR 2018) and its scores.

One trajectory is the variable ``"states"``: ``Vector(4)`` x ``N`` support states
``(x, y, vx, vy)``. The objective, built once and shared by every map of a batch, is

* ``"gp"``: the constant-velocity GP prior between consecutive states (``core.costs``);
* ``"collision"``: the hinge ``max(0, eps - d(p))`` on each state's position, ``d`` the map's SDF
  (``spec.sdf_interp``, the kink rounded over ``spec.hinge_smooth``; the layer input
  ``"collision.sdf"`` holds the batch's maps);
* ``"start"``, ``"goal"``: priors on the first and last positions (velocities are left free: the
  GP prior alone sets them; inputs ``"start.target"``, ``"goal.target"``).

A batch of ``B`` maps is one batched problem: the layer's inputs carry ``(B, ...)`` maps, starts,
goals and initial trajectories. Scores: a plan succeeds when its densely interpolated path (linear
between states, ``SUBSTEPS`` points per segment) stays inside the map with clearance above the
robot radius and its ends are within ``goal_tolerance`` of start and goal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import core
from apps.motion_planning.spec import MapSpec
from core.costs.motion import expand_sdf, sdf_lookup

SUBSTEPS = 10


def make_objective(spec: MapSpec, dtype: torch.dtype = torch.float64) -> core.Objective:
    """The planning objective for ``spec``'s maps (a zero SDF and zero targets as placeholders:
    :func:`inputs` gives the real ones)."""
    n = spec.num_states
    states = core.Variable("states", core.Vector(4), count=n)
    ends = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=dtype) * spec.boundary_weight
    zero = torch.zeros(4, dtype=dtype)
    return core.Objective([
        core.costs.GPMotionPrior(states, spec.dt, spec.qc, dtype=dtype, name="gp"),
        core.costs.CollisionHinge(states, torch.zeros(spec.size, spec.size, dtype=dtype),
                                  spec.origin, spec.cell, spec.eps,
                                  interp=spec.sdf_interp,  # type: ignore[arg-type]
                                  smooth=spec.hinge_smooth, weight=spec.collision_weight,
                                  name="collision"),
        core.costs.Prior(states, zero, index=0, weight=ends, name="start"),
        core.costs.Prior(states, zero, index=n - 1, weight=ends, name="goal"),
    ])


def inputs(init: Tensor, sdf: Tensor, start: Tensor, goal: Tensor) -> dict[str, Tensor]:
    """Layer inputs for a batch: ``init (B, N, 4)``, ``sdf (B, H, W)``, ``start``/``goal
    (B, 2)``."""
    B, N = init.shape[:2]
    pad = start.new_zeros(B, 2)
    return {"states": init, "collision.sdf": expand_sdf(sdf, N),
            "start.target": torch.cat([start, pad], -1)[:, None],
            "goal.target": torch.cat([goal, pad], -1)[:, None]}


def straight_line(start: Tensor, goal: Tensor, spec: MapSpec) -> Tensor:
    """``(B, N, 4)`` the constant-velocity line from ``start (B, 2)`` to ``goal (B, 2)``: the GP
    prior's own optimum, and the baseline's initialization."""
    return curve(start, goal, start.new_zeros(start.shape[0], 2, 0), spec)


def curve(start: Tensor, goal: Tensor, coeffs: Tensor, spec: MapSpec) -> Tensor:
    """``(B, N, 4)``: the line plus sine offsets ``p(s) = start + s (goal - start) +
    sum_k a_k sin(k pi s)``, ``s = t / T`` in ``[0, 1]``, ``coeffs (B, 2, K)`` the ``a_k``;
    velocities are ``dp/dt``."""
    N, K = spec.num_states, coeffs.shape[-1]
    s = torch.linspace(0, 1, N, dtype=start.dtype, device=start.device)
    k = torch.arange(1, K + 1, dtype=start.dtype, device=start.device) * math.pi
    sin, cos = torch.sin(s[:, None] * k), torch.cos(s[:, None] * k) * k  # (N, K)
    p = start[:, None] + s[None, :, None] * (goal - start)[:, None] + (sin @ coeffs.mT)
    v = ((goal - start)[:, None] + cos @ coeffs.mT) / spec.total_time
    return torch.cat([p, v], -1)


def dense_path(traj: Tensor, substeps: int = SUBSTEPS) -> Tensor:
    """``(B, (N - 1) substeps + 1, 2)`` positions interpolated linearly between states."""
    p = traj[..., :2]
    a = torch.linspace(0, 1, substeps + 1, dtype=p.dtype, device=p.device)[:-1]
    seg = p[:, :-1, None] + a[:, None] * (p[:, 1:, None] - p[:, :-1, None])
    return torch.cat([seg.flatten(1, 2), p[:, -1:]], 1)


def clearance(traj: Tensor, sdf: Tensor, spec: MapSpec) -> Tensor:
    """``(B,)`` the smallest signed distance along the dense path (``-inf`` where it leaves the
    map)."""
    path = dense_path(traj)
    d, _ = sdf_lookup(sdf.to(path.dtype), path, spec.origin, spec.cell)
    inside = (path.abs() <= spec.extent).all(-1).all(-1)
    return torch.where(inside, d.min(-1).values, torch.full_like(d[:, 0], -math.inf))


def success(traj: Tensor, sdf: Tensor, start: Tensor, goal: Tensor, spec: MapSpec) -> Tensor:
    """``(B,)`` bool: collision-free at the robot radius along the dense path, inside the map,
    and from the start to the goal (within ``goal_tolerance``)."""
    ends = ((traj[:, 0, :2] - start).norm(dim=-1) <= spec.goal_tolerance) & (
        (traj[:, -1, :2] - goal).norm(dim=-1) <= spec.goal_tolerance)
    return ends & (clearance(traj, sdf, spec) > spec.robot_radius)


def path_length(traj: Tensor) -> Tensor:
    """``(B,)`` the polyline length through the positions."""
    return (traj[:, 1:, :2] - traj[:, :-1, :2]).norm(dim=-1).sum(-1)


def gp_error(traj: Tensor, objective: core.Objective) -> Tensor:
    """``(B,)`` the GP prior's cost ``0.5 sum_k |U (x_k+1 - Phi x_k)|^2`` (smoothness error)."""
    gp = next(c for c in objective.costs if c.name == "gp")
    return gp.evaluate({"states": traj}, False).cost


@dataclass
class Scores:
    """Sums over held-out maps (summed across ranks), turned into metrics by :meth:`metrics`.

    ``ratio`` sums over successful plans only (a failed plan's length means nothing; the
    metric is 0 when no plan succeeds); ``initial`` counts initial trajectories that would
    already succeed; ``capped`` counts solves that reached the iteration cap before
    converging."""

    maps: float = 0.0
    success: float = 0.0
    iterations: float = 0.0
    ratio: float = 0.0
    gp_error: float = 0.0
    loss: float = 0.0
    initial: float = 0.0
    capped: float = 0.0

    def add(self, ok: Tensor, iterations: Tensor, length: Tensor, expert_length: Tensor,
            gp: Tensor, loss: Tensor, capped: Tensor | None = None) -> None:
        """Add a batch: ``ok (B,)`` successes, ``iterations (B,)`` to converge, path lengths,
        GP errors, losses, ``capped (B,)`` whether the iterations reached the cap."""
        self.maps += ok.numel()
        self.success += float(ok.sum())
        self.iterations += float(iterations.double().sum())
        self.ratio += float((length / expert_length)[ok].sum())
        self.gp_error += float(gp.sum())
        self.loss += float(loss.sum())
        self.capped += float(capped.sum()) if capped is not None else 0.0

    def metrics(self, suffix: str = "") -> dict[str, float]:
        n = max(self.maps, 1.0)
        return {
            f"failure_rate{suffix}": 1 - self.success / n,
            f"success_rate{suffix}": self.success / n,
            f"iterations{suffix}": self.iterations / n,
            f"path_length_ratio{suffix}": self.ratio / self.success if self.success else 0.0,
            f"gp_error{suffix}": self.gp_error / n,
            f"loss{suffix}": self.loss / n,
            f"success_rate_initial{suffix}": self.initial / n,
            f"iterations_capped{suffix}": self.capped / n,
        }
