"""Train a CNN feature extractor end to end through a feature-metric LM homography solver.

``python -m apps.homography [overrides]`` (Hydra, ``conf/homography.yaml``; ``preset=smoke`` for a
run of seconds); the loop, checkpoints and metrics files are ``apps.harness.fit``'s. Per step, for
a batch of pairs (``apps.homography.data``): the network (``apps.homography.model.FeatureNet``)
maps source and target patches to a feature pyramid; the solver
(``apps.homography.problem.Aligner``) runs LM coarse to fine on the dense feature-metric residual
(``core.costs.homography``), the first level from a grid of translations (``start_shifts``,
keeping the lowest-cost start per pair); the loss is the mean corner error (px) after
each level, capped at ``loss_cap`` (a diverged pair gives no gradient), summed over levels and
back-propagated through the solves (``optimizer.backward``).

Evaluation on pairs from held-out photographs at ``data.rho`` and at ``eval_rho``: mean and
median corner error, the fraction under 1 px and 3 px; baselines on the same pairs
(``apps.homography.baseline``): identity, the same LM on raw intensities (same pyramid and
iterations; started from ``baseline_shifts``, the identity: its best setting), ORB + RANSAC. A
degenerate homography is never an estimate (``problem`` module); ``degenerate_frac`` counts them.

Outputs in the run folder: ``metrics.json``, ``metrics.csv``, ``checkpoint.pt``, ``curves.png``,
``homography_pairs.png`` (held-out overlays with true and estimated quadrilaterals) and
``homography_cdf.png`` (error CDFs of the learned solver and the baselines).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apps import common
from apps.config import TrainConfig, register, spec_from_config
from apps.harness import Run, Task, fit, main_for
from apps.homography import baseline as hb
from apps.homography.data import Pair, PairSpec, make_dataset
from apps.homography.model import FeatureNet
from apps.homography.problem import (
    Prepared,
    Scores,
    corner_error,
    prepare,
    shifts_of,
    strides_of,
)

APP = "homography"
log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """The feature network (``apps.homography.model.FeatureNet``).

    Fields:
        channels: feature channels per level.
        width: channels of the encoder's finest scale (doubling per scale, at most 64).
    """

    channels: int = 8
    width: int = 8


@dataclass
class HomographyConfig(TrainConfig):
    """``conf/homography.yaml``'s schema: the common training fields plus

    Fields:
        data: the pair generator's settings (``apps.homography.data.PairSpec``).
        model: see :class:`ModelConfig`.
        strides: the solver's pyramid, coarse to fine (powers of two dividing the patch); the
            raw-intensity baseline uses the same levels and iterations.
        start_shifts: the first level starts from every translation ``(sx, sy)`` of these
            (pixels) and keeps the lowest-cost solution (``[0.0]``: from the identity only).
        baseline_shifts: the same for the raw-intensity baseline (its best measured setting is
            the identity alone: with raw intensities the lowest-cost start is often a wrong one).
        max_side: the target is compared at most ``max_side`` points per side at each level
            (every k-th pixel of a larger map; the source is still read at full resolution).
        outside: residual norm of a point warped off the source map (learned features have unit
            norm; raw intensities unit std).
        loss_cap: per-level corner errors (px) are capped at this in the loss.
        loss_stride_power: level ``l``'s capped error is weighted by ``stride_l ** -power``
            (0: all levels alike; > 0 puts the weight on the fine levels' precision).
        eval_rho: the second held-out corner-offset range (the ``*_rho32`` metrics).
        eval_batch: pairs per solve in evaluation.
        orb_keypoints: ORB keypoints per patch for the ORB + RANSAC baseline.
        viz_pairs: held-out pairs drawn in ``homography_pairs.png``.
    """

    epochs: int = 5
    batch_size: int = 8
    num_train: int = 256
    num_val: int = 64
    lr: float = 1e-3
    data: PairSpec = field(default_factory=PairSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    strides: list[int] = field(default_factory=lambda: [16, 8, 4, 2, 1])
    start_shifts: list[float] = field(default_factory=lambda: [-16.0, 0.0, 16.0])
    baseline_shifts: list[float] = field(default_factory=lambda: [0.0])
    max_side: int = 64
    outside: float = 1.0
    loss_cap: float = 24.0
    loss_stride_power: float = 0.5
    eval_rho: float = 32.0
    eval_batch: int = 32
    orb_keypoints: int = 500
    viz_pairs: int = 8


register(APP, HomographyConfig)


def check(cfg: Any) -> None:
    """The app's own config checks (the generator's run in :func:`spec_from_config`)."""
    spec = spec_from_config(PairSpec, cfg.data)
    strides = strides_of(cfg)
    if not strides or any(s < 1 or s & (s - 1) or spec.patch % s or spec.patch // s < 2
                          for s in strides):
        raise ValueError(f"strides must be powers of two dividing data.patch = {spec.patch} "
                         f"into maps of at least 2x2, got {list(strides)}")
    if list(strides) != sorted(strides, reverse=True):
        raise ValueError(f"strides must go coarse to fine (decreasing), got {list(strides)}")
    if not 0 <= cfg.eval_rho <= spec.margin:
        raise ValueError(f"eval_rho = {cfg.eval_rho} must be in [0, data.margin = "
                         f"{spec.margin}]")
    for name in ("start_shifts", "baseline_shifts"):
        if not cfg[name]:
            raise ValueError(f"{name} must not be empty ([0.0]: start from the identity only)")
    for name in ("outside", "loss_cap"):
        if not cfg[name] > 0:
            raise ValueError(f"{name} must be > 0, got {cfg[name]}")
    for name in ("eval_batch", "orb_keypoints", "max_side"):
        if cfg[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {cfg[name]}")


def dataset(cfg: Any, seeds: Sequence[int], cache: Path | None, held_out: bool
            ) -> list[Pair]:
    """Pairs of the training photographs, or of the held-out ones (``held_out``)."""
    spec = spec_from_config(PairSpec, cfg.data)
    return make_dataset(spec, seeds, [held_out] * len(seeds), cache)


def model(cfg: Any, train: Prepared) -> FeatureNet:
    net = FeatureNet(strides_of(cfg), cfg.model.channels, cfg.model.width)
    return net.to(train.pairs.source.device)


def features(net: torch.nn.Module, source: torch.Tensor, target: torch.Tensor
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One network call on source and target patches ``(B, 1, P, P)``: their pyramids."""
    b = source.shape[0]
    maps = net(torch.cat([source, target]))
    return [f[:b] for f in maps], [f[b:] for f in maps]


def loss(cfg: Any, net: torch.nn.Module, prepared: Prepared, batch: Sequence[int]
         ) -> list[torch.Tensor]:
    """Per pair of ``batch``: the sum over levels of the corner error (px) capped at
    ``loss_cap``, weighted by ``stride ** -loss_stride_power``."""
    p = prepared.pairs
    index = torch.as_tensor(list(batch), dtype=torch.long, device=p.source.device)
    fs, ft = features(net, p.source[index], p.target[index])
    if not batch:
        return []
    result = prepared.aligner(fs, ft, shifts=shifts_of(cfg))
    truth = p.h[index]
    weights = [float(s) ** -cfg.loss_stride_power for s in strides_of(cfg)]
    total = sum(w * corner_error(h, truth, cfg.data.patch).clamp(max=cfg.loss_cap)
                for h, w in zip(result.levels, weights))
    return list(total)  # type: ignore[arg-type]


@torch.no_grad()
def solve_all(cfg: Any, net: torch.nn.Module, prepared: Prepared
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The learned solver on every pair of ``prepared``: ``h (N, 8)``, corner errors ``(N,)``
    and degenerate flags ``(N,)`` (on the CPU)."""
    p, hs, errors, flags = prepared.pairs, [], [], []
    for k in range(0, len(p.pairs), cfg.eval_batch):
        fs, ft = features(net, p.source[k : k + cfg.eval_batch], p.target[k : k + cfg.eval_batch])
        result = prepared.aligner(fs, ft, shifts=shifts_of(cfg))
        hs.append(result.h.cpu())
        errors.append(corner_error(result.h, p.h[k : k + cfg.eval_batch], cfg.data.patch).cpu())
        flags.append(result.degenerate.cpu())
    if not hs:
        return torch.zeros(0, 8), torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return torch.cat(hs), torch.cat(errors), torch.cat(flags)


def evaluate(cfg: Any, net: torch.nn.Module, prepared: Prepared
             ) -> tuple[Scores, list[tuple[torch.Tensor, float, bool]]]:
    """Scores of the learned solver; outputs: each pair's ``(h (8,), error px, degenerate)``."""
    was = net.training
    net.eval()
    h, errors, flags = solve_all(cfg, net, prepared)
    net.train(was)
    scores = Scores()
    scores.add(errors, flags)
    return scores, [(h[k], float(errors[k]), bool(flags[k])) for k in range(len(errors))]


def report(run: Run, metrics: dict[str, float], outputs: list[Any], net: torch.nn.Module
           ) -> tuple[dict[str, float], dict[str, Any]]:
    """The ``val`` metrics: the learned solver at ``data.rho`` and ``eval_rho`` next to the
    baselines. Per-pair errors go to ``metrics.json``'s ``errors`` (and to the CDF picture)."""
    ref = run.reference
    errors = hb.gather(torch.tensor([e for _, e, _ in outputs]), run)
    scores, large_out = evaluate(run.cfg, net, hb.large_pairs(run))
    large = hb.gather(torch.tensor([e for _, e, _ in large_out]), run)
    (deg_large,) = common.all_reduce_sum([scores.degenerate], run.dist)
    val = {**hb.summary(errors, ""), **hb.summary(large, "_rho32"),
           "degenerate_frac": metrics["degenerate_frac"],
           "degenerate_frac_rho32": deg_large / max(len(large), 1),
           **{k: ref[k] for k in hb.REF_KEYS}}
    val["corner_err_px"] = metrics["corner_err_px"]
    val["median_ratio"] = val["corner_err_px_median"] / max(
        val["corner_err_px_median_baseline"], 1e-12)
    curves = {"learned": errors, **{k: ref["errors"][k] for k in ("raw", "orb", "identity")}}
    curves32 = {"learned": large, **{k: ref["errors_rho32"][k] for k in ("raw", "orb",
                                                                          "identity")}}
    run.reference["cdf"] = {"rho": curves, "rho32": curves32}  # for the pictures
    return val, {"errors": {"rho": curves, "eval_rho": curves32}}


def pictures(run: Run, outputs: list[Any], net: torch.nn.Module) -> None:
    """``homography_pairs.png`` and ``homography_cdf.png`` (``apps.homography.viz``)."""
    from apps.homography import viz

    cfg, ref = run.cfg, run.reference
    count = min(cfg.viz_pairs, len(outputs))
    items = []
    for j in range(count):
        k = run.mine[j]
        h, err, bad = outputs[j]
        items.append(viz.PairView(run.val.pairs.pairs[j], h, err, ref["errors"]["raw"][k],
                                  ref["errors"]["orb"][k], bad))
    if items:
        viz.draw_pairs(run.out / "homography_pairs.png", items,
                       title=f"held-out pairs (rho = {cfg.data.rho:g} px)")
    viz.draw_cdf(run.out / "homography_cdf.png", ref["cdf"],
                 (float(cfg.data.rho), float(cfg.eval_rho)))


TASK = Task(
    name=APP, metric="corner_err_px",
    title="homography: CNN features learned through a feature-metric LM solver",
    schema=HomographyConfig, dataset=dataset, prepare=prepare, model=model, loss=loss,
    evaluate=evaluate, baseline=hb.references, report=report, pictures=pictures, check=check,
    curves=(("train_loss",), ("val_corner_err_px",), ("val_frac_below_1px", "val_frac_below_3px")),
    curve_lines=lambda ref: [
        ("val_corner_err_px", "LM on raw intensities", ref["corner_err_px_baseline"]),
        ("val_corner_err_px", "ORB + RANSAC", ref["corner_err_px_orb"]),
        ("val_frac_below_1px", "raw LM < 1 px", ref["frac_below_1px_baseline"]),
        ("val_frac_below_3px", "raw LM < 3 px", ref["frac_below_3px_baseline"])],
    keys=("corner_err_px", "corner_err_px_median", "corner_err_px_baseline",
          "corner_err_px_median_baseline", "corner_err_px_orb", "corner_err_px_identity",
          "frac_below_1px", "frac_below_3px", "corner_err_px_rho32", "corner_err_px_rho32_orb"),
)
main = main_for(TASK)


def run(cfg: Any) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says (``apps.harness.fit``)."""
    return fit(TASK, cfg)
