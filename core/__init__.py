"""Ariadne core: differentiable nonlinear least squares on Lie groups, batched and sparse.

Data flows one way: ``Objective`` (variables + costs) -> ``linearize`` -> normal equations ->
``LinearSolver.factor``/``solve`` -> ``retract`` -> accept/reject (``LevenbergMarquardt``).
"""

from core import costs, io, lie, ragged, solvers
from core.cost import Cost as CostTable
from core.cost import CostTerms
from core.cost import make_cost as Cost
from core.layer import OptimizationLayer
from core.lie import SE2, SE3, SO2, SO3, LieGroup, Vector
from core.linearize import Linearization, linearize
from core.loss import RobustLoss
from core.objective import Objective, Pattern
from core.optimizer import GaussNewton, Info, LevenbergMarquardt, Solution
from core.variable import Variable

__all__ = [
    "SE2", "SE3", "SO2", "SO3", "Cost", "CostTable", "CostTerms", "GaussNewton", "Info",
    "LevenbergMarquardt", "LieGroup", "Linearization", "Objective", "OptimizationLayer",
    "Pattern", "RobustLoss", "Solution", "Variable", "Vector", "costs", "io", "lie",
    "linearize", "ragged", "solvers",
]
