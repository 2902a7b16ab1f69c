"""The compiled kernels (core._kernels via core.fused) equal the torch path: float64, 1e-12
relative, on random inputs whose residual angles include 0, tiny, both sides of the Taylor
thresholds and near pi; plus when the kernels are (not) used, and the cache-less fallback."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import core
from core import fused
from core.lie import LieGroup
from core.linearize import linearize

pytestmark = pytest.mark.skipif(not core._kernels.AVAILABLE, reason="Numba not installed")

DT = torch.float64
# residual rotation angles: zero, tiny, near the 0.1 / 0.5 Taylor thresholds, large, near pi
ANGLES = [0.0, 1e-9, 1e-6, 1e-3, 0.1, 0.2, 0.3, 0.5 - 1e-9, 0.5 + 1e-9, 1.0, 2.0, 3.0,
          math.pi - 1e-6, math.pi - 1e-9]


def assert_equal(fast: torch.Tensor, ref: torch.Tensor, what: str,
                 scale: torch.Tensor | None = None) -> None:
    """``|fast - ref| <= 1e-12 * scale`` entry by entry (``scale`` defaults to ``|ref|``)."""
    scale = ref.abs() if scale is None else scale
    err = float(((fast - ref).abs() / scale.clamp_min(1e-300)).max().detach())
    assert err <= 1e-12, f"{what}: max relative difference {err:.3e}"


def both(objective: core.Objective, values: dict[str, torch.Tensor]) -> None:
    """Kernels vs torch, entry by entry, each relative to its own natural scale: ``H_pq`` to
    ``sqrt(H_pp H_qq)`` and ``g_p`` to ``sqrt(H_pp 2 F)`` (Cauchy-Schwarz bounds of the terms
    summed into them, so cancellation between factors cannot hide a wrong term)."""
    for c in objective.costs:
        assert fused.applies(c, values), c.name
    fast, ref = linearize(objective, values), linearize(objective, values, fused=False)
    p = ref.pattern
    diag = ref.H[:, p.diag]
    assert_equal(fast.cost, ref.cost, "cost")
    assert_equal(fast.g, ref.g, "g", torch.sqrt(diag * 2 * ref.cost[:, None]))
    assert_equal(fast.H, ref.H, "H", torch.sqrt(diag[:, p.rows] * diag[:, p.cols]))


def residual_tangent(G: LieGroup, gen: torch.Generator, batch: int, num: int) -> torch.Tensor:
    """Tangent vectors ``(B, E, dof)`` whose rotation angles cycle through ``ANGLES`` (random
    axes and signs), translations ~ N(0, 1)."""
    angles = torch.tensor(ANGLES, dtype=DT).repeat(batch * num // len(ANGLES) + 1)
    angles = angles[: batch * num].view(batch, num, 1)
    if G == core.SE3:
        axis = torch.randn(batch, num, 3, generator=gen, dtype=DT)
        phi = axis / axis.norm(dim=-1, keepdim=True) * angles
        return torch.cat([torch.randn(batch, num, 3, generator=gen, dtype=DT), phi], -1)
    sign = torch.randint(0, 2, (batch, num, 1), generator=gen).to(DT) * 2 - 1
    return torch.cat([torch.randn(batch, num, 2, generator=gen, dtype=DT), sign * angles], -1)


def upper(gen: torch.Generator, *shape: int, d: int) -> torch.Tensor:
    a = torch.randn(*shape, d, d, generator=gen, dtype=DT)
    return torch.linalg.cholesky(a @ a.mT + d * torch.eye(d, dtype=DT), upper=True)


def pose_graph(G: LieGroup, gen: torch.Generator, batch: int, num: int, weights: str
               ) -> tuple[core.Objective, dict[str, torch.Tensor]]:
    """Edge e joins poses 2e and 2e+1 (blocks not summed over factors) plus loop edges that
    share poses, measured so that the residual of edge e is ``residual_tangent``'s; a prior on
    every pose with its own angles."""
    poses = G.random(batch, 2 * num, generator=gen, dtype=DT)
    i = torch.cat([torch.arange(0, 2 * num, 2), torch.randint(0, 2 * num, (num,), generator=gen)])
    j = torch.cat([torch.arange(1, 2 * num, 2), (i[num:] + 1 + torch.randint(
        0, 2 * num - 1, (num,), generator=gen)) % (2 * num)])
    E = i.shape[0]
    r0 = residual_tangent(G, gen, batch, E)
    rel = G.compose(G.inverse(poses[:, i]), poses[:, j])
    measured = G.compose(rel, G.exp(-r0))  # z^-1 xi^-1 xj = Exp(r0)
    target = G.compose(poses, G.exp(-residual_tangent(G, gen, batch, 2 * num)))
    var = core.Variable("x", G, 2 * num)
    d = G.dof
    kw = weighting(weights, gen, batch, E, d)
    between = core.costs.Between(var, i, j, measured, **kw, name="between")
    prior = core.costs.Prior(var, target[:1], sqrt_info=1e3 if weights == "scalar" else None,
                             name="prior")
    return core.Objective([between, prior]), {"x": poses}


def weighting(weights: str, gen: torch.Generator, batch: int, E: int, d: int) -> dict:
    """A cost's weighting keywords by name: a ``(d, d)`` ``sqrt_info`` per factor, per batch
    element and factor, or shared; a scalar; per dimension; none."""
    if weights == "sqrt_info":
        return {"sqrt_info": upper(gen, E, d=d)}
    if weights == "batched_sqrt_info":
        return {"sqrt_info": upper(gen, batch, E, d=d)}
    if weights == "shared_sqrt_info":
        return {"sqrt_info": upper(gen, d=d)}
    if weights == "scalar":
        return {"weight": 2.5}
    if weights == "diagonal":
        return {"weight": torch.rand(E, d, generator=gen, dtype=DT) + 0.5}
    assert weights == "none", weights
    return {}


WEIGHTS = ["sqrt_info", "batched_sqrt_info", "shared_sqrt_info", "scalar", "diagonal", "none"]


@pytest.mark.parametrize("G", [core.SE3, core.SE2], ids=repr)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_pose_kernels_equal_torch(G: LieGroup, weights: str) -> None:
    gen = torch.Generator().manual_seed(hash((str(G), weights)) % 2**31)
    objective, values = pose_graph(G, gen, batch=2, num=3 * len(ANGLES), weights=weights)
    assert objective.costs[0].kernel == f"between_{str(G).lower()}"
    both(objective, values)


@pytest.mark.parametrize("G", [core.SE3, core.SE2], ids=repr)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("loss", [None, "cauchy"])
def test_prior_kernels_equal_torch(G: LieGroup, weights: str, loss: str | None) -> None:
    """The prior kernels with every weighting (a 6x6 / 3x3 ``sqrt_info`` per factor, per batch
    element and factor, shared; scalar; per dimension; none) and with a robust loss; several
    priors on one pose (their blocks summed), residual angles through ``ANGLES``."""
    gen = torch.Generator().manual_seed(hash((str(G), weights, loss)) % 2**31)
    B, F = 2, 2 * len(ANGLES)
    poses = G.random(B, F, generator=gen, dtype=DT)
    index = torch.cat([torch.arange(F), torch.randint(0, F, (F,), generator=gen)])
    E, d = index.shape[0], G.dof
    target = G.compose(poses[:, index], G.exp(-residual_tangent(G, gen, B, E)))
    kw = weighting(weights, gen, B, E, d)
    robust = None if loss is None else core.RobustLoss(loss, 2.0)
    prior = core.costs.Prior(core.Variable("x", G, F), target, index, **kw, loss=robust)
    assert prior.kernel == f"prior_{str(G).lower()}"
    both(core.Objective([prior]), {"x": poses})

@pytest.mark.parametrize("G", [core.SE3, core.SE2], ids=repr)
def test_between_two_variables(G: LieGroup) -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = core.Variable("a", G, 5), core.Variable("b", G, 4)
    i, j = torch.tensor([0, 1, 4, 2, 3]), torch.tensor([3, 0, 1, 2, 2])
    xa, xb = G.random(3, 5, generator=gen, dtype=DT), G.random(3, 4, generator=gen, dtype=DT)
    z = G.random(1, 5, generator=gen, dtype=DT)
    cost = core.costs.Between(a, i, j, z, other=b, sqrt_info=upper(gen, 5, d=G.dof))
    prior = core.costs.Prior(b, xb[0], name="pb")
    prior_a = core.costs.Prior(a, xa[1], name="pa")
    both(core.Objective([cost, prior, prior_a]), {"a": xa, "b": xb})


def _bal_scene(gen: torch.Generator, C: int, P: int, O: int, B: int  # noqa: N803, E741
               ) -> tuple[tuple[core.Variable, ...], torch.Tensor, torch.Tensor, torch.Tensor,
               torch.Tensor]:
    """A random BAL scene: the variables (cameras, intrinsics, points), camera and point indices
    ``(O,)`` (every point observed), camera poses ``(B, C, 7)`` and points ``(B, P, 3)``, each
    point in front of (down -z of) its first observing camera."""
    T = core.SE3.random(B, C, generator=gen, dtype=DT)
    ci = torch.randint(0, C, (O,), generator=gen)
    pi = torch.randint(0, P, (O,), generator=gen)
    pi[:P] = torch.arange(P)
    X = torch.randn(B, P, 3, generator=gen, dtype=DT)
    first = torch.zeros(P, dtype=torch.long).index_copy(0, pi[:P], ci[:P])
    X = core.lie.se3.act(core.lie.se3.inverse(T[:, first]),
                         X * 0.3 + torch.tensor([0, 0, -5.0], dtype=DT))
    v = (core.Variable("cameras", core.SE3, C), core.Variable("intrinsics", core.Vector(3), C),
         core.Variable("points", core.Vector(3), P))
    return v, ci, pi, T, X


@pytest.mark.parametrize("weights", ["none", "scalar", "per_observation", "sqrt_info"])
def test_reprojection_kernel_equals_torch(weights: str) -> None:
    gen = torch.Generator().manual_seed(11)
    C, P, O, B = 4, 30, 90, 2
    v, ci, pi, T, X = _bal_scene(gen, C, P, O, B)
    K = torch.tensor([500.0, 0.1, -0.05], dtype=DT) + 0.01 * torch.randn(B, C, 3, generator=gen,
                                                                           dtype=DT)
    observed = torch.randn(1, O, 2, generator=gen, dtype=DT) * 50
    kw = {
        "none": {},
        "scalar": {"weight": 0.7},
        "per_observation": {"weight": torch.rand(B, O, 1, generator=gen, dtype=DT) + 0.5},
        "sqrt_info": {"sqrt_info": upper(gen, O, d=2)},
    }[weights]
    cost = core.costs.Reprojection(*v, ci, pi, observed, **kw)
    assert cost.kernel == "reprojection_bal"
    both(core.Objective([cost]), {"cameras": T, "intrinsics": K, "points": X})


LOSSES = ["huber", "cauchy", "welsch", "geman_mcclure"]
SCALES = ["float", "scalar_tensor", "per_batch", "per_factor"]


def robust_scale(form: str, gen: torch.Generator, batch: int, num: int) -> float | torch.Tensor:
    """A robust-loss scale of each form the kernels read, around the residual norms (some
    factors inside Huber's quadratic region, some outside)."""
    if form == "float":
        return 6.0
    if form == "scalar_tensor":
        return torch.tensor(5.0, dtype=DT)
    if form == "per_batch":
        return torch.rand(batch, generator=gen, dtype=DT) * 4 + 3
    return torch.rand(1, num, generator=gen, dtype=DT) * 8 + 1


@pytest.mark.parametrize("G", [core.SE3, core.SE2], ids=repr)
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("form", SCALES)
def test_robust_pose_kernels_equal_torch(G: LieGroup, kind: str, form: str) -> None:
    """The IRLS weighting (cost._weigh: residual and Jacobian times sqrt(rho'(s)), cost
    0.5 rho(s)) inside the kernels equals the torch path's, for every loss and scale form."""
    gen = torch.Generator().manual_seed(100 * (G == core.SE3) + 10 * LOSSES.index(kind)
                                        + SCALES.index(form))
    objective, values = pose_graph(G, gen, batch=2, num=2 * len(ANGLES), weights="sqrt_info")
    between = objective.costs[0]
    loss = core.RobustLoss(kind, robust_scale(form, gen, 2, between.num_factors))
    objective = core.Objective([between.replace(loss=loss), objective.costs[1]])
    plain = objective.costs[0].replace(loss=None).evaluate(values, jacobians=False)
    assert plain.factor_cost is not None
    s, c = 2 * plain.factor_cost, torch.as_tensor(loss.scale)
    c2 = (c[:, None] if c.ndim == 1 else c) ** 2
    assert bool((s <= c2).any()) and bool((s > c2).any())  # both sides of Huber's kink
    both(objective, values)


@pytest.mark.parametrize("kind", ["huber", "cauchy"])
def test_robust_reprojection_kernel_equals_torch(kind: str) -> None:
    gen = torch.Generator().manual_seed(17)
    C, P, O, B = 3, 20, 60, 2
    v, ci, pi, T, X = _bal_scene(gen, C, P, O, B)
    K = torch.tensor([500.0, 0.1, -0.05], dtype=DT).expand(B, C, 3).clone()
    observed = torch.randn(1, O, 2, generator=gen, dtype=DT) * 50
    cost = core.costs.Reprojection(*v, ci, pi, observed,
                                   weight=torch.rand(B, O, 1, generator=gen, dtype=DT) + 0.5,
                                   loss=core.RobustLoss(kind, torch.tensor(40.0, dtype=DT)))
    both(core.Objective([cost]), {"cameras": T, "intrinsics": K, "points": X})


@pytest.mark.parametrize("G", [core.SE3, core.SE2], ids=repr)
def test_ragged_kernels_sum_each_problem_in_one_call(G: LieGroup) -> None:
    """A ragged batch (core.ragged) of robust pose graphs: one kernel call per cost adds each
    factor's cost to its problem's, equal to the torch path's segment sums."""
    from core import ragged

    gen = torch.Generator().manual_seed(23)
    objectives, inits = [], []
    for num in (3, 5, 4):
        objective, values = pose_graph(G, gen, batch=1, num=num, weights="sqrt_info")
        loss = core.RobustLoss("cauchy", torch.tensor(1.0, dtype=DT))
        objectives.append(core.Objective([objective.costs[0].replace(loss=loss),
                                          objective.costs[1]]))
        inits.append(values)
    batch = ragged.merge(objectives, cache=ragged.RaggedCache(1))
    values = batch.join_values(inits)
    calls = []
    original = fused._call
    try:
        fused._call = lambda *a: (calls.append(a[0]), original(*a))[1]  # type: ignore
        fast = linearize(batch.objective, values)
    finally:
        fused._call = original
    assert len(calls) == len(batch.objective.costs)
    ref = linearize(batch.objective, values, fused=False)
    assert fast.cost.shape == (3,)
    assert_equal(fast.cost, ref.cost, "cost per problem")
    p = ref.pattern
    diag = ref.H[:, p.diag]
    assert_equal(fast.H, ref.H, "H", torch.sqrt(diag[:, p.rows] * diag[:, p.cols]))


def test_torch_path_where_kernels_do_not_apply() -> None:
    gen = torch.Generator().manual_seed(5)
    objective, values = pose_graph(core.SE3, gen, batch=1, num=4, weights="sqrt_info")
    between = objective.costs[0]
    assert fused.applies(between, values)
    grad = {"x": values["x"].clone().requires_grad_()}
    assert not fused.applies(between, grad)  # autograd needs the torch graph
    with torch.no_grad():
        assert fused.applies(between, grad)
    assert not fused.applies(between, {"x": values["x"].float()})
    robust = between.replace(loss=core.RobustLoss("huber", 1.0))
    assert fused.applies(robust, values)  # robust losses are fused too
    scale = torch.tensor(1.0, dtype=DT, requires_grad=True)
    learned = between.replace(loss=core.RobustLoss("huber", scale))
    assert not fused.applies(learned, values)  # autograd needs the scale's graph
    with torch.no_grad():
        assert fused.applies(learned, values)
    odd = between.replace(loss=core.RobustLoss("huber", torch.ones(1, 1, 3, dtype=DT)))
    assert not fused.applies(odd, values)  # a scale the kernel does not read
    lin = linearize(objective, grad)  # the torch path: differentiable
    (dH,) = torch.autograd.grad(lin.H.sum(), grad["x"])
    assert torch.isfinite(dH).all() and dH.abs().max() > 0


def test_optimizer_same_iterates_fused_or_not() -> None:
    gen = torch.Generator().manual_seed(9)
    objective, values = pose_graph(core.SE3, gen, batch=2, num=6, weights="sqrt_info")
    runs = [core.LevenbergMarquardt(max_iters=15, solver="sparse", fused=f).solve(
        objective, values) for f in (True, False)]
    assert torch.equal(runs[0].info.iterations, runs[1].info.iterations)
    assert_equal(runs[0].info.cost_history, runs[1].info.cost_history, "cost history")
    x = runs[1].values["x"]
    assert_equal(runs[0].values["x"], x, "solution", x.abs().amax(-1, keepdim=True))


def test_unknown_kernel_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        fused.prepare("nope")


def test_kernels_work_without_a_writable_cache(tmp_path) -> None:
    """Numba's cache directory unusable (a path under a regular file): the package imports, the
    kernels compile in memory and still equal the torch path."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = (
        "import torch, core\n"
        "from core.linearize import linearize\n"
        "x = core.Variable('x', core.SE2, 3)\n"
        "v = core.SE2.random(1, 3, generator=torch.Generator().manual_seed(0), "
        "dtype=torch.float64)\n"
        "o = core.Objective([core.costs.Prior(x, v[0] * 0 + core.SE2.identity(dtype=torch."
        "float64))])\n"
        "a, b = linearize(o, {'x': v}), linearize(o, {'x': v}, fused=False)\n"
        "assert core.fused.applies(o.costs[0], {'x': v})\n"
        "print(float((a.H - b.H).abs().max() / b.H.abs().max()))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(blocker / "numba")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) <= 1e-12


@pytest.mark.parametrize("G", [core.SE3, core.SE2], ids=repr)
def test_retract_kernel_equals_torch(G: LieGroup) -> None:
    gen = torch.Generator().manual_seed(21)
    B, F = 3, 4 * len(ANGLES)
    x = G.random(B, F, generator=gen, dtype=DT)
    delta = residual_tangent(G, gen, B, F)
    fast = fused.retract(G, x, delta)
    assert fast is not None
    ref = G.retract(x, delta)
    assert_equal(fast, ref, "retract", ref.abs().amax(-1, keepdim=True))
    var = core.Variable("x", G, F)
    objective = core.Objective([core.costs.Prior(var, x[0])])
    flat = delta.reshape(B, -1)
    assert torch.equal(objective.retract({"x": x}, flat)["x"], fast)
    assert torch.equal(objective.retract({"x": x}, flat, fused=False)["x"], ref)
    assert fused.retract(G, x.float(), delta.float()) is None
    assert fused.retract(core.SO3, x, delta) is None
    assert fused.retract(G, x, delta.clone().requires_grad_()) is None


def test_in_place_change_of_an_input_is_seen() -> None:
    """The kernels keep views of a cost's tensors between calls: changing a measurement or a
    weight in place changes the next linearization exactly as on the torch path."""
    gen = torch.Generator().manual_seed(4)
    objective, values = pose_graph(core.SE3, gen, batch=1, num=5, weights="sqrt_info")
    both(objective, values)
    between = objective.costs[0]
    between.aux["measured"][0, 0] = core.SE3.random(generator=gen, dtype=DT)
    between.sqrt_info.mul_(1.5)
    both(objective, values)
    scalar, values = pose_graph(core.SE3, gen, batch=1, num=5, weights="scalar")
    both(scalar, values)
    scalar.costs[0].weight.fill_(0.25)
    scalar.costs[1].weight.fill_(7.0)
    both(scalar, values)


def test_in_place_change_of_a_copied_input_is_seen() -> None:
    """The kernels keep copies of inputs they cannot view (a shared ``sqrt_info`` expanded over
    the edges, stride 0; a transposed one) between calls: changing the tensor's base in place
    (the version counter its views share) changes the next linearization as on the torch
    path."""
    gen = torch.Generator().manual_seed(5)
    objective, values = pose_graph(core.SE3, gen, batch=1, num=5, weights="none")
    old = objective.costs[0]
    for base, U in [(b := upper(gen, d=6).contiguous(), b.expand(old.num_factors, 6, 6)),
                    (b := upper(gen, d=6).contiguous(), b.mT)]:
        between = core.costs.Between(old.optimized[0], *old.index, old.aux["measured"],
                                     sqrt_info=U, name="between")
        objective = core.Objective([between, objective.costs[1]])
        assert not between.sqrt_info.is_contiguous()
        both(objective, values)
        both(objective, values)  # the kept copy
        base.mul_(1.5)
        both(objective, values)


def test_mixed_fused_and_differentiable_costs() -> None:
    """A cost that needs autograd (its measurement requires grad) before one that could be
    fused: the sums stay differentiable and equal to the torch path's."""
    gen = torch.Generator().manual_seed(8)
    objective, values = pose_graph(core.SE3, gen, batch=1, num=4, weights="sqrt_info")
    z = objective.costs[0].aux["measured"].clone().requires_grad_()
    objective = objective.with_inputs({"between.measured": z})
    fast, ref = linearize(objective, values), linearize(objective, values, fused=False)
    assert fast.H.requires_grad
    assert_equal(fast.H, ref.H, "H", ref.H.abs().max().expand_as(ref.H))
    (dz,) = torch.autograd.grad(fast.cost.sum(), z)
    (dz_ref,) = torch.autograd.grad(ref.cost.sum(), z)
    assert_equal(dz, dz_ref, "d cost / d measured", dz_ref.abs().max().expand_as(dz_ref))


def test_requires_grad_set_in_place_after_a_fused_call() -> None:
    """A measurement made to require grad in place after the kernel ran once: the next
    linearization takes the torch path and its gradient is the torch path's."""
    gen = torch.Generator().manual_seed(12)
    objective, values = pose_graph(core.SE3, gen, batch=1, num=3, weights="sqrt_info")
    between = objective.costs[0]
    assert fused.applies(between, values)
    linearize(objective, values)
    between.aux["measured"].requires_grad_()
    assert not fused.applies(between, values)
    lin = linearize(objective, values)
    assert lin.cost.requires_grad
