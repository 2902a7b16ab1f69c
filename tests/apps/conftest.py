"""Shared by the app tests: composing an app's config through Hydra's compose API, comparing two
runs' metrics, and launching an app under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from apps.config import conf_dir

ROOT = Path(__file__).resolve().parents[2]


def compose_app(app: str, out: Path, *overrides: str, cache: Path | None = None) -> DictConfig:
    """``app``'s smoke preset writing into ``out`` (threads left alone: the test process is
    shared), composed through Hydra's compose API."""
    cache = cache or out / "cache"
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(app, overrides=["preset=smoke", f"out_dir={out}", f"cache_dir={cache}",
                                       "threads=null", *overrides])


def _without_times(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _without_times(v) for k, v in x.items() if "time_s" not in k}
    if isinstance(x, list):
        return [_without_times(v) for v in x]
    return x


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, rel=1e-9, abs=1e-12)
    return a == b


def runs_agree(a: Any, b: Any) -> bool:
    """Two runs' metric records agree once timings (keys holding ``time_s``, e.g.
    ``solve_time_s_baseline``) are dropped, floats to 1e-9 (CUDA's atomic scatter-adds reorder
    sums: a resumed GPU run differed from an uninterrupted one in the 14th digit)."""
    return _same(_without_times(a), _without_times(b))


@pytest.fixture(scope="session")
def app_config() -> Callable[..., DictConfig]:
    """``app_config(app, out, *overrides, cache=None)``: see :func:`compose_app`."""
    return compose_app


@pytest.fixture
def same_run() -> Callable[[Any, Any], bool]:
    """``same_run(a, b)``: see :func:`runs_agree`."""
    return runs_agree


@pytest.fixture
def torchrun_two_ranks() -> Callable[..., dict]:
    """``launch(module, run_dir, *overrides)``: ``torchrun`` 2 ranks of the app's smoke preset;
    returns its ``metrics.json``. nccl needs a GPU per rank: with fewer than 2 GPUs both ranks
    train on the CPU (gloo)."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")

    def launch(module: str, run_dir: Path, *overrides: str) -> dict:
        device = "auto" if torch.cuda.device_count() >= 2 else "cpu"
        command = [torchrun, "--standalone", "--nproc_per_node=2", "-m", module,
                   f"device={device}", "preset=smoke", "num_val=2", *overrides,
                   f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                             env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads((run_dir / "metrics.json").read_text())

    return launch
