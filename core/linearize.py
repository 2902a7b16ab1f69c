"""Linearization: residuals and Jacobians of every cost, scattered into the normal equations.

``H = sum_c J_c^T J_c`` and ``g = sum_c J_c^T r_c`` (residuals already weighted), batched over B,
with one ``index_add`` per cost into the fixed pattern (``Objective.pattern``): Python work grows
with the number of cost types, never with the number of factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from core import fused as _fused
from core.objective import Elements, Objective, Pattern


@dataclass(frozen=True)
class Linearization:
    """Normal equations at one point: ``cost (B * P,)`` per element (``(B,)`` for a
    same-structure batch; per problem of a ragged batch, see ``Objective.elements``),
    ``g (B, n)`` (gradient of the cost), ``H (B, nnz)`` values in ``pattern``."""

    cost: Tensor
    g: Tensor
    H: Tensor
    pattern: Pattern

    def select(self, mask: Tensor, other: Linearization,
               elements: Elements | None = None) -> Linearization:
        """Per element: ``self`` where ``mask (B * P,)`` else ``other`` (``elements`` maps the
        mask to columns and entries; None: one element per batch element)."""
        m_g = mask[:, None] if elements is None else elements.columns(mask)
        m_H = mask[:, None] if elements is None else elements.entries(mask)
        if _plain_cpu(self.H, other.H, self.g, other.g, self.cost, other.cost):
            # NumPy on the CPU without autograd: no OpenMP region (whose wake-up costs
            # milliseconds when other processes hold the cores), same values; one side whole
            # when every element takes it (no copy of H: 20 MB for BA 50 x 8,000)
            picked = mask.numpy()
            if picked.all():
                return self
            if not picked.any():
                return other
            return Linearization(
                torch.from_numpy(np.where(picked, self.cost.numpy(), other.cost.numpy())),
                torch.from_numpy(np.where(m_g.numpy(), self.g.numpy(), other.g.numpy())),
                torch.from_numpy(np.where(m_H.numpy(), self.H.numpy(), other.H.numpy())),
                self.pattern,
            )
        return Linearization(
            torch.where(mask, self.cost, other.cost),
            torch.where(m_g, self.g, other.g),
            torch.where(m_H, self.H, other.H),
            self.pattern,
        )


def _plain_cpu(*tensors: Tensor) -> bool:
    """All CPU tensors outside autograd (NumPy may compute on them)."""
    for t in tensors:  # a loop, not all(<generator>): no Python call per tensor
        if t.device.type != "cpu" or t.requires_grad:
            return False
    return True


CHUNK = 8192
"""On the CPU a cost is evaluated ``CHUNK // B`` factors at a time, so its temporaries (Jacobians,
``J^T J`` blocks) stay a few MB whatever the problem size: tensors over glibc's 32 MB mmap
threshold get fresh pages (page faults) at every allocation, which made linearizing 100k poses
17x slower than 10k. A GPU takes each cost in one piece (kernel launches are its bottleneck)."""


def normal_blocks(J: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Per factor ``J^T J (B, E, D, D)`` and ``J^T r (B, E, D)`` from ``J (B, E, d, D)``,
    ``r (B, E, d)``. For residuals of dimension ``d <= 3`` (reprojections: 2) a sum of ``d``
    outer products: a batched matmul with so small an inner dimension is several times slower
    (BA, 8192 factors: 3.7 ms vs 0.8 ms on the CPU)."""
    d = J.shape[-2]
    if d > 3:
        return J.mT @ J, (J.mT @ r[..., None])[..., 0]
    JtJ = J[..., 0, :, None] * J[..., 0, None, :]
    Jtr = J[..., 0, :] * r[..., 0, None]
    for k in range(1, d):
        JtJ = JtJ.addcmul_(J[..., k, :, None], J[..., k, None, :])
        Jtr = Jtr.addcmul_(J[..., k, :], r[..., k, None])
    return JtJ, Jtr


def linearize(
    objective: Objective, values: Mapping[str, Tensor], fused: bool = True
) -> Linearization:
    """Evaluate all costs with Jacobians at ``values`` and assemble ``H``, ``g`` and the cost.

    ``fused``: costs with a compiled kernel are linearized by it where ``core.fused.applies``
    (CPU, float64, no gradient needed through them), in one pass each (a ragged batch's too: the
    kernels add each factor's cost to its problem's); ``False`` forces the torch path
    for every cost (the reference the kernels are tested against). The cost is per element
    (``Objective.elements``): per problem of a ragged batch, a segment sum of factor costs.
    """
    first = values[objective.variables[0].name]
    batch, device = first.shape[0], first.device
    pattern = objective.pattern(device)
    groups = objective.groups
    problems = 1 if groups is None else groups.count
    if device.type == "cpu" and first.dtype in (torch.float64, torch.float32):
        dtype = np.float64 if first.dtype == torch.float64 else np.float32  # no OpenMP fill
        H = torch.from_numpy(np.zeros((batch, pattern.nnz), dtype))
        g = torch.from_numpy(np.zeros((batch, pattern.n), dtype))
        cost = torch.from_numpy(np.zeros(batch * problems, dtype))
    else:
        H = first.new_zeros(batch, pattern.nnz)
        g = first.new_zeros(batch, pattern.n)
        cost = first.new_zeros(batch * problems)
    for k, (c, columns) in enumerate(zip(objective.costs, pattern.columns)):
        # (not once a torch-path cost before it has made H, g or the cost part of a graph)
        graph = H.requires_grad or g.requires_grad or cost.requires_grad
        if fused and not graph and _fused.applies(c, values):
            # outside autograd; a ragged batch's factors each add to their problem's cost
            _fused.accumulate(c, values, pattern.tops[k], columns, H, g,
                              cost if groups is None else cost.view(batch, problems),
                              None if groups is None else groups.factors[k])
            continue
        positions, num = pattern.positions[k], c.num_factors
        step = num if device.type != "cpu" else max(1, CHUNK // batch)
        for start in range(0, num, step):
            stop = min(start + step, num)
            part = c if stop - start == num else c.factors(start, stop)
            terms = part.evaluate(values, jacobians=True)
            J, r = terms.J, terms.r
            assert J is not None
            JtJ, Jtr = normal_blocks(J, r)
            # in place: an out-of-place index_add would copy H once per cost and chunk
            H.index_add_(1, positions[start:stop].reshape(-1), JtJ.reshape(batch, -1))
            g.index_add_(1, columns[start:stop].reshape(-1), Jtr.reshape(batch, -1))
            if groups is None:
                cost = cost + terms.cost
            else:
                assert terms.factor_cost is not None
                per = terms.factor_cost.new_zeros(batch, problems)
                per = per.index_add(1, groups.factors[k][start:stop], terms.factor_cost)
                cost = cost + per.reshape(-1)
    return Linearization(cost, g, H, pattern)
