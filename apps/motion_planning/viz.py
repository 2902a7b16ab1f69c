"""Pictures of plans (matplotlib): a grid of maps, each with its SDF shaded (obstacles dark,
the robot-radius contour dashed), start and goal, and any of the expert's, the initial and the
final trajectories."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from apps.motion_planning.spec import MapSpec

STYLES = {
    "expert": {"color": "tab:green", "lw": 2.0, "ls": "-"},
    "initial (learned)": {"color": "tab:orange", "lw": 1.2, "ls": "--"},
    "final (learned)": {"color": "tab:blue", "lw": 2.0, "ls": "-"},
    "initial (straight line)": {"color": "0.4", "lw": 1.0, "ls": ":"},
    "final (straight-line baseline)": {"color": "tab:red", "lw": 1.2, "ls": "-."},
}


@dataclass
class Panel:
    """One map's picture: its SDF ``(H, W)``, start and goal ``(2,)``, trajectories by label
    (``(N, 4)`` or ``(N, 2)``; labels from :data:`STYLES`) and a title."""

    sdf: Tensor
    start: Tensor
    goal: Tensor
    paths: dict[str, Tensor]
    title: str = ""


def draw_panels(path: Path, panels: Sequence[Panel], spec: MapSpec, title: str = "",
                cols: int = 3) -> None:
    """Write the panels as one PNG grid at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.4 * rows), squeeze=False)
    e = spec.extent
    for ax, panel in zip(axes.flat, panels):
        sdf = panel.sdf.double().cpu().numpy()
        ax.imshow(sdf, origin="lower", extent=(-e, e, -e, e), cmap="RdYlGn", vmin=-1.5,
                  vmax=2.5)
        ax.contourf(sdf, levels=[-1e9, 0], colors=["0.15"], extent=(-e, e, -e, e),
                    origin="lower")
        ax.contour(sdf, levels=[spec.robot_radius], colors=["0.3"], linewidths=0.6,
                   linestyles="dashed", extent=(-e, e, -e, e), origin="lower")
        for label, traj in panel.paths.items():
            p = traj[..., :2].double().cpu()
            ax.plot(p[:, 0], p[:, 1], label=label, **STYLES.get(label, {}))
        ax.plot(*panel.start.cpu().tolist(), "o", color="white", mec="black", ms=8)
        ax.plot(*panel.goal.cpu().tolist(), "*", color="gold", mec="black", ms=13)
        ax.set_xlim(-e, e)
        ax.set_ylim(-e, e)
        ax.set_aspect("equal")
        ax.set_title(panel.title, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=9,
               frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def as_panel(sdf: Tensor, start: Tensor, goal: Tensor, paths: dict[str, Tensor],
             title: str = "") -> Panel:
    """A :class:`Panel` with every tensor detached on the CPU."""
    return Panel(sdf.detach().cpu(), start.detach().cpu(), goal.detach().cpu(),
                 {k: torch.as_tensor(v).detach().cpu() for k, v in paths.items()}, title)
