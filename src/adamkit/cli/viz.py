"""``adamkit viz``: how Adam moves compared with its ancestors, on 2-D test functions.

Top row: SGD, SGD with momentum, RMSprop, AdaGrad and Adam on Rosenbrock, Beale and a
saddle. Momentum smooths the path but keeps SGD's blindness to scale (tiny steps where
the gradient is small); RMSprop rescales each coordinate by its gradient's running RMS
(even steps in every direction) but without momentum it zig-zags; Adam does both.
Bottom row: the loss along the way, and what bias correction does in the first steps.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import adamkit

from .errors import CliError
from .files import atomic_write, output_png
from .plots import pyplot


def rosenbrock(x: Tensor, y: Tensor) -> Tensor:
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def beale(x: Tensor, y: Tensor) -> Tensor:
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def saddle(x: Tensor, y: Tensor) -> Tensor:
    return x**2 - y**2


@dataclass(frozen=True)
class Problem:
    name: str
    f: Callable[[Tensor, Tensor], Tensor]
    start: tuple[float, float]
    minimum: tuple[float, float] | None  # None: unbounded below (the saddle)
    box: tuple[float, float, float, float]  # x0, x1, y0, y1 of the panel
    steps: int
    lrs: dict[str, float]  # per optimizer: each needs its own scale (SGD's lr multiplies g)
    log_levels: bool = True  # contour levels spaced in log(f) for functions with a deep valley


PROBLEMS = (
    Problem("Rosenbrock  (1−x)² + 100(y−x²)²", rosenbrock, (-1.2, 1.0), (1.0, 1.0), (-2, 2, -1, 3), 500,
            {"SGD": 1e-3, "SGD + momentum": 1e-3, "RMSprop": 3e-2, "AdaGrad": 0.3, "Adam": 0.1}),
    Problem("Beale", beale, (1.0, 1.4), (3.0, 0.5), (-0.5, 4, -1.5, 2), 300,
            {"SGD": 1e-2, "SGD + momentum": 1e-3, "RMSprop": 3e-2, "AdaGrad": 0.3, "Adam": 0.1}),
    Problem("saddle  x² − y²", saddle, (-1.8, 1e-3), None, (-2, 2, -2, 2), 60,
            {"SGD": 0.05, "SGD + momentum": 0.02, "RMSprop": 0.02, "AdaGrad": 0.2, "Adam": 0.05},
            log_levels=False),
)

OPTIMIZERS: dict[str, Callable[[list[Tensor], float], torch.optim.Optimizer]] = {
    "SGD": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "SGD + momentum": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
    "RMSprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.99),
    "AdaGrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
    "Adam": lambda ps, lr: adamkit.Adam(ps, lr=lr),
}
STYLE = {"SGD": ("tab:gray", ":"), "SGD + momentum": ("tab:blue", "-"), "RMSprop": ("tab:orange", "-"),
         "AdaGrad": ("tab:green", "--"), "Adam": ("tab:red", "-")}


def trajectory(f, start, make_optimizer, lr: float, steps: int, limit: float = 1e3) -> list[tuple[float, float]]:
    """Points visited by an optimizer from ``start``; stops early if it runs off to infinity."""
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([p], lr)
    path = [start]
    for _ in range(steps):
        optimizer.zero_grad()
        f(p[0], p[1]).backward()
        optimizer.step()
        point = tuple(p.tolist())
        if not all(math.isfinite(c) and abs(c) < limit for c in point):
            break
        path.append(point)
    return path


def adam_without_bias_correction(f, start, lr: float, steps: int, betas=(0.9, 0.999), eps=1e-8):
    """Adam with the bias correction left out, written out here for the comparison only
    (adamkit itself always corrects): m and v start at 0 and are used as they are."""
    beta1, beta2 = betas
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    m, v = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    path, moments = [start], []
    for _ in range(steps):
        (grad,) = torch.autograd.grad(f(p[0], p[1]), p)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        with torch.no_grad():
            p -= lr * m / (v.sqrt() + eps)  # not m̂ / (√v̂ + ε): no division by 1 − β^t
        path.append(tuple(p.tolist()))
        moments.append((m.clone(), v.clone()))
    return path, moments


def adam_with_moments(f, start, lr: float, steps: int):
    """adamkit.Adam's path and its bias-corrected moments (m̂, v̂) after each step."""
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = adamkit.Adam([p], lr=lr)
    beta1, beta2 = optimizer.defaults["betas"]
    path, moments = [start], []
    for t in range(1, steps + 1):
        optimizer.zero_grad()
        f(p[0], p[1]).backward()
        optimizer.step()
        state = optimizer.state[p]
        path.append(tuple(p.tolist()))
        moments.append((state["exp_avg"] / (1 - beta1**t), state["exp_avg_sq"] / (1 - beta2**t)))
    return path, moments


def _contours(ax, problem: Problem) -> None:
    x0, x1, y0, y1 = problem.box
    xs, ys = torch.meshgrid(torch.linspace(x0, x1, 300), torch.linspace(y0, y1, 300), indexing="xy")
    z = problem.f(xs.double(), ys.double())
    if problem.log_levels:
        ax.contour(xs, ys, torch.log10(z + 1e-3), levels=25, cmap="Greys", linewidths=0.6, alpha=0.7)
    else:
        ax.contour(xs, ys, z, levels=25, cmap="Greys", linewidths=0.6, alpha=0.7)
    ax.set(xlim=(x0, x1), ylim=(y0, y1), aspect="equal", title=problem.name)


def _path_panel(ax, problem: Problem, paths: dict[str, list]) -> None:
    _contours(ax, problem)
    for name, path in paths.items():
        color, style = STYLE[name]
        xs, ys = zip(*path)
        ax.plot(xs, ys, style, color=color, lw=2.2 if name == "Adam" else 1.4, label=name, alpha=0.9)
        ax.plot(xs[-1], ys[-1], "o", color=color, ms=4)
    ax.plot(*problem.start, "ks", ms=6)
    if problem.minimum:
        ax.plot(*problem.minimum, "k*", ms=13)


def _loss_panel(ax, problem: Problem, paths: dict[str, list]) -> None:
    for name, path in paths.items():
        color, style = STYLE[name]
        losses = [problem.f(torch.tensor(x), torch.tensor(y)).item() for x, y in path]
        ax.semilogy(losses, style, color=color, lw=2.2 if name == "Adam" else 1.4, label=name)
    ax.set(xlabel="step", ylabel="f (log scale)", title=f"loss on {problem.name.split()[0]}")
    ax.grid(alpha=0.3)


def _bias_panels(ax_moments, ax_size, problem: Problem, lr: float, steps: int = 20) -> None:
    """Adam with and without bias correction on ``problem``, watching the x coordinate."""
    corrected, corrected_moments = adam_with_moments(problem.f, problem.start, lr, steps)
    raw, raw_moments = adam_without_bias_correction(problem.f, problem.start, lr, steps)
    t = range(1, steps + 1)
    for moments, color, kind in ((corrected_moments, "tab:red", "corrected m̂, v̂"),
                                 (raw_moments, "tab:purple", "uncorrected m, v")):
        ax_moments.semilogy(t, [abs(m[0].item()) for m, _ in moments], "o-", color=color, ms=4,
                            label=f"|m| of x, {kind}")
        ax_moments.semilogy(t, [v[0].sqrt().item() for _, v in moments], "s--", color=color, ms=4,
                            label=f"√v of x, {kind}")
    ax_moments.set(xlabel="step t", ylabel="size (log scale)", xticks=range(0, steps + 1, 5),
                   title=f"first {steps} steps on the saddle: Adam's moments")
    ax_moments.legend(fontsize=8, loc="lower right")
    ax_moments.grid(alpha=0.3)

    for path, color, label in ((corrected, "tab:red", "Adam (adamkit, bias-corrected)"),
                               (raw, "tab:purple", "Adam without bias correction")):
        # The largest per-coordinate move: Adam's step is lr·m̂/√v̂ per coordinate.
        sizes = [max(abs(b[i] - a[i]) for i in range(2)) / lr for a, b in zip(path, path[1:])]
        ax_size.plot(t, sizes, "o-", color=color, ms=4, label=label)
    ax_size.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax_size.set(xlabel="step t", ylabel="largest coordinate step ÷ lr", ylim=(0, 9),
                xticks=range(0, steps + 1, 5), title="what bias correction does to the step size")
    ax_size.text(0.97, 0.35, "m and v start at 0. Uncorrected, m₁ = (1−β1)·g = 0.1·g\n"
                 "but √v₁ = √(1−β2)·|g| ≈ 0.03·|g|, so the first steps\n"
                 "are 3–7× too long. Dividing m by 1−β1ᵗ and v by 1−β2ᵗ\n"
                 "makes step 1 exactly lr·sign(g).",
                 transform=ax_size.transAxes, ha="right", va="center", fontsize=8.5,
                 bbox=dict(boxstyle="round", fc="white", ec="0.8"))
    ax_size.legend(fontsize=8, loc="upper left")
    ax_size.grid(alpha=0.3)


def draw(out: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 10.5), dpi=100)
    all_paths = []
    for ax, problem in zip(axes[0], PROBLEMS):
        paths = {name: trajectory(problem.f, problem.start, make, problem.lrs[name], problem.steps)
                 for name, make in OPTIMIZERS.items()}
        _path_panel(ax, problem, paths)
        all_paths.append(paths)
    axes[0][0].legend(fontsize=9, loc="lower left")
    _loss_panel(axes[1][0], PROBLEMS[0], all_paths[0])
    _bias_panels(axes[1][1], axes[1][2], PROBLEMS[2], lr=0.01)
    fig.suptitle("Adam = momentum's smoothing (like SGD + momentum) × RMSprop's per-coordinate step size "
                 "(■ start, ★ minimum, ● where each stopped)", fontsize=12)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("viz", help="draw optimizer trajectories on 2-D test functions",
                              description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=output_png, default=Path("adamkit-viz.png"), help="PNG to write (default adamkit-viz.png)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.is_dir():  # (before the suffix: a directory has none, and that is not why)
        raise CliError(f"--out {out} is a directory; name a .png file")
    if out.suffix.lower() != ".png":
        raise CliError(f"--out must name a .png file, got {out}")
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise CliError(f"the directory of --out {what}: {out.parent}")
    if not os.access(out.parent, os.W_OK | os.X_OK):  # before seconds of drawing
        raise CliError(f"cannot write {out}: its directory is not writable")
    try:
        draw(out)
    except PermissionError as err:
        raise CliError(f"cannot write {out}: {err.strerror}")
    print(f"wrote {out}")
    return 0
