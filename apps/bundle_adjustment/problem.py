"""The bundle-adjustment objective, its differentiable layer, and the evaluation metrics.

Objective (per scene): BAL/Snavely reprojection residuals (``core.costs.Reprojection``) over
``cameras`` (SE3, world-to-camera), ``intrinsics`` ((f, k1, k2) per camera) and ``points``, each
passed through a robust loss with scale ``c`` and modulated by a per-observation weight ``w_o``
(the network's output; 1 for the baselines): ``sum_o 0.5 rho_c(||w_o r_o||^2)`` (``"residual"``
mode) or ``sum_o 0.5 rho_(c w_o)(||r_o||^2)`` (``"scale"`` mode; :meth:`BAObjective.inputs`).

Gauge: the cost is invariant under a similarity transform of the whole scene (7 dof), so the
normal matrix is singular along those directions and the implicit backward (which solves with it)
needs them fixed. Weak priors on the first two cameras' poses at their initial values
(``gauge_weight``: pixels per radian and per scene unit, 1 by default, against ~1e7 px^2 per
rad^2 that a camera's reprojections weigh) remove the 7 dof while moving the optimum by a
negligible amount. Without them the layer raises a clear error (singular normal matrix).

Metrics compare the solution with the ground truth after a similarity alignment (Umeyama, "Least-
squares estimation of transformation parameters between two point patterns", PAMI 1991) of the
camera centres and of one aim point per camera (``aim`` scene units of the ground truth along its
optical axis, scaled by the ratio of the two sets of centres' spreads so that it is the same
point of both reconstructions), so that cameras on a straight path still fix the rotation about
the path:

* rotation error: the angle of ``R_true R_align R_est^T`` (world-to-camera rotations), degrees;
* centre error: ``|s R_align c_est + t_align - c_true|``, scene units;
* inlier reprojection RMSE: ``sqrt(mean ||r_o||^2)`` over the true inliers, pixels.

The alignment is computed without gradient: the outer loss differentiates the aligned poses only.
Since the alignment minimizes a loss close to the outer one, the neglected term is small (envelope
theorem), and the SVD's backward (unstable for nearly degenerate configurations) is avoided.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

import core
from apps.bundle_adjustment.data import Scene, camera_centers
from core.costs import Prior, Reprojection, bal_to_variables
from core.io import BALProblem
from core.lie import so3
from core.loss import LossKind
from core.solvers import LinearSolver, Schur
from core.solvers.schur import Reduced
from core.solvers.sparse import Backend

WeightMode = Literal["residual", "scale"]
REPROJECTION = "reprojection"
WEIGHT_KEY = f"{REPROJECTION}.weight"
SCALE_KEY = f"{REPROJECTION}.loss_scale"


@dataclass(frozen=True, eq=False)
class BAObjective:
    """One BA problem ready to solve: the objective, its initial values ``(1, ., .)``, the
    Schur solver built for it (points eliminated first), the number of observations and whether
    the reprojection cost has a robust loss."""

    objective: core.Objective
    init: dict[str, Tensor]
    solver: Schur
    num_observations: int
    robust: bool

    def optimizer(self, lm: core.LevenbergMarquardt) -> core.LevenbergMarquardt:
        """``lm`` with this problem's Schur solver."""
        return replace(lm, solver=self.solver)

    def layer(
        self,
        lm: core.LevenbergMarquardt,
        backward: Literal["unroll", "truncated", "implicit"] = "implicit",
        implicit_hessian: Literal["gauss_newton", "exact"] = "gauss_newton",
        backward_iters: int = 5,
        cg_tol: float = 1e-10,
        cg_iters: int = 100,
    ) -> core.OptimizationLayer:
        """The differentiable layer (``lm`` with this problem's Schur solver); its inputs are
        the initial values plus :data:`WEIGHT_KEY` ``(B|1, O, 1)`` and :data:`SCALE_KEY`
        ``()`` or ``(B,)`` (see :meth:`inputs`)."""
        return core.OptimizationLayer(self.objective, self.optimizer(lm), backward=backward,
                                      backward_iters=backward_iters,
                                      implicit_hessian=implicit_hessian, cg_tol=cg_tol,
                                      cg_iters=cg_iters)

    def inputs(self, weight: Tensor, scale: Tensor | float, batch: int = 1,
               mode: WeightMode = "residual") -> dict[str, Tensor]:
        """Layer inputs: initial values (repeated ``batch`` times), per-observation weights
        ``weight (O,)`` and the robust-loss scale ``c`` (a number, ``()`` or ``(batch,)``).

        ``mode="residual"``: ``w_o`` scales the residual, ``0.5 rho_c(||w_o r_o||^2)`` (an
        information weight). ``mode="scale"``: ``w_o`` scales the robust loss's width,
        ``0.5 rho_(c w_o)(||r_o||^2)``: an observation whose residual is well inside the width
        keeps full weight, a low ``w_o`` only makes it rejected at a smaller residual (with a
        redescending loss the residual mode's weight has no effect on far outliers, whose
        influence ``c^2 / |r|`` does not depend on it). Without a robust loss ``mode`` is
        ignored and the weight scales the residual.
        """
        if weight.shape != (self.num_observations,):
            raise ValueError(f"weight must have shape ({self.num_observations},), got "
                             f"{tuple(weight.shape)}")
        if mode not in ("residual", "scale"):
            raise ValueError(f"unknown weight mode {mode!r}; use residual or scale")
        ref = self.init["points"]
        init = {k: v.expand(batch, -1, -1).clone() for k, v in self.init.items()}
        c = torch.as_tensor(scale, dtype=ref.dtype, device=ref.device)
        if not self.robust:
            return {**init, WEIGHT_KEY: weight[None, :, None]}
        if mode == "residual":
            return {**init, WEIGHT_KEY: weight[None, :, None], SCALE_KEY: c}
        if c.ndim > 1 or (c.ndim == 1 and c.shape[0] != batch):
            raise ValueError(f"scale must be a number or (batch,) = ({batch},), got "
                             f"{tuple(c.shape)}")
        per_obs = (c[:, None] if c.ndim == 1 else c) * weight  # (B|1, O)
        return {**init, WEIGHT_KEY: torch.ones_like(weight)[None, :, None],
                SCALE_KEY: per_obs if per_obs.ndim == 2 else per_obs[None]}


def ba_objective(
    problem: BALProblem,
    loss: LossKind | None = "huber",
    loss_scale: float = 1.0,
    gauge_weight: float | None = 1.0,
    reduced: Reduced = "auto",
    backend: Backend = "auto",
) -> BAObjective:
    """The objective of ``problem`` (module docstring) and its Schur solver. ``loss=None``: plain
    least squares (the BAL cost, as Ceres and GTSAM solve it); ``gauge_weight=None``: no gauge
    priors (the BAL cost exactly; LM's damping copes with the gauge, the implicit backward does
    not). ``reduced``, ``backend``: how the Schur solver factors the reduced camera system
    (``core.solvers.Schur``)."""
    variables, init = bal_to_variables(problem)
    o = problem.num_observations
    weight = problem.observations.new_ones(1, o, 1)
    robust = None if loss is None else core.RobustLoss(loss, float(loss_scale))
    costs = [Reprojection(*variables, problem.camera_index, problem.point_index,
                          problem.observations, weight=weight, loss=robust, name=REPROJECTION)]
    if gauge_weight is not None:
        if problem.num_cameras < 2:
            raise ValueError("ba_objective: the gauge priors need at least 2 cameras, got "
                             f"{problem.num_cameras}")
        anchors = torch.tensor([0, 1], device=problem.observations.device)
        costs.append(Prior(variables.cameras, init["cameras"][:, anchors], anchors,
                           sqrt_info=float(gauge_weight), name="gauge"))
    objective = core.Objective(costs)
    solver = Schur(objective, "points", reduced=reduced, backend=backend)
    return BAObjective(objective, init, solver, o, robust is not None)


@functools.cache
def ragged_solver(name: str, reduced: Reduced = "auto", backend: Backend = "auto"
                  ) -> Callable[[core.Objective], LinearSolver] | None:
    """For ``OptimizationLayer.ragged``: what makes a merged batch of scenes' solver, one
    callable per configuration (the layer keeps the solver it makes per combination under
    it): a ``Schur`` over the merged objective, points eliminated, for ``name == "schur"``;
    None otherwise (core's solver names apply to any objective)."""
    if name != "schur":
        return None

    def make(objective: core.Objective) -> LinearSolver:
        return Schur(objective, "points", reduced=reduced, backend=backend)

    return make


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------


def umeyama(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Similarity ``(s, R, t)`` minimizing ``sum |s R src_i + t - dst_i|^2`` (Umeyama 1991);
    ``src, dst (..., N, 3)`` -> ``s (...)``, ``R (..., 3, 3)``, ``t (..., 3)``."""
    if src.shape != dst.shape or src.shape[-1] != 3 or src.shape[-2] < 3:
        raise ValueError(f"umeyama: need matching (..., N >= 3, 3) point sets, got "
                         f"{tuple(src.shape)} and {tuple(dst.shape)}")
    mu_s, mu_d = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    a, b = src - mu_s, dst - mu_d
    sigma = b.transpose(-1, -2) @ a / src.shape[-2]
    U, D, Vh = torch.linalg.svd(sigma)
    sign = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    S = torch.ones_like(D)
    S[..., 2] = torch.where(sign == 0, 1.0, sign)
    R = U @ (S[..., :, None] * Vh)
    var = (a * a).sum((-1, -2)) / src.shape[-2]
    s = (D * S).sum(-1) / var.clamp_min(torch.finfo(var.dtype).tiny)
    t = mu_d[..., 0, :] - s[..., None] * (R @ mu_s[..., 0, :, None])[..., 0]
    return s, R, t


def _aim_points(cameras: Tensor, centers: Tensor, aim: float | Tensor) -> Tensor:
    """``(..., C, 3)`` points ``aim`` units in front of each camera (BAL cameras look down -z)."""
    forward = so3.act(so3.inverse(so3.exp(cameras[..., :3])),
                      cameras.new_tensor([0.0, 0.0, -1.0]).expand_as(centers))
    return centers + aim * forward


def values_to_cameras(values: dict[str, Tensor]) -> Tensor:
    """``(B, C, 9)`` BAL cameras from solution values (differentiable)."""
    T, K = values["cameras"], values["intrinsics"]
    return torch.cat([so3.log(T[..., 3:]), T[..., :3], K], dim=-1)


@dataclass(frozen=True)
class PoseErrors:
    """Per-camera errors ``(B, C)`` after alignment: rotation (degrees), centre (scene units)."""

    rot_deg: Tensor
    center: Tensor


@torch.no_grad()
def similarity(values: dict[str, Tensor], true_cameras: Tensor, aim: float = 4.0
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The similarity ``(s (B,), R (B, 3, 3), t (B, 3))`` taking the solution's frame to the
    ground truth's (Umeyama on camera centres and aim points; module docstring), no gradient."""
    cams = values_to_cameras({k: v.detach() for k, v in values.items()})
    c_est = camera_centers(cams)
    truth = true_cameras.to(cams)
    c_true = camera_centers(truth)
    ratio = _spread(c_est) / _spread(c_true).clamp_min(torch.finfo(c_true.dtype).tiny)
    src = torch.cat([c_est, _aim_points(cams, c_est, aim * ratio[..., None, None])], -2)
    dst = torch.cat([c_true, _aim_points(truth, c_true, aim)], -2).expand_as(src)
    return umeyama(src, dst)


def _spread(x: Tensor) -> Tensor:
    """RMS distance of ``(..., N, 3)`` points to their centroid, ``(...)``."""
    return (x - x.mean(-2, keepdim=True)).square().sum(-1).mean(-1).sqrt()


def pose_errors(values: dict[str, Tensor], scene: Scene, aim: float = 4.0) -> PoseErrors:
    """Camera errors of the solution ``values`` against ``scene``'s truth after a similarity
    alignment (detached; module docstring). Differentiable in ``values``."""
    T = values["cameras"]  # (B, C, 7) world-to-camera
    q_est, t_est = T[..., 3:], T[..., :3]
    c_est = -so3.act(so3.inverse(q_est), t_est)
    truth = scene.true_cameras.to(T)
    s, R, t = similarity(values, truth, aim)
    aligned = s[..., None, None] * (R[..., None, :, :] @ c_est[..., None])[..., 0] + t[..., None, :]
    center = (aligned - camera_centers(truth)).norm(dim=-1)
    # world-to-camera after alignment: R_est R_align^T; error R_true (R_est R_align^T)^T
    q_align = so3.from_matrix(R)[..., None, :]
    q_true = so3.exp(truth[..., :3])
    q_err = so3.compose(q_true, so3.compose(q_align, so3.inverse(q_est)))
    v, w = q_err[..., :3], q_err[..., 3]
    angle = 2 * torch.atan2(v.norm(dim=-1).clamp_min(1e-15), w.abs())
    return PoseErrors(torch.rad2deg(angle), center)


@torch.no_grad()
def aligned_reconstruction(values: dict[str, Tensor], true_cameras: Tensor, aim: float = 4.0
                           ) -> tuple[Tensor, Tensor]:
    """Element 0 of the solution in the ground truth's frame: BAL cameras ``(C, 9)`` and points
    ``(P, 3)`` (for pictures)."""
    s, R, t = (x[0] for x in similarity(values, true_cameras, aim))
    cams = values_to_cameras(values)[0]
    points = s * (values["points"][0] @ R.T) + t
    rot = so3.compose(so3.exp(cams[:, :3]), so3.inverse(so3.from_matrix(R))[None])
    centers = s * (camera_centers(cams) @ R.T) + t
    trans = -so3.act(rot, centers)
    return torch.cat([so3.log(rot), trans, cams[:, 6:]], -1), points


def inlier_rmse(values: dict[str, Tensor], scene: Scene) -> Tensor:
    """``(B,)`` ``sqrt(mean ||r_o||^2)`` over the true inlier observations, pixels."""
    p = scene.problem
    inlier = ~scene.is_outlier
    cam, pt = p.camera_index[inlier], p.point_index[inlier]
    pred, _, _ = core.costs.reprojection.project(values["cameras"][:, cam],
                                                 values["intrinsics"][:, cam],
                                                 values["points"][:, pt])
    r = pred - p.observations[inlier].to(pred)
    return (r * r).sum(-1).mean(-1).sqrt()
