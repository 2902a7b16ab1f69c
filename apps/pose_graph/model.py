"""The perception network: loop-closure features -> a weight in (0, 1) per edge, plus a learnable
robust-loss scale shared by all loop closures."""

from __future__ import annotations

from apps.common import WeightNet


class EdgeWeightNet(WeightNet):
    """``features (L, F) -> (weights (L,), scale ())`` for ``L`` loop closures; see
    :class:`apps.common.WeightNet`. The MLP's head starts with random weights and bias ``bias``."""

    def __init__(self, num_features: int, hidden: int = 32, layers: int = 2, scale: float = 4.0,
                 bias: float = 2.0) -> None:
        super().__init__(num_features, hidden, layers, scale, bias, zero_head=False)
