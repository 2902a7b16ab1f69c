"""The differentiable layer: gradcheck of every backward mode, implicit vs finite differences,
unroll -> implicit as iterations grow, gradients reaching upstream networks, batch independence."""

from __future__ import annotations

import pytest
import torch

import core
from core.lie import se2, se3


@pytest.fixture(autouse=True)
def _float64():
    """float64 for this module only (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


MODES = ["unroll", "truncated", "implicit"]
TIGHT = dict(rel_tol=1e-15, abs_tol=0.0, step_tol=1e-15, grad_tol=1e-13, damping_init=1e-9)


def chain_layer(group, n: int, mode: str, loss: bool = True, iters: int = 30):
    """A pose chain with a prior on pose 0: exactly determined, so the optimum has zero residual
    for any measurements (the Gauss-Newton Hessian is then the exact one)."""
    poses = core.Variable("poses", group, count=n)
    dof = group.dof
    z0 = group.identity(1, n - 1)  # replaced by the inputs
    U = torch.diag_embed(torch.linspace(1.0, 2.0, dof)).expand(n - 1, dof, dof)
    between = core.costs.Between(
        poses,
        torch.arange(n - 1),
        torch.arange(1, n),
        z0,
        sqrt_info=U,
        loss=core.RobustLoss("huber", 0.5) if loss else None,
        name="between",
    )
    prior = core.costs.Prior(poses, group.identity(), index=0, sqrt_info=10.0, name="prior")
    optimizer = core.LevenbergMarquardt(max_iters=iters, solver="dense", **TIGHT)
    return core.OptimizationLayer(core.Objective([between, prior]), optimizer, backward=mode)


def chained(module, z):
    """Poses ``(1, n, S)`` obtained by composing the measurements ``z (1, n-1, S)``."""
    out = [module.identity(1)]
    for k in range(z.shape[1]):
        out.append(module.compose(out[-1], z[:, k]))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group,module", [(core.SE2, se2), (core.SE3, se3)])
def test_gradcheck_pose_chain(mode, group, module):
    gen = torch.Generator().manual_seed(1)
    n = 4
    layer = chain_layer(group, n, mode)
    tangent = 0.3 * torch.randn(1, n - 1, group.dof, generator=gen)
    init_noise = 0.05 * torch.randn(1, n, group.dof, generator=gen)

    def fn(t):
        z = module.exp(t)
        init = module.retract(chained(module, z.detach()), init_noise)
        sol, _ = layer({"poses": init, "between.measured": z})
        return sol["poses"]

    assert torch.autograd.gradcheck(fn, (tangent.requires_grad_(),), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_vector_weights_overdetermined(mode):
    """Linear residuals (vectors with a loop closure): the GN Hessian is exact, so every mode's
    gradient w.r.t. measurements and per-edge weights is the true derivative, with nonzero
    residuals at the optimum."""
    gen = torch.Generator().manual_seed(2)
    n = 5
    x = core.Variable("x", core.Vector(2), count=n)
    i = torch.tensor([0, 1, 2, 3, 0, 1])
    j = torch.tensor([1, 2, 3, 4, 4, 3])
    between = core.costs.Between(
        x, i, j, torch.zeros(1, 6, 2), weight=torch.ones(1, 6, 1), name="between"
    )
    prior = core.costs.Prior(x, torch.zeros(2), index=0, sqrt_info=3.0, name="prior")
    # Gauss-Newton with a fixed number of steps: no accept/reject decision can flip between the
    # finite-difference evaluations.
    optimizer = core.GaussNewton(
        max_iters=4, solver="dense", rel_tol=-1.0, step_tol=-1.0, grad_tol=-1.0, abs_tol=-1.0
    )
    layer = core.OptimizationLayer(
        core.Objective([between, prior]), optimizer, backward=mode, backward_iters=2
    )
    z = torch.randn(1, 6, 2, generator=gen)
    w = 0.5 + torch.rand(1, 6, 1, generator=gen)
    init = torch.randn(1, n, 2, generator=gen)

    def fn(z, w):
        sol, _ = layer({"x": init, "between.measured": z, "between.weight": w})
        return sol["x"]

    assert torch.autograd.gradcheck(
        fn, (z.requires_grad_(), w.requires_grad_()), atol=1e-6, rtol=1e-4
    )


def overdetermined_se3(
    mode: str, iters: int = 50, loss: str | None = "cauchy", hessian: str = "gauss_newton"
):
    """A small SE3 graph with loop closures, noisy measurements, weights and a robust loss."""
    gen = torch.Generator().manual_seed(3)
    n = 6
    truth = se3.exp(0.5 * torch.randn(1, n, 6, generator=gen))
    i = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    j = torch.tensor([1, 2, 3, 4, 5, 3, 4, 5])
    z = se3.compose(se3.inverse(truth[:, i]), truth[:, j])
    z = se3.retract(z, 0.01 * torch.randn(1, 8, 6, generator=gen))
    poses = core.Variable("poses", core.SE3, count=n)
    between = core.costs.Between(
        poses,
        i,
        j,
        z,
        weight=torch.ones(1, 8, 1),
        loss=core.RobustLoss(loss, 0.05) if loss else None,
        name="between",
    )
    prior = core.costs.Prior(poses, truth[0, 0], index=0, sqrt_info=100.0, name="prior")
    optimizer = core.LevenbergMarquardt(max_iters=iters, solver="dense", **TIGHT)
    layer = core.OptimizationLayer(
        core.Objective([between, prior]), optimizer, backward=mode, implicit_hessian=hessian
    )
    init = se3.retract(truth, 0.05 * torch.randn(1, n, 6, generator=gen))
    return layer, init, z


def test_unroll_gradcheck_weights_and_robust_scale():
    """Unrolling differentiates the iterations themselves: exact for any residuals, including
    weights and a learnable robust-loss scale."""
    layer, init, z = overdetermined_se3("unroll", iters=4)
    w = (0.5 + torch.rand(1, 8, 1, generator=torch.Generator().manual_seed(4))).requires_grad_()
    scale = torch.tensor(0.05).requires_grad_()

    def fn(w, scale):
        sol, _ = layer({"poses": init, "between.weight": w, "between.loss_scale": scale})
        return sol["poses"]

    assert torch.autograd.gradcheck(fn, (w, scale), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "loss,hessian,tol", [(None, "gauss_newton", 2e-2), ("cauchy", "exact", 5e-4)]
)
def test_implicit_matches_finite_differences_of_converged_solution(loss, hessian, tol):
    """With nonzero residuals the Gauss-Newton implicit gradient is first-order accurate in the
    residuals (12% off here with the Cauchy loss); with the exact Hessian it is the true
    derivative, robust loss included (the tolerance is the finite differences' own noise: the
    converged solution is accurate to ~1e-9)."""
    layer, init, z = overdetermined_se3("implicit", loss=loss, hessian=hessian)
    w = torch.ones(1, 8, 1, requires_grad=True)
    target = torch.randn(1, 6, 7, generator=torch.Generator().manual_seed(5))

    def loss(w):
        sol, info = layer({"poses": init, "between.weight": w})
        assert info.status_names == ["converged"]
        return (sol["poses"] * target).sum()

    (grad,) = torch.autograd.grad(loss(w), w)
    eps, fd = 1e-4, torch.zeros_like(w)
    with torch.no_grad():
        for k in range(8):
            d = torch.zeros_like(w)
            d[0, k, 0] = eps
            fd[0, k, 0] = (loss(w + d) - loss(w - d)) / (2 * eps)
    assert grad.abs().max() > 1e-4  # the weights matter
    torch.testing.assert_close(grad, fd, atol=tol * fd.abs().max(), rtol=0)


def test_unroll_approaches_implicit():
    gen = torch.Generator().manual_seed(6)
    target = torch.randn(1, 6, 7, generator=gen)
    w = torch.ones(1, 8, 1, requires_grad=True)

    def grad(mode, iters):
        layer, init, _ = overdetermined_se3(mode, iters=iters, loss=None)
        sol, _ = layer({"poses": init, "between.weight": w})
        return torch.autograd.grad((sol["poses"] * target).sum(), w)[0]

    implicit = grad("implicit", 50)
    errors = [float((grad("unroll", k) - implicit).norm() / implicit.norm()) for k in (1, 2, 10)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_network_and_batch_elements_do_not_mix(mode):
    """A network maps edge features to weights; B=2 problems; the loss on element 0 gives zero
    gradient to element 1's inputs, and the network's parameters receive gradients."""
    gen = torch.Generator().manual_seed(7)
    layer, init, z = overdetermined_se3(mode, iters=20)
    net = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Softplus())
    features = torch.randn(2, 8, 3, generator=gen, requires_grad=True)
    measured = z.expand(2, -1, -1).clone().requires_grad_()
    init2 = init.expand(2, -1, -1).clone().requires_grad_()
    sol, info = layer(
        {"poses": init2, "between.weight": net(features), "between.measured": measured}
    )
    assert info.status.shape == (2,)
    loss = sol["poses"][0].square().sum()
    loss.backward()
    assert features.grad[1].abs().max() == 0 and features.grad[0].abs().max() > 0
    assert measured.grad[1].abs().max() == 0 and measured.grad[0].abs().max() > 0
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in net.parameters())
    if mode == "unroll":  # unrolling also differentiates w.r.t. the initial values
        assert init2.grad is not None and init2.grad[0].abs().max() > 0
        assert init2.grad[1].abs().max() == 0


def test_sparse_solver_unroll_matches_dense():
    """The sparse factor's solve is differentiable (same gradient as the dense Cholesky)."""
    grads = []
    for solver in ("dense", "sparse"):
        layer, init, z = overdetermined_se3("unroll", iters=3, loss=None)
        layer.optimizer = core.LevenbergMarquardt(max_iters=3, solver=solver, **TIGHT)
        w = torch.ones(1, 8, 1, requires_grad=True)
        sol, _ = layer({"poses": init, "between.weight": w})
        grads.append(torch.autograd.grad(sol["poses"].sum(), w)[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-7)


def test_bad_inputs():
    layer, init, _ = overdetermined_se3("implicit")
    with pytest.raises(ValueError, match="missing initial values.*poses"):
        layer({})
    with pytest.raises(ValueError, match=r"missing initial values.*'poses'.*\['pose'\]: misspelt"):
        layer({"pose": init})
    with pytest.raises(ValueError, match="unknown inputs.*between.nope"):
        layer({"poses": init, "between.nope": torch.ones(1)})
    with pytest.raises(ValueError, match="backward mode"):
        core.OptimizationLayer(layer.objective, layer.optimizer, backward="dlm-ish")


@pytest.mark.skipif("cholmod" not in core.solvers.available_backends(), reason="no CHOLMOD")
@pytest.mark.parametrize("mode", MODES)
def test_symbolic_analysis_once_across_forwards(mode, monkeypatch):
    """The layer keeps its solver: repeated forwards (a training loop) and the implicit backward
    reuse one symbolic analysis of the pattern."""
    import sksparse.cholmod as cholmod

    calls = []
    real = cholmod.analyze
    monkeypatch.setattr(cholmod, "analyze", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer, init, _ = overdetermined_se3(mode, iters=5, loss=None)
    layer.optimizer = core.LevenbergMarquardt(max_iters=5, solver="sparse", **TIGHT)
    w = torch.ones(1, 8, 1, requires_grad=True)
    counts = []
    for _ in range(3):
        sol, _ = layer({"poses": init, "between.weight": w})
        sol["poses"].sum().backward()
        counts.append(len(calls))
    # one analysis in the first forward (CHOLMOD's, or the block orderings of the one-matrix
    # kernel's: AMD and nested dissection), none after
    assert 1 <= counts[0] <= 2 and counts == [counts[0]] * 3
