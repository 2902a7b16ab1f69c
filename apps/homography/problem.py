"""The solver: coarse-to-fine Levenberg-Marquardt on a feature pyramid, one
``core.costs.homography.HomographyAlignment`` layer per level, and the corner error.

Level ``l`` has stride ``s``: its feature maps are ``(B, C, P / s, P / s)``, feature pixel ``u``
sits at patch pixel ``s u + (s - 1) / 2`` (the centre of its block), so in normalized coordinates
``x = (s u + (s - 1) / 2 - c) / c`` (``c = (P - 1) / 2``) and a warped point ``x'`` is read at
source feature pixel ``(c x' + c - (s - 1) / 2) / s``. Every level solves the same 8 parameters
``h`` (target -> source, normalized coordinates), starting from the previous level's solution
(the first from the identity, or from a grid of translations keeping the lowest-cost result).
After each level, a degenerate homography (``det H <= 0``, a corner at or behind the line at
infinity, corners crossing: ``core.costs.homography.degenerate``) is not passed on: that pair
keeps its previous estimate, its ``Info.status`` is set to ``FAILED`` (``status_names``:
``"failed"``), and :class:`Alignment` carries the flag per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

import core
from apps.config import make_layer
from apps.homography.data import Pair, corners
from core.costs.homography import HomographyAlignment, corners_of, degenerate
from core.optimizer import FAILED, Info


@dataclass(frozen=True, eq=False)
class Level:
    """One pyramid level: stride, map side, the step between the target's points (in map
    pixels), the points ``(N, 2)`` and the layer."""

    stride: int
    side: int
    step: int
    points: Tensor
    layer: core.OptimizationLayer


@dataclass
class Alignment:
    """The solve of a batch of ``B`` pairs.

    Attributes:
        h: ``(B, 8)`` the final estimate (a degenerate level's result is never in it).
        levels: ``[(B, 8)]`` the estimate after each level (coarse to fine).
        infos: each level's ``Info`` (status ``FAILED`` where that level's result degenerated).
        degenerate: ``(B,)`` bool: some level's result was degenerate and was discarded.
    """

    h: Tensor
    levels: list[Tensor]
    infos: list[Info]
    degenerate: Tensor


def level_points(patch: int, stride: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(N, 2)`` normalized coordinates of the centres of a stride-``stride`` map's pixels."""
    side = patch // stride
    c = (patch - 1) / 2
    ax = (stride * torch.arange(side, dtype=dtype) + (stride - 1) / 2 - c) / c
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2)


class Aligner:
    """Coarse-to-fine LM over ``strides`` for feature maps of ``channels`` channels on patches of
    side ``patch``; the layers are built once (``cfg.optimizer``, ``cfg.solver``). The target is
    compared at every ``step``-th pixel of its map, ``step = ceil(side / max_side)`` (at most
    ``max_side`` points per side; the source is read at full resolution)."""

    def __init__(self, cfg: Any, patch: int, strides: Sequence[int], channels: int,
                 outside: float, max_side: int = 64, dtype: torch.dtype = torch.float32) -> None:
        self.patch, self.channels = patch, channels
        self.corners = corners(dtype)
        c = (patch - 1) / 2
        self.levels = []
        for s in strides:
            side = patch // s
            step = -(-side // max_side)
            points = level_points(patch, s, dtype).reshape(side, side, 2)[::step, ::step]
            n = points.shape[0]
            points = points.reshape(-1, 2)
            var = core.Variable("h", core.Vector(8))
            cost = HomographyAlignment(
                var, torch.zeros(1, channels, side, side, dtype=dtype),
                torch.zeros(1, n * n, channels, dtype=dtype), points, scale=c / s,
                offset=(c - (s - 1) / 2) / s, outside=outside, name="align")
            layer = make_layer(core.Objective([cost]), cfg)
            self.levels.append(Level(int(s), side, step, points, layer))

    def __call__(self, source: Sequence[Tensor], target: Sequence[Tensor],
                 h0: Tensor | None = None, shifts: Sequence[float] = (0.0,)) -> Alignment:
        """Align ``target[l]`` to ``source[l]`` (``(B, C, side_l, side_l)`` each, coarse to
        fine) from ``h0 (B, 8)`` (default identity). The first level starts from every
        translation ``(sx, sy)`` of ``shifts`` (pixels) added to ``h0`` and keeps, per pair, the
        non-degenerate solution of lowest cost (one batched solve of ``B len(shifts)^2``)."""
        if len(source) != len(self.levels) or len(target) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature maps per image (strides "
                             f"{[lv.stride for lv in self.levels]}), got {len(source)} and "
                             f"{len(target)}")
        B = source[0].shape[0]
        h = source[0].new_zeros(B, 8) if h0 is None else h0
        bad = torch.zeros(B, dtype=torch.bool, device=h.device)
        estimates, infos = [], []
        for k, (level, fs, ft) in enumerate(zip(self.levels, source, target)):
            want = (B, self.channels, level.side, level.side)
            for name, f in (("source", fs), ("target", ft)):
                if tuple(f.shape) != want:
                    raise ValueError(f"{name} features at stride {level.stride} must be {want}, "
                                     f"got {tuple(f.shape)}")
            starts = self._starts(shifts if k == 0 else (0.0,), h)
            new, info, flag = self._solve(level, fs, ft, h, starts)
            h = torch.where(flag[:, None], h, new)
            infos.append(replace(info, status=torch.where(flag, FAILED, info.status)))
            bad = bad | flag
            estimates.append(h)
        return Alignment(h, estimates, infos, bad)

    def _starts(self, shifts: Sequence[float], like: Tensor) -> Tensor:
        """``(K, 8)`` parameter offsets: the translations ``shifts x shifts`` (pixels)."""
        c = (self.patch - 1) / 2
        t = torch.tensor([float(v) / c for v in shifts], dtype=like.dtype, device=like.device)
        tx, ty = torch.meshgrid(t, t, indexing="ij")
        out = like.new_zeros(tx.numel(), 8)
        out[:, 2], out[:, 5] = tx.reshape(-1), ty.reshape(-1)
        return out

    def _solve(self, level: Level, fs: Tensor, ft: Tensor, h: Tensor, starts: Tensor
               ) -> tuple[Tensor, Info, Tensor]:
        """One level from ``h + starts[k]`` for each of the ``K`` starts: the best non-degenerate
        solution ``(B, 8)`` per pair, its ``Info`` and ``(B,)`` whether all were degenerate."""
        B, K = h.shape[0], starts.shape[0]
        init = (h[:, None] + starts[None]).reshape(B * K, 1, 8)
        sample = ft[..., :: level.step, :: level.step].flatten(2).mT
        if K > 1:
            fs, sample = fs.repeat_interleave(K, 0), sample.repeat_interleave(K, 0)
        sol, info = level.layer({"h": init, "align.source": fs, "align.target": sample})
        new = sol["h"][:, 0]
        flag = degenerate(new.detach(), self.corners.to(new))
        if K == 1:
            return new, info, flag
        cost = torch.where(flag, torch.inf, info.cost_history[-1]).reshape(B, K)
        pick = torch.arange(B, device=h.device) * K + cost.argmin(1)
        return new[pick], _select(info, pick), flag[pick]


def _select(info: Info, index: Tensor) -> Info:
    """The ``Info`` of batch elements ``index``."""
    take = lambda t: None if t is None else t[index]  # noqa: E731
    return Info(info.status[index], info.iterations[index], info.cost_history[:, index],
                info.damping[index], info.time_s,
                {k: v[index] for k, v in info.best_values.items()}, take(info.solver_failures))


def corner_error(h: Tensor, truth: Tensor, patch: int) -> Tensor:
    """``(B,)`` mean distance in pixels between the corners ``H(h)`` and ``H(truth)`` map the
    patch's corners to (``h, truth (B, 8)``); DeTone et al.'s mean corner error."""
    c = (patch - 1) / 2
    q = corners(h.dtype).to(h.device)
    diff = corners_of(h, q) - corners_of(truth.to(h), q)
    return c * diff.norm(dim=-1).mean(-1)


def intensity_pyramid(images: Tensor, strides: Sequence[int]) -> list[Tensor]:
    """The raw-intensity "features": each patch ``(B, 1, P, P)`` standardized (zero mean, unit
    std) and average-pooled to every stride (``(B, 1, P / s, P / s)``)."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    x = (images - mean) / std
    return [x if s == 1 else nnf.avg_pool2d(x, s) for s in strides]


@dataclass
class Pairs:
    """Pairs on the device, stacked: ``source, target (N, 1, P, P)``, ``h (N, 8)``."""

    pairs: list[Pair]
    source: Tensor
    target: Tensor
    h: Tensor

    @classmethod
    def stack(cls, pairs: Sequence[Pair], device: torch.device) -> Pairs:
        if not pairs:
            return cls([], torch.zeros(0, 1, 1, 1, device=device),
                       torch.zeros(0, 1, 1, 1, device=device), torch.zeros(0, 8, device=device))
        return cls(list(pairs), torch.stack([p.source for p in pairs])[:, None].to(device),
                   torch.stack([p.target for p in pairs])[:, None].to(device),
                   torch.stack([p.h for p in pairs]).to(device))


def strides_of(cfg: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in cfg.strides)


def shifts_of(cfg: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in cfg.start_shifts)


@dataclass
class Prepared:
    """Pairs on the device and the solver built for them."""

    pairs: Pairs
    aligner: Aligner


def prepare(cfg: Any, samples: Sequence[Pair], device: torch.device) -> Prepared:
    return Prepared(Pairs.stack(samples, device),
                    Aligner(cfg, cfg.data.patch, strides_of(cfg), cfg.model.channels,
                            cfg.outside, cfg.max_side))


@dataclass
class Scores:
    """Sums over held-out pairs (summed across ranks), turned into metrics by :meth:`metrics`."""

    pairs: float = 0.0
    error: float = 0.0
    below_1px: float = 0.0
    below_3px: float = 0.0
    degenerate: float = 0.0

    def add(self, errors: torch.Tensor, degenerate: torch.Tensor) -> None:
        self.pairs += errors.numel()
        self.error += float(errors.sum())
        self.below_1px += float((errors < 1).sum())
        self.below_3px += float((errors < 3).sum())
        self.degenerate += float(degenerate.sum())

    def metrics(self, suffix: str = "") -> dict[str, float]:
        n = max(self.pairs, 1.0)
        return {f"corner_err_px{suffix}": self.error / n,
                f"frac_below_1px{suffix}": self.below_1px / n,
                f"frac_below_3px{suffix}": self.below_3px / n,
                f"degenerate_frac{suffix}": self.degenerate / n}
