"""The "cpu" backend: fused native kernels, one call per bucket, one pass over memory.

Per element, the kernel reads param, grad and the moments once and writes them once
(28 bytes per float32 param, 14 for bfloat16 params with bfloat16 state), in float32
registers, vectorized for the CPU's instruction set (AVX-512, AVX2 or generic) and split
over torch's thread count with OpenMP. Storage (param dtype, moment format, param
update policy) is a compile-time choice: each combination is its own instantiation of
one template (adam.h), so formats join without touching the loop.

Storage comes from the bucket (``state_format``, ``param_update``). Tensors it cannot run
(non-contiguous ones, or moments in a format it has no kernel for, such as float16
moments handed to the functional API) go to the torch backend, in the same step.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from array import array

import torch

from ...formats.param import step_key
from ...hyperparams import StepScalars
from .. import Bucket
from . import library

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
STATE_FORMATS = {"fp32": 0, "bf16": 1, "int8": 2}
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}
UPDATES = {"nearest": 0, "kahan": 1, "master": 2, "stochastic": 3}
EXTRA_KEY = {"kahan": "kahan_comp", "master": "master_param"}
SCALE_KEYS = ("exp_avg_scale", "exp_avg_sq_scale", "max_exp_avg_sq_scale")


@functools.lru_cache(maxsize=1)
def _library():
    return library.load()


def _fits(tensors, fmt: str) -> bool:
    return (fmt in STATE_FORMATS and tensors[2].dtype == STORAGE[fmt]
            and all(t is None or t.is_contiguous() for t in tensors))


class CpuBackend:
    name = "cpu"

    def unavailable_reason(self) -> str | None:
        return _library()[2]

    @property
    def isa(self) -> str:
        return _library()[1]

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in DTYPES

    @torch.no_grad()
    def step(self, bucket: Bucket, s: StepScalars) -> None:
        lib = _library()[0]
        policy = bucket.param_update
        extra_key = EXTRA_KEY.get(policy)
        amsgrad = bool(s.amsgrad)
        # Per-tensor Python work is the cost that grows with the tensor count (1024
        # tensors: a few ms per step), so this loop stays lean: one list per pointer row.
        rows = {name: [] for name in library.POINTER_ROWS}
        pointer_rows = [rows[name] for name in library.POINTER_ROWS[:6]]
        scale_rows = [rows[name] for name in library.POINTER_ROWS[6:]]
        int8 = bucket.state_format == "int8"
        numels, keys, rest = [], [], []
        for i, p in enumerate(bucket.params):
            st = bucket.states[i]
            vmax = bucket.max_exp_avg_sqs[i] if amsgrad else None
            extra = st[extra_key] if extra_key else None
            members = (p, bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i], vmax, extra)
            if not _fits(members, bucket.state_format):
                rest.append(i)
                continue
            for row, t in zip(pointer_rows, members):
                row.append(0 if t is None else t.data_ptr())
            for row, key in zip(scale_rows, SCALE_KEYS):
                row.append(st[key].data_ptr() if int8 and key in st else 0)
            numels.append(p.numel())
            keys.append(step_key(int(st["sr_seed"]), s.step) if policy == "stochastic" else 0)
        if numels:
            self._call(lib, bucket, s, policy, rows, numels, keys)
        if rest:
            from ..torch_ops import BACKEND as torch_backend

            torch_backend.step(_subset(bucket, rest), s)

    def _call(self, lib, bucket, s, policy, rows, numels, keys) -> None:
        n = len(numels)
        table = array("q")
        for row in library.POINTER_ROWS:
            table.extend(rows[row])
        table.extend(numels)
        table.extend([0] * (n + 1))  # chunk_start scratch
        key_array = array("I", keys)
        base, _ = table.buffer_info()
        args = library.StepArgs(
            n_tensors=n,
            n_threads=torch.get_num_threads(),
            param_dtype=DTYPES[bucket.params[0].dtype],
            state_format=STATE_FORMATS[bucket.state_format],
            param_update=UPDATES[policy],
            h=library.Hyper(
                beta1=s.beta1, beta2=s.beta2, one_minus_beta1=1.0 - s.beta1,
                one_minus_beta2=1.0 - s.beta2, eps=s.eps, weight_decay=s.weight_decay,
                decay=s.decay, step_size=s.step_size, bc2_sqrt=s.bias_correction2_sqrt,
                grad_scale_inv=s.grad_scale_inv, amsgrad=int(s.amsgrad), maximize=int(s.maximize),
            ),
            sr_keys=key_array.buffer_info()[0],
            numels=base + 8 * n * len(library.POINTER_ROWS),
            chunk_start=base + 8 * n * (len(library.POINTER_ROWS) + 1),
        )
        for k, row in enumerate(library.POINTER_ROWS):
            setattr(args, row, base + 8 * n * k)
        status = lib.adamkit_step(ctypes.byref(args))
        if status != 0:
            raise RuntimeError(f"adamkit cpu kernel rejected the bucket (status {status})")


def _subset(bucket: Bucket, idx: list[int]) -> Bucket:
    pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
    return dataclasses.replace(
        bucket, params=pick(bucket.params), grads=pick(bucket.grads),
        exp_avgs=pick(bucket.exp_avgs), exp_avg_sqs=pick(bucket.exp_avg_sqs),
        max_exp_avg_sqs=pick(bucket.max_exp_avg_sqs), states=pick(bucket.states))


BACKEND = CpuBackend()
