"""Fit y = a x^2 + b to 100 noisy points (a=1, b=0.5, seeded) with Levenberg-Marquardt."""

import torch

import core


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 100, generator=gen, dtype=torch.float64)
    y = x**2 + 0.5 + 0.01 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    a, b = core.Variable("a", core.Vector(1)), core.Variable("b", core.Vector(1))
    fit = core.Cost(lambda a, b, x, y: y - (a * x**2 + b), optimized=(a, b), aux=(x, y), name="fit")
    init = {
        "a": torch.ones(1, 1, 1, dtype=torch.float64),
        "b": torch.zeros(1, 1, 1, dtype=torch.float64),
    }
    solution = core.LevenbergMarquardt(max_iters=20).solve(core.Objective([fit]), init)
    info = solution.info
    print(
        f"status={info.status_names[0]} iterations={int(info.iterations[0])} "
        f"cost={float(info.final_cost[0]):.6g}"
    )
    print(
        f"a={float(solution.values['a'][0, 0, 0]):.6f} b={float(solution.values['b'][0, 0, 0]):.6f}"
    )


if __name__ == "__main__":
    main()
