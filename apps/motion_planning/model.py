"""The network: a small fully convolutional net that looks at the map along the straight line from
start to goal and proposes the planner's initial trajectories (:class:`InitNet`).

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
    on a corridor grid aligned with the straight line: ``M = 4 K + 1`` columns along it (progress
    ``s`` in ``[0, 1]``) by ``L`` lanes, lateral offsets ``u`` in ``[-width, width]``. Channels:
    the clipped SDF, ``u`` and ``s``. Working in the line's frame makes the network invariant to
    where the query sits on the map and how it is turned.

    The output is spatially grounded: a small fully convolutional U-Net (Ronneberger et al.,
    MICCAI 2015; dilated convolutions at the coarsest level see the whole corridor) gives, per
    hypothesis, a logit for each lane of each column, "the plan is in this lane at time ``s``",
    computed from the map around that lane, and an along-line offset there. Decoding: per column,
    the expectation of ``u`` under the softmax restricted to ``window`` lanes either side of the
    best lane (so two separated modes are never averaged into a collision), and the along offset
    read with the same weights (:meth:`decode`). Rotated back to the world frame, the
    least-squares fit of the ``K`` sine offsets of ``apps.motion_planning.problem.curve`` to
    these ``M`` points gives the trajectory, which therefore starts at ``start`` and ends at
    ``goal``. Training (``apps.motion_planning.train``): the lane logits by cross-entropy to the
    expert's lane, the whole trajectory by imitation.

    Multiple hypotheses (Guzman-Rivera et al., "Multiple choice learning", NeurIPS 2012): going
    left or right of an obstacle are both plans, and a single regression would average them.
    Training imitates the expert with the closest hypothesis only (winner takes all) and teaches
    the scores to name it. The untrained network's logits are a fixed prior per hypothesis, a
    shallow parabola over the lanes centred on the line for hypothesis 0 and off to alternating
    sides for the others; the scores start equal, so the untrained network proposes the straight
    line.

    Args:
        spec: the maps and planner; channels: widths of the U-Net's levels (each level halves
        the grid); basis: ``K``; lanes: ``L``; width: the corridor's half-width (metres);
        hypotheses: ``Hy``; window: lanes either side of the best one in the decoding;
        refiner: an optional second stage (:class:`Refiner`) that corrects a chosen hypothesis.
    """

    def __init__(self, spec: MapSpec, channels: tuple[int, ...] = (16, 32, 64),
                 basis: int = 12, lanes: int = 49, width: float = 6.0, hypotheses: int = 8,
                 window: int = 3, refiner: Refiner | None = None) -> None:
        super().__init__()
        self.refiner = refiner
        if (len(channels) < 1 or min(channels) < 1 or min(basis, hypotheses) < 1 or lanes < 2
                or width <= 0 or window < 0):
            raise ValueError(f"model: needs channels >= 1, basis, hypotheses >= 1, lanes >= 2, "
                             f"width > 0, window >= 0; got {channels}, {basis}, {hypotheses}, "
                             f"{lanes}, {width}, {window}")
        self.spec, self.basis, self.points = spec, basis, 4 * basis + 1
        self.lanes, self.width, self.hypotheses, self.window = lanes, width, hypotheses, window
        self.down = nn.ModuleList()
        c_in = 3
        for level, c in enumerate(channels):
            last = level == len(channels) - 1
            dil = (2, 4) if last else (1, 1)
            self.down.append(nn.Sequential(
                nn.Conv2d(c_in, c, 3, padding=dil[0], dilation=dil[0]), nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=dil[1], dilation=dil[1]), nn.ReLU()))
            c_in = c
        self.up = nn.ModuleList()
        for c_skip in reversed(channels[:-1]):
            self.up.append(nn.Sequential(nn.Conv2d(c_in + c_skip, c_skip, 3, padding=1),
                                         nn.ReLU()))
            c_in = c_skip
        self.head = nn.Conv2d(c_in, 2 * hypotheses, 1)  # lane logits and along offsets
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.score = nn.Linear(channels[-1], hypotheses)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        u = torch.linspace(-1, 1, lanes)
        side = torch.arange(hypotheses, dtype=torch.float32)
        side = torch.where(side % 2 == 1, (side + 1) / 2, -side / 2) * 0.25
        self.register_buffer("prior", -2.0 * (u[None] - side[:, None].clamp(-1, 1)) ** 2,
                             persistent=False)  # (Hy, L)
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

    def maps(self, sdf: Tensor, start: Tensor, goal: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, Hy, L, M)`` lane logits, ``(B, Hy, L, M)`` along offsets (metres) and
        ``(B, Hy)`` scores."""
        x, skips = self.image(sdf, start, goal), []
        for level, block in enumerate(self.down):
            if level:
                skips.append(x)
                x = nn.functional.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
        scores = self.score(x.mean((-1, -2)))
        for block, skip in zip(self.up, reversed(skips)):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], 1))
        out = self.head(x)
        Hy = self.hypotheses
        logits = out[:, :Hy] + self.prior[None, :, :, None]
        return logits, out[:, Hy:] * (self.width / 4), scores

    def decode(self, logits: Tensor, along: Tensor) -> tuple[Tensor, Tensor]:
        """``u (B, Hy, M)`` and along offsets ``(B, Hy, M)``: per column, the expectation
        under the softmax over the ``window`` lanes either side of the best lane."""
        lane = torch.arange(self.lanes, device=logits.device)[:, None]
        best = logits.argmax(-2, keepdim=True)  # (B, Hy, 1, M)
        near = (lane - best).abs() <= self.window
        w = torch.softmax(logits.masked_fill(~near, float("-inf")), -2)
        u = torch.linspace(-self.width, self.width, self.lanes, device=logits.device)
        return (w * u[:, None]).sum(-2), (w * along).sum(-2)

    def trajectories(self, start: Tensor, goal: Tensor, u: Tensor, along: Tensor) -> Tensor:
        """``(B, Hy, N, 4)`` float64 from offsets ``u``, ``along (B, Hy, M)`` at the columns."""
        B, Hy = u.shape[:2]
        e1, e2 = self.frame(start.float(), goal.float())
        world = (u[:, :, None] * e2[:, None, :, None]
                 + along[:, :, None] * e1[:, None, :, None])  # (B, Hy, 2, M)
        coeffs = (world @ self.fit.mT).flatten(0, 1)  # (B Hy, 2, K)
        rep = lambda t: t.double().repeat_interleave(Hy, 0)  # noqa: E731
        trajs = problem.curve(rep(start), rep(goal), coeffs.double(), self.spec)
        return trajs.view(B, Hy, *trajs.shape[1:])

    def targets(self, start: Tensor, goal: Tensor, expert: Tensor) -> Tensor:
        """``(B, L, M)`` the expert's lane at each column as a two-hot distribution (linear
        between the two nearest lanes; clamped to the corridor), ``expert (B, N, 4)``."""
        e1, e2 = self.frame(start.float(), goal.float())
        n = expert.shape[1]
        t = torch.linspace(0, n - 1, self.points, device=expert.device)
        lo = t.floor().long().clamp(max=n - 2)
        f = (t - lo)[None, :, None]
        p = expert[..., :2].float()
        at = p[:, lo] * (1 - f) + p[:, lo + 1] * f  # (B, M, 2)
        u = ((at - start.float()[:, None]) * e2[:, None]).sum(-1)
        g = ((u / self.width).clamp(-1, 1) + 1) / 2 * (self.lanes - 1)  # fractional lane
        g0 = g.floor().clamp(max=self.lanes - 2)
        frac = g - g0
        lane = torch.arange(self.lanes, device=expert.device)[None, :, None]
        return ((lane == g0[:, None]).float() * (1 - frac[:, None])
                + (lane == g0[:, None] + 1).float() * frac[:, None])

    def forward(self, sdf: Tensor, start: Tensor, goal: Tensor, lanes: bool = False,
                expert: Tensor | None = None) -> tuple[Tensor, ...]:
        """``(B, Hy, N, 4)`` the hypotheses and ``(B, Hy)`` their scores (logits); with
        ``lanes`` also the ``(B, Hy, L, M)`` lane logits (for the training loss); with
        ``expert (B, N, 4)`` and a refiner also, for training it (in the same forward, as
        DistributedDataParallel wants), the hypothesis closest to the expert ``(B, N, 4)``
        (detached), the refiner's logits on it ``(B, T, N)`` and its refinement ``(B, N, 4)``."""
        logits, along, scores = self.maps(sdf, start, goal)
        trajs = self.trajectories(start, goal, *self.decode(logits, along))
        out = (trajs, scores, logits) if lanes else (trajs, scores)
        if expert is None or self.refiner is None:
            return out
        err = (trajs[..., :2] - expert[:, None, :, :2]).pow(2).sum(-1).mean(-1)  # (B, Hy)
        near = trajs[torch.arange(len(trajs), device=trajs.device), err.argmin(-1)].detach()
        return (*out, near, *self.refiner(near, sdf))

    def refine(self, traj: Tensor, sdf: Tensor) -> Tensor:
        """``(B, N, 4)``: ``traj`` corrected by the refiner (unchanged without one)."""
        return traj if self.refiner is None else self.refiner(traj, sdf)[1]


def lane_loss(logits: Tensor, target: Tensor) -> Tensor:
    """``(B, Hy)`` cross-entropy of lane logits ``(B, Hy, L, M)`` to ``target (B, L, M)``,
    averaged over the columns."""
    return -(target[:, None] * torch.log_softmax(logits, -2)).sum(-2).mean(-1)


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


def restore(traj: Tensor, code: Tensor) -> Tensor:
    """Undo :func:`augment`'s symmetry ``code (B,)`` on trajectories ``traj (B, ..., N, 4)``
    planned on the transformed maps: first the swap, then the flips (each its own inverse)."""
    fx, fy, sw = (code & 1).bool(), (code & 2).bool(), (code & 4).bool()
    shape = (-1,) + (1,) * (traj.ndim - 2)
    sign = torch.stack([1 - 2 * fx.to(traj.dtype), 1 - 2 * fy.to(traj.dtype)], -1).view(
        *shape, 2)

    def points(p: Tensor) -> Tensor:
        return torch.where(sw.view(*shape, 1), p.flip(-1), p) * sign

    return torch.cat([points(traj[..., :2]), points(traj[..., 2:])], -1)


class Refiner(nn.Module):
    """A second look along a proposed trajectory: ``forward(traj (B, N, 4), sdf (B, H, W))``
    gives lateral lane logits ``(B, T, N)`` and the refined trajectory ``(B, N, 4)`` (float64).

    The SDF is resampled on a tube around the trajectory: at each state, ``T`` points across it
    along its normal (the positions' central-difference tangent turned by 90 degrees), offsets
    ``u`` in ``[-width, width]``. A small fully convolutional net with dilations along the path
    gives per state a logit for each offset, "the plan crosses this normal here"; the expected
    offset under their softmax moves the state along its normal, and the least-squares fit of
    ``basis`` sine terms (zero at both ends, as in ``apps.motion_planning.problem.curve``) to
    these moves makes the correction a smooth trajectory with its velocities. The head starts
    at zero: uniform logits, zero expected offset, so the untrained refiner is the identity.
    Trained (``apps.motion_planning.train``) by cross-entropy to the expert's offset along each
    normal and by imitation, on the hypothesis closest to the expert.

    Args: spec: the maps and planner; width: the tube's half-width (metres); lanes: ``T``;
    channels: width of the convolutions; basis: sine terms of the correction.
    """

    def __init__(self, spec: MapSpec, width: float = 1.0, lanes: int = 25, channels: int = 32,
                 basis: int = 24) -> None:
        super().__init__()
        if width <= 0 or lanes < 2 or channels < 1 or basis < 1:
            raise ValueError(f"refiner: needs width > 0, lanes >= 2, channels >= 1, basis >= 1; "
                             f"got {width}, {lanes}, {channels}, {basis}")
        self.spec, self.width, self.lanes = spec, width, lanes
        c = channels
        layers: list[nn.Module] = []
        for k, dil in enumerate((1, 2, 4, 8, 1)):
            layers += [nn.Conv2d(2 if k == 0 else c, c, 3, padding=(1, dil), dilation=(1, dil)),
                       nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        n = spec.num_states
        basis = min(basis, n - 2)
        s = torch.linspace(0, 1, n, dtype=torch.float64)
        k = torch.arange(1, basis + 1, dtype=torch.float64) * math.pi
        sin, cos = torch.sin(s[:, None] * k), torch.cos(s[:, None] * k) * k / spec.total_time
        fit = torch.linalg.pinv(sin)  # (K, N)
        self.register_buffer("to_p", (sin @ fit).float(), persistent=False)  # (N, N)
        self.register_buffer("to_v", (cos @ fit).float(), persistent=False)

    def normals(self, traj: Tensor) -> Tensor:
        """``(B, N, 2)`` unit normals of the positions of ``traj (B, N, 4)``."""
        p = traj[..., :2].float()
        t = torch.gradient(p, dim=1)[0]
        t = t / t.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        return torch.stack([-t[..., 1], t[..., 0]], -1)

    def offsets(self) -> Tensor:
        """``(T,)`` the tube's lateral offsets."""
        return torch.linspace(-self.width, self.width, self.lanes, device=self.head.weight.device)

    def forward(self, traj: Tensor, sdf: Tensor) -> tuple[Tensor, Tensor]:
        B, N = traj.shape[:2]
        n, u = self.normals(traj), self.offsets()
        pts = traj[:, None, :, :2].float() + u[None, :, None, None] * n[:, None]  # (B, T, N, 2)
        d, _ = sdf_lookup(sdf.float(), pts.flatten(1, 2), self.spec.origin, self.spec.cell)
        d = (d.view(B, self.lanes, N).clamp(-0.5, 1.5) - 0.5)
        uu = (u / self.width)[None, :, None].expand(B, self.lanes, N)
        logits = self.head(self.body(torch.stack([d, uu], 1)))[:, 0]  # (B, T, N)
        move = (torch.softmax(logits, 1) * u[:, None]).sum(1)[..., None] * n  # (B, N, 2)
        dp, dv = self.to_p @ move, self.to_v @ move
        return logits, traj + torch.cat([dp, dv], -1).double()

    def targets(self, traj: Tensor, expert: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, N)`` the expert's offset along each normal of ``traj`` as a two-hot
        distribution over the tube's lanes, and ``(B,)`` whether the expert lies inside the tube
        (within ``width`` of ``traj`` at every state)."""
        diff = (expert[..., :2] - traj[..., :2]).float()
        u = (diff * self.normals(traj)).sum(-1)  # (B, N)
        inside = diff.norm(dim=-1).amax(-1) < self.width
        g = ((u / self.width).clamp(-1, 1) + 1) / 2 * (self.lanes - 1)
        g0 = g.floor().clamp(max=self.lanes - 2)
        frac = g - g0
        lane = torch.arange(self.lanes, device=traj.device)[None, :, None]
        two_hot = ((lane == g0[:, None]).float() * (1 - frac[:, None])
                   + (lane == g0[:, None] + 1).float() * frac[:, None])
        return two_hot, inside
