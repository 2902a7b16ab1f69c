"""Planar pushing simulated in pybullet (DIRECT mode), with a tactile depth image per frame.

An episode: an object (a ``rectangle`` 0.236 x 0.158 m, a ``disc`` or an ``ellipse``; a prism of
height ``height``) rests on a plane with friction; a probe (a collision cylinder of radius
``probe_radius``, held by a fixed constraint whose target moves a little every physics substep)
starts a small gap off a random point of the object's boundary and pushes along a direction at an
angle ``alpha`` from the inward normal, turning by a constant rate. Per frame (``frame_dt``,
``substeps`` physics steps) we record:

* ``obj (T, 4)``, ``probe (T, 4)``: SE(2) poses ``(x, y, cos, sin)`` of the object and the probe
  (the probe's x axis is its push direction);
* ``contact (T,)``: the probe touches the object; ``point (T, 2)``: the contact point (mean of
  pybullet's contact points on the object, world frame; zeros without contact); ``normal (T, 2)``:
  the object's outward normal there; ``force (T,)``: the summed normal force (N);
* ``image (T, 32, 32)`` uint8: the tactile image. A depth camera inside the probe looks along the
  push direction from 5 cm behind the probe's centre (a pinhole whose field spans ``image_width``
  at the probe's front: image columns = the probe's lateral axis, rows = height; TinyRenderer
  dropped whole objects under an orthographic projection); a pixel showing the object at depth
  ``d`` past the probe's front tangent plane reads
  ``255 * clip((depth_range - d) / (2 depth_range), 0, 1)``; other pixels, and every pixel of a
  frame without contact, are 0 (a tactile sensor images only what presses on it).
  TinyRenderer, about 2 ms a frame.

Held-out episodes (the harness's held-out seeds) push at angles ``|alpha|`` in the band
``val_band``; training episodes at ``|alpha|`` in ``[0, max_angle]`` outside it (degrees, either
sign): the held-out push directions are never seen in training.

Episodes are generated per seed and cached (``apps.common.cached``) under a key of the settings.
pybullet is imported here only, lazily (the ``sim`` extra).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from apps.common import cached

SHAPES = ("rectangle", "disc", "ellipse")
_VERSION = 2


@dataclass(frozen=True)
class TactileSpec:
    """Simulation settings (lengths in metres, angles in degrees, times in seconds).

    Fields:
        shapes: object shapes drawn per episode (uniformly): ``rectangle``, ``disc``, ``ellipse``.
        rectangle: the rectangle's side lengths.
        disc_radius: the disc's radius.
        ellipse: the ellipse's semi-axes.
        height: the prism's height; mass: its mass (kg).
        frames: frames per episode.
        frame_dt: time between frames; substeps: physics steps per frame.
        speed: the probe's speed.
        probe_radius: the probe cylinder's radius.
        gap: ``(min, max)`` initial gap between probe and object.
        max_angle: the largest push angle from the inward normal.
        val_band: ``(lo, hi)``: held-out episodes push at angles in this band, training
            episodes at angles outside it.
        turn: maximum turn rate of the push direction (degrees per frame, either sign).
        friction_ground, friction_probe: Coulomb friction object-plane and probe-object.
        image_size: tactile image side (pixels).
        image_width: the tactile patch's side.
        depth_range: half the depth range the image encodes around the probe's front plane.
    """

    shapes: tuple[str, ...] = SHAPES
    rectangle: tuple[float, float] = (0.236, 0.158)
    disc_radius: float = 0.09
    ellipse: tuple[float, float] = (0.13, 0.085)
    height: float = 0.05
    mass: float = 0.5
    frames: int = 25
    frame_dt: float = 0.1
    substeps: int = 24
    speed: float = 0.04
    probe_radius: float = 0.01
    gap: tuple[float, float] = (0.001, 0.008)
    max_angle: float = 25.0
    val_band: tuple[float, float] = (8.0, 16.0)
    turn: float = 1.0
    friction_ground: float = 0.35
    friction_probe: float = 0.3
    image_size: int = 32
    image_width: float = 0.06
    depth_range: float = 0.01

    def __post_init__(self) -> None:
        for s in self.shapes:
            check_shape(s)
        if not self.shapes:
            raise ValueError("data.shapes must name at least one shape")
        if self.frames < 2 or self.substeps < 1 or self.image_size < 4:
            raise ValueError(f"need frames >= 2, substeps >= 1, image_size >= 4; got "
                             f"{self.frames}, {self.substeps}, {self.image_size}")
        positive = {"disc_radius": self.disc_radius, "height": self.height, "mass": self.mass,
                    "frame_dt": self.frame_dt, "speed": self.speed,
                    "probe_radius": self.probe_radius, "image_width": self.image_width,
                    "depth_range": self.depth_range, "rectangle": min(self.rectangle),
                    "ellipse": min(self.ellipse)}
        for name, v in positive.items():
            if not v > 0:
                raise ValueError(f"data.{name} must be > 0, got {v}")
        lo, hi = self.val_band
        if not 0 <= lo < hi <= self.max_angle < 90 or (lo == 0 and hi == self.max_angle):
            raise ValueError(f"data.val_band must be (lo, hi) with 0 <= lo < hi <= max_angle < "
                             f"90 leaving training angles, got {self.val_band}, max_angle "
                             f"{self.max_angle}")

    def size(self, shape: str) -> tuple[float, float]:
        """The shape's half sizes ``(a, b)``: half sides, radius twice, or semi-axes."""
        check_shape(shape)
        if shape == "rectangle":
            return self.rectangle[0] / 2, self.rectangle[1] / 2
        if shape == "disc":
            return self.disc_radius, self.disc_radius
        return self.ellipse[0], self.ellipse[1]


def check_shape(shape: str) -> None:
    """Raise ``ValueError`` naming ``shape`` unless it is one of :data:`SHAPES`."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; the shapes are {', '.join(SHAPES)}")


@dataclass(frozen=True)
class Episode:
    """One simulated push (see the module docstring for the fields' meaning).

    Attributes:
        obj, probe: ``(T, 4)`` float64 SE(2) poses. contact: ``(T,)`` bool.
        point, normal: ``(T, 2)`` float64. force: ``(T,)`` float64.
        image: ``(T, H, W)`` uint8. shape: the object's shape; size: its half sizes ``(a, b)``.
        alpha: the push angle from the inward normal (degrees, signed); seed: its seed.
    """

    obj: Tensor
    probe: Tensor
    contact: Tensor
    point: Tensor
    normal: Tensor
    force: Tensor
    image: Tensor
    shape: str
    size: tuple[float, float]
    alpha: float
    seed: int

    def __post_init__(self) -> None:
        check_shape(self.shape)
        t = self.obj.shape[0]
        want = {"obj": (t, 4), "probe": (t, 4), "contact": (t,), "point": (t, 2),
                "normal": (t, 2), "force": (t,)}
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"episode {self.seed}: {name} has shape {got}, expected {shape}")
        if self.image.ndim != 3 or self.image.shape[0] != t:
            raise ValueError(f"episode {self.seed}: image has shape {tuple(self.image.shape)}, "
                             f"expected ({t}, H, W)")

    @property
    def frames(self) -> int:
        return int(self.obj.shape[0])

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("obj", "probe", "contact", "point", "normal", "force",
                                           "image", "shape", "alpha", "seed")}
        return {**d, "size": list(self.size)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Episode:
        return cls(**{**d, "size": tuple(d["size"])})


# ------------------------------------------------------------------------------------------
# the simulation
# ------------------------------------------------------------------------------------------


def outline(shape: str, size: tuple[float, float], num: int = 64) -> np.ndarray:
    """``(M, 2)`` counter-clockwise boundary points of the shape in its own frame."""
    check_shape(shape)
    a, b = size
    if shape == "rectangle":
        return np.array([[a, b], [-a, b], [-a, -b], [a, -b]])
    t = np.linspace(0, 2 * math.pi, num, endpoint=False)
    return np.stack((a * np.cos(t), b * np.sin(t)), -1)


def _prism(sim: Any, shape: str, size: tuple[float, float], height: float) -> tuple[int, int]:
    """Collision and visual shapes of the object (a box, a cylinder or a 64-gon prism)."""
    a, b = size
    if shape == "rectangle":
        half = [a, b, height / 2]
        return (sim.createCollisionShape(sim.GEOM_BOX, halfExtents=half),
                sim.createVisualShape(sim.GEOM_BOX, halfExtents=half))
    if shape == "disc":
        return (sim.createCollisionShape(sim.GEOM_CYLINDER, radius=a, height=height),
                sim.createVisualShape(sim.GEOM_CYLINDER, radius=a, length=height))
    ring = outline(shape, size)
    m = len(ring)
    verts = [[x, y, z] for z in (-height / 2, height / 2) for x, y in ring]
    faces: list[int] = []
    for k in range(1, m - 1):  # bottom (clockwise seen from above) and top fans
        faces += [0, k + 1, k, m, m + k, m + k + 1]
    for k in range(m):
        n = (k + 1) % m
        faces += [k, n, m + n, k, m + n, m + k]
    return (sim.createCollisionShape(sim.GEOM_MESH, vertices=verts),
            sim.createVisualShape(sim.GEOM_MESH, vertices=verts, indices=faces))


@dataclass
class _World:
    sim: Any
    obj: int
    probe: int
    constraint: int
    spec: TactileSpec


def _world(spec: TactileSpec, shape: str, obj_pose: np.ndarray, probe_xy: np.ndarray,
           yaw: float) -> _World:
    """A fresh DIRECT-mode simulation with the object at ``obj_pose (x, y, yaw)`` and the probe
    at ``probe_xy`` heading ``yaw``."""
    import pybullet
    from pybullet_utils.bullet_client import BulletClient

    sim = BulletClient(connection_mode=pybullet.DIRECT)
    sim.setGravity(0, 0, -9.81)
    sim.setTimeStep(spec.frame_dt / spec.substeps)
    plane = sim.createMultiBody(0, sim.createCollisionShape(sim.GEOM_PLANE))
    col, vis = _prism(sim, shape, spec.size(shape), spec.height)
    obj = sim.createMultiBody(spec.mass, col, vis, basePosition=[*obj_pose[:2], spec.height / 2],
                              baseOrientation=sim.getQuaternionFromEuler([0, 0, obj_pose[2]]))
    cyl = sim.createCollisionShape(sim.GEOM_CYLINDER, radius=spec.probe_radius,
                                   height=spec.height * 1.5)
    z = spec.height * 0.75 + 0.004
    q = sim.getQuaternionFromEuler([0, 0, yaw])
    probe = sim.createMultiBody(0.2, cyl, -1, basePosition=[*probe_xy, z], baseOrientation=q)
    cons = sim.createConstraint(probe, -1, -1, -1, sim.JOINT_FIXED, [0, 0, 0], [0, 0, 0],
                                [*probe_xy, z], childFrameOrientation=q)
    sim.changeDynamics(obj, -1, lateralFriction=1.0, linearDamping=0.9, angularDamping=0.9,
                       collisionMargin=0.0)
    sim.changeDynamics(plane, -1, lateralFriction=spec.friction_ground)
    sim.changeDynamics(probe, -1, lateralFriction=spec.friction_probe)
    return _World(sim, obj, probe, cons, spec)


def _pose(w: _World, body: int) -> np.ndarray:
    """The body's planar pose ``(x, y, cos, sin)``."""
    pos, q = w.sim.getBasePositionAndOrientation(body)
    yaw = w.sim.getEulerFromQuaternion(q)[2]
    return np.array([pos[0], pos[1], math.cos(yaw), math.sin(yaw)])


def _contact(w: _World) -> tuple[bool, np.ndarray, np.ndarray, float]:
    """Contact flag, mean contact point on the object, its outward normal, total normal force."""
    points = w.sim.getContactPoints(w.probe, w.obj)
    points = [c for c in points if c[8] < 5e-4]
    if not points:
        return False, np.zeros(2), np.zeros(2), 0.0
    point = np.mean([c[6][:2] for c in points], 0)  # positionOnB: on the object
    normal = -np.mean([c[7][:2] for c in points], 0)  # contactNormalOnB points B -> A
    normal = normal / max(np.linalg.norm(normal), 1e-12)
    return True, point, normal, float(sum(c[9] for c in points))


def render(w: _World, probe: np.ndarray, touching: bool) -> np.ndarray:
    """The ``(H, W)`` uint8 tactile image of the probe at ``probe (x, y, cos, sin)``."""
    s = w.spec
    n = s.image_size
    if not touching:
        return np.zeros((n, n), np.uint8)
    back = 0.05  # the camera sits this far behind the probe's centre
    c, sn = probe[2], probe[3]
    z = s.height / 2
    eye = [probe[0] - back * c, probe[1] - back * sn, z]
    view = w.sim.computeViewMatrix(eye, [eye[0] + c, eye[1] + sn, z], [0, 0, 1])
    near = back + s.probe_radius - s.depth_range
    far = back + s.probe_radius + 2 * s.depth_range
    fov = 2 * math.degrees(math.atan(s.image_width / 2 / (back + s.probe_radius)))
    proj = w.sim.computeProjectionMatrixFOV(fov, 1.0, near, far)
    _, _, _, buf, seg = w.sim.getCameraImage(n, n, view, proj, renderer=w.sim.ER_TINY_RENDERER)
    buf = np.asarray(buf, np.float64).reshape(n, n)
    seg = np.asarray(seg).reshape(n, n)
    depth = far * near / (far - (far - near) * buf)  # the depth buffer made metric
    d = depth - back - s.probe_radius  # past the probe's front tangent plane
    h = np.clip((s.depth_range - d) / (2 * s.depth_range), 0, 1)
    h[seg != w.obj] = 0
    return np.round(h * 255).astype(np.uint8)


def boundary_point(shape: str, size: tuple[float, float], u: float) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """The boundary point at parameter ``u`` in [0, 1) and its outward unit normal, in the
    object's frame (rectangle: ``u`` runs over the perimeter, keeping 1.5 cm off the corners;
    disc and ellipse: the polar parameter)."""
    a, b = size
    if shape == "rectangle":
        sides = [(2 * b, np.array([1.0, 0.0])), (2 * a, np.array([0.0, 1.0])),
                 (2 * b, np.array([-1.0, 0.0])), (2 * a, np.array([0.0, -1.0]))]
        s = u * sum(length for length, _ in sides)
        for length, n in sides:
            if s < length:
                along = np.array([-n[1], n[0]])
                half = length / 2
                offset = np.clip(s - half, -(half - 0.015), half - 0.015)
                return n * (a if n[0] else b) + along * offset, n
            s -= length
    t = 2 * math.pi * u
    p = np.array([a * math.cos(t), b * math.sin(t)])
    n = np.array([b * math.cos(t), a * math.sin(t)])
    return p, n / np.linalg.norm(n)


def _rot(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def simulate(spec: TactileSpec, seed: int, held_out: bool, shape: str | None = None) -> Episode:
    """One episode (see the module docstring); ``shape`` defaults to a seeded draw."""
    rng = np.random.default_rng(seed)
    shape = shape or spec.shapes[int(rng.integers(len(spec.shapes)))]
    check_shape(shape)
    size = spec.size(shape)
    lo, hi = spec.val_band
    if held_out:
        angle = rng.uniform(lo, hi)
    else:  # uniform over [0, max_angle] minus the held-out band
        angle = rng.uniform(0, spec.max_angle - (hi - lo))
        angle = angle if angle < lo else angle + (hi - lo)
    alpha = float(angle * rng.choice([-1.0, 1.0]))
    yaw0 = float(rng.uniform(-math.pi, math.pi))
    obj0 = np.array([*rng.uniform(-0.1, 0.1, 2), yaw0])
    p, n = boundary_point(shape, size, float(rng.uniform()))
    p, n = _rot(p, yaw0) + obj0[:2], _rot(n, yaw0)
    direction = _rot(-n, math.radians(alpha))
    gap = float(rng.uniform(*spec.gap))
    start = p - direction * (spec.probe_radius + gap) / max(float(-n @ direction), 0.2)
    turn = math.radians(float(rng.uniform(-spec.turn, spec.turn)))
    heading = math.atan2(direction[1], direction[0])
    w = _world(spec, shape, obj0, start, heading)
    try:
        return _run(w, spec, shape, size, start, heading, turn, alpha, seed)
    finally:
        w.sim.disconnect()


def _run(w: _World, spec: TactileSpec, shape: str, size: tuple[float, float],
         start: np.ndarray, heading: float, turn: float, alpha: float, seed: int) -> Episode:
    """Step the simulation frame by frame, recording as :class:`Episode` says."""
    step = spec.speed * spec.frame_dt / spec.substeps
    z = spec.height * 0.75 + 0.004
    xy = start.copy()
    rec: dict[str, list[Any]] = {k: [] for k in ("obj", "probe", "contact", "point", "normal",
                                                 "force", "image")}
    for frame in range(spec.frames):
        if frame > 0:
            for _ in range(spec.substeps):
                heading += turn / spec.substeps
                xy = xy + step * np.array([math.cos(heading), math.sin(heading)])
                q = w.sim.getQuaternionFromEuler([0, 0, heading])
                w.sim.changeConstraint(w.constraint, [*xy, z], q, maxForce=200)
                w.sim.stepSimulation()
        probe = _pose(w, w.probe)
        touching, point, normal, force = _contact(w)
        for k, v in zip(rec, (_pose(w, w.obj), probe, touching, point, normal, force,
                              render(w, probe, touching))):
            rec[k].append(v)
    t = {k: torch.as_tensor(np.stack(v) if k != "contact" else np.array(v)) for k, v in
         rec.items()}
    return Episode(obj=t["obj"].double(), probe=t["probe"].double(), contact=t["contact"].bool(),
                   point=t["point"].double(), normal=t["normal"].double(),
                   force=t["force"].double(), image=t["image"], shape=shape, size=size,
                   alpha=alpha, seed=seed)


def render_at(spec: TactileSpec, shape: str, obj: Tensor, probe: Tensor) -> np.ndarray:
    """The tactile image of a new simulation with the object and probe placed at the recorded
    poses ``obj, probe (4,)`` (no physics step): the recorded image when the poses are right."""
    o, p = obj.numpy(), probe.numpy()
    w = _world(spec, shape, np.array([o[0], o[1], math.atan2(o[3], o[2])]), p[:2],
               math.atan2(p[3], p[2]))
    try:
        w.sim.performCollisionDetection()
        touching = _contact(w)[0]
        return render(w, p, touching)
    finally:
        w.sim.disconnect()


# ------------------------------------------------------------------------------------------
# data sets with a disk cache
# ------------------------------------------------------------------------------------------


def cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    """The file ``apps.common.cached`` uses for ``key`` (to name it in errors)."""
    digest = hashlib.sha1(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"tactile_{digest}.pt"


def make_dataset(spec: TactileSpec, seeds: Sequence[int], held_out: Sequence[bool],
                 cache_dir: str | Path | None = None) -> list[Episode]:
    """Episodes for ``seeds`` (``held_out[k]``: draw the push angle from the held-out bands),
    read from / written to ``cache_dir`` when given (atomically). A cache file that cannot be
    read raises ``ValueError`` naming it."""
    key = {"spec": asdict(spec), "seeds": list(seeds), "held_out": list(held_out),
           "version": _VERSION}

    def make() -> list[Episode]:
        return [simulate(spec, s, h) for s, h in zip(seeds, held_out)]

    try:
        return cached(cache_dir, "tactile", key, make, Episode.as_dict, Episode.from_dict)
    except Exception as exc:
        if cache_dir is None or not cache_path(cache_dir, key).is_file():
            raise
        raise ValueError(f"{cache_path(cache_dir, key)}: corrupt tactile cache file "
                         f"({type(exc).__name__}: {exc}); delete it to regenerate") from exc
