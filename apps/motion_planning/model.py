"""The network: a small CNN that looks at the map along the straight line from start to goal and
proposes the planner's initial trajectory (:class:`InitNet`).

:func:`augment` draws one of the eight symmetries of the square map per sample (flips and the
transpose; exact on the grid, whose cell centres are symmetric about the origin).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from apps.motion_planning import problem
from apps.motion_planning.spec import MapSpec
from core.costs.motion import sdf_lookup


class InitNet(nn.Module):
    """``forward(sdf (B, H, W), start (B, 2), goal (B, 2))``: ``Hy`` candidate initial
    trajectories (float64) for ``spec``'s planner and their scores, from the map seen in the
    start-goal frame.

    The SDF is resampled (``core.costs.sdf_lookup``, so beyond the map's edge it keeps falling)
    on a corridor grid aligned with the straight line: ``M = 4 K + 1`` points along it (progress
    ``s`` in ``[0, 1]``) by ``L`` lateral offsets ``u`` in ``[-width, width]``. Channels: the
    clipped SDF, ``u`` and ``s``. A 2D CNN over the corridor (pooling across it), then dilated 1D
    convolutions along it give each point an offset (across and along the line); rotated back to
    the world frame, the least-squares fit of the ``K`` sine offsets of
    ``apps.motion_planning.problem.curve`` to them (a fixed linear map) gives the trajectory,
    which therefore starts at ``start`` and ends at ``goal``. Working in the line's frame makes
    the network invariant to where the query sits on the map and how it is turned: what it
    learns on one map transfers to others. The last layer starts at zero: the untrained network
    proposes the straight line (the baseline's initialization).

    Multiple hypotheses (Guzman-Rivera et al., "Multiple choice learning", NeurIPS 2012; as in
    trajectory prediction, e.g. Cui et al., ICRA 2019): going left or right of an obstacle are
    both plans, and a single regression would average them into a collision. The network gives
    ``Hy`` trajectories and a score for each; training imitates the expert with the closest
    hypothesis (winner takes all) and teaches the scores to name it (cross-entropy); the
    planner starts from the best-scored one (:func:`chosen`). Hypothesis 0 starts as the straight
    line, the others start off to alternating sides, and the scores start equal, so the
    untrained network proposes the straight line.

    Args:
        spec: the maps and planner; channels: widths of the 2D convolutions (each followed by a
        2x pooling across the corridor); hidden: width of the 1D convolutions; basis: ``K``;
        lanes: ``L``; width: the corridor's half-width (metres); hypotheses: ``Hy``.
    """

    def __init__(self, spec: MapSpec, channels: tuple[int, ...] = (16, 32, 32),
                 hidden: int = 128, basis: int = 8, lanes: int = 33, width: float = 4.0,
                 hypotheses: int = 4) -> None:
        super().__init__()
        if len(channels) < 1 or min(basis, hidden, hypotheses) < 1 or lanes < 2 or width <= 0:
            raise ValueError(f"model: needs channels, basis, hidden, hypotheses >= 1, lanes >= 2, "
                             f"width > 0; got {channels}, {basis}, {hidden}, {hypotheses}, "
                             f"{lanes}, {width}")
        self.spec, self.basis, self.points = spec, basis, 4 * basis + 1
        self.lanes, self.width = lanes, width
        layers: list[nn.Module] = []
        c_in, rows = 3, lanes
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d((2, 1), ceil_mode=True)]
            c_in, rows = c, -(-rows // 2)
        self.corridor = nn.Sequential(*layers)
        convs: list[nn.Module] = []
        inner = c_in * rows
        for d in (1, 2, 4, 8):
            convs += [nn.Conv1d(inner, hidden, 5, padding=2 * d, dilation=d), nn.ReLU()]
            inner = hidden
        self.hypotheses = hypotheses
        self.along = nn.Sequential(*convs)
        self.offsets = nn.Conv1d(hidden, 2 * hypotheses, 1)
        nn.init.zeros_(self.offsets.weight)
        with torch.no_grad():  # hypothesis 0: the line; the others start off to either side
            side = torch.arange(hypotheses, dtype=torch.float32)
            side = torch.where(side % 2 == 1, (side + 1) / 2, -side / 2) * 0.25
            self.offsets.bias.copy_(torch.stack([side, torch.zeros_like(side)], 1).flatten())
        self.score = nn.Linear(hidden, hypotheses)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        s = torch.linspace(0, 1, self.points, dtype=torch.float64)
        k = torch.arange(1, basis + 1, dtype=torch.float64) * math.pi
        self.register_buffer("fit", torch.linalg.pinv(torch.sin(s[:, None] * k)).float(),
                             persistent=False)  # (K, M)

    def frame(self, start: Tensor, goal: Tensor) -> tuple[Tensor, Tensor]:
        """Unit vectors along ``(B, 2)`` and across ``(B, 2)`` the line from start to goal."""
        e1 = goal - start
        e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        return e1, torch.stack([-e1[:, 1], e1[:, 0]], -1)

    def image(self, sdf: Tensor, start: Tensor, goal: Tensor) -> Tensor:
        """``(B, 3, L, M)`` float32: the corridor's SDF (clipped to [-1, 3] m, scaled), ``u``
        and ``s``."""
        a, b = start.float(), goal.float()
        e1, e2 = self.frame(a, b)
        s = torch.linspace(0, 1, self.points, device=sdf.device)
        u = torch.linspace(-self.width, self.width, self.lanes, device=sdf.device)
        line = a[:, None, None] + s[None, None, :, None] * (b - a)[:, None, None]  # (B,1,M,2)
        pts = line + u[None, :, None, None] * e2[:, None, None]  # (B, L, M, 2)
        d, _ = sdf_lookup(sdf.float(), pts.flatten(1, 2), self.spec.origin, self.spec.cell)
        d = (d.view(-1, self.lanes, self.points).clamp(-1.0, 3.0) - 1.0) / 2.0
        B = len(a)
        uu = (u / self.width)[None, :, None].expand(B, self.lanes, self.points)
        ss = s[None, None].expand(B, self.lanes, self.points)
        return torch.stack([d, uu, ss], 1)

    def forward(self, sdf: Tensor, start: Tensor, goal: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, Hy, N, 4)`` the hypotheses and ``(B, Hy)`` their scores (logits)."""
        h = self.along(self.corridor(self.image(sdf, start, goal)).flatten(1, 2))  # (B, C, M)
        B, Hy, M = h.shape[0], self.hypotheses, self.points
        offsets = self.offsets(h).view(B, Hy, 2, M) * self.width  # across, along
        e1, e2 = self.frame(start.float(), goal.float())
        world = (offsets[:, :, :1] * e2[:, None, :, None]
                 + offsets[:, :, 1:] * e1[:, None, :, None])  # (B, Hy, 2, M)
        coeffs = (world @ self.fit.mT).flatten(0, 1)  # (B Hy, 2, K)
        rep = lambda t: t.double().repeat_interleave(Hy, 0)  # noqa: E731
        trajs = problem.curve(rep(start), rep(goal), coeffs.double(), self.spec)
        return trajs.view(B, Hy, *trajs.shape[1:]), self.score(h.mean(-1))


def chosen(trajs: Tensor, scores: Tensor) -> Tensor:
    """``(B, N, 4)``: each map's best-scored hypothesis (the planner's initialization)."""
    pick = scores.argmax(-1)
    return trajs[torch.arange(len(pick), device=pick.device), pick]


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
