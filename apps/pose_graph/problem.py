"""The pose-graph objective: SE(3)/SE(2) between costs and a gauge prior on the first pose."""

from __future__ import annotations

import torch
from torch import Tensor

import core
from core.io import PoseGraph


def pose_graph_objective(
    graph: PoseGraph,
    prior_sqrt_info: float = 1e3,
    loss: core.RobustLoss | None = None,
    edge_weight: Tensor | None = None,
) -> tuple[core.Objective, dict[str, Tensor]]:
    """Objective and initial values (``{"poses": (1, N, S)}``) for a g2o pose graph.

    Residuals follow the Ceres/GTSAM convention (``../shared/data/README.md``): edge ``(i, j, Z)``
    gives ``U Log(Z^-1 T_i^-1 T_j)``, ``U`` the upper Cholesky factor of the tangent information;
    the gauge is fixed by a prior at the first pose's initial value with square-root information
    ``prior_sqrt_info * I``. ``edge_weight (B|1, E)`` optionally scales each edge's residual.
    """
    space = core.SE3 if graph.dim == 3 else core.SE2
    poses = core.Variable("poses", space, count=graph.num_poses)
    U = graph.sqrt_information()
    if edge_weight is not None:
        U = edge_weight[..., None, None] * U
    between = core.costs.Between(
        poses, graph.i, graph.j, graph.measurements, sqrt_info=U, loss=loss, name="between"
    )
    prior = core.costs.Prior(
        poses, graph.poses[0], index=0, sqrt_info=float(prior_sqrt_info), name="prior"
    )
    init = {"poses": graph.poses[None].clone()}
    return core.Objective([between, prior]), init


def to_dtype(graph: PoseGraph, dtype: torch.dtype) -> PoseGraph:
    """The graph with real tensors cast to ``dtype``."""
    return graph.to(dtype=dtype)
