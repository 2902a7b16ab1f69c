"""Quasi-static pushing and planar contact costs (``core.costs.pushing``): analytic Jacobians
against central finite differences of right perturbations in float64, the signed distances of
the three shapes against closed forms and sampled boundaries, and a small contact solve."""

from __future__ import annotations

import math

import pytest
import torch

import core
from core.costs.pushing import (
    PlanarContact,
    QuasiStaticPushing,
    planar_sdf,
    pushing_residual,
    shape_code,
)
from core.lie import se2

SE2 = core.SE2


def random_poses(*shape: int, scale: float = 0.2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    xi = torch.randn(*shape, 3, generator=gen, dtype=torch.float64)
    xi[..., :2] *= scale
    return se2.exp(xi)


def numeric_jacobian(cost: core.CostTable, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """``(B, E, d, F * 3)``: central differences of the residuals w.r.t. right perturbations of
    every pose of ``x (B, F, 4)``."""
    B, F, _ = x.shape
    name = cost.optimized[0].name
    cols = []
    for f in range(F):
        for k in range(3):
            delta = torch.zeros(B, F, 3, dtype=x.dtype)
            delta[:, f, k] = h
            plus = cost.evaluate({name: se2.retract(x, delta)}, False).r
            minus = cost.evaluate({name: se2.retract(x, -delta)}, False).r
            cols.append((plus - minus) / (2 * h))
    return torch.stack(cols, -1)


def assembled(cost: core.CostTable, x: torch.Tensor) -> torch.Tensor:
    """The analytic blocks scattered into ``(B, E, d, F * 3)``."""
    terms = cost.evaluate({cost.optimized[0].name: x}, True)
    B, F, _ = x.shape
    J = torch.zeros(*terms.r.shape, F * 3, dtype=x.dtype)
    offset = 0
    for idx in cost.index:
        block = terms.J[..., offset: offset + 3]
        for e, f in enumerate(idx.tolist()):
            J[:, e, :, f * 3: (f + 1) * 3] += block[:, e]
        offset += 3
    return J


@pytest.mark.parametrize("batch", [1, 3])
def test_pushing_jacobians_match_finite_differences(batch: int) -> None:
    F = 5
    obj = core.Variable("obj", SE2, count=F)
    x = random_poses(batch, F, seed=batch)
    probe = random_poses(batch, F, seed=10 + batch)
    i, j = torch.arange(F - 1), torch.arange(1, F)
    c2 = torch.rand(batch, F - 1, 1, dtype=torch.float64) * 0.01 + 0.001
    cost = QuasiStaticPushing(obj, i, j, probe[:, :-1], probe[:, 1:], c2)
    assert torch.allclose(assembled(cost, x), numeric_jacobian(cost, x), atol=1e-7)


def test_pushing_residual_matches_the_ellipsoidal_limit_surface_model() -> None:
    """Object and pusher motions built to satisfy Lynch et al.'s sticking-contact solution,
    ``v = ((c^2 + p p^T) v_p) / (c^2 + |p|^2)``, ``omega = (p x v) / c^2``, give a zero
    residual; the same object motion without a pusher move does not."""
    c2 = torch.tensor([0.004], dtype=torch.float64)
    p = torch.tensor([-0.1, 0.03], dtype=torch.float64)
    vp = torch.tensor([0.01, 0.002], dtype=torch.float64)
    px, py = p
    den = c2[0] + px**2 + py**2
    v = torch.stack((((c2[0] + px**2) * vp[0] + px * py * vp[1]) / den,
                     (px * py * vp[0] + (c2[0] + py**2) * vp[1]) / den))
    omega = (px * v[1] - py * v[0]) / c2[0]
    o1 = se2.identity(dtype=torch.float64)
    rot = torch.stack((torch.cos(omega), torch.sin(omega)))
    o2 = torch.cat((se2.act(torch.cat((torch.zeros(2, dtype=torch.float64), rot)), v), rot))
    e2 = torch.cat((se2.act(o2, p), rot))
    e1 = torch.cat((e2[:2] - se2.act(torch.cat((torch.zeros(2, dtype=torch.float64), rot)), vp),
                    rot))
    r, _ = pushing_residual(o1, o2, e1, e2, c2, False)
    assert r.abs().max() < 1e-15
    r2, _ = pushing_residual(o1, o2, e2, e2, c2, False)
    assert r2.abs().max() > 1e-3


SHAPES = [("rectangle", (0.118, 0.079)), ("disc", (0.09, 0.09)), ("ellipse", (0.13, 0.085))]


def boundary(kind: str, ab: tuple[float, float], num: int = 2000) -> torch.Tensor:
    a, b = ab
    if kind == "ellipse" or kind == "disc":
        t = torch.linspace(0, 2 * math.pi, num, dtype=torch.float64)
        return torch.stack((a * torch.cos(t), b * torch.sin(t)), -1)
    s = torch.linspace(-1, 1, num // 4, dtype=torch.float64)
    one = torch.ones_like(s)
    return torch.cat([torch.stack((a * one, b * s), -1), torch.stack((-a * one, b * s), -1),
                      torch.stack((a * s, b * one), -1), torch.stack((a * s, -b * one), -1)])


@pytest.mark.parametrize("kind,ab", SHAPES)
def test_sdf_is_the_distance_to_the_boundary(kind: str, ab: tuple[float, float]) -> None:
    gen = torch.Generator().manual_seed(1)
    angle = torch.rand(300, generator=gen, dtype=torch.float64) * 2 * math.pi
    radius = torch.rand(300, generator=gen, dtype=torch.float64) * 0.06 + 0.06
    q = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), -1)
    shape = torch.tensor([shape_code(kind), *ab], dtype=torch.float64).expand(300, 3)
    d, g = planar_sdf(q, shape)
    dist = torch.cdist(q, boundary(kind, ab)).min(-1).values
    assert torch.allclose(d.abs(), dist, atol=2e-4)
    a, b = ab
    inside = (q[:, 0].abs() <= a) & (q[:, 1].abs() <= b) if kind == "rectangle" else \
        (q[:, 0] / a) ** 2 + (q[:, 1] / b) ** 2 < 1
    assert torch.equal(d < 0, inside)
    assert torch.allclose(g.norm(dim=-1), torch.ones(300, dtype=torch.float64))


@pytest.mark.parametrize("kind,ab", SHAPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_contact_jacobians_match_finite_differences(kind: str, ab: tuple[float, float],
                                                    batch: int) -> None:
    """Object poses near the origin, pusher points within 3 cm of the boundary (away from the
    rectangle's inner diagonals, where its distance has a kink)."""
    F, E = 3, 6
    obj = core.Variable("obj", SE2, count=F)
    x = random_poses(batch, F, scale=0.01, seed=2)
    gen = torch.Generator().manual_seed(3)
    t = torch.rand(batch, E, generator=gen, dtype=torch.float64) * 2 * math.pi
    a, b = ab
    rim = torch.stack((a * torch.cos(t), b * torch.sin(t)), -1)
    if kind == "rectangle":  # points facing a side
        rim = torch.stack((a * torch.cos(t).sign() * (torch.cos(t).abs() > 0.7),
                           b * torch.sin(t).sign() * (torch.cos(t).abs() <= 0.7)), -1)
        rim = rim + torch.stack((b * 0.5 * torch.sin(t), a * 0.3 * torch.cos(t)), -1) * (
            rim == 0)
    out = 1 + (torch.rand(batch, E, 1, generator=gen, dtype=torch.float64) - 0.3) * 0.3
    pts = rim * out
    pusher = torch.cat((pts, torch.ones(batch, E, 1, dtype=torch.float64),
                        torch.zeros(batch, E, 1, dtype=torch.float64)), -1)
    shape = torch.tensor([shape_code(kind), a, b], dtype=torch.float64)
    index = torch.randint(F, (E,), generator=gen)
    cost = PlanarContact(obj, index, pusher, shape, radius=0.01)
    assert torch.allclose(assembled(cost, x), numeric_jacobian(cost, x), atol=1e-6)


def test_contact_solve_puts_the_boundary_under_the_probe() -> None:
    """Probes placed at distance 0.01 from a rectangle at a known pose, one per side: LM from a
    perturbed pose recovers the pose (three non-parallel sides fix it)."""
    truth = se2.exp(torch.tensor([[0.02, -0.01, 0.3]], dtype=torch.float64))
    local = torch.tensor([[0.128, 0.02], [-0.04, 0.089], [-0.128, -0.03], [0.05, -0.089]],
                         dtype=torch.float64)
    pts = se2.act(truth, local)
    pusher = torch.cat((pts, torch.ones(4, 1, dtype=torch.float64),
                        torch.zeros(4, 1, dtype=torch.float64)), -1)
    obj = core.Variable("obj", SE2, count=1)
    shape = torch.tensor([0, 0.118, 0.079], dtype=torch.float64)
    cost = PlanarContact(obj, torch.zeros(4, dtype=torch.long), pusher, shape, radius=0.01)
    start = se2.retract(truth, torch.tensor([[0.005, 0.004, -0.05]], dtype=torch.float64))
    sol = core.LevenbergMarquardt(max_iters=30, abs_tol=1e-25).solve(core.Objective([cost]),
                                                      {"obj": start[None]})
    assert torch.allclose(sol.values["obj"][0], truth, atol=1e-6)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="unknown shape 'square'"):
        shape_code("square")
    obj = core.Variable("obj", SE2, count=1)
    with pytest.raises(ValueError, match="shape codes"):
        PlanarContact(obj, torch.zeros(1, dtype=torch.long), se2.identity(1, dtype=torch.float64),
                      torch.tensor([5.0, 0.1, 0.1], dtype=torch.float64), 0.01)
    with pytest.raises(ValueError, match="must be SE2"):
        PlanarContact(core.Variable("v", core.Vector(2)), torch.zeros(1, dtype=torch.long),
                      se2.identity(1), torch.tensor([0.0, 0.1, 0.1]), 0.01)
