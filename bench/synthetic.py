"""Seeded synthetic problems for the benchmark: SE(3) pose graphs (batched) and BAL scenes.

Pose graphs (:func:`pose_graph_batch`): the ground truth is a helix of ``ring`` poses per turn
(1 m steps, 1 m between turns), so every pose after the first turn lies right above the pose
``ring`` steps before it. Edges: odometry ``(k, k + 1)`` and loop closures ``(k - ring, k)``, each
kept with probability ``loop_prob``. Measurements are ``Z = T_i^-1 T_j Exp(eps)``, ``eps`` drawn
from ``N(0, diag(sigma_t^2 I, sigma_r^2 I))`` in the tangent (translation, rotation); the
information is the matching one. The initial estimate composes the noisy odometry from the first
true pose (as in sphere2500). The ``B`` problems of a batch share the structure (edges,
information) and differ by a random rigid motion of the whole scene and by their noise.

BAL scenes (:func:`bal_scene`): points in a unit-radius ball, cameras on a ring around it looking
at the centre, each point seen by 3-8 random cameras; BAL conventions
(``../shared/data/README.md``): ``P = R X + t``, ``p = -P[:2] / P[2]``,
``pred = f (1 + k1 |p|^2 + k2 |p|^4) p``. Observations are the true projections plus pixel noise;
the initial cameras and points are perturbed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from core.io import BALProblem, PoseGraph
from core.lie import se3, so3

_SE3_INFO_SCALE = (1.0, 1.0, 1.0, 0.5, 0.5, 0.5)  # g2o error (t, q_vec) vs tangent (t, phi)


@dataclass(frozen=True, eq=False)
class PoseGraphBatch:
    """``B`` SE(3) pose graphs with one structure.

    Attributes:
        i, j: ``(E,)`` int64 edge endpoints (``i < j``).
        measurements: ``(B, E, 7)`` relative poses ``Z ~ T_i^-1 T_j``.
        information: ``(E, 6, 6)`` information in g2o's convention (translation, quaternion
            vector), shared by the batch; its tangent form is ``S Omega S`` as for g2o files.
        init: ``(B, N, 7)`` initial estimates (composed noisy odometry).
        truth: ``(B, N, 7)`` ground truth, or None (a graph read from a file).
    """

    i: Tensor
    j: Tensor
    measurements: Tensor
    information: Tensor
    init: Tensor
    truth: Tensor | None = None

    @classmethod
    def from_graph(cls, graph: PoseGraph) -> PoseGraphBatch:
        """A batch of one from an SE(3) :class:`core.io.PoseGraph` (e.g. read from g2o)."""
        if graph.dim != 3:
            raise ValueError(f"PoseGraphBatch holds SE(3) graphs, got SE({graph.dim})")
        return cls(graph.i, graph.j, graph.measurements[None], graph.information, graph.poses[None])

    @property
    def batch(self) -> int:
        return int(self.init.shape[0])

    @property
    def num_poses(self) -> int:
        return int(self.init.shape[1])

    @property
    def num_edges(self) -> int:
        return int(self.i.shape[0])

    def graph(self, b: int) -> PoseGraph:
        """Problem ``b`` as a :class:`core.io.PoseGraph` (vertex ids ``0..N-1``)."""
        return PoseGraph(
            dim=3,
            poses=self.init[b].clone(),
            ids=torch.arange(self.num_poses),
            i=self.i.clone(),
            j=self.j.clone(),
            measurements=self.measurements[b].clone(),
            information=self.information.clone(),
        )

    def sqrt_information(self) -> Tensor:
        """``(E, 6, 6)`` upper-triangular ``U``, ``U^T U`` the tangent information."""
        s = self.information.new_tensor(_SE3_INFO_SCALE)
        tangent = self.information * s[:, None] * s[None, :]
        return torch.linalg.cholesky(tangent, upper=True)


def helix(num_poses: int, ring: int = 16, step: float = 1.0, rise: float = 1.0) -> Tensor:
    """``(N, 7)`` poses on a helix: ``ring`` poses per turn, x axis along the path, z up."""
    k = torch.arange(num_poses, dtype=torch.float64)
    yaw = 2 * math.pi * k / ring
    radius = step / (2 * math.sin(math.pi / ring))  # chord between neighbours = step
    t = torch.stack((radius * torch.cos(yaw), radius * torch.sin(yaw), rise * k / ring), dim=-1)
    heading = yaw + math.pi / 2 + math.pi / ring  # along the chord to the next pose
    phi = torch.zeros(num_poses, 3, dtype=torch.float64)
    phi[:, 2] = heading
    return torch.cat((t, so3.exp(phi)), dim=-1)


def compose_prefix(first: Tensor, steps: Tensor) -> Tensor:
    """``(B, 7)`` first pose and ``(B, N - 1, 7)`` steps -> ``(B, N, 7)`` poses
    ``T_0 = first, T_k+1 = T_k Z_k``, by a parallel prefix scan (log2 N vectorized rounds)."""
    poses = torch.cat((first[:, None], steps), dim=1)
    shift = 1
    while shift < poses.shape[1]:
        combined = se3.compose(poses[:, :-shift], poses[:, shift:])
        poses = torch.cat((poses[:, :shift], combined), dim=1)
        shift *= 2
    return se3.normalize(poses)


def helix_edges(
    num_poses: int, ring: int, loop_prob: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Odometry ``(k, k + 1)`` then loop closures ``(k - ring, k)``, each kept with
    probability ``loop_prob``; ``(E,)`` int64 each."""
    k = torch.arange(num_poses - 1)
    odo_i, odo_j = k, k + 1
    late = torch.arange(ring, num_poses)
    keep = torch.rand(late.shape[0], generator=generator, dtype=torch.float64) < loop_prob
    loop_j = late[keep]
    return torch.cat((odo_i, loop_j - ring)), torch.cat((odo_j, loop_j))


def pose_graph_batch(
    num_poses: int = 256,
    batch: int = 1,
    *,
    ring: int = 16,
    loop_prob: float = 0.5,
    sigma_t: float = 0.05,
    sigma_r: float = 0.01,
    seed: int = 0,
) -> PoseGraphBatch:
    """``batch`` independent helix pose graphs of ``num_poses`` poses; see the module docstring."""
    if num_poses < 2 or ring < 3 or batch < 1:
        raise ValueError(
            f"need num_poses >= 2, ring >= 3, batch >= 1; got {num_poses}, {ring}, {batch}"
        )
    if num_poses < ring:
        raise ValueError(f"num_poses ({num_poses}) must be at least ring ({ring}), the poses of "
                         "one helix turn (loop closures join poses one turn apart)")
    gen = torch.Generator().manual_seed(seed)
    i, j = helix_edges(num_poses, ring, loop_prob, gen)
    scene = se3.random(batch, generator=gen, dtype=torch.float64)  # one rigid motion each
    truth = se3.compose(scene[:, None], helix(num_poses, ring)[None])
    exact = se3.compose(se3.inverse(truth[:, i]), truth[:, j])
    sigma = torch.tensor([sigma_t] * 3 + [sigma_r] * 3, dtype=torch.float64)
    eps = torch.randn(batch, i.shape[0], 6, generator=gen, dtype=torch.float64) * sigma
    measurements = se3.normalize(se3.compose(exact, se3.exp(eps)))
    scale = torch.tensor(_SE3_INFO_SCALE, dtype=torch.float64)
    info = torch.diag(1 / (sigma * scale) ** 2).expand(i.shape[0], 6, 6).clone()
    odometry = measurements[:, : num_poses - 1]  # edges (k, k + 1) come first, in order
    init = compose_prefix(truth[:, 0], odometry)
    return PoseGraphBatch(i, j, measurements, info, init, truth)


@dataclass(frozen=True, eq=False)
class BALScene:
    """A synthetic BAL problem (initial values inside ``problem``) and its ground truth."""

    problem: BALProblem
    true_cameras: Tensor
    true_points: Tensor


def bal_project(cameras: Tensor, points: Tensor) -> Tensor:
    """BAL projection ``(O, 9), (O, 3) -> (O, 2)`` (README convention)."""
    R = so3.to_matrix(so3.exp(cameras[:, :3]))
    P = (R @ points[:, :, None])[:, :, 0] + cameras[:, 3:6]
    p = -P[:, :2] / P[:, 2:3]
    r2 = (p * p).sum(-1, keepdim=True)
    f, k1, k2 = cameras[:, 6:7], cameras[:, 7:8], cameras[:, 8:9]
    return f * (1 + k1 * r2 + k2 * r2 * r2) * p


def bal_cost(problem: BALProblem) -> float:
    """``0.5 sum ||pred - observed||^2`` at the problem's values."""
    pred = bal_project(problem.cameras[problem.camera_index], problem.points[problem.point_index])
    return float(0.5 * ((pred - problem.observations) ** 2).sum())


def _look_at_cameras(centers: Tensor) -> Tensor:
    """``(C, 3)`` centres -> ``(C, 6)`` BAL (angle-axis, t) looking at the origin (-z forward)."""
    z = centers / centers.norm(dim=-1, keepdim=True)  # camera z axis points away from the scene
    up = torch.tensor([0.0, 0.0, 1.0], dtype=centers.dtype).expand_as(z)
    x = torch.linalg.cross(up, z)
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x)
    R = torch.stack((x, y, z), dim=-2)  # rows: camera axes in world, i.e. world -> camera
    t = -(R @ centers[:, :, None])[:, :, 0]
    return torch.cat((so3.log(so3.from_matrix(R)), t), dim=-1)


def bal_scene(
    num_cameras: int = 50,
    num_points: int = 8000,
    *,
    views: tuple[int, int] = (3, 8),
    pixel_noise: float = 1.0,
    rotation_noise: float = 0.02,
    translation_noise: float = 0.1,
    point_noise: float = 0.1,
    seed: int = 0,
) -> BALScene:
    """A seeded BAL scene; see the module docstring. ``views``: min and max cameras per point."""
    lo, hi = views
    if not 2 <= lo <= hi <= num_cameras:
        raise ValueError(f"views must satisfy 2 <= min <= max <= num_cameras, got {views}")
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    angle = 2 * math.pi * torch.arange(num_cameras, dtype=torch.float64) / num_cameras
    height = 1 + 0.5 * randn(num_cameras)
    centers = torch.stack((4 * torch.cos(angle), 4 * torch.sin(angle), height), dim=-1)
    intrinsics = torch.stack(
        (
            500 + 20 * randn(num_cameras),
            0.1 * (2 * rand(num_cameras) - 1),
            0.01 * (2 * rand(num_cameras) - 1),
        ),
        dim=-1,
    )
    cameras = torch.cat((_look_at_cameras(centers), intrinsics), dim=-1)
    direction = randn(num_points, 3)
    points = direction / direction.norm(dim=-1, keepdim=True) * rand(num_points, 1) ** (1 / 3)
    count = torch.randint(lo, hi + 1, (num_points,), generator=gen)
    order = rand(num_points, num_cameras).argsort(dim=-1)  # a random camera subset per point
    seen = torch.arange(num_cameras)[None] < count[:, None]
    point_index, slot = torch.nonzero(seen, as_tuple=True)
    camera_index = order[point_index, slot]
    obs = bal_project(cameras[camera_index], points[point_index])
    obs = obs + pixel_noise * randn(*obs.shape)
    noisy_cameras = cameras.clone()
    noisy_cameras[:, :3] = so3.log(
        so3.compose(so3.exp(cameras[:, :3]), so3.exp(rotation_noise * randn(num_cameras, 3)))
    )
    noisy_cameras[:, 3:6] += translation_noise * randn(num_cameras, 3)
    problem = BALProblem(
        noisy_cameras, points + point_noise * randn(num_points, 3), camera_index, point_index, obs
    )
    return BALScene(problem, cameras, points)
