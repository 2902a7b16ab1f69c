"""The perception network: a gray patch -> a pyramid of dense feature maps (one per solver level),
each L2-normalized per pixel. A small U-Net: an encoder of 3x3 convolutions with 2x2 average
pooling between scales (so a stride-``s`` feature sits at the centre of its ``s x s`` block, the
convention of ``apps.homography.problem``) and a decoder that upsamples bilinearly and mixes in
the encoder's map of the same scale."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn


def _block(c_in: int, c_out: int, convs: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(convs):
        layers += [nn.Conv2d(c_in if k == 0 else c_out, c_out, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def standardize(images: Tensor) -> Tensor:
    """``(B, 1, P, P)`` gray patches with zero mean and unit std each (brightness and contrast
    removed)."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    return (images - mean) / std


class FeatureNet(nn.Module):
    """``images (B, 1, P, P) -> [features (B, C, P / s, P / s) for s in strides]``.

    Args:
        strides: the pyramid's strides, coarse to fine (powers of two, e.g. ``(8, 4, 2)``).
        channels: feature channels per level.
        width: channels of the encoder's finest scale (doubling per scale, at most 64).
    """

    def __init__(self, strides: Sequence[int] = (8, 4, 2), channels: int = 8,
                 width: int = 8) -> None:
        super().__init__()
        if not strides or any(s < 1 or s & (s - 1) for s in strides):
            raise ValueError(f"strides must be powers of two, got {list(strides)}")
        self.strides = tuple(int(s) for s in strides)
        self.depth = max(self.strides).bit_length()  # scales 1, 2, ..., max stride
        widths = [min(width * 2**k, 64) for k in range(self.depth)]
        self.encoder = nn.ModuleList(
            [_block(1, widths[0], convs=1)]
            + [_block(widths[k - 1], widths[k]) for k in range(1, self.depth)])
        finest = int(min(self.strides)).bit_length() - 1
        self.decoder = nn.ModuleDict({
            str(k): _block(widths[k + 1] + widths[k], widths[k], convs=1)
            for k in range(finest, self.depth - 1)})
        self.heads = nn.ModuleDict({
            str(s): nn.Conv2d(widths[s.bit_length() - 1], channels, 1) for s in self.strides})
        self.channels = channels

    def forward(self, images: Tensor) -> list[Tensor]:
        if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
            raise ValueError(f"FeatureNet: images must be float (B, 1, P, P) gray patches, got "
                             f"{images.dtype} {tuple(images.shape)}")
        size = images.shape[-1]
        if images.shape[-2] != size or size % max(self.strides):
            raise ValueError(f"FeatureNet: patches must be square with a side divisible by "
                             f"{max(self.strides)}, got {tuple(images.shape[-2:])}")
        x, skips = standardize(images), []
        for k, block in enumerate(self.encoder):
            x = block(x if k == 0 else nnf.avg_pool2d(x, 2))
            skips.append(x)
        maps = {self.depth - 1: x}
        for k in range(self.depth - 2, -1, -1):
            if str(k) not in self.decoder:
                break
            up = nnf.interpolate(maps[k + 1], scale_factor=2, mode="bilinear",
                                 align_corners=False)
            maps[k] = self.decoder[str(k)](torch.cat([up, skips[k]], dim=1))
        out = []
        for s in self.strides:
            f = self.heads[str(s)](maps[s.bit_length() - 1])
            out.append(nnf.normalize(f, dim=1, eps=1e-6))
        return out
