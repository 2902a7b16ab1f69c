"""Optimization variables: ``count`` elements of one space (a Lie group or a vector space)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from core.lie import Space


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
        """Raise ``ValueError`` unless ``value`` has shape ``(B, count, storage_dim)``."""
        want = (self.count, self.space.storage_dim)
        if value.ndim != 3 or tuple(value.shape[1:]) != want:
            raise ValueError(
                f"variable {self.name!r} ({self.space}): expected values of shape "
                f"(B, {want[0]}, {want[1]}), got {tuple(value.shape)}"
            )
