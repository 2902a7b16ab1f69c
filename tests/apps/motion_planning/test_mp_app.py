"""The motion-planning app's own tests (the shared contract is ``tests/apps/test_contract.py``):
the data generator's invariants, the SDF, the trajectory parameterization and the symmetries, the
untrained network, gradients through the unrolled planner, bad input, and a smoke run with the
picture."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.motion_planning import data, evaluation, problem, train
from apps.motion_planning.data import make_dataset, make_samples, signed_distance
from apps.motion_planning.model import InitNet, Refiner, augment, chosen, lane_loss, restore
from apps.motion_planning.planner import check_map, plan
from apps.motion_planning.spec import MapSpec

SMALL = MapSpec(size=32, num_states=21, obstacles=(2, 4), min_distance=4.0, expert_iters=40)


@pytest.fixture(scope="module")
def samples() -> list[data.Sample]:
    return make_samples(SMALL, list(range(6)))


def stacked(samples: list[data.Sample]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack([getattr(s, k) for s in samples]).double()
                 for k in ("sdf", "start", "goal", "expert"))


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def test_samples_are_seeded_and_cached(samples: list[data.Sample], tmp_path: Path) -> None:
    again = make_dataset(SMALL, list(range(3)), tmp_path)
    for a, b in zip(samples[:3], again):  # the experts up to rounding: core's sparse solver
        # picks its backend by batch size (CHOLMOD, or the batched supernodal one from 8 up)
        assert torch.equal(a.occupancy, b.occupancy)
        assert torch.allclose(a.expert, b.expert, rtol=0, atol=1e-9)
    assert len(list(tmp_path.glob("motion_planning_*.pt"))) == 1
    cached = make_dataset(SMALL, list(range(3)), tmp_path)
    assert all(torch.equal(a.expert, b.expert) for a, b in zip(again, cached))
    assert [s.kind for s in samples] == [SMALL.kinds[k % 3] for k in range(6)]
    assert not torch.equal(samples[0].occupancy, samples[3].occupancy)  # new seed, new map


def test_experts_are_collision_free_and_lines_mostly_collide(samples: list[data.Sample]
                                                             ) -> None:
    sdf, start, goal, expert = stacked(samples)
    assert bool(problem.success(expert, sdf, start, goal, SMALL).all())
    assert expert.shape == (6, SMALL.num_states, 4)
    assert bool(((goal - start).norm(dim=-1) >= SMALL.min_distance).all())
    line = problem.straight_line(start, goal, SMALL)
    assert float(problem.success(line, sdf, start, goal, SMALL).double().mean()) <= 0.5
    for s in samples:  # the SDF's sign is the occupancy
        assert bool((s.sdf[s.occupancy] <= 0).all()) and bool((s.sdf[~s.occupancy] > 0).all())


def test_signed_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    occ = rng.random((12, 12)) < 0.2
    d = signed_distance(occ, 0.5)
    rows, cols = np.indices(occ.shape)
    cells = np.stack([rows.ravel(), cols.ravel()], 1)
    for r, c in [(0, 0), (5, 7), (11, 3)]:
        other = cells[(occ.ravel() != occ[r, c])]
        nearest = np.sqrt(((other - [r, c]) ** 2).sum(1)).min() * 0.5
        assert d[r, c] == pytest.approx(-nearest if occ[r, c] else nearest)


# ------------------------------------------------------------------------------------------
# problem, model
# ------------------------------------------------------------------------------------------


def test_curve_ends_on_start_and_goal_with_consistent_velocities() -> None:
    start, goal = torch.tensor([[-3.0, 1.0]], dtype=torch.float64), torch.tensor([[2.0, -2.0]],
                                                                                dtype=torch.float64)
    coeffs = torch.randn(1, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spec = MapSpec()  # 101 states
    x = problem.curve(start, goal, coeffs, spec)
    assert torch.allclose(x[0, 0, :2], start[0]) and torch.allclose(x[0, -1, :2], goal[0])
    fd = (x[0, 2:, :2] - x[0, :-2, :2]) / (2 * spec.dt)
    assert torch.allclose(fd, x[0, 1:-1, 2:], atol=0.01 * float(x[..., 2:].abs().max()))


def test_symmetries_map_plans_to_plans(samples: list[data.Sample]) -> None:
    sdf, start, goal, expert = stacked(samples)
    for code in range(8):
        c = torch.full((len(samples),), code)
        s2, a2, b2, e2 = augment(sdf, start, goal, expert, c)
        assert bool(problem.success(e2, s2, a2, b2, SMALL).all())
        before = problem.clearance(expert, sdf, SMALL)
        assert torch.allclose(problem.clearance(e2, s2, SMALL), before, atol=1e-9)
        assert torch.equal(restore(e2, c), expert)  # plans on the transformed map map back
        assert torch.equal(restore(e2[:, None].expand(-1, 2, -1, -1), c)[:, 1], expert)


def test_untrained_network_proposes_the_straight_line(samples: list[data.Sample]) -> None:
    sdf, start, goal, _ = stacked(samples)
    torch.manual_seed(0)
    net = InitNet(SMALL, (4, 8), 3, lanes=9, width=3.0, hypotheses=3)
    trajs, scores = net(sdf, start, goal)
    assert trajs.shape == (6, 3, SMALL.num_states, 4) and scores.shape == (6, 3)
    assert torch.allclose(chosen(trajs, scores), problem.straight_line(start, goal, SMALL))
    assert not torch.allclose(trajs[:, 1], trajs[:, 2])  # the others start off to either side


def test_lane_targets_decode_to_the_expert(samples: list[data.Sample]) -> None:
    """The expert's two-hot lane targets, read as logits, decode to its lateral offsets, and
    rebuilt with its along offsets the expert's path is recovered up to the sine fit."""
    sdf, start, goal, expert = stacked(samples)
    net = InitNet(SMALL, (4, 8), 8, lanes=81, width=8.0, hypotheses=1, window=2)
    target = net.targets(start, goal, expert)  # (B, L, M)
    assert torch.allclose(target.sum(1), torch.ones(len(samples), net.points))
    u, _ = net.decode(target[:, None].clamp(min=1e-12).log(), torch.zeros_like(target)[:, None])
    e1, e2 = net.frame(start.float(), goal.float())
    t = torch.linspace(0, SMALL.num_states - 1, net.points, dtype=torch.float64)
    at = torch.stack([torch.from_numpy(np.stack([np.interp(t, np.arange(SMALL.num_states),
                                                           e[:, k]) for k in range(2)], -1))
                      for e in expert.numpy()])  # the expert at the columns' times
    rel = at.float() - start.float()[:, None]
    assert torch.allclose(u[:, 0], (rel * e2[:, None]).sum(-1), atol=0.02)
    s = torch.linspace(0, 1, net.points)
    along = (rel * e1[:, None]).sum(-1) - s * (goal - start).norm(dim=-1).float()[:, None]
    rebuilt = net.trajectories(start, goal, u, along[:, None])[:, 0]
    assert float(evaluation.imitation(rebuilt, expert).max()) < 0.05
    loss_true = lane_loss(target[:, None].clamp(min=1e-12).log() * 10, target)
    loss_flat = lane_loss(torch.zeros_like(target)[:, None], target)
    assert bool((loss_true < loss_flat).all())


def test_refiner_starts_as_the_identity_and_its_targets_hold_the_expert(
        samples: list[data.Sample]) -> None:
    """The untrained refiner leaves a trajectory as it is; the expert's two-hot offsets across
    the tube around a shifted expert, read as logits, move it back onto the expert."""
    sdf, start, goal, expert = stacked(samples)
    torch.manual_seed(0)
    ref = Refiner(SMALL, width=1.0, lanes=41, channels=4, basis=18)
    a = 0.2 * torch.sin(torch.linspace(0, math.pi, SMALL.num_states, dtype=torch.float64))
    shifted = expert.clone()  # shifted across the path, smoothly, zero at both ends
    shifted[..., :2] += a[:, None] * ref.normals(expert).double()
    logits, out = ref(shifted, sdf)
    assert logits.shape == (len(samples), 41, SMALL.num_states)
    assert torch.allclose(out, shifted, atol=1e-6)
    target, inside = ref.targets(shifted, expert)
    assert bool(inside.all()) and not bool(ref.targets(shifted + 2.0, expert)[1].any())
    ref.head.bias.data.fill_(0)
    with torch.no_grad():  # the refiner's decoding of the target logits
        u = (torch.softmax(target.clamp(min=1e-12).log(), 1) * ref.offsets()[:, None]).sum(1)
        move = u[..., None] * ref.normals(shifted)
        back = shifted + torch.cat([ref.to_p @ move, ref.to_v @ move], -1).double()
    before = float(evaluation.imitation(shifted, expert).mean())
    assert float(evaluation.imitation(back, expert).mean()) < 0.01 * before


def test_refined_initialization_keeps_clear_of_obstacles(tmp_path: Path, app_config) -> None:
    """``model.refine``: where the selected candidate comes closer to an obstacle than the
    robot radius, the planner starts from the refiner's correction of it, unless the
    correction comes closer still; a collision-free candidate is kept as it is. The refiner's
    loss trains it."""
    cfg = app_config("motion_planning", tmp_path, "model.symmetries=false", "model.refine=true",
                     "model.augment=false")
    samples = make_samples(SMALL, [4, 5])  # experts within the refiner's tube of the line
    maps = train.prepare(cfg, samples, torch.device("cpu"))
    net = train.model(cfg, maps)
    assert isinstance(net.refiner, Refiner)
    idx = torch.arange(len(maps))
    refiner, net.refiner = net.refiner, None
    plain = evaluation.initialization(cfg, net, maps, idx)  # the selected candidates
    net.refiner = refiner
    torch.nn.init.normal_(net.refiner.head.weight, std=1.0)  # a refiner that moves states
    moved = net.refiner(plain, maps.sdf)[1]
    init = evaluation.initialization(cfg, net, maps, idx)
    before, after = (problem.clearance(t, maps.sdf, SMALL) for t in (plain, moved))
    r = SMALL.robot_radius
    keep = (before <= r) & ((after > r) | (after >= before))
    assert bool(keep.any()) and bool((before <= r).any())  # exercised
    for k in range(len(maps)):
        assert torch.equal(init[k], moved[k] if keep[k] else plain[k])
    net.zero_grad()
    sum(train.loss(cfg, net, maps, [0, 1])).backward()
    assert net.refiner.head.weight.grad is not None
    assert bool((net.refiner.head.weight.grad != 0).any())


@pytest.mark.parametrize("refine", [False, True])
def test_unrolled_planner_trains_the_network(tmp_path: Path, app_config, refine: bool) -> None:
    """With ``backward=unroll`` the solution terms of the loss reach the network (the stage
    whose output the planner starts from: the refiner with ``model.refine``): its gradient
    differs from the one of the imitation terms alone."""
    cfg = app_config("motion_planning", tmp_path, "optimizer.backward=unroll",
                     "model.augment=false", f"model.refine={str(refine).lower()}")
    samples = make_samples(SMALL, [4, 5])  # experts within the refiner's tube of the line
    maps = train.prepare(cfg, samples, torch.device("cpu"))
    torch.manual_seed(0)
    net = train.model(cfg, maps)
    torch.nn.init.normal_(net.head.weight, std=0.01)  # off the straight line
    head = net.refiner.head if refine else net.head
    if refine:
        torch.nn.init.normal_(head.weight, std=0.01)

    def grad(**weights: float) -> torch.Tensor:
        for k, v in weights.items():
            cfg.loss[k] = v
        net.zero_grad()
        sum(train.loss(cfg, net, maps, [0, 1])).backward()
        return head.weight.grad.clone()

    full = grad(lanes=1.0, initial=1.0, solution=1.0, objective=1e-3)
    alone = grad(lanes=1.0, initial=1.0, solution=0.0, objective=0.0)
    assert torch.isfinite(alone).all() and bool((alone != 0).any())
    assert torch.isfinite(full).all() and not torch.allclose(full, alone)


def test_iterations_count_to_convergence_beyond_the_baseline_budget(
        samples: list[data.Sample], tmp_path: Path, app_config) -> None:
    """Iterations to converge are counted by the same optimizer for every initialization, up
    to ``converge_iters``, not truncated at the long baseline's ``eval_iters``, whose plan is
    still the ``eval_iters``-iteration one."""
    cfg = app_config("motion_planning", tmp_path, "eval_iters=2", "converge_iters=300")
    maps = train.prepare(cfg, samples, torch.device("cpu"))
    assert replace(maps.converge, max_iters=2) == maps.long  # only the cap differs
    idx = torch.arange(len(maps))
    line = problem.straight_line(maps.start, maps.goal, maps.spec)
    plans = evaluation.solve(maps, idx, line, long=True)
    assert bool((plans.iterations > 2).any()) and not bool(plans.capped.any())
    aux = evaluation.layer_inputs(line, maps.sdf, maps.start, maps.goal)
    states = aux.pop("states")
    two = maps.long.solve(maps.objective.with_inputs(aux), {"states": states})
    assert torch.equal(plans.long, two.values["states"])
    short, _ = evaluation.straight_line_scores(cfg, maps)
    assert short.iterations == float(plans.iterations.sum()) and short.capped == 0
    cfg.converge_iters = 2
    capped = evaluation.solve(train.prepare(cfg, samples, torch.device("cpu")), idx, line)
    assert bool(capped.capped.any()) and int(capped.iterations.max()) == 2


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_bad_maps_are_named() -> None:
    with pytest.raises(ValueError, match=r"shape \(32, 32\).*got \(16, 32\)"):
        check_map(np.zeros((16, 32), dtype=bool), SMALL)
    with pytest.raises(ValueError, match="bool array.*float64"):
        check_map(np.zeros((32, 32)), SMALL)
    with pytest.raises(ValueError, match="bool array.*int64"):
        plan(torch.zeros(32, 32, dtype=torch.long), [-3, 0], [3, 0], SMALL)


def test_bad_start_and_goal_are_named() -> None:
    occ = np.zeros((32, 32), dtype=bool)
    occ[12:20, 12:20] = True  # a block around the origin
    with pytest.raises(ValueError, match=r"start \[0.0, 0.0\] is inside an obstacle"):
        plan(occ, [0.0, 0.0], [4.0, 4.0], SMALL)
    with pytest.raises(ValueError, match=r"goal \[6.0, 0.0\] is outside the map"):
        plan(occ, [-4.0, -4.0], [6.0, 0.0], SMALL)
    with pytest.raises(ValueError, match="goal must be a finite"):
        plan(occ, [-4.0, -4.0], [math.nan, 0.0], SMALL)
    with pytest.raises(ValueError, match="too close to an obstacle"):
        plan(occ, [-1.3, 0.0], [4.0, 4.0], SMALL)
    result = plan(occ, [-4.0, 0.3], [4.0, 0.3], SMALL)  # the line crosses the block
    assert result.success and result.states.shape == (SMALL.num_states, 4)


def test_bad_settings_are_named(tmp_path: Path, app_config) -> None:
    for override, message in [("data.kinds=[forest,maze]", "data.kinds must be"),
                              ("data.gap=0.5", "data.gap must exceed"),
                              ("data.sdf_interp=nearest", "data.sdf_interp must be"),
                              ("data.hinge_smooth=-0.1", "data.hinge_smooth must be >= 0"),
                              ("eval_iters=0", "eval_iters must be >= 1"),
                              ("converge_iters=0", "converge_iters must be >= 1"),
                              ("model.consensus=-0.1", "model.consensus must be >= 0"),
                              ("optimizer.max_iters=0", "max_iters")]:
        with pytest.raises(ValueError, match=message):
            train.run(app_config("motion_planning", tmp_path, override))


# ------------------------------------------------------------------------------------------
# a smoke run with the picture
# ------------------------------------------------------------------------------------------


class _Fixed(torch.nn.Module):
    """A stand-in network proposing fixed candidates ``(Hy, N, 4)`` for every map."""

    def __init__(self, candidates: torch.Tensor) -> None:
        super().__init__()
        self.candidates = candidates

    def forward(self, sdf: torch.Tensor, start: torch.Tensor, goal: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        B, Hy = len(sdf), len(self.candidates)
        return self.candidates.expand(B, *self.candidates.shape), torch.zeros(B, Hy)


def test_selection_prefers_candidates_inside_the_map(tmp_path: Path, app_config) -> None:
    """``select=cost``: the planner starts from the cheapest collision-free candidate, even when
    one that cuts through an obstacle or leaves the map is cheaper (the SDF only falls by the
    distance travelled out); when none is collision-free, the one of largest clearance inside
    the map; when all leave it, the cheapest. ``select=clearance``: the one farthest from
    obstacles, never one that leaves the map."""
    cfg = app_config("motion_planning", tmp_path, "model.symmetries=false", "model.select=cost",
                     "model.consensus=0")
    occ = np.zeros((32, 32), dtype=bool)
    occ[12:20, 8:24] = True  # a block across the middle
    sdf = torch.as_tensor(signed_distance(occ, SMALL.cell))
    sample = data.Sample(torch.as_tensor(occ), sdf.float(), torch.tensor([-3.0, 4.2]),
                         torch.tensor([3.0, 4.2]), torch.zeros(SMALL.num_states, 4), "forest")
    maps = train.prepare(cfg, [sample], torch.device("cpu"))
    start, goal = maps.start, maps.goal
    coeffs = torch.zeros(1, 2, 1, dtype=torch.float64)
    out = problem.curve(start, goal, coeffs + torch.tensor([0.0, 1.5]).view(1, 2, 1), SMALL)
    inside = problem.curve(start, goal, coeffs + torch.tensor([0.0, -3.5]).view(1, 2, 1), SMALL)
    cost = maps.cost(torch.cat([out, inside]), sdf[None].repeat(2, 1, 1).double(),
                     start.repeat(2, 1), goal.repeat(2, 1))
    assert float(cost[0]) < float(cost[1])  # leaving the map is the cheaper candidate
    idx = torch.arange(1)
    net = _Fixed(torch.cat([out, inside]))
    assert torch.equal(evaluation.initialization(cfg, net, maps, idx)[0], inside[0])
    net = _Fixed(torch.cat([out, out + torch.tensor([0.0, 0.1, 0.0, 0.0])]))
    assert torch.equal(evaluation.initialization(cfg, net, maps, idx)[0], out[0])
    low = problem.curve(start, goal, coeffs + torch.tensor([0.0, -2.0]).view(1, 2, 1), SMALL)
    clear = problem.clearance(torch.cat([low, inside]), sdf[None].repeat(2, 1, 1).double(), SMALL)
    assert float(clear[0]) > SMALL.robot_radius > float(clear[1])  # inside cuts the block
    net = _Fixed(torch.cat([out, inside, low]))
    # a collision-free candidate wins over cheaper ones that collide or leave the map
    cheap = lambda states, *args: torch.tensor([0.0, 1.0, 2.0], dtype=states.dtype)  # noqa: E731
    plain_cost, maps.cost = maps.cost, cheap
    assert torch.equal(evaluation.initialization(cfg, net, maps, idx)[0], low[0])
    maps.cost = plain_cost
    cfg.model.select = "clearance"  # the farthest from the block, inside the map
    net = _Fixed(torch.cat([out, low, inside]))
    assert torch.equal(evaluation.initialization(cfg, net, maps, idx)[0], low[0])


def test_consensus_averages_candidates_that_take_the_same_way() -> None:
    """``model.consensus``: each candidate becomes the mean of those within the radius (RMS
    position distance) of it, itself included; candidates farther away stay apart; radius 0
    leaves them unchanged."""
    torch.manual_seed(0)
    N = SMALL.num_states
    a = torch.randn(N, 4, dtype=torch.float64)
    b = a + torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=torch.float64)  # another way round
    noise = 0.05 * torch.randn(3, N, 4, dtype=torch.float64)
    trajs = torch.stack([a + noise[0], a + noise[1], b + noise[2]])[None]  # (1, 3, N, 4)
    out = evaluation.consensus(trajs, 0.5)
    assert out.shape == trajs.shape
    mean = (trajs[0, 0] + trajs[0, 1]) / 2
    torch.testing.assert_close(out[0, 0], mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0, 1], mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0, 2], trajs[0, 2], rtol=0, atol=1e-12)
    assert torch.equal(evaluation.consensus(trajs, 0.0), trajs)
    # the radius is an RMS distance over the states: a 0.4 m shift of every state is within 0.5
    shifted = torch.stack([a, a + torch.tensor([0.4, 0.0, 0.0, 0.0], dtype=torch.float64)])[None]
    torch.testing.assert_close(evaluation.consensus(shifted, 0.5)[0, 0], shifted[0].mean(0))
    assert torch.equal(evaluation.consensus(shifted, 0.39), shifted)


def test_select_by_score_runs(tmp_path: Path, app_config) -> None:
    doc = train.run(app_config("motion_planning", tmp_path, "model.select=score",
                               "model.hypotheses=2"))
    assert math.isfinite(doc["val"]["success_rate"])
    with pytest.raises(Exception, match="select"):
        app_config("motion_planning", tmp_path, "model.select=best")


def test_smoke_with_picture(tmp_path: Path, app_config) -> None:
    doc = train.run(app_config("motion_planning", tmp_path, "viz=true", "viz_maps=2",
                               "optimizer.backward=unroll"))
    val = doc["val"]
    for key in train.TASK.keys:
        assert math.isfinite(val[key]), key
    assert 0 <= val["success_rate"] <= 1 and val["iterations"] <= 30
    assert (tmp_path / "motion_planning.png").stat().st_size > 0
