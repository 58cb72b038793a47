"""The reference backend: runs ``adamkit.reference.adam_step`` tensor by tensor.

Each tensor is widened to float64, stepped by the oracle from the group's raw
hyperparameters (not the folded ``StepScalars``, so that a mistake in the folding
shows up as a difference between backends), and rounded back into its storage.
Storage follows docs/design/formats.md through ``adamkit.formats``: moments are decoded
from their format and stored back into it inside the step (the oracle's ``store``), so
the update uses them as stored; the param is read and written by its update policy, with
θ_eff and θ_new in float64. Slow by design; it exists to be obviously right.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats import param as policy
from ..formats import state as fmt_state
from ..hyperparams import StepScalars
from ..reference import adam_step
from . import Bucket, read_as_real


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
        fmt, update = bucket.state_format, bucket.param_update
        for i, param in enumerate(bucket.params):
            st = bucket.states[i]
            slots = {"exp_avg": bucket.exp_avgs[i], "exp_avg_sq": bucket.exp_avg_sqs[i]}
            if amsgrad:
                slots["max_exp_avg_sq"] = bucket.max_exp_avg_sqs[i]
            old = {name: _real(fmt_state.read(t, st.get(f"{name}_scale"), fmt, name)).double()
                   for name, t in slots.items()}
            new: dict[str, Tensor] = {}

            def store(moment: Tensor, name: str) -> Tensor:
                """The moment as its format keeps it (kept aside to be written back)."""
                if fmt == "int8":
                    codes, scale = fmt_state.encode(moment.float(), fmt_state.CODE_MAPS[name])
                    new[name], new[f"{name}_scale"] = codes, scale
                    return fmt_state.decode(codes, scale, fmt_state.CODE_MAPS[name]).double()
                new[name] = fmt_state.round_to(moment, _real(slots[name]).dtype)
                return new[name].double()

            wide = torch.complex128 if param.is_complex() else torch.float64
            out = adam_step(
                _real(policy.theta_eff(param, st, update, wide)),
                read_as_real(bucket.grads[i]).double() * scalars.grad_scale_inv,
                old["exp_avg"],
                old["exp_avg_sq"],
                old.get("max_exp_avg_sq"),
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
                store=store,
            )
            for name, t in slots.items():
                _real(t).copy_(new[name])
                if fmt == "int8":
                    st[f"{name}_scale"].copy_(new[f"{name}_scale"])
            theta = out.param if not param.is_complex() else torch.view_as_complex(out.param)
            key = policy.step_key(int(st["sr_seed"]), scalars.step) if update == "stochastic" else 0
            policy.write_back(param, st, update, theta, key)


BACKEND = ReferenceBackend()
