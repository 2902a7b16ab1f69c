"""The contract of ../shared/APPS.md, written once and run for every registered app
(``apps.APPS``): a smoke run through Hydra's compose API with its outputs and metric keys, resume
equivalence, unknown keys and wrong types rejected, bad values named, a corrupt checkpoint named,
torchrun with two ranks, a Hydra multirun from the command line, and ``solver=cudss`` without
CUDA refused with what is missing. ``tests/apps/<app>/`` holds only what is the app's own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

import apps
from apps import common
from apps.harness import fit

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.parametrize("app", apps.APPS)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory, app_config
               ) -> dict[str, tuple[Path, dict]]:
    """One smoke run per app, shared by the tests that only read its outputs."""
    runs = {}
    for app in apps.APPS:
        out = tmp_path_factory.mktemp(f"smoke_{app}")
        runs[app] = out, fit(apps.task(app), app_config(app, out))
    return runs


def test_smoke_run_writes_the_contract_outputs(app: str, smoke_runs) -> None:
    task = apps.task(app)
    out, doc = smoke_runs[app]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(doc))
    assert saved["app"] == app and saved["epochs"] == 1 and saved["train_time_s"] >= 0
    keys = {task.metric, f"{task.metric}_baseline", *task.keys}
    assert keys <= set(saved["val"])
    assert all(math.isfinite(saved["val"][k]) for k in keys)
    history = saved["history"]
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    assert {"epoch", "train_loss", f"val_{task.metric}", "epoch_time_s", "step_time_s",
            "saved_mb"} <= set(history[0])
    assert f"val_{task.metric}" in saved["untrained"]
    state = common.load_checkpoint(out / "checkpoint.pt")
    assert state is not None and saved["backward"] == state["config"]["optimizer"]["backward"]
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and rows[0].startswith("epoch,train_loss")
    assert (out / "curves.png").stat().st_size > 0
    state = common.load_checkpoint(out / "checkpoint.pt")
    assert state is not None and state["epoch"] == 1 and "reference" in state
    assert not list(out.glob(".*"))  # no temporary files left behind
    mode = (out / "metrics.json").stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # the umask's mode, not mkstemp's 0600


def test_resume_matches_uninterrupted_run(app: str, tmp_path: Path, app_config, same_run
                                          ) -> None:
    """2 epochs straight equal 1 epoch, then ``resume=true`` to 2, in metrics and history; a
    temp file of an interrupted checkpoint write is removed on resume."""
    task = apps.task(app)
    straight, split, cache = tmp_path / "straight", tmp_path / "split", tmp_path / "cache"
    full = fit(task, app_config(app, straight, "epochs=2", cache=cache))
    first = fit(task, app_config(app, split, "epochs=1", cache=cache))
    assert len(first["history"]) == 1
    (split / ".checkpoint.pt.abc123").write_bytes(b"half a checkpoint")  # a killed writer's
    resumed = fit(task, app_config(app, split, "epochs=2", "resume=true", cache=cache))
    assert same_run(resumed["history"], full["history"])
    assert same_run(resumed["val"], full["val"])
    state = common.load_checkpoint(split / "checkpoint.pt")
    assert state is not None and state["epoch"] == 2
    assert not list(split.glob(".checkpoint.pt.*"))


def test_resume_without_checkpoint_starts_afresh(app: str, tmp_path: Path, app_config) -> None:
    doc = fit(apps.task(app), app_config(app, tmp_path, "resume=true", "epochs=0"))
    assert doc["history"] == [] and not (tmp_path / "checkpoint.pt").exists()


def test_unknown_keys_and_wrong_types_are_rejected(app: str, tmp_path: Path, app_config
                                                  ) -> None:
    task = apps.task(app)
    with pytest.raises(ConfigCompositionException):
        app_config(app, tmp_path, "no_such_key=1")
    with pytest.raises(ValueError, match="unknown config key 'no_such_key'"):
        fit(task, app_config(app, tmp_path, "+no_such_key=1"))
    with pytest.raises(ValueError, match="unknown config key 'data.bogus'"):
        fit(task, app_config(app, tmp_path, "+data.bogus=1"))
    with pytest.raises(ValueError, match="unknown config key 'optimizer.damping'"):
        fit(task, app_config(app, tmp_path, "+optimizer.damping=1"))  # core's name: damping_init
    for wrong in ("optimizer.backward=sideways", "epochs=many", "solver=nonsense",
                  "optimizer.damping_mode=wild", "data=3"):
        with pytest.raises((ConfigCompositionException, ValidationError)):
            app_config(app, tmp_path, wrong)


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size must be >= 1, got 0"),
    ("num_train=0", "num_train must be >= 1, got 0"),
    ("lr=-1", "lr must be > 0, got -1"),
    ("epochs=-2", "epochs must be >= 0, got -2"),
])
def test_bad_values_are_named(app: str, tmp_path: Path, app_config, override: str,
                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit(apps.task(app), app_config(app, tmp_path, override))


def test_corrupt_checkpoint_raises_with_path(app: str, tmp_path: Path, app_config) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        fit(apps.task(app), app_config(app, tmp_path, "resume=true"))


def test_cudss_composes_and_names_what_is_missing(app: str, tmp_path: Path, app_config) -> None:
    cfg = app_config(app, tmp_path, "solver=cudss")
    assert cfg.solver.name.value == "cudss"
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU tests run cuDSS")
    with pytest.raises(ValueError, match=r"solver=cudss runs on CUDA.*device is cpu"):
        fit(apps.task(app), cfg)


def test_show_without_display_is_refused_up_front(app: str, tmp_path: Path, app_config,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(ValueError, match="show=true.*no display"):
        fit(apps.task(app), app_config(app, tmp_path, "show=true"))


@pytest.mark.slow
def test_torchrun_two_ranks(app: str, tmp_path: Path, torchrun_two_ranks) -> None:
    task = apps.task(app)
    saved = torchrun_two_ranks(f"apps.{app}", tmp_path)
    assert {task.metric, f"{task.metric}_baseline", *task.keys} <= set(saved["val"])
    assert len(saved["history"]) == 1


@pytest.mark.slow
def test_multirun_from_the_command_line(app: str, tmp_path: Path) -> None:
    """``python -m apps.<app> -m preset=smoke seed=0,1``: Hydra's multirun, one run folder (and
    ``metrics.json``) per seed."""
    run = subprocess.run([sys.executable, "-m", f"apps.{app}", "-m", "preset=smoke", "seed=0,1",
                          f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    docs = [json.loads((tmp_path / str(k) / "metrics.json").read_text()) for k in (0, 1)]
    metric = apps.task(app).metric
    assert all(math.isfinite(d["val"][metric]) for d in docs)
    assert docs[0]["val"][metric] != docs[1]["val"][metric]  # different seeds, different data
    assert (tmp_path / "0" / f"{app}.log").is_file()


def test_cli_bad_setting_is_one_line_and_exit_1(app: str, tmp_path: Path) -> None:
    """``python -m apps.<app> batch_size=0``: the message, no traceback, exit status 1."""
    run = subprocess.run([sys.executable, "-m", f"apps.{app}", "preset=smoke", "batch_size=0",
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"python -m apps.{app}: error: batch_size must be >= 1, got 0")
    assert "Traceback" not in run.stderr
