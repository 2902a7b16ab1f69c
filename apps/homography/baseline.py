"""The unlearned references on the held-out pairs: identity (no motion), the same coarse-to-fine
LM on raw intensities (standardized gray levels average-pooled to the same strides, the same
iterations), and classical matching: ORB keypoints (scikit-image), cross-checked descriptor
matches and a RANSAC homography (``skimage.measure.ransac`` with ``ProjectiveTransform``). Where
ORB finds fewer than 4 matches or RANSAC finds no model, its estimate is the identity and the pair
counts as an ORB failure."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from apps import common
from apps.config import spec_from_config
from apps.homography.data import Pair, PairSpec, corners, homography_from_offsets, make_dataset
from apps.homography.problem import (
    Aligner,
    Pairs,
    Prepared,
    corner_error,
    intensity_pyramid,
    prepare,
    strides_of,
)

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


def gather(values: Tensor, run: Any) -> list[float]:
    """Every held-out pair's value (``values (len(run.mine),)`` on this rank), in order."""
    return common.gather_items(values, run.mine, len(run.val_samples), run.dist)


def large_pairs(run: Any) -> Prepared:
    """This rank's held-out pairs again (same photographs and crops) at ``eval_rho``."""
    cfg = run.cfg
    spec = replace(spec_from_config(PairSpec, cfg.data), rho=float(cfg.eval_rho))
    seeds = [run.val_seeds[k] for k in run.mine]
    samples = make_dataset(spec, seeds, [True] * len(seeds), run.cache)
    return prepare(cfg, samples, run.device)


def _references(run: Any, prepared: Prepared) -> dict[str, list[float]]:
    """Per-pair errors (all held-out pairs, in order) of the three baselines on ``prepared``
    and ORB's failures."""
    cfg, p = run.cfg, prepared.pairs
    raw = Aligner(cfg, cfg.data.patch, strides_of(cfg), 1, cfg.outside, cfg.max_side)
    raw_err, raw_bad = raw_lm(raw, p, strides_of(cfg), cfg.eval_batch,
                                 tuple(float(v) for v in cfg.baseline_shifts))
    orb_err, orb_fail = orb_errors(p.pairs, cfg.orb_keypoints)
    return {"raw": gather(raw_err, run), "raw_degenerate": gather(raw_bad.float(), run),
            "orb": gather(orb_err, run), "orb_failed": gather(orb_fail.float(), run),
            "identity": gather(identity_errors(p), run)}


def summary(errors: list[float], suffix: str) -> dict[str, float]:
    e = torch.tensor(errors, dtype=torch.float64)
    return {f"corner_err_px{suffix}": float(e.mean()),
            f"corner_err_px_median{suffix}": float(e.quantile(0.5)),
            f"frac_below_1px{suffix}": float((e < 1).double().mean()),
            f"frac_below_3px{suffix}": float((e < 3).double().mean())}


def references(run: Any) -> dict[str, Any]:
    """Identity, raw-intensity LM and ORB + RANSAC on the held-out pairs at ``data.rho`` and
    ``eval_rho``; per-pair errors kept for the pictures."""
    small, large = _references(run, run.val), _references(run, large_pairs(run))
    ref: dict[str, Any] = {"errors": small, "errors_rho32": large}
    ref.update(summary(small["raw"], "_baseline"))
    ref.update(summary(small["orb"], "_orb"))
    ref.update(summary(small["identity"], "_identity"))
    ref.update(summary(large["raw"], "_rho32_baseline"))
    ref.update(summary(large["orb"], "_rho32_orb"))
    ref.update(summary(large["identity"], "_rho32_identity"))
    for name, errs in (("", small), ("_rho32", large)):
        ref[f"orb_failures{name}"] = sum(errs["orb_failed"]) / max(len(errs["orb_failed"]), 1)
        ref[f"degenerate_frac{name}_baseline"] = (sum(errs["raw_degenerate"])
                                                  / max(len(errs["raw_degenerate"]), 1))
    log.info("baselines at rho %g: raw LM %.2f px (median %.2f), ORB %.2f, identity %.2f; at rho "
             "%g: raw LM %.2f, ORB %.2f", run.cfg.data.rho, ref["corner_err_px_baseline"],
             ref["corner_err_px_median_baseline"], ref["corner_err_px_orb"],
             ref["corner_err_px_identity"], run.cfg.eval_rho, ref["corner_err_px_rho32_baseline"],
             ref["corner_err_px_rho32_orb"])
    return ref


REF_KEYS = ("corner_err_px_baseline", "corner_err_px_median_baseline", "frac_below_1px_baseline",
            "frac_below_3px_baseline", "corner_err_px_orb", "corner_err_px_median_orb",
            "frac_below_1px_orb", "frac_below_3px_orb", "corner_err_px_identity",
            "corner_err_px_rho32_baseline", "corner_err_px_median_rho32_baseline",
            "corner_err_px_rho32_orb", "corner_err_px_median_rho32_orb",
            "corner_err_px_rho32_identity", "orb_failures", "orb_failures_rho32",
            "degenerate_frac_baseline", "degenerate_frac_rho32_baseline")
