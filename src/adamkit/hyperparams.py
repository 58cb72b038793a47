"""Hyperparameters: validation with torch's messages, and the scalars one step needs.

``validate_group`` runs for every param group when it is added (torch checks only the
constructor's defaults), so a bad per-group value fails before any state exists; the
kind of the betas (both floats or both Tensors, ``check_beta_kinds``) is checked on the
constructor's only, as torch does: a group's int, NumPy or mixed betas step. A live
group (a step, a load) gets only ``check_live_group``: what the step needs to be
computable. Values set on a group later are used as given, as torch.optim does: a
scheduler's lr (``LinearLR`` to 0 ends on lr ≈ -2e-21), its Tensor beta beside a float
one (``OneCycleLR`` with ``cycle_momentum``), a checkpoint saved after either.

``step_scalars`` folds the three weight-decay modes into two numbers, so that no
backend branches on modes: ``weight_decay`` is the coupled λ added to the gradient
(0 when decay is decoupled), and ``decay`` is the factor the param is multiplied by
before the update (1 when decay is coupled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from torch import Tensor


def _scalar(x: float | Tensor) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def _as_given(x: Any) -> Any:
    """An lr (or λ) as the step computes with it. torch.optim's ``lr / (1 - beta1**t)``
    and ``1 - lr*λ`` run in their own precision: a NumPy float32 or float16 (a scalar or a
    0-dim array) is kept, and so is a Tensor (squeezed to 0-dim and detached, on its own
    device, as torch's for-loop step uses it: tensor arithmetic in its dtype there);
    anything else is a Python float."""
    if isinstance(x, Tensor):
        return x.detach().squeeze()
    dtype = getattr(x, "dtype", None)
    if (type(x).__module__ == "numpy" and getattr(dtype, "kind", None) == "f"
            and dtype.itemsize < 8 and getattr(x, "shape", None) == ()):
        return x[()]  # a 0-dim array as its scalar
    return float(x)


def _is_number(x: Any) -> bool:
    """A real number the step can take as float(x): a Python or NumPy number, a 0-dim
    array, a 1-element Tensor (not a str, which float() would parse)."""
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.is_complex()
    if isinstance(x, (str, bytes)):
        return False
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True


def validate_group(group: dict[str, Any]) -> None:
    """Raise torch's ValueError for any invalid hyperparameter of a new ``group``."""
    check_ranges(group)
    betas = group["betas"]
    if len(betas) != 2:  # torch.optim takes (0.9, 0.99, 0.1) here and fails at its step
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_live_group(group)


def check_ranges(group: dict[str, Any]) -> None:
    """torch.optim.Adam's checks of its constructor's values, in its order (the
    constructor runs them before it looks at the params, as torch's does)."""
    lr, eps, betas, wd = group["lr"], group["eps"], group["betas"], group["weight_decay"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    # torch's order: betas=(0.9,) raises its IndexError at betas[1], a float its TypeError
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay value: {wd}")


def check_beta_kinds(betas: Any) -> None:
    """torch.optim.Adam's check of its constructor's betas, after their ranges (betas=(0.9,
    1) names the beta, not its kind). The constructor's only: torch steps a group of int,
    NumPy or mixed betas ((0, 0.99), (Tensor, float)), and so does adamkit."""
    if not (all(isinstance(b, float) for b in betas[:2]) or all(isinstance(b, Tensor) for b in betas[:2])):
        raise ValueError("betas must be either both floats or both Tensors")


# torch.optim's implementation flags: accepted for drop-in code (Adam's docstring); a
# group that sets them keeps them. A loaded group takes them, as its backend, from the
# loading optimizer's group, not from the checkpoint.
TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def refuse_torch_only(flags: dict[str, Any]) -> None:
    """ValueError for torch.optim's flags adamkit accepts for drop-in code but cannot
    honour when set (CUDA-graph capture, a step autograd can differentiate through): a
    step without them would silently not be what the code asked for."""
    for name in ("capturable", "differentiable"):
        if flags.get(name):
            raise ValueError(f"adamkit does not support {name}=True (torch.optim.Adam does); "
                             f"use torch.optim for it, or leave {name} False")


def check_live_group(group: dict[str, Any]) -> None:
    """Raise where a group's values leave its step undefined, with the exception type
    torch.optim's step raises there: TypeError for a value that is not a number or betas
    that are not a sequence; RuntimeError for a complex number or a Tensor of several
    elements (but lr); ValueError for betas of another length, a Tensor lr of more
    than one element, decouple_lr without a usable max_lr, torch's capturable or
    differentiable set. Ranges are ``validate_group``'s, for new groups only (module
    docstring); the step's scalars get ``check_scalar_range``."""
    refuse_torch_only(group)
    lr, betas = group["lr"], group["betas"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    try:  # a tuple, a list, or a 2-element Tensor or array (torch.optim takes any)
        n_betas = len(betas)
    except TypeError:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    if n_betas != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for name, value in (("lr", lr), ("eps", group["eps"]), ("weight_decay", group["weight_decay"]),
                        ("betas[0]", betas[0]), ("betas[1]", betas[1])):
        if not _is_number(value):
            # torch's ops raise RuntimeError for a Tensor of several elements (shapes that
            # do not broadcast) and a complex value (no cast to float); TypeError for the rest
            error = RuntimeError if isinstance(value, (Tensor, complex)) else TypeError
            raise error(f"Invalid {name}: {value!r} (a real number, or a 1-element real Tensor)")
    if group["decouple_lr"]:
        max_lr = group["max_lr"]
        # a number as lr is (a str or bool was stepped with; "abc" raised a raw TypeError)
        if max_lr is None or not _is_number(max_lr) or not 0.0 < _scalar(max_lr) < math.inf:
            raise ValueError(
                f"Invalid max_lr value: {max_lr} (decouple_lr divides lr by max_lr, so it "
                "must be a finite number > 0; it defaults to the group's initial lr, so pass "
                "it explicitly when that lr is 0)"
            )


@dataclass(frozen=True)
class StepScalars:
    """Per-bucket numbers for one step, computed once on the host.

    A bucket shares one step count t, so bias corrections are plain floats and no
    backend reads a device tensor (no host sync).
    """

    lr: Any  # a Python float, or a NumPy float32/float16 scalar or 0-dim Tensor (_as_given)
    beta1: float
    beta2: float
    eps: float
    step: int
    weight_decay: float  # coupled λ, added to the gradient; 0 when decoupled
    decay: float  # θ ← decay·θ before the update; 1 when coupled
    amsgrad: bool
    maximize: bool
    # 1/scale of a torch.amp.GradScaler that left the grads scaled (its fast path,
    # `_step_supports_amp_scaling`): g ← g·grad_scale_inv before anything else.
    grad_scale_inv: float = 1.0

    # The betas as given, where they are Tensors (0-dim, detached) or NumPy float32/16:
    # torch.optim's for-loop step computes 1 − β^t and lr/(1 − β1^t) from them in their
    # dtype (and √(1 − β2^t) too for a Tensor).
    given_betas: tuple | None = None

    @cached_property
    def _bias_corrections(self) -> tuple[Any, Any]:
        """(1 − β1^t, 1 − β2^t), as torch.optim computes them: host floats, or tensor
        arithmetic in a Tensor beta's dtype (to the power of float(t), as torch's is)."""
        b1, b2 = self.given_betas or (self.beta1, self.beta2)
        return 1 - b1 ** float(self.step), 1 - b2 ** float(self.step)

    @property
    def bias_correction1(self) -> float:
        return float(self._bias_corrections[0])

    @property
    def bias_correction2(self) -> float:
        return float(self._bias_corrections[1])

    @cached_property  # once: with a Tensor lr it is a tensor op (and a sync on a GPU)
    def step_size(self) -> float:
        """lr / (1 − β1^t): multiplies m in the update (computed in a NumPy or Tensor lr's
        own precision, or a Tensor β1's, as torch.optim does)."""
        return float(self.lr / self._bias_corrections[0])

    @cached_property
    def bias_correction2_sqrt(self) -> float:
        """√(1 − β2^t): a Tensor's sqrt, else torch.optim's float64 ``bc2 ** 0.5``. C's
        pow is not correctly rounded: it differs from math.sqrt by an ulp at some steps
        (β2 = 0.999: t = 1270, and every t from 36314 to 37411, where pow gives 1.0), which
        was an ulp off torch.optim in every float64 param."""
        bc2 = self._bias_corrections[1]
        return float(bc2.sqrt() if isinstance(bc2, Tensor) else bc2 ** 0.5)


def step_scalars(group: dict[str, Any], step: int) -> StepScalars:
    """The scalars for a bucket of ``group`` whose params are at step ``step`` (from 1)."""
    lr = _as_given(group["lr"])
    # a Tensor λ, like a Tensor lr, makes torch's 1 − lr·λ tensor arithmetic in its dtype
    given_wd = _as_given(group["weight_decay"])
    wd = float(given_wd)
    # a Tensor's or NumPy float32's powers β^t in its own dtype, as torch.optim's for-loop
    betas = tuple(_as_given(b) for b in group["betas"])
    beta1, beta2 = (float(b) for b in betas)
    coupled, decay = wd, 1.0
    if wd != 0.0 and group["decouple_lr"]:
        coupled, decay = 0.0, float(1.0 - (lr / _scalar(group["max_lr"])) * given_wd)
    elif wd != 0.0 and group["decouple_wd"]:
        coupled, decay = 0.0, float(1.0 - lr * given_wd)
    return StepScalars(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=float(group["eps"]),
        step=step,
        weight_decay=coupled,
        decay=decay,
        amsgrad=bool(group["amsgrad"]),
        maximize=bool(group["maximize"]),
        given_betas=betas if any(type(b) is not float for b in betas) else None,
    )


def for_param_dtype(s: StepScalars, dtype: torch.dtype) -> StepScalars:
    """``s`` for a bucket of ``dtype`` params. torch.optim's for-loop step casts a Tensor
    β1 to the param's dtype for its lerp (weight 1 − β1 there): a float64 β1 decays
    float32 params' m by float32(β1), as here. Only float32 and float64 (complex: their
    real dtype) params, where adamkit gives torch's numbers; bf16/fp16 params keep
    the β1 given (torch's rounding it to their 8 or 11 bits is not Adam's β1)."""
    real = dtype.to_real() if dtype.is_complex else dtype
    if s.given_betas is None or not isinstance(s.given_betas[0], Tensor) \
            or real not in (torch.float32, torch.float64):
        return s
    return replace(s, beta1=float(s.given_betas[0].to(real)))


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_scalar_range(s: StepScalars, dtype: torch.dtype) -> None:
    """ValueError for a β2 below 0 or whose bias correction 1 − β2^t is negative at this
    step, and
    torch.optim's RuntimeError for a step that would hand a float32 computation a
    scalar beyond float32's range (lr/(1 − β1^t), which torch passes to addcdiv, and the
    coupled λ, add's alpha; infinities pass, as in torch): raised before anything is
    changed, where torch's for-loop and foreach steps raise midway and fused writes ±inf."""
    # β2 ≥ 1 (set on a live group: new groups are range-checked) makes 1 − β2^t negative
    # at some t, and its square root complex: torch's step fails midway. A β2 below 0
    # makes v = β2·v + (1 − β2)·g² negative (NaN params, and int8 codes no map has: the
    # kernel and the torch backend parted there), though 1 − β2^t stays positive.
    if s.beta2 < 0.0:
        raise ValueError(f"Invalid beta parameter at index 1: {s.beta2} (below 0, it can make "
                         "the second moment negative, and the update takes its square root)")
    if s.bias_correction2 < 0.0:  # (NaN passes, as in torch: a NaN step)
        raise ValueError(f"Invalid beta parameter at index 1: {s.beta2} (1 - beta2^t is "
                         f"{s.bias_correction2} at step {s.step}, and the update takes its "
                         "square root)")
    if dtype in (torch.float64, torch.complex128):
        return
    for x in (s.step_size, s.weight_decay):
        if math.isfinite(x) and abs(x) > _FLOAT32_MAX:
            raise RuntimeError("value cannot be converted to type float without overflow")


def scalar_dtype() -> torch.dtype:
    """dtype of state['step'], as torch.optim chooses it (float64 under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
