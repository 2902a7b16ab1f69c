"""Sensitivity analysis through the optimization layer.

Fits y = a x^2 + b to 100 points (float64, implicit backward), computes da/dx_k and da/dy_k for
every data point with autograd through the layer, and compares them with the closed form: the fit
is linear in (a, b), so (a, b) = (X^T X)^-1 X^T y with rows X_k = (x_k^2, 1), and differentiating
the normal equations gives
    d(a, b)/dy_k = M X_k,    d(a, b)/dx_k = 2 x_k (M e_a r_k - M X_k a),
with M = (X^T X)^-1, e_a = (1, 0) and r_k = y_k - a x_k^2 - b. Saves sensitivity.png (data, fitted
curve and the negated derivative arrows (-da/dx_k, -da/dy_k) at each point) and prints
``max_abs_err=<float>`` last.
"""

from __future__ import annotations

import argparse

import torch

import core


def closed_form(
    x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, b)``, ``d(a, b)/dx (100, 2)`` and ``d(a, b)/dy (100, 2)`` for 1-D ``x``, ``y``."""
    X = torch.stack([x**2, torch.ones_like(x)], dim=1)
    M = torch.linalg.inv(X.T @ X)
    ab = M @ X.T @ y
    r = y - X @ ab
    d_dy = X @ M  # row k: M X_k (M symmetric)
    e_a = torch.tensor([1.0, 0.0], dtype=x.dtype)
    d_dx = 2 * x[:, None] * (r[:, None] * (M @ e_a)[None] - ab[0] * d_dy)
    return ab, d_dx, d_dy


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sensitivity.png")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 100, generator=gen, dtype=torch.float64).requires_grad_()
    noise = 0.05 * torch.randn(1, 100, generator=gen, dtype=torch.float64)
    y = (x.detach() ** 2 + 0.5 + noise).requires_grad_()
    a, b = core.Variable("a", core.Vector(1)), core.Variable("b", core.Vector(1))
    fit = core.Cost(lambda a, b, x, y: y - (a * x**2 + b), optimized=(a, b), aux=(x, y), name="fit")
    layer = core.OptimizationLayer(
        core.Objective([fit]), core.LevenbergMarquardt(max_iters=20), backward="implicit"
    )
    init = {"a": x.new_ones(1, 1, 1), "b": x.new_zeros(1, 1, 1)}
    solution, info = layer(init)
    da_dx, da_dy = torch.autograd.grad(solution["a"].sum(), (x, y))
    ab, ref_dx, ref_dy = closed_form(x.detach()[0], y.detach()[0])
    err = max(
        float((da_dx[0] - ref_dx[:, 0]).abs().max()),
        float((da_dy[0] - ref_dy[:, 0]).abs().max()),
        float((solution["a"].detach().reshape(()) - ab[0]).abs()),
    )
    _plot(x.detach()[0], y.detach()[0], ab, da_dx[0], da_dy[0], args.out)
    print(
        f"a={float(ab[0]):.6f} b={float(ab[1]):.6f} iterations={int(info.iterations[0])} "
        f"figure={args.out}"
    )
    print(f"max_abs_err={err:.3e}")
    return err


def _plot(x, y, ab, da_dx, da_dy, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    grid = torch.linspace(0, 1, 200, dtype=x.dtype)
    ax.plot(grid, ab[0] * grid**2 + ab[1], "k-", label=f"fit a={ab[0]:.3f}, b={ab[1]:.3f}")
    ax.scatter(x, y, s=12, c="tab:blue", label="data")
    longest = float(torch.hypot(da_dx, da_dy).max())  # draw the longest arrow 0.1 long
    ax.quiver(
        x,
        y,
        -da_dx,
        -da_dy,
        angles="xy",
        scale_units="xy",
        scale=longest / 0.1,
        width=0.003,
        color="tab:red",
        label=f"-(da/dx, da/dy), longest = {longest:.2f}",
    )
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("How the fitted a moves with each data point")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
