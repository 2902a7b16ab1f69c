"""Pictures of pose graphs: trajectories and loop closures, drawn with :mod:`apps.viewer`.

The layers (:func:`graph_layers`, :func:`solution_layers`) go to a PNG (Open3D offscreen, or
matplotlib if Open3D cannot render), to an interactive window (``show=True``) or to PLY files
(``apps.viewer.export``); the solve CLI's ``--export`` and ``--show`` use the same layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from apps.viewer import Color, Geometry, Panel, draw

TRUTH = (0.6, 0.6, 0.6)
ESTIMATE = (0.12, 0.35, 0.75)
INLIER = (0.1, 0.65, 0.2)
OUTLIER = (0.9, 0.1, 0.1)
LOOP = (0.95, 0.55, 0.1)


def positions(poses: Tensor) -> np.ndarray:
    """Positions ``(N, 3)`` of SE3 ``(N, 7)`` or SE2 ``(N, 4)`` poses (z = 0)."""
    p = poses.detach().cpu().double().numpy()
    if p.shape[-1] == 4:
        return np.concatenate([p[:, :2], np.zeros((p.shape[0], 1))], axis=1)
    return p[:, :3].copy()


def path_lines(poses: Tensor, color: Color) -> Geometry:
    """The trajectory ``0 -> 1 -> ... -> N-1`` of poses ``(N, 4|7)``."""
    return Geometry.polyline(positions(poses), color)


def edge_lines(poses: Tensor, i: Tensor, j: Tensor, colors: Color | np.ndarray) -> Geometry:
    """Edges ``(i, j)`` (``(L,)`` each) drawn between the positions of poses ``(N, 4|7)``, in one
    color or ``colors (L, 3)``."""
    segments = np.stack([i.cpu().numpy(), j.cpu().numpy()], 1).astype(np.int64)
    return Geometry.lines(positions(poses), segments, colors)


def weight_colors(w: Tensor) -> np.ndarray:
    """``(L, 3)`` colors from red (weight 0) through yellow (0.5) to green (1)."""
    w = w.detach().cpu().double().clamp(0, 1).numpy()[:, None]
    red, yellow, green = np.array(OUTLIER), np.array([0.95, 0.8, 0.1]), np.array(INLIER)
    low = red + (yellow - red) * (2 * w)
    high = yellow + (green - yellow) * (2 * w - 1)
    return np.where(w < 0.5, low, high)


def label_colors(is_outlier: Tensor) -> np.ndarray:
    """``(L, 3)`` colors: red for an outlier, green for an inlier (``is_outlier (L,)``)."""
    out = is_outlier.detach().cpu().numpy()[:, None]
    return np.where(out, np.array(OUTLIER), np.array(INLIER))


def solution_layers(estimate: Tensor, truth: Tensor, i: Tensor, j: Tensor,
                    colors: Color | np.ndarray) -> list[Geometry]:
    """Ground-truth and estimated trajectories (poses ``(N, 4|7)``) and the loop closures
    ``(i, j) (L,)`` between the estimate's positions, colored by ``colors (L, 3)``."""
    return [path_lines(truth, TRUTH), path_lines(estimate, ESTIMATE),
            edge_lines(estimate, i, j, colors)]


def graph_layers(poses: Tensor, i: Tensor, j: Tensor) -> list[Geometry]:
    """A pose graph's edges ``(i, j) (E,)`` between the positions of ``poses (N, 4|7)``: the loop
    closures (``j != i + 1``) in orange, then the odometry (``j == i + 1``) over them in blue.
    Both layers share the ``N`` positions, so ``apps.viewer.export`` writes one line set with
    ``N`` points and ``E`` lines."""
    loop = j != i + 1
    return [edge_lines(poses, i[loop], j[loop], LOOP),
            edge_lines(poses, i[~loop], j[~loop], ESTIMATE)]


def draw_solution(path: str | Path, estimate: Tensor, truth: Tensor, i: Tensor, j: Tensor,
                  is_outlier: Tensor, weight: Tensor, title: str = "",
                  baseline: Tensor | None = None, baseline_weight: Tensor | None = None, *,
                  baseline_name: str = "baseline", show: bool = False) -> None:
    """The trained layer's solution of one graph: estimated vs ground-truth trajectory, loop
    closures ``(i, j) (L,)`` colored by label (left) and by learned ``weight (L,)`` (middle);
    with ``baseline`` poses, a third panel shows the baseline's solution, its loop closures
    colored by ``baseline_weight`` (the robust loss's own weight) or else by label, titled
    ``baseline_name``. With
    ``show``, each panel then opens in a window (``apps.viewer.show``)."""
    panels: list[Panel] = [
        ("loop closures: inlier / outlier",
         solution_layers(estimate, truth, i, j, label_colors(is_outlier))),
        ("loop closures by learned weight",
         solution_layers(estimate, truth, i, j, weight_colors(weight))),
    ]
    if baseline is not None:
        colors = (label_colors(is_outlier) if baseline_weight is None
                  else weight_colors(baseline_weight))
        panels.append((f"{baseline_name}: by robust-loss weight",
                       solution_layers(baseline, truth, i, j, colors)))
    legend = [("ground truth", TRUTH), ("estimate", ESTIMATE), ("inlier / weight 1", INLIER),
              ("weight 0.5", (0.95, 0.8, 0.1)), ("outlier / weight 0", OUTLIER)]
    draw(path, panels, legend, title, planar=estimate.shape[-1] == 4, show=show)


def draw_graph(path: str | Path, poses: Tensor, i: Tensor, j: Tensor, title: str = "",
               initial: Tensor | None = None, *, show: bool = False) -> None:
    """A solved g2o graph (:func:`graph_layers`): the odometry ``(k, k + 1)`` and the other
    edges (loop closures); with ``initial`` poses, a first panel shows the initial estimate.
    With ``show``, each panel then opens in a window (``apps.viewer.show``)."""
    panels = [] if initial is None else [("initial estimate", graph_layers(initial, i, j))]
    panels.append(("solution", graph_layers(poses, i, j)))
    draw(path, panels, [("odometry", ESTIMATE), ("loop closures", LOOP)], title,
         planar=poses.shape[-1] == 4, show=show)


__all__ = ["draw_graph", "draw_solution", "edge_lines", "graph_layers", "label_colors",
           "path_lines", "positions", "solution_layers", "weight_colors"]
