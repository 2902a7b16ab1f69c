"""``apps.gnc``: the GNC-GM schedule (Yang et al. RA-L 2020) and the warm-started stages."""

from __future__ import annotations

import pytest
import torch

from apps import gnc


def test_schedule_runs_from_start_down_to_each_target() -> None:
    target = torch.tensor([1.0, 4.0, 100.0])
    stages = gnc.gm_schedule(target, start=64.0, factor=2.0)
    assert len(stages) == 7  # 64, 32, ..., 2, then the targets
    assert torch.equal(stages[0], torch.tensor([64.0, 64.0, 100.0]))
    assert torch.equal(stages[-1], target)
    for a, b in zip(stages, stages[1:]):
        assert bool((b <= a).all())  # never widens again
    assert all(bool((s >= target).all()) for s in stages)


@pytest.mark.parametrize("start, factor", [(64.0, 1.0), (0.0, 2.0), (-1.0, 2.0)])
def test_schedule_refuses_bad_settings(start: float, factor: float) -> None:
    with pytest.raises(ValueError, match="GNC"):
        gnc.gm_schedule(torch.tensor([1.0]), start, factor)


def test_graduated_warm_starts_each_stage_and_runs_the_last_longer() -> None:
    calls: list[tuple[list[float], float, int]] = []

    def solve(scale: torch.Tensor, values: dict[str, torch.Tensor], iters: int
              ) -> dict[str, torch.Tensor]:
        calls.append((scale.tolist(), float(values["x"]), iters))
        return {"x": values["x"] + 1}

    out = gnc.graduated(solve, {"x": torch.tensor(0.0)}, torch.tensor([2.0]), 8.0, 2.0, 3, 30)
    assert [c[0] for c in calls] == [[8.0], [4.0], [2.0]]
    assert [c[1] for c in calls] == [0.0, 1.0, 2.0]  # each stage starts from the last
    assert [c[2] for c in calls] == [3, 3, 30]
    assert float(out["x"]) == 3.0


def test_config_check_names_the_bad_value() -> None:
    gnc.check_config(gnc.GncConfig())
    with pytest.raises(ValueError, match="unknown loss types"):
        gnc.check_config(gnc.GncConfig(gtsam=["huber"]))
    with pytest.raises(ValueError, match="scales"):
        gnc.check_config(gnc.GncConfig(scales=[0.0]))
