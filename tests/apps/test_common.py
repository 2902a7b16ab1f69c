"""Shared plumbing of the apps: the memory a backward mode keeps (``common.saved_bytes``),
JSON lines, ROC AUC."""

from __future__ import annotations

import json
import math

import torch

import core
from apps import common


def _saved(mode: str, iters: int) -> int:
    x = torch.linspace(0, 1, 200, dtype=torch.float64)[None].requires_grad_()
    y = (x.detach() ** 2 + 0.5).requires_grad_()
    a, b = core.Variable("a", core.Vector(1)), core.Variable("b", core.Vector(1))
    fit = core.Cost(lambda a, b, x, y: y - (a * x**2 + b), optimized=(a, b), aux=(x, y),
                    name="fit")
    never = -float("inf")  # every iteration runs
    lm = core.LevenbergMarquardt(max_iters=iters, rel_tol=never, abs_tol=never, step_tol=never,
                                 grad_tol=never, min_gain=never)
    layer = core.OptimizationLayer(core.Objective([fit]), lm, backward=mode)  # type: ignore
    zero = torch.zeros(1, 1, 1, dtype=torch.float64)
    sol, _ = layer({"a": zero, "b": zero})
    return common.saved_bytes(sol["a"].sum() + sol["b"].sum())


def test_saved_bytes_grow_with_unrolled_iterations_only() -> None:
    unroll = [_saved("unroll", k) for k in (1, 2, 4)]
    assert unroll[0] < unroll[1] < unroll[2]
    for mode in ("implicit", "dlm"):
        flat = [_saved(mode, k) for k in (1, 2, 4)]
        assert flat[0] == flat[1] == flat[2] > 0
    assert common.saved_bytes(torch.ones(3)) == 0  # no graph


def test_json_line_is_valid_json_with_null_for_non_finite() -> None:
    line = common.json_line({"a": float("nan"), "b": [1.0, float("inf")], "c": torch.tensor(2.5)})
    assert json.loads(line) == {"a": None, "b": [1.0, None], "c": 2.5}


def test_roc_auc_counts_ties_half() -> None:
    assert common.roc_auc(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([False, True, True])) == 1.0
    assert common.roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == 0.5
    assert math.isnan(common.roc_auc(torch.tensor([1.0]), torch.tensor([True])))


def test_corrupt_cache_file_is_named(tmp_path) -> None:
    import pytest

    items = common.cached(tmp_path, "demo", {"k": 1}, lambda: [1, 2], lambda x: {"x": x},
                          lambda d: d["x"])
    assert items == [1, 2]
    (path,) = tmp_path.glob("demo_*.pt")
    assert common.cached(tmp_path, "demo", {"k": 1}, lambda: [], lambda x: {}, lambda d: d["x"]
                         ) == [1, 2]  # read back, not made again
    path.write_bytes(b"half a file")
    with pytest.raises(ValueError, match=f"{path}: cannot read the cached data set"):
        common.cached(tmp_path, "demo", {"k": 1}, lambda: [1], lambda x: {"x": x},
                      lambda d: d["x"])
