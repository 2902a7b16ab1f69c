"""The unlearned references on the held-out pairs: identity (no motion), the same coarse-to-fine
LM on raw intensities (standardized gray levels average-pooled to the same strides, the same
iterations), and classical matching: ORB keypoints (scikit-image), cross-checked descriptor
matches and a RANSAC homography (``skimage.measure.ransac`` with ``ProjectiveTransform``). Where
ORB finds fewer than 4 matches or RANSAC finds no model, its estimate is the identity and the pair
counts as an ORB failure."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from torch import Tensor

from apps.homography.data import Pair, corners, homography_from_offsets
from apps.homography.problem import Aligner, Pairs, corner_error, intensity_pyramid

log = logging.getLogger(__name__)


@torch.no_grad()
def raw_lm(aligner: Aligner, pairs: Pairs, strides: tuple[int, ...], batch: int = 32,
           shifts: tuple[float, ...] = (0.0,)) -> tuple[Tensor, Tensor]:
    """``(N,)`` corner errors (px) of LM on raw intensities (the first level started from the
    translations ``shifts``, as the learned solver) and ``(N,)`` degenerate flags."""
    errors, flags = [], []
    for k in range(0, len(pairs.pairs), batch):
        src, tgt = pairs.source[k : k + batch], pairs.target[k : k + batch]
        result = aligner(intensity_pyramid(src, strides), intensity_pyramid(tgt, strides),
                         shifts=shifts)
        errors.append(corner_error(result.h, pairs.h[k : k + batch], aligner.patch))
        flags.append(result.degenerate)
    return torch.cat(errors).cpu(), torch.cat(flags).cpu()


def orb_offsets(pair: Pair, keypoints: int = 500, seed: int = 0) -> Tensor | None:
    """``(4, 2)`` corner offsets (px) estimated by ORB + RANSAC (target -> source), or None."""
    from skimage.feature import ORB, match_descriptors
    from skimage.measure import ransac
    from skimage.transform import ProjectiveTransform

    found = []
    for image in (pair.source, pair.target):
        orb = ORB(n_keypoints=keypoints, fast_threshold=0.05, downscale=1.2, n_scales=4)
        try:
            orb.detect_and_extract(image.double().numpy())
        except (RuntimeError, ValueError):  # no keypoints
            return None
        found.append((orb.keypoints[:, ::-1].copy(), orb.descriptors))  # (x, y) = (col, row)
    (ks, ds), (kt, dt) = found
    if len(ks) < 4 or len(kt) < 4:
        return None
    matches = match_descriptors(dt, ds, cross_check=True, max_ratio=0.9)
    if len(matches) < 4:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inliers = ransac((kt[matches[:, 0]], ks[matches[:, 1]]), ProjectiveTransform,
                                min_samples=4, residual_threshold=2.0, max_trials=2000,
                                rng=np.random.default_rng(seed))
    if model is None or inliers is None or inliers.sum() < 4:
        return None
    P = pair.source.shape[-1]
    px = (corners(torch.float64).numpy() + 1) * (P - 1) / 2
    moved = model(px)
    if not np.isfinite(moved).all():
        return None
    return torch.from_numpy(moved - px).float()


def orb_errors(pairs: list[Pair], keypoints: int = 500) -> tuple[Tensor, Tensor]:
    """``(N,)`` ORB + RANSAC corner errors (px; identity where it fails) and ``(N,)`` failures
    (``keypoints`` per patch)."""
    errors, failed = [], []
    for k, p in enumerate(pairs):
        offsets = orb_offsets(p, keypoints, seed=k)
        failed.append(offsets is None)
        est = torch.zeros(4, 2) if offsets is None else offsets
        P = p.source.shape[-1]
        h = homography_from_offsets(est[None], P).float()
        errors.append(corner_error(h, p.h[None], P)[0])
    return torch.stack(errors), torch.tensor(failed)


def identity_errors(pairs: Pairs) -> Tensor:
    """``(N,)`` corner errors of the identity (the true offsets' mean length)."""
    return corner_error(torch.zeros_like(pairs.h), pairs.h, pairs.source.shape[-1]).cpu()
