"""Smoke test of ``python -m bench.gpu`` on the CPU (tiny batch): the rows, their throughput
arithmetic and the speedup against Ceres measured in the same run or given by --ceres-rate."""

from __future__ import annotations

import json

import pytest

from bench import ceres
from bench.gpu import main


def test_gpu_bench_tiny_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--batch", "2", "--poses", "32", "--iters", "3", "--device", "cpu",
            "--solvers", "sparse", "--peers", "--repeats", "1", "--ceres-rate", "100", "--json"]
    rows = main(argv)
    assert [r.solver for r in rows] == ["ariadne-sparse"]
    r = rows[0]
    # every convergence test is off: each of the 2 problems runs its 3 iterations (unless an
    # element hits the exact optimum first)
    assert 0 < r.problem_iterations <= 6
    assert r.rate == pytest.approx(r.problem_iterations / r.time_s)
    assert r.speedup_vs_ceres == pytest.approx(r.rate / 100)
    assert r.final_cost < r.initial_cost
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last[0]["solver"] == "ariadne-sparse" and last[0]["batch"] == 2


@pytest.mark.skipif(ceres._find_header("ceres/ceres.h") is None, reason="Ceres not installed")
def test_gpu_bench_ceres_row_gives_the_reference_rate() -> None:
    rows = main(["--batch", "2", "--poses", "32", "--iters", "3", "--device", "cpu",
                 "--solvers", "sparse", "--peers", "ceres", "--repeats", "1"])
    by = {r.solver: r for r in rows}
    assert by["ceres"].speedup_vs_ceres == pytest.approx(1.0)
    assert by["ceres"].final_cost == pytest.approx(by["ariadne-sparse"].final_cost, rel=1e-3)
    assert by["ariadne-sparse"].speedup_vs_ceres == pytest.approx(
        by["ariadne-sparse"].rate / by["ceres"].rate
    )
