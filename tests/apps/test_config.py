"""One source of truth per option: the apps' optimizer and solver configs carry core's names,
defaults and choices; the YAML files hold only what differs from the schemas; the data schemas
are the generators' specs; the configs ship with the package; ``python -m apps`` lists the apps."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
import yaml
from omegaconf import OmegaConf

import apps
import core
from apps import config
from core.layer import Backward
from core.loss import LossKind
from core.solvers import SolverName

ROOT = Path(__file__).resolve().parents[2]


def test_optimizer_config_has_cores_names_and_defaults() -> None:
    lm = {f.name: f.default for f in fields(core.LevenbergMarquardt)}
    layer = {k: p.default for k, p in
             inspect.signature(core.OptimizationLayer.__init__).parameters.items()}
    for f in fields(config.OptimizerConfig):
        assert f.name in lm or f.name in layer, f"{f.name} is not a core option"
        ours = config.value(f.default if f.default is not MISSING else f.default_factory())
        assert ours == (lm[f.name] if f.name in lm else layer[f.name]), f.name
    assert config.value(config.SolverConfig().name) == lm["solver"]


def test_choices_are_cores() -> None:
    def names(enum: Any) -> set[str]:
        return {m.value for m in enum}

    assert names(config.Backward) == set(get_args(Backward))
    assert names(config.RobustLossKind) == set(get_args(LossKind))
    assert names(config.SolverName) == set(get_args(SolverName)) | {"schur"}
    assert "cudss" in names(config.SolverName)
    assert names(config.DampingMode) == {"levenberg", "marquardt"}
    assert names(config.DampingUpdate) == set(
        get_args(get_type_hints(core.LevenbergMarquardt)["damping_update"]))


def test_make_layer_passes_every_option() -> None:
    cfg = OmegaConf.structured(config.TrainConfig)
    cfg.optimizer.max_iters, cfg.optimizer.damping_init, cfg.optimizer.cg_iters = 7, 0.5, 9
    cfg.optimizer.backward, cfg.solver.name = "unroll", "dense"
    cfg.optimizer.damping_update, cfg.optimizer.damping_factor = "nielsen", 4.0
    x = core.Variable("x", core.Vector(1))
    objective = core.Objective([core.Cost(lambda x: x - 1, optimized=(x,), name="c")])
    layer = config.make_layer(objective, cfg)
    assert (layer.optimizer.max_iters, layer.optimizer.damping_init) == (7, 0.5)
    assert (layer.backward, layer.cg_iters, layer.optimizer.solver) == ("unroll", 9, "dense")
    assert (layer.optimizer.damping_update, layer.optimizer.damping_factor) == ("nielsen", 4.0)
    with pytest.raises(ValueError, match="solver=schur"):
        cfg.solver.name = "schur"
        config.make_layer(objective, cfg)


def test_lr_schedule() -> None:
    from apps.harness import learning_rate

    cfg = OmegaConf.structured(config.TrainConfig)
    cfg.lr, cfg.epochs = 0.1, 4
    assert [learning_rate(cfg, e) for e in range(4)] == [0.1] * 4
    cfg.lr_schedule = "cosine"
    rates = [learning_rate(cfg, e) for e in range(4)]
    assert rates[0] == pytest.approx(0.1) and rates[2] == pytest.approx(0.05)
    assert all(a > b > 0 for a, b in zip(rates, rates[1:]))
    with pytest.raises(ValueError):
        cfg.lr_schedule = "step"


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


@pytest.mark.parametrize("path", sorted(p.relative_to(config.conf_dir()).as_posix()
                                        for p in config.conf_dir().rglob("*.yaml")))
def test_yaml_holds_only_what_differs_from_the_schema(path: str) -> None:
    """Each YAML value differs from the default its schema already has."""
    raw = yaml.safe_load((config.conf_dir() / path).read_text()) or {}
    raw = {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}
    if path.startswith("preset/") or "/preset/" in path:
        return  # presets are overrides by definition
    if path.startswith("optimizer/"):
        schema = OmegaConf.structured(config.OptimizerConfig)
    elif path.startswith("solver/"):
        schema = OmegaConf.structured(config.SolverConfig)
    else:
        schema = OmegaConf.structured(apps.task(path.removesuffix(".yaml")).schema)
    for key, value in _leaves(raw).items():
        default = OmegaConf.select(schema, key)
        default = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
        assert config.value(default) != value, f"{path}: {key}: {value} is the schema's default"


@pytest.mark.parametrize("app", apps.APPS)
def test_data_schema_is_the_generators_spec(app: str) -> None:
    schema = apps.task(app).schema
    spec_type = next(f for f in fields(schema) if f.name == "data").default_factory
    node = OmegaConf.structured(schema).data
    assert config.spec_from_config(spec_type, node) == spec_type()


def test_python_m_apps_lists_every_app() -> None:
    run = subprocess.run([sys.executable, "-m", "apps"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    for app in apps.APPS:
        assert sum(f"python -m apps.{app} " in line for line in lines) == 1


@pytest.mark.slow
def test_installed_package_runs_outside_the_checkout(tmp_path: Path) -> None:
    """``pip install .`` (not editable) into a fresh venv, then ``python -m apps.pose_graph
    preset=smoke`` from a folder outside the checkout finds its packaged configs."""
    venv = tmp_path / "venv"
    # the dependencies (torch, ...) come from this environment; the venv has no pip or
    # setuptools of its own, so this environment's pip and setuptools build and install into it
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                              "-q", "--no-deps", "--no-build-isolation", str(ROOT)],
                             capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import apps.config as c; print(c.conf_dir())"],
                           capture_output=True, text=True, cwd=elsewhere, timeout=120, env=env)
    assert str(venv) in where.stdout, where.stdout + where.stderr  # the installed copy
    run = subprocess.run([str(python), "-m", "apps.pose_graph", "preset=smoke",
                          f"hydra.run.dir={elsewhere / 'run'}"], capture_output=True, text=True,
                         cwd=elsewhere, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (elsewhere / "run" / "metrics.json").is_file()


def test_every_package_is_listed_in_pyproject() -> None:
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {p.parent.relative_to(ROOT).as_posix().replace("/", ".")
             for top in ("apps", "bench", "core") for p in (ROOT / top).rglob("__init__.py")}
    assert found | {"apps.conf"} == listed
