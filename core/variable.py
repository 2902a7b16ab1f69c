"""Optimization variables: ``count`` elements of one space (a Lie group or a vector space)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.lie import Space

UNIT_TOL = 1e-5
"""Rotation parts (SO3/SE3 quaternions, SO2/SE2 ``(cos, sin)`` pairs) given as initial values or
measurements must have norm ``1 +- UNIT_TOL`` (any dtype): enough for quaternions written with six
decimals, far tighter than the errors a non-unit quaternion causes (its norm scales every
composition). Normalize with ``space.normalize``."""


def check_on_group(space: Space, x: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` unless every finite element of ``x (..., S)`` has a
    unit rotation part (to ``UNIT_TOL``; a zero one fails too). Non-finite elements are left to
    the solver, which reports them per batch element. One host sync; meta tensors pass."""
    if x.device.type == "meta":
        return
    with torch.no_grad():
        x = x.detach()
        # normalize divides the rotation part q by n = |q|: |normalize(x) - x| = |q| |1 - 1/n|
        # = |n - 1| exactly (translations and vectors unchanged)
        off = torch.linalg.vector_norm(space.normalize(x) - x, dim=-1)
        finite = torch.isfinite(x).all(-1)
        bad = finite & ((off > UNIT_TOL) | off.isnan())
        if not bool(bad.any()):
            return
        at = tuple(int(k) for k in torch.nonzero(bad)[0])
        raise ValueError(
            f"{what} ({space}): element {list(at)} = {x[at].tolist()} is not on the group: its "
            f"rotation part must have norm 1 within {UNIT_TOL} (use {space}.normalize / "
            f"core.lie.{str(space).lower()}.normalize)"
        )


@dataclass(frozen=True, eq=False)
class Variable:
    """``count`` unknowns of one ``space``; values are tensors ``(B, count, space.storage_dim)``.

    Variables compare and hash by identity, so two variables may share a name only by mistake:
    the objective rejects that. Every variable that a cost names is optimized; fixed data enters
    costs as auxiliary tensors instead.
    """

    name: str
    space: Space
    count: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Variable needs a non-empty name")
        if self.count < 1:
            raise ValueError(f"Variable {self.name!r}: count must be >= 1, got {self.count}")

    @property
    def dof(self) -> int:
        """Tangent dimension of the whole variable, ``count * space.dof``."""
        return self.count * self.space.dof

    def check(self, value: Tensor) -> None:
        """Raise ``ValueError`` unless ``value`` has shape ``(B, count, storage_dim)`` and its
        finite elements are on the group (see ``check_on_group``)."""
        want = (self.count, self.space.storage_dim)
        if value.ndim != 3 or tuple(value.shape[1:]) != want:
            raise ValueError(
                f"variable {self.name!r} ({self.space}): expected values of shape "
                f"(B, {want[0]}, {want[1]}), got {tuple(value.shape)}"
            )
        if value.is_floating_point():
            check_on_group(self.space, value, f"variable {self.name!r}")
