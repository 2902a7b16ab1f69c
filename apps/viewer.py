"""One Open3D viewer for every app: PNG panels, an interactive window, and PLY export.

A drawing is a list of :class:`Geometry` layers (colored points and colored line segments),
later layers drawn over earlier ones. The same layers go to three places:

- :func:`render`: an offscreen ``(H, W, 3)`` image. Open3D's legacy ``Visualizer`` with a hidden
  window (``create_window(visible=False)`` + ``capture_screen_float_buffer``) works headless on
  Mesa (Open3D falls back to EGL offscreen rendering; the newer ``OffscreenRenderer`` needs Vulkan
  and fails here). The view zooms out until nothing touches the border. If Open3D cannot render,
  matplotlib draws the same points and lines and a warning is logged: a picture never fails a run.
  :func:`save_panels` composes titled panels and a color legend into one PNG, :func:`draw` does
  both.
- :func:`show`: an interactive Open3D window (needs a display; a clear error otherwise).
- :func:`export`: files Open3D (and MeshLab, CloudCompare, ...) opens: the lines as one
  ``LineSet`` (``open3d.io.write_line_set``), the points as one ``PointCloud``
  (``open3d.io.write_point_cloud``); see :func:`export` for where each goes.

Open3D is imported lazily, inside the functions that use it; ``core`` never imports it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Color = tuple[float, float, float]
Panel = tuple[str, list["Geometry"]]

PERSPECTIVE_FRONT: tuple[float, float, float] = (0.3, -0.5, 0.81)
"""Default viewing direction (from the scene towards the camera) of a 3D view, z up."""

NO_DISPLAY_HINT = "draw into a picture with --viz OUT.png or write files with --export OUT.ply"


def _colors(colors: Color | np.ndarray, n: int, what: str) -> np.ndarray:
    """``(n, 3)`` float64 RGB in [0, 1] from one color or from ``n`` colors."""
    c = np.asarray(colors, dtype=np.float64)
    if c.shape == (3,):
        c = np.tile(c, (n, 1))
    if c.shape != (n, 3):
        raise ValueError(f"{what}: colors must be (3,) or ({n}, 3), got {c.shape}")
    return c


@dataclass(frozen=True)
class Geometry:
    """One layer of a drawing: dots, and segments ``line_points[a] -> line_points[b]``.

    Fields (float64 unless said):

    - ``points (P, 3)`` and ``point_colors (P, 3)``: the dots, RGB in [0, 1];
    - ``line_points (Q, 3)``: the segments' end points (the vertices of the line set);
    - ``segments (K, 2)`` int64: rows ``(a, b)`` index ``line_points``;
    - ``line_colors (K, 3)``: one RGB color per segment.

    Build one with :meth:`cloud`, :meth:`lines` or :meth:`polyline`; shapes are checked.
    """

    points: np.ndarray
    point_colors: np.ndarray
    line_points: np.ndarray
    segments: np.ndarray
    line_colors: np.ndarray

    def __post_init__(self) -> None:
        p, q, s = self.points, self.line_points, self.segments
        if p.ndim != 2 or p.shape[1] != 3 or self.point_colors.shape != p.shape:
            raise ValueError(f"Geometry: points must be (P, 3) with point_colors (P, 3), got "
                             f"{p.shape} and {self.point_colors.shape}")
        if q.ndim != 2 or q.shape[1] != 3:
            raise ValueError(f"Geometry: line_points must be (Q, 3), got {q.shape}")
        if s.ndim != 2 or s.shape[1] != 2 or self.line_colors.shape != (len(s), 3):
            raise ValueError(f"Geometry: segments must be (K, 2) with line_colors (K, 3), got "
                             f"{s.shape} and {self.line_colors.shape}")
        if len(s) and (int(s.min()) < 0 or int(s.max()) >= len(q)):
            raise ValueError(f"Geometry: segment indices must lie in [0, {len(q)}), got "
                             f"[{int(s.min())}, {int(s.max())}]")

    @classmethod
    def cloud(cls, points: np.ndarray, colors: Color | np.ndarray) -> Geometry:
        """Dots at ``points (P, 3)``, in one color or ``colors (P, 3)``."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        empty = np.zeros((0, 3))
        return cls(p, _colors(colors, len(p), "Geometry.cloud"), empty,
                   np.zeros((0, 2), np.int64), empty)

    @classmethod
    def lines(cls, points: np.ndarray, segments: np.ndarray,
              colors: Color | np.ndarray) -> Geometry:
        """Segments ``points[a] -> points[b]`` for rows ``(a, b)`` of ``segments (K, 2)``
        (graph edges), over vertices ``points (Q, 3)``, in one color or ``colors (K, 3)``."""
        q = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        s = np.asarray(segments, dtype=np.int64).reshape(-1, 2)
        empty = np.zeros((0, 3))
        return cls(empty, empty, q, s, _colors(colors, len(s), "Geometry.lines"))

    @classmethod
    def polyline(cls, points: np.ndarray, color: Color | np.ndarray) -> Geometry:
        """The path ``points[0] -> points[1] -> ... -> points[Q-1]`` of ``points (Q, 3)``."""
        q = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        k = np.arange(max(len(q) - 1, 0))
        return cls.lines(q, np.stack([k, k + 1], 1), color)


def _extent(layers: Sequence[Geometry]) -> np.ndarray:
    """All ``(M, 3)`` points of ``layers`` (dots and line vertices in use); a zero if none."""
    parts = [np.zeros((0, 3))]
    for g in layers:
        parts += [g.points, g.line_points[np.unique(g.segments)]]
    pts = np.concatenate(parts)
    return pts if len(pts) else np.zeros((1, 3))


# ------------------------------------------------------------------------------------------
# offscreen pictures
# ------------------------------------------------------------------------------------------


def render(layers: Sequence[Geometry], size: tuple[int, int] = (720, 600), planar: bool = False,
           point_size: float = 4.0, front: tuple[float, float, float] = PERSPECTIVE_FRONT,
           zoom: float = 0.7) -> np.ndarray:
    """``(H, W, 3)`` float image in [0, 1] of ``layers`` at ``size = (W, H)`` pixels.

    ``planar``: a top view (looking down -z, y up) for 2D drawings; otherwise a 3D view from
    ``front``, z up. The view starts at ``zoom`` and zooms out until nothing touches the border.
    Open3D when it can render, else matplotlib (with a logged warning).
    """
    try:
        return _render_open3d(layers, size, planar, point_size, front, zoom)
    except Exception as exc:  # no OpenGL/EGL, missing library, ...: never fail a run on a picture
        log.warning("Open3D cannot render here (%s); drawing with matplotlib instead", exc)
        return _render_matplotlib(layers, size, planar, point_size)


def _add_layers(vis: object, layers: Sequence[Geometry], point_size: float) -> None:
    """Add ``layers`` to an Open3D ``Visualizer`` ``vis`` on a white background."""
    import open3d as o3d

    for g in layers:
        if len(g.points):
            pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(g.points))
            pc.colors = o3d.utility.Vector3dVector(g.point_colors)
            vis.add_geometry(pc)
        if len(g.segments):
            ls = o3d.geometry.LineSet(o3d.utility.Vector3dVector(g.line_points),
                                      o3d.utility.Vector2iVector(g.segments.astype(np.int32)))
            ls.colors = o3d.utility.Vector3dVector(g.line_colors)
            vis.add_geometry(ls)
    option = vis.get_render_option()
    option.background_color = np.ones(3)
    option.point_size = point_size
    option.line_width = 2.0


def _fit_view(vis: object, planar: bool, front: tuple[float, float, float], zoom: float
              ) -> np.ndarray:
    """Set the view of ``vis`` and zoom out (up to 7 times by 1.2) until nothing touches the
    border; returns the last ``(H, W, 3)`` frame."""
    view = vis.get_view_control()
    if planar:
        view.set_front([0.0, 0.0, 1.0])
        view.set_up([0.0, 1.0, 0.0])
    else:
        view.set_front(list(front))
        view.set_up([0.0, 0.0, 1.0])
    for _ in range(8):
        view.set_zoom(zoom)
        vis.poll_events()
        vis.update_renderer()
        image = np.asarray(vis.capture_screen_float_buffer(do_render=True))
        if not _touches_border(image):
            break
        zoom *= 1.2
    return image


def _render_open3d(layers: Sequence[Geometry], size: tuple[int, int], planar: bool,
                   point_size: float, front: tuple[float, float, float], zoom: float
                   ) -> np.ndarray:
    import open3d as o3d

    vis = o3d.visualization.Visualizer()
    if not vis.create_window(visible=False, width=size[0], height=size[1]):
        raise RuntimeError("Visualizer.create_window failed")
    try:
        _add_layers(vis, layers, point_size)
        image = _fit_view(vis, planar, front, zoom)
    finally:
        vis.destroy_window()
    if image.size == 0 or float(image.min()) >= 1.0:
        raise RuntimeError("Open3D rendered an empty image")
    return image


def _touches_border(image: np.ndarray, margin: int = 12) -> bool:
    """Whether anything but the white background lies within ``margin`` pixels of the edge of
    ``image (H, W, 3)``."""
    ink = image.min(axis=-1) < 0.95
    return bool(ink[:margin].any() or ink[-margin:].any() or ink[:, :margin].any()
                or ink[:, -margin:].any())


def _render_matplotlib(layers: Sequence[Geometry], size: tuple[int, int], planar: bool,
                       point_size: float) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    dpi = 100
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot(projection="3d")
    for g in layers:
        if len(g.points):
            ax.scatter(*g.points.T, c=g.point_colors, s=point_size / 2, depthshade=False)
        if len(g.segments):
            ax.add_collection3d(Line3DCollection(g.line_points[g.segments], colors=g.line_colors,
                                                 linewidths=0.8))
    pts = _extent(layers)
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


def save_panels(path: str | Path, panels: list[tuple[str, np.ndarray]],
                legend: list[tuple[str, Color]], title: str = "") -> None:
    """Compose titled ``(H, W, 3)`` images side by side, with a color legend, into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    h, w = panels[0][1].shape[:2]
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * w / 100, h / 100 + 0.9),
                             dpi=100, squeeze=False)
    for ax, (name, image) in zip(axes[0], panels):
        ax.imshow(np.clip(image, 0, 1))
        ax.set_title(name, fontsize=11)
        ax.axis("off")
    handles = [Line2D([0], [0], color=c, lw=3, label=label) for label, c in legend]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=10, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95 if title else 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# the interactive window
# ------------------------------------------------------------------------------------------


@contextmanager
def _x_connection(display: str) -> Iterator[bool | None]:
    """Hold a connection to the X display ``display`` for the ``with`` block; yields whether it
    opened (``None``: libX11 not found, unknown)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("X11")
    try:
        x11 = ctypes.CDLL(name) if name else None
    except OSError:
        x11 = None
    if x11 is None:
        yield None
        return
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    handle = x11.XOpenDisplay(display.encode())
    try:
        yield bool(handle)
    finally:
        if handle:
            x11.XCloseDisplay(handle)


@contextmanager
def _display() -> Iterator[None]:
    """Raise ``RuntimeError`` unless a window can be shown here; else hold the X display open for
    the ``with`` block (an X server with no client left resets and refuses connections for a
    moment, and Open3D would then silently render offscreen: the window is created inside)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    display = os.environ.get("DISPLAY", "")
    if not display:
        raise RuntimeError(f"cannot open a window: no display (DISPLAY is not set); "
                           f"{NO_DISPLAY_HINT}")
    with _x_connection(display) as opened:
        if opened is False:
            raise RuntimeError(f"cannot open a window: the X display DISPLAY={display} does not "
                               f"accept connections; {NO_DISPLAY_HINT}")
        yield


def check_display() -> None:
    """Raise ``RuntimeError`` unless a window can be shown here.

    On Linux Open3D needs an X display (``DISPLAY``; under Wayland, XWayland's). Without one it
    silently renders offscreen (EGL), so a window would never appear: this is checked up front,
    including that the X server named by ``DISPLAY`` accepts a connection.
    """
    with _display():
        pass


def show(layers: Sequence[Geometry], title: str = "Ariadne", *, size: tuple[int, int] = (1280, 960),
         planar: bool = False, point_size: float = 4.0,
         front: tuple[float, float, float] = PERSPECTIVE_FRONT, zoom: float = 0.7,
         max_frames: int | None = None) -> np.ndarray | None:
    """Open ``layers`` in an interactive Open3D window titled ``title`` and return when it is
    closed (Open3D's mouse and key controls; ``H`` prints them).

    The first view is :func:`render`'s (``planar`` / ``front``, zoomed out to fit). Logs "Open3D
    window open: close it to continue" once the window is up. ``max_frames``: close the window
    after that many frames and return its last frame ``(H, W, 3)`` (for tests and scripts);
    otherwise returns ``None``. Raises ``RuntimeError`` when there is no display or Open3D cannot
    create the window.
    """
    if not layers:
        raise ValueError("show: nothing to draw (no layers)")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"show: max_frames must be >= 1 or None, got {max_frames}")
    import open3d as o3d

    vis = o3d.visualization.Visualizer()
    with _display():
        opened = vis.create_window(window_name=title, width=size[0], height=size[1],
                                   visible=True)
    if not opened:
        raise RuntimeError(f"cannot open a window: Open3D's Visualizer.create_window failed on "
                           f"DISPLAY={os.environ.get('DISPLAY', '')}; {NO_DISPLAY_HINT}")
    try:
        _add_layers(vis, layers, point_size)
        image = _fit_view(vis, planar, front, zoom)
        log.info("Open3D window open: close it to continue")
        if max_frames is None:
            vis.run()
            return None
        for _ in range(max_frames):
            if not vis.poll_events():
                break
            vis.update_renderer()
            image = np.asarray(vis.capture_screen_float_buffer(do_render=True))
        return image
    finally:
        vis.destroy_window()


_show = show  # draw()'s keyword ``show`` hides the function's name


def draw(path: str | Path, panels: list[Panel], legend: list[tuple[str, Color]],
         title: str = "", *, size: tuple[int, int] = (720, 600), planar: bool = False,
         point_size: float = 4.0, front: tuple[float, float, float] = PERSPECTIVE_FRONT,
         zoom: float = 0.7, show: bool = False) -> None:
    """Render each ``(name, layers)`` panel (:func:`render`) into one PNG (:func:`save_panels`);
    with ``show``, then open each panel in turn in a window (:func:`show`; close one to see the
    next)."""
    images = [(name, render(layers, size, planar, point_size, front, zoom))
              for name, layers in panels]
    save_panels(path, images, legend, title)
    if show:
        for name, layers in panels:
            _show(layers, f"{title}: {name}" if title else name, planar=planar,
                  point_size=point_size, front=front, zoom=zoom)


# ------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------


def _merged_lines(layers: Sequence[Geometry]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(vertices (Q, 3), segments (K, 2), colors (K, 3))`` of all layers' lines; layers with
    equal ``line_points`` share one copy of them."""
    blocks: list[tuple[int, np.ndarray]] = []  # (offset, vertices) of each distinct vertex block
    segments, colors = [], []
    offset = 0
    for g in layers:
        if not len(g.segments):
            continue
        base = next((b for b, v in blocks
                     if v.shape == g.line_points.shape and np.array_equal(v, g.line_points)), None)
        if base is None:
            base = offset
            blocks.append((offset, g.line_points))
            offset += len(g.line_points)
        segments.append(g.segments + base)
        colors.append(g.line_colors)
    if not segments:
        return np.zeros((0, 3)), np.zeros((0, 2), np.int64), np.zeros((0, 3))
    return (np.concatenate([v for _, v in blocks]), np.concatenate(segments),
            np.concatenate(colors))


def export(path: str | Path, layers: Sequence[Geometry]) -> list[Path]:
    """Write ``layers`` as files Open3D opens; returns the paths written.

    All lines become one ``LineSet`` with per-line colors (``open3d.io.write_line_set``; layers
    whose ``line_points`` are equal share them, so a graph drawn as several layers over the same
    vertices is exported as its ``N`` vertices and all its edges). All points become one
    ``PointCloud`` with colors (``open3d.io.write_point_cloud``). The rule for ``path``:

    - only lines, or only points: that one file at ``path``;
    - both: the points at ``path`` and the lines next to it with a ``_lines`` suffix
      (``scene.ply`` -> ``scene.ply`` (points) + ``scene_lines.ply`` (lines)).

    The format follows the suffix (``.ply`` for lines; ``.ply``, ``.pcd``, ``.xyz``, ... for
    points). Raises ``ValueError`` when there is nothing to write and ``OSError`` when Open3D
    cannot write a file.
    """
    import open3d as o3d

    path = Path(path)
    q, s, c = _merged_lines(layers)
    clouds = [g for g in layers if len(g.points)]
    if not len(s) and not clouds:
        raise ValueError(f"export {path}: nothing to write (no points and no lines)")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if clouds:
        pc = o3d.geometry.PointCloud(
            o3d.utility.Vector3dVector(np.concatenate([g.points for g in clouds])))
        pc.colors = o3d.utility.Vector3dVector(np.concatenate([g.point_colors for g in clouds]))
        if not o3d.io.write_point_cloud(str(path), pc):
            raise OSError(f"open3d.io.write_point_cloud could not write {path} (unwritable, or "
                          f"an unknown format: use .ply)")
        written.append(path)
    if len(s):
        lines_path = path.with_name(f"{path.stem}_lines{path.suffix}") if clouds else path
        ls = o3d.geometry.LineSet(o3d.utility.Vector3dVector(q),
                                  o3d.utility.Vector2iVector(s.astype(np.int32)))
        ls.colors = o3d.utility.Vector3dVector(c)
        if not o3d.io.write_line_set(str(lines_path), ls):
            raise OSError(f"open3d.io.write_line_set could not write {lines_path} (unwritable, "
                          f"or an unknown format: use .ply)")
        written.append(lines_path)
    return written


__all__ = ["Color", "Geometry", "Panel", "check_display", "draw", "export", "render",
           "save_panels", "show"]


def cli_export(prog: str, path: str, layers: Sequence[Geometry], summary: dict) -> None:
    """A solve CLI's ``--export``: :func:`export`, the written paths in ``summary["export"]``
    and printed; a failure ends the CLI with one line (exit status 1)."""
    try:
        written = export(path, layers)
    except (ValueError, OSError) as exc:
        sys.exit(f"{prog}: error: {exc}")
    summary["export"] = [str(w) for w in written]
    print(f"  export: {', '.join(summary['export'])}")


def cli_show(prog: str, layers: Sequence[Geometry], title: str, **view: Any) -> None:
    """A solve CLI's ``--show``: :func:`show` after flushing stdout; no window ends the CLI with
    one line (exit status 1)."""
    sys.stdout.flush()
    try:
        show(layers, title, **view)
    except RuntimeError as exc:
        sys.exit(f"{prog}: error: {exc}")
