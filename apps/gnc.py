"""Graduated non-convexity (GNC) with Geman-McClure, batched, on Ariadne's LM: the classical
outlier-robust baseline of the pose-graph and bundle-adjustment apps.

Yang, Antonante, Tzoumas, Carlone, "Graduated Non-Convexity for Robust Spatial Perception: From
Non-Minimal Solvers to Global Outlier Rejection", RA-L 2020: GNC-GM minimizes the surrogate
``rho_mu(s) = mu c^2 s / (mu c^2 + s)``, which is Geman-McClure with the scale ``c sqrt(mu)``;
``mu`` starts large (the surrogate is nearly quadratic, hence nearly convex) and shrinks
geometrically to 1 (the target loss), each stage warm-started from the previous solution. Here the
schedule is a sequence of robust-loss scales, one per batch element, so one LM solve per stage
runs every target scale of a grid at once; the start is a fixed scale ``start`` (in the problem's
whitened residual units) rather than the paper's ``2 max s / c^2`` (the apps' residuals are
bounded by construction, and a fixed start keeps the number of stages bounded).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: ``(scale (B,), values, max_iters) -> values``: one LM solve at robust-loss scale ``scale``
Solve = Callable[[Tensor, dict[str, Tensor], int], dict[str, Tensor]]


def gm_schedule(target: Tensor, start: float, factor: float) -> list[Tensor]:
    """The GNC-GM scales from ``start`` down to ``target (B,)``: stage ``k`` has
    ``max(start / factor^k, target)`` per element (``mu_k = (scale_k / c)^2``, divided by
    ``factor^2`` per stage); the last stage is ``target`` for every element.

    Args:
        target: ``(B,)`` the robust-loss scales ``c`` of the final stage (positive).
        start: the first stage's scale (an element whose target exceeds it starts at its target).
        factor: > 1, the ratio of consecutive scales.
    """
    if factor <= 1:
        raise ValueError(f"GNC factor must be > 1, got {factor}")
    if start <= 0 or not bool((target > 0).all()):
        raise ValueError(f"GNC scales must be positive, got start {start}, target {target}")
    stages = max(0, math.ceil(math.log(start / float(target.min())) / math.log(factor)))
    first = torch.full_like(target, float(start))
    return [torch.maximum(first / factor**k, target) for k in range(stages)] + [target]


def graduated(solve: Solve, values: dict[str, Tensor], target: Tensor, start: float,
              factor: float, stage_iters: int, final_iters: int) -> dict[str, Tensor]:
    """GNC-GM: ``solve`` at each scale of :func:`gm_schedule` (``stage_iters`` LM iterations per
    stage, ``final_iters`` at the target), warm-started; returns the final values (batch ``B``
    = ``target``'s length)."""
    schedule = gm_schedule(target, start, factor)
    for k, scale in enumerate(schedule):
        values = solve(scale, values, final_iters if k == len(schedule) - 1 else stage_iters)
    return values


#: ``values -> (B, L)``: the squared whitened residual of each robust item
SquaredResiduals = Callable[[dict[str, Tensor]], Tensor]


def tls_weights(s: Tensor, c2: Tensor, mu: Tensor) -> Tensor:
    """GNC-TLS weights (Yang et al. 2020, Proposition 6; GTSAM's ``GncOptimizer``): 1 for
    ``s <= mu / (mu + 1) c^2``, 0 for ``s >= (mu + 1) / mu c^2``, else
    ``sqrt(c^2 mu (mu + 1) / s) - mu``.

    Args:
        s: ``(B, L)`` squared whitened residuals.
        c2: ``(B, 1)`` the truncation thresholds ``c^2``.
        mu: ``(B, 1)`` the continuation parameter (small: nearly least squares; large: TLS).
    """
    lower, upper = mu / (mu + 1) * c2, (mu + 1) / mu * c2
    mid = torch.sqrt(c2 * mu * (mu + 1) / s.clamp_min(torch.finfo(s.dtype).tiny)) - mu
    one = torch.ones_like(s)
    return torch.where(s <= lower, one, torch.where(s >= upper, 0 * one, mid.clamp(0, 1)))


def graduated_tls(solve: Callable[[Tensor, dict[str, Tensor], int], dict[str, Tensor]],
                  squared: SquaredResiduals, values: dict[str, Tensor], target: Tensor,
                  step: float = 1.4, stages: int = 30, stage_iters: int = 5,
                  final_iters: int = 30) -> dict[str, Tensor]:
    """GNC with truncated least squares (Yang et al. 2020; GTSAM's ``GncLossType.TLS``):
    alternate a weighted least-squares solve (``stage_iters`` LM iterations, warm-started) and
    the closed-form weights :func:`tls_weights`, ``mu`` starting at ``c^2 / (2 max s - c^2)``
    (GTSAM's start; nearly least squares) and multiplied by ``step`` per stage, until every
    weight is 0 or 1 (or ``stages``); then ``final_iters`` iterations with the final weights.
    Batched: one batch element per truncation scale ``target (B,)`` (whitened residual norm).
    An element whose largest residual is within its threshold keeps unit weights."""
    if step <= 1 or stages < 1:
        raise ValueError(f"GNC-TLS: step must be > 1 and stages >= 1, got {step}, {stages}")
    if not bool((target > 0).all()):
        raise ValueError(f"GNC-TLS scales must be positive, got {target}")
    c2 = (target * target)[:, None]
    s = squared(values)
    excess = 2 * s.max(-1, keepdim=True).values - c2
    mu = torch.where(excess > 0, c2 / excess.clamp_min(torch.finfo(s.dtype).tiny), 1e12)
    weight = tls_weights(s, c2, mu)
    for _ in range(stages):
        values = solve(weight, values, stage_iters)
        mu = mu * step
        weight = tls_weights(squared(values), c2, mu)
        if bool(((weight == 0) | (weight == 1)).all()):
            break
    return solve(weight, values, final_iters)


@dataclass
class GncConfig:
    """The GNC baselines (``apps.gnc``; GTSAM's ``GncLMOptimizer`` where an app has it).

    Fields:
        ariadne: run the batched Ariadne GNC-GM (``*_gnc_ariadne`` metrics).
        gtsam: GTSAM ``GncLMOptimizer`` loss types to run (``tls``, ``gm``; empty: none; skipped
            with a logged note when gtsam is not installed).
        scales: target robust-loss scales ``c`` tried on the training data (whitened residual
            norm); GTSAM's inlier threshold is ``barcSq = c^2 / 2`` (its error is ``0.5 s``).
        start: the first stage's scale of the Ariadne schedule.
        factor: ratio of consecutive scales of the Ariadne schedule.
        stage_iters: LM iterations per stage before the last (which runs ``optimizer.max_iters``).
        tune_items: how many training items to tune the scales on.
    """

    ariadne: bool = True
    gtsam: list[str] = field(default_factory=lambda: ["tls", "gm"])
    scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    start: float = 64.0
    factor: float = 2.0
    stage_iters: int = 5
    tune_items: int = 8


def check_config(gnc: Any) -> None:
    """Raise ``ValueError`` for GNC settings the schema's types allow but GNC cannot use."""
    if not gnc.scales or min(gnc.scales) <= 0:
        raise ValueError(f"baseline.gnc.scales must be positive, got {list(gnc.scales)}")
    bad = [k for k in gnc.gtsam if k not in ("tls", "gm")]
    if bad:
        raise ValueError(f"baseline.gnc.gtsam: unknown loss types {bad}; use tls or gm")
    if gnc.factor <= 1 or gnc.start <= 0 or gnc.stage_iters < 1 or gnc.tune_items < 1:
        raise ValueError("baseline.gnc: factor must be > 1, start > 0, stage_iters and "
                         f"tune_items >= 1; got {gnc}")
