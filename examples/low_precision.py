"""Low-precision training with adamkit: the two experiments docs/precision.md reports.

1. ``regression``: a linear regression whose weights sit in [1, 2), where bfloat16's ulp
   is 2^-7, trained with lr = 3e-4, so every Adam update is ~10× smaller than half an
   ulp. bfloat16 params updated "nearest" (torch's rounding) never move; "kahan",
   "master" and "stochastic" keep what rounding drops and train like float32.
2. ``mlp``: an MLP regression trained with fp32 moments and with int8 moments (every
   tensor, int8_min_size=0): final losses agree within a percent.
3. ``gradient_drop``: the second moment after the gradient scale drops 100×: fp32 and
   int8 v decay (int8 with its block's scale), bf16 v cannot (see docs/precision.md).

Run ``python examples/low_precision.py`` for the table; tests/test_precision_evidence.py
asserts the same numbers, docs/scripts/precision_plot.py draws them.
"""

from __future__ import annotations

import torch

import adamkit

REGRESSION_STEPS = 300


def regression(dtype: torch.dtype = torch.float32, steps: int = REGRESSION_STEPS,
               **opt_kwargs) -> list[float]:
    """The loss before each step and after the last (steps + 1 values), full batch.

    The forward pass reads the params in float32 (``w.float()``), so the only
    low-precision effect is where the weights are stored and how updates reach them."""
    gen = torch.Generator().manual_seed(0)
    n, d = 256, 64
    x = torch.randn(n, d, generator=gen)
    w0 = 1 + 0.9 * torch.rand(d, generator=gen)  # in [1, 1.9): bfloat16 ulp 2^-7
    target = (w0 + 0.04 * torch.randn(d, generator=gen)).clamp(1.0, 1.99)
    y = x @ target
    w = torch.nn.Parameter(w0.to(dtype))
    opt = adamkit.Adam([w], lr=3e-4, **opt_kwargs)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((x @ w.float() - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(((x @ w.float() - y) ** 2).mean().item())
    return losses


def mlp(seed: int, steps: int = 200, **opt_kwargs) -> tuple[list[float], float]:
    """(training losses, state bytes per param element) of a 16-64-64-1 tanh MLP fitted
    to a noisy random teacher (noise floor 0.01), lr 1e-2 decaying linearly to 0."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(2048, 16, generator=gen)
    with torch.no_grad():
        y = teacher(x) + 0.1 * torch.randn(2048, 1, generator=gen)
    torch.manual_seed(seed + 100)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = adamkit.Adam(model.parameters(), lr=1e-2, **opt_kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(torch.nn.functional.mse_loss(model(x), y).item())
    return losses, opt.state_bytes(per_element=True)


def gradient_drop(state_format: str, steps: int = 3000, drop_at: int = 500) -> list[float]:
    """Median second moment v of 8192 float32 params, after each step, when the gradient
    scale drops 100× at step ``drop_at`` (random normal gradients, β2 = 0.999)."""
    p = torch.nn.Parameter(torch.zeros(8192))
    opt = adamkit.Adam([p], lr=1e-3, state_format=state_format, int8_min_size=0)
    gen = torch.Generator().manual_seed(0)
    medians = []
    for t in range(steps):
        p.grad = torch.randn(8192, generator=gen) * (1.0 if t < drop_at else 0.01)
        opt.step()
        st = opt.state[p]
        v = adamkit.formats.state.read(st["exp_avg_sq"], st.get("exp_avg_sq_scale"),
                                       adamkit.formats.stored_formats(st)[0], "exp_avg_sq")
        medians.append(v.median().item())
    return medians


def reduction(losses: list[float]) -> float:
    return losses[0] - losses[-1]


def main() -> None:
    base = regression(torch.float32)
    print(f"regression (d=64, lr=3e-4, {REGRESSION_STEPS} steps): loss {base[0]:.4f} → ...")
    print(f"  {'float32 params':28s} final {base[-1]:.5f}  reduction 100% (the yardstick)")
    for update in ("nearest", "kahan", "master", "stochastic"):
        losses = regression(torch.bfloat16, param_update=update)
        share = reduction(losses) / reduction(base)
        print(f"  {'bfloat16, ' + update:28s} final {losses[-1]:.5f}  reduction {share:6.1%} of float32's")
    print("mlp (16-64-64-1, 200 steps), final loss with fp32 vs int8 moments:")
    for seed in range(3):
        fp32, b32 = mlp(seed)
        int8, b8 = mlp(seed, state_format="int8", int8_min_size=0)
        print(f"  seed {seed}: fp32 {fp32[-1]:.5f} ({b32:.2f} B/param)  int8 {int8[-1]:.5f} "
              f"({b8:.2f} B/param)  {int8[-1] / fp32[-1] - 1:+.2%}")
    print("median v after the gradient scale drops 100x at step 500 (beta2 = 0.999):")
    for fmt in ("fp32", "bf16", "int8"):
        v = gradient_drop(fmt)
        print(f"  {fmt}: step 500 {v[499]:.3g}, 1000 {v[999]:.3g}, 3000 {v[-1]:.3g}")


if __name__ == "__main__":
    main()
