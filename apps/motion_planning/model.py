"""The network: a small CNN over the map's SDF with start and goal, producing the planner's
initial trajectory.

Input channels (all ``(B, H, W)``): the SDF clipped to ``[-1, 3]`` m and scaled, Gaussian blobs
at the start and at the goal, and the cells' ``x`` and ``y`` coordinates (CoordConv: Liu et al.,
NeurIPS 2018). Four stride-2 convolutions, an adaptive average pool to ``8 x 8``, and an MLP (with
the start and goal coordinates appended) give ``2 K`` sine-offset coefficients of
``apps.motion_planning.problem.curve``: the straight line plus ``sum_k a_k sin(k pi s)``, which
keeps the ends on start and goal. The last layer starts at zero, so the untrained network
proposes the straight line (the baseline's initialization).

:func:`augment` draws one of the eight symmetries of the square map per sample (flips and the
transpose; exact on the grid, whose cell centres are symmetric about the origin).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apps.motion_planning import problem
from apps.motion_planning.spec import MapSpec


class InitNet(nn.Module):
    """``forward(sdf (B, H, W), start (B, 2), goal (B, 2)) -> (B, N, 4)`` initial trajectories
    (float64) for ``spec``'s planner.

    Args:
        spec: the maps and planner; channels: widths of the four convolutions; hidden: the MLP's
        width; basis: ``K`` sine offsets per axis.
    """

    def __init__(self, spec: MapSpec, channels: tuple[int, ...] = (16, 32, 32, 64),
                 hidden: int = 128, basis: int = 8) -> None:
        super().__init__()
        if len(channels) < 1 or basis < 1 or hidden < 1:
            raise ValueError(f"model: needs channels, basis >= 1, hidden >= 1; got {channels}, "
                             f"{basis}, {hidden}")
        self.spec, self.basis = spec, basis
        layers: list[nn.Module] = []
        width = 5
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.ReLU()]
            width = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(8), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(width * 64 + 4, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 2 * basis))
        last = self.head[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def channels(self, sdf: Tensor, start: Tensor, goal: Tensor) -> Tensor:
        """``(B, 5, H, W)`` float32 network input."""
        spec = self.spec
        B, H, W = sdf.shape
        c = -spec.extent + (torch.arange(W, device=sdf.device, dtype=torch.float32) + 0.5
                            ) * spec.cell
        y, x = torch.meshgrid(c, c, indexing="ij")
        xy = torch.stack([x, y], -1)  # (H, W, 2)

        def blob(p: Tensor) -> Tensor:
            d2 = ((xy[None] - p.float()[:, None, None]) ** 2).sum(-1)
            return torch.exp(-d2 / (2 * 0.5**2))

        scaled = (sdf.float().clamp(-1.0, 3.0) - 1.0) / 2.0
        coords = (xy / spec.extent).permute(2, 0, 1)[None].expand(B, 2, H, W)
        return torch.cat([scaled[:, None], blob(start)[:, None], blob(goal)[:, None], coords], 1)

    def forward(self, sdf: Tensor, start: Tensor, goal: Tensor) -> Tensor:
        f = self.features(self.channels(sdf, start, goal))
        ends = torch.cat([start, goal], -1).float() / self.spec.extent
        a = self.head(torch.cat([f, ends], -1)).view(-1, 2, self.basis)
        return problem.curve(start.double(), goal.double(), a.double() * self.spec.extent,
                             self.spec)


def augment(sdf: Tensor, start: Tensor, goal: Tensor, expert: Tensor, code: Tensor
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Apply symmetry ``code (B,)`` in ``[0, 8)`` per sample: bit 0 flips ``x``, bit 1 flips
    ``y``, bit 2 swaps ``x`` and ``y``. ``sdf (B, H, W)`` (rows along ``y``), ``start``/``goal
    (B, 2)``, ``expert (B, N, 4)``."""
    fx, fy, sw = (code & 1).bool(), (code & 2).bool(), (code & 4).bool()
    sdf = torch.where(fx[:, None, None], sdf.flip(-1), sdf)
    sdf = torch.where(fy[:, None, None], sdf.flip(-2), sdf)
    sdf = torch.where(sw[:, None, None], sdf.transpose(-1, -2), sdf)

    def points(p: Tensor) -> Tensor:  # (B, ..., 2)
        shape = (-1,) + (1,) * (p.ndim - 2)
        sign = torch.stack([1 - 2 * fx.to(p.dtype), 1 - 2 * fy.to(p.dtype)], -1).view(
            *shape, 2)
        p = p * sign
        return torch.where(sw.view(*shape, 1), p.flip(-1), p)

    traj = torch.cat([points(expert[..., :2]), points(expert[..., 2:])], -1)
    return sdf, points(start), points(goal), traj
