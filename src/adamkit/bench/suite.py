"""What the benchmark runs: parameter layouts (configs) and optimizers (contenders).

Both are declarative tables. A contender names the param dtype it steps, builds its
optimizer from a list of params, and states the bytes per param a perfect
implementation of its storage must move in one step (the cost model): every stream it
reads plus every stream it writes. Peers that are not installed are left out with a
note, never an error.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

import adamkit

# ---- configs ---------------------------------------------------------------------------

N_LARGE = 64 * 262_144  # 16.8M params, the size the floor is quoted for


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124M params; Radford et al. 2019), tied embeddings."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp
    return shapes + [(d,), (d,)]  # ln_f


CONFIGS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "64 tensors": lambda: [(N_LARGE // 64,)] * 64,
    "1024 tensors": lambda: [(N_LARGE // 1024,)] * 1024,
    "gpt2-small": gpt2_small_shapes,
    "quick": lambda: [(65_536,)] * 64,  # 4.2M params, for --quick
}


# ---- contenders ------------------------------------------------------------------------

LR = 1e-3


@dataclass(frozen=True)
class Contender:
    name: str
    library: str  # "adamkit", "torch", or the peer's import name
    dtype: torch.dtype  # param (and grad) dtype
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    bytes_per_param: float  # minimal traffic of one step: reads + writes
    configs: tuple[str, ...] | None = None  # None: every config
    quick: bool = False  # part of --quick
    needs: tuple[str, ...] = field(default=())  # adamkit keyword arguments it requires


def _traffic(param: int, state: float, extra: float = 0.0, param_read: bool = True) -> float:
    """Bytes per param: param read (unless a master copy is read instead) and written,
    grad read (param dtype), both moments read and written, extra buffers read and written."""
    return param * (2 if param_read else 1) + param + 2 * 2 * state + 2 * extra


INT8 = 1 + 4 / 256  # code + fp32 scale per block of 256


def _adamkit(**kw) -> Callable:
    return lambda ps: adamkit.Adam(ps, lr=LR, **kw)


def _torch(**kw) -> Callable:
    return lambda ps: torch.optim.Adam(ps, lr=LR, **kw)


def _optimi_kahan(ps):
    import optimi

    # torch's betas and eps, as every other contender (optimi's own: (0.9, 0.99), 1e-6)
    return optimi.Adam(ps, lr=LR, betas=(0.9, 0.999), eps=1e-8, kahan_sum=True, foreach=True)


def _bnb_8bit(ps):
    import bitsandbytes as bnb

    return bnb.optim.Adam8bit(ps, lr=LR)


def _torchao_8bit(ps):
    from torchao.optim import AdamW8bit

    return AdamW8bit(ps, lr=LR, weight_decay=0.0)


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
LARGE_ONLY = ("64 tensors", "quick")
CONTENDERS: list[Contender] = [
    # float32 params, float32 state: 28 B/param.
    Contender("adamkit cpu fp32", "adamkit", F32, _adamkit(backend="cpu"), _traffic(4, 4), quick=True),
    Contender("torch fused fp32", "torch", F32, _torch(fused=True), _traffic(4, 4), quick=True),
    # float32 params with bf16 moments: 20 B/param, 4 of state.
    Contender("adamkit cpu fp32 bf16-state", "adamkit", F32,
              _adamkit(backend="cpu", state_format="bf16"), _traffic(4, 2), needs=("state_format",)),
    Contender("torch foreach fp32", "torch", F32, _torch(foreach=True), _traffic(4, 4)),
    Contender("torch for-loop fp32", "torch", F32, _torch(foreach=False), _traffic(4, 4)),
    # bfloat16 params, bfloat16 state (torch's behaviour): 14 B/param.
    Contender("adamkit cpu bf16 nearest", "adamkit", BF16,
              _adamkit(backend="cpu", param_update="nearest", state_format="bf16"), _traffic(2, 2),
              quick=True, needs=("param_update", "state_format")),
    Contender("torch fused bf16", "torch", BF16, _torch(fused=True), _traffic(2, 2), quick=True),
    Contender("torch foreach bf16", "torch", BF16, _torch(foreach=True), _traffic(2, 2)),
    Contender("torch for-loop bf16", "torch", BF16, _torch(foreach=False), _traffic(2, 2)),
    # bfloat16 params with Kahan compensation (bf16 buffer): 18 B/param.
    Contender("adamkit cpu bf16 kahan", "adamkit", BF16,
              _adamkit(backend="cpu", param_update="kahan", state_format="bf16"),
              _traffic(2, 2, extra=2), quick=True, needs=("param_update", "state_format")),
    Contender("optimi kahan bf16", "optimi", BF16, _optimi_kahan, _traffic(2, 2, extra=2), quick=True),
    Contender("adamkit cpu bf16 stochastic", "adamkit", BF16,
              _adamkit(backend="cpu", param_update="stochastic", state_format="bf16"),
              _traffic(2, 2), needs=("param_update", "state_format")),
    # bfloat16 params with an fp32 master copy: the master is read, the param only written.
    Contender("adamkit cpu bf16 master", "adamkit", BF16,
              _adamkit(backend="cpu", param_update="master", state_format="bf16"),
              _traffic(2, 2, extra=4, param_read=False), needs=("param_update", "state_format")),
    # float16 params: adamkit keeps fp32 state for them (22 B/param, 26 with Kahan),
    # torch fp16 state (14 B/param).
    Contender("adamkit cpu fp16 nearest", "adamkit", F16,
              _adamkit(backend="cpu", param_update="nearest"), _traffic(2, 4),
              needs=("param_update",)),
    Contender("adamkit cpu fp16 kahan", "adamkit", F16,
              _adamkit(backend="cpu", param_update="kahan"), _traffic(2, 4, extra=2),
              needs=("param_update",)),
    # The same 14 B/param as torch: float16 params with bf16 moments.
    Contender("adamkit cpu fp16 bf16-state", "adamkit", F16,
              _adamkit(backend="cpu", param_update="nearest", state_format="bf16"), _traffic(2, 2),
              needs=("param_update", "state_format")),
    Contender("torch fused fp16", "torch", F16, _torch(fused=True), _traffic(2, 2)),
    # 8-bit block-quantized state.
    Contender("adamkit cpu fp32 int8", "adamkit", F32, _adamkit(backend="cpu", state_format="int8"),
              _traffic(4, INT8), quick=True, needs=("state_format",)),
    Contender("bitsandbytes 8bit fp32", "bitsandbytes", F32, _bnb_8bit, _traffic(4, INT8), quick=True),
    Contender("torchao 8bit fp32", "torchao", F32, _torchao_8bit, _traffic(4, INT8), configs=LARGE_ONLY),
    Contender("adamkit cpu bf16 kahan int8", "adamkit", BF16,
              _adamkit(backend="cpu", param_update="kahan", state_format="int8"),
              _traffic(2, INT8, extra=2), needs=("param_update", "state_format")),
]


def available(contender: Contender) -> str | None:
    """None if it can run here, else why not."""
    if contender.library not in ("adamkit", "torch") and importlib.util.find_spec(contender.library) is None:
        return f"{contender.library} is not installed (pip install adamkit[bench])"
    accepted = inspect.signature(adamkit.Adam.__init__).parameters
    missing = [k for k in contender.needs if k not in accepted]
    if missing:
        return f"this adamkit has no {', '.join(missing)}"
    return None
