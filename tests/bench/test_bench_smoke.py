"""Smoke tests of the benchmark: synthetic generators, peers' conventions, the CLI in tiny mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import ceres, peers
from bench.__main__ import main, make_cases, pose_graph_objective, select_cases
from bench.synthetic import (
    bal_cost,
    bal_project,
    bal_scene,
    compose_prefix,
    pose_graph_batch,
)
from core.io import BALProblem
from core.lie import se3, so3

SPHERE = Path(__file__).resolve().parents[3] / "shared" / "data" / "sphere2500.g2o"
HAVE_CERES = ceres._find_header("ceres/ceres.h") is not None
needs_ceres = pytest.mark.skipif(
    not HAVE_CERES, reason=f"Ceres not installed ({ceres.INSTALL_HINT})"
)


def _gtsam_or_skip():
    return pytest.importorskip("gtsam")


def test_pose_graph_batch_structure_and_determinism() -> None:
    pg = pose_graph_batch(64, 3, ring=8, seed=5)
    n, e = pg.num_poses, pg.num_edges
    assert pg.init.shape == pg.truth.shape == (3, n, 7)
    assert pg.measurements.shape == (3, e, 7) and pg.information.shape == (e, 6, 6)
    assert bool((pg.i < pg.j).all())
    gaps = set((pg.j - pg.i).tolist())
    assert gaps == {1, 8}  # odometry and loop closures one turn apart
    assert int((pg.j - pg.i == 1).sum()) == n - 1
    for q in (pg.init[..., 3:], pg.measurements[..., 3:]):
        assert torch.allclose(q.norm(dim=-1), torch.ones((), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(pg.init[:, 0], pg.truth[:, 0])
    again = pose_graph_batch(64, 3, ring=8, seed=5)
    assert torch.equal(again.measurements, pg.measurements) and torch.equal(again.init, pg.init)
    other = pose_graph_batch(64, 3, ring=8, seed=6)
    assert not torch.equal(other.measurements, pg.measurements)
    assert not torch.allclose(pg.truth[0], pg.truth[1])  # batch elements are distinct scenes


def test_pose_graph_batch_shorter_than_a_turn_is_refused() -> None:
    pose_graph_batch(16, ring=16)  # one turn, no loop closures
    with pytest.raises(ValueError, match=r"num_poses \(10\) must be at least ring \(16\)"):
        pose_graph_batch(10)


def test_noise_free_graph_is_consistent() -> None:
    pg = pose_graph_batch(40, 2, ring=8, sigma_t=1e-12, sigma_r=1e-12, seed=1)
    assert torch.allclose(pg.init, pg.truth, atol=1e-9)
    exact = se3.compose(se3.inverse(pg.truth[:, pg.i]), pg.truth[:, pg.j])
    assert torch.allclose(
        se3.log(se3.compose(se3.inverse(exact), pg.measurements)),
        torch.zeros((), dtype=torch.float64),
        atol=1e-9,
    )


def test_cost_at_truth_matches_noise_level() -> None:
    pg = pose_graph_batch(256, 4, seed=2)
    objective, _ = pose_graph_objective(pg)
    cost = objective.cost({"poses": pg.truth})
    expected = 0.5 * 6 * pg.num_edges  # whitened residuals ~ N(0, I)
    assert torch.all((cost - expected).abs() < 6 * math.sqrt(0.5 * 6 * pg.num_edges))


def test_compose_prefix_matches_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    first = se3.random(2, generator=gen, dtype=torch.float64)
    steps = se3.random(2, 12, generator=gen, dtype=torch.float64)
    poses = [first]
    for k in range(12):
        poses.append(se3.compose(poses[-1], steps[:, k]))
    assert torch.allclose(compose_prefix(first, steps), torch.stack(poses, dim=1), atol=1e-12)


def test_bal_scene_invariants() -> None:
    scene = bal_scene(6, 300, views=(3, 5), pixel_noise=0.0, seed=3)
    p = scene.problem
    assert p.cameras.shape == (6, 9) and p.points.shape == (300, 3)
    seen = torch.zeros(300, 6, dtype=torch.long).index_put_(
        (p.point_index, p.camera_index), torch.ones_like(p.point_index), accumulate=True
    )
    assert int(seen.max()) == 1  # no camera sees a point twice
    per_point = seen.sum(-1)
    assert int(per_point.min()) >= 3 and int(per_point.max()) <= 5
    truth = BALProblem(
        scene.true_cameras, scene.true_points, p.camera_index, p.point_index, p.observations
    )
    assert bal_cost(truth) < 1e-12  # noise-free observations are the true projections
    assert bal_cost(p) > 1.0  # the initial values are perturbed
    R = so3.to_matrix(so3.exp(scene.true_cameras[:, :3]))
    P = (R[p.camera_index] @ scene.true_points[p.point_index, :, None])[..., 0]
    assert bool((P + scene.true_cameras[p.camera_index, 3:6])[:, 2].lt(0).all())  # in front
    again = bal_scene(6, 300, views=(3, 5), pixel_noise=0.0, seed=3).problem
    assert torch.equal(again.observations, p.observations)
    assert bal_project(p.cameras[:1], p.points[:1]).shape == (1, 2)


def test_gtsam_costs_match_ours() -> None:
    _gtsam_or_skip()
    pg = pose_graph_batch(48, 1, ring=8, seed=4)
    objective, init = pose_graph_objective(pg)
    fg, values = peers.gtsam_pose_graph_problem(pg.graph(0))
    assert fg.error(values) == pytest.approx(float(objective.cost(init)[0]), rel=1e-10)
    problem = bal_scene(5, 100, views=(2, 4), seed=4).problem
    fg, values, _ = peers.gtsam_bal_problem(problem)
    assert fg.error(values) == pytest.approx(bal_cost(problem), rel=1e-10)


@needs_ceres
def test_ceres_runner_costs_match_ours() -> None:
    pg = pose_graph_batch(48, 2, ring=8, seed=7)
    objective, init = pose_graph_objective(pg)
    result = peers.ceres_pose_graphs([pg.graph(0), pg.graph(1)])
    assert result.initial_cost == pytest.approx(float(objective.cost(init).sum()), rel=1e-10)
    assert 0 < result.final_cost < result.initial_cost
    problem = bal_scene(5, 100, views=(2, 4), seed=4).problem
    result = peers.ceres_bal(problem)
    assert result.initial_cost == pytest.approx(bal_cost(problem), rel=1e-10)
    assert result.final_cost < result.initial_cost


@pytest.mark.slow
@needs_ceres
@pytest.mark.skipif(not SPHERE.exists(), reason="sphere2500.g2o not in ../shared/data")
def test_ceres_runner_sphere2500_check_numbers() -> None:
    from core.io import read_g2o

    result = peers.ceres_pose_graphs([read_g2o(SPHERE)])
    assert result.initial_cost == pytest.approx(1_287_028.398, rel=1e-9)
    assert result.final_cost == pytest.approx(363.643, abs=1e-3)


def test_select_cases() -> None:
    cases = make_cases(tiny=True)
    assert {c.batch for c in select_cases(cases, ["synthetic_pg"])} == {1, 4}
    assert all(c.name.startswith("scaling") for c in select_cases(cases, ["scaling"]))
    assert len(select_cases(cases, ["sphere2500,synthetic_ba"])) == 2
    with pytest.raises(SystemExit):
        select_cases(cases, ["nope"])
    assert all("100k" not in c.name for c in make_cases(quick=True))


def test_main_tiny_json(capsys: pytest.CaptureFixture[str]) -> None:
    _gtsam_or_skip()
    main(
        [
            "--cases",
            "synthetic_pg",
            "--quick",
            "--tiny",
            "--json",
            "--solvers",
            "ariadne-sparse",
            "gtsam",
            "ceres",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(out[-1])
    keys = {
        "case",
        "solver",
        "batch",
        "time_s",
        "iterations",
        "initial_cost",
        "final_cost",
        "ratio_to_best_peer",
    }
    assert all(keys <= set(r) for r in rows)
    assert {(r["solver"], r["batch"]) for r in rows} >= {
        ("ariadne-sparse", 1),
        ("ariadne-sparse", 4),
        ("gtsam", 4),
    }
    for batch in (1, 4):
        done = [r for r in rows if r["batch"] == batch and r["time_s"] is not None]
        ref = done[0]["initial_cost"]
        assert all(r["initial_cost"] == pytest.approx(ref, rel=1e-9) for r in done)
        assert all(r["final_cost"] < r["initial_cost"] for r in done)
        ariadne = next(r for r in done if r["solver"] == "ariadne-sparse")
        assert ariadne["ratio_to_best_peer"] > 0
    ceres_rows = [r for r in rows if r["solver"] == "ceres"]
    assert all((r["time_s"] is not None) == HAVE_CERES for r in ceres_rows)


def test_missing_ceres_is_a_clear_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ARIADNE_CACHE", str(tmp_path))  # no cached runner
    monkeypatch.setattr(ceres, "_INCLUDE_DIRS", (tmp_path,))  # no headers
    with pytest.raises(ceres.CeresUnavailable, match="libceres-dev"):
        ceres.build()
    main(["--cases", "synthetic_pg", "--quick", "--tiny", "--json", "--solvers", "ceres"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows and all(r["time_s"] is None for r in rows)
    assert all(r["note"].startswith("skipped: Ceres is not installed") for r in rows)


def test_busy_processes_run_and_end() -> None:
    from bench.__main__ import busy_processes

    with busy_processes(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(SystemExit):
        main(["--tiny", "--load", "-1", "--cases", "synthetic_pg"])


@pytest.mark.skipif(not SPHERE.is_file(), reason="sphere2500.g2o not available")
def test_cold_runner_reports_a_fresh_process_first_solve() -> None:
    from bench.__main__ import cold_runner

    run = cold_runner(SPHERE)
    result = run(2)
    assert result.solver == "ariadne-sparse-cold" and result.iterations == 2
    assert result.initial_cost == pytest.approx(1287028.398, rel=1e-6)
    assert result.time_s > 0 and len(run.warm) == 1 and run.warm[0] > 0  # type: ignore[attr-defined]


def test_load_bench_alternates_quiet_and_loaded_rounds() -> None:
    """``bench.load`` on a tiny case: every solver measured in both states, the ratios printed."""
    _gtsam_or_skip()
    from bench import load

    case = select_cases(make_cases(tiny=True), ["synthetic_pg"])[0]
    times = load.measure(case, rounds=1, repeats=2, load=1, with_ceres=False)
    assert set(times) == {(n, k) for n in ("ariadne", "ariadne-1", "gtsam") for k in (0, 1)}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in times.values())
    lines = load.table(case, times, 1)
    assert lines[0].startswith(f"{case.name} (batch {case.batch})")
    assert sum("vs best peer" in line for line in lines) == 2
    with pytest.raises(SystemExit):
        load.main(["--rounds", "0"])
