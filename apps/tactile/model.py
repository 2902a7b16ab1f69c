"""The tactile measurement network: a small CNN on a pair of tactile images (frames ``t - k`` and
``t``) predicting the relative object pose in the probe frame, ``z = Q_t Q_(t-k)^-1`` with
``Q = probe^-1 obj`` (SE(2); the identity while the object sticks to the probe), and a per-axis
weight (its confidence: a square-root information, ``(x, y, theta)``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.lie import se2


class TactileNet(nn.Module):
    """``(N, 2, H, W)`` image pairs (uint8 scaled to [0, 1]) -> ``z (N, 4)`` SE(2) and
    ``w (N, 3)`` positive weights.

    The tangent of ``z`` is ``scale * out[:3]`` and ``w = weight_scale * exp(out[3:])``, with
    ``scale`` and ``weight_scale (3,)`` fitted to the training targets (their spread), so the
    raw outputs start near unit size.
    """

    def __init__(self, scale: Tensor, hidden: int = 64, channels: int = 16) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(32 * c, hidden), nn.ReLU(), nn.Linear(hidden, 6))
        nn.init.zeros_(self.features[-1].weight)
        nn.init.zeros_(self.features[-1].bias)
        self.register_buffer("scale", scale.float().clamp_min(1e-6))

    def forward(self, pairs: Tensor) -> tuple[Tensor, Tensor]:
        """``pairs (N, 2, H, W)`` float in [0, 1] -> ``z (N, 4)``, ``w (N, 3)``. The network
        also sees the difference of the two images (amplified 4x) as a third channel: without
        it, it regressed the relative rotation on training pairs but not on held-out ones."""
        x = torch.cat((pairs, 4 * (pairs[:, 1:] - pairs[:, :1])), 1)
        out = self.features(x).double()
        scale = self.scale.double()
        z = se2.exp(out[:, :3] * scale)
        w = torch.exp(out[:, 3:].clamp(-8, 8)) / scale
        return z, w
