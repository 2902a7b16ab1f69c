"""The training apps. Each registers itself by its name in :data:`APPS`; its ``train`` module
defines ``TASK`` (an ``apps.harness.Task``) and runs with ``python -m apps.<name>``. The shared
contract tests (``tests/apps/test_contract.py``) run for every registered app."""

from __future__ import annotations

import importlib
from typing import Any

#: the registered apps (each ``apps/<name>/train.py`` defines ``TASK``)
APPS: tuple[str, ...] = ("pose_graph", "bundle_adjustment", "homography", "motion_planning",
                          "tactile")


def task(name: str) -> Any:
    """The ``apps.harness.Task`` of the registered app ``name``."""
    if name not in APPS:
        raise ValueError(f"unknown app {name!r}; the apps are {', '.join(APPS)}")
    return importlib.import_module(f"apps.{name}.train").TASK
