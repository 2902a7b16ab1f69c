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
