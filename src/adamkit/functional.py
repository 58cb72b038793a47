"""A functional step over lists of tensors, for code that keeps its own state.

>>> import torch
>>> from adamkit.functional import adam_step
>>> p = [torch.ones(3)]; g = [torch.full((3,), 0.5)]
>>> m = [torch.zeros(3)]; v = [torch.zeros(3)]
>>> adam_step(p, g, m, v, step=1, lr=0.1)
>>> p[0]
tensor([0.9000, 0.9000, 0.9000])
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from . import backends, formats
from .hyperparams import check_scalar_range, for_param_dtype, step_scalars, validate_group


def adam_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None = None,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decouple_wd: bool = False,
    decouple_lr: bool = False,
    max_lr: float | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
    backend: str = "auto",
) -> None:
    """One Adam step, in place, for tensors that are all at step ``step`` (counted from 1).

    The math is ``adamkit.reference.adam_step``; ``backend`` picks where it runs.
    Tensors may mix devices and dtypes; each (device, dtype, moment dtype) runs as one
    bucket. Moments are plain tensors stored in their own dtype (float32, bfloat16,
    float64, float16: the "fp32"/"bf16"/... formats of docs/design/formats.md, used as
    stored) and params update "nearest"; the optimizer classes offer int8 moments and
    the other update policies, which need state beyond these lists.

    Every tensor is checked before any is written: grads and moments on their param's
    device and of its shape, moments of a state format's dtype, complex where the param
    is (of its dtype), none an inference tensor or an expanded view. A tensor listed twice (a param, or
    moments two entries share) is updated once per listing, in turn, as torch's for-loop
    step does (its foreach step reads every listing first); the lists then run one index
    at a time.

    Args:
        params, grads: θ and g, one list entry per tensor (``.grad`` is not needed).
        exp_avgs, exp_avg_sqs: m and v, updated in place as
            m ← β1·m + (1 − β1)·g and v ← β2·v + (1 − β2)·g².
        max_exp_avg_sqs: the running max of v, needed with ``amsgrad``.
        step: t, counted from 1: θ ← θ − lr·(m/(1 − β1^t)) / (√(v/(1 − β2^t)) + eps).
        lr, betas, eps: lr, (β1, β2), ε, with torch.optim.Adam's defaults.
        weight_decay: λ; coupled (g ← g + λθ) unless ``decouple_wd`` (θ ← θ·(1 − lr·λ))
            or ``decouple_lr`` (θ ← θ·(1 − (lr/max_lr)·λ)).
        max_lr: the peak lr of ``decouple_lr``'s schedule. Pass it: a stateless call
            cannot know the peak, so it defaults to this call's ``lr``, which makes
            lr/max_lr = 1 and the decay λ at every step, whatever the schedule.
        amsgrad, maximize: as ``adamkit.Adam``'s.
        backend: "auto", "cpu", "torch" or "reference".
    """
    given = step
    try:  # an int, or an integer that says so (a NumPy int, a 0-dim integer tensor)
        step = None if isinstance(step, bool) else operator.index(step)
    except TypeError:
        step = None
    if step is None or step < 1:
        raise ValueError(f"step is an int counted from 1, got {given!r}")
    group = dict(
        lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
        maximize=maximize, decouple_wd=decouple_wd, decouple_lr=decouple_lr,
        max_lr=lr if decouple_lr and max_lr is None else max_lr, backend=backend,
    )
    validate_group(group)
    backends.check_name(backend)
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    columns = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    if len({len(c) for c in columns}) != 1:
        raise ValueError("params, grads and state lists must have the same length")
    _check_tensors(columns)
    scalars = step_scalars(group, step)
    for dtype in {p.dtype for p in params}:
        check_scalar_range(scalars, dtype)
    # A tensor listed twice (a param, or moments two params share) or views sharing
    # memory are updated once per listing, in turn, as torch's for-loop and the
    # reference do: one index at a time.
    # Together in one bucket, the fused paths would read every listing before writing.
    passes = [[i] for i in range(len(params))] if _aliased(columns) else [range(len(params))]
    for indices in passes:
        by_kind: dict[tuple, list[int]] = {}
        for i in indices:
            by_kind.setdefault((params[i].device, params[i].dtype, formats.format_of(exp_avgs[i])), []).append(i)
        for (device, dtype, fmt), idx in by_kind.items():
            pick = lambda ts: [ts[i] for i in idx]  # noqa: E731
            bucket = backends.Bucket(
                group=group, params=pick(params), grads=pick(grads), exp_avgs=pick(exp_avgs),
                exp_avg_sqs=pick(exp_avg_sqs), max_exp_avg_sqs=pick(max_exp_avg_sqs) if amsgrad else [],
                states=[{} for _ in idx], state_format=fmt,
            )
            with torch.no_grad():
                backends.resolve(backend, device, dtype).step(bucket, for_param_dtype(scalars, dtype))


def _check_tensors(columns: list[list[Tensor]]) -> None:
    """Every tensor checked before any is updated (a bad one late in the lists used to
    fail after the earlier params had moved, and a grad or moment on another device
    crashed the cpu kernel): floating params, grads dense and of their param's dtype,
    shape and device, moments that can be written in place (as params), on their param's
    device and of its shape, of a state format's dtype (ValueError otherwise), complex
    exactly where the param is, and then of its dtype (RuntimeError, as torch.optim's ops
    raise on these)."""
    params, grads, *states = columns
    for i, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(p, Tensor) or not isinstance(g, Tensor):
            raise TypeError(f"params[{i}] and grads[{i}] must be tensors, got "
                            f"{type(p).__name__} and {type(g).__name__}")
        backends.check_param(p)
        backends.check_grad(p, g, f"grads[{i}]")  # (on p's device too)
        for name, column in zip(("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), states):
            _check_moment(p, column[i], f"{name}[{i}]", f"params[{i}]")


def _check_moment(p: Tensor, t: object, label: str, of: str) -> None:
    if not isinstance(t, Tensor) or t.shape != p.shape:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise RuntimeError(f"{label} has shape {got}, {of} {tuple(p.shape)}")
    backends.check_device(p, t)
    formats.format_of(t)  # ValueError for int, bool, ... moments
    # a real moment of a complex param drops its imaginary part, and so does one of the
    # other complex precision (the step casts it to the param's real dtype)
    if t.is_complex() != p.is_complex() or (p.is_complex() and t.dtype != p.dtype):
        raise RuntimeError(f"{label} of dtype {t.dtype} for {of} of dtype {p.dtype}: the moments of a "
                           "complex param are complex of its dtype, those of a real param real")
    backends.check_param(t)  # written in place as the param is




def _aliased(columns: list[list[Tensor]]) -> bool:
    """Whether two tensors the step writes (params and moments) may share memory: a
    tensor listed twice, or views whose spans of memory overlap. Views into one flat
    buffer that do not overlap keep their fast path; interleaved views (two columns of a
    matrix) are taken as aliased, which costs speed, never the result."""
    params, _grads, *states = columns
    spans = []
    for t in (t for column in (params, *states) for t in column):
        try:
            address = t.data_ptr() if t.numel() else 0
        except (RuntimeError, NotImplementedError):  # a wrapper subclass (DTensor): no storage
            address = 0
        if address:  # 0: nothing in memory to share (empty, meta: every meta tensor reports 0)
            extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
            spans.append((str(t.device), address, address + extent * t.element_size()))
    spans.sort()
    return any(a[0] == b[0] and b[1] < a[2] for a, b in zip(spans, spans[1:]))
