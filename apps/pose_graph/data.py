"""Seeded synthetic pose graphs with outlier loop closures, and their front-end features.

A sample is a ground-truth trajectory (``"grid"``: a Manhattan walk on a cube lattice, a square one
for SE2; ``"sphere"``: rings of latitude as in sphere2500, concentric circles for SE2;
``"random"``: a smooth random walk in a box), noisy odometry ``(k, k + 1)``, inlier loop closures
between poses that are truly close (``|t_i - t_j| < loop_radius``, ``j - i >= min_gap``), and
outlier loop closures making up a fraction ``outlier_ratio`` of all loop closures. Outliers come
in groups of ``outlier_group`` consecutive pairs ``(i + k, j + k)`` that agree with each other
(perceptual aliasing of a stretch of the path; Suenderhauf & Protzel's "grouped" outliers), of
three kinds drawn with probabilities ``outlier_mix``:

* ``gross``: a wrong place: a random pair with a random plausible relative pose (translation in
  the ``loop_radius`` ball, any yaw);
* ``offset``: a truly close pair registered with an error of ``offset`` metres and up to
  ``offset_yaw`` radians;
* ``odometry``: a truly close pair whose registration converged to the odometry's guess
  ``T0_i^-1 T0_j`` (ICP seeded by odometry in a self-similar place): it confirms the drift instead
  of correcting it, and looks geometrically perfect.

Every loop closure carries the information of the inliers' noise model. The initial estimate
``T0`` composes the odometry from the first true pose, so anchoring the first pose aligns
estimate and truth.

Each loop closure has features a front end would give (:data:`FEATURES`):

* ``score``: a simulated place-recognition score (its logit), ``N(score_separation, 1)`` for
  inliers and ``N(0, 1)`` for outliers: alone it ranks inliers above outliers with ROC AUC
  ``Phi(score_separation / sqrt 2)`` (0.8 for the default 1.19);
* geometry of the measurement ``Z`` against the initial estimate's prediction
  ``P = T0_i^-1 T0_j``: ``e = Log(Z^-1 P)``, ``log |e_t|`` (in units of the median odometry
  step), ``log |e_r|`` and ``log |U e|``, the residual whitened by the loop closure's claimed
  information (scale-free: the same units in every graph); the odometry path length
  ``log(j - i)`` (the drift to expect grows with it); and the measured distance ``|t_Z|``.
  :func:`edge_features` computes them against any estimate: the learned layer of
  ``apps.pose_graph.train`` recomputes them against its GNC warm start.

Samples are generated per seed and cached (``torch.save``) in a cache folder under a key of the
generator's settings, so a second (or resumed) run reads them back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

import core
from apps.common import cached
from core.io import PoseGraph
from core.lie import se2, se3, so3

_ATTEMPTS = 20
FEATURES = ("score", "log_disc_t", "log_disc_r", "log_hops", "distance", "log_whitened")
TRAJECTORIES = ("grid", "sphere", "random")


@dataclass(frozen=True)
class GraphSpec:
    """How one family of synthetic graphs is generated (all lengths in metres, angles radians).

    Fields:
        dim: 3 (SE3) or 2 (SE2).
        trajectories: kinds drawn in turn: ``grid``, ``sphere``, ``random``.
        num_poses: ``(min, max)`` poses per graph (uniform).
        step: distance between consecutive poses.
        loops_per_pose: inlier loop closures per pose (capped by the candidates).
        loop_radius: inlier loop closures join poses closer than this.
        min_gap: loop closures join poses at least this many steps apart.
        outlier_ratio: fraction of all loop closures that are outliers.
        sigma_t, sigma_r: odometry noise (std per axis, translation and rotation).
        loop_sigma_t, loop_sigma_r: inlier loop-closure noise.
        score_separation: inlier score mean (outliers: 0, both unit variance).
        outlier_group: outliers come in groups of this many consistent ones.
        outlier_mix: probabilities of the outlier kinds ``(gross, offset, odometry)``.
        offset: ``(min, max)`` translation error of ``offset`` outliers.
        offset_yaw: maximum yaw error of ``offset`` outliers.
    """

    dim: int = 3
    trajectories: tuple[str, ...] = TRAJECTORIES
    num_poses: tuple[int, int] = (150, 250)
    step: float = 1.0
    loops_per_pose: float = 0.5
    loop_radius: float = 2.0
    min_gap: int = 10
    outlier_ratio: float = 0.25
    sigma_t: float = 0.05
    sigma_r: float = 0.03
    loop_sigma_t: float = 0.05
    loop_sigma_r: float = 0.01
    score_separation: float = 1.19
    outlier_group: int = 5
    outlier_mix: tuple[float, float, float] = (0.25, 0.25, 0.5)
    offset: tuple[float, float] = (0.5, 2.0)
    offset_yaw: float = 0.3

    def __post_init__(self) -> None:
        if self.dim not in (2, 3):
            raise ValueError(f"GraphSpec.dim must be 2 or 3, got {self.dim}")
        bad = [t for t in self.trajectories if t not in TRAJECTORIES]
        if bad or not self.trajectories:
            raise ValueError(f"unknown trajectories {bad}; use some of {TRAJECTORIES}")
        lo, hi = self.num_poses
        if not 2 * self.min_gap < lo <= hi:
            raise ValueError(f"num_poses must satisfy 2 * min_gap < min <= max, got {lo}, {hi}")
        if self.outlier_group < 1 or len(self.outlier_mix) != 3 or min(self.outlier_mix) < 0 \
                or sum(self.outlier_mix) <= 0:
            raise ValueError(f"need outlier_group >= 1 and 3 non-negative outlier_mix weights, got "
                             f"{self.outlier_group}, {self.outlier_mix}")
        if self.outlier_group > lo - self.min_gap:
            raise ValueError(f"outlier_group must be at most num_poses min - min_gap = "
                             f"{lo - self.min_gap}, got {self.outlier_group}")
        if not 0 <= self.outlier_ratio < 1:
            raise ValueError(f"outlier_ratio must be in [0, 1), got {self.outlier_ratio}")
        positive = ("step", "loop_radius", "sigma_t", "sigma_r", "loop_sigma_t", "loop_sigma_r")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"GraphSpec.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True, eq=False)
class Sample:
    """One synthetic pose graph with labels and features.

    Attributes:
        graph: the measurements and the initial estimate (odometry composed from ``truth[0]``);
            edges: the ``N - 1`` odometry edges ``(k, k + 1)`` first, then the loop closures.
        truth: ``(N, S)`` ground-truth poses.
        is_loop: ``(E,)`` bool, True for loop closures.
        is_outlier: ``(E,)`` bool, True for outlier loop closures.
        features: ``(L, F)`` front-end features of the ``L`` loop closures (:data:`FEATURES`).
        kind: the trajectory kind.
    """

    graph: PoseGraph
    truth: Tensor
    is_loop: Tensor
    is_outlier: Tensor
    features: Tensor
    kind: str

    def __post_init__(self) -> None:
        n, e = self.graph.num_poses, self.graph.num_edges
        loops = int(self.is_loop.sum())
        checks = {
            "truth": (tuple(self.truth.shape), tuple(self.graph.poses.shape)),
            "is_loop": (tuple(self.is_loop.shape), (e,)),
            "is_outlier": (tuple(self.is_outlier.shape), (e,)),
            "features": (tuple(self.features.shape), (loops, len(FEATURES))),
        }
        for name, (got, want) in checks.items():
            if got != want:
                raise ValueError(f"Sample.{name} has shape {got}, expected {want} (N={n}, E={e})")
        if bool((self.is_outlier & ~self.is_loop).any()):
            raise ValueError("Sample: an outlier edge is not a loop closure")

    @property
    def space(self) -> core.LieGroup:
        return core.SE3 if self.graph.dim == 3 else core.SE2

    @property
    def loop_outlier(self) -> Tensor:
        """``(L,)`` bool: which loop closures are outliers."""
        return self.is_outlier[self.is_loop]

    def as_dict(self) -> dict[str, object]:
        g = self.graph
        return {"dim": g.dim, "poses": g.poses, "i": g.i, "j": g.j, "measurements": g.measurements,
                "information": g.information, "truth": self.truth, "is_loop": self.is_loop,
                "is_outlier": self.is_outlier, "features": self.features, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Sample:
        poses = d["poses"]
        assert isinstance(poses, Tensor)
        graph = PoseGraph(dim=int(d["dim"]), poses=poses, ids=torch.arange(poses.shape[0]),
                          i=d["i"], j=d["j"], measurements=d["measurements"],
                          information=d["information"])  # type: ignore[arg-type]
        return cls(graph, d["truth"], d["is_loop"], d["is_outlier"], d["features"],
                   str(d["kind"]))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# trajectories: positions (N, 3) and yaw (N,)
# ------------------------------------------------------------------------------------------


def _grid_walk(n: int, dim: int, gen: torch.Generator, size: int = 6) -> tuple[Tensor, Tensor]:
    """A walk on the lattice ``{0..size}^dim`` (z = 0 for SE2): straight on, or turn with
    probability 0.3 (always at the boundary); vertical moves keep the yaw."""
    moves = [(1, 0, 0), (0, 1, 0), (-1, 0, 0), (0, -1, 0)]
    if dim == 3:
        moves += [(0, 0, 1), (0, 0, -1)]
    pos, heading, yaw = [0, 0, 0], 0, 0.0
    positions, yaws = [], []
    for _ in range(n):
        positions.append(list(pos))
        yaws.append(yaw)
        options = [m for m in range(len(moves))
                   if all(0 <= p + d <= size for p, d in zip(pos, moves[m]))]
        opposite = {0: 2, 1: 3, 2: 0, 3: 1, 4: 5, 5: 4}[heading]
        options = [m for m in options if m != opposite] or options
        turn = float(torch.rand((), generator=gen)) < 0.3
        if heading not in options or turn:
            heading = options[int(torch.randint(len(options), (), generator=gen))]
        pos = [p + d for p, d in zip(pos, moves[heading])]
        if heading < 4:
            yaw = heading * math.pi / 2
    return torch.tensor(positions, dtype=torch.float64), torch.tensor(yaws, dtype=torch.float64)


def _sphere(n: int, dim: int) -> tuple[Tensor, Tensor]:
    """Rings of latitude (``2 R`` poses per ring, ``R`` rings), unit spacing along the equator
    and between rings; SE2: concentric circles of the same spacing."""
    rings = max(2, round(math.sqrt(n / 2)))
    per_ring = 2 * rings
    radius = per_ring / (2 * math.pi)
    k = torch.arange(n, dtype=torch.float64)
    ring = torch.div(k, per_ring, rounding_mode="floor")
    lon = 2 * math.pi * (k % per_ring) / per_ring
    yaw = lon + math.pi / 2
    if dim == 2:
        r = radius * (1 + ring / rings)
        return torch.stack((r * torch.cos(lon), r * torch.sin(lon), 0 * lon), -1), yaw
    lat = -math.pi / 2 + math.pi * (ring + 0.5) / rings
    xyz = torch.stack((torch.cos(lat) * torch.cos(lon), torch.cos(lat) * torch.sin(lon),
                       torch.sin(lat)), -1)
    return radius * xyz, yaw


def _random_walk(n: int, dim: int, gen: torch.Generator, box: float = 6.0) -> tuple[Tensor, Tensor]:
    """Unit steps with a smoothly varying heading, steered back into a ``box``-sized region."""
    pos = torch.zeros(3, dtype=torch.float64)
    yaw, rate, climb = 0.0, 0.0, 0.0
    positions, yaws = [], []
    for _ in range(n):
        positions.append(pos.clone())
        yaws.append(yaw)
        rate = 0.9 * rate + 0.04 * float(torch.randn((), generator=gen, dtype=torch.float64))
        r = float(pos[:2].norm())
        if r > box:  # steer toward the centre
            to_centre = math.atan2(-float(pos[1]), -float(pos[0]))
            rate += 0.1 * math.remainder(to_centre - yaw, 2 * math.pi)
        yaw += rate
        if dim == 3:
            climb = 0.9 * climb + 0.05 * float(torch.randn((), generator=gen, dtype=torch.float64))
            climb -= 0.02 * float(pos[2])
        pos = pos + torch.tensor([math.cos(yaw), math.sin(yaw), climb], dtype=torch.float64)
    return torch.stack(positions), torch.tensor(yaws, dtype=torch.float64)


def trajectory(kind: str, n: int, dim: int, step: float, gen: torch.Generator) -> Tensor:
    """``(N, S)`` ground-truth poses of one kind, consecutive poses about ``step`` apart."""
    if kind == "grid":
        xyz, yaw = _grid_walk(n, dim, gen)
    elif kind == "sphere":
        xyz, yaw = _sphere(n, dim)
    elif kind == "random":
        xyz, yaw = _random_walk(n, dim, gen)
    else:
        raise ValueError(f"unknown trajectory {kind!r}; use one of {TRAJECTORIES}")
    xyz = step * xyz
    if dim == 2:
        return torch.stack((xyz[:, 0], xyz[:, 1], torch.cos(yaw), torch.sin(yaw)), -1)
    wobble = 0.05 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    wobble[:, 2] = 0
    heading = torch.zeros(n, 3, dtype=torch.float64)
    heading[:, 2] = yaw
    return torch.cat((xyz, so3.compose(so3.exp(heading), so3.exp(wobble))), -1)


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------


def _noise(num: int, dim: int, sigma_t: float, sigma_r: float, gen: torch.Generator) -> Tensor:
    """``(num, D)`` tangent noise ``N(0, diag(sigma_t^2 I, sigma_r^2 I))``."""
    sigma = _sigma(dim, sigma_t, sigma_r)
    return torch.randn(num, sigma.shape[0], generator=gen, dtype=torch.float64) * sigma


def _sigma(dim: int, sigma_t: float, sigma_r: float) -> Tensor:
    rot = 3 if dim == 3 else 1
    return torch.tensor([sigma_t] * dim + [sigma_r] * rot, dtype=torch.float64)


def _information(dim: int, sigma_t: float, sigma_r: float, num: int) -> Tensor:
    """``(num, D, D)`` information in g2o's convention (SE3: error (t, quaternion vector), whose
    rotation part is half the rotation vector, so its information is 4x the tangent one)."""
    sigma = _sigma(dim, sigma_t, sigma_r)
    if dim == 3:
        sigma = sigma * torch.tensor([1, 1, 1, 0.5, 0.5, 0.5], dtype=torch.float64)
    return torch.diag(sigma**-2).expand(num, -1, -1).clone()


def _random_relative(num: int, dim: int, radius: float, gen: torch.Generator) -> Tensor:
    """``(num, S)`` plausible but wrong relative poses: translation uniform in the ``radius``
    ball (disc for SE2), uniform yaw, roll/pitch ~ N(0, 0.05)."""
    opts = {"generator": gen, "dtype": torch.float64}
    direction = torch.randn(num, dim, **opts)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t = direction * radius * torch.rand(num, 1, **opts) ** (1 / dim)
    yaw = (2 * torch.rand(num, **opts) - 1) * math.pi
    if dim == 2:
        return torch.cat((t, torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]), -1)
    rot = 0.05 * torch.randn(num, 3, **opts)
    rot[:, 2] = 0
    heading = torch.zeros(num, 3, dtype=torch.float64)
    heading[:, 2] = yaw
    return torch.cat((t, so3.compose(so3.exp(heading), so3.exp(rot))), -1)


def _loop_pairs(truth: Tensor, spec: GraphSpec, gen: torch.Generator
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loop closures between truly close pairs: a random subset, at most one per later pose
    ``j``: ``(L_in,)`` int64 ``i, j`` (``i < j``) for the inliers, then the left-over
    candidates ``i, j`` (for near-miss outliers)."""
    n = truth.shape[0]
    xyz = truth[:, : spec.dim]
    dist = torch.cdist(xyz, xyz)
    k = torch.arange(n)
    ok = (dist < spec.loop_radius) & (k[None, :] - k[:, None] >= spec.min_gap)
    i, j = torch.nonzero(ok, as_tuple=True)
    if i.numel() == 0:
        return i, j, i, j
    order = torch.randperm(i.numel(), generator=gen)
    i, j = i[order], j[order]
    first = torch.full((n,), -1, dtype=torch.long)
    first[j.flip(0)] = torch.arange(j.numel() - 1, -1, -1)  # one candidate per j
    keep = first[first >= 0]
    keep = keep[torch.randperm(keep.numel(), generator=gen)]
    count = min(keep.numel(), max(1, round(spec.loops_per_pose * n)))
    used = torch.zeros(i.numel(), dtype=torch.bool)
    used[keep[:count]] = True
    keep = keep[:count].sort().values
    return i[keep], j[keep], i[~used], j[~used]


def _outlier_pairs(n: int, count: int, min_gap: int, gen: torch.Generator
                   ) -> tuple[Tensor, Tensor]:
    """``count`` random pairs ``i < j`` at least ``min_gap`` steps apart."""
    j = torch.randint(min_gap, n, (count,), generator=gen)
    i = (torch.rand(count, generator=gen, dtype=torch.float64) * (j - min_gap + 1)).long()
    return i, j


def _offset(num: int, spec: GraphSpec, gen: torch.Generator) -> Tensor:
    """``(num, S)`` near-miss errors: translation of length uniform in ``spec.offset`` (random
    direction), yaw uniform in ``+-spec.offset_yaw``."""
    opts = {"generator": gen, "dtype": torch.float64}
    direction = torch.randn(num, spec.dim, **opts)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    lo, hi = spec.offset
    t = direction * (lo + (hi - lo) * torch.rand(num, 1, **opts))
    yaw = (2 * torch.rand(num, **opts) - 1) * spec.offset_yaw
    if spec.dim == 2:
        return torch.cat((t, torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]), -1)
    heading = torch.zeros(num, 3, dtype=torch.float64)
    heading[:, 2] = yaw
    return torch.cat((t, so3.exp(heading)), -1)


def _outliers(truth: Tensor, init: Tensor, spare: tuple[Tensor, Tensor], count: int,
              spec: GraphSpec, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``count`` outlier loop closures ``i, j (count,)`` and their noise-free measurements
    ``(count, S)``, in groups of consistent ones (see the module docstring): a group of kind
    ``gross`` or ``offset`` aligns place ``j`` to place ``i`` by a wrong ``W``, so
    ``Z_k = T_(i+k)^-1 W T_(j+k)``; a group of kind ``odometry`` measures ``T0_(i+k)^-1 T0_(j+k)``.
    """
    space = core.SE3 if spec.dim == 3 else core.SE2
    n, group = truth.shape[0], spec.outlier_group
    events = -(-count // group)
    if events == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, truth[:0]
    mix = torch.tensor(spec.outlier_mix, dtype=torch.float64)
    kind = torch.multinomial(mix, events, replacement=True, generator=gen)  # 0 gross, 1, 2
    base_i, base_j = _outlier_pairs(n - group + 1, events, spec.min_gap, gen)
    if spare[0].numel():
        pick = torch.randint(spare[0].numel(), (events,), generator=gen)
        near_i, near_j = spare[0][pick].clamp_max(n - group), spare[1][pick].clamp_max(n - group)
        near = (kind > 0) & (near_j - near_i >= spec.min_gap)
        base_i, base_j = torch.where(near, near_i, base_i), torch.where(near, near_j, base_j)
    ti, tj = truth[base_i], truth[base_j]
    wrong = torch.where((kind == 0)[:, None],
                        _random_relative(events, spec.dim, spec.loop_radius, gen),
                        space.compose(space.compose(space.inverse(ti), tj),
                                      _offset(events, spec, gen)))
    align = space.compose(space.compose(ti, wrong), space.inverse(tj))  # W, (events, S)
    k = torch.arange(group)
    i = (base_i[:, None] + k).reshape(-1)[:count]
    j = (base_j[:, None] + k).reshape(-1)[:count]
    w = align.repeat_interleave(group, 0)[:count]
    z = space.compose(space.compose(space.inverse(truth[i]), w), truth[j])
    stuck = (kind == 2).repeat_interleave(group)[:count]
    guess = space.compose(space.inverse(init[i]), init[j])
    return i, j, torch.where(stuck[:, None], guess, z)


def make_sample(spec: GraphSpec, seed: int, kind: str | None = None) -> Sample:
    """One seeded sample (see the module docstring); ``kind`` defaults to
    ``spec.trajectories[seed % len(spec.trajectories)]``."""
    gen = torch.Generator().manual_seed(seed)
    kind = kind or spec.trajectories[seed % len(spec.trajectories)]
    space = core.SE3 if spec.dim == 3 else core.SE2
    lo, hi = spec.num_poses
    n = int(torch.randint(lo, hi + 1, (), generator=gen))
    for _ in range(_ATTEMPTS):  # a short random walk may never come back: draw another one
        truth = trajectory(kind, n, spec.dim, spec.step, gen)
        in_i, in_j, spare_i, spare_j = _loop_pairs(truth, spec, gen)
        if in_i.numel():
            break
    else:
        raise ValueError(f"no loop closures in {_ATTEMPTS} {kind!r} trajectories of {n} poses "
                         f"(loop_radius {spec.loop_radius}, min_gap {spec.min_gap})")

    def measure(i: Tensor, j: Tensor, sigma_t: float, sigma_r: float) -> Tensor:
        exact = space.compose(space.inverse(truth[i]), truth[j])
        eps = _noise(i.numel(), spec.dim, sigma_t, sigma_r, gen)
        return _normalize(space.compose(exact, space.exp(eps)), spec.dim)

    odo = torch.arange(n - 1)
    z_odo = measure(odo, odo + 1, spec.sigma_t, spec.sigma_r)
    init = compose_odometry(truth[0], z_odo, spec.dim)
    z_in = measure(in_i, in_j, spec.loop_sigma_t, spec.loop_sigma_r)
    num_out = round(spec.outlier_ratio / (1 - spec.outlier_ratio) * in_i.numel())
    out_i, out_j, z_out = _outliers(truth, init, (spare_i, spare_j), num_out, spec, gen)
    eps = _noise(num_out, spec.dim, spec.loop_sigma_t, spec.loop_sigma_r, gen)
    z_out = _normalize(space.compose(z_out, space.exp(eps)), spec.dim)
    i, j = torch.cat((odo, in_i, out_i)), torch.cat((odo + 1, in_j, out_j))
    num_loops = i.numel() - (n - 1)
    information = torch.cat((
        _information(spec.dim, spec.sigma_t, spec.sigma_r, n - 1),
        _information(spec.dim, spec.loop_sigma_t, spec.loop_sigma_r, num_loops),
    ))
    edge = torch.arange(i.numel())
    is_loop, is_outlier = edge >= n - 1, edge >= i.numel() - num_out
    graph = PoseGraph(dim=spec.dim, poses=init, ids=torch.arange(n), i=i, j=j,
                      measurements=torch.cat((z_odo, z_in, z_out)), information=information)
    score = torch.randn(num_loops, generator=gen, dtype=torch.float64)
    score = score + spec.score_separation * (~is_outlier[is_loop]).double()
    features = edge_features(graph, is_loop, score)
    return Sample(graph, truth, is_loop, is_outlier, features, kind)


def _normalize(x: Tensor, dim: int) -> Tensor:
    return se3.normalize(x) if dim == 3 else se2.normalize(x)


def compose_odometry(first: Tensor, steps: Tensor, dim: int) -> Tensor:
    """``(S,)`` first pose and ``(N - 1, S)`` steps -> ``(N, S)`` poses ``T_k+1 = T_k Z_k``
    (a parallel prefix scan: log2 N vectorized rounds)."""
    space = se3 if dim == 3 else se2
    poses = torch.cat((first[None], steps))
    shift = 1
    while shift < poses.shape[0]:
        poses = torch.cat((poses[:shift], space.compose(poses[:-shift], poses[shift:])))
        shift *= 2
    return _normalize(poses, dim)


def edge_features(graph: PoseGraph, is_loop: Tensor, score: Tensor) -> Tensor:
    """``(L, F)`` features of the loop closures (:data:`FEATURES`), from the measurement, the
    estimate ``graph.poses`` (the composed odometry, or a warm start) and the place-recognition
    ``score (L,)``. Lengths are in units of the median odometry step and the residual is also
    whitened by the claimed information, so graphs of other scales (g2o files) look alike."""
    space = core.SE3 if graph.dim == 3 else core.SE2
    i, j, z = graph.i[is_loop], graph.j[is_loop], graph.measurements[is_loop]
    if score.shape != i.shape:
        raise ValueError(f"score must have shape {tuple(i.shape)}, got {tuple(score.shape)}")
    d = graph.dim
    step = graph.measurements[~is_loop, :d].norm(dim=-1).median().clamp_min(1e-9)
    predicted = space.compose(space.inverse(graph.poses[i]), graph.poses[j])
    e = space.local(z, predicted)
    disc_t, disc_r = e[:, :d].norm(dim=-1) / step, e[:, d:].norm(dim=-1)
    hops = (j - i).abs().clamp_min(1).double()
    whitened = (graph.sqrt_information()[is_loop] @ e[..., None])[..., 0].norm(dim=-1)
    return torch.stack((score, torch.log(disc_t + 1e-3), torch.log(disc_r + 1e-4),
                        torch.log(hops), z[:, :d].norm(dim=-1) / step,
                        torch.log(whitened + 1e-3)), -1)


def from_graph(graph: PoseGraph, truth: Tensor, spec: GraphSpec, seed: int) -> Sample:
    """A real pose graph turned into a sample: its loop closures (edges other than ``(k, k+1)``)
    are the inliers, ``truth (N, S)`` (e.g. its clean optimum) the ground truth, and outlier loop
    closures are injected as :func:`make_sample` does (lengths scaled by the median odometry
    step; each claims the information of a random inlier), with simulated scores. The initial
    estimate composes the odometry from the graph's first pose, as in the synthetic data (a
    file's own poses may already be its optimum: intel.g2o's are, and against them every inlier
    loop closure agrees to 1e-3 of a step, the opposite of the synthetic graphs, where inliers
    disagree with the drifted odometry and the outliers that confirm it agree)."""
    n, space, d = graph.num_poses, (core.SE3 if graph.dim == 3 else core.SE2), graph.dim
    odo = graph.j == graph.i + 1
    if int(odo.sum()) != n - 1 or not torch.equal(graph.i[odo].sort().values, torch.arange(n - 1)):
        raise ValueError(f"graph needs exactly one odometry edge (k, k + 1) per k < {n - 1}")
    if truth.shape != graph.poses.shape or bool(odo.all()):
        raise ValueError(f"truth must have shape {tuple(graph.poses.shape)}, got "
                         f"{tuple(truth.shape)}, and the graph needs loop closures")
    gen = torch.Generator().manual_seed(seed)
    step = float(graph.measurements[odo, :d].norm(dim=-1).median())
    spec = replace(spec, dim=d, loop_radius=spec.loop_radius * step,
                   offset=(spec.offset[0] * step, spec.offset[1] * step))
    order = torch.argsort(graph.i[odo])
    li, lj, lz = graph.i[~odo], graph.j[~odo], graph.measurements[~odo]
    flip = li > lj  # loop closures as (earlier, later)
    li, lj = torch.where(flip, lj, li), torch.where(flip, li, lj)
    lz = torch.where(flip[:, None], space.inverse(lz), lz)
    linfo = graph.information[~odo]
    k = torch.arange(n)
    near = (torch.cdist(truth[:, :d], truth[:, :d]) < spec.loop_radius) & (
        k[None, :] - k[:, None] >= spec.min_gap)
    spare = torch.nonzero(near, as_tuple=True)
    num_out = round(spec.outlier_ratio / (1 - spec.outlier_ratio) * li.numel())
    init = compose_odometry(graph.poses[0], graph.measurements[odo][order], d)
    out_i, out_j, z_out = _outliers(truth, init, spare, num_out, spec, gen)
    claimed = linfo[torch.randint(li.numel(), (num_out,), generator=gen)]
    cov = torch.linalg.inv(_tangent_information(claimed, d))
    eps = (torch.linalg.cholesky(cov) @ torch.randn(num_out, cov.shape[-1], 1, generator=gen,
                                                     dtype=torch.float64))[..., 0]
    z_out = _normalize(space.compose(z_out, space.exp(eps)), d)
    i = torch.cat((graph.i[odo][order], li, out_i))
    j = torch.cat((graph.j[odo][order], lj, out_j))
    edge = torch.arange(i.numel())
    is_loop, is_outlier = edge >= n - 1, edge >= i.numel() - num_out
    new = PoseGraph(dim=d, poses=init, ids=graph.ids, i=i, j=j,
                    measurements=torch.cat((graph.measurements[odo][order], lz, z_out)),
                    information=torch.cat((graph.information[odo][order], linfo, claimed)))
    score = torch.randn(int(is_loop.sum()), generator=gen, dtype=torch.float64)
    score = score + spec.score_separation * (~is_outlier[is_loop]).double()
    return Sample(new, truth, is_loop, is_outlier, edge_features(new, is_loop, score), "g2o")


def _tangent_information(information: Tensor, dim: int) -> Tensor:
    """g2o's information ``(..., D, D)`` in tangent coordinates (see ``core.io.PoseGraph``)."""
    if dim == 2:
        return information
    s = information.new_tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    return information * s[:, None] * s[None, :]


# ------------------------------------------------------------------------------------------
# data sets with a disk cache
# ------------------------------------------------------------------------------------------


def make_dataset(spec: GraphSpec, seeds: Sequence[int], cache_dir: str | Path | None = None
                 ) -> list[Sample]:
    """Samples for ``seeds``, read from / written to ``cache_dir`` when given (one file per
    (settings, seeds) key; written atomically)."""
    key = {"spec": asdict(spec), "seeds": list(seeds), "version": 3}
    return cached(cache_dir, "pose_graph", key, lambda: [make_sample(spec, s) for s in seeds],
                  Sample.as_dict, Sample.from_dict)
