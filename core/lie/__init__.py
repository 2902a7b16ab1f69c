"""Lie groups as functions on plain tensors (pypose storage layouts).

Modules ``so2, se2, so3, se3`` hold the functions (``exp, log, compose, inverse, act, hat, vee,
to_matrix, from_matrix, adjoint, jr, jr_inv, jl, jl_inv, retract, local, normalize, identity,
random``); ``SO2, SE2, SO3, SE3`` and ``Vector(d)`` are hashable descriptors with the same
interface, and ``Space`` is their union.
"""

from core.lie import se2, se3, so2, so3
from core.lie._groups import SE2, SE3, SO2, SO3, LieGroup, Space, Vector

__all__ = ["so2", "se2", "so3", "se3", "LieGroup", "Vector", "Space", "SO2", "SE2", "SO3", "SE3"]
