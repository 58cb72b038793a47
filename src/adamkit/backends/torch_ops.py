"""The portable backend: torch foreach (multi-tensor) ops, on any device.

It issues the same op sequence as torch.optim.Adam's foreach path, so on float32 and
float64 it gives torch's numbers bit for bit. Every scalar is a Python float computed
once per bucket on the host: no per-step host sync. The only allocations are the
temporaries the math needs (the denominator, and a gradient copy when unscaling,
maximizing or with coupled decay, because ``.grad`` is never written).
"""

from __future__ import annotations

import torch

from ..hyperparams import StepScalars
from . import Bucket


def _as_real(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


class TorchBackend:
    name = "torch"

    def unavailable_reason(self) -> str | None:
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    @torch.no_grad()
    def step(self, bucket: Bucket, s: StepScalars) -> None:
        params, grads = _as_real(bucket.params), _as_real(bucket.grads)
        exp_avgs, exp_avg_sqs = _as_real(bucket.exp_avgs), _as_real(bucket.exp_avg_sqs)

        own = False  # whether `grads` is our own copy (never write into .grad)
        if s.grad_scale_inv != 1.0:
            grads, own = torch._foreach_mul(grads, s.grad_scale_inv), True
        if s.maximize:
            if own:
                torch._foreach_neg_(grads)
            else:
                grads, own = torch._foreach_neg(grads), True
        if s.decay != 1.0:
            torch._foreach_mul_(params, s.decay)
        if s.weight_decay != 0.0:
            if own:
                torch._foreach_add_(grads, params, alpha=s.weight_decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=s.weight_decay)

        torch._foreach_lerp_(exp_avgs, grads, 1.0 - s.beta1)
        torch._foreach_mul_(exp_avg_sqs, s.beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - s.beta2)
        del grads

        second = exp_avg_sqs
        if s.amsgrad:
            second = _as_real(bucket.max_exp_avg_sqs)
            torch._foreach_maximum_(second, exp_avg_sqs)
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, s.bias_correction2_sqrt)
        torch._foreach_add_(denom, s.eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, -s.step_size)


BACKEND = TorchBackend()
