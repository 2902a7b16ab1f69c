"""cuDSS (uniform-batch sparse Cholesky on CUDA): solves against dense references, ``ok`` on
indefinite elements, stale factors, LM and implicit gradients equal to the CPU solvers', and no
host synchronization inside factor + solve. The CUDA tests carry the ``cuda`` marker and skip
without a GPU and nvmath-python; the device checks at the bottom run everywhere."""

from __future__ import annotations

import pytest
import torch
from test_solvers import random_spd  # tests/core is on sys.path (no __init__.py)

import core
from core.lie import se3
from core.solvers import CuDSS, make_solver
from core.solvers import cudss as cudss_module

F64 = torch.float64


def needs_cudss(test):
    """The ``cuda`` marker and a skip without a GPU or nvmath-python."""
    skip = pytest.mark.skipif(not cudss_module.available(), reason="needs CUDA and nvmath-python")
    return pytest.mark.cuda(skip(test))


def graph(n: int = 12, batch: int = 3, seed: int = 0, noise: float = 0.05):
    """A noisy SE3 pose graph (chain + loop closures + prior): objective and initial values."""
    g = torch.Generator().manual_seed(seed)
    truth = se3.exp(0.4 * torch.randn(batch, n, 6, generator=g, dtype=F64))
    i = torch.cat([torch.arange(n - 1), torch.arange(0, n - 4, 3)])
    j = torch.cat([torch.arange(1, n), torch.arange(4, n, 3)])
    z = se3.compose(se3.inverse(truth[:, i]), truth[:, j])
    z = se3.retract(z, noise * torch.randn(batch, len(i), 6, generator=g, dtype=F64))
    x = core.Variable("x", core.SE3, count=n)
    objective = core.Objective(
        [
            core.costs.Between(x, i, j, z, sqrt_info=2.0, name="between"),
            core.costs.Prior(x, truth[:, :1], index=0, sqrt_info=100.0, name="prior"),
        ]
    )
    init = se3.retract(truth, 0.1 * torch.randn(batch, n, 6, generator=g, dtype=F64))
    return objective, {"x": init}


# --------------------------------------------------------------------------- everywhere


def test_cudss_rejects_cpu_tensors() -> None:
    objective, _ = graph(batch=1)
    pattern = objective.pattern()
    H = torch.ones(1, pattern.nnz, dtype=F64)
    with pytest.raises(ValueError, match="cudss.*CUDA tensors.*cpu"):
        CuDSS().factor(H, pattern, torch.zeros(1, pattern.n, dtype=F64))


def test_make_solver_names_cudss() -> None:
    assert isinstance(make_solver("cudss", 10), CuDSS)
    assert isinstance(make_solver("auto", 10_000, "cpu"), core.solvers.SparseCholesky)
    expected = CuDSS if cudss_module.available() else core.solvers.SupernodalCholesky
    assert isinstance(make_solver("auto", 10_000, "cuda"), expected)
    small = CuDSS if cudss_module.available() else core.solvers.DenseCholesky
    assert isinstance(make_solver("auto", 2_000, "cuda"), small)


# --------------------------------------------------------------------------- on a GPU


@needs_cudss
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solves_match_dense(batch: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    objective, _ = graph(n=20)
    pattern = objective.pattern("cuda")
    values, dense = random_spd(objective.pattern(), batch, gen)
    damping = torch.rand(batch, pattern.n, generator=gen, dtype=F64)
    b = torch.randn(batch, pattern.n, generator=gen, dtype=F64)
    factor = CuDSS().factor(values.cuda().to(dtype), pattern, damping.cuda().to(dtype))
    x = factor.solve(b.cuda().to(dtype))
    assert x.device.type == "cuda" and x.dtype == dtype and bool(factor.ok.all())
    expected = torch.linalg.solve(dense + torch.diag_embed(damping), b[..., None])[..., 0]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(x.cpu().double(), expected, atol=tol, rtol=tol)


@needs_cudss
def test_indefinite_element_is_not_ok(gen: torch.Generator) -> None:
    objective, _ = graph(n=20)
    pattern = objective.pattern("cuda")
    values, _ = random_spd(objective.pattern(), 4, gen, negate=(2,))  # element 2 negative definite
    factor = CuDSS().factor(
        values.cuda(), pattern, torch.zeros(4, pattern.n, device="cuda", dtype=F64)
    )
    factor.solve(torch.randn(4, pattern.n, generator=gen, dtype=F64).cuda())
    assert factor.ok.tolist() == [True, True, False, True]


@needs_cudss
def test_stale_factor_is_refactorized(gen: torch.Generator) -> None:
    """Two factors of one plan: the older one still solves its own matrices."""
    objective, _ = graph(n=15)
    pattern = objective.pattern("cuda")
    solver = CuDSS()
    zero = torch.zeros(2, pattern.n, device="cuda", dtype=F64)
    (v1, d1), (v2, _) = (
        random_spd(objective.pattern(), 2, gen),
        random_spd(objective.pattern(), 2, gen),
    )
    f1 = solver.factor(v1.cuda(), pattern, zero)
    f2 = solver.factor(v2.cuda(), pattern, zero)
    assert f1.plan is f2.plan
    b = torch.randn(2, pattern.n, generator=gen, dtype=F64)
    x1 = f1.solve(b.cuda()).cpu()
    torch.testing.assert_close(x1, torch.linalg.solve(d1, b[..., None])[..., 0])
    f2.solve(b.cuda())  # refactorizes back to v2
    assert f2.generation == f2.plan.generation


@needs_cudss
def test_levenberg_marquardt_matches_cpu() -> None:
    objective, init = graph(n=40, batch=4)
    cpu = core.LevenbergMarquardt(max_iters=30, solver="dense").solve(objective, init)
    gpu = core.LevenbergMarquardt(max_iters=30, solver="cudss").solve(
        objective.to("cuda"), {k: v.cuda() for k, v in init.items()}
    )
    torch.testing.assert_close(
        gpu.info.final_cost.cpu(), cpu.info.final_cost, rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(gpu.values["x"].cpu(), cpu.values["x"], rtol=1e-7, atol=1e-8)
    assert gpu.info.iterations.tolist() == cpu.info.iterations.tolist()


@needs_cudss
def test_implicit_gradient_matches_dense() -> None:
    grads = []
    for solver, device in (("dense", "cpu"), ("cudss", "cuda")):
        objective, init = graph(n=10, batch=2)
        layer = core.OptimizationLayer(
            objective, core.LevenbergMarquardt(max_iters=30, solver=solver), backward="implicit"
        )
        e = objective.costs[0].num_factors
        w = torch.ones(2, e, 1, dtype=F64, device=device, requires_grad=True)
        sol, _ = layer({"x": init["x"].to(device), "between.weight": w})
        grads.append(torch.autograd.grad(sol["x"].square().sum(), w)[0].cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-7, atol=1e-9)


@needs_cudss
def test_no_host_synchronization_in_factor_and_solve(gen: torch.Generator) -> None:
    """After the plan exists, factor + solve stay on the device (torch raises on any op that
    synchronizes with the host, e.g. a copy to the CPU or ``.item()``)."""
    objective, _ = graph(n=30)
    pattern = objective.pattern("cuda")
    values = random_spd(objective.pattern(), 3, gen)[0].cuda()
    damping = torch.zeros(3, pattern.n, device="cuda", dtype=F64)
    b = torch.randn(3, pattern.n, generator=gen, dtype=F64).cuda()
    solver = CuDSS()
    solver.factor(values, pattern, damping).solve(b)  # plan + analysis (host work, once)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = solver.factor(values * 2, pattern, damping).solve(b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.device.type == "cuda"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", ["dense", "pcg"])
def test_device_agnostic_solvers_on_cuda(solver: str) -> None:
    """The dense batched Cholesky and PCG run on CUDA tensors end to end (no nvmath needed)."""
    objective, init = graph(n=12, batch=3)
    cpu = core.LevenbergMarquardt(max_iters=30, solver="dense").solve(objective, init)
    gpu = core.LevenbergMarquardt(max_iters=30, solver=solver).solve(
        objective, {k: v.cuda() for k, v in init.items()}
    )
    assert gpu.values["x"].device.type == "cuda"
    torch.testing.assert_close(gpu.info.final_cost.cpu(), cpu.info.final_cost, rtol=1e-8, atol=0)
