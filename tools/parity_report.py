"""Measure the parity errors the tests bound: adamkit vs torch.optim and vs the reference.

    python tools/parity_report.py

For every configuration shared with torch.optim (the test registry's cases), every
backend and float64/float32, it runs the tests' 120-step lockstep (float32 re-synced
after each step) and prints the largest error over all steps, params and moments,
relative to each tensor's largest magnitude: the metric of tests/helpers.py.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import lockstep  # noqa: E402
from registry import ALL_BACKENDS, CASES, TORCH_CASES  # noqa: E402

LR = 2e-2


def scaled_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / scale if scale else 0.0


def worst(make_a, make_b, dtype) -> float:
    errors = []

    def compare(step, ma, oa, mb, ob):
        for pa, pb in zip(ma.parameters(), mb.parameters()):
            errors.append(scaled_error(pa, pb))
            for key, value in oa.state[pa].items():
                if key != "step" and torch.is_tensor(value):
                    errors.append(scaled_error(value, ob.state[pb][key]))

    lockstep(make_a, make_b, dtype=dtype, compare=compare, resync=dtype != torch.float64)
    return max(errors)


def main() -> None:
    print("| case | peer | backend | float64 | float32 |")
    print("|---|---|---|---|---|")
    for case in CASES:
        for backend in ALL_BACKENDS:
            row = []
            for dtype in (torch.float64, torch.float32):
                mine = lambda ps: case.cls(ps, lr=LR, backend=backend, **case.kwargs)  # noqa: E731
                if case in TORCH_CASES:
                    peer = lambda ps: case.torch_cls(ps, lr=LR, **case.torch_kwargs)  # noqa: E731
                else:
                    peer = lambda ps: case.cls(ps, lr=LR, backend="reference", **case.kwargs)  # noqa: E731
                row.append(f"{worst(mine, peer, dtype):.2e}")
            name = "torch.optim" if case in TORCH_CASES else "reference"
            print(f"| {case.id} | {name} | {backend} | {row[0]} | {row[1]} |")


if __name__ == "__main__":
    main()
