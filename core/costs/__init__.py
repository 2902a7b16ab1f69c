"""Library costs (each returns a ``core.cost.Cost`` with analytic Jacobians)."""

from core.costs.homography import HomographyAlignment
from core.costs.motion import (
    CollisionHinge,
    GPMotionPrior,
    expand_sdf,
    gp_covariance,
    gp_sqrt_information,
    gp_transition,
    sdf_lookup,
)
from core.costs.pose import Between, Prior
from core.costs.pushing import PlanarContact, QuasiStaticPushing, planar_sdf
from core.costs.reprojection import Reprojection, bal_objective, bal_to_variables, variables_to_bal

__all__ = ["Between", "CollisionHinge", "GPMotionPrior", "HomographyAlignment", "PlanarContact",
           "Prior",
           "QuasiStaticPushing", "Reprojection", "bal_objective",
           "bal_to_variables", "expand_sdf", "gp_covariance", "gp_sqrt_information",
           "gp_transition", "planar_sdf", "sdf_lookup", "variables_to_bal"]
