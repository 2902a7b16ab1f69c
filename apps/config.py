"""Typed config schemas shared by the apps, registered in Hydra's ConfigStore.

Every app's config extends :class:`TrainConfig` (seed, device, epochs, batch size, learning rate,
resume, cache folder, threads) with its own fields, and holds two shared groups:

* ``optimizer`` (:class:`OptimizerConfig`, ``conf/optimizer/*.yaml``): Levenberg-Marquardt's
  settings and the layer's backward mode;
* ``solver`` (:class:`SolverConfig`, ``conf/solver/*.yaml``): the linear solver.

Schemas are stored as ``schema_optimizer`` / ``schema_solver`` in their groups (a group's YAML
starts with ``defaults: [schema_<group>, _self_]``) and each app stores its own as
``schema_<app>`` (first in ``conf/<app>.yaml``'s defaults). Since the configs are structured, an
unknown key or a value of the wrong type is an error at composition time.

Presets: an app's ``conf/<app>.yaml`` ends its defaults with ``preset: none`` and
``optional <app>/preset@_global_: ${preset}``, so ``preset=smoke`` applies
``conf/<app>/preset/smoke.yaml`` (``conf/preset/*.yaml`` are empty markers naming the choices).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

import core


class Backward(str, Enum):
    """How gradients flow through the layer (``core.OptimizationLayer``'s ``backward``)."""

    unroll = "unroll"
    truncated = "truncated"
    implicit = "implicit"


class ImplicitHessian(str, Enum):
    """Which Hessian the implicit backward solves with."""

    gauss_newton = "gauss_newton"
    exact = "exact"


class DampingMode(str, Enum):
    """LM damping: ``lambda I`` (levenberg) or ``lambda diag(H)`` (marquardt)."""

    levenberg = "levenberg"
    marquardt = "marquardt"


class RobustLossKind(str, Enum):
    """Robust losses of ``core.RobustLoss``."""

    huber = "huber"
    cauchy = "cauchy"
    welsch = "welsch"
    geman_mcclure = "geman_mcclure"


class SolverName(str, Enum):
    """Linear solvers of ``core.solvers.make_solver``."""

    auto = "auto"
    dense = "dense"
    sparse = "sparse"
    cholmod = "cholmod"
    cholespy = "cholespy"
    scipy = "scipy"
    pcg = "pcg"


@dataclass
class OptimizerConfig:
    """Levenberg-Marquardt (``core.LevenbergMarquardt``) and the layer's backward.

    Fields:
        max_iters: LM iteration cap.
        damping: initial damping lambda.
        damping_mode: ``levenberg`` (``lambda I``) or ``marquardt`` (``lambda diag(H)``).
        rel_tol: converged when a step decreases the cost by less than ``rel_tol * F``.
        abs_tol: converged when the cost is below this.
        step_tol: converged when the step's max-norm is below this.
        grad_tol: converged when the gradient's max-norm is below this.
        backward: ``implicit``, ``unroll`` or ``truncated``.
        backward_iters: for ``truncated``: how many final iterations carry gradients.
        implicit_hessian: ``gauss_newton`` (the final factor) or ``exact`` (robust-loss and
            second-order terms included; conjugate gradients preconditioned by that factor).
        cg_tol: relative tolerance of those conjugate gradients.
        cg_iters: their iteration cap.
    """

    max_iters: int = 30
    damping: float = 1e-5
    damping_mode: DampingMode = DampingMode.levenberg
    rel_tol: float = 1e-6
    abs_tol: float = 1e-12
    step_tol: float = 1e-10
    grad_tol: float = 1e-10
    backward: Backward = Backward.implicit
    backward_iters: int = 5
    implicit_hessian: ImplicitHessian = ImplicitHessian.gauss_newton
    cg_tol: float = 1e-8
    cg_iters: int = 200


@dataclass
class SolverConfig:
    """The linear solver of the damped normal equations.

    Fields:
        name: ``sparse`` (CHOLMOD, symbolic analysis reused; graphs of a few hundred poses or
            more), ``dense`` (batched Cholesky; tiny problems, GPUs), ``auto``, ``cholmod``,
            ``cholespy``, ``scipy`` or ``pcg``.
    """

    name: SolverName = SolverName.sparse


@dataclass
class TrainConfig:
    """Fields every app's training config has.

    Fields:
        seed: seeds data generation, initialization and shuffling.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        epochs: passes over the training set.
        batch_size: training samples per optimizer step (split across ranks under torchrun).
        lr: Adam's learning rate.
        resume: continue from ``checkpoint.pt`` in the output folder.
        cache_dir: where generated data is cached; null: ``<output folder>/cache``.
        out_dir: the output folder; null: Hydra's run folder.
        threads: torch intra-op threads; null leaves torch's default.
        optimizer: the ``optimizer`` group.
        solver: the ``solver`` group.
    """

    seed: int = 0
    device: str = "auto"
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-2
    resume: bool = False
    cache_dir: str | None = None
    out_dir: str | None = None
    threads: int | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)


def make_optimizer(optimizer: OptimizerConfig, solver: SolverConfig) -> core.LevenbergMarquardt:
    """``core.LevenbergMarquardt`` from the two groups."""
    return core.LevenbergMarquardt(
        max_iters=optimizer.max_iters,
        solver=value(solver.name),  # type: ignore[arg-type]
        damping_init=optimizer.damping,
        damping_mode=value(optimizer.damping_mode),  # type: ignore[arg-type]
        rel_tol=optimizer.rel_tol,
        abs_tol=optimizer.abs_tol,
        step_tol=optimizer.step_tol,
        grad_tol=optimizer.grad_tol,
    )


def make_layer(
    objective: core.Objective, optimizer: OptimizerConfig, solver: SolverConfig
) -> core.OptimizationLayer:
    """``core.OptimizationLayer`` over ``objective`` configured by the two groups."""
    return core.OptimizationLayer(
        objective,
        make_optimizer(optimizer, solver),
        backward=value(optimizer.backward),  # type: ignore[arg-type]
        backward_iters=optimizer.backward_iters,
        implicit_hessian=value(optimizer.implicit_hessian),  # type: ignore[arg-type]
        cg_tol=optimizer.cg_tol,
        cg_iters=optimizer.cg_iters,
    )


def check_keys(cfg: Any, schema: type, where: str = "") -> None:
    """Raise ``ValueError`` for keys of ``cfg`` that ``schema`` (a dataclass) does not declare,
    recursively. Structured configs already reject ``key=value`` for an unknown key; this also
    catches Hydra's ``+key=value``, which appends even to a structured config."""
    if not is_dataclass(schema):
        return
    declared = {f.name for f in fields(schema)}
    hints = get_type_hints(schema)
    for key in cfg:
        if key not in declared:
            raise ValueError(f"unknown config key '{where}{key}'; {schema.__name__} has "
                             f"{sorted(declared)}")
        child = cfg[key]
        if isinstance(child, DictConfig):
            check_keys(child, hints[key], f"{where}{key}.")


def value(x: object) -> object:
    """An Enum member's value (configs hold members; core takes plain strings)."""
    return x.value if isinstance(x, Enum) else x


def register(name: str | None = None, node: type | None = None) -> None:
    """Store the shared group schemas (and ``schema_<name>`` = ``node`` when given).
    Idempotent."""
    cs = ConfigStore.instance()
    cs.store(group="optimizer", name="schema_optimizer", node=OptimizerConfig)
    cs.store(group="solver", name="schema_solver", node=SolverConfig)
    if name is not None:
        cs.store(name=f"schema_{name}", node=node)


register()
