"""Reference solvers (GTSAM through its pip wheel, Ceres through ``bench/ceres``) on exactly our
residuals, weights and initial values (``../shared/data/README.md``).

Every function returns a :class:`PeerResult`; for several problems solved one after another the
time and the costs are sums over the problems and ``iterations`` is the maximum. Times exclude
building the peer's graph (GTSAM) or reading the problem file (Ceres) and include everything the
solver does, symbolic analysis included.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from bench import ceres
from core.io import BALProblem, PoseGraph, write_bal, write_g2o


@dataclass(frozen=True)
class PeerResult:
    """One solve: wall time (graph building excluded), iterations, costs."""

    solver: str
    time_s: float
    iterations: int
    initial_cost: float
    final_cost: float


def combine(solver: str, results: Sequence[PeerResult]) -> PeerResult:
    """Problems solved one after another: summed time and costs, maximum iterations."""
    return PeerResult(
        solver,
        sum(r.time_s for r in results),
        max(r.iterations for r in results),
        sum(r.initial_cost for r in results),
        sum(r.final_cost for r in results),
    )


def gtsam_solve(
    fg, values, max_iters: int = 100, ordering=None, rel_tol: float = 1e-5, abs_tol: float = 1e-5
) -> PeerResult:
    """GTSAM's LM (multifrontal Cholesky; COLAMD unless ``ordering`` is given) on a built graph;
    the timer covers the optimizer's construction and ``optimize()``."""
    import gtsam

    params = gtsam.LevenbergMarquardtParams()
    params.setMaxIterations(max_iters)
    params.setRelativeErrorTol(rel_tol)
    params.setAbsoluteErrorTol(abs_tol)
    if ordering is not None:
        params.setOrdering(ordering)
    initial_cost = fg.error(values)
    start = time.perf_counter()
    optimizer = gtsam.LevenbergMarquardtOptimizer(fg, values, params)
    result = optimizer.optimize()
    elapsed = time.perf_counter() - start
    return PeerResult("gtsam", elapsed, optimizer.iterations(), initial_cost, fg.error(result))


def gtsam_pose_graph_problem(graph: PoseGraph, prior_sqrt_info: float = 1e3):
    """GTSAM factor graph and values: native ``BetweenFactorPose3/2`` with the tangent information
    (``S Omega S``, ../shared/data/README.md) and a prior on the first pose; GTSAM's error is
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
    return fg, values


def gtsam_pose_graph(
    graph: PoseGraph,
    max_iters: int = 100,
    prior_sqrt_info: float = 1e3,
    rel_tol: float = 1e-5,
    abs_tol: float = 1e-5,
) -> PeerResult:
    """GTSAM LM on :func:`gtsam_pose_graph_problem` (graph building not timed)."""
    fg, values = gtsam_pose_graph_problem(graph, prior_sqrt_info)
    return gtsam_solve(fg, values, max_iters, rel_tol=rel_tol, abs_tol=abs_tol)


def gtsam_pose_graphs(
    graphs: Sequence[PoseGraph], max_iters: int = 100, prior_sqrt_info: float = 1e3
) -> PeerResult:
    """:func:`gtsam_pose_graph` on each graph, one after another."""
    return combine("gtsam", [gtsam_pose_graph(g, max_iters, prior_sqrt_info) for g in graphs])


def gtsam_bal_problem(problem: BALProblem):
    """GTSAM factor graph, values and ordering for a BAL problem with native
    ``GeneralSFMFactorCal3Bundler`` factors.

    GTSAM's cameras look down +z with ``p = P[:2] / P[2]``; BAL's down -z with ``p = -P[:2] /
    P[2]``. As GTSAM's own BAL reader does, the camera pose is ``wRc = R^T Rx(pi)``,
    ``wtc = -R^T t`` and the measurement ``(u, -v)``: GTSAM's residual is then ``(r_u, -r_v)``,
    the same cost (``Cal3Bundler(f, k1, k2, 0, 0)`` has BAL's radial distortion). Keys: cameras
    ``c0..``, points ``p0..``. The ordering eliminates the points first (the elimination is then a
    Schur complement; faster than COLAMD here). No gauge prior: the same cost as ours; the damping
    handles the gauge freedom.
    """
    import gtsam

    cams, pts = problem.cameras.numpy(), problem.points.numpy()
    fg, values = gtsam.NonlinearFactorGraph(), gtsam.Values()
    flip = gtsam.Rot3.Rx(np.pi)
    rotations = Rotation.from_rotvec(cams[:, :3]).as_matrix()
    for c, (p, R) in enumerate(zip(cams, rotations)):
        rot = gtsam.Rot3(R)
        pose = gtsam.Pose3(rot.inverse().compose(flip), rot.unrotate(-p[3:6]))
        calibration = gtsam.Cal3Bundler(p[6], p[7], p[8], 0.0, 0.0)
        values.insert(gtsam.symbol("c", c), gtsam.PinholeCameraCal3Bundler(pose, calibration))
    for k, x in enumerate(pts):
        values.insert(gtsam.symbol("p", k), x)
    unit = gtsam.noiseModel.Unit.Create(2)
    obs = problem.observations.numpy() * np.array([1.0, -1.0])
    for c, k, uv in zip(problem.camera_index.tolist(), problem.point_index.tolist(), obs):
        fg.add(
            gtsam.GeneralSFMFactorCal3Bundler(uv, unit, gtsam.symbol("c", c), gtsam.symbol("p", k))
        )
    ordering = gtsam.Ordering()
    for k in range(problem.num_points):
        ordering.push_back(gtsam.symbol("p", k))
    for c in range(problem.num_cameras):
        ordering.push_back(gtsam.symbol("c", c))
    return fg, values, ordering


def gtsam_bal(problem: BALProblem, max_iters: int = 100) -> PeerResult:
    """GTSAM LM on :func:`gtsam_bal_problem` (graph building not timed)."""
    fg, values, ordering = gtsam_bal_problem(problem)
    return gtsam_solve(fg, values, max_iters, ordering)


def _ceres_result(out: dict) -> PeerResult:
    return PeerResult(
        "ceres",
        float(out["time_s"]),
        int(out["iterations"]),
        float(out["initial_cost"]),
        float(out["final_cost"]),
    )


def write_pose_graphs(graphs: Sequence[PoseGraph], folder: str | Path) -> list[Path]:
    """Write ``graphs`` as ``folder/graph<k>.g2o`` (exact round trip) for the Ceres runner."""
    files = [Path(folder) / f"graph{k}.g2o" for k in range(len(graphs))]
    for f, g in zip(files, graphs):
        if g.dim != 3:
            raise ValueError("the Ceres runner solves SE(3) pose graphs only")
        write_g2o(f, g)
    return files


def ceres_pose_graph_files(
    files: Sequence[Path], max_iters: int = 100, prior_sqrt_info: float = 1e3, threads: int = 0
) -> PeerResult:
    """Ceres (SPARSE_NORMAL_CHOLESKY, SuiteSparse) on each g2o file, one after another, through
    the native runner; raises :class:`bench.ceres.CeresUnavailable` when Ceres is missing."""
    out = ceres.solve_files(
        "pose_graph", files, max_iters=max_iters, threads=threads, prior_sqrt_info=prior_sqrt_info
    )
    return _ceres_result(out)


def ceres_pose_graphs(
    graphs: Sequence[PoseGraph],
    max_iters: int = 100,
    prior_sqrt_info: float = 1e3,
    threads: int = 0,
) -> PeerResult:
    """:func:`ceres_pose_graph_files` on ``graphs`` written to a temporary folder."""
    ceres.build()
    with tempfile.TemporaryDirectory(prefix="ariadne_ceres_") as tmp:
        files = write_pose_graphs(graphs, tmp)
        return ceres_pose_graph_files(files, max_iters, prior_sqrt_info, threads)


def ceres_bal_file(path: Path, max_iters: int = 100, threads: int = 0) -> PeerResult:
    """Ceres (SPARSE_SCHUR, points eliminated first) on a BAL file through the runner."""
    return _ceres_result(ceres.solve_files("bal", [path], max_iters=max_iters, threads=threads))


def ceres_bal(problem: BALProblem, max_iters: int = 100, threads: int = 0) -> PeerResult:
    """:func:`ceres_bal_file` on ``problem`` written to a temporary file."""
    ceres.build()
    with tempfile.TemporaryDirectory(prefix="ariadne_ceres_") as tmp:
        path = Path(tmp) / "problem.bal"
        write_bal(path, problem)
        return ceres_bal_file(path, max_iters, threads)
