"""``python -m apps.study``: a multirun over backward modes and iterations, collected into a
table, a CSV and a figure."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from apps import study


@pytest.mark.slow
def test_study_collects_every_run(tmp_path: Path) -> None:
    rows = study.main(["pose_graph", "--quick", "--out", str(tmp_path), "--modes",
                       "unroll,implicit", "--iters", "1,3", "num_val=2"])  # overrides last
    assert [(r["backward"], r["iterations"]) for r in rows] == [
        ("unroll", 1), ("unroll", 3), ("implicit", 1), ("implicit", 3)]
    saved = {(r["backward"], r["iterations"]): r["saved_mb"] for r in rows}
    assert saved[("unroll", 3)] > saved[("unroll", 1)]  # unrolling keeps every iteration
    assert saved[("implicit", 3)] == saved[("implicit", 1)]  # the implicit backward does not
    table = (tmp_path / "backward_study.md").read_text()
    assert table.count("\n| unroll |") == 2 and "| ate |" in table
    with (tmp_path / "backward_study.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "backward_study.png").stat().st_size > 0


def test_study_rejects_unknown_modes(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown modes"):
        study.main(["pose_graph", "--out", str(tmp_path), "--modes", "sideways"])
