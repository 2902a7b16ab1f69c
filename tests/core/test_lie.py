"""Tests for core.lie: group axioms, exp/log, Jacobians, gradients, pypose agreement."""

from __future__ import annotations

import copy
import math
import pickle

import pypose as pp
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.autograd.functional import jacobian

from core.lie import SE2, SE3, SO2, SO3, LieGroup, Space, Vector, se2, se3, so2, so3

F64 = torch.float64
F32 = torch.float32
GROUPS = [SO2, SE2, SO3, SE3]
SHAPES = [(), (5,), (2, 3)]
SEEDS = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=15, deadline=None)
# exact zero, tiny, both sides of the float64 (0.5) and float32 (1.0) Taylor thresholds, near pi
ANGLES = [0.0, 1e-9, 1e-6, 1e-3, 0.3, 0.5 - 1e-9, 0.5 + 1e-9, 0.99, 1.01, 2.0, 3.0, math.pi - 1e-6]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rot_slice(G: LieGroup) -> slice:
    """Where the rotation part lives in the tangent vector."""
    return {SO2: slice(0, 1), SE2: slice(2, 3), SO3: slice(0, 3), SE3: slice(3, 6)}[G]


def tangent(
    G: LieGroup,
    shape: tuple[int, ...],
    g: torch.Generator,
    angle: float | None = None,
    dtype: torch.dtype = F64,
) -> Tensor:
    """Random tangent vector; its rotation angle is ``angle`` or uniform in ``[0, pi - 1e-3)``."""
    xi = torch.randn(*shape, G.dof, generator=g, dtype=dtype)
    rs = rot_slice(G)
    n = rs.stop - rs.start
    if angle is None:
        mag = torch.rand(*shape, 1, generator=g, dtype=dtype) * (math.pi - 1e-3)
    else:
        mag = torch.full((*shape, 1), angle, dtype=dtype)
    if n == 1:
        sign = torch.where(torch.rand(*shape, 1, generator=g, dtype=dtype) < 0.5, -1.0, 1.0)
        xi[..., rs] = sign.to(dtype) * mag
    else:
        d = xi[..., rs]
        xi[..., rs] = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True) * mag
    return xi


def assert_same(G: LieGroup, a: Tensor, b: Tensor, atol: float = 1e-10) -> None:
    """Same group element (compares matrices, so quaternion sign does not matter)."""
    torch.testing.assert_close(G.to_matrix(a), G.to_matrix(b), atol=atol, rtol=0)


def canon(q: Tensor) -> Tensor:
    """Quaternion (last 4 entries) with w >= 0."""
    return torch.where(q[..., -1:] < 0, -q, q)


def point(G: LieGroup, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return torch.randn(*shape, 2 if G in (SO2, SE2) else 3, generator=g, dtype=F64)


# --------------------------------------------------------------------------- group axioms


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("G", GROUPS, ids=repr)
class TestAxioms:
    @FAST
    @given(seed=SEEDS)
    def test_associativity(self, G: LieGroup, shape: tuple[int, ...], seed: int) -> None:
        g = gen(seed)
        x, y, z = (G.random(*shape, generator=g, dtype=F64) for _ in range(3))
        assert_same(G, G.compose(G.compose(x, y), z), G.compose(x, G.compose(y, z)))

    @FAST
    @given(seed=SEEDS)
    def test_identity_and_inverse(self, G: LieGroup, shape: tuple[int, ...], seed: int) -> None:
        x = G.random(*shape, generator=gen(seed), dtype=F64)
        e = G.identity(*shape, dtype=F64)
        assert e.shape == x.shape
        torch.testing.assert_close(G.compose(x, e), x, atol=1e-12, rtol=0)
        torch.testing.assert_close(G.compose(e, x), x, atol=1e-12, rtol=0)
        torch.testing.assert_close(G.compose(x, G.inverse(x)), e, atol=1e-12, rtol=0)
        torch.testing.assert_close(G.compose(G.inverse(x), x), e, atol=1e-12, rtol=0)
        torch.testing.assert_close(G.log(e), torch.zeros(*shape, G.dof, dtype=F64))

    @FAST
    @given(seed=SEEDS)
    def test_exp_log_roundtrip(self, G: LieGroup, shape: tuple[int, ...], seed: int) -> None:
        g = gen(seed)
        xi = tangent(G, shape, g)
        torch.testing.assert_close(G.log(G.exp(xi)), xi, atol=1e-10, rtol=0)
        x = G.random(*shape, generator=g, dtype=F64)
        assert_same(G, G.exp(G.log(x)), x)

    @FAST
    @given(seed=SEEDS)
    def test_retract_local(self, G: LieGroup, shape: tuple[int, ...], seed: int) -> None:
        g = gen(seed)
        x, y = G.random(*shape, generator=g, dtype=F64), G.random(*shape, generator=g, dtype=F64)
        assert_same(G, G.retract(x, G.local(x, y)), y)
        delta = tangent(G, shape, g)
        torch.testing.assert_close(G.local(x, G.retract(x, delta)), delta, atol=1e-9, rtol=0)

    @FAST
    @given(seed=SEEDS)
    def test_adjoint(self, G: LieGroup, shape: tuple[int, ...], seed: int) -> None:
        g = gen(seed)
        x, xi = G.random(*shape, generator=g, dtype=F64), tangent(G, shape, g)
        ad = G.adjoint(x)
        assert ad.shape == (*shape, G.dof, G.dof)
        lhs = G.compose(x, G.exp(xi))
        rhs = G.compose(G.exp((ad @ xi[..., None])[..., 0]), x)
        assert_same(G, lhs, rhs)

    @FAST
    @given(seed=SEEDS)
    def test_act_matches_matrix(self, G: LieGroup, shape: tuple[int, ...], seed: int) -> None:
        g = gen(seed)
        x, p = G.random(*shape, generator=g, dtype=F64), point(G, shape, g)
        m = G.to_matrix(x)
        n = p.shape[-1]
        expected = (m[..., :n, :n] @ p[..., None])[..., 0]
        if m.shape[-1] > n:
            expected = expected + m[..., :n, n]
        torch.testing.assert_close(G.act(x, p), expected, atol=1e-12, rtol=0)
        assert_same(G, G.from_matrix(m), x, atol=1e-12)
        torch.testing.assert_close(G.act(G.inverse(x), G.act(x, p)), p, atol=1e-10, rtol=0)

    @FAST
    @given(seed=SEEDS)
    def test_hat_vee_matrix_exp(self, G: LieGroup, shape: tuple[int, ...], seed: int) -> None:
        xi = tangent(G, shape, gen(seed))
        mod = G.module
        torch.testing.assert_close(mod.vee(mod.hat(xi)), xi)
        # matrix_exp (Pade) itself is only good to ~1e-10 near pi, hence the looser tolerance
        torch.testing.assert_close(
            torch.linalg.matrix_exp(mod.hat(xi)), G.to_matrix(G.exp(xi)), atol=1e-9, rtol=0
        )


@pytest.mark.parametrize("angle", ANGLES)
@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_exp_log_special_angles(G: LieGroup, angle: float) -> None:
    xi = tangent(G, (4,), gen(0), angle=angle)
    torch.testing.assert_close(G.log(G.exp(xi)), xi, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_log_at_pi_is_a_valid_preimage(G: LieGroup) -> None:
    xi = tangent(G, (6,), gen(1), angle=math.pi)
    x = G.exp(xi)
    out = G.log(x)
    rs = rot_slice(G)
    torch.testing.assert_close(
        torch.linalg.vector_norm(out[..., rs], dim=-1), torch.full((6,), math.pi, dtype=F64)
    )
    assert_same(G, G.exp(out), x)


@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_broadcasting(G: LieGroup) -> None:
    g = gen(3)
    x = G.random(2, 1, generator=g, dtype=F64)
    y = G.random(3, generator=g, dtype=F64)
    xy = G.compose(x, y)
    assert xy.shape == (2, 3, G.storage_dim)
    assert_same(G, xy[1, 2], G.compose(x[1, 0], y[2]))
    p = point(G, (3,), g)
    assert G.act(x, p).shape == (2, 3, p.shape[-1])
    assert G.act(G.identity(dtype=F64), p).shape == p.shape


# --------------------------------------------------------------------------- Jacobians


def _jr_autograd(G: LieGroup, xi: Tensor) -> Tensor:
    x = G.exp(xi)
    return jacobian(lambda d: G.local(x, G.exp(xi + d)), torch.zeros_like(xi))


def _jl_autograd(G: LieGroup, xi: Tensor) -> Tensor:
    x_inv = G.inverse(G.exp(xi))
    return jacobian(lambda d: G.log(G.compose(G.exp(xi + d), x_inv)), torch.zeros_like(xi))


@pytest.mark.parametrize("angle", ANGLES)
@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_jacobians_vs_autograd(G: LieGroup, angle: float) -> None:
    xi = tangent(G, (), gen(int(angle * 1e6)), angle=angle)
    eye = torch.eye(G.dof, dtype=F64)
    jr, jl = G.jr(xi), G.jl(xi)
    torch.testing.assert_close(jr, _jr_autograd(G, xi), atol=1e-10, rtol=0)
    torch.testing.assert_close(jl, _jl_autograd(G, xi), atol=1e-10, rtol=0)
    torch.testing.assert_close(jr @ G.jr_inv(xi), eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(jl @ G.jl_inv(xi), eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(jr, G.jl(-xi), atol=1e-12, rtol=0)
    torch.testing.assert_close(jl, G.adjoint(G.exp(xi)) @ jr, atol=1e-10, rtol=0)


@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_jacobians_vs_finite_differences(G: LieGroup) -> None:
    xi = tangent(G, (), gen(7), angle=1.3)
    x, h = G.exp(xi), 1e-6
    cols = []
    for k in range(G.dof):
        e = torch.zeros(G.dof, dtype=F64)
        e[k] = h
        cols.append((G.local(x, G.exp(xi + e)) - G.local(x, G.exp(xi - e))) / (2 * h))
    torch.testing.assert_close(G.jr(xi), torch.stack(cols, dim=-1), atol=1e-8, rtol=0)


@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_jacobians_batched(G: LieGroup) -> None:
    xi = tangent(G, (2, 3), gen(11))
    for fn in (G.jr, G.jr_inv, G.jl, G.jl_inv):
        out = fn(xi)
        assert out.shape == (2, 3, G.dof, G.dof)
        torch.testing.assert_close(out[1, 2], fn(xi[1, 2]))


@pytest.mark.parametrize("G", [SE2, SO3, SE3], ids=repr)
def test_threshold_continuity(G: LieGroup) -> None:
    """Taylor and exact branches agree where they meet (float64 threshold 0.5)."""
    g = gen(5)
    xi = tangent(G, (), g, angle=1.0)
    rs = rot_slice(G)
    lo, hi = xi.clone(), xi.clone()
    lo[rs] = xi[rs] * (0.5 - 1e-14)
    hi[rs] = xi[rs] * (0.5 + 1e-14)
    for fn in (G.jr, G.jr_inv, G.jl_inv, G.exp):
        torch.testing.assert_close(fn(lo), fn(hi), atol=1e-12, rtol=0)
    y = G.exp(hi)
    torch.testing.assert_close(G.log(G.exp(lo)), G.log(y), atol=1e-11, rtol=0)


@pytest.mark.parametrize("G", [SE2, SO3, SE3], ids=repr)
def test_mixed_batches_match_single_branch_batches(G: LieGroup) -> None:
    """On the CPU a batch whose angles are all small (or all large) skips the other branch; a
    mixed batch selects per element: values and gradients must agree element by element."""
    g = gen(3)
    small = tangent(G, (4,), g, angle=0.2)
    large = tangent(G, (4,), g, angle=2.0)
    for fn in (G.exp, G.jr, G.jr_inv, G.jl, G.jl_inv, lambda xi: G.log(G.exp(xi))):
        mixed = torch.cat([small, large]).requires_grad_()
        alone = [small.clone().requires_grad_(), large.clone().requires_grad_()]
        out = fn(mixed)
        parts = [fn(a) for a in alone]
        torch.testing.assert_close(out, torch.cat(parts), atol=1e-14, rtol=0)
        out.sum().backward()
        sum(p.sum() for p in parts).backward()  # type: ignore[union-attr]
        grads = torch.cat([a.grad for a in alone])  # type: ignore[misc]
        torch.testing.assert_close(mixed.grad, grads, atol=1e-13, rtol=0)


def test_even_coeffs_skips_unused_branch_on_cpu_only() -> None:
    """The exact branch of an all-small CPU batch is not evaluated (a trap function proves it);
    inside torch.func transforms (where the mask cannot be read) both branches run."""
    from core.lie import _util

    def trap(t: Tensor) -> Tensor:
        raise AssertionError("exact branch evaluated")

    theta2 = torch.full((5, 1), 0.01, dtype=F64)
    (c,) = _util.even_coeffs(theta2, [(_util.SIN_OVER_T, trap)])
    torch.testing.assert_close(c, torch.sin(theta2.sqrt()) / theta2.sqrt(), atol=1e-15, rtol=0)
    assert _util.branches(theta2 < 1) == (True, False)
    assert _util.branches(theta2 > 1) == (False, True)
    assert _util.branches(theta2[:0] < 1) == (True, False)  # empty: shapes still come out
    assert so3.jl_inv(torch.zeros(0, 3, dtype=F64)).shape == (0, 3, 3)
    seen = []
    torch.func.vmap(lambda t: seen.append(_util.branches(t < 1)) or t)(theta2)
    assert seen == [(True, True)]
    xi = torch.full((5, 3), 0.1, dtype=F64)
    jac = torch.func.vmap(torch.func.jacfwd(so3.exp))(xi)  # traced: both branches, same values
    torch.testing.assert_close(jac, torch.stack([jacobian(so3.exp, x) for x in xi]))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("G", GROUPS, ids=repr)
@pytest.mark.parametrize("angle", [0.0, 1e-7, math.pi - 1e-6, math.pi])
def test_gradients_finite(G: LieGroup, dtype: torch.dtype, angle: float) -> None:
    xi = tangent(G, (3,), gen(2), angle=angle, dtype=dtype)
    if angle == 0.0:
        xi = torch.zeros_like(xi)
    xi.requires_grad_(True)
    outs = [G.log(G.exp(xi)), G.exp(xi), G.from_matrix(G.to_matrix(G.exp(xi)))]
    if G is not SO2:
        outs += [G.jr(xi), G.jl_inv(xi), G.jr_inv(xi), G.adjoint(G.exp(xi))]
    for out in outs:
        (grad,) = torch.autograd.grad(out.sum(), xi)
        assert torch.isfinite(grad).all(), (G, dtype, angle)


@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_gradient_at_identity_values(G: LieGroup) -> None:
    """d log(exp(xi)) / d xi == I exactly at xi = 0."""
    xi = torch.zeros(G.dof, dtype=F64)
    j = jacobian(lambda v: G.log(G.exp(v)), xi)
    torch.testing.assert_close(j, torch.eye(G.dof, dtype=F64))


@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_gradcheck(G: LieGroup) -> None:
    g = gen(4)
    x = G.random(generator=g, dtype=F64)
    for xi in (torch.zeros(G.dof, dtype=F64), tangent(G, (), g)):
        xi.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda v, x=x: G.local(x, G.retract(x, v)), (xi,))


# --------------------------------------------------------------------------- float32


@pytest.mark.parametrize("angle", [0.0, 1e-6, 0.3, 0.99, 1.01, 2.0, 3.0])
@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_float32(G: LieGroup, angle: float) -> None:
    xi64 = tangent(G, (4,), gen(9), angle=angle)
    xi = xi64.float()
    x = G.exp(xi)
    assert x.dtype == F32 and G.random(2, dtype=F32).dtype == F32
    torch.testing.assert_close(G.log(x), xi, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.double(), G.exp(xi64), atol=1e-6, rtol=0)
    for fn in (G.jr, G.jr_inv, G.jl, G.jl_inv):
        torch.testing.assert_close(fn(xi).double(), fn(xi64), atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------- pypose agreement


@FAST
@given(seed=SEEDS)
def test_so3_matches_pypose(seed: int) -> None:
    g = gen(seed)
    phi = tangent(SO3, (8,), g)
    q = so3.exp(phi)
    torch.testing.assert_close(canon(q), canon(pp.so3(phi).Exp().tensor()), atol=1e-10, rtol=0)
    torch.testing.assert_close(so3.log(q), pp.SO3(q).Log().tensor(), atol=1e-10, rtol=0)
    torch.testing.assert_close(so3.jr(phi), pp.so3(phi).Jr(), atol=1e-10, rtol=0)
    x, y = so3.random(8, generator=g, dtype=F64), so3.random(8, generator=g, dtype=F64)
    p = torch.randn(8, 3, generator=g, dtype=F64)
    torch.testing.assert_close(so3.act(x, p), pp.SO3(x).Act(p), atol=1e-10, rtol=0)
    torch.testing.assert_close(so3.inverse(x), pp.SO3(x).Inv().tensor(), atol=1e-12, rtol=0)
    xy = (pp.SO3(x) * pp.SO3(y)).tensor()
    torch.testing.assert_close(canon(so3.compose(x, y)), canon(xy), atol=1e-10, rtol=0)
    torch.testing.assert_close(so3.to_matrix(x), pp.SO3(x).matrix(), atol=1e-12, rtol=0)


@FAST
@given(seed=SEEDS)
def test_se3_matches_pypose(seed: int) -> None:
    g = gen(seed)
    xi = tangent(SE3, (8,), g)
    x = se3.exp(xi)
    ref = pp.se3(xi).Exp().tensor()
    torch.testing.assert_close(x[..., :3], ref[..., :3], atol=1e-10, rtol=0)
    torch.testing.assert_close(canon(x[..., 3:]), canon(ref[..., 3:]), atol=1e-10, rtol=0)
    torch.testing.assert_close(se3.log(x), pp.SE3(x).Log().tensor(), atol=1e-10, rtol=0)
    x, y = se3.random(8, generator=g, dtype=F64), se3.random(8, generator=g, dtype=F64)
    p = torch.randn(8, 3, generator=g, dtype=F64)
    torch.testing.assert_close(se3.act(x, p), pp.SE3(x).Act(p), atol=1e-10, rtol=0)
    torch.testing.assert_close(se3.inverse(x), pp.SE3(x).Inv().tensor(), atol=1e-10, rtol=0)
    xy, ours = (pp.SE3(x) * pp.SE3(y)).tensor(), se3.compose(x, y)
    torch.testing.assert_close(ours[..., :3], xy[..., :3], atol=1e-10, rtol=0)
    torch.testing.assert_close(canon(ours[..., 3:]), canon(xy[..., 3:]), atol=1e-10, rtol=0)
    torch.testing.assert_close(se3.to_matrix(x), pp.SE3(x).matrix(), atol=1e-12, rtol=0)
    ad_xi = (se3.adjoint(x) @ xi[..., None])[..., 0]
    torch.testing.assert_close(ad_xi, pp.SE3(x).Adj(pp.se3(xi)).tensor(), atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- misc


@pytest.mark.parametrize("axis", range(3))
def test_so3_from_matrix_half_turns(axis: int) -> None:
    """Shepperd's branch selection is exact for 180-degree rotations (trace = -1)."""
    for direction in (torch.eye(3, dtype=F64)[axis], torch.tensor([1.0, -2.0, 0.5], dtype=F64)):
        phi = direction / direction.norm() * math.pi
        r = so3.to_matrix(so3.exp(phi))
        q = so3.from_matrix(r)
        torch.testing.assert_close(so3.to_matrix(q), r, atol=1e-12, rtol=0)
        torch.testing.assert_close(q.norm(), torch.tensor(1.0, dtype=F64))


def test_normalize() -> None:
    g = gen(0)
    for G in GROUPS:
        x = G.random(5, generator=g, dtype=F64)
        scaled = x.clone()
        n = 2 if G in (SO2, SE2) else 4
        scaled[..., -n:] *= 1.7
        torch.testing.assert_close(G.normalize(scaled), x)


def test_identity_and_random_shapes() -> None:
    for G in [*GROUPS, Vector(4)]:
        assert G.identity().shape == (G.storage_dim,)
        assert G.identity(2, 3).shape == (2, 3, G.storage_dim)
        assert G.identity((2, 3)).shape == (2, 3, G.storage_dim)
        assert G.identity(dtype=F64).dtype == F64
        a = G.random(4, generator=gen(1), dtype=F64)
        torch.testing.assert_close(a, G.random(4, generator=gen(1), dtype=F64))


@pytest.mark.parametrize("mod", [so2, se2, so3, se3], ids=lambda m: m.__name__)
def test_shape_errors(mod: object) -> None:
    bad = torch.zeros(3, 5)
    for name in ("exp", "log", "inverse", "jr", "jl_inv", "adjoint", "normalize", "to_matrix"):
        with pytest.raises(ValueError, match=r"\(3, 5\)"):
            getattr(mod, name)(bad)
    with pytest.raises(ValueError):
        mod.compose(bad, bad)  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        mod.from_matrix(torch.zeros(2, 5, 5))  # type: ignore[attr-defined]


def test_descriptors() -> None:
    assert repr(SE3) == "SE3" and str(SO2) == "SO2" and repr(Vector(3)) == "Vector(3)"
    assert (SO2.storage_dim, SO2.dof) == (2, 1)
    assert (SE2.storage_dim, SE2.dof) == (4, 3)
    assert (SO3.storage_dim, SO3.dof) == (4, 3)
    assert (SE3.storage_dim, SE3.dof) == (7, 6)
    table = {SE3: 1, Vector(3): 2}
    assert table[SE3] == 1 and table[Vector(3)] == 2 and Vector(3) != Vector(2)
    assert isinstance(SE3, Space) and isinstance(Vector(2), Space)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Vector(0)
    for space in (*GROUPS, Vector(3)):
        assert pickle.loads(pickle.dumps(space)) == space
        assert copy.deepcopy(space) is space or copy.deepcopy(space) == space
    assert pickle.loads(pickle.dumps(SE3)) is SE3


def test_vector_space() -> None:
    V = Vector(3)
    g = gen(0)
    x, y = V.random(2, generator=g, dtype=F64), V.random(2, generator=g, dtype=F64)
    torch.testing.assert_close(V.retract(x, V.local(x, y)), y)
    torch.testing.assert_close(V.compose(x, V.inverse(x)), V.identity(2, dtype=F64))
    torch.testing.assert_close(V.log(V.exp(x)), x)
    torch.testing.assert_close(V.act(x, y), x + y)
    for fn in (V.jr, V.jr_inv, V.jl, V.jl_inv, V.adjoint):
        torch.testing.assert_close(fn(x), torch.eye(3, dtype=F64).expand(2, 3, 3))
    with pytest.raises(ValueError, match="Vector"):
        V.exp(torch.zeros(2))
