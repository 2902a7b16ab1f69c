"""Pictures of the homography app (matplotlib): held-out pairs aligned, and error CDFs.

``draw_pairs``: per pair, in the source patch's frame (with a margin around it), the source in red
and the target warped back by the estimate in cyan (aligned structure looks gray, misalignment
shows colored fringes), the source patch's outline (white), and where the target's corners land:
the truth (green) and the learned estimate (red, dashed). ``draw_cdf``: the fraction of held-out
pairs under each corner error, learned solver against the baselines, one panel per ``rho``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor

from apps.common import atomic_write
from apps.homography.data import Pair, corners
from core.costs.homography import corners_of, homography_matrix, params_from_matrix, warp

TRUE = "#2ca02c"
LEARNED = "#d62728"
COLORS = {"learned": LEARNED, "raw": "#1f77b4", "orb": "#ff7f0e", "identity": "#7f7f7f"}
LABELS = {"learned": "learned features + LM", "raw": "LM on raw intensities",
          "orb": "ORB + RANSAC", "identity": "identity"}


@dataclass
class PairView:
    """One held-out pair with the learned estimate ``h (8,)`` and the three errors (px)."""

    pair: Pair
    h: Tensor
    error: float
    raw_error: float
    orb_error: float
    degenerate: bool


def composite(pair: Pair, h: Tensor, pad: int) -> np.ndarray:
    """``(P + 2 pad, P + 2 pad, 3)`` RGB in the source frame: red = source, green and blue = the
    target mapped into the source frame by ``H(h)^-1`` (black where it has no data)."""
    P = pair.source.shape[-1]
    c = (P - 1) / 2
    side = P + 2 * pad
    ax = (torch.arange(side, dtype=torch.float64) - pad - c) / c
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    q = torch.stack([x, y], -1).reshape(1, -1, 2)
    inverse = params_from_matrix(torch.linalg.inv(homography_matrix(h.double())))
    p, w = warp(inverse[None], q)
    grid = (p * c + c) / (P - 1) * 2 - 1
    target = nnf.grid_sample(pair.target.double()[None, None], grid.reshape(1, side, side, 2),
                             align_corners=True, padding_mode="zeros")[0, 0]
    inside = ((grid.abs() <= 1).all(-1) & (w > 0)).reshape(side, side)
    target = torch.where(inside, target, torch.zeros_like(target))
    source = torch.zeros(side, side, dtype=torch.float64)
    source[pad : pad + P, pad : pad + P] = pair.source.double()
    return torch.stack([source, target, target], -1).clamp(0, 1).numpy()


def _quad(h: Tensor, P: int, pad: int) -> np.ndarray:
    """``(5, 2)`` the closed quadrilateral the target's corners map to, in canvas pixels."""
    c = (P - 1) / 2
    q = corners_of(h.double()[None], corners(torch.float64))[0] * c + c + pad
    return torch.cat([q, q[:1]]).numpy()


def draw_pairs(path: Path, views: Sequence[PairView], title: str = "", cols: int = 4) -> None:
    """A grid of held-out pairs; see the module docstring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(views) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.7 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, v in zip(axes.flat, views):
        P = v.pair.source.shape[-1]
        pad = int(np.ceil(v.pair.rho)) + 4
        ax.imshow(composite(v.pair, v.h, pad), interpolation="nearest")
        square = np.array([[0, 0], [P - 1, 0], [P - 1, P - 1], [0, P - 1], [0, 0]]) + pad
        ax.plot(square[:, 0], square[:, 1], color="white", lw=0.8)
        truth = _quad(v.pair.h, P, pad)
        est = _quad(v.h, P, pad)
        ax.plot(truth[:, 0], truth[:, 1], color=TRUE, lw=1.6)
        ax.plot(est[:, 0], est[:, 1], color=LEARNED, lw=1.4, ls="--")
        flag = " DEGENERATE" if v.degenerate else ""
        ax.set_title(f"{v.pair.image}: learned {v.error:.2f} px{flag}\nraw LM {v.raw_error:.2f}, "
                     f"ORB {v.orb_error:.2f} px", fontsize=8)
    handles = [plt.Line2D([], [], color=TRUE, lw=1.6, label="true quadrilateral"),
               plt.Line2D([], [], color=LEARNED, lw=1.4, ls="--", label="learned estimate"),
               plt.Line2D([], [], color="white", lw=0.8, label="source patch")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, facecolor="0.5")
    fig.suptitle(f"{title}\nred: source, cyan: target warped back by the estimate "
                 "(gray where they agree)", fontsize=9)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def draw_cdf(path: Path, errors: Mapping[str, Mapping[str, Sequence[float]]],
             rhos: tuple[float, float]) -> None:
    """Error CDFs: ``errors["rho"|"rho32"][method]`` per-pair corner errors (px)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5), layout="constrained")
    for ax, key, rho in zip(axes, ("rho", "rho32"), rhos):
        for method, values in errors[key].items():
            e = np.sort(np.asarray(values, dtype=float))
            frac = np.arange(1, len(e) + 1) / max(len(e), 1)
            label = f"{LABELS.get(method, method)} (mean {e.mean():.2f}, median {np.median(e):.2f})"
            ax.step(np.maximum(e, 1e-2), frac, where="post", color=COLORS.get(method),
                    lw=2 if method == "learned" else 1.2, label=label)
        ax.set_xscale("log")
        ax.set_xlim(1e-2, 100)
        ax.set_ylim(0, 1)
        ax.axvline(1.0, color="0.7", lw=0.8, ls=":")
        ax.axvline(3.0, color="0.7", lw=0.8, ls=":")
        ax.set_xlabel("mean corner error (px, log scale)")
        ax.set_ylabel("fraction of held-out pairs")
        ax.set_title(f"corner offsets up to rho = {rho:g} px ({len(e)} pairs)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
