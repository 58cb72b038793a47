"""Helpers shared by the checkpoint tests of every storage (test_storage_checkpoints.py,
test_torch_optim_checkpoints.py): small params of two shapes, a few seeded steps on
gradients spread over three decades, and the moments as adamkit reads them."""

from __future__ import annotations

import copy

import torch

import adamkit
from adamkit import formats
from adamkit.formats import state as fmt_state
from adamkit.formats import stored_formats
from registry import Storage

SHAPES = [(24, 25), (7,)]  # three int8 blocks (one partial), and a small tensor
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def train(params, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 10 ** torch.empty(p.shape).uniform_(
                -3, 0, generator=gen)).to(p.dtype)
        opt.step()


def make_opt(params, storage: Storage, **kw):
    return adamkit.Adam(params, lr=1e-2, amsgrad=True, seed=5, **storage.kwargs(), **kw)


def read_moment(state: dict, name: str) -> torch.Tensor:
    """Moment ``name`` of one param's state as adamkit reads it (int8 dequantized)."""
    return fmt_state.read(state[name], state.get(f"{name}_scale"), stored_formats(state)[0], name)


def with_legacy_tags(sd, opt):
    """``sd`` as adamkit saved it before states were read from their tensors: each param's
    state also holds its format and update policy as str tags."""
    sd = copy.deepcopy(sd)
    index = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if index in sd["state"]:
                sd["state"][index].update(zip(("state_format", "param_update"), formats.resolve(p, group)))
            index += 1
    return sd
