"""Reference solvers (GTSAM through its pip wheel) on exactly our residuals and weights."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from core.io import PoseGraph


@dataclass(frozen=True)
class PeerResult:
    """One peer solve: wall time (graph building excluded), iterations, costs."""

    solver: str
    time_s: float
    iterations: int
    initial_cost: float
    final_cost: float


def gtsam_pose_graph(graph: PoseGraph, max_iters: int = 100, prior_sqrt_info: float = 1e3,
                     rel_tol: float = 1e-5, abs_tol: float = 1e-5) -> PeerResult:
    """GTSAM 4.x LM with native ``BetweenFactorPose3/2`` and the tangent information
    (``S Omega S``, ../shared/data/README.md), a prior on the first pose; GTSAM's error is
    ``0.5 ||r||^2``, the same cost as ours."""
    import gtsam

    fg, values = gtsam.NonlinearFactorGraph(), gtsam.Values()
    info = graph.tangent_information().numpy()
    z, x0 = graph.measurements.numpy(), graph.poses.numpy()
    if graph.dim == 3:
        def pose(p: np.ndarray):
            return gtsam.Pose3(gtsam.Rot3.Quaternion(p[6], p[3], p[4], p[5]), p[:3])
        # GTSAM orders Pose3 tangents (rotation, translation): permute our (t, r) information.
        perm = [3, 4, 5, 0, 1, 2]
        factor, prior_factor = gtsam.BetweenFactorPose3, gtsam.PriorFactorPose3
    else:
        def pose(p: np.ndarray):
            return gtsam.Pose2(p[0], p[1], float(np.arctan2(p[3], p[2])))
        perm = [0, 1, 2]
        factor, prior_factor = gtsam.BetweenFactorPose2, gtsam.PriorFactorPose2
    for k in range(graph.num_poses):
        values.insert(k, pose(x0[k]))
    for e, (i, j) in enumerate(zip(graph.i.tolist(), graph.j.tolist())):
        model = gtsam.noiseModel.Gaussian.Information(info[e][np.ix_(perm, perm)])
        fg.add(factor(i, j, pose(z[e]), model))
    dof = 6 if graph.dim == 3 else 3
    fg.add(prior_factor(0, pose(x0[0]), gtsam.noiseModel.Isotropic.Sigma(dof, 1 / prior_sqrt_info)))
    params = gtsam.LevenbergMarquardtParams()
    params.setMaxIterations(max_iters)
    params.setRelativeErrorTol(rel_tol)
    params.setAbsoluteErrorTol(abs_tol)
    initial_cost = fg.error(values)
    start = time.perf_counter()
    optimizer = gtsam.LevenbergMarquardtOptimizer(fg, values, params)
    result = optimizer.optimize()
    elapsed = time.perf_counter() - start
    return PeerResult("gtsam", elapsed, optimizer.iterations(), initial_cost, fg.error(result))
