"""Construction mistakes are clear ValueErrors at construction or at the start of the solve.

Properties (hypothesis): a weight or sqrt_info of any shape is either rejected by the cost's
constructor with a ValueError naming the cost, the variable and the shapes, or accepted and then
solves (never a raw RuntimeError from inside the optimizer); init and measurement values off the
group are rejected with the stated tolerance (``core.variable.UNIT_TOL``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import core
from core.lie import se3
from core.variable import UNIT_TOL

F64 = torch.float64
E = 4


def chain(sqrt_info=None, weight=None, measured=None):
    """An SE3 chain of 5 poses: 4 between edges and a prior on pose 0."""
    poses = core.Variable("poses", core.SE3, count=E + 1)
    z = se3.exp(0.1 * torch.ones(E, 6, dtype=F64)) if measured is None else measured
    between = core.costs.Between(poses, torch.arange(E), torch.arange(1, E + 1), z,
                                 sqrt_info=sqrt_info, weight=weight, name="odometry")
    prior = core.costs.Prior(poses, core.SE3.identity(dtype=F64), index=0, sqrt_info=10.0)
    init = core.SE3.identity(1, E + 1, dtype=F64)
    return core.Objective([between, prior]), init


# --------------------------------------------------------------------------------------------
# names of the initial values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init_keys, message", [
    (("poses", "posse"), r"unknown variable 'posse' \(did you mean 'poses'\?\)"),
    (("pose",), r"unknown variable 'pose' \(did you mean 'poses'\?\)"),
    (("poses", "velocity"), r"unknown variable 'velocity'; the objective's variables are"),
])
def test_misspelt_or_extra_init_key(init_keys, message) -> None:
    objective, init = chain()
    with pytest.raises(ValueError, match=message):
        core.LevenbergMarquardt(max_iters=2).solve(objective, {k: init for k in init_keys})


# --------------------------------------------------------------------------------------------
# weights and square-root information
# --------------------------------------------------------------------------------------------


def test_sqrt_info_wrong_shape_at_construction() -> None:
    with pytest.raises(ValueError, match=r"cost 'odometry' on 'poses': sqrt_info must be "
                       r"\(6, 6\), \(E, 6, 6\) or \(B\|1, E, 6, 6\) with E = 4, got \(4, 5, 5\)"):
        chain(sqrt_info=torch.eye(5, dtype=F64).expand(E, 5, 5))


@pytest.mark.parametrize("shape", [(E + 1, 1), (1, E + 1, 1), (E,), (E, 5), (1, 1, 1, 1)])
def test_weight_wrong_length_at_construction(shape) -> None:
    with pytest.raises(ValueError, match=r"cost 'odometry' on 'poses': weight must be .* with "
                       rf"E = 4, got \({shape[0]}"):
        chain(weight=torch.ones(shape, dtype=F64))


def test_user_cost_sqrt_info_checked_at_first_evaluation() -> None:
    """A residual function's dimension is known once it runs: the solve's first linearization
    raises a ValueError naming the cost (not a matmul RuntimeError)."""
    x = core.Variable("x", core.Vector(3), count=2)
    cost = core.Cost(lambda x: x[:2], optimized=(x,), index=[torch.arange(2)], name="fit",
                     sqrt_info=torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match=r"cost 'fit' on 'x': sqrt_info must be \(2, 2\).*"
                       r"got \(3, 3\)"):
        core.LevenbergMarquardt().solve(core.Objective([cost]), {"x": torch.zeros(1, 2, 3,
                                                                                  dtype=F64)})


SIZES = st.sampled_from([1, 2, 5, 6, E, E + 1])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(shape=st.lists(SIZES, max_size=4), which=st.sampled_from(["weight", "sqrt_info"]))
def test_any_weight_shape_is_rejected_clearly_or_solves(shape, which) -> None:
    """Property: construction accepts a shape only if the solve then works."""
    t = torch.ones(shape, dtype=F64)
    if which == "sqrt_info" and len(shape) >= 2 and shape[-1] == shape[-2]:
        t = t * torch.eye(shape[-1], dtype=F64)  # diagonal, so accepted ones are invertible
    try:
        objective, init = chain(**{which: t})
    except ValueError as exc:
        assert "cost 'odometry' on 'poses'" in str(exc) and str(tuple(shape)) in str(exc)
        return
    sol = core.LevenbergMarquardt(max_iters=3).solve(objective, {"poses": init})
    assert torch.isfinite(sol.info.final_cost).all()


# --------------------------------------------------------------------------------------------
# unit rotations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [core.SO2, core.SE2, core.SO3, core.SE3])
@pytest.mark.parametrize("scale", [1.1, 1 + 20 * UNIT_TOL, 0.0])
def test_init_off_the_group_rejected_at_solve_start(group, scale) -> None:
    x = core.Variable("x", group, count=3)
    prior = core.costs.Prior(x, group.identity(dtype=F64))
    init = group.identity(2, 3, dtype=F64)
    rot = slice(group.storage_dim - (4 if group in (core.SO3, core.SE3) else 2), None)
    init[1, 2, rot] = init[1, 2, rot] * scale
    with pytest.raises(ValueError, match=rf"variable 'x' \({group}\): element \[1, 2\].*not on "
                       r"the group.*norm 1 within 1e-05"):
        core.LevenbergMarquardt().solve(core.Objective([prior]), {"x": init})


def test_unit_tolerance_and_non_finite_elements() -> None:
    """Within the tolerance passes (six-decimal quaternions); NaN elements are the solver's
    business (reported per element), not a construction error."""
    x = core.Variable("x", core.SE3, count=2)
    prior = core.costs.Prior(x, core.SE3.identity(dtype=F64))
    init = core.SE3.identity(3, 2, dtype=F64)
    init[0, 0, 6] = 1 + 0.5 * UNIT_TOL
    init[1, 1, 0] = float("nan")
    sol = core.LevenbergMarquardt().solve(core.Objective([prior]), {"x": init})
    assert sol.info.status_names == ["converged", "failed", "converged"]


def test_measurement_off_the_group_rejected() -> None:
    z = se3.exp(0.1 * torch.ones(E, 6, dtype=F64))
    z[2, 3:] *= 1.01
    with pytest.raises(ValueError, match=r"cost 'odometry': aux 'measured' \(SE3\): element "
                       r"\[0, 2\].*not on the group"):
        chain(measured=z)
    objective, init = chain()
    layer = core.OptimizationLayer(objective, core.LevenbergMarquardt(max_iters=3))
    with pytest.raises(ValueError, match="aux 'measured'.*not on the group"):
        layer({"poses": init, "odometry.measured": z[None]})
    with pytest.raises(ValueError, match=r"aux 'target' \(SO3\)"):
        core.costs.Prior(core.Variable("r", core.SO3), torch.tensor([0.0, 0, 0, 2], dtype=F64))
