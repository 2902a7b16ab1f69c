"""Shared by the app tests."""

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

from apps import common

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.fixture
def same_run() -> Callable[[Any, Any], bool]:
    """``same_run(a, b)``: two runs' metric records agree once timings (keys holding
    ``time_s``, e.g. ``solve_time_s_baseline``) are dropped, floats to 1e-9 (CUDA's atomic
    scatter-adds reorder sums: a resumed GPU run differed from an uninterrupted one in the 14th
    digit)."""
    return lambda a, b: _same(_without_times(a), _without_times(b))


@pytest.fixture
def resumed_equals_straight(same_run) -> Callable[..., None]:
    """``check(run, config, tmp_path)``: 2 epochs straight equal 1 epoch, then ``resume=true`` to
    2, in metrics and history (``config(folder, *overrides, cache=...)`` composes the app's
    config, ``run`` trains)."""

    def check(run: Callable[[Any], dict], config: Callable[..., Any], tmp_path: Path) -> None:
        straight, split, cache = tmp_path / "straight", tmp_path / "split", tmp_path / "cache"
        full = run(config(straight, "epochs=2", cache=cache))
        first = run(config(split, "epochs=1", cache=cache))
        assert len(first["history"]) == 1
        resumed = run(config(split, "epochs=2", "resume=true", cache=cache))
        assert same_run(resumed["history"], full["history"])
        assert same_run(resumed["val"], full["val"])
        state = common.load_checkpoint(split / "checkpoint.pt")
        assert state is not None and state["epoch"] == 2

    return check


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
                   f"device={device}", "preset=smoke", "data.num_val=2", *overrides,
                   f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                             env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads((run_dir / "metrics.json").read_text())

    return launch
