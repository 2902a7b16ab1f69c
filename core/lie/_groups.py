"""Group descriptors: ``LieGroup`` (SO2, SE2, SO3, SE3) and ``Vector(d)`` share one interface.

Both are frozen (hashable) dataclasses, so they can key dictionaries and be compared; the repr is
the group name (``SE3``, ``Vector(3)``). Elements are plain tensors ``(..., storage_dim)``;
tangent vectors are ``(..., dof)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import TypeAlias

import torch
from torch import Tensor

from core.lie import _util, se2, se3, so2, so3

Device: TypeAlias = torch.device | str | None


@dataclass(frozen=True)
class LieGroup:
    """A matrix Lie group backed by one of the function modules ``so2, se2, so3, se3``."""

    name: str
    storage_dim: int
    dof: int
    module: ModuleType = field(repr=False, compare=False)

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> tuple[object, tuple[str]]:
        # modules do not pickle; the four groups are singletons, so pickle/deepcopy by name
        return _group_by_name, (self.name,)

    def identity(
        self, *batch_shape: int, dtype: torch.dtype | None = None, device: Device = None
    ) -> Tensor:
        """``(*batch_shape, storage_dim)``."""
        return self.module.identity(*batch_shape, dtype=dtype, device=device)

    def random(
        self,
        *batch_shape: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Device = None,
    ) -> Tensor:
        """``(*batch_shape, storage_dim)``: uniform rotation, N(0, I) translation."""
        return self.module.random(*batch_shape, generator=generator, dtype=dtype, device=device)

    def exp(self, xi: Tensor) -> Tensor:
        """``(..., dof) -> (..., storage_dim)``."""
        return self.module.exp(xi)

    def log(self, x: Tensor) -> Tensor:
        """``(..., storage_dim) -> (..., dof)``."""
        return self.module.log(x)

    def compose(self, x: Tensor, y: Tensor) -> Tensor:
        """``x * y``, batches broadcast."""
        return self.module.compose(x, y)

    def inverse(self, x: Tensor) -> Tensor:
        """``x^-1``."""
        return self.module.inverse(x)

    def act(self, x: Tensor, p: Tensor) -> Tensor:
        """Transform points ``(..., 2)`` or ``(..., 3)``."""
        return self.module.act(x, p)

    def retract(self, x: Tensor, delta: Tensor) -> Tensor:
        """``x * exp(delta)``: ``(..., storage_dim), (..., dof) -> (..., storage_dim)``."""
        return self.module.retract(x, delta)

    def local(self, x: Tensor, y: Tensor) -> Tensor:
        """``log(x^-1 y)``: ``(..., storage_dim) x2 -> (..., dof)``."""
        return self.module.local(x, y)

    def adjoint(self, x: Tensor) -> Tensor:
        """``(..., storage_dim) -> (..., dof, dof)``."""
        return self.module.adjoint(x)

    def jr(self, xi: Tensor) -> Tensor:
        """Right Jacobian of exp, ``(..., dof) -> (..., dof, dof)``."""
        return self.module.jr(xi)

    def jr_inv(self, xi: Tensor) -> Tensor:
        """Inverse right Jacobian, ``(..., dof) -> (..., dof, dof)``."""
        return self.module.jr_inv(xi)

    def jl(self, xi: Tensor) -> Tensor:
        """Left Jacobian of exp, ``(..., dof) -> (..., dof, dof)``."""
        return self.module.jl(xi)

    def jl_inv(self, xi: Tensor) -> Tensor:
        """Inverse left Jacobian, ``(..., dof) -> (..., dof, dof)``."""
        return self.module.jl_inv(xi)

    def normalize(self, x: Tensor) -> Tensor:
        """Project back onto the group (re-normalize the rotation part)."""
        return self.module.normalize(x)

    def to_matrix(self, x: Tensor) -> Tensor:
        """Rotation matrix (SO) or homogeneous matrix (SE)."""
        return self.module.to_matrix(x)

    def from_matrix(self, m: Tensor) -> Tensor:
        """Inverse of :meth:`to_matrix`."""
        return self.module.from_matrix(m)


@dataclass(frozen=True)
class Vector:
    """The additive group R^d with the same interface as :class:`LieGroup`."""

    dim: int

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"Vector: dim must be a positive int, got {self.dim!r}")

    def __repr__(self) -> str:
        return f"Vector({self.dim})"

    @property
    def name(self) -> str:
        return repr(self)

    @property
    def storage_dim(self) -> int:
        return self.dim

    @property
    def dof(self) -> int:
        return self.dim

    def _check(self, x: Tensor, name: str) -> None:
        _util.check(x, self.dim, f"{self!r}.{name}")

    def identity(
        self, *batch_shape: int, dtype: torch.dtype | None = None, device: Device = None
    ) -> Tensor:
        """Zeros ``(*batch_shape, dim)``."""
        shape = _util.batch_shape(batch_shape)
        return torch.zeros(*shape, self.dim, dtype=_util.resolve_dtype(dtype), device=device)

    def random(
        self,
        *batch_shape: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Device = None,
    ) -> Tensor:
        """``(*batch_shape, dim)`` ~ N(0, I)."""
        shape = _util.batch_shape(batch_shape)
        dtype = _util.resolve_dtype(dtype)
        return torch.randn(*shape, self.dim, generator=generator, dtype=dtype, device=device)

    def exp(self, xi: Tensor) -> Tensor:
        """Identity map ``(..., dim) -> (..., dim)``."""
        self._check(xi, "exp xi")
        return xi

    def log(self, x: Tensor) -> Tensor:
        """Identity map ``(..., dim) -> (..., dim)``."""
        self._check(x, "log x")
        return x

    def compose(self, x: Tensor, y: Tensor) -> Tensor:
        """``x + y``, batches broadcast."""
        self._check(x, "compose x")
        self._check(y, "compose y")
        return x + y

    def inverse(self, x: Tensor) -> Tensor:
        """``-x``."""
        self._check(x, "inverse x")
        return -x

    def act(self, x: Tensor, p: Tensor) -> Tensor:
        """Translate points: ``p + x``."""
        self._check(x, "act x")
        self._check(p, "act p")
        return p + x

    def retract(self, x: Tensor, delta: Tensor) -> Tensor:
        """``x + delta``."""
        self._check(x, "retract x")
        self._check(delta, "retract delta")
        return x + delta

    def local(self, x: Tensor, y: Tensor) -> Tensor:
        """``y - x``."""
        self._check(x, "local x")
        self._check(y, "local y")
        return y - x

    def _eye(self, x: Tensor, name: str) -> Tensor:
        self._check(x, name)
        return _util.eye_like(x, self.dim, tuple(x.shape[:-1]))

    def adjoint(self, x: Tensor) -> Tensor:
        """Identity matrices ``(..., dim, dim)``."""
        return self._eye(x, "adjoint x")

    def jr(self, xi: Tensor) -> Tensor:
        """Identity matrices ``(..., dim, dim)``."""
        return self._eye(xi, "jr xi")

    def jr_inv(self, xi: Tensor) -> Tensor:
        """Identity matrices ``(..., dim, dim)``."""
        return self._eye(xi, "jr_inv xi")

    def jl(self, xi: Tensor) -> Tensor:
        """Identity matrices ``(..., dim, dim)``."""
        return self._eye(xi, "jl xi")

    def jl_inv(self, xi: Tensor) -> Tensor:
        """Identity matrices ``(..., dim, dim)``."""
        return self._eye(xi, "jl_inv xi")

    def normalize(self, x: Tensor) -> Tensor:
        """No-op."""
        self._check(x, "normalize x")
        return x


Space: TypeAlias = LieGroup | Vector

SO2 = LieGroup("SO2", so2.STORAGE_DIM, so2.DOF, so2)
SE2 = LieGroup("SE2", se2.STORAGE_DIM, se2.DOF, se2)
SO3 = LieGroup("SO3", so3.STORAGE_DIM, so3.DOF, so3)
SE3 = LieGroup("SE3", se3.STORAGE_DIM, se3.DOF, se3)
_GROUPS = {g.name: g for g in (SO2, SE2, SO3, SE3)}


def _group_by_name(name: str) -> LieGroup:
    """Unpickling helper: the module-level group instance called ``name``."""
    return _GROUPS[name]
