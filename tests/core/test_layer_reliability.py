"""OptimizationLayer reliability: one bad batch element costs only itself (every backward mode),
and every mode differentiates from a start at the optimum or at the identity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layer import MODES, TIGHT, chain_layer, chained

import core
from core.lie import se2, se3


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


N, EDGES, BAD = 6, 8, 2


def graph_layer(mode: str, prior_weight: bool = False):
    """An SE3 graph with loop closures and noisy measurements (every input per element)."""
    gen = torch.Generator().manual_seed(3)
    truth = se3.exp(0.5 * torch.randn(1, N, 6, generator=gen))
    i = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    j = torch.tensor([1, 2, 3, 4, 5, 3, 4, 5])
    z = se3.retract(se3.compose(se3.inverse(truth[:, i]), truth[:, j]),
                    0.01 * torch.randn(1, EDGES, 6, generator=gen))
    poses = core.Variable("poses", core.SE3, count=N)
    between = core.costs.Between(poses, i, j, z, weight=torch.ones(1, EDGES, 1), name="between",
                                 loss=core.RobustLoss("cauchy", 0.05))
    prior = core.costs.Prior(poses, truth[0, 0], index=0, name="prior",
                             weight=torch.ones(1, 1, 1) if prior_weight else 100.0)
    optimizer = core.LevenbergMarquardt(max_iters=20, solver="dense", **TIGHT)
    layer = core.OptimizationLayer(core.Objective([between, prior]), optimizer, backward=mode,
                                   backward_iters=3)
    init = se3.retract(truth, 0.05 * torch.randn(1, N, 6, generator=gen))
    return layer, init, z


def run(layer, rows, z, init, features, net, poison: str | None):
    """Solve batch ``rows`` of the 4 problems (element BAD poisoned); returns the outputs, the
    info, the loss's gradients w.r.t. measured, init, features and the network parameters."""
    B = len(rows)
    measured = (z.expand(4, -1, -1) * 1.0)[rows].detach().clone()
    start = init.expand(4, -1, -1)[rows].clone()
    feats = features.clone()  # all 4 through the network: same weights bit for bit
    nan = torch.zeros(B, dtype=torch.bool)
    if BAD in rows:
        nan[rows.index(BAD)] = True
        if poison == "measured":
            measured[rows.index(BAD), 1, 0] = float("nan")
        elif poison == "init":
            start[rows.index(BAD), 3, 0] = float("nan")
    for t in (measured, start, feats):
        t.requires_grad_()
    weight = net(feats)[rows]
    if poison == "weight":  # a NaN network output (the network's own backward stays finite)
        weight = torch.where(nan[:, None, None] & (torch.arange(EDGES) == 0)[None, :, None],
                             float("nan"), weight)
    sol, info = layer({"poses": start, "between.measured": measured, "between.weight": weight})
    good = [k for k, r in enumerate(rows) if r != BAD]
    target = torch.linspace(-1, 1, N * 7).view(1, N, 7)
    loss = (sol["poses"][good] * target).sum()
    net.zero_grad()
    loss.backward()
    params = [p.grad.clone() for p in net.parameters()]
    return sol["poses"], info, measured.grad, start.grad, feats.grad[rows], params


@pytest.mark.parametrize("poison", ["measured", "init", "weight"])
@pytest.mark.parametrize("mode", MODES)
def test_one_bad_element_costs_only_itself(mode: str, poison: str) -> None:
    layer, init, z = graph_layer(mode)
    gen = torch.Generator().manual_seed(8)
    features = torch.randn(4, EDGES, 3, generator=gen)
    net = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Softplus())
    full = run(layer, [0, 1, 2, 3], z, init, features, net, poison)
    alone = run(layer, [0, 1, 3], z, init, features, net, poison)
    sol, info = full[0], full[1]
    assert info.status_names[BAD] == "failed"
    assert [s for k, s in enumerate(info.status_names) if k != BAD] == alone[1].status_names
    assert "non-finite" in info.messages[BAD]
    assert {"measured": "between.measured", "init": "'poses'",
            "weight": "between.weight"}[poison] in info.messages[BAD]
    assert torch.isnan(sol[BAD]).all()
    assert torch.equal(sol[[0, 1, 3]], alone[0])
    for got, want in zip(full[2:5], alone[2:5]):
        if want is None:  # implicit and truncated: no gradient to the initial values
            assert got is None or not got.any()
            continue
        assert torch.equal(got[BAD], torch.zeros_like(got[BAD]))
        torch.testing.assert_close(got[[0, 1, 3]], want, rtol=1e-12, atol=1e-14)
    for got, want in zip(full[5], alone[5]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert info.cost_history.shape[1] == 4 and torch.isnan(info.cost_history[:, BAD]).all()


@pytest.mark.parametrize("mode", MODES)
def test_one_bad_element_sparse_solver(mode: str) -> None:
    """The same with the sparse solver, whose plan meets two batch sizes (4, then 3)."""
    layer, init, z = graph_layer(mode)
    layer.optimizer = core.LevenbergMarquardt(max_iters=20, solver="sparse", **TIGHT)
    features = torch.randn(4, EDGES, 3, generator=torch.Generator().manual_seed(8))
    net = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Softplus())
    full = run(layer, [0, 1, 2, 3], z, init, features, net, "measured")
    alone = run(layer, [0, 1, 3], z, init, features, net, "measured")
    assert full[1].status_names[BAD] == "failed"
    assert torch.equal(full[0][[0, 1, 3]], alone[0])
    torch.testing.assert_close(full[2][[0, 1, 3]], alone[2], rtol=1e-12, atol=1e-14)
    assert not full[2][BAD].any()


def test_singular_element_fails_alone_in_implicit_mode() -> None:
    """An element without a gauge prior solves (LM's damping) but its normal matrix at the
    solution is singular: implicit differentiation is undefined there, for that element only."""
    layer, init, z = graph_layer("implicit", prior_weight=True)
    w = torch.ones(4, 1, 1)
    w[1] = 0.0
    measured = z.expand(4, -1, -1).clone().requires_grad_()
    sol, info = layer({"poses": init.expand(4, -1, -1), "between.measured": measured,
                       "prior.weight": w})
    assert info.status_names == ["converged", "failed", "converged", "converged"]
    assert "singular" in info.messages[1] and info.messages[0] == ""
    sol["poses"][[0, 2, 3]].sum().backward()
    assert torch.isfinite(measured.grad).all() and not measured.grad[1].any()


def test_every_element_bad() -> None:
    layer, init, z = graph_layer("implicit")
    start = init.expand(2, -1, -1).clone()
    start[:, 0, 0] = float("inf")
    sol, info = layer({"poses": start})
    assert torch.isnan(sol["poses"]).all() and info.status_names == ["failed", "failed"]
    assert all("non-finite initial values of 'poses'" in m for m in info.messages)


# --------------------------------------------------------------------------------------------
# gradients from the optimum and from the identity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["optimum", "identity"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group,module", [(core.SE2, se2), (core.SE3, se3)])
def test_gradcheck_from_optimum_and_identity(mode, group, module, start):
    """A zero-residual chain started exactly at its optimum (the gradient test would stop the
    solver before its first step) or at the identity: every mode's gradient is the derivative of
    the converged solution (gradcheck, float64)."""
    gen = torch.Generator().manual_seed(11)
    n = 4
    layer = chain_layer(group, n, mode)
    tangent = 0.3 * torch.randn(1, n - 1, group.dof, generator=gen)

    def fn(t):
        z = module.exp(t)
        init = chained(module, z.detach()) if start == "optimum" else group.identity(1, n)
        sol, info = layer({"poses": init, "between.measured": z})
        assert info.status_names == ["converged"]
        return sol["poses"]

    assert torch.autograd.gradcheck(fn, (tangent.requires_grad_(),), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_start_at_optimum_has_a_graph_and_reports_converged(mode):
    layer = chain_layer(core.SE3, 4, mode)
    z = se3.exp(0.2 * torch.ones(1, 3, 6)).requires_grad_()
    sol, info = layer({"poses": chained(se3, z.detach()), "between.measured": z})
    assert sol["poses"].grad_fn is not None
    assert info.status_names == ["converged"]
    assert int(info.iterations) < layer.optimizer.max_iters
    sol["poses"].sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() > 0


def test_truncated_status_and_initial_values() -> None:
    """Truncated reports max_iters when it did not converge; the initial values get gradients
    only when every iteration carries them (max_iters <= backward_iters), as documented."""
    layer = chain_layer(core.SE3, 4, "truncated", iters=6)
    layer.backward_iters = 3
    z = se3.exp(0.8 * torch.ones(1, 3, 6))
    init = core.SE3.identity(1, 4).requires_grad_()
    layer.optimizer = core.LevenbergMarquardt(max_iters=4, solver="dense", damping_init=1e3)
    sol, info = layer({"poses": init, "between.measured": z})
    assert info.status_names == ["max_iters"]
    assert not sol["poses"].requires_grad  # 1 iteration without gradient, then 3 from its result
    layer.backward_iters = 4
    sol, _ = layer({"poses": init, "between.measured": z})
    sol["poses"].sum().backward()
    assert init.grad is not None and torch.isfinite(init.grad).all()


@settings(max_examples=12, deadline=None, derandomize=True)
@given(mode=st.sampled_from(MODES), bad=st.lists(st.booleans(), min_size=1, max_size=4),
       where=st.sampled_from(["measured", "init", "weight"]),
       value=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_bad_elements_property(mode, bad, where, value) -> None:
    """Property: for any batch and any set of bad elements, the good ones give exactly what the
    batch of good ones alone gives, the bad ones NaN outputs, FAILED, zero input gradients."""
    layer, init, z = graph_layer(mode)
    B = len(bad)
    good = [b for b in range(B) if not bad[b]]

    def solve(rows, poisoned):
        measured = z.expand(B, -1, -1)[rows].clone()
        start = init.expand(B, -1, -1)[rows].clone()
        weight = torch.ones(B, EDGES, 1)[rows].clone()
        for k, r in enumerate(rows):
            if poisoned and bad[r]:
                {"measured": measured, "init": start, "weight": weight}[where][k, 1, 0] = value
        for t in (measured, weight):
            t.requires_grad_()
        sol, info = layer({"poses": start, "between.measured": measured,
                           "between.weight": weight})
        keep = [k for k, r in enumerate(rows) if not bad[r]]
        if keep:
            (sol["poses"][keep] * torch.linspace(-1, 1, N * 7).view(1, N, 7)).sum().backward()
        return sol["poses"], info, measured.grad, weight.grad

    sol, info, g_measured, g_weight = solve(list(range(B)), True)
    for b in range(B):
        if bad[b]:
            assert info.status_names[b] == "failed" and "non-finite" in info.messages[b]
            assert torch.isnan(sol[b]).all()
            assert g_measured is None or not g_measured[b].any()
    if good:
        sol_g, info_g, gm, gw = solve(good, False)
        assert torch.equal(sol[good], sol_g)
        assert [info.status_names[b] for b in good] == info_g.status_names
        torch.testing.assert_close(g_measured[good], gm, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_weight[good], gw, rtol=1e-12, atol=1e-14)
