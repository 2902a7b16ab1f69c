"""Shared plumbing of the apps: the memory a backward mode keeps (``common.saved_bytes``),
JSON lines, ROC AUC, the worker processes of ``common.map_calls``."""

from __future__ import annotations

import json
import math

import pytest
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


def test_map_calls_shares_the_calls_with_a_worker_process_in_order() -> None:
    """``map_calls`` gives ``[fn(*args)]`` in the calls' order, with or without a pool; with a
    pool of one worker, this process takes calls from the front and the worker from the back
    (the first call ran here, the last one in the worker); tensors and configs (with enums)
    travel both ways."""
    import os
    import time

    from omegaconf import OmegaConf

    from apps.pose_graph.train import PoseGraphConfig

    cfg = OmegaConf.structured(PoseGraphConfig)  # enums pickle only as plain values
    x = torch.arange(6, dtype=torch.float64)
    calls = [(os.getpid, ()), *[(time.sleep, (0.2,))] * 4, (torch.mul, (x, 2.0)),
             (OmegaConf.to_yaml, (cfg.model,)), (os.getpid, ())]
    pool = common.worker_pool(1, torch.device("cpu"))
    assert pool is not None and common.worker_pool(1, torch.device("cpu")) is pool
    shared = common.map_calls(calls, pool)
    alone = common.map_calls(calls, None)
    assert shared[0] == alone[0] == alone[-1] == os.getpid() != shared[-1]
    assert shared[1:5] == alone[1:5] == [None] * 4
    assert torch.equal(shared[5], 2 * x) and torch.equal(alone[5], 2 * x)
    assert "warm_start: tls" in shared[6] and "warm_start: tls" in alone[6]
    assert common.worker_pool(0, torch.device("cpu")) is None


def test_worker_pool_rejects_a_negative_size() -> None:
    with pytest.raises(ValueError, match="workers"):
        common.worker_pool(-1, torch.device("cpu"))


def test_released_pool_is_replaced_by_a_new_one() -> None:
    """``release_pools`` lets the workers go without waiting; the next ``worker_pool`` is a new
    pool that works."""
    import os

    old = common.worker_pool(1, torch.device("cpu"))
    common.release_pools()
    with pytest.raises(RuntimeError, match="shutdown"):
        old.submit(os.getpid)
    new = common.worker_pool(1, torch.device("cpu"))
    assert new is not old and new.submit(os.getpid).result() != os.getpid()


def test_harness_releases_the_workers_after_the_baselines(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The harness lets the baselines' workers go once the baselines are done (every app's
    last use of them), also when a baseline raises."""
    from apps import harness

    released: list[int] = []
    monkeypatch.setattr(common, "release_pools", lambda: released.append(1))

    class Failing:
        name, metric = "failing", "error"

        def baseline(self, run: object) -> dict:
            raise RuntimeError("baseline failed")

    with pytest.raises(RuntimeError, match="baseline failed"):
        harness._reference(Failing(), None, None)  # type: ignore[arg-type]
    assert released == [1]
