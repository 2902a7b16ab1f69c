"""Smoke tests of ``python -m bench.paper``: experiments in their tiniest form write the three
stamped files with the promised columns; the apps experiment reads given run folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import apps
from bench import paper, paper_apps, paper_scaling, paper_vectorization
from bench.paper_output import Context, read_csv

STAMP_KEYS = ("command", "commit", "cpu", "gpu", "torch", "cuda", "blas")


def _check_files(out: Path, name: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    csv_path, md_path, png_path = (out / f"{name}.{ext}" for ext in ("csv", "md", "png"))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_path.stat().st_size > 10_000  # a drawn figure, not an empty canvas
    header = [ln for ln in csv_path.read_text().splitlines() if ln.startswith("# ")]
    assert [ln[2:].split(":", 1)[0] for ln in header][:len(STAMP_KEYS) + 1] == [
        "command", "commit", "date", "cpu", "gpu", "torch", "cuda", "blas"]
    assert f"python -m bench.paper {name}" in header[0]
    found, rows = read_csv(csv_path)
    assert tuple(found) == columns
    md = md_path.read_text()
    assert all(f"- {key}:" in md for key in STAMP_KEYS)
    assert "| " + " | ".join(columns[:3]) in md
    return rows


def test_vectorization_tiny(tmp_path: Path) -> None:
    written = paper.main(["vectorization", "--tiny", "--out", str(tmp_path)])
    assert [p.name for p in written["vectorization"]] == [
        "vectorization.csv", "vectorization.md", "vectorization.png"]
    rows = _check_files(tmp_path, "vectorization", paper_vectorization.COLUMNS)
    sizes = paper_vectorization.POSES["tiny"]
    assert [(r["layout"], int(r["poses"])) for r in rows] == [
        (layout, n) for n in sizes for layout in ("table", "per_factor")]
    for table, per in zip(rows[::2], rows[1::2]):
        assert int(table["costs"]) == 2 and int(per["costs"]) == int(per["factors"])
        assert math.isclose(float(table["final_cost"]), float(per["final_cost"]), rel_tol=1e-6)
        assert float(per["speedup_table"]) > 0
    png = tmp_path / "vectorization.png"
    png.unlink()
    assert paper.main(["vectorization", "--replot", "--out", str(tmp_path)]) == {
        "vectorization": [png]}
    assert png.stat().st_size > 10_000


def test_replot_needs_the_csv(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="scaling.csv does not exist"):
        paper.main(["scaling", "--replot", "--out", str(tmp_path)])


def test_scaling_tiny(tmp_path: Path) -> None:
    paper.main(["scaling", "--tiny", "--out", str(tmp_path), "--device", "cuda"])
    rows = _check_files(tmp_path, "scaling", paper_scaling.COLUMNS)
    ran = {(r["solver"], r["sweep"], int(r["poses"]), int(r["batch"])) for r in rows
           if r["time_s"]}
    for p in paper_scaling.points("tiny"):
        assert ("sparse", p["sweep"], p["poses"], p["batch"]) in ran
    for r in rows:
        if r["time_s"]:
            assert float(r["peak_mem_mb"]) >= 0 and r["memory_measure"]
            assert float(r["final_cost"]) <= float(r["initial_cost"]) * (1 + 1e-9)
        else:
            assert r["note"].startswith("skipped:"), r
    md = (tmp_path / "scaling.md").read_text()
    if not torch.cuda.is_available():
        assert "no CUDA device" in md


def _fake_run(folder: Path, app: str, value: float) -> None:
    metric = apps.task(app).metric
    folder.mkdir(parents=True)
    val = {metric: value, f"{metric}_baseline": 2 * value, f"{metric}_oracle": value / 2,
           f"{metric}_ratio": 0.5, f"{metric}_median": value, f"{metric}_median_baseline": 9.0,
           "other": 1.0}
    doc = {"app": app, "epochs": 3, "val": val, "untrained": {f"val_{metric}": 3 * value}}
    (folder / "metrics.json").write_text(json.dumps(doc))


def test_apps_from_given_runs(tmp_path: Path) -> None:
    runs = []
    for k, app in enumerate(apps.APPS):
        _fake_run(tmp_path / "runs" / app, app, 1.0 + k)
        runs.append(f"{app}={tmp_path / 'runs' / app}")
    paper.main(["apps", "--out", str(tmp_path / "out"), "--runs", *runs])
    rows = _check_files(tmp_path / "out", "apps", paper_apps.COLUMNS)
    for k, app in enumerate(apps.APPS):
        mine = {r["method"]: float(r["value"]) for r in rows if r["app"] == app}
        base = 1.0 + k
        assert mine == {"learned": base, "untrained": 3 * base, "baseline": 2 * base,
                        "oracle": base / 2}


def test_methods_rejects_missing_baseline() -> None:
    with pytest.raises(ValueError, match="ate_baseline"):
        paper_apps.methods({"app": "pose_graph", "val": {"ate": 1.0}}, "ate")
    with pytest.raises(ValueError, match="non-finite"):
        paper_apps.methods({"val": {"ate": float("nan"), "ate_baseline": 1.0}}, "ate")


def test_bad_arguments_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="nowhere"):
        paper.main(["apps", "--out", str(tmp_path), "--runs", f"tactile={tmp_path}/nowhere"])
    with pytest.raises(SystemExit, match="APP=DIR"):
        paper.main(["apps", "--out", str(tmp_path), "--runs", "tactile"])
    with pytest.raises(SystemExit, match="-3"):
        paper.main(["scaling", "--out", str(tmp_path), "--threads", "-3"])


def test_scaling_worker_error_is_a_row_and_fails_the_command(tmp_path: Path) -> None:
    ctx = Context(out=tmp_path, tiny=True)
    point = paper_scaling.points("tiny")[0]
    rows = paper_scaling._run_worker("no-such-solver", [point], ctx)
    assert len(rows) == 1 and rows[0]["note"].startswith("error: KeyError")
    assert ctx.errors and "no-such-solver" in ctx.errors[0]


def test_apps_failed_run_is_a_row_and_fails_the_command(tmp_path: Path) -> None:
    runs = []
    for app in apps.APPS:
        _fake_run(tmp_path / "runs" / app, app, 1.0)
        runs.append(f"{app}={tmp_path / 'runs' / app}")
    broken = tmp_path / "runs" / apps.APPS[0] / "metrics.json"
    broken.write_text(json.dumps({"app": apps.APPS[0], "val": {}}))
    with pytest.raises(SystemExit, match=f"apps {apps.APPS[0]}"):
        paper.main(["apps", "--out", str(tmp_path / "out"), "--runs", *runs])
    rows = _check_files(tmp_path / "out", "apps", paper_apps.COLUMNS)
    assert [r["method"] for r in rows if r["app"] == apps.APPS[0]] == ["error"]
    assert {r["app"] for r in rows if r["method"] == "learned"} == set(apps.APPS[1:])
