"""The homography app's own tests: the pair generator's invariants (the target is the source
warped by the true homography, offsets within rho, split by photograph, seeded), the solver's
levels and its degenerate-homography report, the baselines on easy pairs, bad inputs named,
and the pictures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from apps.homography import baseline as hb
from apps.homography import data, viz
from apps.homography.model import FeatureNet
from apps.homography.problem import Aligner, Pairs, corner_error, intensity_pyramid, level_points
from apps.homography.train import HomographyConfig
from core.costs.homography import bilinear, corners_of, params_from_matrix, warp
from core.optimizer import FAILED

STILL = dict(gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0, noise=0.0)


def config(**optimizer: object) -> HomographyConfig:
    cfg = OmegaConf.structured(HomographyConfig)
    cfg.optimizer.max_iters, cfg.optimizer.damping_mode = 10, "marquardt"
    for k, v in optimizer.items():
        cfg.optimizer[k] = v
    return cfg  # type: ignore[return-value]


def test_every_listed_photograph_ships_in_the_wheel() -> None:
    spec = data.PairSpec()
    for name in (*spec.train_images, *spec.val_images):
        image = data.load_image(name, spec.image_size)
        assert image.ndim == 2 and min(image.shape) == spec.image_size
        assert 0 <= float(image.min()) and float(image.max()) <= 1


def test_target_is_the_source_warped_by_the_true_homography() -> None:
    spec = data.PairSpec(**STILL)  # type: ignore[arg-type]
    pair = data.generate(spec, 7, held_out=False)
    P, c = spec.patch, (spec.patch - 1) / 2
    x = data.pixel_grid(P)
    xw, _ = warp(pair.h[None], x[None])
    value, _, inside = bilinear(pair.source[None, None], c * xw + c)
    t = pair.target.reshape(1, -1)
    assert float(inside.float().mean()) > 0.5
    torch.testing.assert_close(value[..., 0][inside], t[inside], atol=1e-5, rtol=0)
    moved = corners_of(pair.h[None].double(), data.corners(torch.float64))[0]
    torch.testing.assert_close((moved - data.corners(torch.float64)) * c, pair.offsets.double(),
                               atol=1e-4, rtol=0)
    assert float(pair.offsets.abs().max()) <= spec.rho


def test_pairs_are_seeded_split_by_photograph_and_cached(tmp_path: Path) -> None:
    spec = data.PairSpec(train_rho=8.0)
    seeds = list(range(12))
    held = [k % 2 == 0 for k in seeds]
    pairs = data.make_dataset(spec, seeds, held, tmp_path)
    assert all((p.image in spec.val_images) == h for p, h in zip(pairs, held))
    assert all(p.rho == (spec.rho if h else 8.0) for p, h in zip(pairs, held))
    again = data.make_dataset(spec, seeds, held, tmp_path)  # read from the cache
    assert len(list(tmp_path.glob("homography_pairs_*.pt"))) == 1
    for a, b in zip(pairs, again):
        assert torch.equal(a.target, b.target) and torch.equal(a.h, b.h) and a.image == b.image
    fresh = data.generate(spec, 3, held_out=False)
    assert torch.equal(fresh.target, pairs[3].target)


def test_same_seed_at_a_larger_rho_doubles_the_offsets() -> None:
    small = data.generate(data.PairSpec(rho=16.0), 11, held_out=True)
    large = data.generate(data.PairSpec(rho=32.0), 11, held_out=True)
    assert small.image == large.image and torch.equal(small.source, large.source)
    torch.testing.assert_close(large.offsets, 2 * small.offsets)


@pytest.mark.parametrize("image, message", [
    (np.zeros((300, 300), dtype=np.int32), "dtype int32"),
    (np.zeros((300, 300, 2), dtype=np.uint8), r"got shape \(300, 300, 2\)"),
    (np.full((300, 300), 2.0), r"must lie in \[0, 1\]"),
    ([[0.0]], "expected a numpy array"),
])
def test_bad_images_are_named(image: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        data.to_gray(image, "mine")  # type: ignore[arg-type]


def test_bad_pair_inputs_are_named() -> None:
    spec = data.PairSpec()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"size \(100, 300\) is smaller than .* 192"):
        data.make_pair(torch.rand(100, 300), spec, gen)
    with pytest.raises(ValueError, match=r"one channel \(H, W\), got shape \(300, 300, 3\)"):
        data.make_pair(torch.rand(300, 300, 3), spec, gen)
    with pytest.raises(ValueError, match="float tensor"):
        data.make_pair(torch.zeros(300, 300, dtype=torch.uint8), spec, gen)
    with pytest.raises(ValueError, match=r"rho = 40.0 must be in \[0, margin = 32\]"):
        data.make_pair(torch.rand(300, 300), spec, gen, rho=40.0)
    with pytest.raises(ValueError, match=r"rho = 40.0 must be in \[0, margin = 32\]"):
        data.PairSpec(rho=40.0)
    with pytest.raises(ValueError, match=r"train_rho = 33.0 must be in \[0, margin = 32\]"):
        data.PairSpec(train_rho=33.0)
    with pytest.raises(ValueError, match="disjoint; shared: \\['camera'\\]"):
        data.PairSpec(train_images=("camera", "brick"))


def test_bad_network_and_solver_inputs_are_named() -> None:
    net = FeatureNet((4, 2), channels=3, width=4)
    with pytest.raises(ValueError, match=r"\(B, 1, P, P\).*torch.float32 \(2, 3, 32, 32\)"):
        net(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"torch.uint8"):
        net(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"divisible by 4, got \(30, 30\)"):
        net(torch.rand(2, 1, 30, 30))
    maps = net(torch.rand(2, 1, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 3, 8, 8), (2, 3, 16, 16)]
    torch.testing.assert_close(maps[1].norm(dim=1), torch.ones(2, 16, 16))
    aligner = Aligner(config(), 32, (4, 2), 3, 1.0)
    with pytest.raises(ValueError, match=r"target features at stride 2 must be \(2, 3, 16, 16\)"):
        aligner(maps, [maps[0], maps[1][..., :8, :8]])


def test_level_points_sit_at_block_centres() -> None:
    pts = level_points(8, 4).reshape(2, 2, 2)
    c = 3.5
    torch.testing.assert_close(pts[0, 0] * c + c, torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(pts[1, 1] * c + c, torch.tensor([5.5, 5.5]))


def test_degenerate_level_results_are_reported_and_never_returned() -> None:
    """A level whose solution degenerates: the pair keeps its previous estimate, its Info status
    is FAILED, and ``Alignment.degenerate`` flags it; the other pair is untouched."""
    aligner = Aligner(config(), 32, (4, 2), 1, 1.0)
    flipped = params_from_matrix(torch.diag(torch.tensor([-1.0, 1.0, 1.0])))[None]
    real = aligner.levels[1].layer

    def breaks_first(inputs: dict[str, torch.Tensor]):
        sol, info = real(inputs)
        h = sol["h"].clone()
        h[0, 0] = flipped[0]  # det H < 0
        return {"h": h}, info

    aligner.levels[1] = replace(aligner.levels[1], layer=breaks_first)
    pair = data.generate(data.PairSpec(patch=32, margin=8, rho=4.0, image_size=64), 5, True)
    src = torch.stack([pair.source, pair.source])[:, None]
    tgt = torch.stack([pair.target, pair.target])[:, None]
    result = aligner(intensity_pyramid(src, (4, 2)), intensity_pyramid(tgt, (4, 2)))
    assert result.degenerate.tolist() == [True, False]
    assert result.infos[1].status_names[0] == "failed" and int(result.infos[1].status[1]) != FAILED
    torch.testing.assert_close(result.h[0], result.levels[0][0])  # the previous level's
    assert not bool(torch.isclose(result.h[0], flipped[0]).all())


def test_raw_intensity_lm_and_orb_align_easy_pairs() -> None:
    spec = data.PairSpec(rho=6.0)
    pairs = [data.generate(spec, s, held_out=True) for s in (1, 2, 3, 4)]
    stacked = Pairs.stack(pairs, torch.device("cpu"))
    strides = (8, 4, 2, 1)
    errors, flags = hb.raw_lm(Aligner(config(), 128, strides, 1, 1.0), stacked, strides)
    assert float(errors.median()) < 1.0 and not bool(flags.any())
    assert float(errors.median()) < float(hb.identity_errors(stacked).median())
    orb, failed = hb.orb_errors(pairs)
    assert not bool(failed.all()) and float(orb.median()) < 3.0
    torch.testing.assert_close(corner_error(stacked.h, stacked.h, 128), torch.zeros(4))


def test_pictures_are_written(tmp_path: Path) -> None:
    spec = data.PairSpec(patch=32, margin=8, rho=4.0, image_size=64)
    pairs = [data.generate(spec, s, held_out=True) for s in range(3)]
    views = [viz.PairView(p, p.h + 0.01, 0.5, 1.0, 2.0, k == 2) for k, p in enumerate(pairs)]
    viz.draw_pairs(tmp_path / "pairs.png", views, title="test")
    errors = {"learned": [0.1, 0.5, 2.0], "raw": [0.2, 3.0, 9.0], "orb": [1.0, 1.5, 2.5]}
    viz.draw_cdf(tmp_path / "cdf.png", {"rho": errors, "rho32": errors}, (16.0, 32.0))
    assert (tmp_path / "pairs.png").stat().st_size > 1000
    assert (tmp_path / "cdf.png").stat().st_size > 1000


def test_multi_start_keeps_the_lowest_cost_start_per_pair() -> None:
    """Starting the first level from a 3x3 grid of translations (the identity among them) ends
    at a cost no higher than from the identity alone, per pair; the Info is per pair."""
    spec = data.PairSpec(patch=32, margin=8, rho=8.0, image_size=64)
    pairs = Pairs.stack([data.generate(spec, s, held_out=True) for s in range(4)],
                        torch.device("cpu"))
    aligner = Aligner(config(), 32, (4, 2), 1, 1.0)
    src, tgt = intensity_pyramid(pairs.source, (4, 2)), intensity_pyramid(pairs.target, (4, 2))
    one = aligner(src, tgt)
    nine = aligner(src, tgt, shifts=(-4.0, 0.0, 4.0))
    assert nine.infos[0].status.shape == (4,) and nine.infos[0].cost_history.shape[1] == 4
    assert bool((nine.infos[0].final_cost <= one.infos[0].final_cost + 1e-5).all())
    starts = aligner._starts((-4.0, 0.0, 4.0), pairs.h)
    assert starts.shape == (9, 8) and torch.equal(starts[4], torch.zeros(8))
