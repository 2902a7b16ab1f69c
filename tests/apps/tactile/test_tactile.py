"""The tactile app's own tests (the shared contract is ``tests/apps/test_contract.py``): the
pybullet generator's invariants, the held-out push directions, the smoother's tactile cost
Jacobians, the batched problem, the pictures, and bad input (corrupt cache, short episode,
unknown shape) named."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import core
from apps.tactile import train, viz
from apps.tactile.data import (
    SHAPES,
    Episode,
    TactileSpec,
    cache_path,
    make_dataset,
    render_at,
    simulate,
)
from apps.tactile.problem import Smoother, TactileBetween, relative, stack
from core.costs.pushing import planar_sdf, shape_code
from core.lie import se2

pytest.importorskip("pybullet")
SPEC = TactileSpec(frames=10)


@pytest.fixture(scope="module")
def episodes() -> list[Episode]:
    """One short episode per shape and split."""
    return [simulate(SPEC, 11 + n, held_out=n % 2 == 1, shape=s)
            for n, s in enumerate(SHAPES * 2)]


def test_contact_points_lie_on_the_object_boundary(episodes: list[Episode]) -> None:
    for e in episodes:
        assert bool(e.contact.any()), f"episode {e.seed} ({e.shape}) never touches"
        local = se2.act(se2.inverse(e.obj), e.point)[e.contact]
        shape = torch.tensor([shape_code(e.shape), *e.size], dtype=torch.float64)
        d, _ = planar_sdf(local, shape.expand(local.shape[0], 3))
        assert float(d.abs().max()) < 1e-3, (e.shape, d)
        # the probe touches too: its centre is one radius off the boundary
        probe = se2.act(se2.inverse(e.obj), e.probe[:, :2])[e.contact]
        dp, _ = planar_sdf(probe, shape.expand(probe.shape[0], 3))
        assert float((dp - SPEC.probe_radius).abs().max()) < 1e-3


def test_images_are_blank_exactly_without_contact(episodes: list[Episode]) -> None:
    for e in episodes:
        assert e.image.shape[1:] == (SPEC.image_size, SPEC.image_size)
        assert int(e.image[~e.contact].sum()) == 0
        lit = e.image[e.contact].flatten(1).amax(-1) > 0
        assert float(lit.double().mean()) > 0.8  # the object is in view while pressed


def test_recorded_poses_reproduce_the_simulation(episodes: list[Episode]) -> None:
    """Placing the bodies at a frame's recorded poses renders that frame's image; the same seed
    simulates the same episode."""
    for e in episodes[:3]:
        for t in e.contact.nonzero()[:, 0][::3].tolist():
            img = render_at(SPEC, e.shape, e.obj[t], e.probe[t])
            diff = np.abs(img.astype(int) - e.image[t].numpy().astype(int))
            assert (diff > 8).mean() < 0.02, (e.shape, t, diff.max())
    again = simulate(SPEC, episodes[0].seed, held_out=False, shape=episodes[0].shape)
    assert torch.equal(again.obj, episodes[0].obj) and torch.equal(again.image, episodes[0].image)
    for e in episodes:  # unit rotations, probe heading along its motion
        assert torch.allclose(e.obj[:, 2:].norm(dim=-1), torch.ones(e.frames, dtype=torch.float64))
        step = e.probe[1:, :2] - e.probe[:-1, :2]
        heading = torch.atan2(step[:, 1], step[:, 0])
        yaw = torch.atan2(e.probe[1:, 3], e.probe[1:, 2])
        assert float(torch.remainder(heading - yaw + math.pi, 2 * math.pi).sub(math.pi).abs()
                     .max()) < 0.05


def test_held_out_push_directions_are_not_seen_in_training() -> None:
    lo, hi = SPEC.val_band
    angles = {h: [abs(simulate(TactileSpec(frames=2), s, h).alpha) for s in range(12)]
              for h in (False, True)}
    assert all(lo <= a <= hi for a in angles[True])
    assert all(a < lo or a > hi for a in angles[False])


def test_tactile_between_jacobians_match_finite_differences() -> None:
    T, k, B = 6, 2, 2
    obj = core.Variable("obj", core.SE2, count=T)
    gen = torch.Generator().manual_seed(0)
    x = se2.exp(torch.randn(B, T, 3, generator=gen, dtype=torch.float64) * 0.2)
    probe = se2.exp(torch.randn(B, T, 3, generator=gen, dtype=torch.float64) * 0.2)
    z = se2.exp(torch.randn(B, T - k, 3, generator=gen, dtype=torch.float64) * 0.1)
    cost = TactileBetween(obj, k, T).with_inputs({
        "tactile.measured": z, "tactile.probe_i": probe[:, :-k], "tactile.probe_j": probe[:, k:]})
    terms = cost.evaluate({"obj": x}, True)
    h = 1e-6
    for f in range(T):
        for a in range(3):
            delta = torch.zeros(B, T, 3, dtype=torch.float64)
            delta[:, f, a] = h
            plus = cost.evaluate({"obj": se2.retract(x, delta)}, False).r
            minus = cost.evaluate({"obj": se2.retract(x, -delta)}, False).r
            analytic = sum(terms.J[..., 3 * slot + a] * (idx == f)[None, :, None]
                           for slot, idx in enumerate(cost.index))
            assert torch.allclose((plus - minus) / (2 * h), analytic, atol=1e-7)
    # the truth's relative poses give zero residuals
    exact = relative(x, probe, k)
    r = cost.with_inputs({"tactile.measured": exact}).evaluate({"obj": x}, False).r
    assert float(r.abs().max()) < 1e-12


def _cfg(**overrides: object) -> object:
    cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(train.TactileConfig)))
    cfg.data.frames = 10
    cfg.optimizer.max_iters = 20
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def test_one_batched_problem_and_the_oracle_floor(episodes: list[Episode]) -> None:
    """A batch of differently shaped episodes is one problem (B = batch size); noise-free
    measurements recover the trajectory to millimetres, far better than without them."""
    cfg = _cfg()
    smoother = Smoother(10, 2, train.weights_from(cfg), SPEC.probe_radius, cfg)
    b = stack(episodes, torch.device("cpu"))
    z = relative(b.obj, b.probe, 2)
    w = torch.full((*z.shape[:-1], 3), 1e4, dtype=torch.float64)
    inputs = smoother.inputs(b, z, w)
    assert inputs["obj"].shape == (len(episodes), 10, 4)
    est = smoother.solve(b, z, w)
    assert est.shape == b.obj.shape
    err = (est[..., :2] - b.obj[..., :2]).norm(dim=-1)
    assert float(err.pow(2).mean().sqrt()) < 3e-3
    motion_only = smoother.solve(b, None, None)
    assert float((motion_only[..., :2] - b.obj[..., :2]).norm(dim=-1).mean()) > float(err.mean())


def test_short_episode_is_named(episodes: list[Episode]) -> None:
    cfg = _cfg(**{"problem.window": 2})
    short = Episode(**{**episodes[0].__dict__, **{k: getattr(episodes[0], k)[:2] for k in (
        "obj", "probe", "contact", "point", "normal", "force", "image")}, "seed": 77})
    with pytest.raises(ValueError, match="episode 77 has 2 frames, not more than the "
                                         "measurement window 2"):
        train.prepare(cfg, [short], torch.device("cpu"))
    with pytest.raises(ValueError, match="not longer than the measurement window"):
        Smoother(2, 2, train.weights_from(cfg), 0.01, cfg)


def test_unknown_shape_is_named() -> None:
    with pytest.raises(ValueError, match="unknown shape 'square'"):
        TactileSpec(shapes=("disc", "square"))
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        simulate(SPEC, 0, False, shape="hexagon")


def test_corrupt_cache_file_is_named(tmp_path: Path) -> None:
    spec = TactileSpec(frames=3)
    first = make_dataset(spec, [5], [False], tmp_path)
    again = make_dataset(spec, [5], [False], tmp_path)
    assert torch.equal(first[0].image, again[0].image)
    key = {"spec": __import__("dataclasses").asdict(spec), "seeds": [5], "held_out": [False],
           "version": 2}
    path = cache_path(tmp_path, key)
    assert path.is_file()
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match=f"{path.name}: corrupt tactile cache file"):
        make_dataset(spec, [5], [False], tmp_path)


def test_pictures_are_written(tmp_path: Path, episodes: list[Episode]) -> None:
    e = episodes[0]
    viz.topview(tmp_path / "top.png", e, e.obj + 0.001 * torch.tensor([1.0, 1.0, 0.0, 0.0],
                                                                       dtype=torch.float64))
    viz.strip(tmp_path / "strip.png", e, relative(e.obj, e.probe, 2), 2)
    assert (tmp_path / "top.png").stat().st_size > 10_000
    assert (tmp_path / "strip.png").stat().st_size > 5_000
