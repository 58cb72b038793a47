"""The reference backend: runs :func:`adamkit.reference.adam_step` tensor by tensor.

Each tensor is widened to float64, stepped by the oracle from the group's raw
hyperparameters (not the folded :class:`StepScalars`, so that a mistake in the folding
shows up as a difference between backends), and rounded back into its storage.
Slow by design; it exists to be obviously right.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..hyperparams import StepScalars
from ..reference import adam_step
from . import Bucket


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _scalar(x) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


class ReferenceBackend:
    name = "reference"

    def unavailable_reason(self) -> str | None:
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    @torch.no_grad()
    def step(self, bucket: Bucket, scalars: StepScalars) -> None:
        g = bucket.group
        beta1, beta2 = (float(b) for b in g["betas"])
        amsgrad = bool(g["amsgrad"])
        for i, param in enumerate(bucket.params):
            p, m, v = _real(param), _real(bucket.exp_avgs[i]), _real(bucket.exp_avg_sqs[i])
            vmax = _real(bucket.max_exp_avg_sqs[i]) if amsgrad else None
            out = adam_step(
                p.double(),
                _real(bucket.grads[i]).double() * scalars.grad_scale_inv,
                m.double(),
                v.double(),
                vmax.double() if amsgrad else None,
                scalars.step,
                lr=_scalar(g["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=float(g["eps"]),
                weight_decay=float(g["weight_decay"]),
                decouple_wd=bool(g["decouple_wd"]),
                decouple_lr=bool(g["decouple_lr"]),
                max_lr=None if g["max_lr"] is None else _scalar(g["max_lr"]),
                amsgrad=amsgrad,
                maximize=bool(g["maximize"]),
                store=lambda moment: moment.to(m.dtype).double(),
            )
            p.copy_(out.param)
            m.copy_(out.exp_avg)
            v.copy_(out.exp_avg_sq)
            if amsgrad:
                vmax.copy_(out.max_exp_avg_sq)


BACKEND = ReferenceBackend()
