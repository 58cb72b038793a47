"""The declarative test registry: what to test, expanded into every combination.

A new optimizer, backend, dtype or weight-decay mode joins every parity test by adding
one entry here. Tolerances live in one table per comparison, keyed by dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import adamkit
from adamkit import backends

# Weight-decay modes: name -> (adamkit kwargs, torch.optim kwargs or None if torch has none).
WEIGHT_DECAY = {
    "no_wd": ({"weight_decay": 0.0}, {"weight_decay": 0.0}),
    "l2": ({"weight_decay": 0.05}, {"weight_decay": 0.05}),
    "decoupled": (
        {"weight_decay": 0.05, "decouple_wd": True},
        {"weight_decay": 0.05, "decoupled_weight_decay": True},
    ),
    "fully_decoupled": ({"weight_decay": 1e-3, "decouple_lr": True, "max_lr": 2e-2}, None),
}


@dataclass(frozen=True)
class Case:
    id: str
    cls: type
    kwargs: dict[str, Any]
    torch_cls: type | None  # None: no torch equivalent, compared with the reference only
    torch_kwargs: dict[str, Any] | None = field(default=None)


def expand_cases() -> list[Case]:
    cases = []
    for cls, torch_cls in ((adamkit.Adam, torch.optim.Adam), (adamkit.AdamW, torch.optim.AdamW)):
        for wd_name, (ak_wd, torch_wd) in WEIGHT_DECAY.items():
            if cls is adamkit.AdamW:
                if wd_name == "l2":
                    continue  # AdamW has no coupled mode
                ak_wd = {k: v for k, v in ak_wd.items() if k != "decouple_wd"}
                torch_wd = None if torch_wd is None else {"weight_decay": torch_wd["weight_decay"]}
            for amsgrad in (False, True):
                for maximize in (False, True):
                    flags = {"amsgrad": amsgrad, "maximize": maximize}
                    name = f"{cls.__name__}-{wd_name}" + "-amsgrad" * amsgrad + "-max" * maximize
                    cases.append(
                        Case(
                            name,
                            cls,
                            {**ak_wd, **flags},
                            torch_cls if torch_wd is not None else None,
                            None if torch_wd is None else {**torch_wd, **flags},
                        )
                    )
    return cases


CASES = expand_cases()
TORCH_CASES = [c for c in CASES if c.torch_cls is not None]
# Every backend but the oracle itself is compared with it.
FAST_BACKENDS = [name for name in backends.BACKENDS if name != "reference"]
ALL_BACKENDS = list(backends.BACKENDS)

# Max error allowed against torch.optim after each step of a 100+ step run, as
# (rtol, atol) relative to each tensor's largest magnitude (helpers.assert_close_scaled).
# float64: only the last bits of float64 arithmetic differ. float32: a few ulps
# (float32's unit roundoff is 6e-8).
TORCH_PARITY_TOL = {
    torch.float64: (1e-12, 1e-15),
    torch.float32: (5e-7, 1e-9),
}

# Backend vs the float64 reference after a few steps from the same start, as
# (rtol, atol) on params and moments: a few units of the storage dtype's rounding.
REFERENCE_TOL = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (4e-3, 1e-4),
}
