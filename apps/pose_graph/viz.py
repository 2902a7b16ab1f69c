"""Pictures of pose graphs: trajectories and loop closures, rendered with Open3D.

Open3D is imported lazily, inside :func:`render_panel`. With a display it opens a hidden window;
headless it falls back to EGL offscreen rendering (Mesa): ``Visualizer.create_window(visible=
False)`` + ``capture_screen_float_buffer``. If Open3D cannot render at all, a matplotlib 3D plot
of the same lines is drawn instead and a warning is logged; a picture never stops a run.
Panels are composed into one PNG with matplotlib (titles and legends).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from apps.common import save_panels

log = logging.getLogger(__name__)

TRUTH = (0.6, 0.6, 0.6)
ESTIMATE = (0.12, 0.35, 0.75)
INLIER = (0.1, 0.65, 0.2)
OUTLIER = (0.9, 0.1, 0.1)
LOOP = (0.95, 0.55, 0.1)


@dataclass
class Lines:
    """Segments ``points[a] -> points[b]`` for rows ``(a, b)`` of ``segments (K, 2)``, each with an
    RGB color in ``colors (K, 3)``."""

    points: np.ndarray
    segments: np.ndarray
    colors: np.ndarray


def _xyz(poses: Tensor) -> np.ndarray:
    """Positions ``(N, 3)`` of SE3 ``(N, 7)`` or SE2 ``(N, 4)`` poses (z = 0)."""
    p = poses.detach().cpu().double().numpy()
    if p.shape[-1] == 4:
        return np.concatenate([p[:, :2], np.zeros((p.shape[0], 1))], axis=1)
    return p[:, :3].copy()


def path_lines(poses: Tensor, color: tuple[float, float, float]) -> Lines:
    """The trajectory ``0 -> 1 -> ... -> N-1``."""
    xyz = _xyz(poses)
    k = np.arange(len(xyz) - 1)
    return Lines(xyz, np.stack([k, k + 1], 1), np.tile(color, (len(k), 1)))


def edge_lines(poses: Tensor, i: Tensor, j: Tensor, colors: np.ndarray) -> Lines:
    """Edges ``(i, j)`` drawn between the poses' positions."""
    segments = np.stack([i.cpu().numpy(), j.cpu().numpy()], 1).astype(np.int64)
    return Lines(_xyz(poses), segments, np.asarray(colors, dtype=np.float64).reshape(-1, 3))


def weight_colors(w: Tensor) -> np.ndarray:
    """``(L, 3)`` colors from red (weight 0) through yellow (0.5) to green (1)."""
    w = w.detach().cpu().double().clamp(0, 1).numpy()[:, None]
    red, yellow, green = np.array(OUTLIER), np.array([0.95, 0.8, 0.1]), np.array(INLIER)
    low = red + (yellow - red) * (2 * w)
    high = yellow + (green - yellow) * (2 * w - 1)
    return np.where(w < 0.5, low, high)


def label_colors(is_outlier: Tensor) -> np.ndarray:
    out = is_outlier.detach().cpu().numpy()[:, None]
    return np.where(out, np.array(OUTLIER), np.array(INLIER))


def render_panel(layers: list[Lines], size: tuple[int, int] = (720, 600), planar: bool = False
                 ) -> np.ndarray:
    """``(H, W, 3)`` float image of ``layers`` (later layers drawn over earlier ones): Open3D when
    it can render, else matplotlib."""
    try:
        return _render_open3d(layers, size, planar)
    except Exception as exc:  # no OpenGL/EGL, missing library, ...: never fail a run on a picture
        log.warning("Open3D cannot render here (%s); drawing with matplotlib instead", exc)
        return _render_matplotlib(layers, size, planar)


def _render_open3d(layers: list[Lines], size: tuple[int, int], planar: bool) -> np.ndarray:
    import open3d as o3d

    vis = o3d.visualization.Visualizer()
    if not vis.create_window(visible=False, width=size[0], height=size[1]):
        raise RuntimeError("Visualizer.create_window failed")
    try:
        for lines in layers:
            if len(lines.segments) == 0:
                continue
            ls = o3d.geometry.LineSet(
                points=o3d.utility.Vector3dVector(lines.points),
                lines=o3d.utility.Vector2iVector(lines.segments.astype(np.int32)),
            )
            ls.colors = o3d.utility.Vector3dVector(lines.colors)
            vis.add_geometry(ls)
        option = vis.get_render_option()
        option.background_color = np.ones(3)
        option.line_width = 2.0
        view = vis.get_view_control()
        if planar:
            view.set_front([0.0, 0.0, 1.0])
            view.set_up([0.0, 1.0, 0.0])
        else:
            view.set_front([0.3, -0.5, 0.81])
            view.set_up([0.0, 0.0, 1.0])
        zoom = 0.7
        for _ in range(4):  # zoom out until nothing touches the border
            view.set_zoom(zoom)
            vis.poll_events()
            vis.update_renderer()
            image = np.asarray(vis.capture_screen_float_buffer(do_render=True))
            if not _touches_border(image):
                break
            zoom *= 1.2
    finally:
        vis.destroy_window()
    if image.size == 0 or float(image.min()) >= 1.0:
        raise RuntimeError("Open3D rendered an empty image")
    return image


def _touches_border(image: np.ndarray, margin: int = 12) -> bool:
    """Whether anything but the white background lies within ``margin`` pixels of the edge."""
    ink = image.min(axis=-1) < 0.95
    return bool(ink[:margin].any() or ink[-margin:].any() or ink[:, :margin].any()
                or ink[:, -margin:].any())


def _render_matplotlib(layers: list[Lines], size: tuple[int, int], planar: bool) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    dpi = 100
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot(projection="3d")
    everything = []
    for lines in layers:
        if len(lines.segments) == 0:
            continue
        segs = lines.points[lines.segments]
        ax.add_collection3d(Line3DCollection(segs, colors=lines.colors, linewidths=0.8))
        everything.append(lines.points)
    pts = np.concatenate(everything) if everything else np.zeros((1, 3))
    lo, hi = pts.min(0), pts.max(0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-3)
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
        setter(c - half, c + half)
    if planar:
        ax.view_init(elev=90, azim=-90)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float64) / 255
    plt.close(fig)
    return image


def draw_solution(path: str | Path, estimate: Tensor, truth: Tensor, i: Tensor, j: Tensor,
                  is_outlier: Tensor, weight: Tensor, title: str = "",
                  baseline: Tensor | None = None, baseline_weight: Tensor | None = None) -> None:
    """The trained layer's solution of one graph: estimated vs ground-truth trajectory, loop
    closures ``(i, j) (L,)`` colored by label (left) and by learned ``weight (L,)`` (middle);
    with ``baseline`` poses, a third panel shows the baseline's solution, its loop closures
    colored by ``baseline_weight`` (the robust loss's own weight) or else by label."""
    planar = estimate.shape[-1] == 4
    truth_path = path_lines(truth, TRUTH)
    est_path = path_lines(estimate, ESTIMATE)
    panels = [
        ("loop closures: inlier / outlier",
         render_panel([truth_path, est_path, edge_lines(estimate, i, j, label_colors(is_outlier))],
                      planar=planar)),
        ("loop closures by learned weight",
         render_panel([truth_path, est_path, edge_lines(estimate, i, j, weight_colors(weight))],
                      planar=planar)),
    ]
    if baseline is not None:
        colors = (label_colors(is_outlier) if baseline_weight is None
                  else weight_colors(baseline_weight))
        panels.append(("baseline: by robust-loss weight", render_panel(
            [truth_path, path_lines(baseline, ESTIMATE), edge_lines(baseline, i, j, colors)],
            planar=planar)))
    legend = [("ground truth", TRUTH), ("estimate", ESTIMATE), ("inlier / weight 1", INLIER),
              ("weight 0.5", (0.95, 0.8, 0.1)), ("outlier / weight 0", OUTLIER)]
    save_panels(path, panels, legend, title)


def draw_graph(path: str | Path, poses: Tensor, i: Tensor, j: Tensor, title: str = "",
               initial: Tensor | None = None) -> None:
    """A solved g2o graph: the odometry chain ``(k, k + 1)`` and the other edges (loop
    closures); with ``initial`` poses, a first panel shows the initial estimate."""
    planar = poses.shape[-1] == 4
    loop = j != i + 1

    def panel(p: Tensor) -> np.ndarray:
        loops = edge_lines(p, i[loop], j[loop], np.tile(LOOP, (int(loop.sum()), 1)))
        return render_panel([loops, path_lines(p, ESTIMATE)], planar=planar)

    panels = [] if initial is None else [("initial estimate", panel(initial))]
    panels.append(("solution", panel(poses)))
    save_panels(path, panels, [("trajectory", ESTIMATE), ("loop closures", LOOP)], title)


