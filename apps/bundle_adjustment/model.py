"""The perception network: matcher features of each observation -> a weight in (0, 1), plus a
learnable robust-loss scale (pixels) shared by all observations."""

from __future__ import annotations

from apps.common import WeightNet


class ObservationWeightNet(WeightNet):
    """``features (O, F) -> (weights (O,), scale ())`` for ``O`` observations; see
    :class:`apps.common.WeightNet`. Every observation starts at weight ``sigmoid(bias)``."""

    def __init__(self, num_features: int, hidden: int = 32, layers: int = 2, scale: float = 2.0,
                 bias: float = 2.0) -> None:
        super().__init__(num_features, hidden, layers, scale, bias, zero_head=True)
