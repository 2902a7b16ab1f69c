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


def test_tls_weights_are_continuous_and_truncate() -> None:
    c2, mu = torch.tensor([[4.0]]), torch.tensor([[2.0]])
    lower, upper = 2.0 / 3.0 * 4.0, 1.5 * 4.0
    s = torch.tensor([[0.0, lower, 0.5 * (lower + upper), upper, 100.0]])
    w = gnc.tls_weights(s, c2, mu)
    assert w[0, 0] == 1.0 and w[0, -1] == 0.0
    assert float(w[0, 1]) == pytest.approx(1.0) and float(w[0, 3]) == pytest.approx(0.0)
    assert 0.0 < float(w[0, 2]) < 1.0
    # as mu grows the weights become the truncation s <= c^2
    w = gnc.tls_weights(torch.tensor([[3.9, 4.1]]), c2, torch.tensor([[1e6]]))
    assert w.tolist() == [[1.0, 0.0]]


def test_graduated_tls_rejects_a_consistent_group_of_outliers() -> None:
    """A robust mean: 30 inliers ~N(0, 1) and 10 outliers at 8 (one consistent group, far enough
    to bias least squares by 2 but not so far that a plain truncation from the least-squares
    start would see them): GNC-TLS with c = 3 recovers the inliers' mean."""
    gen = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(30, generator=gen, dtype=torch.float64),
                      8.0 + 0.1 * torch.randn(10, generator=gen, dtype=torch.float64)])
    calls = []

    def solve(weight: torch.Tensor, values: dict[str, torch.Tensor], iters: int
              ) -> dict[str, torch.Tensor]:
        calls.append(iters)
        return {"x": (weight * data).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True)}

    def squared(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return (data[None] - values["x"]) ** 2

    start = {"x": data.mean().reshape(1, 1)}
    out = gnc.graduated_tls(solve, squared, start, torch.tensor([3.0]), stage_iters=4,
                            final_iters=20)
    assert float(start["x"]) > 1.5  # least squares is pulled towards the group
    assert abs(float(out["x"]) - float(data[:30].mean())) < 1e-9
    assert calls[0] == 4 and calls[-1] == 20 and len(calls) < 30
    with pytest.raises(ValueError, match="GNC-TLS"):
        gnc.graduated_tls(solve, squared, start, torch.tensor([0.0]))
