"""Pictures of a held-out episode: a top view of the object outline along the trajectory
(estimated vs true) with the probe and the contact points, and a strip of tactile images with
the predicted and true relative poses."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from apps.tactile.data import Episode, outline
from apps.tactile.problem import relative
from core.lie import se2


def pick(run: Any, outputs: list[dict[str, torch.Tensor]]) -> int:
    """The episode to draw: ``viz_episode`` or the one of median translation error."""
    if run.cfg.viz_episode is not None and run.cfg.viz_episode in run.mine:
        return run.mine.index(run.cfg.viz_episode)
    errs = [float((o["est"][:, :2] - e.obj[:, :2]).norm(dim=-1).mean())
            for o, e in zip(outputs, run.val.episodes)]
    return sorted(range(len(errs)), key=errs.__getitem__)[len(errs) // 2]


def draw(run: Any, outputs: list[dict[str, torch.Tensor]]) -> None:
    """``tactile_topview.png`` and ``tactile_strip.png`` in the run folder."""
    if not outputs:
        return
    k = pick(run, outputs)
    e, out = run.val.episodes[k], outputs[k]
    topview(run.out / "tactile_topview.png", e, out["est"])
    strip(run.out / "tactile_strip.png", e, out["z"], run.cfg.problem.window)


def _polygon(e: Episode, pose: torch.Tensor) -> np.ndarray:
    pts = torch.as_tensor(outline(e.shape, e.size), dtype=torch.float64)
    world = se2.act(pose[None], pts).numpy()
    return np.vstack((world, world[:1]))


def topview(path: Any, e: Episode, est: torch.Tensor) -> None:
    """Object outlines every few frames (true solid, estimated dashed), the probe's path and
    circles, and the contact points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    frames = list(range(0, e.frames, max(1, e.frames // 5))) + [e.frames - 1]
    cmap = plt.get_cmap("viridis")
    for n, t in enumerate(sorted(set(frames))):
        color = cmap(n / max(len(frames) - 1, 1))
        tp, ep = _polygon(e, e.obj[t]), _polygon(e, est[t])
        ax.plot(tp[:, 0], tp[:, 1], "-", color=color, lw=1.5,
                label="true" if n == 0 else None)
        ax.plot(ep[:, 0], ep[:, 1], "--", color=color, lw=1.5,
                label="estimated" if n == 0 else None)
        circle = plt.Circle(e.probe[t, :2].tolist(), 0.01, fill=False, color=color)
        ax.add_patch(circle)
    ax.plot(e.probe[:, 0], e.probe[:, 1], "k.-", ms=3, lw=0.8, label="probe")
    c = e.point[e.contact]
    ax.plot(c[:, 0], c[:, 1], "rx", ms=4, label="contact points")
    ax.plot(e.obj[:, 0], e.obj[:, 1], "-", color="gray", lw=1, label="true centre")
    ax.plot(est[:, 0], est[:, 1], "--", color="m", lw=1, label="estimated centre")
    err = 1000 * float((est[:, :2] - e.obj[:, :2]).norm(dim=-1).pow(2).mean().sqrt())
    ax.set_title(f"{e.shape}, push {e.alpha:+.1f} deg from the normal: "
                 f"RMSE {err:.1f} mm (frames 0 to {e.frames - 1}: light = late)")
    ax.title.set_fontsize(9)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def strip(path: Any, e: Episode, z: torch.Tensor | None, window: int, num: int = 8) -> None:
    """Tactile images of ``num`` frames; above each, the true and predicted relative pose
    ``Q_t Q_(t-k)^-1`` in the probe frame (its log: mm, mm, deg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = se2.log(relative(e.obj, e.probe, window))
    pred = None if z is None else se2.log(z)
    frames = np.linspace(window, e.frames - 1, num).round().astype(int)
    fig, axes = plt.subplots(1, num, figsize=(1.6 * num, 2.6))
    for ax, t in zip(axes, frames):
        ax.imshow(e.image[t].numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        m = t - window

        def fmt(xi: torch.Tensor) -> str:
            return f"{1000 * xi[0]:+.1f},{1000 * xi[1]:+.1f},{np.degrees(float(xi[2])):+.1f}"

        text = f"t={t}\ntrue {fmt(truth[m])}"
        if pred is not None:
            used = bool(e.image[m].any()) and bool(e.image[t].any())
            text += f"\npred {fmt(pred[m])}" if used else "\npred unused (no contact)"
        ax.set_title(text, fontsize=6)
    fig.suptitle(f"tactile images ({e.shape}); relative object pose Q_t Q_(t-{window})^-1 in the "
                 "probe frame (Q = probe^-1 object), log: x mm, y mm, theta deg", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
