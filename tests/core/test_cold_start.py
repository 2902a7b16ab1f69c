"""No hidden first-call costs: the first linearization in a fresh process imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from core.lie import _util

SHAPES = [
    [(), ()],
    [(3,), (1,)],
    [(2, 1), (3,)],
    [(1, 4, 1), (5, 1, 2), (2,)],
    [(0,), (1,)],
    [(2, 0), (1, 1)],
]


@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_broadcast_shapes_matches_torch(shapes: list[tuple[int, ...]]) -> None:
    assert _util.broadcast_shapes(*shapes) == tuple(torch.broadcast_shapes(*shapes))


def test_broadcast_shapes_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="do not broadcast"):
        _util.broadcast_shapes((2, 3), (4, 3))


def test_first_se3_linearization_imports_no_symbolic_shapes() -> None:
    """``torch.broadcast_shapes`` pulled in ``torch.fx``'s symbolic shapes and sympy (0.5-0.7 s)
    inside the first SE(3) Jacobian of a process; the Jacobians must not trigger it."""
    code = (
        "import sys, torch\n"
        "from core.lie import se3\n"
        "x = se3.random(4, dtype=torch.float64)\n"
        "se3.jr_inv(se3.log(x)); se3.adjoint(x); se3.jl(se3.log(x))\n"
        "se3.from_rt(x[:, 3:], x[:, :3])\n"
        "print('sympy' in sys.modules, 'torch.fx.experimental.symbolic_shapes' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


COMPILED_IN_SOLVE = """
import sys, numba, torch, core
from core.solvers import SparseCholesky

def signatures():
    return {f"{name}.{k}": len(v.signatures) for name, mod in list(sys.modules.items())
            if name.startswith("core") for k, v in vars(mod).items()
            if isinstance(v, numba.core.registry.CPUDispatcher)}

gen = torch.Generator().manual_seed(0)
n = 400  # two separate random graphs of n poses: on two cores the factor splits in two parts
x = core.SE3.random(1, 2 * n, generator=gen, dtype=torch.float64)
i = torch.cat([torch.arange(n - 1), torch.randint(0, n, (n,), generator=gen)])
j = torch.cat([torch.arange(1, n), torch.randint(0, n, (n,), generator=gen)])
keep = i != j
i, j = torch.cat([i[keep], i[keep] + n]), torch.cat([j[keep], j[keep] + n])
z = core.SE3.compose(core.SE3.inverse(x[:, i]), x[:, j])
poses = core.Variable("poses", core.SE3, count=2 * n)
objective = core.Objective([core.costs.Between(poses, i, j, z),
                            core.costs.Prior(poses, x[:, [0, n]], index=[0, n])])
# set-up: the kernels load here (a solver, or the optimizer given the solver's name)
lm = core.LevenbergMarquardt(max_iters=3, solver=SparseCholesky(mode="threaded")
                             if sys.argv[1] == "instance" else sys.argv[1])
before = signatures()
lm.solve(
    objective, {"poses": core.SE3.compose(x, core.SE3.exp(0.05 * torch.randn(
        1, 2 * n, 6, generator=gen, dtype=torch.float64)))})
after = signatures()
print(sorted(k for k, v in after.items() if v != before.get(k, 0)))
"""


@pytest.mark.skipif(not __import__("core")._kernels.AVAILABLE, reason="Numba not installed")
@pytest.mark.parametrize("solver", ["instance", "sparse", "auto"])
def test_first_solve_loads_no_compiled_code(solver: str) -> None:
    """In a fresh process, the compiled code of a solve (the linearization kernels, the
    one-matrix factorization's analysis, plan, factor and solve) is loaded when the costs and
    the solver are made, not inside the first solve's time (loading the factorization's ten
    functions from Numba's cache took ~66 ms inside a first sphere2500 solve; with an empty
    cache, compiling them ~8.5 s). A solver given by name is made inside the solve, so the
    optimizer loads its code when it is made."""
    out = subprocess.run([sys.executable, "-c", COMPILED_IN_SOLVE, solver], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
