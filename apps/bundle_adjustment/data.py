"""Seeded synthetic bundle-adjustment scenes with outlier observations and matcher features.

A scene has ``C`` BAL cameras (angle-axis ``R``, ``t``, ``f``, ``k1``, ``k2``; convention of
``../shared/data/README.md``: ``P = R X + t``, ``p = -P[:2] / P[2]``,
``pred = f (1 + k1 |p|^2 + k2 |p|^4) p``) and ``P`` points:

* ``"ring"``: cameras on a circle of radius ~``distance`` around a ball of points (radius
  ``volume``), looking at its centre (with a little jitter in height, radius and aim);
* ``"path"``: cameras 0.5 apart along a straight path at ``distance`` beside a box of points
  (half depth and height ``volume``), turned towards the middle of the box (converging views,
  as a camera filming an object while walking past it).

Each point is seen by a random subset of the cameras that see it (in front of the camera, inside
the ``image`` bounds): a track of ``track = (min, max)`` observations (~8). Observations are the
true projections plus ``pixel_noise`` Gaussian noise (pixels, per axis); exactly
``round(outlier_ratio * O)`` of them (20% by default) are outliers (wrong matches), displaced by
``outlier_px = (min, max)`` pixels (3 to 30: from mismatches a few pixels off, which no robust loss
can tell from the noise's tail, to tens of pixels). ``outliers="aliased"`` (default) models
matches on repeated structure: each image has its own outlier rate (mean ``outlier_ratio``, up to
``(rate_power + 1) outlier_ratio``: the worst images have a majority of wrong matches) and its
outliers share one displacement (the pattern's period in that image) up to ``alias_jitter``, so
they bias the camera consistently instead of averaging out, and in the worst images they outvote
the inliers: a fixed robust loss keeps the larger consistent group, right or wrong. ``"random"``
displaces a uniform random subset in independent directions (against which a robust loss alone
already does about as well as knowing the outliers). Initial values are the
truth perturbed (rotation, translation, point and focal noise; ``k1 = k2 = 0``), as an
incremental SfM front end leaves them.

Every observation carries the features a matcher gives (:data:`FEATURES`):

* ``desc_dist``: the descriptor distance of the match, ``0.3 exp(0.25 z1)``;
* ``ratio``: Lowe's ratio (best / second-best descriptor distance), ``sigmoid(-0.5 + 0.7 z2)``;
* ``log_scale``: the keypoint's scale (log2 of the octave size; carries no information);
* ``log_track``: the log of the point's track length (carries no information);

with ``z1, z2 ~ N(0, 1)`` for inliers and ``N(desc_separation, 1)``, ``N(ratio_separation, 1)``
for outliers. Their log-likelihood ratio (the best any function of them can do) ranks inliers
above outliers with ROC AUC ``Phi(sqrt(d1^2 + d2^2) / sqrt 2)``: 0.795 for the default separations
1.0 and 0.6 (:func:`feature_auc` measures it on data).

Scenes are generated per seed and cached (``torch.save``) under a folder keyed by the settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from apps.common import cached, roc_auc
from core.io import BALProblem
from core.lie import so3

FEATURES = ("desc_dist", "ratio", "log_scale", "log_track")
LAYOUTS = ("ring", "path")
OUTLIER_MODELS = ("aliased", "random")


@dataclass(frozen=True)
class SceneSpec:
    """How one family of synthetic scenes is generated (lengths in scene units, the point volume
    having radius / half-height 1; image quantities in pixels).

    Fields:
        layouts: camera layouts drawn in turn: ``"ring"``, ``"path"``.
        num_cameras: cameras per scene.
        num_points: points per scene.
        track: ``(min, max)`` observations per point (uniform; capped by the visible cameras).
        distance: distance from the cameras to the centre of the point volume (ring radius, or
            the path's offset from the points' mid-plane).
        volume: radius of the ball of points (ring), half depth and height of the box of
            points (path; its half length is the path's plus ``volume``).
        focal: mean focal length (pixels).
        image: ``(half width, half height)`` of the image (pixels around the principal point).
        pixel_noise: standard deviation of the inlier observation noise (pixels, per axis).
        outlier_ratio: fraction of the observations that are outliers.
        outliers: ``"aliased"`` (wrong matches on repeated structure: per-image rates and
            displacements) or ``"random"`` (independent; see :func:`_outliers`).
        outlier_px: ``(min, max)`` displacement of an outlier (pixels, uniform).
        alias_jitter: spread of the aliased outliers around their image's displacement (pixels).
        rate_power: ``k`` of the aliased outliers' per-image rates ``(k + 1) u^k``, ``u ~ U(0,
            1)`` (0: the same rate everywhere; 3: the worst images have 4x the mean rate).
        rotation_noise: initial camera rotation error (radians, per axis).
        translation_noise: initial camera translation error (per axis).
        point_noise: initial point error (per axis).
        focal_noise: initial relative focal error.
        desc_separation: outliers' shift of the descriptor distance's latent (inliers N(0, 1)).
        ratio_separation: outliers' shift of the ratio test's latent.
    """

    layouts: tuple[str, ...] = LAYOUTS
    num_cameras: int = 12
    num_points: int = 200
    track: tuple[int, int] = (6, 10)
    distance: float = 4.0
    volume: float = 2.0
    focal: float = 500.0
    image: tuple[float, float] = (400.0, 300.0)
    pixel_noise: float = 1.0
    outlier_ratio: float = 0.2
    outliers: str = "aliased"
    outlier_px: tuple[float, float] = (3.0, 30.0)
    alias_jitter: float = 3.0
    rate_power: float = 3.0
    rotation_noise: float = 0.01
    translation_noise: float = 0.05
    point_noise: float = 0.03
    focal_noise: float = 0.02
    desc_separation: float = 1.0
    ratio_separation: float = 0.6

    def __post_init__(self) -> None:
        bad = [t for t in self.layouts if t not in LAYOUTS]
        if bad or not self.layouts:
            raise ValueError(f"SceneSpec: unknown layouts {bad}; use some of {LAYOUTS}")
        lo, hi = self.track
        if not 2 <= lo <= hi <= self.num_cameras:
            raise ValueError(f"SceneSpec.track must satisfy 2 <= min <= max <= num_cameras "
                             f"({self.num_cameras}), got {self.track}")
        if self.num_points < 1:
            raise ValueError(f"SceneSpec.num_points must be >= 1, got {self.num_points}")
        if not 0 <= self.outlier_ratio < 1:
            raise ValueError(f"SceneSpec.outlier_ratio must be in [0, 1), got {self.outlier_ratio}")
        if self.outliers not in OUTLIER_MODELS:
            raise ValueError(f"SceneSpec.outliers must be one of {OUTLIER_MODELS}, got "
                             f"{self.outliers!r}")
        if not self.rate_power >= 0:
            raise ValueError(f"SceneSpec.rate_power must be >= 0, got {self.rate_power}")
        if not 0 <= self.outlier_px[0] <= self.outlier_px[1]:
            raise ValueError(f"SceneSpec.outlier_px must be 0 <= min <= max, got {self.outlier_px}")
        for name in ("distance", "focal", "pixel_noise"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SceneSpec.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.volume < self.distance:
            raise ValueError(f"SceneSpec.volume must be in (0, distance = {self.distance}), got "
                             f"{self.volume}")


@dataclass(frozen=True, eq=False)
class Scene:
    """One synthetic BA problem with its ground truth, outlier labels and features.

    Attributes:
        problem: the observations and the initial values (BAL cameras ``(C, 9)``, points).
        true_cameras: ``(C, 9)`` ground-truth BAL cameras.
        true_points: ``(P, 3)`` ground-truth points.
        is_outlier: ``(O,)`` bool, True for outlier observations.
        features: ``(O, F)`` matcher features (:data:`FEATURES`).
        layout: the camera layout.
    """

    problem: BALProblem
    true_cameras: Tensor
    true_points: Tensor
    is_outlier: Tensor
    features: Tensor
    layout: str

    def __post_init__(self) -> None:
        p = self.problem
        checks = {
            "true_cameras": (tuple(self.true_cameras.shape), (p.num_cameras, 9)),
            "true_points": (tuple(self.true_points.shape), (p.num_points, 3)),
            "is_outlier": (tuple(self.is_outlier.shape), (p.num_observations,)),
            "features": (tuple(self.features.shape), (p.num_observations, len(FEATURES))),
        }
        for name, (got, want) in checks.items():
            if got != want:
                raise ValueError(f"Scene.{name} has shape {got}, expected {want}")
        if self.is_outlier.dtype != torch.bool:
            raise ValueError(f"Scene.is_outlier must be bool, got {self.is_outlier.dtype}")

    def as_dict(self) -> dict[str, object]:
        p = self.problem
        return {"cameras": p.cameras, "points": p.points, "camera_index": p.camera_index,
                "point_index": p.point_index, "observations": p.observations,
                "true_cameras": self.true_cameras, "true_points": self.true_points,
                "is_outlier": self.is_outlier, "features": self.features, "layout": self.layout}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Scene:
        problem = BALProblem(d["cameras"], d["points"], d["camera_index"], d["point_index"],
                             d["observations"])  # type: ignore[arg-type]
        return cls(problem, d["true_cameras"], d["true_points"], d["is_outlier"],
                   d["features"], str(d["layout"]))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------


def project(cameras: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """BAL projection of ``points (..., 3)`` by ``cameras (..., 9)`` (broadcast); returns the
    pixel coordinates ``(..., 2)`` and the camera-frame depth ``-P[2] (...)`` (> 0 in front)."""
    P = so3.act(so3.exp(cameras[..., :3]), points) + cameras[..., 3:6]
    p = -P[..., :2] / P[..., 2:3]
    r2 = (p * p).sum(-1, keepdim=True)
    f, k1, k2 = cameras[..., 6:7], cameras[..., 7:8], cameras[..., 8:9]
    return f * (1 + k1 * r2 + k2 * r2 * r2) * p, -P[..., 2]


def look_at(centers: Tensor, targets: Tensor) -> Tensor:
    """``(C, 3)`` camera centres and the points they aim at -> ``(C, 6)`` BAL (angle-axis, t):
    world-to-camera, the camera looking down its ``-z`` axis, its ``x`` axis horizontal."""
    z = centers - targets
    z = z / z.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=centers.dtype).expand_as(z)
    x = torch.linalg.cross(up, z)
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x)
    R = torch.stack((x, y, z), dim=-2)  # rows: the camera axes in world coordinates
    t = -(R @ centers[..., None])[..., 0]
    return torch.cat((so3.log(so3.from_matrix(R)), t), dim=-1)


def camera_centers(cameras: Tensor) -> Tensor:
    """``(..., C, 9)`` BAL cameras -> ``(..., C, 3)`` centres ``-R^T t``."""
    return -so3.act(so3.inverse(so3.exp(cameras[..., :3])), cameras[..., 3:6])


def _layout(kind: str, spec: SceneSpec, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Camera centres ``(C, 3)``, aim points ``(C, 3)`` and the point volume's half extents
    ``(3,)`` of one layout."""
    c, d = spec.num_cameras, spec.distance
    opts = {"generator": gen, "dtype": torch.float64}
    if kind == "ring":
        angle = 2 * math.pi * (torch.arange(c, dtype=torch.float64)
                               + 0.3 * torch.rand(c, **opts)) / c
        radius = d * (1 + 0.05 * torch.randn(c, **opts))
        centers = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle),
                               0.5 * torch.randn(c, **opts)), -1)
        targets = 0.1 * torch.randn(c, 3, **opts)
        return centers, targets, torch.full((3,), spec.volume, dtype=torch.float64)
    if kind == "path":
        half = 0.25 * (c - 1)  # cameras 0.5 apart
        x = torch.linspace(-half, half, c, dtype=torch.float64)
        centers = torch.stack((x, -d + 0.1 * torch.randn(c, **opts),
                               0.2 * torch.randn(c, **opts)), -1)
        zero = torch.zeros(c, dtype=torch.float64)
        targets = torch.stack((0.4 * x + 0.2 * torch.randn(c, **opts), zero, zero), -1)
        v = spec.volume
        return centers, targets, torch.tensor([0.5 * half + v, v, v], dtype=torch.float64)
    raise ValueError(f"unknown layout {kind!r}; use one of {LAYOUTS}")


def _visible_points(cameras: Tensor, extent: Tensor, ball: bool, spec: SceneSpec,
                    gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``P`` points in the volume (a ball of radius ``extent[0]`` if ``ball``, else the box of
    half extents ``extent (3,)``) seen by at least ``track[0]`` cameras, and the visibility
    ``(P, C)``; points are drawn until enough qualify."""
    opts = {"generator": gen, "dtype": torch.float64}
    kept, seen = [], []
    count = 0
    for _ in range(100):
        draw = 2 * spec.num_points
        if ball:
            u = torch.randn(draw, 3, **opts)
            radius = extent[0] * torch.rand(draw, 1, **opts) ** (1 / 3)
            pts = u / u.norm(dim=-1, keepdim=True) * radius
        else:
            pts = (2 * torch.rand(draw, 3, **opts) - 1) * extent
        pix, depth = project(cameras[None], pts[:, None])
        bounds = torch.tensor(spec.image, dtype=torch.float64)
        vis = (depth > 0.1) & (pix.abs() < bounds).all(-1)
        ok = vis.sum(-1) >= spec.track[0]
        kept.append(pts[ok])
        seen.append(vis[ok])
        count += int(ok.sum())
        if count >= spec.num_points:
            break
    else:
        raise ValueError(f"SceneSpec: too few points are seen by {spec.track[0]} cameras; "
                         "widen the image or lower track")
    return torch.cat(kept)[: spec.num_points], torch.cat(seen)[: spec.num_points]


def _tracks(visible: Tensor, spec: SceneSpec, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random track per point among its visible cameras: ``(O,)`` camera and point indices,
    ordered by point."""
    num_points, num_cameras = visible.shape
    lo, hi = spec.track
    length = torch.randint(lo, hi + 1, (num_points,), generator=gen)
    length = torch.minimum(length, visible.sum(-1))
    key = torch.rand(num_points, num_cameras, generator=gen, dtype=torch.float64)
    key = torch.where(visible, key, 2.0)  # invisible cameras sort last
    order = key.argsort(dim=-1)
    chosen = torch.arange(num_cameras)[None] < length[:, None]
    point_index, slot = torch.nonzero(chosen, as_tuple=True)
    return order[point_index, slot], point_index


def _perturb(cameras: Tensor, points: Tensor, spec: SceneSpec, gen: torch.Generator
             ) -> tuple[Tensor, Tensor]:
    """Initial values: the truth with rotation, translation, focal and point noise, k1 = k2 = 0."""
    opts = {"generator": gen, "dtype": torch.float64}
    c = cameras.shape[0]
    init = cameras.clone()
    noise = so3.exp(spec.rotation_noise * torch.randn(c, 3, **opts))
    init[:, :3] = so3.log(so3.compose(so3.exp(cameras[:, :3]), noise))
    init[:, 3:6] += spec.translation_noise * torch.randn(c, 3, **opts)
    init[:, 6] *= 1 + spec.focal_noise * torch.randn(c, **opts)
    init[:, 7:] = 0
    return init, points + spec.point_noise * torch.randn(points.shape, **opts)


def _outliers(camera_index: Tensor, spec: SceneSpec, gen: torch.Generator
              ) -> tuple[Tensor, Tensor]:
    """Which observations are outliers ``(O,)`` and their displacements ``(O, 2)`` (pixels).

    ``"random"``: a uniform random subset, each displaced in its own random direction.
    ``"aliased"``: wrong matches on repeated structure: the outliers are drawn (without
    replacement) with probability proportional to their camera's rate ``(k + 1) u_c^k``
    (``u_c ~ U(0, 1)``, ``k = rate_power``; mean 1: some images are much worse than others), and
    the outliers of camera ``c`` share one displacement (the pattern's period in that image:
    random direction, length uniform in ``outlier_px``) up to ``alias_jitter`` pixels. Both draw
    exactly ``round(outlier_ratio * O)`` outliers.
    """
    opts = {"generator": gen, "dtype": torch.float64}
    num, num_cameras = camera_index.shape[0], int(camera_index.max()) + 1
    count = round(spec.outlier_ratio * num)
    lo, hi = spec.outlier_px
    if spec.outliers == "random":
        chosen = torch.randperm(num, generator=gen)[:count]
        angle = 2 * math.pi * torch.rand(num, **opts)
        size = lo + (hi - lo) * torch.rand(num, **opts)
        offset = size[:, None] * torch.stack((torch.cos(angle), torch.sin(angle)), -1)
    else:
        k = spec.rate_power
        rate = (k + 1) * torch.rand(num_cameras, **opts) ** k
        chosen = torch.multinomial(rate[camera_index] + 1e-12, count, generator=gen) if count \
            else torch.zeros(0, dtype=torch.long)
        angle = 2 * math.pi * torch.rand(num_cameras, **opts)
        size = lo + (hi - lo) * torch.rand(num_cameras, **opts)
        period = size[:, None] * torch.stack((torch.cos(angle), torch.sin(angle)), -1)
        offset = period[camera_index] + spec.alias_jitter * torch.randn(num, 2, **opts)
    is_outlier = torch.zeros(num, dtype=torch.bool)
    is_outlier[chosen] = True
    return is_outlier, offset


def matcher_features(is_outlier: Tensor, point_index: Tensor, spec: SceneSpec,
                     gen: torch.Generator) -> Tensor:
    """``(O, F)`` simulated matcher features (:data:`FEATURES`; see the module docstring)."""
    opts = {"generator": gen, "dtype": torch.float64}
    num = is_outlier.shape[0]
    out = is_outlier.double()
    z1 = torch.randn(num, **opts) + spec.desc_separation * out
    z2 = torch.randn(num, **opts) + spec.ratio_separation * out
    octave = torch.randint(0, 4, (num,), generator=gen).double()
    track = torch.bincount(point_index)[point_index].double()
    return torch.stack((0.3 * torch.exp(0.25 * z1), torch.sigmoid(-0.5 + 0.7 * z2),
                        octave + 0.1 * torch.randn(num, **opts), torch.log(track)), -1)


def make_scene(spec: SceneSpec, seed: int, layout: str | None = None) -> Scene:
    """One seeded scene (see the module docstring); ``layout`` defaults to
    ``spec.layouts[seed % len(spec.layouts)]``."""
    gen = torch.Generator().manual_seed(seed)
    layout = layout or spec.layouts[seed % len(spec.layouts)]
    opts = {"generator": gen, "dtype": torch.float64}
    centers, targets, extent = _layout(layout, spec, gen)
    c = spec.num_cameras
    intrinsics = torch.stack((spec.focal * (1 + 0.05 * torch.randn(c, **opts)),
                              0.1 * (2 * torch.rand(c, **opts) - 1),
                              0.01 * (2 * torch.rand(c, **opts) - 1)), -1)
    cameras = torch.cat((look_at(centers, targets), intrinsics), -1)
    points, visible = _visible_points(cameras, extent, layout == "ring", spec, gen)
    camera_index, point_index = _tracks(visible, spec, gen)
    truth, _ = project(cameras[camera_index], points[point_index])
    obs = truth + spec.pixel_noise * torch.randn(truth.shape, **opts)
    is_outlier, offset = _outliers(camera_index, spec, gen)
    obs = torch.where(is_outlier[:, None], truth + offset, obs)
    init_cameras, init_points = _perturb(cameras, points, spec, gen)
    features = matcher_features(is_outlier, point_index, spec, gen)
    problem = BALProblem(init_cameras, init_points, camera_index, point_index, obs)
    return Scene(problem, cameras, points, is_outlier, features, layout)


# ------------------------------------------------------------------------------------------
# feature quality
# ------------------------------------------------------------------------------------------


def inlier_log_likelihood_ratio(features: Tensor, spec: SceneSpec) -> Tensor:
    """``(O,)`` log p(features | inlier) - log p(features | outlier), from the generator's
    distributions: the best score the features alone allow."""
    z1 = torch.log(features[:, 0] / 0.3) / 0.25
    z2 = (torch.logit(features[:, 1]) + 0.5) / 0.7
    d1, d2 = spec.desc_separation, spec.ratio_separation
    return -0.5 * (z1 * z1 - (z1 - d1) ** 2) - 0.5 * (z2 * z2 - (z2 - d2) ** 2)


def feature_auc(scenes: Sequence[Scene], spec: SceneSpec) -> dict[str, float]:
    """ROC AUC (inliers positive) of each feature alone (oriented so that higher means inlier)
    and of the features' log-likelihood ratio, pooled over ``scenes``."""
    features = torch.cat([s.features for s in scenes])
    inlier = ~torch.cat([s.is_outlier for s in scenes])
    out = {}
    for k, name in enumerate(FEATURES):
        auc = roc_auc(features[:, k], inlier)
        out[name] = max(auc, 1 - auc)
    out["llr"] = roc_auc(inlier_log_likelihood_ratio(features, spec), inlier)
    return out


# ------------------------------------------------------------------------------------------
# data sets with a disk cache
# ------------------------------------------------------------------------------------------


def make_dataset(spec: SceneSpec, seeds: Sequence[int], cache_dir: str | Path | None = None
                 ) -> list[Scene]:
    """Scenes for ``seeds``, read from / written to ``cache_dir`` when given (one file per
    (settings, seeds) key; written atomically)."""
    key = {"spec": asdict(spec), "seeds": list(seeds), "version": 1}
    return cached(cache_dir, "bundle_adjustment", key,
                  lambda: [make_scene(spec, s) for s in seeds], Scene.as_dict, Scene.from_dict)
