"""The perception network: loop-closure features -> a weight in (0, 1) per edge, plus a learnable
robust-loss scale shared by all loop closures."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class EdgeWeightNet(nn.Module):
    """``features (L, F) -> (weights (L,), scale ())``.

    Features are standardized with buffers ``mean``/``std`` (set once from the training set by
    :meth:`fit_normalization`), then an MLP with ``hidden`` units per layer gives a logit per edge;
    ``weight = sigmoid(logit)``. The robust-loss scale is ``exp(log_scale)`` (always > 0).

    Args:
        num_features: F.
        hidden: width of the hidden layers.
        layers: number of hidden layers.
        scale: initial robust-loss scale.
        bias: initial output bias (``sigmoid(bias)`` is the initial weight of an average edge).
    """

    def __init__(
        self, num_features: int, hidden: int = 32, layers: int = 2, scale: float = 4.0,
        bias: float = 2.0,
    ) -> None:
        super().__init__()
        if num_features < 1 or hidden < 1 or layers < 0 or not scale > 0:
            raise ValueError(f"EdgeWeightNet: bad sizes features={num_features}, hidden={hidden}, "
                             f"layers={layers} or scale={scale}")
        dims = [num_features] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.SiLU()]
        head = nn.Linear(dims[-1], 1)
        nn.init.zeros_(head.bias)
        head.bias.data.fill_(bias)
        self.mlp = nn.Sequential(*blocks, head)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    @torch.no_grad()
    def fit_normalization(self, features: Tensor) -> None:
        """Set the standardization from training features ``(L, F)``."""
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be (L, {self.mean.shape[0]}), got "
                             f"{tuple(features.shape)}")
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"EdgeWeightNet: features must be (L, {self.mean.shape[0]}), got "
                             f"{tuple(features.shape)}")
        x = (features - self.mean) / self.std
        logit = self.mlp(x.to(self.log_scale.dtype))[:, 0]
        return torch.sigmoid(logit), self.log_scale.exp()
