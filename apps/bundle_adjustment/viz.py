"""Pictures of bundle-adjustment solutions: point clouds and camera frustums, solved vs ground
truth, rendered with Open3D.

Solutions are first moved into the ground truth's frame by the similarity of the metrics
(``apps.bundle_adjustment.problem.aligned_reconstruction``). Open3D is imported lazily, inside
:func:`render_panel`: a hidden window (``Visualizer.create_window(visible=False)``) and
``capture_screen_float_buffer`` work headless on Mesa. If Open3D cannot render, a matplotlib 3D
plot of the same points and lines is drawn instead and a warning is logged: a picture never stops
a run. Panels are composed into one PNG with matplotlib (titles and a legend).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from apps.bundle_adjustment.data import Scene
from apps.bundle_adjustment.problem import aligned_reconstruction
from apps.common import save_panels
from core.lie import so3

log = logging.getLogger(__name__)

TRUTH = (0.55, 0.55, 0.55)
SOLVED = (0.12, 0.35, 0.8)
BASELINE = (0.85, 0.35, 0.1)


@dataclass
class Geometry:
    """Points (drawn as dots) and line segments ``points[a] -> points[b]``, with RGB colors."""

    points: np.ndarray
    point_colors: np.ndarray
    line_points: np.ndarray
    segments: np.ndarray
    line_colors: np.ndarray


def frustums(cameras: Tensor, color: tuple[float, float, float], depth: float,
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
    segments = (base + local[None]).reshape(-1, 2)
    empty = np.zeros((0, 3))
    return Geometry(empty, empty, pts, segments, np.tile(color, (len(segments), 1)))


def cloud(points: Tensor, color: tuple[float, float, float]) -> Geometry:
    p = points.detach().cpu().double().numpy()
    empty = np.zeros((0, 3))
    return Geometry(p, np.tile(color, (len(p), 1)), empty, np.zeros((0, 2), np.int64), empty)


def render_panel(layers: list[Geometry], size: tuple[int, int] = (800, 640)) -> np.ndarray:
    """``(H, W, 3)`` float image of ``layers``: Open3D when it can render, else matplotlib."""
    try:
        return _render_open3d(layers, size)
    except Exception as exc:  # no OpenGL/EGL, missing library, ...: never fail a run on a picture
        log.warning("Open3D cannot render here (%s); drawing with matplotlib instead", exc)
        return _render_matplotlib(layers, size)


def _render_open3d(layers: list[Geometry], size: tuple[int, int]) -> np.ndarray:
    import open3d as o3d

    vis = o3d.visualization.Visualizer()
    if not vis.create_window(visible=False, width=size[0], height=size[1]):
        raise RuntimeError("Visualizer.create_window failed")
    try:
        for g in layers:
            if len(g.points):
                pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(g.points))
                pc.colors = o3d.utility.Vector3dVector(g.point_colors)
                vis.add_geometry(pc)
            if len(g.segments):
                ls = o3d.geometry.LineSet(
                    points=o3d.utility.Vector3dVector(g.line_points),
                    lines=o3d.utility.Vector2iVector(g.segments.astype(np.int32)))
                ls.colors = o3d.utility.Vector3dVector(g.line_colors)
                vis.add_geometry(ls)
        option = vis.get_render_option()
        option.background_color = np.ones(3)
        option.point_size = 4.0
        option.line_width = 2.0
        view = vis.get_view_control()
        view.set_front([0.45, -0.6, 0.66])
        view.set_up([0.0, 0.0, 1.0])
        view.set_zoom(0.62)
        vis.poll_events()
        vis.update_renderer()
        image = np.asarray(vis.capture_screen_float_buffer(do_render=True))
    finally:
        vis.destroy_window()
    if image.size == 0 or float(image.min()) >= 1.0:
        raise RuntimeError("Open3D rendered an empty image")
    return image


def _render_matplotlib(layers: list[Geometry], size: tuple[int, int]) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    dpi = 100
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot(projection="3d")
    everything = [np.zeros((1, 3))]
    for g in layers:
        if len(g.points):
            ax.scatter(*g.points.T, c=g.point_colors, s=2, depthshade=False)
            everything.append(g.points)
        if len(g.segments):
            ax.add_collection3d(Line3DCollection(g.line_points[g.segments], colors=g.line_colors,
                                                 linewidths=0.8))
            everything.append(g.line_points)
    pts = np.concatenate(everything)
    lo, hi = pts.min(0), pts.max(0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-3)
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
        setter(c - half, c + half)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float64) / 255
    plt.close(fig)
    return image


def _scene_panel(cameras: Tensor, points: Tensor, truth_cameras: Tensor, truth_points: Tensor,
                 color: tuple[float, float, float], depth: float) -> np.ndarray:
    return render_panel([cloud(truth_points, TRUTH), frustums(truth_cameras, TRUTH, depth),
                         cloud(points, color), frustums(cameras, color, depth)])


def draw_solution(path: str | Path, scene: Scene, solution: dict[str, Tensor],
                  baseline: dict[str, Tensor] | None = None, aim: float = 4.0, title: str = "",
                  weight: Tensor | None = None) -> None:
    """One scene: the learned layer's solution (and the ``baseline``'s), aligned to the ground
    truth, over the ground-truth points and frustums. ``weight (O,)``: the learned weights, used
    for the legend's mean inlier / outlier weight."""
    depth = 0.15 * aim
    truth_cams, truth_pts = scene.true_cameras, scene.true_points
    cams, pts = aligned_reconstruction(solution, truth_cams, aim)
    name = "learned weights"
    if weight is not None:
        w = weight.detach().cpu()
        out = scene.is_outlier.cpu()
        name += f" (mean weight inliers {float(w[~out].mean()):.2f}, outliers "
        name += f"{float(w[out].mean()):.2f})" if bool(out.any()) else "-)"
    panels = [(name, _scene_panel(cams, pts, truth_cams, truth_pts, SOLVED, depth))]
    if baseline is not None:
        b_cams, b_pts = aligned_reconstruction(baseline, truth_cams, aim)
        panels.append(("baseline (uniform weights, fixed robust loss)",
                       _scene_panel(b_cams, b_pts, truth_cams, truth_pts, BASELINE, depth)))
    legend = [("ground truth", TRUTH), ("learned", SOLVED)]
    if baseline is not None:
        legend.append(("baseline", BASELINE))
    save_panels(path, panels, legend, title)


def draw_problem(path: str | Path, cameras: Tensor, points: Tensor, title: str = "",
                 initial: tuple[Tensor, Tensor] | None = None) -> None:
    """A solved BAL file: its points and camera frustums (BAL cameras ``(C, 9)``), with the
    initial values in gray when given. Frustum depth: a tenth of the scene's extent."""
    pts = points.detach().cpu().double()
    centre = pts.median(0).values
    extent = float((pts - centre).norm(dim=-1).median()) if len(pts) else 1.0
    depth = 0.2 * max(extent, 1e-6)
    layers = []
    if initial is not None:
        layers += [cloud(initial[1], TRUTH), frustums(initial[0], TRUTH, depth)]
    layers += [cloud(pts, SOLVED), frustums(cameras, SOLVED, depth)]
    legend = ([("initial", TRUTH)] if initial is not None else []) + [("solution", SOLVED)]
    save_panels(path, [("solution", render_panel(layers))], legend, title)


__all__ = ["cloud", "draw_problem", "draw_solution", "frustums", "render_panel", "save_panels"]
