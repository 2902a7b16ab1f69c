"""The pose-graph solve CLI, and LM on the real g2o data sets against the published optimum and
GTSAM (``bench.peers.gtsam_pose_graph``) on exactly the same residuals."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import core
from apps.pose_graph.problem import pose_graph_objective
from apps.pose_graph.solve import main
from core import io

ROOT = Path(__file__).resolve().parents[3]
KEYS = {"poses", "edges", "iterations", "initial_cost", "final_cost", "time_s", "status"}


def _square_g2o() -> str:
    """A 4-pose square with a diagonal, initial estimates off by a few centimetres/degrees."""
    lines = [
        "# a tiny SE2 pose graph",
        "VERTEX_SE2 0 0.0 0.0 0.0",
        "VERTEX_SE2 1 1.05 0.02 1.60",
        "VERTEX_SE2 2 0.97 1.04 3.10",
        "VERTEX_SE2 3 -0.03 0.95 -1.50",
    ]
    info = "100 0 0 100 0 400"
    q = math.pi / 2
    for i, j, dx, dy, dth in [
        (0, 1, 1, 0, q),
        (1, 2, 1, 0, q),
        (2, 3, 1, 0, q),
        (3, 0, 1, 0, q),
        (0, 2, 1, 1, math.pi),
    ]:
        lines.append(f"EDGE_SE2 {i} {j} {dx} {dy} {dth:.17g} {info}")
    return "\n".join(lines) + "\n"


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apps.pose_graph.solve", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_cli_json_summary(tmp_path: Path) -> None:
    path = tmp_path / "square.g2o"
    path.write_text(_square_g2o())
    out = _run_cli(str(path), "--json", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert KEYS <= set(summary)
    assert summary["poses"] == 4 and summary["edges"] == 5
    assert summary["status"] == "converged"
    assert 1 <= summary["iterations"] <= 100
    assert 0 <= summary["final_cost"] < summary["initial_cost"]
    assert summary["time_s"] >= 0
    # the same numbers as solving through the library
    objective, init = pose_graph_objective(io.read_g2o(path))
    assert summary["initial_cost"] == pytest.approx(float(objective.cost(init)[0]), rel=1e-12)
    solution = core.LevenbergMarquardt(max_iters=100, solver="sparse").solve(objective, init)
    assert summary["final_cost"] == pytest.approx(float(solution.info.final_cost[0]), rel=1e-9)


def test_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "square.g2o"
    path.write_text(_square_g2o())
    summary = main([str(path), "--json", "--quiet", "--solver", "dense", "--max-iters", "1"])
    assert summary["status"] == "max_iters" and summary["iterations"] == 1
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == summary


def test_cli_malformed_file_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.g2o"
    text = _square_g2o().splitlines()
    text[3] = "VERTEX_SE2 2 0.97 1.04"  # line 4: a field missing
    path.write_text("\n".join(text) + "\n")
    out = _run_cli(str(path), "--json", "--quiet")
    assert out.returncode != 0
    assert f"{path}:4:" in out.stderr, out.stderr[-3000:]
    assert not out.stdout.strip().endswith("}")  # no summary for a file that did not parse


# ------------------------------------------------------------------------------------------
# real data (skipped without ../shared/data)
# ------------------------------------------------------------------------------------------


@functools.cache
def _solve(path: Path) -> tuple[float, float, str, int]:
    """(initial cost, final cost, status, iterations) of LM on a g2o file, cached per file."""
    objective, init = pose_graph_objective(io.read_g2o(path))
    solution = core.LevenbergMarquardt(max_iters=100, solver="sparse").solve(objective, init)
    info = solution.info
    return (
        float(info.initial_cost[0]),
        float(info.final_cost[0]),
        info.status_names[0],
        int(info.iterations[0]),
    )


@functools.cache
def _gtsam(path: Path) -> float:
    from bench.peers import gtsam_pose_graph

    return gtsam_pose_graph(io.read_g2o(path)).final_cost


def _gtsam_final_cost(path: Path) -> float:
    pytest.importorskip("gtsam")
    return _gtsam(path)


def _data_file(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


def test_sphere2500_initial_cost(shared_data: Path) -> None:
    objective, init = pose_graph_objective(io.read_g2o(_data_file(shared_data, "sphere2500.g2o")))
    assert float(objective.cost(init)[0]) == pytest.approx(1_287_028, abs=1.0)


def test_sphere2500_reaches_published_optimum(shared_data: Path) -> None:
    initial, final, status, iterations = _solve(_data_file(shared_data, "sphere2500.g2o"))
    assert initial == pytest.approx(1_287_028, abs=1.0)
    assert final == pytest.approx(363.643, rel=1e-3)
    assert status == "converged" and iterations <= 20


@pytest.mark.parametrize("name", ["intel.g2o", "M3500.g2o"])
def test_2d_data_sets_converge(name: str, shared_data: Path) -> None:
    initial, final, status, _ = _solve(_data_file(shared_data, name))
    assert status == "converged"
    assert final < 0.5 * initial


@pytest.mark.parametrize(
    ("name", "published"), [("sphere2500.g2o", 363.643), ("intel.g2o", None), ("M3500.g2o", None)]
)
def test_final_cost_matches_gtsam(name: str, published: float | None, shared_data: Path) -> None:
    path = _data_file(shared_data, name)
    reference = _gtsam_final_cost(path)
    if published is not None:
        assert reference == pytest.approx(published, rel=1e-3)  # the peer itself is sane
    assert _solve(path)[1] == pytest.approx(reference, rel=1e-3)


def test_cli_on_real_data_matches_library(shared_data: Path) -> None:
    path = _data_file(shared_data, "intel.g2o")
    out = _run_cli(str(path), "--json", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    initial, final, status, iterations = _solve(path)
    assert summary["poses"] == 1728 and summary["edges"] == 2512
    assert summary["status"] == status and summary["iterations"] == iterations
    assert summary["initial_cost"] == pytest.approx(initial, rel=1e-12)
    assert summary["final_cost"] == pytest.approx(final, rel=1e-9)
    assert torch.isfinite(torch.tensor(summary["time_s"]))


# ------------------------------------------------------------------------------------------
# --export: the solved graph as an Open3D line set
# ------------------------------------------------------------------------------------------


def _check_exported_graph(ply: Path, g2o: Path) -> None:
    """``ply`` holds the solved graph of ``g2o``: N points at the solved positions (z = 0 in
    SE(2)), E lines = the edges, odometry and loop closures in their two colors."""
    o3d = pytest.importorskip("open3d")
    from apps.pose_graph import viz

    graph = io.read_g2o(g2o)
    objective, init = pose_graph_objective(graph)
    solved = core.LevenbergMarquardt(max_iters=100, solver="sparse").solve(objective, init)
    line_set = o3d.io.read_line_set(str(ply))
    points, lines = np.asarray(line_set.points), np.asarray(line_set.lines)
    colors = np.asarray(line_set.colors)
    assert points.shape == (graph.num_poses, 3) and lines.shape == (graph.num_edges, 2)
    expected = viz.positions(solved.values["poses"][0])
    np.testing.assert_allclose(points, expected, atol=1e-6 * max(1.0, np.abs(expected).max()))
    if graph.dim == 2:
        assert np.all(points[:, 2] == 0)
    edges = sorted(zip(graph.i.tolist(), graph.j.tolist()))
    assert sorted(map(tuple, lines.tolist())) == edges
    loop = lines[:, 1] != lines[:, 0] + 1
    np.testing.assert_allclose(colors[loop], np.tile(viz.LOOP, (int(loop.sum()), 1)), atol=1 / 255)
    np.testing.assert_allclose(colors[~loop], np.tile(viz.ESTIMATE, (int((~loop).sum()), 1)),
                               atol=1 / 255)


@pytest.mark.parametrize("dim", [2, 3])
def test_cli_export_writes_the_graph_as_a_line_set(dim: int, tmp_path: Path) -> None:
    from apps.pose_graph.data import GraphSpec, make_sample

    g2o = tmp_path / "synthetic.g2o"
    io.write_g2o(g2o, make_sample(GraphSpec(dim=dim, num_poses=(60, 70)), 3).graph)
    ply = tmp_path / "out" / "graph.ply"  # the folder does not exist yet
    out = _run_cli(str(g2o), "--json", "--quiet", "--export", str(ply))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["export"] == [str(ply)] and f"export: {ply}" in out.stdout
    _check_exported_graph(ply, g2o)


def test_cli_export_sphere2500(shared_data: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    g2o = _data_file(shared_data, "sphere2500.g2o")
    ply = tmp_path / "sphere2500.ply"
    summary = main([str(g2o), "--json", "--quiet", "--export", str(ply)])
    assert summary["export"] == [str(ply)]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    _check_exported_graph(ply, g2o)


def test_cli_export_unwritable_format_is_a_clear_error(tmp_path: Path) -> None:
    g2o = tmp_path / "square.g2o"
    g2o.write_text(_square_g2o())
    out = _run_cli(str(g2o), "--quiet", "--export", str(tmp_path / "graph.unknown"))
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "graph.unknown" in out.stderr and "write_line_set" in out.stderr


def test_cli_show_without_display_is_a_clear_error(tmp_path: Path) -> None:
    g2o = tmp_path / "square.g2o"
    g2o.write_text(_square_g2o())
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    out = subprocess.run([sys.executable, "-m", "apps.pose_graph.solve", str(g2o), "--show"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    message = out.stderr.strip().splitlines()
    assert len(message) == 1 and "DISPLAY" in message[0] and "--export" in message[0], message
    assert out.stdout == ""  # failed before solving


# ------------------------------------------------------------------------------------------
# exit status, one-line errors, valid JSON (issue 12)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("", "no vertices"),
    ("VERTEX_SE2 0 0 0 0\nEDGE_SE2 0 0 1 0 0 1 0 0 1 0 1\n", "itself"),
])
def test_cli_bad_file_is_one_line_and_exit_1(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.g2o"
    path.write_text(text)
    out = _run_cli(str(path), "--json", "--quiet")
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], out.stderr
    assert lines[0].startswith("python -m apps.pose_graph.solve: error: ")


def test_cli_failed_solve_exits_1_with_valid_json(tmp_path: Path) -> None:
    """A pose 1e300 away: the cost overflows, the solve fails; the JSON line says null."""
    path = tmp_path / "far.g2o"
    path.write_text("VERTEX_SE2 0 0 0 0\nVERTEX_SE2 1 1e300 0 0\nEDGE_SE2 0 1 1 0 0 1 0 0 1 0 1\n")
    out = _run_cli(str(path), "--json", "--quiet")
    assert out.returncode == 1
    summary = json.loads(out.stdout.strip().splitlines()[-1])  # strict JSON: no NaN/Infinity
    assert summary["status"] == "failed" and summary["final_cost"] is None
    assert out.stderr.strip().splitlines()[-1].endswith(
        "possible") and "the solve failed" in out.stderr


def _indefinite_g2o() -> str:
    """The square graph with the information of edge 2 (line 6) made indefinite."""
    lines = _square_g2o().splitlines()
    fields = lines[5].split()
    fields[6:12] = ["1", "0", "0", "-1", "0", "1"]  # information rows: [[1, 0, 0], [., -1, 0], 1]
    lines[5] = " ".join(fields)
    return "\n".join(lines) + "\n"


def test_cli_indefinite_information_names_the_option_and_repairs(tmp_path: Path) -> None:
    path = tmp_path / "indefinite.g2o"
    path.write_text(_indefinite_g2o())
    strict = _run_cli(str(path), "--quiet")
    assert strict.returncode == 1 and f"{path}:6:" in strict.stderr
    assert "--information nearest" in strict.stderr
    for choice in ("nearest", "diagonal"):
        out = _run_cli(str(path), "--quiet", "--json", "--information", choice)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1])["status"] != "failed"
        assert "replaced 1 of" in out.stderr
