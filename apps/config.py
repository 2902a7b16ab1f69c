"""Typed config schemas shared by the apps, registered in Hydra's ConfigStore, and their
conversion to core objects.

One source of truth per option: the ``optimizer`` group's fields are ``core.LevenbergMarquardt``'s
and ``core.OptimizationLayer``'s own names, their defaults are read from core, and the enums of
their choices are made from core's ``Literal`` types (``tests/apps/test_config.py`` checks that
every field has core's name and default). The YAML files hold only what differs from a schema.

Every app's config extends :class:`TrainConfig` (seed, device, epochs, batch size, dataset sizes,
learning rate, resume, folders, threads, pictures) with its own fields, and holds two groups:

* ``optimizer`` (:class:`OptimizerConfig`, ``conf/optimizer/*.yaml``): Levenberg-Marquardt's
  settings and the layer's backward mode;
* ``solver`` (:class:`SolverConfig`, ``conf/solver/*.yaml``): the linear solver.

Schemas are stored as ``schema_optimizer`` / ``schema_solver`` in their groups (a group's YAML
starts with ``defaults: [schema_<group>, _self_]``) and each app stores its own as
``schema_<app>`` (first in ``conf/<app>.yaml``'s defaults). Since the configs are structured, an
unknown key or a value of the wrong type is an error at composition time; :func:`check_keys` also
catches Hydra's ``+key=value``.

Presets: an app's ``conf/<app>.yaml`` ends its defaults with ``preset: none`` and
``optional <app>/preset@_global_: ${preset}``, so ``preset=smoke`` applies
``conf/<app>/preset/smoke.yaml`` (``conf/preset/*.yaml`` are empty markers naming the choices).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_type_hints

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import core
from core.layer import Backward as _Backward
from core.loss import LossKind
from core.solvers import LinearSolver, Schur
from core.solvers import SolverName as _SolverName
from core.solvers.schur import Reduced as _Reduced
from core.solvers.sparse import Backend as _Backend

_LM_HINTS = get_type_hints(core.LevenbergMarquardt)
_LAYER_HINTS = get_type_hints(core.OptimizationLayer.__init__)
_LAYER_DEFAULTS = {k: p.default for k, p in
                   inspect.signature(core.OptimizationLayer.__init__).parameters.items()}
_LM_DEFAULTS = {f.name: f.default for f in fields(core.LevenbergMarquardt)}


def enum_of(name: str, literal: Any, extra: tuple[str, ...] = ()) -> Any:
    """A ``str`` Enum whose members are the choices of ``literal`` (plus ``extra``)."""
    return Enum(name, [(v, v) for v in (*get_args(literal), *extra)], type=str,  # type: ignore
                module=__name__)


Backward = enum_of("Backward", _Backward)
ImplicitHessian = enum_of("ImplicitHessian", _LAYER_HINTS["implicit_hessian"])
DampingMode = enum_of("DampingMode", _LM_HINTS["damping_mode"])
DampingUpdate = enum_of("DampingUpdate", _LM_HINTS["damping_update"])
RobustLossKind = enum_of("RobustLossKind", LossKind)
#: core's linear solvers plus ``schur`` (points-like variables eliminated first; the app names
#: which variable)
SolverName = enum_of("SolverName", _SolverName, ("schur",))
Reduced = enum_of("Reduced", _Reduced)
Backend = enum_of("Backend", _Backend)
LrSchedule = Enum("LrSchedule", [("none", "none"), ("cosine", "cosine")], type=str,  # type: ignore
                  module=__name__)


def _lm(name: str) -> Any:
    return _LM_DEFAULTS[name]


def _layer(name: str) -> Any:
    return _LAYER_DEFAULTS[name]


@dataclass
class OptimizerConfig:
    """Levenberg-Marquardt (``core.LevenbergMarquardt``) and the layer's backward
    (``core.OptimizationLayer``); same names, same defaults, documented there.

    Fields:
        max_iters: LM iteration cap.
        damping_init: initial damping lambda.
        damping_mode: ``levenberg`` (``lambda I``) or ``marquardt`` (``lambda diag(H)``).
        damping_update: how lambda moves after a step: ``auto``, ``nielsen`` or ``fixed``.
        damping_factor: the factor of ``fixed``.
        damping_min, damping_max: bounds on lambda.
        min_gain: steps with a gain ratio below this are rejected.
        rel_tol: converged when a step decreases the cost by less than ``rel_tol * F``.
        abs_tol: converged when the cost is below this.
        step_tol: converged when the step's max-norm is below this.
        grad_tol: converged when the gradient's max-norm is below this.
        backward: ``implicit``, ``unroll``, ``truncated`` or ``dlm``.
        backward_iters: for ``truncated``: how many final iterations carry gradients.
        implicit_hessian: ``gauss_newton`` (the final factor) or ``exact`` (robust-loss and
            second-order terms included; conjugate gradients preconditioned by that factor).
        cg_tol: relative tolerance of those conjugate gradients.
        cg_iters: their iteration cap.
        dlm_epsilon: for ``dlm``: the size of the loss perturbation.
    """

    max_iters: int = _lm("max_iters")
    damping_init: float = _lm("damping_init")
    damping_mode: DampingMode = DampingMode(_lm("damping_mode"))  # type: ignore[valid-type]
    damping_update: DampingUpdate = DampingUpdate(  # type: ignore[valid-type]
        _lm("damping_update"))
    damping_factor: float = _lm("damping_factor")
    damping_min: float = _lm("damping_min")
    damping_max: float = _lm("damping_max")
    min_gain: float = _lm("min_gain")
    rel_tol: float = _lm("rel_tol")
    abs_tol: float = _lm("abs_tol")
    step_tol: float = _lm("step_tol")
    grad_tol: float = _lm("grad_tol")
    backward: Backward = Backward(_layer("backward"))  # type: ignore[valid-type]
    backward_iters: int = _layer("backward_iters")
    implicit_hessian: ImplicitHessian = ImplicitHessian(  # type: ignore[valid-type]
        _layer("implicit_hessian"))
    cg_tol: float = _layer("cg_tol")
    cg_iters: int = _layer("cg_iters")
    dlm_epsilon: float = _layer("dlm_epsilon")


@dataclass
class SolverConfig:
    """The linear solver of the damped normal equations.

    Fields:
        name: one of ``core.solvers.make_solver``'s names (``auto``: dense for small problems,
            sparse on the CPU, cuDSS on CUDA; ``dense``; ``sparse`` (CHOLMOD when installed);
            ``cholmod``/``cholespy``/``scipy``; ``pcg``; ``cudss``: batched sparse Cholesky on
            CUDA, ``pip install 'ariadne-nls[cuda]'``), or ``schur``: the app's point-like
            variable eliminated first (``core.solvers.Schur``; bundle adjustment).
        reduced: for ``schur``: how the reduced system is factored (``auto``/``dense``/``sparse``).
        backend: for ``schur`` with a sparse reduced system: the sparse Cholesky backend.
    """

    name: SolverName = SolverName(_lm("solver"))  # type: ignore[valid-type]
    reduced: Reduced = Reduced.auto  # type: ignore[attr-defined,valid-type]
    backend: Backend = Backend.auto  # type: ignore[attr-defined,valid-type]


@dataclass
class TrainConfig:
    """Fields every app's training config has.

    Fields:
        seed: seeds data generation, initialization and shuffling.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        epochs: passes over the training set.
        batch_size: training samples per optimizer step (split across ranks under torchrun).
        num_train, num_val: training and held-out samples (seeds differ, same generator).
        lr: Adam's learning rate (of the first epoch under ``lr_schedule``).
        lr_schedule: ``none`` (constant) or ``cosine``: epoch ``e`` of ``E`` trains at
            ``lr * (1 + cos(pi e / E)) / 2`` (a function of the epoch alone, so resuming
            continues the same schedule).
        resume: continue from ``checkpoint.pt`` in the output folder.
        cache_dir: where generated data is cached; null: ``<output folder>/cache``.
        out_dir: the output folder; null: Hydra's run folder.
        threads: torch intra-op threads; null leaves torch's default.
        viz: draw the app's picture of a held-out result at the end.
        show: also open it in an interactive Open3D window (needs a display).
        optimizer: the ``optimizer`` group.
        solver: the ``solver`` group.
    """

    seed: int = 0
    device: str = "auto"
    epochs: int = 10
    batch_size: int = 4
    num_train: int = 32
    num_val: int = 24
    lr: float = 1e-2
    lr_schedule: LrSchedule = LrSchedule.none  # type: ignore[attr-defined,valid-type]
    resume: bool = False
    cache_dir: str | None = None
    out_dir: str | None = None
    threads: int | None = 1
    viz: bool = True
    show: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)


def value(x: object) -> Any:
    """An Enum member's value (configs hold members; core takes plain strings)."""
    return x.value if isinstance(x, Enum) else x


def make_solver_from(solver: SolverConfig | DictConfig, objective: core.Objective,
                     eliminate: str | None = None) -> LinearSolver | str:
    """The linear solver the ``solver`` group names: core's name as it is, or for ``schur`` a
    ``core.solvers.Schur`` over ``objective`` eliminating the variable ``eliminate``."""
    name = str(value(solver.name))
    if name != "schur":
        return name
    if eliminate is None:
        raise ValueError("solver=schur eliminates a point-like variable, and this app has none; "
                         f"use one of {list(get_args(_SolverName))}")
    return Schur(objective, eliminate, reduced=value(solver.reduced),
                 backend=value(solver.backend))


def make_optimizer(cfg: Any, solver: LinearSolver | str | None = None) -> core.LevenbergMarquardt:
    """``core.LevenbergMarquardt`` from ``cfg.optimizer`` with the solver ``solver`` (default:
    ``cfg.solver.name``, which must then be one of core's names)."""
    o = cfg.optimizer
    if solver is None:
        solver = str(value(cfg.solver.name))
        if solver == "schur":
            raise ValueError("solver=schur needs the objective: use make_solver_from")
    kwargs = {f.name: value(getattr(o, f.name))
              for f in fields(OptimizerConfig) if f.name in _LM_DEFAULTS}
    return core.LevenbergMarquardt(solver=solver, **kwargs)


def make_layer(objective: core.Objective, cfg: Any, eliminate: str | None = None
               ) -> core.OptimizationLayer:
    """``core.OptimizationLayer`` over ``objective`` configured by ``cfg.optimizer`` and
    ``cfg.solver`` (``eliminate``: the variable a ``schur`` solver eliminates)."""
    o = cfg.optimizer
    lm = make_optimizer(cfg, make_solver_from(cfg.solver, objective, eliminate))
    return core.OptimizationLayer(
        objective, lm, backward=value(o.backward), backward_iters=o.backward_iters,
        implicit_hessian=value(o.implicit_hessian), cg_tol=o.cg_tol, cg_iters=o.cg_iters,
        dlm_epsilon=o.dlm_epsilon)


def check_solver(cfg: Any, device: Any) -> None:
    """Fail early, naming the missing piece, when the configured solver cannot run here
    (``cudss`` without CUDA or without nvmath-python)."""
    if str(value(cfg.solver.name)) != "cudss":
        return
    if torch.device(device).type != "cuda":
        raise ValueError(f"solver=cudss runs on CUDA, but the device is {device} "
                         f"(torch.cuda.is_available() = {torch.cuda.is_available()}); use "
                         "solver=sparse on the CPU, or device=cuda on a machine with an NVIDIA "
                         "GPU")
    if importlib.util.find_spec("nvmath") is None:
        raise ValueError("solver=cudss needs nvmath-python and NVIDIA cuDSS, which are not "
                         "installed: pip install 'ariadne-nls[cuda]'")


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


def spec_from_config(spec: type, cfg: Any) -> Any:
    """The frozen generator settings ``spec`` (a dataclass) from its config node (OmegaConf
    lists become the spec's tuples; the spec's own checks run)."""
    kwargs = {}
    for f in fields(spec):
        v = getattr(cfg, f.name)
        kwargs[f.name] = v if isinstance(v, str | int | float) or v is None else tuple(v)
    return spec(**kwargs)


def conf_dir() -> Path:
    """The folder of the YAML configs: ``apps/conf`` in an installed package (``conf/`` is
    packaged there), else the checkout's top-level ``conf/``."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"
    return installed if installed.is_dir() else here.parent / "conf"


def register(name: str | None = None, node: type | None = None) -> None:
    """Store the shared group schemas (and ``schema_<name>`` = ``node`` when given; a frozen
    dataclass inside it, e.g. a generator's spec used as the ``data`` schema, stays overridable).
    Idempotent."""
    cs = ConfigStore.instance()
    cs.store(group="optimizer", name="schema_optimizer", node=OptimizerConfig)
    cs.store(group="solver", name="schema_solver", node=SolverConfig)
    if name is not None and node is not None:
        structured = OmegaConf.structured(node)
        for f in fields(node):
            child = structured[f.name]
            if isinstance(child, DictConfig):
                OmegaConf.set_readonly(child, False)
        cs.store(name=f"schema_{name}", node=structured)


register()
