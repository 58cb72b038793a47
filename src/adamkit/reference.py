"""Adam as the paper writes it: the oracle every faster path is tested against.

This is Algorithm 1 of Kingma & Ba, "Adam: A Method for Stochastic Optimization"
(https://arxiv.org/abs/1412.6980), for one tensor, out of place, with no tricks.
Callers pass float64 tensors; the function never mutates its inputs.

It also covers what torch.optim.Adam adds to the paper, in the places torch adds it,
and adamkit's fully decoupled decay:

* ``maximize`` negates the gradient before anything else;
* weight decay ``λ`` (``weight_decay``) in one of three modes:

    - coupled L2 (default): ``g ← g + λθ`` (the decay flows through the moments);
    - decoupled (``decouple_wd``, torch.optim.AdamW's form): ``θ ← θ·(1 − lr·λ)``;
    - fully decoupled (``decouple_lr``): ``θ ← θ·(1 − (lr/max_lr)·λ)``, so the decay
      follows the shape of the learning-rate schedule but not the size of its peak:
      the decay of Loshchilov & Hutter's Algorithm 2 (<https://arxiv.org/abs/1711.05101>),
      η_t·λ with the schedule multiplier η_t = lr/max_lr. ``decouple_lr`` wins over
      ``decouple_wd`` when both are set.

* ``amsgrad`` normalises by the running maximum of ``v`` (bias-corrected with the
  current step's 1 − β2^t, torch's variant; Reddi et al.,
  <https://openreview.net/forum?id=ryQu7f-RZ>, correct no bias) instead of ``v`` itself;
* ε is added after the square root of the bias-corrected ``v̂``, as torch does.

Real tensors only: a complex param is stepped as its real view (``torch.view_as_real``),
as torch.optim does, by the callers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


class AdamState(NamedTuple):
    """Everything one Adam step produces for one tensor."""

    param: Tensor
    exp_avg: Tensor  # m, first moment
    exp_avg_sq: Tensor  # v, second moment
    max_exp_avg_sq: Tensor | None  # max of v over time (amsgrad only)


def adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decouple_wd: bool = False,
    decouple_lr: bool = False,
    max_lr: float | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
    store: Callable[[Tensor, str], Tensor] = lambda moment, name: moment,
) -> AdamState:
    """One Adam step for one tensor: ``step`` is t, counted from 1.

    ``store(moment, name)`` says how a moment is kept between steps; ``name`` is its
    state key ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"). In exact arithmetic it is the
    identity; a backend that keeps moments in float32, bfloat16 or 8-bit codes
    (docs/design/formats.md) passes the rounding or encoding to that format, so that the
    update uses the moments *as stored*, as torch.optim does. (With float16 state this
    matters: v can fall into float16's subnormal range; with int8 codes, the running max
    of v is re-encoded with its block's new scale.)

    >>> import torch
    >>> p, g = torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    >>> z = torch.zeros_like(p)
    >>> out = adam_step(p, g, z, z, None, 1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    >>> round(out.param.item(), 6)  # the first step moves by about lr * sign(g)
    0.9
    """
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if param.is_complex():  # g·g would not be |g|²
        raise TypeError("adam_step takes real tensors: step a complex param as torch.view_as_real(param)")
    theta = param

    # g_t ← ∇f(θ_{t-1})  (negated when maximizing)
    g = -grad if maximize else grad

    # Weight decay, in one of three places.
    if weight_decay != 0.0:
        if decouple_lr:
            if max_lr is None or max_lr <= 0.0:
                raise ValueError(f"decouple_lr needs max_lr > 0, got {max_lr}")
            theta = theta * (1.0 - (lr / max_lr) * weight_decay)
        elif decouple_wd:
            theta = theta * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * theta

    # m_t ← β1·m_{t-1} + (1 − β1)·g_t
    m = store(beta1 * exp_avg + (1.0 - beta1) * g, "exp_avg")
    # v_t ← β2·v_{t-1} + (1 − β2)·g_t²
    v = store(beta2 * exp_avg_sq + (1.0 - beta2) * g * g, "exp_avg_sq")

    # m̂_t ← m_t / (1 − β1^t)
    m_hat = m / (1.0 - beta1**step)

    # v̂_t ← v_t / (1 − β2^t)   (amsgrad: the running max of v_t instead)
    v_max = None
    if amsgrad:
        v_max = store(torch.maximum(max_exp_avg_sq, v), "max_exp_avg_sq")
        v_hat = v_max / (1.0 - beta2**step)
    else:
        v_hat = v / (1.0 - beta2**step)

    # θ_t ← θ_{t-1} − lr · m̂_t / (√v̂_t + ε)   (θ_{t-1} decayed above, if decay is decoupled)
    theta = theta - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return AdamState(theta, m, v, v_max)

