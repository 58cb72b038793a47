"""The portable backend: torch ops, on any device.

Two paths:

* plain (moments in the param's own dtype, float32/float64 or complex, updated
  "nearest"): torch.optim.Adam's foreach op sequence, so torch's numbers bit for bit
  (foreach and for-loop agree elementwise but for one op: coupled decay on a complex
  param, which on CPU, where torch's default is the for-loop, is added as that adds it).
  Every scalar is a Python float computed once per bucket on the host: no per-step host
  sync. The only allocations are the temporaries the math needs (the denominator, and a
  gradient copy when unscaling, maximizing or with coupled decay, because ``.grad`` is
  never written).
* formatted (everything else: bfloat16/float16 params, bf16 or int8 state, kahan,
  master or stochastic updates): per tensor, decode the moments into float32 working
  copies (float64 for float64 params), run the step in the order of operations that
  docs/design/formats.md pins, one rounding per operation, store the moments (encode,
  and use them as stored), and write the param back by its policy. The CPU kernel
  performs the same float32 operations, so the two agree bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from ..formats import param as policy
from ..formats import state as fmt_state
from ..hyperparams import StepScalars
from . import Bucket, read_as_real


def _as_real(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _coupled_decay_as_on_cpu(grads: list[torch.Tensor], params: list[torch.Tensor],
                             weight_decay: float) -> list[torch.Tensor]:
    """g + λθ (new tensors; ``grads`` as real views), a complex CPU param's in complex
    arithmetic. torch.optim's step on CPU is its for-loop one, which adds λθ to a complex
    grad before viewing it as real; its foreach step (its default on CUDA, and this
    module's sequence) adds on the real view, and the two round differently (about 7% of
    the elements of a complex64 param). A real param's add is the same either way."""
    out = []
    for g, p in zip(grads, params):
        if p.is_complex() and p.device.type == "cpu":
            out.append(torch.view_as_real(torch.view_as_complex(g).add(p, alpha=weight_decay)))
        else:
            out.append(g.add(p, alpha=weight_decay))
    return out


def _is_plain(bucket: Bucket) -> bool:
    """Moments in the param's dtype, which is also the compute dtype, and nearest."""
    if bucket.param_update != "nearest" or bucket.state_format == "int8":
        return False
    params = _as_real(bucket.params)
    moments = [*bucket.exp_avgs, *bucket.exp_avg_sqs, *bucket.max_exp_avg_sqs]
    wide = (torch.float32, torch.float64)
    return all(p.dtype in wide for p in params) and all(
        m.dtype == bucket.params[0].dtype for m in moments
    )


def _float32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32, device="cpu").item()


def _sqrt(x: Tensor) -> Tensor:
    """IEEE √ (correctly rounded), as formats.md pins and the CPU kernel computes.

    torch's own float32 sqrt on CPU is off by one ulp for a share of inputs that depends
    on the machine (0.6% where first measured; 17% on a Zen 5 EPYC with torch 2.13, in
    tensors of one element too). √ of a float32 lies at least ~2^-49 (relative) from any
    midpoint between float32s, so a float64 √ within one float64 ulp (2^-52), rounded to
    float32, is the correctly rounded float32 √. CUDA's float32 sqrt is correctly rounded
    already (nvcc's default, -prec-sqrt=true): no float64 there. An Intel GPU takes the
    float64 route where it has float64 (many have none, and raise for it); MPS (no
    float64) and other devices their own √."""
    if x.dtype == torch.float32 and _float64_sqrt(x.device):
        return x.double().sqrt().float()
    return x.sqrt()


@functools.lru_cache(maxsize=None)
def _float64_sqrt(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "xpu":
        return bool(getattr(torch.xpu.get_device_properties(device), "has_fp64", False))
    return False


class TorchBackend:
    name = "torch"

    def unavailable_reason(self) -> str | None:
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    @torch.no_grad()
    def step(self, bucket: Bucket, s: StepScalars) -> None:
        if _is_plain(bucket):
            self._step_plain(bucket, s)
        elif bucket.params:
            # √bc2 as a 0-dim tensor, made once per bucket by a fill (torch.tensor(x,
            # device=cuda) copies from the host: a stream sync per tensor per step)
            p = bucket.params[0]
            work = torch.float64 if p.dtype == torch.float64 else torch.float32
            bc2_sqrt = torch.full((), s.bias_correction2_sqrt, dtype=work, device=p.device)
            for i in range(len(bucket.params)):
                self._step_formatted(bucket, i, s, bc2_sqrt)

    def _step_plain(self, bucket: Bucket, s: StepScalars) -> None:
        written = (bucket.params, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.max_exp_avg_sqs)
        if any(t.is_neg() for ts in written for t in ts):
            # torch's foreach ops refuse to write a negative-bit tensor (its memory holds
            # -t; torch's for-loop step writes one): step plain copies, then write them back
            copies = [[t.resolve_neg() for t in ts] for ts in written]
            self._step_plain(dataclasses.replace(
                bucket, params=copies[0], exp_avgs=copies[1], exp_avg_sqs=copies[2],
                max_exp_avg_sqs=copies[3]), s)
            for ts, cs in zip(written, copies):
                for t, c in zip(ts, cs):
                    if c is not t:
                        t.copy_(c)
            return
        params, grads = _as_real(bucket.params), [read_as_real(g) for g in bucket.grads]
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
            if any(p.is_complex() and p.device.type == "cpu" for p in bucket.params):
                grads = _coupled_decay_as_on_cpu(grads, bucket.params, s.weight_decay)
            elif own:
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

    def _step_formatted(self, bucket: Bucket, i: int, s: StepScalars, bc2_sqrt: Tensor) -> None:
        """One tensor, in formats.md's order of operations (each line one rounding).
        Scalars enter as Python floats, which torch rounds to the working dtype, as the
        kernel's float32 Hyper fields are."""
        p, st = bucket.params[i], bucket.states[i]
        fmt, update = bucket.state_format, bucket.param_update
        work = bc2_sqrt.dtype  # the working dtype step() made it in

        def moment(name: str, tensors: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
            stored, scale = tensors[i], st.get(f"{name}_scale")
            return fmt_state.read(stored, scale, fmt, name).to(work), stored, scale

        theta = policy.theta_eff(p, st, update, work)
        g = bucket.grads[i].to(work, copy=True)  # a copy: .grad is never written
        if s.grad_scale_inv != 1.0:  # a GradScaler's scale, undone (the kernel: g·(±1/s))
            g = g * s.grad_scale_inv
        if s.maximize:
            g = g.neg()
        if s.weight_decay != 0.0:
            g = g + theta * s.weight_decay  # coupled decay uses θ_eff

        m, m_stored, m_scale = moment("exp_avg", bucket.exp_avgs)
        one_minus_beta1 = 1.0 - s.beta1
        low = (_float32(one_minus_beta1) if work == torch.float32 else one_minus_beta1) < 0.5
        # torch.lerp's two forms: whichever keeps the small weight on the difference.
        m = m + (g - m) * one_minus_beta1 if low else g - (g - m) * s.beta1
        m = fmt_state.write(m_stored, m_scale, fmt, "exp_avg", m)

        v, v_stored, v_scale = moment("exp_avg_sq", bucket.exp_avg_sqs)
        v = v * s.beta2 + (g * (1.0 - s.beta2)) * g
        v = fmt_state.write(v_stored, v_scale, fmt, "exp_avg_sq", v)
        if s.amsgrad:
            vmax, vmax_stored, vmax_scale = moment("max_exp_avg_sq", bucket.max_exp_avg_sqs)
            v = torch.maximum(vmax, v)
            v = fmt_state.write(vmax_stored, vmax_scale, fmt, "max_exp_avg_sq", v)

        # bc2_sqrt a 0-dim tensor, not a Python float: on CUDA, division by a host scalar
        # is a multiplication by its reciprocal, which rounds differently.
        denom = _sqrt(v) / bc2_sqrt + s.eps
        step = (m / denom) * -s.step_size
        theta = (theta * s.decay if s.decay != 1.0 else theta) + step
        key = policy.step_key(int(st["sr_seed"]), s.step) if update == "stochastic" else 0
        policy.write_back(p, st, update, theta, key)


BACKEND = TorchBackend()
