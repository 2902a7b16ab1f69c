"""Pictures of bundle-adjustment solutions: point clouds and camera frustums, solved vs ground
truth, drawn with :mod:`apps.viewer`.

Solutions are first moved into the ground truth's frame by the similarity of the metrics
(``apps.bundle_adjustment.problem.aligned_reconstruction``). The layers (:func:`scene_layers`,
:func:`problem_layers`) go to a PNG (Open3D offscreen, or matplotlib if Open3D cannot render), to
an interactive window (``show=True``) or to PLY files (``apps.viewer.export``); the solve CLI's
``--export`` and ``--show`` use the same layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from apps.bundle_adjustment.data import Scene
from apps.bundle_adjustment.problem import aligned_reconstruction
from apps.viewer import Color, Geometry, Panel, draw
from core.lie import so3

TRUTH = (0.55, 0.55, 0.55)
SOLVED = (0.12, 0.35, 0.8)
BASELINE = (0.85, 0.35, 0.1)
FRONT = (0.45, -0.6, 0.66)
"""The 3D view's direction (scene -> camera), z up."""
ZOOM = 0.62


def frustums(cameras: Tensor, color: Color, depth: float,
             image: tuple[float, float] = (400.0, 300.0)) -> Geometry:
    """Wire frustums of BAL cameras ``(C, 9)``: apex at the centre, the image rectangle
    (``image`` half size in pixels, at the camera's focal length) ``depth`` units ahead."""
    cams = cameras.detach().cpu().double()
    R_wc = so3.to_matrix(so3.inverse(so3.exp(cams[:, :3])))  # camera -> world rotation
    centers = -(R_wc @ cams[:, 3:6, None])[..., 0]
    w, h = image
    f = cams[:, 6:7].abs().clamp_min(1e-6)
    sx, sy = w / f * depth, h / f * depth  # (C, 1)
    # BAL: the camera looks down -z; pixel u grows with -x/z, i.e. along +x
    corners = torch.stack([torch.cat([sx * a, sy * b, -depth * torch.ones_like(sx)], -1)
                           for a, b in ((1, 1), (-1, 1), (-1, -1), (1, -1))], 1)  # (C, 4, 3)
    corners = (R_wc[:, None] @ corners[..., None])[..., 0] + centers[:, None]
    pts = torch.cat([centers[:, None], corners], 1).reshape(-1, 3).numpy()
    base = 5 * np.arange(cams.shape[0])[:, None, None]
    local = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [1, 2], [2, 3], [3, 4], [4, 1]])
    return Geometry.lines(pts, (base + local[None]).reshape(-1, 2), color)


def cloud(points: Tensor, color: Color) -> Geometry:
    """Points ``(P, 3)`` as dots of one color."""
    return Geometry.cloud(points.detach().cpu().double().numpy(), color)


def scene_layers(cameras: Tensor, points: Tensor, color: Color, depth: float,
                 truth: tuple[Tensor, Tensor] | None = None) -> list[Geometry]:
    """BAL ``cameras (C, 9)`` as frustums ``depth`` deep and ``points (P, 3)``, in ``color``;
    with ``truth = (cameras, points)``, those first in gray (drawn under the solution)."""
    layers = [] if truth is None else [cloud(truth[1], TRUTH), frustums(truth[0], TRUTH, depth)]
    return layers + [cloud(points, color), frustums(cameras, color, depth)]


def frustum_depth(points: Tensor) -> float:
    """A fifth of the scene's size (the median distance of ``points (P, 3)`` to their median)."""
    pts = points.detach().cpu().double()
    if not len(pts):
        return 0.2
    extent = float((pts - pts.median(0).values).norm(dim=-1).median())
    return 0.2 * max(extent, 1e-6)


def problem_layers(cameras: Tensor, points: Tensor,
                   initial: tuple[Tensor, Tensor] | None = None) -> list[Geometry]:
    """A solved BAL file: its ``points (P, 3)`` and camera frustums (BAL ``cameras (C, 9)``,
    :func:`frustum_depth` deep), over the ``initial = (cameras, points)`` in gray when given."""
    return scene_layers(cameras, points, SOLVED, frustum_depth(points), truth=initial)


def _draw(path: str | Path, panels: list[Panel], legend: list[tuple[str, Color]], title: str,
          show: bool) -> None:
    draw(path, panels, legend, title, size=(800, 640), front=FRONT, zoom=ZOOM, show=show)


def draw_solution(path: str | Path, scene: Scene, solution: dict[str, Tensor],
                  baseline: dict[str, Tensor] | None = None, aim: float = 4.0, title: str = "",
                  weight: Tensor | None = None, *, baseline_name: str = "baseline (uniform "
                  "weights, fixed robust loss)", show: bool = False) -> None:
    """One scene: the learned layer's solution (and the ``baseline``'s, its panel titled
    ``baseline_name``), aligned to the ground
    truth, over the ground-truth points and frustums. ``weight (O,)``: the learned weights, used
    for the legend's mean inlier / outlier weight. With ``show``, each panel then opens in a
    window (``apps.viewer.show``)."""
    depth = 0.15 * aim
    truth = (scene.true_cameras, scene.true_points)
    cams, pts = aligned_reconstruction(solution, truth[0], aim)
    name = "learned weights"
    if weight is not None:
        w = weight.detach().cpu()
        out = scene.is_outlier.cpu()
        name += f" (mean weight inliers {float(w[~out].mean()):.2f}, outliers "
        name += f"{float(w[out].mean()):.2f})" if bool(out.any()) else "-)"
    panels = [(name, scene_layers(cams, pts, SOLVED, depth, truth=truth))]
    if baseline is not None:
        b_cams, b_pts = aligned_reconstruction(baseline, truth[0], aim)
        panels.append((baseline_name,
                       scene_layers(b_cams, b_pts, BASELINE, depth, truth=truth)))
    legend = [("ground truth", TRUTH), ("learned", SOLVED)]
    if baseline is not None:
        legend.append(("baseline", BASELINE))
    _draw(path, panels, legend, title, show)


def draw_problem(path: str | Path, cameras: Tensor, points: Tensor, title: str = "",
                 initial: tuple[Tensor, Tensor] | None = None, *, show: bool = False) -> None:
    """A solved BAL file (:func:`problem_layers`): its points and camera frustums (BAL cameras
    ``(C, 9)``), with the initial values in gray when given. With ``show``, the drawing then
    opens in a window (``apps.viewer.show``)."""
    legend = ([("initial", TRUTH)] if initial is not None else []) + [("solution", SOLVED)]
    _draw(path, [("solution", problem_layers(cameras, points, initial))], legend, title, show)


__all__ = ["cloud", "draw_problem", "draw_solution", "frustum_depth", "frustums",
           "problem_layers", "scene_layers"]
