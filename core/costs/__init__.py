"""Library costs (each returns a ``core.cost.Cost`` with analytic Jacobians)."""

from core.costs.pose import Between, Prior

__all__ = ["Between", "Prior"]
