"""Loss curves, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import require
from .files import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend, or CliError (train calls it before training:
    a matplotlib whose pyplot cannot import failed only at the first save)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")  # before pyplot is imported: never open a window
    return require("matplotlib.pyplot")


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values: per-step train loss is too noisy to read."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def diverged_at(rows: list[dict]) -> int | None:
    """If a run's metrics end with a loss that is not finite (its last training or
    validation loss is inf or NaN), the first step with such a loss; else None."""
    def finite(row: dict, key: str) -> bool:
        return row[key] is None or math.isfinite(row[key])

    vals = [r for r in rows if r["val_loss"] is not None]
    if not rows or (finite(rows[-1], "loss") and (not vals or finite(vals[-1], "val_loss"))):
        return None
    return next(r["step"] for r in rows if not (finite(r, "loss") and finite(r, "val_loss")))


def plot_runs(runs: dict[str, list[dict]], path: Path, baseline: float, title: str) -> None:
    """One figure: smoothed train loss (thin) and validation loss (markers) of each run,
    and where a run diverged, a dotted line at its first step without a finite loss."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        steps = [r["step"] for r in rows]
        losses = [r["loss"] for r in rows]
        window = max(1, len(rows) // 50)
        ax.plot(steps, smooth(losses, window), color=color, lw=1, alpha=0.6, label=f"{label} train")
        evals = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
        if evals:
            ax.plot(*zip(*evals), "o-", color=color, ms=4, lw=2, label=f"{label} validation")
        step = diverged_at(rows)
        if step is not None:
            ax.axvline(step, color=color, ls=":", lw=1.5, label=f"{label} diverged at step {step}")
    ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"uniform guess, ln(vocab) = {baseline:.2f}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats per character)", title=title)
    last = max((r["step"] for rows in runs.values() for r in rows), default=0)
    if last:  # the whole run: autoscaling leaves out the steps whose loss is not finite
        ax.set_xlim(0, last)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps, not 2.5
    top = max([baseline] + [r["loss"] for rows in runs.values() for r in rows[:1] if math.isfinite(r["loss"])])
    ax.set_ylim(bottom=0, top=math.ceil(top * 1.1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
