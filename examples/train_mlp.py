"""A small example training on built-in data: fit an MLP to a noisy 2-D spiral.

Compares adamkit.Adam with torch.optim.Adam side by side (they must agree) and
adamkit.AdamW with fully decoupled weight decay.
"""

import copy
import math

import torch

import adamkit


def spiral(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(n, generator=gen) * 4 * math.pi
    label = torch.randint(0, 2, (n,), generator=gen)
    r = t / (4 * math.pi)
    angle = t + math.pi * label
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1)
    return x + 0.02 * torch.randn(x.shape, generator=gen), label


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = spiral(2048, gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)
    )
    runs = {
        "torch.optim.Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
        "adamkit.Adam": lambda ps: adamkit.Adam(ps, lr=1e-2),
        "adamkit.AdamW(decouple_lr)": lambda ps: adamkit.AdamW(ps, lr=1e-2, weight_decay=1e-4, decouple_lr=True),
    }
    for name, make in runs.items():
        m = copy.deepcopy(model)
        opt = make(m.parameters())
        for step in range(1, 501):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            if step % 100 == 0:
                acc = (m(x).argmax(1) == y).float().mean().item()
                print(f"{name:28s} step {step:4d}  loss {loss.item():.4f}  accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
