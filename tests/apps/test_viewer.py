"""apps.viewer: layers, offscreen pictures (Open3D and the matplotlib fallback), export to files
Open3D reads back, and the interactive window under a virtual X display (Xvfb; skipped without
it), in process and through the pose-graph solve CLI's ``--show``."""

from __future__ import annotations

import ctypes.util
import logging
import os
import queue
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from apps import viewer
from apps.viewer import Geometry

ROOT = Path(__file__).resolve().parents[2]
RED, BLUE = (0.9, 0.1, 0.1), (0.1, 0.2, 0.9)


def _square(z: float = 0.0) -> np.ndarray:
    return np.array([[0, 0, z], [1, 0, z], [1, 1, z], [0, 1, z]], dtype=np.float64)


def _drawing() -> list[Geometry]:
    """A red square outline (4 vertices, 4 edges) and a blue cloud of 50 points."""
    gen = np.random.default_rng(0)
    return [Geometry.lines(_square(), [[0, 1], [1, 2], [2, 3], [3, 0]], RED),
            Geometry.cloud(gen.uniform(0.2, 0.8, (50, 3)), BLUE)]


# ------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------


def test_constructors_give_the_documented_shapes() -> None:
    path = Geometry.polyline(_square(), RED)
    assert path.line_points.shape == (4, 3) and path.segments.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert path.line_colors.shape == (3, 3) and path.points.shape == (0, 3)
    cloud = Geometry.cloud(_square(), np.tile(BLUE, (4, 1)))
    assert cloud.points.shape == cloud.point_colors.shape == (4, 3)
    assert cloud.segments.shape == (0, 2)
    assert Geometry.polyline(np.zeros((0, 3)), RED).segments.shape == (0, 2)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"colors must be \(3,\) or \(2, 3\)"):
        Geometry.lines(_square(), [[0, 1], [1, 2]], np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"segment indices must lie in \[0, 4\)"):
        Geometry.lines(_square(), [[0, 4]], RED)
    with pytest.raises(ValueError, match=r"points must be \(P, 3\)"):
        Geometry(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((0, 3)), np.zeros((0, 2), np.int64),
                 np.zeros((0, 3)))


# ------------------------------------------------------------------------------------------
# pictures
# ------------------------------------------------------------------------------------------


def _ink(image: np.ndarray) -> np.ndarray:
    return image.min(axis=-1) < 0.95


def test_render_fits_the_drawing_and_shows_its_colors() -> None:
    # a long thin drawing far from the origin: the zoom-out must keep it off the border
    far = Geometry.polyline(np.array([[100.0, 50, 0], [130, 50, 0], [130, 52, 0]]), RED)
    for planar in (True, False):
        image = viewer.render([far], size=(320, 240), planar=planar)
        assert image.shape == (240, 320, 3)
        assert _ink(image).any() and not viewer._touches_border(image)
    image = viewer.render(_drawing(), size=(320, 240))
    red = (image[..., 0] > 0.6) & (image[..., 2] < 0.4)
    blue = (image[..., 2] > 0.6) & (image[..., 0] < 0.4)
    assert red.sum() > 50 and blue.sum() > 20


def test_render_falls_back_to_matplotlib(monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("no OpenGL here")

    monkeypatch.setattr(viewer, "_render_open3d", broken)
    with caplog.at_level(logging.WARNING, logger="apps.viewer"):
        image = viewer.render(_drawing(), size=(300, 200), planar=True)
    assert image.shape == (200, 300, 3) and _ink(image).any()
    assert "no OpenGL here" in caplog.text and "matplotlib" in caplog.text


def test_draw_writes_one_png_and_shows_each_panel(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    shown: list[tuple[int, str]] = []
    monkeypatch.setattr(viewer, "_show", lambda layers, title, **kw: shown.append(
        (len(layers), title)))
    path = tmp_path / "sub" / "drawing.png"
    panels = [("lines", _drawing()[:1]), ("both", _drawing())]
    viewer.draw(path, panels, [("square", RED), ("cloud", BLUE)], "two panels", size=(200, 150))
    assert path.stat().st_size > 0 and shown == []
    viewer.draw(path, panels, [("square", RED)], "two panels", size=(200, 150), show=True)
    assert shown == [(1, "two panels: lines"), (2, "two panels: both")]


def test_app_draw_functions_pass_show_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apps.pose_graph import viz
    from apps.pose_graph.data import GraphSpec, make_sample

    shown: list[str] = []
    monkeypatch.setattr(viewer, "_show", lambda layers, title, **kw: shown.append(title))
    s = make_sample(GraphSpec(num_poses=(30, 40)), 1)
    viz.draw_graph(tmp_path / "graph.png", s.truth, s.graph.i, s.graph.j, title="g",
                   initial=s.graph.poses, show=True)
    assert shown == ["g: initial estimate", "g: solution"]


# ------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------


def test_export_lines_and_points_by_the_rule(tmp_path: Path) -> None:
    o3d = pytest.importorskip("open3d")
    square, cloud = _drawing()
    both = viewer.export(tmp_path / "both.ply", [square, cloud])
    assert both == [tmp_path / "both.ply", tmp_path / "both_lines.ply"]
    points = o3d.io.read_point_cloud(str(both[0]))
    np.testing.assert_allclose(np.asarray(points.points), cloud.points)
    np.testing.assert_allclose(np.asarray(points.colors), cloud.point_colors, atol=1 / 255)
    lines = o3d.io.read_line_set(str(both[1]))
    np.testing.assert_allclose(np.asarray(lines.points), square.line_points)
    assert np.array_equal(np.asarray(lines.lines), square.segments)
    np.testing.assert_allclose(np.asarray(lines.colors), square.line_colors, atol=1 / 255)
    # one kind only: that file at the path itself
    assert viewer.export(tmp_path / "lines.ply", [square]) == [tmp_path / "lines.ply"]
    assert viewer.export(tmp_path / "cloud.pcd", [cloud]) == [tmp_path / "cloud.pcd"]
    assert len(o3d.io.read_point_cloud(str(tmp_path / "cloud.pcd")).points) == 50


def test_export_shares_equal_vertices_and_stacks_the_others(tmp_path: Path) -> None:
    o3d = pytest.importorskip("open3d")
    a = Geometry.lines(_square(), [[0, 1], [1, 2]], RED)
    b = Geometry.lines(_square(), [[2, 3], [3, 0]], BLUE)  # the same vertices: shared
    c = Geometry.polyline(_square(z=1.0), BLUE)  # other vertices: appended
    viewer.export(tmp_path / "graph.ply", [a, b, c])
    back = o3d.io.read_line_set(str(tmp_path / "graph.ply"))
    assert np.asarray(back.points).shape == (8, 3)
    assert np.asarray(back.lines).tolist() == [[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6],
                                               [6, 7]]


def test_export_errors_are_clear(tmp_path: Path) -> None:
    square, cloud = _drawing()
    with pytest.raises(ValueError, match="nothing to write"):
        viewer.export(tmp_path / "empty.ply", [Geometry.polyline(np.zeros((1, 3)), RED)])
    with pytest.raises(OSError, match=r"write_line_set could not write .*square\.unknown"):
        viewer.export(tmp_path / "square.unknown", [square])
    with pytest.raises(OSError, match=r"write_point_cloud could not write .*cloud\.unknown"):
        viewer.export(tmp_path / "cloud.unknown", [cloud])


# ------------------------------------------------------------------------------------------
# the interactive window
# ------------------------------------------------------------------------------------------


def test_show_without_display_names_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the display check is Linux's")
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(RuntimeError, match=r"DISPLAY is not set.*--viz OUT\.png.*--export"):
        viewer.show(_drawing(), max_frames=1)
    if ctypes.util.find_library("X11") is not None:
        # a display nobody serves: Open3D would silently render offscreen, so it is refused
        monkeypatch.setenv("DISPLAY", ":937")
        with pytest.raises(RuntimeError, match="DISPLAY=:937 does not accept connections"):
            viewer.show(_drawing(), max_frames=1)
    with pytest.raises(ValueError, match="max_frames"):
        viewer.show(_drawing(), max_frames=0)


@pytest.fixture(scope="module")
def xvfb() -> Iterator[str]:
    """A virtual X display (``:N``, a free number Xvfb picks itself); skips without Xvfb.

    Without ``-noreset`` on purpose: such a server resets when its last client leaves, and
    ``apps.viewer.show`` must cope (it holds a connection while Open3D creates the window)."""
    exe = shutil.which("Xvfb")
    if exe is None:
        pytest.skip("Xvfb is not installed")
    proc = subprocess.Popen([exe, "-displayfd", "1", "-screen", "0", "1280x1024x24",
                             "-nolisten", "tcp"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    number = proc.stdout.readline().strip() if ready else ""
    if not number.isdigit():
        proc.kill()
        proc.wait()
        pytest.fail(f"Xvfb did not start (printed {number!r})")
    try:
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_show_opens_a_real_window_and_renders(xvfb: str, monkeypatch: pytest.MonkeyPatch,
                                              capfd: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DISPLAY", xvfb)
    with caplog.at_level(logging.INFO, logger="apps.viewer"):
        image = viewer.show(_drawing(), "test window", size=(400, 300), max_frames=5)
    assert "Open3D window open: close it to continue" in caplog.text
    # a window on the X display, not Open3D's silent offscreen fallback
    out = capfd.readouterr()
    assert "falling back to EGL" not in out.out, out.out + out.err
    assert image is not None and image.shape == (300, 400, 3)
    assert _ink(image).any() and not viewer._touches_border(image)
    red = (image[..., 0] > 0.6) & (image[..., 2] < 0.4)
    assert red.sum() > 50


def _lines_until(stream: object, needle: str, timeout: float) -> tuple[bool, str]:
    """Read ``stream`` line by line (in a thread) until a line holds ``needle`` or ``timeout``
    seconds pass; returns (found, what was read)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in stream], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return True, "".join(seen)
    return False, "".join(seen)


def test_cli_show_opens_a_window(xvfb: str, tmp_path: Path) -> None:
    from apps.pose_graph.data import GraphSpec, make_sample
    from core import io

    g2o = tmp_path / "graph.g2o"
    io.write_g2o(g2o, make_sample(GraphSpec(dim=2, num_poses=(60, 70)), 2).graph)
    env = {**os.environ, "DISPLAY": xvfb}
    proc = subprocess.Popen([sys.executable, "-m", "apps.pose_graph.solve", str(g2o), "--show"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        found, stderr = _lines_until(proc.stderr, "Open3D window open", timeout=180)
        assert found, stderr[-3000:]
        assert proc.poll() is None  # the window stays open until closed
    finally:
        proc.terminate()
        proc.wait(timeout=60)

