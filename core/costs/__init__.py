"""Library costs (each returns a ``core.cost.Cost`` with analytic Jacobians)."""

from core.costs.pose import Between, Prior
from core.costs.reprojection import Reprojection, bal_objective, bal_to_variables, variables_to_bal

__all__ = ["Between", "Prior", "Reprojection", "bal_objective", "bal_to_variables",
           "variables_to_bal"]
