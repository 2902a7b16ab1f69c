"""Prepared data, scores, and the unlearned baselines of the tactile app.

* two-stage: the same network (:class:`apps.tactile.model.TactileNet`) trained alone on the
  relative-pose targets (Gaussian negative log-likelihood with its per-axis weights), then used in
  the smoother with its weights times a multiplier tuned on training episodes;
* motion-only: the smoother without tactile measurements (motion model, contact, prior);
* oracle: noise-free relative-pose measurements with a fixed large weight (the floor).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from apps.harness import Run, reduce_scores
from apps.tactile.data import Episode
from apps.tactile.model import TactileNet
from apps.tactile.problem import Batch, Smoother, pose_errors, relative, stack, trajectory_loss
from core.lie import se2

log = logging.getLogger(__name__)
#: ``batch -> (z (B, M, 4), w (B, M, 3))`` or ``(None, None)`` (no measurements)
Measure = Callable[[Batch], tuple[Tensor | None, Tensor | None]]


class Prepared:
    """Episodes stacked once on the device, with the smoother shared by every batch."""

    def __init__(self, episodes: list[Episode], smoother: Smoother, device: torch.device) -> None:
        self.episodes, self.smoother, self.device = episodes, smoother, device
        self.all = stack(episodes, device) if episodes else None
        self.two_stage: TactileNet | None = None
        self.tuned: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.episodes)

    def select(self, items: Sequence[int]) -> Batch:
        """The batch of episodes ``items``."""
        assert self.all is not None
        idx = torch.as_tensor(list(items), dtype=torch.long, device=self.device)
        a = self.all
        return Batch(a.obj[idx], a.probe[idx], a.touch[idx], a.images[idx], a.shape[idx])

    def targets(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every pair ``(t - k, t)`` of every episode: images ``(N, 2, H, W)``, relative-pose
        targets ``(N, 4)``, and whether both frames show contact ``(N,)``."""
        a, k = self.all, self.smoother.window
        assert a is not None
        z = relative(a.obj, a.probe, k).flatten(0, 1)
        both = (a.touch[:, :-k] & a.touch[:, k:]).flatten()
        return a.pairs(k), z, both

    def target_scale(self) -> Tensor:
        """``(3,)`` the spread (RMS) of the tangent targets of the contact pairs."""
        _, z, both = self.targets()
        xi = se2.log(z[both]) if bool(both.any()) else se2.log(z)
        return xi.pow(2).mean(0).sqrt().clamp_min(1e-4)


@dataclass
class Scores:
    """Sums over held-out episodes."""

    sq_trans: float = 0.0
    sq_rot: float = 0.0
    frames: float = 0.0
    loss_sum: float = 0.0
    episodes: float = 0.0

    def add(self, est: Tensor, truth: Tensor, loss: Tensor) -> None:
        dt, dr = pose_errors(est, truth)
        self.sq_trans += float(dt.pow(2).sum())
        self.sq_rot += float(dr.pow(2).sum())
        self.frames += dt.numel()
        self.loss_sum += float(loss.sum())
        self.episodes += est.shape[0]

    def metrics(self, suffix: str = "") -> dict[str, float]:
        n = max(self.frames, 1)
        return {f"trans_rmse_mm{suffix}": 1000 * math.sqrt(self.sq_trans / n),
                f"rot_rmse_deg{suffix}": math.degrees(math.sqrt(self.sq_rot / n)),
                f"loss{suffix}": self.loss_sum / max(self.episodes, 1)}


def network_measure(net: torch.nn.Module, window: int, scale: float = 1.0) -> Measure:
    def measure(b: Batch) -> tuple[Tensor, Tensor]:
        B = b.obj.shape[0]
        z, w = net(b.pairs(window))
        return z.view(B, -1, 4), scale * w.view(B, -1, 3)

    return measure


def oracle_measure(window: int, weight: float) -> Measure:
    def measure(b: Batch) -> tuple[Tensor, Tensor]:
        z = relative(b.obj, b.probe, window)
        return z, torch.full((*z.shape[:-1], 3), weight, dtype=z.dtype, device=z.device)

    return measure


@torch.no_grad()
def evaluate_with(cfg: Any, prep: Prepared, measure: Measure, items: Sequence[int] | None = None
                  ) -> tuple[Scores, list[dict[str, Tensor]]]:
    """Smooth ``items`` (default: all) in batches of ``problem.eval_batch`` with ``measure``."""
    items = list(range(len(prep))) if items is None else list(items)
    scores, outputs = Scores(), []
    p = cfg.problem
    for start in range(0, len(items), p.eval_batch):
        b = prep.select(items[start: start + p.eval_batch])
        z, w = measure(b)
        est = prep.smoother.solve(b, z, w)
        scores.add(est, b.obj, trajectory_loss(est, b.obj, p.loss_trans, p.loss_rot))
        for k in range(est.shape[0]):
            outputs.append({"est": est[k].cpu(),
                            "z": None if z is None else z[k].cpu(),
                            "w": None if w is None else w[k].cpu()})
    return scores, outputs


def _nll(net: TactileNet, pairs: Tensor, z: Tensor, both: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood of the targets under the net's prediction and
    per-axis weights, over contact pairs."""
    zp, w = net(pairs)
    e = se2.local(z, zp)
    nll = 0.5 * (w * e).pow(2).sum(-1) - torch.log(w).sum(-1)
    return (nll * both).sum() / both.sum().clamp_min(1)


def two_stage_net(cfg: Any, train: Prepared) -> TactileNet:
    """The network trained alone on the training pairs (seeded; computed once per ``train``)."""
    if train.two_stage is not None:
        return train.two_stage
    b = cfg.baseline
    pairs, z, both = train.targets()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 17)
        net = TactileNet(train.target_scale(), cfg.model.hidden, cfg.model.channels)
        net = net.to(train.device)
        opt = torch.optim.Adam(net.parameters(), lr=b.lr)
        n = pairs.shape[0]
        for _ in range(b.epochs):
            order = torch.randperm(n, device=pairs.device)
            for s in range(0, n, b.batch):
                i = order[s: s + b.batch]
                loss = _nll(net, pairs[i], z[i], both[i].double())
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            final = float(_nll(net, pairs, z, both.double()))
    log.info("two-stage network: %d epochs on %d pairs, training NLL %.3f", b.epochs, n, final)
    train.two_stage = net
    return net


def tune(cfg: Any, train: Prepared) -> dict[str, Any]:
    """The two-stage network's weight multiplier with the lowest translation RMSE on the first
    ``baseline.tune_episodes`` training episodes (computed once per ``train``)."""
    if train.tuned is not None:
        return train.tuned
    net, k = two_stage_net(cfg, train), train.smoother.window
    items = list(range(min(cfg.baseline.tune_episodes, len(train))))
    grid = {}
    for scale in cfg.baseline.weight_scales:
        s, _ = evaluate_with(cfg, train, network_measure(net, k, scale), items)
        grid[scale] = s.metrics()["trans_rmse_mm"]
    best = min(grid, key=grid.__getitem__)
    train.tuned = {"weight_scale": best, "tune_trans_rmse_mm": grid}
    return train.tuned


def baselines(run: Run) -> dict[str, Any]:
    """Two-stage (weight multiplier tuned on training episodes), motion-only and oracle scores
    on this rank's held-out episodes, reduced across ranks."""
    cfg, k = run.cfg, run.train.smoother.window
    net = two_stage_net(cfg, run.train)
    ref: dict[str, Any] = dict(tune(cfg, run.train))
    runs = {"_two_stage": network_measure(net, k, ref["weight_scale"]),
            "_motion_only": lambda b: (None, None),
            "_oracle": oracle_measure(k, cfg.baseline.oracle_weight)}
    for suffix, measure in runs.items():
        s, _ = evaluate_with(cfg, run.val, measure)
        ref.update(reduce_scores(s, run.dist).metrics(suffix))
    ref["trans_rmse_mm_baseline"] = ref["trans_rmse_mm_two_stage"]
    ref["rot_rmse_deg_baseline"] = ref["rot_rmse_deg_two_stage"]
    log.info("baselines: %s", {key: round(v, 3) for key, v in ref.items()
                               if isinstance(v, float)})
    return ref
