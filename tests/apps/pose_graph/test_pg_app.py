"""The pose-graph app's own tests (the shared contract is ``tests/apps/test_contract.py``): SE(2)
and real-format-graph smoke runs, the data generator's invariants, the metrics, bad input, a g2o
write/read/solve round trip and the picture's fallback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import core
from apps import common
from apps.common import roc_auc
from apps.pose_graph import data as pg_data
from apps.pose_graph import train, viz
from apps.pose_graph.data import FEATURES, GraphSpec, Sample, make_dataset, make_sample
from apps.pose_graph.model import EdgeWeightNet
from apps.pose_graph.problem import GraphProblem, anchor, ate, pose_graph_objective, rpe
from apps.pose_graph.solve import main as solve_main
from core import io

ROOT = Path(__file__).resolve().parents[3]
VAL_KEYS = {"ate", "ate_baseline", "rpe", "rpe_baseline", "outlier_precision", "outlier_recall"}


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> GraphSpec:
    return GraphSpec(num_poses=(60, 80))


# ------------------------------------------------------------------------------------------
# the app's own runs (the contract is tests/apps/test_contract.py)
# ------------------------------------------------------------------------------------------


def test_smoke_se2_with_picture(tmp_path: Path, app_config) -> None:
    doc = train.run(app_config("pose_graph", tmp_path, "data.dim=2", "viz=true",
                               "data.num_poses=[40,45]"))
    assert VAL_KEYS <= set(doc["val"]) and math.isfinite(doc["val"]["ate"])
    assert (tmp_path / "pose_graph.png").stat().st_size > 0


def test_smoke_with_real_format_graphs(tmp_path: Path, app_config,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """``eval_g2o``: each g2o file (written from a clean synthetic graph) gets
    ``eval_g2o_outlier_ratio`` of its loop closures injected as outliers and is solved by the
    trained network and every baseline; an absent file is skipped with a note."""
    s = make_sample(GraphSpec(num_poses=(60, 70), outlier_ratio=0.0), 21)
    path = tmp_path / "clean.g2o"
    io.write_g2o(path, s.graph)
    doc = train.run(app_config("pose_graph", tmp_path, f"eval_g2o=[{path},{tmp_path}/no.g2o]",
                               "eval_g2o_outlier_ratio=0.2", "viz=true"))
    assert set(doc["g2o"]) == {"clean.g2o"} and "no.g2o not found, skipped" in caplog.text
    g2o = doc["g2o"]["clean.g2o"]
    assert g2o["poses"] == s.graph.num_poses
    assert g2o["outliers"] == round(0.2 / 0.8 * (g2o["loop_closures"] - g2o["outliers"]))
    assert all(math.isfinite(g2o[k]) for k in ("ate", "ate_baseline", "ate_oracle",
                                                "ate_best_fixed", "ate_gnc_ariadne"))
    assert g2o["ate_oracle"] < 1e-6  # the clean graph's optimum is the ground truth
    saved = json.loads((tmp_path / "metrics.json").read_text())["g2o"]["clean.g2o"]
    assert saved["file"] == str(path)
    assert (tmp_path / "pose_graph_clean.png").stat().st_size > 0


def test_cuda_request_without_cuda_raises() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="CUDA"):
        common.select_device("cuda")
    assert common.select_device("auto").type == "cpu"


@pytest.mark.slow
def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of a 2-process launch on a 1-GPU node would fail deep in CUDA ("invalid device
    ordinal"); it is refused before joining the group, saying what to change."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"local rank 1.*1 CUDA device.*device=cpu"):
        common.setup_distributed(torch.device("cuda"))


def test_bad_app_config_raises(tmp_path: Path, app_config) -> None:
    with pytest.raises(ValueError, match="trajectories"):
        train.run(app_config("pose_graph", tmp_path, "data.trajectories=[spiral]"))
    with pytest.raises(ValueError, match="viz_graph"):
        train.run(app_config("pose_graph", tmp_path, "viz_graph=5"))
    with pytest.raises(ValueError, match="solver=schur.*none"):
        train.run(app_config("pose_graph", tmp_path, "solver=schur"))


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [3, 2])
@pytest.mark.parametrize("kind", pg_data.TRAJECTORIES)
def test_sample_invariants(dim: int, kind: str) -> None:
    spec = GraphSpec(dim=dim, num_poses=(60, 80))
    s = make_sample(spec, 7, kind)
    g, n = s.graph, s.graph.num_poses
    assert s.kind == kind and 60 <= n <= 80 and g.dim == dim
    assert g.poses.shape == (n, 7 if dim == 3 else 4) == s.truth.shape
    odo = ~s.is_loop
    assert bool(odo[: n - 1].all()) and not bool(odo[n - 1 :].any())
    assert torch.equal(g.j[: n - 1], g.i[: n - 1] + 1)
    loops = s.is_loop
    assert bool(((g.j - g.i)[loops] >= spec.min_gap).all())
    assert int(s.is_outlier.sum()) == round(0.25 / 0.75 * int((loops & ~s.is_outlier).sum()))
    assert torch.allclose(g.poses[0], s.truth[0])
    assert s.features.shape == (int(loops.sum()), len(FEATURES))
    assert bool(torch.isfinite(s.features).all())
    assert bool((torch.linalg.eigvalsh(g.tangent_information()) > 0).all())
    # inlier measurements agree with the truth up to the noise; odometry composes to init
    space = s.space
    exact = space.compose(space.inverse(s.truth[g.i]), s.truth[g.j])
    err = space.local(exact, g.measurements)
    inlier = ~s.is_outlier
    assert float(err[inlier].abs().max()) < 0.5
    assert float(err[s.is_outlier].norm(dim=-1).max()) > 0.2  # outliers are wrong


def test_generator_is_seeded(spec: GraphSpec) -> None:
    a, b, c = make_sample(spec, 3), make_sample(spec, 3), make_sample(spec, 4)
    assert torch.equal(a.graph.measurements, b.graph.measurements)
    assert torch.equal(a.features, b.features) and torch.equal(a.truth, b.truth)
    assert a.graph.measurements.shape != c.graph.measurements.shape or not torch.equal(
        a.graph.measurements, c.graph.measurements)


def test_score_alone_has_auc_about_0_8() -> None:
    spec = GraphSpec(num_poses=(40, 50))
    samples = [make_sample(spec, k) for k in range(40)]
    score = torch.cat([s.features[:, 0] for s in samples])
    inlier = ~torch.cat([s.loop_outlier for s in samples])
    assert 0.74 < roc_auc(score, inlier) < 0.86
    assert roc_auc(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([False, True, True])) == 1.0


@pytest.mark.parametrize("dim", [3, 2])
def test_outliers_injected_into_a_real_format_graph(dim: int) -> None:
    clean = make_sample(GraphSpec(dim=dim, num_poses=(60, 70), outlier_ratio=0.0), 5)
    loops = int(clean.is_loop.sum())
    s = pg_data.from_graph(clean.graph, clean.truth, GraphSpec(), seed=1)
    assert s.graph.dim == dim and s.kind == "g2o"
    assert int(s.is_outlier.sum()) == round(loops / 3) and int(s.is_loop.sum()) > loops
    assert torch.equal(s.graph.poses, clean.graph.poses)
    assert bool(torch.isfinite(s.features).all())
    inliers = s.is_loop & ~s.is_outlier
    assert torch.equal(s.graph.measurements[inliers], clean.graph.measurements[clean.is_loop])
    with pytest.raises(ValueError, match="odometry"):
        broken = io.PoseGraph(dim=dim, poses=clean.graph.poses, ids=clean.graph.ids,
                              i=clean.graph.i[1:], j=clean.graph.j[1:],
                              measurements=clean.graph.measurements[1:],
                              information=clean.graph.information[1:])
        pg_data.from_graph(broken, clean.truth, GraphSpec(), seed=1)


def test_real_graph_starts_from_its_composed_odometry() -> None:
    """A file whose poses are already its optimum (intel.g2o's are) starts, as the synthetic
    graphs do, from the odometry composed from its first pose; the features are then computed
    against that estimate, not against the optimum."""
    clean = make_sample(GraphSpec(num_poses=(60, 70), outlier_ratio=0.0), 5)
    optimum = io.PoseGraph(dim=3, poses=clean.truth, ids=clean.graph.ids, i=clean.graph.i,
                           j=clean.graph.j, measurements=clean.graph.measurements,
                           information=clean.graph.information)
    s = pg_data.from_graph(optimum, clean.truth, GraphSpec(), seed=1)
    assert torch.allclose(s.graph.poses, clean.graph.poses, atol=1e-12)
    assert float(ate(s.graph.poses[None], s.truth, s.space)[0]) > 0.05
    inliers = ~s.loop_outlier
    assert float(s.features[inliers, 1].mean()) > -4  # log |e_t|: the drift, not ~0


@pytest.mark.parametrize("warm_start", ["tls", "gm", "none"])
def test_warm_start_builds_on_gnc(tmp_path: Path, app_config, warm_start: str) -> None:
    """The learned layer's start: GNC's solution (closer to the truth than the odometry) with
    the features recomputed against it (the score kept), or the odometry itself."""
    from apps.pose_graph import baseline as pg_baseline

    cfg = app_config("pose_graph", tmp_path, f"model.warm_start={warm_start}")
    s = make_sample(GraphSpec(num_poses=(80, 90)), 4)
    graphs = pg_baseline.learned_graphs([s], cfg, torch.device("cpu"))
    start, x = graphs.starts[0], graphs.features[0]
    assert x.shape == s.features.shape and torch.equal(x[:, 0], s.features[:, 0])
    if warm_start == "none":
        assert torch.equal(start, s.graph.poses) and torch.equal(x, s.features)
        return
    odometry = float(ate(s.graph.poses[None], s.truth, s.space)[0])
    assert float(ate(start[None], s.truth, s.space)[0]) < 0.5 * odometry
    residual = x[:, 5]  # log |U e| against the warm start: the outliers stand out
    assert roc_auc(-residual, ~s.loop_outlier) > 0.8
    p = graphs.problems[0]
    assert torch.equal(p.inputs(torch.ones(p.num_loops), 1.0, init=start)["poses"][0], start)
    with pytest.raises(ValueError, match="init must have shape"):
        p.inputs(torch.ones(p.num_loops), 1.0, init=start[1:])


def test_dataset_cache_round_trip(tmp_path: Path, spec: GraphSpec) -> None:
    first = make_dataset(spec, [1, 2], tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    again = make_dataset(spec, [1, 2], tmp_path)
    for a, b in zip(first, again):
        assert torch.equal(a.graph.measurements, b.graph.measurements)
        assert torch.equal(a.is_outlier, b.is_outlier) and a.kind == b.kind
    make_dataset(GraphSpec(num_poses=(60, 81)), [1, 2], tmp_path)  # other settings: other key
    assert len(list(tmp_path.glob("*.pt"))) == 2


# ------------------------------------------------------------------------------------------
# problem, metrics, model
# ------------------------------------------------------------------------------------------


def test_metrics_are_invariant_to_a_rigid_motion(spec: GraphSpec) -> None:
    s = make_sample(spec, 5)
    move = core.SE3.random(1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moved = core.SE3.compose(move[:, None], s.truth[None])
    assert float(ate(moved, s.truth, core.SE3)[0]) < 1e-9
    assert float(rpe(moved, s.truth, core.SE3)[0]) < 1e-9
    assert torch.allclose(anchor(moved, s.truth, core.SE3)[0], s.truth, atol=1e-9)
    shifted = s.truth.clone()
    shifted[1:, 0] += 1.0  # all but the anchor one metre off
    expected = math.sqrt((s.graph.num_poses - 1) / s.graph.num_poses)
    assert float(ate(shifted[None], s.truth, core.SE3)[0]) == pytest.approx(expected)


def test_oracle_weights_beat_no_weights(spec: GraphSpec) -> None:
    """Rejecting exactly the outliers gives a better solution than keeping them all (L2)."""
    lm = core.LevenbergMarquardt(max_iters=30, solver="sparse")
    oracle, everything, initial = 0.0, 0.0, 0.0
    for seed in range(3):  # one graph of each kind
        s = make_sample(spec, seed)
        p = GraphProblem.build(s.graph, s.is_loop, "cauchy")
        weights = torch.stack([(~s.loop_outlier).double(),
                               torch.ones(p.num_loops, dtype=torch.float64)])
        inputs = p.inputs(weights, torch.tensor(1e6, dtype=torch.float64))
        aux = {k: v for k, v in inputs.items() if k != "poses"}
        sol = lm.solve(p.objective.with_inputs(aux), {"poses": inputs["poses"]})
        a, b = ate(sol.values["poses"], s.truth, s.space).tolist()
        oracle, everything = oracle + a, everything + b
        initial += float(ate(s.graph.poses[None], s.truth, s.space)[0])
    assert oracle < 0.7 * everything and oracle < 0.5 * initial


def test_gradients_reach_the_network(spec: GraphSpec) -> None:
    s = make_sample(spec, 1)
    p = GraphProblem.build(s.graph, s.is_loop, "cauchy")
    net = EdgeWeightNet(len(FEATURES)).double()
    net.fit_normalization(s.features)
    layer = core.OptimizationLayer(p.objective, core.LevenbergMarquardt(max_iters=20,
                                                                        solver="sparse"))
    w, scale = net(s.features)
    sol, _ = layer(p.inputs(w, scale))
    ate(sol["poses"], s.truth, s.space).sum().backward()
    grads = [q.grad for q in net.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert float(net.log_scale.grad.abs()) > 0 and float(net.mlp[0].weight.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_bad_generator_settings_raise() -> None:
    with pytest.raises(ValueError, match="dim"):
        GraphSpec(dim=4)
    with pytest.raises(ValueError, match="unknown trajectories"):
        GraphSpec(trajectories=("spiral",))
    with pytest.raises(ValueError, match="outlier_ratio"):
        GraphSpec(outlier_ratio=1.0)
    with pytest.raises(ValueError, match="num_poses"):
        GraphSpec(num_poses=(10, 20))
    with pytest.raises(ValueError, match="outlier_mix"):
        GraphSpec(outlier_mix=(0.5, -1.0, 0.5))


def test_wrong_shapes_raise(spec: GraphSpec) -> None:
    s = make_sample(spec, 1)
    with pytest.raises(ValueError, match="features"):
        Sample(s.graph, s.truth, s.is_loop, s.is_outlier, s.features[:, :3], s.kind)
    with pytest.raises(ValueError, match="truth"):
        Sample(s.graph, s.truth[:-1], s.is_loop, s.is_outlier, s.features, s.kind)
    p = GraphProblem.build(s.graph, s.is_loop)
    with pytest.raises(ValueError, match="loop weights"):
        p.inputs(torch.ones(p.num_loops + 1, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="is_loop"):
        GraphProblem.build(s.graph, s.is_loop[:-1])
    with pytest.raises(ValueError, match="features"):
        EdgeWeightNet(len(FEATURES))(torch.zeros(3, len(FEATURES) + 1))
    with pytest.raises(ValueError, match="score"):
        pg_data.edge_features(s.graph, s.is_loop, torch.zeros(2))


def test_malformed_g2o_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.g2o"
    path.write_text("VERTEX_SE3:QUAT 0 0 0 0 0 0 0 1\nEDGE_SE3:QUAT 0 1 0 0\n")
    with pytest.raises(SystemExit, match=f"{path}:2:"):
        solve_main([str(path), "--quiet"])


# ------------------------------------------------------------------------------------------
# g2o round trip and pictures
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [3, 2])
def test_g2o_write_read_solve(tmp_path: Path, dim: int,
                              capsys: pytest.CaptureFixture[str]) -> None:
    spec = GraphSpec(dim=dim, num_poses=(60, 70), outlier_ratio=0.0)
    s = make_sample(spec, 11)
    path = tmp_path / "synthetic.g2o"
    io.write_g2o(path, s.graph)
    back = io.read_g2o(path)
    assert back.dim == dim and back.num_poses == s.graph.num_poses
    assert torch.equal(back.i, s.graph.i) and torch.equal(back.j, s.graph.j)
    assert torch.allclose(back.measurements, s.graph.measurements, atol=1e-12)
    assert torch.allclose(back.information, s.graph.information)
    # the library's solve of the file's graph improves on the odometry
    objective, init = pose_graph_objective(back)
    solution = core.LevenbergMarquardt(max_iters=50, solver="sparse").solve(objective, init)
    solved = solution.values["poses"]
    assert float(ate(solved, s.truth, s.space)[0]) < float(ate(init["poses"], s.truth, s.space)[0])
    # and the CLI gives the same, with a picture
    png = tmp_path / "graph.png"
    summary = solve_main([str(path), "--json", "--quiet", "--max-iters", "50", "--viz", str(png)])
    assert summary["final_cost"] == pytest.approx(float(solution.info.final_cost[0]), rel=1e-9)
    assert summary["viz"] == str(png) and png.stat().st_size > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary


def test_picture_falls_back_to_matplotlib(tmp_path: Path, spec: GraphSpec,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("no OpenGL here")

    from apps import viewer

    monkeypatch.setattr(viewer, "_render_open3d", broken)
    s = make_sample(spec, 1)
    i, j = s.graph.i[s.is_loop], s.graph.j[s.is_loop]
    path = tmp_path / "fallback.png"
    viz.draw_solution(path, s.graph.poses, s.truth, i, j, s.loop_outlier,
                      torch.rand(int(s.is_loop.sum())), title="fallback")
    assert path.stat().st_size > 0


# ------------------------------------------------------------------------------------------
# the strongest classical baselines: best fixed loss, GNC (Ariadne's and GTSAM's)
# ------------------------------------------------------------------------------------------


def test_strongest_baselines_in_metrics(tmp_path: Path, app_config) -> None:
    """Smoke run with GTSAM's GNC on: every strongest baseline's keys in ``val``, ``ate_gnc``
    the better of TLS and GM, the tuned settings in ``strongest``."""
    pytest.importorskip("gtsam")
    doc = train.run(app_config("pose_graph", tmp_path, "baseline.gnc.gtsam=[tls,gm]"))
    val = doc["val"]
    for name in ("best_fixed", "gnc_ariadne", "gnc_tls", "gnc_gm"):
        assert math.isfinite(val[f"ate_{name}"]) and f"rpe_{name}" in val
    assert val["ate_gnc"] == min(val["ate_gnc_tls"], val["ate_gnc_gm"])
    assert val["ate_baseline"] > 0 and set(doc["strongest"]) == {
        "best_fixed", "gnc_ariadne", "gnc_tls", "gnc_gm"}
    assert doc["strongest"]["best_fixed"]["loss"] in ("cauchy", "welsch")


def test_gnc_skipped_cleanly_without_gtsam(tmp_path: Path, app_config, monkeypatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    from apps.pose_graph import baseline as pg_baseline

    monkeypatch.setattr(pg_baseline, "gtsam_available", lambda: False)
    doc = train.run(app_config("pose_graph", tmp_path, "baseline.gnc.gtsam=[tls]",
                               "baseline.gnc.ariadne=false", "baseline.best_fixed=[]"))
    assert not any(k.startswith(("ate_gnc", "ate_best_fixed")) for k in doc["val"])
    assert "gtsam is not installed" in caplog.text


def test_gtsam_gnc_without_outliers_is_the_least_squares_optimum() -> None:
    """GTSAM's GNC on a graph without outliers keeps every loop closure: its solution (read back
    into our pose layout) is our LM's least-squares optimum, in 3D and 2D."""
    pytest.importorskip("gtsam")
    from apps.pose_graph import baseline as pg_baseline

    for dim in (3, 2):
        s = make_sample(GraphSpec(dim=dim, num_poses=(40, 45), outlier_ratio=0.0), 5)
        objective, init = pose_graph_objective(s.graph)
        lm = core.LevenbergMarquardt(solver="sparse", max_iters=50)
        ours = lm.solve(objective, init).values["poses"]
        for kind in ("tls", "gm"):
            theirs = pg_baseline.gtsam_gnc(s, kind, 100.0, 1e3)
            assert theirs.shape == ours.shape
            assert float(ate(theirs, ours[0], s.space)[0]) < 1e-3


def test_ariadne_gnc_beats_the_plain_loss_at_its_scale(tmp_path: Path, app_config) -> None:
    """The graduated schedule reaches a better optimum of Geman-McClure than LM on the same loss
    and scale from the odometry initialization (the point of GNC), on a graph with outliers."""
    from apps.config import make_optimizer
    from apps.pose_graph import baseline as pg_baseline

    cfg = app_config("pose_graph", tmp_path, "optimizer.max_iters=30", "baseline.gnc.start=64")
    s = make_sample(GraphSpec(num_poses=(80, 90)), 3)
    p = GraphProblem.build(s.graph, s.is_loop, "geman_mcclure")
    target = torch.tensor([2.0], dtype=torch.float64)
    graduated = float(ate(pg_baseline.gnc_ariadne(p, cfg, target), s.truth, s.space)[0])
    inputs = p.inputs(torch.ones(1, p.num_loops, dtype=torch.float64), target)
    aux = {k: v for k, v in inputs.items() if k != "poses"}
    plain = make_optimizer(cfg).solve(p.objective.with_inputs(aux), {"poses": inputs["poses"]})
    assert graduated < 0.8 * float(ate(plain.values["poses"], s.truth, s.space)[0])


def test_picture_shows_the_strongest_baseline(tmp_path: Path, app_config, monkeypatch) -> None:
    """The picture shows the strongest baseline's held-out solution as the reference computed
    it (not solved again)."""
    from apps.pose_graph import baseline as pg_baseline

    drawn: dict = {}
    monkeypatch.setattr(viz, "draw_solution", lambda *a, **k: drawn.update(k))
    solve = pg_baseline.solve_baseline

    def kept_only(*args, poses=None):
        assert poses is not None, "the picture solved the baseline again"
        return solve(*args, poses=poses)

    monkeypatch.setattr(pg_baseline, "solve_baseline", kept_only)
    doc = train.run(app_config("pose_graph", tmp_path, "viz=true"))
    val = doc["val"]
    best = min(("baseline", "best_fixed", "gnc_ariadne"), key=lambda n: val[f"ate_{n}"])
    label = {"baseline": "tuned", "best_fixed": "best fixed", "gnc_ariadne": "GNC-GM"}[best]
    assert drawn["baseline_name"].startswith(label)
    assert f"{min(val[f'ate_{best}'], 1e9):.3f} m {label}" in drawn["title"]


def test_real_files_can_skip_gtsam(tmp_path: Path, app_config) -> None:
    """``eval_g2o_gtsam=false``: the GTSAM GNCs of the reference are not run on a real file;
    the others are."""
    from apps.pose_graph import baseline as pg_baseline

    cfg = app_config("pose_graph", tmp_path, "eval_g2o_gtsam=false")
    s = make_sample(GraphSpec(num_poses=(40, 45)), 2)
    reference = {"chosen": {"best_fixed": {"loss": "cauchy", "scale": 4.0},
                            "gnc_tls": {"scale": 4.0}}}
    out = pg_baseline.strongest_on(s, cfg, reference)
    assert set(out) == {"ate_best_fixed", "rpe_best_fixed"}


def test_strongest_name_is_the_lowest_held_out_ate() -> None:
    from apps.pose_graph.baseline import strongest_name

    ref = {"ate_baseline": 0.6, "ate_best_fixed": 0.6, "ate_gnc_ariadne": 0.5, "ate_gnc_tls": 0.4,
           "chosen": {"best_fixed": {}, "gnc_ariadne": {}, "gnc_tls": {}}}
    assert strongest_name(ref) == "gnc_tls"
    assert strongest_name(ref, among={"best_fixed": 1, "gnc_ariadne": 2}) == "gnc_ariadne"
    assert strongest_name({"ate_baseline": 0.6}) == "baseline"


def test_batch_solved_in_one_ragged_call_equals_the_per_graph_loop(
        tmp_path: Path, app_config, spec: GraphSpec) -> None:
    """train.loss and train.evaluate solve a batch's graphs (of different sizes) in one
    OptimizationLayer.ragged call: the losses, the network's gradients and the evaluated poses
    are the per-graph layer calls' (what the app did before)."""
    cfg = app_config("pose_graph", tmp_path, "preset=smoke", "model.warm_start=none", "ragged=true")
    samples = [make_sample(spec, seed) for seed in (1, 2, 3)]
    assert len({s.graph.num_poses for s in samples}) == 3
    graphs = train.prepare(cfg, samples, torch.device("cpu"))
    net = EdgeWeightNet(len(FEATURES)).double()
    net.fit_normalization(torch.cat(graphs.features))
    ragged = train.loss(cfg, net, graphs, [0, 1, 2])
    grads = torch.autograd.grad(sum(ragged), list(net.parameters()))
    weights, scale = common.weights_per_item(net, graphs.features)
    loop = []
    for k, w in enumerate(weights):
        p = graphs.problems[k]
        sol, _ = graphs.layers[k](p.inputs(w, scale, init=graphs.starts[k]))
        loop.append(train.pose_loss(sol["poses"], samples[k].truth, samples[k].space)[0])
    ref = torch.autograd.grad(sum(loop), list(net.parameters()))
    torch.testing.assert_close(torch.stack(ragged), torch.stack(loop), rtol=1e-9, atol=1e-12)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    _, outputs = train.evaluate(cfg, net, graphs)
    with torch.no_grad():
        for k, (w, poses) in enumerate(outputs):
            sol, _ = graphs.layers[k](graphs.problems[k].inputs(w, scale.detach(),
                                                                init=graphs.starts[k]))
            torch.testing.assert_close(poses, sol["poses"][0], rtol=1e-9, atol=1e-9)


def test_reference_in_two_shared_rounds_equals_the_baselines_one_by_one(
        tmp_path: Path, app_config, same_run) -> None:
    """``baseline.reference`` (every tuning solve, then every held-out solve, each round shared
    with a worker process; the best fixed loss reusing the tuned baseline's held-out solves
    when it is the same loss and scale) gives what the baselines computed one after the other
    give (``tune``, ``evaluate`` with the oracle, ``strongest``), with and without the worker;
    the strongest baseline's held-out solutions are kept (for the picture), as a solve gives them;
    and the warm starts computed in the worker are this process's."""
    from types import SimpleNamespace

    from apps.pose_graph import baseline as pg_baseline
    from apps.pose_graph.problem import build_graphs

    gtsam = ["tls"] if pg_baseline.gtsam_available() else []
    cfg = app_config("pose_graph", tmp_path, "baseline.best_fixed=[cauchy,welsch,huber]",
                     f"baseline.gnc.gtsam=[{','.join(gtsam)}]", "baseline.gnc.tune_items=2",
                     "baseline.gnc.scales=[2.0,4.0]")
    device, d = torch.device("cpu"), common.Dist()
    spec = GraphSpec(num_poses=(40, 50))
    train_samples = [make_sample(spec, seed) for seed in (11, 12, 13)]
    val = build_graphs([make_sample(spec, seed) for seed in (21, 22)], "cauchy", cfg, device)
    run = SimpleNamespace(cfg=cfg, dist=d, device=device, val=val)
    best = pg_baseline.tune(train_samples, cfg, device, d)
    base = pg_baseline.evaluate(build_graphs(val.samples, best["loss"], cfg, device), best,
                                oracle=True)
    one_by_one = {**best, **base.scores.metrics("_baseline"),
                  "ate_oracle": base.oracle.metrics()["ate"], "ate_per_graph": base.ates,
                  **pg_baseline.strongest(run, train_samples, best)}
    pool = common.worker_pool(1, device)
    for shared in (None, pool):
        found = pg_baseline.reference(run, train_samples, shared)
        kept = found.pop("strongest_poses")  # the strongest's solutions, for the picture
        assert same_run(found, one_by_one), (found, one_by_one)
        assert kept["name"] == pg_baseline.strongest_name(found)
        for k, s in enumerate(val.samples):
            again = pg_baseline.solve_baseline(kept["name"], found, s, cfg)[0].solutions[0]
            torch.testing.assert_close(kept["poses"][k], again, rtol=1e-9, atol=1e-9)
    assert set(one_by_one["chosen"]) == {"best_fixed", "gnc_ariadne", *(f"gnc_{k}" for k in gtsam)}
    if one_by_one["chosen"]["best_fixed"]["loss"] == best["loss"]:
        assert found["solve_time_s_best_fixed"] == found["solve_time_s_baseline"]  # reused
    graphs = build_graphs(train_samples, "cauchy", cfg, device)
    here, there = pg_baseline.warm_start(graphs, cfg), pg_baseline.warm_start(graphs, cfg, pool)
    for a, b in zip(here.starts + here.features, there.starts + there.features):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_negative_workers_rejected(tmp_path: Path, app_config) -> None:
    with pytest.raises(ValueError, match="workers"):
        train.run(app_config("pose_graph", tmp_path, "workers=-1"))


def test_final_metrics_reuse_the_last_epochs_evaluation(tmp_path: Path, app_config) -> None:
    """The held-out graphs are solved once per epoch and once untrained, not once more for the
    final metrics (the network has not changed since the last epoch's evaluation); the final
    metrics are that evaluation's."""
    from dataclasses import replace

    from apps.harness import fit

    calls = []

    def counted(*args):
        calls.append(1)
        return train.evaluate(*args)

    doc = fit(replace(train.TASK, evaluate=counted), app_config("pose_graph", tmp_path,
                                                                "epochs=2"))
    assert len(calls) == 1 + 2
    assert doc["val"]["ate"] == doc["history"][-1]["val_ate"]
