"""The pose-graph objective: SE(3)/SE(2) between costs and a gauge prior on the first pose.

Two forms:

* :func:`pose_graph_objective`: every edge in one ``"between"`` cost (the solve CLI's form);
* :class:`GraphProblem`: odometry edges in an ``"odometry"`` cost, loop closures in a ``"loop"``
  cost with a robust loss whose scale and per-edge weights come from the layer's inputs
  (``"loop.sqrt_info"`` = ``w_e U_e``, ``"loop.loss_scale"``), built once per graph and reused.

Errors against ground truth (:func:`ate`, :func:`rpe`, :func:`pose_error`) anchor the estimate's
first pose on the truth's first pose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import core
from apps.config import make_layer
from apps.pose_graph.data import Sample
from core.io import PoseGraph

LossKind = str  # "huber" | "cauchy" | "welsch" | "geman_mcclure" (core.loss.LossKind)


def space_of(graph: PoseGraph) -> core.LieGroup:
    """SE3 for 3D graphs, SE2 for 2D ones."""
    return core.SE3 if graph.dim == 3 else core.SE2


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
    poses = core.Variable("poses", space_of(graph), count=graph.num_poses)
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


@dataclass(frozen=True, eq=False)
class GraphProblem:
    """One graph's objective with the loop closures separated, built once.

    Attributes:
        graph: the pose graph (its poses are the initial estimate).
        is_loop: ``(E,)`` bool, the loop closures (all other edges are trusted odometry).
        objective: costs ``"odometry"`` (no robust loss), ``"loop"`` (robust loss of kind
            ``loss``) and ``"prior"`` (the gauge).
        loop_sqrt_info: ``(1, L, D, D)`` the loop closures' unweighted ``U``.
    """

    graph: PoseGraph
    is_loop: Tensor
    objective: core.Objective
    loop_sqrt_info: Tensor
    loss: LossKind

    @classmethod
    def build(cls, graph: PoseGraph, is_loop: Tensor, loss: LossKind = "cauchy",
              prior_sqrt_info: float = 1e3) -> GraphProblem:
        if is_loop.shape != (graph.num_edges,) or is_loop.dtype != torch.bool:
            raise ValueError(f"is_loop must be a bool tensor of shape ({graph.num_edges},), got "
                             f"{is_loop.dtype} {tuple(is_loop.shape)}")
        if not bool(is_loop.any()) or bool(is_loop.all()):
            raise ValueError("GraphProblem needs both odometry edges and loop closures")
        poses = core.Variable("poses", space_of(graph), count=graph.num_poses)
        U = graph.sqrt_information()
        odo = ~is_loop
        odometry = core.costs.Between(poses, graph.i[odo], graph.j[odo], graph.measurements[odo],
                                      sqrt_info=U[odo], name="odometry")
        loop_U = U[is_loop][None]
        loop = core.costs.Between(poses, graph.i[is_loop], graph.j[is_loop],
                                  graph.measurements[is_loop], sqrt_info=loop_U,
                                  loss=core.RobustLoss(loss, 1.0), name="loop")  # type: ignore[arg-type]
        prior = core.costs.Prior(poses, graph.poses[0], index=0, sqrt_info=float(prior_sqrt_info),
                                 name="prior")
        objective = core.Objective([odometry, loop, prior])
        return cls(graph, is_loop, objective, loop_U, loss)

    @property
    def num_loops(self) -> int:
        return int(self.loop_sqrt_info.shape[1])

    def inputs(self, weight: Tensor, scale: Tensor | float, batch: int = 1,
               init: Tensor | None = None) -> dict[str, Tensor]:
        """Layer inputs: initial poses ``(B, N, S)`` (``init (N, S)``, default the graph's
        initial estimate), ``"loop.sqrt_info"`` = ``weight (B|1, L)`` times ``U``,
        ``"loop.loss_scale"`` = ``scale`` (``()`` or ``(B,)``)."""
        if weight.ndim == 1:
            weight = weight[None]
        if weight.shape[-1] != self.num_loops or weight.ndim != 2:
            raise ValueError(f"loop weights must be (B|1, {self.num_loops}), got "
                             f"{tuple(weight.shape)}")
        start = self.graph.poses if init is None else init
        if start.shape != self.graph.poses.shape:
            raise ValueError(f"init must have shape {tuple(self.graph.poses.shape)}, got "
                             f"{tuple(start.shape)}")
        poses = start[None].expand(max(batch, weight.shape[0]), -1, -1)
        scale = torch.as_tensor(scale, dtype=poses.dtype)
        U = weight[..., None, None] * self.loop_sqrt_info
        return {"poses": poses.clone(), "loop.sqrt_info": U, "loop.loss_scale": scale}

    def squared(self, poses: Tensor) -> Tensor:
        """``(B, L)`` the squared whitened residual ``||U r||^2`` of each loop closure at
        ``poses (B, N, S)`` (unit loop weights)."""
        cost = next(c for c in self.objective.costs if c.name == "loop")
        space = space_of(self.graph)
        i, j = cost.index
        r = space.local(cost.aux["measured"],
                        space.compose(space.inverse(poses[:, i]), poses[:, j]))
        return ((self.loop_sqrt_info @ r[..., None])[..., 0] ** 2).sum(-1)

    def irls_weight(self, poses: Tensor, scale: Tensor | float) -> Tensor:
        """``(B, L)`` the robust loss's weight ``rho'(s)`` of each loop closure at ``poses``
        (unit loop weights): what the robust loss alone keeps of each edge."""
        s = self.squared(poses)
        scale = torch.as_tensor(scale, dtype=poses.dtype)
        return core.RobustLoss(self.loss, scale)(s)[1]  # type: ignore[arg-type]


@dataclass
class Graphs:
    """Samples on the device with their problems and layers (built once, reused every epoch),
    and what the learned layer starts from: each graph's initial poses ``starts[k] (N, S)`` and
    its loop closures' features ``features[k] (L, F)`` (the sample's own, or recomputed against
    a warm start: ``apps.pose_graph.baseline.warm_start``)."""

    samples: list[Sample]
    problems: list[GraphProblem]
    layers: list[core.OptimizationLayer]
    starts: list[Tensor]
    features: list[Tensor]


def build_graphs(samples: Sequence[Sample], loss: LossKind, cfg: Any, device: torch.device
                 ) -> Graphs:
    """Each sample on ``device``, its :class:`GraphProblem` with robust loss ``loss`` and its
    layer as ``cfg.optimizer`` and ``cfg.solver`` say."""
    moved, problems, layers = [], [], []
    for s in samples:
        s = Sample(s.graph.to(device), s.truth.to(device), s.is_loop.to(device),
                   s.is_outlier.to(device), s.features.to(device), s.kind)
        p = GraphProblem.build(s.graph, s.is_loop, loss, cfg.prior_sqrt_info)
        moved.append(s)
        problems.append(p)
        layers.append(make_layer(p.objective, cfg))
    return Graphs(moved, problems, layers, [s.graph.poses for s in moved],
                  [s.features for s in moved])


# ------------------------------------------------------------------------------------------
# errors against ground truth
# ------------------------------------------------------------------------------------------


def _translation_dim(space: core.LieGroup) -> int:
    return 3 if space == core.SE3 else 2


def anchor(est: Tensor, truth: Tensor, space: core.LieGroup) -> Tensor:
    """``est (B, N, S)`` moved rigidly so that its first pose is ``truth[0]``."""
    move = space.compose(truth[0], space.inverse(est[:, :1]))
    return space.compose(move, est)


def pose_error(est: Tensor, truth: Tensor, space: core.LieGroup) -> Tensor:
    """``(B, N, D)`` tangent errors ``Log(truth_k^-1 est_k)`` after anchoring."""
    return space.local(truth[None], anchor(est, truth, space))


def ate(est: Tensor, truth: Tensor, space: core.LieGroup) -> Tensor:
    """``(B,)`` absolute trajectory error: RMSE of the positions after anchoring the first pose."""
    d = _translation_dim(space)
    diff = anchor(est, truth, space)[..., :d] - truth[None, :, :d]
    return diff.pow(2).sum(-1).mean(-1).sqrt()


def rpe(est: Tensor, truth: Tensor, space: core.LieGroup) -> Tensor:
    """``(B,)`` relative pose error: RMSE of the translation of
    ``(truth_k^-1 truth_k+1)^-1 (est_k^-1 est_k+1)`` over consecutive poses."""
    d = _translation_dim(space)
    rel_est = space.compose(space.inverse(est[:, :-1]), est[:, 1:])
    rel_true = space.compose(space.inverse(truth[:-1]), truth[1:])
    err = space.compose(space.inverse(rel_true)[None], rel_est)
    return err[..., :d].pow(2).sum(-1).mean(-1).sqrt()


def pose_loss(est: Tensor, truth: Tensor, space: core.LieGroup) -> Tensor:
    """``(B,)`` the training loss: RMS over poses of the tangent error (metres and radians)."""
    e = pose_error(est, truth, space)
    return (e.pow(2).sum(-1).mean(-1) + 1e-12).sqrt()


@dataclass
class Scores:
    """Sums over graphs (combined across ranks by summing), turned into metrics by
    :meth:`metrics`."""

    graphs: float = 0.0
    ate: float = 0.0
    rpe: float = 0.0
    loss: float = 0.0
    time_s: float = 0.0
    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0

    def add(self, est: Tensor, sample: Sample, time_s: float, rejected: Tensor | None) -> None:
        """Add one graph's solution ``est (1, N, S)``; ``rejected (L,)``: the loop closures
        a method rejects (None: not scored)."""
        space = sample.space
        self.graphs += 1
        self.ate += float(ate(est, sample.truth, space)[0])
        self.rpe += float(rpe(est, sample.truth, space)[0])
        self.loss += float(pose_loss(est, sample.truth, space)[0])
        self.time_s += time_s
        if rejected is not None:
            out = sample.loop_outlier.to(rejected.device)
            self.tp += float((rejected & out).sum())
            self.fp += float((rejected & ~out).sum())
            self.fn += float((~rejected & out).sum())

    def metrics(self, suffix: str = "") -> dict[str, float]:
        n = max(self.graphs, 1.0)
        detected = self.tp + self.fp
        return {
            f"ate{suffix}": self.ate / n,
            f"rpe{suffix}": self.rpe / n,
            f"loss{suffix}": self.loss / n,
            f"solve_time_s{suffix}": self.time_s / n,
            f"outlier_precision{suffix}": self.tp / detected if detected else 1.0,
            f"outlier_recall{suffix}": self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0,
        }
