"""Smoke test of bench.train_step (not timed): the ragged step's gradients equal the loop's."""

from __future__ import annotations

from bench import train_step


def test_train_step_smoke() -> None:
    rows = train_step.run(graphs=2, repeats=1, max_iters=3)
    assert [r["mode"] for r in rows] == ["loop", "ragged", "ragged-new", "ragged-merged"]
    for r in rows:
        assert r["step_s"] > 0 and r["grad_rel_diff"] < 1e-8
        assert 0 < r["factor_s"] < r["step_s"]
    assert rows[1]["iterations"] <= 3 < rows[0]["iterations"]
    # the ragged call factors each problem once per iteration it runs, as the loop does
    loop, mine, merged = rows[0]["factored"], rows[1]["factored"], rows[3]["factored"]
    assert mine == loop <= merged == 2 * (rows[3]["iterations"] + 1)
