"""The smoother: the object's SE(2) trajectory over an episode, one batched problem per batch.

Variable ``obj``: ``T`` SE(2) poses. Costs (all episodes of a batch share this structure; what
differs per episode is in the layer's inputs, ``(B, E, ...)``):

* ``tactile``: between costs from the network's measurements for frame pairs ``(t - k, t)``,
  ``r = Log(z^-1 Q_t Q_(t-k)^-1)`` with ``Q = probe^-1 obj`` (the known probe poses are inputs),
  weighted per axis by the network's confidence times "both images show contact";
* ``push``: ``core.costs.QuasiStaticPushing`` between frames ``t, t + 1`` (weight ``w_push`` while
  the probe touches at ``t + 1``); ``still``: the object stays put when it is not touched
  (``Between`` to the identity, weight ``w_still``). On the step into contact (touch at ``t + 1``
  but not at ``t``) the probe pushed for part of the step only, so neither model holds: both
  apply, scaled by ``enter`` (with the push model alone, its error there shifted the rest of the
  trajectory rigidly: the oracle's error fell from 3.3 to 0.5 mm with both at 0.3);
* ``contact``: ``core.costs.PlanarContact``, the probe on the boundary while in contact;
* ``prior``: the first pose at its known value.

Contact is read from the tactile image (not blank), as a sensor would. The initial trajectory
(:func:`initial`) keeps the first pose until the first contact, then carries the object rigidly
with the probe (from the known probe poses only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import core
from apps.config import make_layer
from apps.tactile.data import Episode
from core.costs.pushing import shape_code
from core.lie import se2


def relative(obj: Tensor, probe: Tensor, window: int) -> Tensor:
    """``(..., T - k, 4)``: ``Q_t Q_(t-k)^-1``, ``Q = probe^-1 obj`` (the object's pose in the
    probe frame), for ``obj, probe (..., T, 4)``: the object's motion relative to the probe,
    expressed in the probe frame (the identity while the object sticks to the probe)."""
    q = se2.compose(se2.inverse(probe), obj)
    return se2.normalize(se2.compose(q[..., window:, :], se2.inverse(q[..., :-window, :])))


def TactileBetween(obj: core.Variable, window: int, frames: int) -> core.CostTable:  # noqa: N802
    """``r = Log(z^-1 Q_j Q_i^-1)``, ``Q = P^-1 O`` with the known probe poses ``P``, for pairs
    ``(i, j) = (t - k, t)``. With ``M = z^-1 P_j^-1 O_j N``, ``N = O_i^-1 P_i = Q_i^-1``:
    ``O_j Exp(d)`` turns ``M`` into ``M Exp(Ad(Q_i) d)`` and ``O_i Exp(d)`` into
    ``M Exp(-Ad(Q_i) d)``, so ``dr/dO_j = Jr^-1(r) Ad(Q_i) = -dr/dO_i``.
    Inputs ``tactile.measured``, ``tactile.probe_i``, ``tactile.probe_j`` ``(B, M, 4)``."""
    num = frames - window
    ident = se2.identity(1, num, dtype=torch.float64)

    def between(xs: list[Tensor], aux: list[Tensor], jac: bool):
        z, pi, pj = aux
        qi = se2.compose(se2.inverse(pi), xs[0])
        qj = se2.compose(se2.inverse(pj), xs[1])
        r = se2.local(z, se2.compose(qj, se2.inverse(qi)))
        if not jac:
            return r, None
        Jj = se2.jr_inv(r) @ se2.adjoint(qi)
        return r, [-Jj, Jj]

    return core.Cost(None, [obj, obj], {"measured": ident, "probe_i": ident, "probe_j": ident},
                     index=[torch.arange(num), torch.arange(window, frames)],
                     weight=torch.ones(1, num, 3, dtype=torch.float64), name="tactile",
                     analytic=between, residual_dim=3,
                     aux_spaces={"measured": core.SE2, "probe_i": core.SE2, "probe_j": core.SE2})


@dataclass(frozen=True)
class Weights:
    """Fixed weights (square-root information) of the model costs; see the module docstring."""

    push: float
    still: float
    contact: float
    prior: float
    c_square: float
    enter: float


def weights_from(cfg: Any) -> Weights:
    p = cfg.problem
    return Weights(p.w_push, p.w_still, p.w_contact, p.w_prior, p.c_square, p.enter)


class Smoother:
    """The objective over ``frames`` poses with measurement window ``window``, built once, and
    its layer (``cfg.optimizer``, ``cfg.solver``)."""

    def __init__(self, frames: int, window: int, weights: Weights, probe_radius: float,
                 cfg: Any) -> None:
        if frames <= window:
            raise ValueError(f"episodes of {frames} frames are not longer than the measurement "
                             f"window {window}")
        self.frames, self.window, self.weights = frames, window, weights
        obj = core.Variable("obj", core.SE2, count=frames)
        t = torch.arange(frames - 1)
        ident = se2.identity(frames - 1, dtype=torch.float64)
        ones = torch.ones(1, frames - 1, 1, dtype=torch.float64)
        costs = [
            TactileBetween(obj, window, frames),
            core.costs.QuasiStaticPushing(obj, t, t + 1, ident, ident, weights.c_square,
                                          weight=ones, name="push"),
            core.costs.Between(obj, t, t + 1, ident, weight=ones, name="still"),
            core.costs.PlanarContact(obj, torch.arange(frames), se2.identity(frames,
                                     dtype=torch.float64),
                                     torch.tensor([0.0, 0.1, 0.1], dtype=torch.float64),
                                     probe_radius, weight=torch.ones(1, frames, 1,
                                                                     dtype=torch.float64),
                                     name="contact"),
            core.costs.Prior(obj, se2.identity(dtype=torch.float64), index=0,
                             sqrt_info=float(weights.prior), name="prior"),
        ]
        self.objective = core.Objective(costs)
        self.layer = make_layer(self.objective, cfg)

    def inputs(self, batch: Batch, z: Tensor | None, w: Tensor | None) -> dict[str, Tensor]:
        """The layer's inputs for ``batch``: measurements ``z (B, M, 4)`` with weights
        ``w (B, M, 3)`` (None: no tactile measurements)."""
        k, wt = self.window, self.weights
        B, T = batch.obj.shape[:2]
        touch = batch.touch.double()
        pairs = (touch[:, :-k] * touch[:, k:])[..., None]
        if z is None or w is None:
            z = se2.identity(B, T - k, dtype=torch.float64)
            w = torch.zeros(B, T - k, 3, dtype=torch.float64)
        moved = touch[:, 1:, None]
        # entering contact mid-step, the object moved less than a full push: both models, damped
        entering = (1 - touch[:, :-1, None]) * moved
        keep = 1 - entering * (1 - wt.enter)
        return {
            "obj": initial(batch),
            "tactile.measured": z, "tactile.weight": w * pairs,
            "tactile.probe_i": batch.probe[:, :-k], "tactile.probe_j": batch.probe[:, k:],
            "push.pusher_i": batch.probe[:, :-1], "push.pusher_j": batch.probe[:, 1:],
            "push.weight": wt.push * moved * keep,
            "still.weight": wt.still * ((1 - moved) + wt.enter * entering),
            "contact.pusher": batch.probe, "contact.shape": batch.shape[:, None].expand(B, T, 3),
            "contact.weight": wt.contact * touch[..., None],
            "prior.target": batch.obj[:, :1],
        }

    def solve(self, batch: Batch, z: Tensor | None, w: Tensor | None) -> Tensor:
        """``(B, T, 4)``: the smoothed trajectories."""
        sol, _ = self.layer(self.inputs(batch, z, w))
        return sol["obj"]


def initial(batch: Batch) -> Tensor:
    """``(B, T, 4)``: the first pose until the first frame ``c`` with contact, then
    ``P_t P_c^-1 O_0`` (the object stuck to the probe)."""
    B, T = batch.touch.shape
    t = torch.arange(T, device=batch.touch.device)
    first = torch.where(batch.touch, t, T).min(-1).values.clamp_max(T - 1)  # (B,)
    pc = batch.probe[torch.arange(B), first]  # (B, 4)
    o0 = batch.obj[:, :1].expand(B, T, 4)
    carried = se2.compose(se2.compose(batch.probe, se2.inverse(pc)[:, None]), o0)
    return se2.normalize(torch.where((t[None] >= first[:, None])[..., None], carried, o0))


@dataclass(frozen=True)
class Batch:
    """Episodes stacked: ``obj, probe (B, T, 4)`` float64, ``touch (B, T)`` bool (image not
    blank), ``images (B, T, H, W)`` float32 in [0, 1], ``shape (B, 3)`` (code, a, b)."""

    obj: Tensor
    probe: Tensor
    touch: Tensor
    images: Tensor
    shape: Tensor

    def pairs(self, window: int) -> Tensor:
        """``(B * (T - k), 2, H, W)``: image pairs ``(t - k, t)``."""
        im = self.images
        return torch.stack((im[:, :-window], im[:, window:]), 2).flatten(0, 1)


def stack(episodes: Sequence[Episode], device: torch.device) -> Batch:
    """Stack episodes of equal length into a :class:`Batch` on ``device``."""
    frames = {e.frames for e in episodes}
    if len(frames) > 1:
        raise ValueError(f"episodes of different lengths {sorted(frames)} cannot share a batch")
    images = torch.stack([e.image for e in episodes]).float() / 255
    shape = torch.tensor([[shape_code(e.shape), *e.size] for e in episodes], dtype=torch.float64)
    return Batch(torch.stack([e.obj for e in episodes]).to(device),
                 torch.stack([e.probe for e in episodes]).to(device),
                 (images.flatten(2).amax(-1) > 0).to(device), images.to(device), shape.to(device))


def pose_errors(est: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frame translation error (m) and absolute rotation error (rad), ``(B, T)`` each."""
    dt = (est[..., :2] - truth[..., :2]).norm(dim=-1)
    dr = torch.atan2(truth[..., 2] * est[..., 3] - truth[..., 3] * est[..., 2],
                     truth[..., 2] * est[..., 2] + truth[..., 3] * est[..., 3])
    return dt, dr.abs()


def trajectory_loss(est: Tensor, truth: Tensor, trans_scale: float, rot_scale: float) -> Tensor:
    """``(B,)``: mean over frames of ``(|dt| / trans_scale)^2 + (dtheta / rot_scale)^2``."""
    dt, dr = pose_errors(est, truth)
    return ((dt / trans_scale) ** 2 + (dr / rot_scale) ** 2).mean(-1)
