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


# ---- storage (docs/design/formats.md): param dtype × state format × param update ----------
# Every combination joins the storage tests (bitwise cpu == torch, every backend vs the
# reference, checkpoint conversion) by being listed here.
from adamkit import formats  # noqa: E402

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UPDATES_FOR = {torch.float32: ("nearest",), torch.bfloat16: formats.PARAM_UPDATES,
               torch.float16: formats.PARAM_UPDATES}


@dataclass(frozen=True)
class Storage:
    dtype: torch.dtype
    state_format: str
    param_update: str

    @property
    def id(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}-{self.state_format}-{self.param_update}"

    def kwargs(self) -> dict[str, Any]:
        """Optimizer kwargs; int8_min_size=0 so that int8 covers every tensor of a test."""
        return {"state_format": self.state_format, "param_update": self.param_update,
                "int8_min_size": 0}


STORAGE = [Storage(d, f, u) for d in PARAM_DTYPES for f in formats.STATE_FORMATS for u in UPDATES_FOR[d]]

# Hyperparameter variants each storage combination runs with.
STORAGE_VARIANTS = {
    "plain": {},
    "l2-amsgrad-max": {"weight_decay": 0.05, "amsgrad": True, "maximize": True},
    "decoupled": {"weight_decay": 0.05, "decouple_wd": True, "betas": (0.3, 0.99)},
    # √(1 − β2^t) rounds to 1 in float32 from step 4 on (β2^4 = 1e-8 < 2^-24): the CPU
    # kernel's path without ÷√bc2 (BC2_ONE), which every run takes once β2^t < 2^-24
    # (after ~16,600 steps with β2 = 0.999); test_storage checks that this variant gets there.
    "late-steps": {"betas": (0.9, 0.01)},
}

# One step of a fast backend vs the float64 reference from the same start, as (rtol, atol)
# relative to the tensor's largest magnitude (helpers.assert_close_scaled).
# The effective param (p; p + kahan_comp; master_param): the reference rounds θ_new once
# from float64, a fast backend from float32, so where θ_new lies within float32 error of
# a rounding point of the param dtype they round apart: one ulp of the param dtype
# (≤ 2^-7 of |θ| for bfloat16, 2^-10 for float16). With kahan the compensation holds what
# rounding lost, to the precision of the dtype's rounding of comp (|comp| ≤ half an ulp
# of p): about 2^-17 of |θ| for bfloat16, 2^-22 for float16; master is float32.
EFFECTIVE_PARAM_TOL = {
    (torch.float32, "nearest"): (1e-6, 1e-9),
    **{(torch.bfloat16, u): (2.0**-7, 0.0) for u in ("nearest", "stochastic")},
    **{(torch.float16, u): (2.0**-10, 0.0) for u in ("nearest", "stochastic")},
    (torch.bfloat16, "kahan"): (2.0**-16, 1e-9),
    (torch.float16, "kahan"): (2.0**-20, 1e-9),
    (torch.bfloat16, "master"): (1e-6, 1e-9),
    (torch.float16, "master"): (1e-6, 1e-9),
}
# fp32 moments after one step, relative to the largest operand (old moment, g, g²): the
# reference rounds once from float64, a fast backend three times in float32.
FP32_MOMENT_RTOL = 1e-6
# bf16 and int8 moments are compared as stored: identical, or one storage step apart (one
# bfloat16 ulp, one code) only where the oracle's unrounded float64 value lies within
# float32 error of the rounding point between the two (a near-tie: with bfloat16/float16
# gradients, which have few bits, products like 0.7·g fall on exact ties often, and
# float32(0.3) ≠ 0.3 breaks them one way). float32 error: a few 2^-24 of the operands
# (old moment, g, g²), elementwise. The params of those elements are not compared (their
# update differs by up to a step of the moment: 2^-8 for bf16, 2^-3 for int8).
NEAR_TIE_RTOL = 2.0**-20
