"""Shared by the app tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


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
