"""The same planner in joint space for the Franka Panda of ``pybullet_data``, checked in pybullet.

``python -m apps.motion_planning.arm [--scenes 20] [--seed 0] [--iters 100] [--viz out.png]``
plans on a fixed set of seeded scenes and prints one row per scene: whether the straight line in
joint space collides, whether pybullet confirms the plan collision-free, its smallest distance to
an obstacle, the iterations and the time.

The problem (GPMP2 for arms: Mukadam et al., IJRR 2018, sec. 6) over ``N`` states
``(q, dq) in R^14``: the GP prior in joint space (``core.costs.GPMotionPrior``); a collision
hinge ``max(0, eps + r_s - d(c_s(q)))`` per link sphere ``s`` and state, ``c_s`` its centre by
forward kinematics (``apps.motion_planning.kinematics``, built from the URDF with ``core.lie``),
``d`` the exact signed distance to the scene's spheres and boxes; a joint-limit hinge; priors on
the start and goal configurations. Jacobians of the collision hinge are forward-mode derivatives
of the kinematics (``torch.func.jvp``, one per joint). The links are covered by spheres fitted to
their collision meshes (``kinematics.sphere_cover``) plus one for the closed fingers.

Validation: every plan is interpolated linearly (``check_steps`` per segment), set in pybullet
(``resetJointState``) and ``getClosestPoints`` between the robot and every obstacle must stay
positive along the whole path.

A scene: two random configurations within the joint limits (shrunk by 10%) as start and goal;
an obstacle (sphere or box) placed on a link of the straight line's middle configuration (so
the straight line collides), and two more at random in front of the robot; start and goal must
clear every obstacle by ``2 safety`` in the sphere model.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import core
from apps.motion_planning import kinematics
from apps.motion_planning.kinematics import Chain

TIP = "panda_hand"
FINGERS = (0.0, 0.0, 0.09, 0.045)  # a sphere over the closed fingers, in the hand frame


def panda_urdf() -> Path:
    """``franka_panda/panda.urdf`` of ``pybullet_data`` (``pip install pybullet``)."""
    import pybullet_data

    return Path(pybullet_data.getDataPath()) / "franka_panda" / "panda.urdf"


@dataclass(frozen=True)
class ArmSpec:
    """The joint-space planner.

    Fields:
        num_states, total_time, qc: the GP prior's support states, duration and noise.
        safety: the collision hinge's margin beyond each link sphere (metres).
        collision_weight, limit_weight, boundary_weight: weights of the costs.
        limit_margin: the joint-limit hinge acts this far inside the limits (radians).
        iters: Levenberg-Marquardt iterations.
        check_steps: interpolated configurations per segment in the pybullet check.
    """

    num_states: int = 31
    total_time: float = 3.0
    qc: float = 1.0
    safety: float = 0.08
    collision_weight: float = 100.0
    limit_weight: float = 30.0
    boundary_weight: float = 100.0
    limit_margin: float = 0.02
    iters: int = 100
    check_steps: int = 10


@dataclass
class Scene:
    """Obstacles ``spheres (n, 4)`` (centre, radius) and ``boxes (m, 6)`` (centre, half
    extents; axis-aligned), and the start and goal configurations ``(7,)``."""

    spheres: Tensor
    boxes: Tensor
    start: Tensor
    goal: Tensor


class Arm:
    """The Panda's chain with its sphere cover (link index ``(S,)``, local spheres ``(S, 4)``)."""

    def __init__(self, urdf: str | Path | None = None) -> None:
        self.chain: Chain = kinematics.read_chain(urdf or panda_urdf(), TIP)
        index, spheres = kinematics.sphere_cover(self.chain)
        hand = self.chain.links.index(TIP)
        self.index = torch.cat([index, torch.tensor([hand])])
        self.spheres = torch.cat([spheres, torch.tensor([FINGERS], dtype=torch.float64)])

    def centres(self, q: Tensor) -> Tensor:
        """``(..., S, 3)`` sphere centres at ``q (..., 7)``."""
        return kinematics.sphere_centres(self.chain, q, self.index, self.spheres)


def scene_distance(p: Tensor, scene: Scene) -> Tensor:
    """``(...)`` signed distance from points ``p (..., 3)`` to the nearest obstacle."""
    out = []
    if len(scene.spheres):
        s = scene.spheres.to(p)
        out.append((p[..., None, :] - s[:, :3]).norm(dim=-1) - s[:, 3])
    if len(scene.boxes):
        b = scene.boxes.to(p)
        d = (p[..., None, :] - b[:, :3]).abs() - b[:, 3:]
        outside = d.clamp(min=0).norm(dim=-1)
        inside = d.max(-1).values.clamp(max=0)
        out.append(outside + inside)
    return torch.cat(out, -1).min(-1).values


def clearance(arm: Arm, q: Tensor, scene: Scene) -> Tensor:
    """``(..., S)`` each link sphere's signed distance to the scene at ``q (..., 7)``."""
    return scene_distance(arm.centres(q), scene) - arm.spheres[:, 3].to(q)


def _collision(arm: Arm, scene: Scene, eps: float):
    radii = arm.spheres[:, 3]

    def hinge(xs: list[Tensor], aux: list[Tensor], jacobians: bool):
        q = xs[0][..., :7]
        centres, dc = kinematics.sphere_jacobian(arm.chain, q, arm.index, arm.spheres)
        with torch.enable_grad():
            p = centres.detach().requires_grad_()
            d = scene_distance(p, scene)
            (grad,) = torch.autograd.grad(d.sum(), p)
        d = scene_distance(centres, scene) - radii.to(q)
        active = (eps - d > 0).to(q)
        r = (eps - d) * active
        if not jacobians:
            return r, None
        J = -(grad[..., None] * dc).sum(-2) * active[..., None]  # (B, E, S, 7)
        return r, [torch.cat([J, torch.zeros_like(J)], -1)]

    return hinge


def _limits(lo: Tensor, hi: Tensor):
    def limits(xs: list[Tensor], aux: list[Tensor], jacobians: bool):
        q = xs[0][..., :7]
        above, below = q - hi.to(q), lo.to(q) - q
        r = torch.relu(above) + torch.relu(below)
        if not jacobians:
            return r, None
        slope = (above > 0).to(q) - (below > 0).to(q)
        J = torch.diag_embed(slope)
        return r, [torch.cat([J, torch.zeros_like(J)], -1)]

    return limits


def objective(arm: Arm, scene: Scene, spec: ArmSpec) -> core.Objective:
    """The joint-space planning objective for ``scene`` (module docstring)."""
    n = spec.num_states
    states = core.Variable("states", core.Vector(14), count=n)
    lo, hi = arm.chain.limits()
    m = spec.limit_margin
    ends = torch.cat([torch.ones(7), torch.zeros(7)]).double() * spec.boundary_weight
    every = torch.arange(n)
    return core.Objective([
        core.costs.GPMotionPrior(states, spec.total_time / (n - 1), spec.qc, name="gp"),
        core.Cost(None, [states], index=[every], weight=spec.collision_weight, name="collision",
                  analytic=_collision(arm, scene, spec.safety), residual_dim=len(arm.index)),
        core.Cost(None, [states], index=[every], weight=spec.limit_weight, name="limits",
                  analytic=_limits(lo + m, hi - m), residual_dim=7),
        core.costs.Prior(states, torch.cat([scene.start, torch.zeros(7, dtype=torch.float64)]),
                         index=0, weight=ends, name="start"),
        core.costs.Prior(states, torch.cat([scene.goal, torch.zeros(7, dtype=torch.float64)]),
                         index=n - 1, weight=ends, name="goal"),
    ])


def straight_line(start: Tensor, goal: Tensor, spec: ArmSpec) -> Tensor:
    """``(N, 14)`` constant joint velocity from ``start`` to ``goal``."""
    s = torch.linspace(0, 1, spec.num_states, dtype=torch.float64)[:, None]
    return torch.cat([start + s * (goal - start),
                      ((goal - start) / spec.total_time).expand(spec.num_states, 7)], -1)


def dense(path: Tensor, steps: int) -> Tensor:
    """``((N - 1) steps + 1, 7)`` configurations interpolated linearly."""
    q = path[:, :7]
    a = torch.linspace(0, 1, steps + 1, dtype=q.dtype)[:-1, None]
    seg = q[:-1, None] + a * (q[1:, None] - q[:-1, None])
    return torch.cat([seg.flatten(0, 1), q[-1:]])


def make_scene(arm: Arm, seed: int, spec: ArmSpec, attempts: int = 200) -> Scene:
    """Scene ``seed`` (module docstring); ``RuntimeError`` if no valid one is drawn."""
    rng = np.random.default_rng(seed)
    lo, hi = arm.chain.limits()
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * 0.9
    for _ in range(attempts):
        start, goal = (mid + half * torch.as_tensor(rng.uniform(-1, 1, 7)) for _ in range(2))
        centres = arm.centres((start + goal) / 2)  # the straight line's middle
        k = int(rng.integers(len(arm.index) // 3, len(arm.index)))
        spheres, boxes = [], []
        for where in (centres[k], *(torch.as_tensor(rng.uniform([0.3, -0.5, 0.1],
                                                                [0.7, 0.5, 0.8]))
                                    for _ in range(2))):
            if rng.random() < 0.5:
                spheres.append([*where.tolist(), rng.uniform(0.06, 0.12)])
            else:
                boxes.append([*where.tolist(), *rng.uniform(0.04, 0.1, 3)])
        scene = Scene(torch.tensor(spheres, dtype=torch.float64).reshape(-1, 4),
                      torch.tensor(boxes, dtype=torch.float64).reshape(-1, 6), start, goal)
        ends = clearance(arm, torch.stack([start, goal]), scene)
        if bool((ends > 2 * spec.safety).all()):
            return scene
    raise RuntimeError(f"arm scene {seed}: no start/goal pair clear of the obstacles in "
                       f"{attempts} draws")


def plan(arm: Arm, scene: Scene, spec: ArmSpec) -> tuple[Tensor, int, float]:
    """``(N, 14)`` plan from the straight line, the iterations taken and the time (s)."""
    init = straight_line(scene.start, scene.goal, spec)[None]
    lm = core.LevenbergMarquardt(max_iters=spec.iters, solver="sparse", rel_tol=1e-4)
    t = time.perf_counter()
    sol = lm.solve(objective(arm, scene, spec), {"states": init})
    return sol.values["states"][0], int(sol.info.iterations[0]), time.perf_counter() - t


class Bullet:
    """A pybullet (DIRECT) world with the Panda and a scene's obstacles."""

    def __init__(self, arm: Arm, scene: Scene, urdf: Path | None = None) -> None:
        import pybullet as pb

        self.pb = pb
        self.cid = pb.connect(pb.DIRECT)
        self.robot = pb.loadURDF(str(urdf or panda_urdf()), useFixedBase=True,
                                 physicsClientId=self.cid)
        count = pb.getNumJoints(self.robot, physicsClientId=self.cid)
        self.joints = [j for j in range(count) if pb.getJointInfo(
            self.robot, j, physicsClientId=self.cid)[2] == pb.JOINT_REVOLUTE]
        self.bodies = []
        for s in scene.spheres.tolist():
            shape = pb.createCollisionShape(pb.GEOM_SPHERE, radius=s[3], physicsClientId=self.cid)
            self.bodies.append(self._body(shape, s[:3], (0.8, 0.2, 0.2, 1)))
        for b in scene.boxes.tolist():
            shape = pb.createCollisionShape(pb.GEOM_BOX, halfExtents=b[3:],
                                            physicsClientId=self.cid)
            self.bodies.append(self._body(shape, b[:3], (0.2, 0.3, 0.8, 1)))

    def _body(self, shape: int, at: list[float], rgba: tuple[float, ...]) -> int:
        pb = self.pb
        body = pb.createMultiBody(0, shape, basePosition=at, physicsClientId=self.cid)
        pb.changeVisualShape(body, -1, rgbaColor=rgba, physicsClientId=self.cid)
        return body

    def set(self, q: Tensor) -> None:
        for j, v in zip(self.joints, q.tolist()):
            self.pb.resetJointState(self.robot, j, v, physicsClientId=self.cid)

    def distance(self, q: Tensor, horizon: float = 1.0) -> float:
        """The smallest robot-obstacle distance at ``q`` (negative: penetration)."""
        self.set(q)
        best = horizon
        for body in self.bodies:
            for c in self.pb.getClosestPoints(self.robot, body, horizon, physicsClientId=self.cid):
                best = min(best, c[8])
        return best

    def close(self) -> None:
        self.pb.disconnect(physicsClientId=self.cid)


@dataclass
class Row:
    """One scene's result."""

    scene: int
    line_distance: float
    distance: float
    iterations: int
    time_s: float

    @property
    def success(self) -> bool:
        return self.distance > 0


def run_scene(arm: Arm, seed: int, spec: ArmSpec) -> tuple[Row, Scene, Tensor]:
    """Plan scene ``seed`` and check the plan (and the straight line) in pybullet."""
    scene = make_scene(arm, seed, spec)
    path, iterations, elapsed = plan(arm, scene, spec)
    world = Bullet(arm, scene)
    try:
        line = straight_line(scene.start, scene.goal, spec)
        d_line = min(world.distance(q) for q in dense(line, spec.check_steps))
        d_plan = min(world.distance(q) for q in dense(path, spec.check_steps))
    finally:
        world.close()
    return Row(seed, d_line, d_plan, iterations, elapsed), scene, path


def snapshots(arm: Arm, scene: Scene, path: Tensor, out: Path, count: int = 5) -> None:
    """``count`` pybullet renderings (TinyRenderer) along ``path``, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world = Bullet(arm, scene)
    pb = world.pb
    try:
        view = pb.computeViewMatrixFromYawPitchRoll([0.25, 0.0, 0.45], 1.7, 60, -15, 0, 2)
        proj = pb.computeProjectionMatrixFOV(50, 4 / 3, 0.05, 5)
        frames = []
        for k in np.linspace(0, len(path) - 1, count).round().astype(int):
            world.set(path[k, :7])
            img = pb.getCameraImage(320, 240, view, proj, renderer=pb.ER_TINY_RENDERER,
                                    physicsClientId=world.cid)[2]
            frames.append((k, np.reshape(img, (240, 320, 4))[..., :3]))
    finally:
        world.close()
    fig, axes = plt.subplots(1, count, figsize=(3.2 * count, 2.8))
    for ax, (k, img) in zip(np.atleast_1d(axes), frames):
        ax.imshow(img)
        ax.set_title(f"state {k}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring); prints the table, returns 0."""
    parser = argparse.ArgumentParser(prog="python -m apps.motion_planning.arm",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=20, help="number of seeded scenes")
    parser.add_argument("--seed", type=int, default=0, help="first scene's seed")
    parser.add_argument("--iters", type=int, default=ArmSpec.iters, help="LM iterations")
    parser.add_argument("--urdf", type=Path, default=None, help="the Panda's URDF")
    parser.add_argument("--viz", type=Path, default=None,
                        help="write snapshots of the first scene's plan to this PNG")
    args = parser.parse_args(argv)
    if args.scenes < 1 or args.iters < 1:
        parser.error(f"--scenes and --iters must be >= 1, got {args.scenes}, {args.iters}")
    torch.set_num_threads(1)
    try:
        arm = Arm(args.urdf)
    except ValueError as exc:
        parser.exit(1, f"python -m apps.motion_planning.arm: error: {exc}\n")
    spec = ArmSpec(iters=args.iters)
    print(f"{'scene':>5} {'line collides':>13} {'success':>7} {'min dist (m)':>12} "
          f"{'iterations':>10} {'time (s)':>8}")
    rows = []
    for seed in range(args.seed, args.seed + args.scenes):
        row, scene, path = run_scene(arm, seed, spec)
        rows.append(row)
        print(f"{row.scene:>5} {str(row.line_distance <= 0):>13} {str(row.success):>7} "
              f"{row.distance:>12.4f} {row.iterations:>10} {row.time_s:>8.2f}", flush=True)
        if args.viz is not None and len(rows) == 1:
            snapshots(arm, scene, path, args.viz)
    ok = sum(r.success for r in rows)
    print(f"success {ok}/{len(rows)} ({ok / len(rows):.0%}); straight line collides in "
          f"{sum(r.line_distance <= 0 for r in rows)}/{len(rows)}; mean iterations "
          f"{np.mean([r.iterations for r in rows]):.1f}, mean time "
          f"{np.mean([r.time_s for r in rows]):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
