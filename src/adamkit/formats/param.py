"""Param update policies: how a bfloat16/float16 param is read and written by a step.

A low-precision param cannot hold an update much smaller than half its ulp (bfloat16
at 1.0: 2^-9 ≈ 0.002): rounding to nearest drops it, every step, and training stalls.
Each policy keeps what rounding loses somewhere (docs/design/formats.md):

* "nearest": nowhere (torch's behaviour). θ_eff = p; p ← round(θ_new).
* "kahan": in a compensation buffer of the param's dtype (Kahan summation; +2 bytes per
  bfloat16 param). θ_eff = p + comp; p ← round(θ_new); comp ← round(θ_new − p).
* "master": in a float32 copy (+4 bytes). θ_eff = master; master ← θ_new; p ← round(master).
* "stochastic": in expectation (no memory): p ← SR(θ_new) rounds up with probability
  equal to the fraction of the ulp below θ_new, with random bits from a counter-based
  hash of (seed, param index, step, element), so runs are reproducible and
  checkpointable by seed and step alone.

Everything here is torch ops; the CPU kernel implements the same bits (common.h).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .state import copy_like, round_to

MASK = 0xFFFFFFFF
BUFFERS = {"kahan": "kahan_comp", "master": "master_param"}


# ---- random bits ---------------------------------------------------------------------------


def mix32(x: int) -> int:
    """formats.md's 32-bit hash (a murmur-style finalizer), for host-side keys."""
    x &= MASK
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & MASK
    x ^= x >> 15
    x = (x * 0x735A2D97) & MASK
    x ^= x >> 15
    return x


def mix32_tensor(x: Tensor) -> Tensor:
    """mix32 elementwise on an int64 tensor of values in [0, 2^32): every product is
    below 2^62, so int64 arithmetic is exact and the mask is the mod 2^32."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK
    return x ^ (x >> 15)


def sr_seed(seed: int, index: int) -> int:
    """The per-param seed: mix32(seed ^ mix32(index)), index = position in the optimizer."""
    return mix32((seed & MASK) ^ mix32(index))


def step_key(seed_of_param: int, step: int) -> int:
    """The per-step key: mix32(sr_seed ^ mix32(t))."""
    return mix32(seed_of_param ^ mix32(step))


# Odd (2^32/φ): sr_seed + k·SEED_STRIDE mod 2^32 takes 2^32 distinct values in turn.
SEED_STRIDE = 0x9E3779B9


def advance_seeds(states: list[dict[str, Any]]) -> None:
    """Before a step the step counter cannot count (float32 past 2^24, where every step
    is taken at t = 2^24, as in torch.optim, so its key would repeat and every element
    would round the same way step after step): sr_seed ← (sr_seed + SEED_STRIDE) mod 2^32,
    in place, so the key differs (formats.md). The seed is in the checkpoint."""
    for st in states:
        st["sr_seed"].add_(SEED_STRIDE).bitwise_and_(MASK)


def random_bits(numel: int, key: int, device: torch.device) -> Tensor:
    """16 random bits r_i for the flat indices i of a tensor (int64 in [0, 2^16)): the
    hash h = mix32(((i >> 1) mod 2^32) ^ key) of each pair of elements, its low half for
    the even element and its high half for the odd one."""
    j = torch.arange((numel + 1) // 2, dtype=torch.int64, device=device) & MASK
    h = mix32_tensor(j ^ key)
    return torch.stack((h & 0xFFFF, h >> 16), dim=1).flatten()[:numel]


# ---- stochastic rounding ----------------------------------------------------------------------


def _int32_bits(x: Tensor) -> Tensor:
    """float32 bits as int64 in [0, 2^32)."""
    return x.view(torch.int32).to(torch.int64) & MASK


def _as_int32(u: Tensor) -> Tensor:
    """int64 in [0, 2^32) to int32 with the same bits."""
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


def round_stochastic(x: Tensor, r: Tensor, dtype: torch.dtype) -> Tensor:
    """x (float32) rounded to ``dtype`` up or down at random with the 16-bit values r
    (``random_bits``; only their low 16 bits, 13 for float16, are read).

    Adding r's low bits to the bits that rounding drops and truncating carries into the
    kept bits with probability (dropped part)/ulp: unbiased, E[SR(x)] = x."""
    u = _int32_bits(x)
    if dtype == torch.bfloat16:
        u = (u + (r & 0xFFFF)) & 0xFFFF0000
        high = u >> 16  # the bfloat16 bits, built directly (no float conversion)
        sr = torch.where(high >= 2**15, high - 2**16, high).to(torch.int16).view(torch.bfloat16)
        # A NaN's payload would carry into exponent and sign: round it to nearest instead.
        return torch.where(x.isnan(), x.to(torch.bfloat16), sr)
    if dtype == torch.float16:
        # Normal float16: 10 mantissa bits, so 13 float32 bits are dropped; the result has
        # 10 mantissa bits and converts to float16 exactly.
        normal = _as_int32((u + (r & 0x1FFF)) & 0xFFFFE000).view(torch.float32)
        # Subnormal float16 (|x| < 2^-14): a multiple k of 2^-24; s is exact (power of two).
        s = x.abs() * 2.0**24
        k = torch.floor(s + (r & 0x1FFF).to(torch.float32) * 2.0**-13)
        sub = torch.copysign(k * 2.0**-24, x)
        return torch.where(x.abs() >= 2.0**-14, normal, sub).to(torch.float16)
    raise ValueError(f"stochastic rounding is defined for bfloat16 and float16, not {dtype}")


# ---- the policies -------------------------------------------------------------------------------


def buffers(p: Tensor, update: str, seed_of_param: int | None = None) -> dict[str, Tensor]:
    """The fresh per-param state a policy needs (formats.md): zeros for kahan, a float32
    copy of p for master, the int64 0-dim sr_seed (on the host) for stochastic."""
    if update == "kahan":
        return {"kahan_comp": torch.zeros_like(p, memory_format=torch.preserve_format)}
    if update == "master":
        master = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        return {"master_param": master}
    if update == "stochastic":
        return {"sr_seed": torch.tensor(seed_of_param, dtype=torch.int64, device="cpu")}
    return {}


def theta_eff(p: Tensor, state: dict, update: str, work: torch.dtype) -> Tensor:
    """The param as the step sees it, a new tensor in ``work`` dtype (float32 for
    low-precision params): p + comp (one float32 addition) for kahan, master for master."""
    if update == "kahan":
        return p.to(work) + state["kahan_comp"].to(work)
    if update == "master":
        return state["master_param"].to(work, copy=True)
    return p.to(work, copy=True)


def write_back(p: Tensor, state: dict, update: str, theta: Tensor, key: int = 0) -> None:
    """Store θ_new (``theta``, float32; float64 from the reference) into p and the
    policy's buffers, in place, each rounded once."""
    if update == "kahan":
        p.copy_(round_to(theta, p.dtype))
        # θ_new − p (float32 subtraction, then round to the dtype)
        state["kahan_comp"].copy_(round_to(theta - p.to(theta.dtype), p.dtype))
    elif update == "master":
        # p is master's rounding (from float32 for the reference too, whose θ_new is
        # float64): p = round(master) is what a later resync_master relies on
        state["master_param"].copy_(theta)
        p.copy_(state["master_param"].to(p.dtype))
    elif update == "stochastic":
        r = random_bits(p.numel(), key, p.device).view(p.shape)
        p.copy_(round_stochastic(theta.float(), r, p.dtype))
    else:
        p.copy_(round_to(theta, p.dtype))


def resync_master(p: Tensor, master: Tensor) -> Tensor:
    """A new master after p was written in place: float32(p) where p differs from
    round(master) (what the last step left there), master elsewhere; on p's device (p
    moved to another one, by ``module.to()`` swapping it or after a load made master
    where p was: the step then converts the rest of its state there too)."""
    theta = p.detach().float()
    master = master.to(p.device)
    return torch.where(p.detach() != master.to(p.dtype), theta, master)


def buffers_fit(p: Tensor, st: dict, update: str) -> bool:
    """Whether ``st`` holds the buffer of policy ``update`` as a step uses it: a Kahan
    buffer in p's dtype and a master copy in float32, both of p's shape and device, or
    an integer 0-dim sr_seed."""
    if update == "stochastic":
        seed = st.get("sr_seed")
        return (isinstance(seed, torch.Tensor) and seed.shape == ()
                and not seed.is_floating_point() and not seed.is_complex())
    if update not in BUFFERS:
        return True
    buf = st.get(BUFFERS[update])
    dtype = p.dtype if update == "kahan" else torch.float32
    return (isinstance(buf, torch.Tensor) and buf.dtype == dtype and buf.shape == p.shape
            and buf.device == p.device)


def convert_buffers(p: Tensor, saved: dict, src: str, dst: str,
                    seed_of_param: int) -> dict[str, Tensor]:
    """The buffers of policy ``dst`` from a saved state of policy ``src`` (formats.md,
    "Checkpoints"): none→kahan 0, none→master p, kahan→master p + comp, master→kahan
    round(master − round(master)) (the saved p, whatever p holds now); to nearest or
    stochastic they are dropped (≤ half an ulp of p).
    A saved sr_seed is kept, so a resumed stochastic run draws the same bits."""
    if dst == "stochastic" and saved.get("sr_seed") is not None:
        seed = saved["sr_seed"]
        if type(seed) is int:  # a number put in by hand: the seed it says
            if not -2**63 <= seed < 2**63:
                raise ValueError(f"sr_seed {seed} is beyond int64")
            return {"sr_seed": torch.tensor(seed, dtype=torch.int64, device="cpu")}
        _check(saved, "sr_seed", p, shape=())
        if seed.is_complex() or seed.dtype == torch.bool:
            raise ValueError(f"sr_seed has dtype {seed.dtype}, expected an integer tensor")
        if not seed.is_floating_point():
            return {"sr_seed": seed.to(device="cpu", dtype=torch.int64, copy=True)}
        # torch.optim casts every state tensor but `step` to the param's dtype on load,
        # which rounds a 32-bit seed away: this optimizer's own seed replaces it
        warnings.warn("a saved sr_seed of floating dtype (the state went through "
                      "torch.optim.load_state_dict, which rounds it to the param's dtype) is "
                      "ignored: stochastic rounding continues from this optimizer's seed",
                      stacklevel=4)
        return buffers(p, dst, seed_of_param)
    if dst not in BUFFERS:
        return buffers(p, dst, seed_of_param)
    if src == dst:
        key = BUFFERS[dst]
        _check(saved, key, p)
        dtype = p.dtype if dst == "kahan" else torch.float32
        return {key: copy_like(p, saved[key], dtype)}
    theta = p.detach().float()
    if src == "kahan":
        _check(saved, "kahan_comp", p)
        theta = theta + saved["kahan_comp"].to(p.device, torch.float32)
    elif src == "master":
        _check(saved, "master_param", p)
        theta = saved["master_param"].to(p.device, torch.float32, copy=True)
    # in p's layout, as fresh buffers (theta is in a saved master's, which may differ)
    if dst == "master":
        return {"master_param": copy_like(p, theta, torch.float32)}
    # comp against the p a saved master declares (round(master), see state_dict), not the
    # live p: a resume may load the optimizer before the model, while p is a fresh init
    reference = theta.to(p.dtype).float() if src == "master" else p.detach().float()
    return {"kahan_comp": copy_like(p, theta - reference, p.dtype)}


def _check(saved: dict, key: str, p: Tensor, shape: tuple | None = None) -> None:
    value = saved.get(key)
    want = p.shape if shape is None else shape
    if not isinstance(value, torch.Tensor) or value.shape != want:
        got = (tuple(value.shape) if isinstance(value, torch.Tensor) else
               "missing" if value is None else f"a {type(value).__name__}")
        raise ValueError(f"{key} is {got}, expected a tensor of shape {tuple(want)}")
    if shape is None and not value.is_floating_point():  # a buffer holds param values
        raise ValueError(f"{key} has dtype {value.dtype}, expected a floating-point tensor")
    if key == "master_param" and value.dtype != torch.float32:  # less would lose what it keeps
        raise ValueError(f"master_param has dtype {value.dtype}, expected torch.float32")
