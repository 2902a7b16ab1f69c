"""Tests for core.costs.homography: the warp, exact bilinear sampling, the alignment cost's
analytic Jacobian against central finite differences (float64), degenerate homographies, and an
LM solve that recovers a known warp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf

import core
from core.costs.homography import (
    HomographyAlignment,
    bilinear,
    corners_of,
    degenerate,
    homography_matrix,
    params_from_matrix,
    residuals,
    warp,
    warp_jacobian,
)

DT = torch.float64
SQUARE = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=DT)


def smooth_map(gen: torch.Generator, batch: int, channels: int, size: int) -> torch.Tensor:
    """``(B, C, size, size)``: sums of a few random sinusoids (smooth, non-periodic-looking)."""
    ax = torch.linspace(-1, 1, size, dtype=DT)
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    out = torch.zeros(batch, channels, size, size, dtype=DT)
    for _ in range(4):
        k = 3 * torch.randn(batch, channels, 2, 1, 1, generator=gen, dtype=DT)
        phase = 6 * torch.rand(batch, channels, 1, 1, generator=gen, dtype=DT)
        out = out + torch.sin(k[:, :, 0] * x + k[:, :, 1] * y + phase)
    return out


def grid_points(n: int) -> torch.Tensor:
    """``(n * n, 2)`` points on a grid inside ``[-0.8, 0.8]^2``, off the sampling grid."""
    ax = torch.linspace(-0.8, 0.8, n, dtype=DT) + 0.0123
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([x, y], -1).reshape(-1, 2)


def test_identity_and_matrix_round_trip(gen: torch.Generator) -> None:
    x = torch.randn(3, 5, 2, generator=gen, dtype=DT)
    xw, w = warp(torch.zeros(3, 8, dtype=DT), x)
    assert torch.equal(xw, x) and torch.equal(w, torch.ones(3, 5, dtype=DT))
    h = 0.1 * torch.randn(3, 8, generator=gen, dtype=DT)
    torch.testing.assert_close(params_from_matrix(2.5 * homography_matrix(h)), h)
    xh = torch.cat([x, torch.ones(3, 5, 1, dtype=DT)], -1) @ homography_matrix(h).mT
    xw, w = warp(h, x)
    torch.testing.assert_close(xw, xh[..., :2] / xh[..., 2:])
    torch.testing.assert_close(w, xh[..., 2])


def test_warp_jacobian_matches_finite_differences(gen: torch.Generator) -> None:
    x = torch.randn(2, 6, 2, generator=gen, dtype=DT)
    h = 0.1 * torch.randn(2, 8, generator=gen, dtype=DT)
    xw, w = warp(h, x)
    J = warp_jacobian(x, xw, w)
    eps = 1e-6
    for k in range(8):
        step = torch.zeros(8, dtype=DT)
        step[k] = eps
        fd = (warp(h + step, x)[0] - warp(h - step, x)[0]) / (2 * eps)
        torch.testing.assert_close(J[..., k], fd, rtol=1e-6, atol=1e-8)


def test_bilinear_matches_grid_sample_and_hits_grid_values(gen: torch.Generator) -> None:
    F = torch.randn(2, 3, 7, 9, generator=gen, dtype=DT)
    p = torch.rand(2, 50, 2, generator=gen, dtype=DT) * torch.tensor([8.0, 6.0], dtype=DT)
    value, _, inside = bilinear(F, p)
    assert bool(inside.all())
    grid = (p / torch.tensor([8.0, 6.0], dtype=DT) * 2 - 1)[:, None]  # (B, 1, N, 2)
    ref = nnf.grid_sample(F, grid, align_corners=True)[:, :, 0].mT
    torch.testing.assert_close(value, ref)
    ints = torch.tensor([[[0.0, 0.0], [8.0, 6.0], [3.0, 2.0]]], dtype=DT).expand(2, 3, 2)
    value, _, _ = bilinear(F, ints)
    torch.testing.assert_close(value[:, 2], F[:, :, 2, 3])
    torch.testing.assert_close(value[:, 1], F[:, :, 6, 8])
    _, _, inside = bilinear(F, torch.tensor([[[-0.1, 1.0], [8.2, 1.0]]], dtype=DT))
    assert not bool(inside.any())


@pytest.mark.parametrize("batch, channels", [(1, 1), (3, 4)])
def test_jacobian_matches_finite_differences(gen: torch.Generator, batch: int,
                                             channels: int) -> None:
    size = 24
    source = smooth_map(gen, batch, channels, size)
    points = grid_points(9)
    target = torch.randn(batch, points.shape[0], channels, generator=gen, dtype=DT)
    h = 0.05 * torch.randn(batch, 1, 8, generator=gen, dtype=DT)
    var = core.Variable("h", core.Vector(8))
    scale, offset = (size - 1) / 2, (size - 1) / 2
    cost = HomographyAlignment(var, source, target, points, scale=scale, offset=offset)
    terms = cost.evaluate({"h": h}, jacobians=True)
    assert terms.J is not None and terms.J.shape == (batch, 1, points.shape[0] * channels, 8)
    eps = 1e-6
    for k in range(8):
        step = torch.zeros(8, dtype=DT)
        step[k] = eps
        up = cost.evaluate({"h": h + step}, jacobians=False).r
        down = cost.evaluate({"h": h - step}, jacobians=False).r
        fd = (up - down) / (2 * eps)
        torch.testing.assert_close(terms.J[..., k], fd, rtol=1e-6, atol=1e-6)


def test_outside_points_are_constant_with_zero_jacobian(gen: torch.Generator) -> None:
    source = smooth_map(gen, 1, 2, 10)
    points = torch.tensor([[0.0, 0.0], [0.99, 0.0]], dtype=DT)
    target = torch.zeros(1, 2, 2, dtype=DT)
    h = torch.zeros(1, 8, dtype=DT)
    h[0, 2] = 0.05  # shift right: the second point leaves the map
    r, J, valid = residuals(h, source, target, points, 4.5, 4.5, outside=3.0)
    assert valid.tolist() == [[True, False]]
    torch.testing.assert_close(r[0, 1], torch.full((2,), 3.0 / math.sqrt(2), dtype=DT))
    assert J is not None and torch.equal(J[0, 1], torch.zeros(2, 8, dtype=DT))
    assert float(J[0, 0].abs().sum()) > 0


def test_gradient_reaches_both_feature_maps(gen: torch.Generator) -> None:
    source = smooth_map(gen, 1, 2, 12).requires_grad_()
    points = grid_points(5)
    target = torch.randn(1, 25, 2, generator=gen, dtype=DT, requires_grad=True)
    r, J, _ = residuals(0.02 * torch.ones(1, 8, dtype=DT), source, target, points, 5.5, 5.5, 1.0)
    assert J is not None
    (J.sum() + r.sum()).backward()
    assert source.grad is not None and float(source.grad.abs().sum()) > 0
    assert target.grad is not None and float(target.grad.abs().sum()) > 0


def test_degenerate_homographies_are_flagged() -> None:
    h = torch.zeros(5, 8, dtype=DT)
    h[1, 0] = -2.0  # x -> -x: a reflection, det < 0
    h[2, 6] = -1.5  # the line at infinity crosses the square: w <= 0 at a corner
    h[3] = params_from_matrix(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                                           dtype=DT))
    h[4, 0] = float("nan")
    flags = degenerate(h, SQUARE)
    assert flags.tolist() == [False, True, True, False, True]
    # corners crossing: the homography through four correspondences that make a bow tie (it
    # maps some of the square through the line at infinity)
    bowtie = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-0.8, 1.1], [0.9, 1.2]], dtype=DT)
    H = _homography_from(SQUARE, bowtie)
    assert bool(degenerate(params_from_matrix(H)[None], SQUARE)[0])
    torch.testing.assert_close(corners_of(params_from_matrix(H)[None], SQUARE)[0], bowtie)


def _homography_from(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """DLT with h33 = 1 through four correspondences ``src, dst (4, 2)``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist()):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    h = torch.linalg.solve(torch.tensor(rows, dtype=DT), torch.tensor(rhs, dtype=DT))
    return torch.cat([h, torch.ones(1, dtype=DT)]).reshape(3, 3)


def test_levenberg_marquardt_recovers_a_known_warp(gen: torch.Generator) -> None:
    size, batch = 48, 2
    source = smooth_map(gen, batch, 2, size)
    points = grid_points(16) * 0.9
    truth = 0.03 * torch.randn(batch, 8, generator=gen, dtype=DT)
    scale = offset = (size - 1) / 2
    target, _, valid = residuals(truth, source, torch.zeros(batch, 256, 2, dtype=DT), points,
                                 scale, offset, 0.0, jacobians=False)
    assert bool(valid.all())
    var = core.Variable("h", core.Vector(8))
    cost = HomographyAlignment(var, source, target, points, scale=scale, offset=offset)
    lm = core.LevenbergMarquardt(max_iters=30, damping_mode="marquardt")
    sol = lm.solve(core.Objective([cost]), {"h": torch.zeros(batch, 1, 8, dtype=DT)})
    torch.testing.assert_close(sol.values["h"][:, 0], truth, atol=1e-6, rtol=0)
