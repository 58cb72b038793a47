"""Moment formats: how exp_avg, exp_avg_sq and max_exp_avg_sq are stored between steps.

docs/design/formats.md is the specification; this module implements it in torch ops, for
the torch and reference backends and for checkpoint conversion. The CPU kernel
(backends/cpu/common.h) implements the same bits in C++ and is tested equal to it.

* "fp32", "bf16" (and "fp64" for float64 params, "fp16" only where a caller hands in
  float16 moments, as the functional API may): a plain tensor of that dtype, rounded to
  nearest even.
* "int8": uint8 codes of the param's shape and one float32 scale per block of 256
  consecutive elements (C order), ``<name>_scale``. A code is an 8-bit float (FP8, after
  Micikevicius et al. 2022, https://arxiv.org/abs/2209.05433) of ``|x| · M / absmax``:
  E4M3 with a sign bit for m (max M = 480), E5M3 without one for v, whose sign is always
  + (max M = 122880: the spare bit doubles the exponent range, as Dettmers et al.'s
  unsigned map for the second moment does, https://arxiv.org/abs/2110.02861).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK = 256
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
STORAGE = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.uint8,
    "fp64": torch.float64,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class CodeMap:
    """An 8-bit float with 3 mantissa bits and exponent bias ``bias``.

    A magnitude code c = (E << 3) | F has value F·2^(−bias−2) if E = 0 (subnormal), else
    (8 + F)·2^(E−bias−3) = (1 + F/8)·2^(E−bias)."""

    bias: int
    cmax: int  # the largest magnitude code: 127 (sign bit in use) or 255
    signed: bool

    @property
    def top(self) -> float:
        """M, the value of cmax: the block's absmax is mapped onto it."""
        return self.value(self.cmax)

    @property
    def floor(self) -> float:
        """The smallest absmax a block is scaled by: M·2^-126, so that scale = absmax/M is a
        normal float32 and M/absmax finite. Without it a block whose absmax is below
        ~1e-36 (m) or ~1e-33 (v, long-decayed) gets inv = inf, and 0·inf = NaN turns its
        zeros into absmax (formats.md, "Encode a block")."""
        return self.top * 2.0**-126

    @property
    def scale_range(self) -> tuple[float, float]:
        """The finite scales an encoder can write: floor/M = 2^-126 to float32(max float32
        / M). (It also writes NaN or +∞ for a block holding a NaN or an ∞.)"""
        top = torch.tensor(self.top, dtype=torch.float32, device="cpu")
        biggest = torch.tensor(torch.finfo(torch.float32).max, dtype=torch.float32, device="cpu")
        return 2.0**-126, torch.div(biggest, top).item()

    def value(self, c: int) -> float:
        e, f = c >> 3, c & 7
        return f * 2.0 ** (-self.bias - 2) if e == 0 else (8 + f) * 2.0 ** (e - self.bias - 3)

    def table(self) -> Tensor:
        """float32 value of every code 0..255; codes ≥ 128 of a signed map are negative."""
        if self.signed:
            mags = [self.value(c) for c in range(128)]
            return torch.tensor(mags + [-v for v in mags], dtype=torch.float32, device="cpu")
        return torch.tensor([self.value(c) for c in range(256)], dtype=torch.float32, device="cpu")


SIGNED = CodeMap(bias=7, cmax=127, signed=True)  # m: E4M3, M = 480
UNSIGNED = CodeMap(bias=15, cmax=255, signed=False)  # v, max v: E5M3, M = 122880
CODE_MAPS = {"exp_avg": SIGNED, "exp_avg_sq": UNSIGNED, "max_exp_avg_sq": UNSIGNED}
_TABLES: dict[tuple[CodeMap, torch.device], Tensor] = {}


def n_blocks(numel: int) -> int:
    return math.ceil(numel / BLOCK)


def _blocks(x: Tensor) -> Tensor:
    """x flattened in C order, zero-padded to whole blocks, as (n_blocks, BLOCK)."""
    flat = x.reshape(-1)
    pad = n_blocks(flat.numel()) * BLOCK - flat.numel()
    return F.pad(flat, (0, pad)).view(-1, BLOCK)


def _table(cmap: CodeMap, device: torch.device) -> Tensor:
    key = (cmap, device)
    if key not in _TABLES:
        _TABLES[key] = cmap.table().to(device)
    return _TABLES[key]


def encode(x: Tensor, cmap: CodeMap) -> tuple[Tensor, Tensor]:
    """(uint8 codes of x's shape, float32 scales): formats.md's "Encode a block".

    Every operation is one float32 operation of the spec, in its order, so that a fast
    backend doing the same gets the same codes: absmax, inv = M / absmax and scale =
    absmax / M (divisions by tensors: with a Python number torch may multiply by its
    reciprocal, as CUDA does for ``tensor / scalar``), y = |x|·inv, then the nearest code
    with ties to even."""
    blocks = _blocks(x.float())
    absmax = blocks.abs().amax(dim=1).clamp_min(cmap.floor)
    top = torch.full_like(absmax, cmap.top)
    inv = torch.div(top, absmax)
    scale = torch.div(absmax, top)
    xs = blocks * inv[:, None]
    y = xs.abs()  # |x|·inv: the rounding is symmetric; and a NaN's sign bit is cleared
    # Subnormal codes 0..8: y·2^(b+2) is exact (a power of two); round half to even.
    sub = torch.round(y * 2.0 ** (cmap.bias + 2)).to(torch.int32)
    # Normal codes: round the float32 to 3 mantissa bits (ties to even) and rebias (a NaN
    # y, ∞·0 where absmax is ∞, is above every number and caps to cmax).
    u = y.view(torch.int32)
    u = u + (0x7FFFF + ((u >> 20) & 1))
    normal = (((u >> 23) - 127 + cmap.bias) << 3) | ((u >> 20) & 7)
    c = torch.where(y < 2.0 ** (1 - cmap.bias), sub, normal).clamp_max(cmap.cmax)
    if cmap.signed:  # x·inv below −half the smallest code: negative with a nonzero code
        c = c + 128 * (xs < -(2.0 ** -(cmap.bias + 3)))  # (false for a NaN x·inv)
    else:  # a positive v never encodes to 0: the update would be m/ε (formats.md)
        c = torch.where((blocks > 0) & (c == 0), 1, c)
    codes = c.reshape(-1)[: x.numel()].to(torch.uint8).reshape(x.shape)
    return codes, scale


def decode(codes: Tensor, scale: Tensor, cmap: CodeMap) -> Tensor:
    """float32 values: ``value(c) · scale`` (one float32 multiply)."""
    values = _table(cmap, codes.device)[_blocks(codes).long()] * scale[:, None]
    return values.reshape(-1)[: codes.numel()].reshape(codes.shape)


def _rounds_twice(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether torch's conversion of x to ``dtype`` rounds twice (float64 → bfloat16 or
    float16 goes through float32)."""
    return x.dtype == torch.float64 and dtype in (torch.bfloat16, torch.float16)


def round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x rounded once to ``dtype``, to nearest even.

    torch converts float64 to bfloat16/float16 through float32, rounding twice: a value
    just above a midpoint of the target lands on it in float32, then ties to even, the
    wrong way. Rounding to float32 *to odd* instead (truncate, then set the last bit if
    anything was dropped) keeps the information that decides the second rounding: with
    24 ≥ p + 2 bits (p = 8 or 11) the result is the correct rounding of x (Boldo &
    Melquiond, "When double rounding is odd", 2005)."""
    if not _rounds_twice(x, dtype):
        return x.to(dtype)
    f = x.float()
    f = torch.where(f.double().abs() > x.abs(), torch.nextafter(f, torch.zeros_like(f)), f)
    odd = f.view(torch.int32) | (f.double() != x).to(torch.int32)
    return torch.where(torch.isfinite(f), odd.view(torch.float32), f).to(dtype)


def _once(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x to copy into a tensor of ``dtype``: rounded once by round_to where copy_ would
    round twice; else x itself (no temporary), which copy_ rounds once."""
    return round_to(x, dtype) if _rounds_twice(x, dtype) else x


# ---- moments in a state dict --------------------------------------------------------------


def storage_dtype(fmt: str, p: Tensor) -> torch.dtype:
    """The dtype of a moment of format ``fmt`` for param ``p``: for a complex param the
    complex dtype of that precision ("fp32": complex64, "fp64": complex128; formats apply
    to real params and complex ones keep state like the param, formats/__init__.py)."""
    if p.is_complex():
        return torch.complex128 if fmt == "fp64" else torch.complex64
    return STORAGE[fmt]


def scales_fit(st: dict, p: Tensor, names, values: bool = True) -> bool:
    """Whether ``st`` holds the int8 scales of moments ``names`` as the step reads and
    writes them (the CPU kernel through raw pointers): one contiguous float32 per block
    of p, on p's device, and (``values``) each a value an encoder writes: a scale swapped
    in by code holding −∞, say, moved the params on one backend and not on the other.
    (The kernel's own check of a bucket just planned skips the values: the plan checked
    them, and they decide no memory access. A cached step, which reuses the plan, reads
    values edited in place since as data: docs/precision.md.)"""
    for name in names:
        scale = st.get(f"{name}_scale")
        if not (isinstance(scale, Tensor) and scale.dtype == torch.float32
                and scale.shape == (n_blocks(p.numel()),) and scale.device == p.device
                and scale.is_contiguous() and (not values or scales_written(scale, name))):
            return False
    return True


def scales_written(scale: Tensor, name: str) -> bool:
    """Whether every value of ``scale`` is one an encoder of moment ``name`` writes:
    absmax/M with absmax floored at M·2^-126 and at most float32's largest, or NaN or +∞
    for a block that held a NaN or an ∞ (formats.md); or 0, a fresh state's before its
    first step (every code then decodes to 0). Any other is a damaged checkpoint or
    state, and would make infinite or wrong moments silently."""
    lo, hi = CODE_MAPS[name].scale_range
    return scale.dtype == torch.float32 and bool(
        ((scale >= lo) & (scale <= hi) | scale.isnan() | (scale == math.inf) | (scale == 0)).all())


def copy_like(p: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
    """A copy of ``t`` (p's shape) in ``dtype`` with p's device and memory layout, as a
    fresh state tensor has it: a checkpoint's tensor in another layout (column-major,
    say) sent the param to the torch backend from then on, without a word."""
    return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(t)


def zeros(p: Tensor, name: str, fmt: str) -> dict[str, Tensor]:
    """A fresh moment of format ``fmt`` for ``p``: {name: tensor} (+ {name_scale} for int8)."""
    if fmt == "int8":
        return {
            name: torch.zeros(p.shape, dtype=torch.uint8, device=p.device),
            f"{name}_scale": torch.zeros(n_blocks(p.numel()), dtype=torch.float32, device=p.device),
        }
    dtype = storage_dtype(fmt, p)
    return {name: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}


def read(stored: Tensor, scale: Tensor | None, fmt: str, name: str) -> Tensor:
    """The moment's value: float32 (float64 for float64 storage, complex as stored), a new
    tensor."""
    if fmt == "int8":
        return decode(stored, scale, CODE_MAPS[name])
    if stored.is_complex():  # complex params keep state like the param
        return stored.clone()
    return stored.to(torch.float64 if stored.dtype == torch.float64 else torch.float32, copy=True)


def write(stored: Tensor, scale: Tensor | None, fmt: str, name: str, x: Tensor) -> Tensor:
    """Store x in place (codes and scales for int8) and return the value as stored, in
    x's dtype: the update uses moments as stored."""
    if fmt == "int8":
        codes, new_scale = encode(x, CODE_MAPS[name])
        stored.copy_(codes)
        scale.copy_(new_scale)
        return decode(codes, new_scale, CODE_MAPS[name]).to(x.dtype)
    stored.copy_(_once(x, stored.dtype))
    return x if stored.dtype == x.dtype else stored.to(x.dtype)


def encoded(x: Tensor, p: Tensor, name: str, fmt: str) -> dict[str, Tensor]:
    """x (any float dtype) as a new moment of format ``fmt`` for ``p``."""
    if fmt == "int8":
        codes, scale = encode(x, CODE_MAPS[name])
        return {name: codes, f"{name}_scale": scale}
    out = torch.empty_like(p, dtype=storage_dtype(fmt, p), memory_format=torch.preserve_format)
    return {name: out.copy_(_once(x, out.dtype))}


def load_moment(saved: dict, name: str, fmt: str, p: Tensor) -> Tensor:
    """The value of a saved moment of format ``fmt`` (float32, or float64 if saved so),
    on p's device; ValueError if it does not fit ``p``."""
    value = saved[name]
    if not isinstance(value, Tensor) or value.shape != p.shape:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} has shape {shape}, but the parameter has shape {tuple(p.shape)}")
    if fmt == "int8":
        scale = saved.get(f"{name}_scale")
        if value.dtype != torch.uint8:
            raise ValueError(f"{name} is int8 state but has dtype {value.dtype}, not torch.uint8")
        if not isinstance(scale, Tensor) or scale.shape != (n_blocks(p.numel()),):
            raise ValueError(
                f"{name} is int8 state but {name}_scale is missing or not of shape "
                f"({n_blocks(p.numel())},) (one float32 per {BLOCK} elements)"
            )
        if not scales_written(scale, name):
            lo, hi = CODE_MAPS[name].scale_range
            raise ValueError(f"{name}_scale must hold float32 values in [{lo:.6g}, {hi:.6g}], "
                             f"0 (fresh), NaN or +inf (one per block, as an encoder writes them); got dtype "
                             f"{scale.dtype} and other values")
        scale, value = scale.to(device=p.device), value.to(p.device)
        fresh = scale == 0
        if bool(fresh.any()) and bool(_table(CODE_MAPS[name], p.device)[_blocks(value)[fresh].long()].any()):
            raise ValueError(f"{name}_scale is 0, a fresh state's, for a block whose codes do not all "
                             "decode to 0: no encoder writes that (its moment would read 0 there)")
        return decode(value, scale, CODE_MAPS[name])
    if not (value.is_floating_point() or value.is_complex()):
        raise ValueError(f"{name} has dtype {value.dtype}, which is no moment format")
    if value.dtype != storage_dtype(fmt, p):  # a tag the tensor disagrees with, or complex
        # moments for a real param (or real ones for a complex param)
        raise ValueError(f"{name} has dtype {value.dtype}, but state_format {fmt!r} stores "
                         f"{storage_dtype(fmt, p)} for a {p.dtype} param (a group's "
                         "state_format sets how moments are stored)")
    wide = torch.float64 if value.dtype == torch.float64 else torch.float32
    return value.to(device=p.device, dtype=value.dtype if value.is_complex() else wide, copy=True)
