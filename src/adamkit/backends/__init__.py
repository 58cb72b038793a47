"""Where a step runs. Each backend is one module; this file chooses among them.

A backend gets a ``Bucket`` (tensors of one group that share device, dtype,
storage and step count) and the ``adamkit.hyperparams.StepScalars`` for it, and updates the
params and state in place. It never writes into ``.grad``.

``backend="auto"`` takes the first of :data:`AUTO_ORDER` that is available and runs the
bucket's device and dtype. Where a fast backend would run a bucket but cannot here (its
native part failed to build or load), or a backend named explicitly cannot run it, the
bucket goes to the portable torch backend with one warning per reason, never an error.
Dtypes a fast backend does not cover (float64, complex) go to torch silently: that is
the plan, not a failure.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..hyperparams import StepScalars


@dataclass
class Bucket:
    """Tensors of one param group that share device, dtype, storage and step count.

    Storage (docs/design/formats.md): ``state_format`` says how the moments are kept
    ("fp32", "bf16", "int8": uint8 codes with ``<name>_scale`` in ``states``, "fp64", or
    "fp16" for float16 moments handed to the functional API), ``param_update`` how the
    params take the update ("nearest", "kahan", "master", "stochastic", with their
    buffers in ``states``)."""

    group: dict[str, Any]  # the param group, for backends that read raw hyperparameters
    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]  # empty unless amsgrad
    states: list[dict[str, Any]]  # full per-param state, for format-specific buffers
    state_format: str = "fp32"
    param_update: str = "nearest"
    steps: list[Tensor] = field(default_factory=list)  # state["step"] counters, or none


# the largest n such that the dtype holds every whole number up to it
_COUNTS_EXACTLY = {torch.bfloat16: 2**8, torch.float16: 2**11, torch.float32: 2**24, torch.float64: 2**53}


def counter_reads(t: int, steps: list[Tensor]) -> int:
    """What the bucket's step counters read once they have counted step t: t, unless
    their dtype cannot hold it. A float32 counter stops at 2^24 (2^24 + 1 rounds back to
    it, as torch.optim's does), and torch.optim takes every later step at that t."""
    dtype = steps[0].dtype if steps else torch.float32
    if not dtype.is_floating_point or t <= _COUNTS_EXACTLY.get(dtype, 0):
        return t
    return int(torch.tensor(float(t), dtype=dtype, device="cpu").item())


def count_steps(backend: Backend, bucket: Bucket) -> None:
    """Add 1 to the bucket's step counters after its update, unless the backend did
    (``counts_steps``: the CPU kernel does it in the same call)."""
    if not bucket.steps or getattr(backend, "counts_steps", False):
        return
    if any(map(Tensor.is_neg, bucket.steps)):
        # torch's foreach ops refuse a list holding a negative-bit tensor (its for-loop
        # step, as this loop, adds to one): the params have moved by now, so no raising
        for step in bucket.steps:
            step.add_(1)
    else:
        torch._foreach_add_(bucket.steps, 1)  # an int: an integer counter stays one, as in torch


class Backend(Protocol):
    name: str
    # Optional: ``counts_steps = True`` when ``step`` also adds 1 to ``bucket.steps``;
    # ``prepare(bucket)`` returning an object with ``refresh(grads) -> bool``,
    # ``steps_equal(t) -> bool`` and ``run(scalars)`` lets adamkit.step_cache reuse a
    # bucket's setup between steps.

    def unavailable_reason(self) -> str | None:
        """None when usable on this machine, else why not (shown in the fallback warning)."""

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool: ...

    def step(self, bucket: Bucket, scalars: StepScalars) -> None: ...


def grad_fits(p: Tensor, grad: Tensor) -> bool:
    """Whether a step can take ``grad`` for ``p`` as it is: dense, of p's dtype and shape
    (the cached plan's test; ``check_grad`` raises torch's error where it fails), on p's
    device."""
    return (not grad.is_sparse and grad.dtype == p.dtype and grad.shape == p.shape
            and grad.device == p.device)


def check_param(p: Tensor) -> None:
    """torch.optim's errors for a param no in-place update may write (RuntimeError; torch's
    first in-place op raises them, after earlier params moved): an inference tensor
    outside inference mode, and a non-empty strided param whose elements share memory (a
    stride of 0 over more than one element, as ``expand`` gives: what torch's
    internal-overlap check reports as overlapping; others it cannot tell and lets be).
    A tensor given inference data through ``.data =`` keeps its version counter, and torch
    updates it in place as any other. Also a zero tensor (no memory to write), and a
    complex tensor with the lazy conjugate bit (``.conj()``), which has no real view."""
    if p._is_zerotensor():
        raise RuntimeError(
            "ZeroTensors are immutable. Please use the materialized zero tensor obtained using "
            ".clone() if you want a mutable tensor.")
    if p.is_inference() and not torch.is_inference_mode_enabled() and not _tracks_version(p):
        raise RuntimeError(
            "Inplace update to inference tensor outside InferenceMode is not allowed.You can "
            "make a clone to get a normal tensor before doing inplace update.See "
            "https://github.com/pytorch/rfcs/pull/17 for more details.")
    if p.is_conj():  # a resolved copy would take the writes (read_as_real)
        raise RuntimeError(
            "view_as_real doesn't work on unresolved conjugated tensors: a complex tensor a "
            "step writes in place cannot carry the lazy conjugate bit; store "
            "t.resolve_conj() (or t.conj_physical()) in its place")
    if p.layout == torch.strided and p.numel() > 1 and any(
            stride == 0 and size > 1 for stride, size in zip(p.stride(), p.shape)):
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers to "
            "a single memory location. Please clone() the tensor before performing the "
            "operation.")


def check_written(tensors: list[Tensor]) -> None:
    """check_param for each of ``tensors`` (state a step writes in place), where a quick
    look finds something to look at (0.3 us a tensor, not 2.5: the full path checks each
    param's state this way). A plain tensor with a stride 0 over more than one element
    is not contiguous; a subclass may say it is."""
    for t in tensors:
        if (type(t) is not Tensor or t.is_inference() or t._is_zerotensor() or not t.is_contiguous()
                or t.is_conj()):
            check_param(t)


def read_as_real(t: Tensor) -> Tensor:
    """A tensor a step only reads (a grad) as real numbers: a complex one as its real view
    (..., 2). One with the lazy conjugate bit (autograd gives it to z's grad in
    ``(z.conj() * w).real``) has no real view and is read as its resolved copy; anything
    a step writes is refused with the bit (check_param), as its writes would go to a copy."""
    if not t.is_complex():
        return t
    return torch.view_as_real(t.resolve_conj())  # resolve_conj: t itself without the bit


def check_step_counter(step: Tensor) -> None:
    """torch.optim's errors for a counter its step cannot take, raised before anything
    changes: one that is no Tensor (a number set by hand), and a bool one (which torch's
    ``step += 1`` refuses after the params moved)."""
    if not isinstance(step, Tensor):
        raise RuntimeError("API has changed, `state_steps` argument must contain a list of singleton tensors")
    if step.dtype == torch.bool:
        raise RuntimeError("result type Long can't be cast to the desired output type Bool")


_PLAIN_DISPATCH = Tensor.__torch_dispatch__  # what tensors and Parameters that hold one keep


def is_wrapper(t: Tensor) -> bool:
    """A wrapper tensor subclass (DTensor, ...): its data_ptr is no storage of its
    values, and ops mixing it with plain tensors raise."""
    return is_wrapper_type(type(t))


def is_wrapper_type(cls: type) -> bool:
    """Whether tensors of type ``cls`` are wrapper subclasses (``is_wrapper``)."""
    return cls.__torch_dispatch__ is not _PLAIN_DISPATCH


def check_storage(p: Tensor, state_format: str, param_update: str) -> None:
    """NotImplementedError for storage a step cannot give ``p``: int8 moments and
    stochastic rounding of a wrapper subclass such as DTensor. Both are defined on the
    tensor's flat indices (the int8 blocks, the random bits' counter), which a sharded
    tensor's local pieces do not carry; the plain formats and policies run as for any
    tensor, through torch's ops (torch backend)."""
    if is_wrapper(p) and (state_format == "int8" or param_update == "stochastic"):
        what = "state_format='int8'" if state_format == "int8" else "param_update='stochastic'"
        raise NotImplementedError(
            f"{what} is not supported for {type(p).__name__} params (a param of shape "
            f"{tuple(p.shape)}): give this param's group state_format='fp32' or 'bf16' "
            "and param_update='nearest', 'kahan' or 'master'")


def version_of(t: Tensor) -> int:
    """t's version counter, or -1 for an inference tensor that has none (a param made in
    inference mode; checks.cpp reads a disabled counter as -1 too): torch's in-place ops
    bump it, and raise the inference-tensor error exactly where there is none. Master's
    record of p's writes then sees none, as nothing counts them."""
    try:
        return t._version
    except RuntimeError:
        return -1


def write_mark(t: Tensor) -> tuple[int, int]:
    """What tells whether t was written since: its version counter (version_of), and which
    C++ tensor the Python object holds (torch.utils.swap_tensors, which nn.Module's
    load_state_dict and .to() use under torch.__future__'s swap mode, exchanges those, and
    the version counter with them: the swapped-in tensor's may equal the old one's)."""
    return version_of(t), t._cdata


def _tracks_version(p: Tensor) -> bool:
    return version_of(p) >= 0


# torch.optim's ops have no kernels for float8 (its lerp raises NotImplementedError), where
# every update would round to 3 mantissa bits whatever the update policy. complex32
# (torch's experimental ComplexHalf), which torch.optim steps, has no state format here:
# the formatted paths read it as a real tensor and dropped its imaginary parts.
STEPPED_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16,
                            torch.complex64, torch.complex128})


def check_grad(p: Tensor, grad: Tensor, label: str = "a grad") -> None:
    """torch.optim's errors for a (param, grad) no step can take (RuntimeError; torch
    raises them from its first op): an integer or bool param (torch's lerp has no such
    kernel, so its NotImplementedError, a RuntimeError; a step would truncate the update),
    a float8 one (the same error) or a complex32 one (which torch steps, see
    STEPPED_DTYPES),
    a sparse grad, or one not of its param's dtype and shape (a fused kernel would read it
    as the param's dtype and size), or on another device (``.grad`` refuses one, but
    ``p.data =`` moving p leaves its grad where it was, and the CPU kernel would read a
    GPU address as host memory)."""
    if not (p.is_floating_point() or p.is_complex()):
        raise NotImplementedError(f"a param of dtype {p.dtype}: Adam updates floating-point tensors")
    if p.dtype not in STEPPED_DTYPES:
        raise NotImplementedError(f"a param of dtype {p.dtype}: adamkit steps float32, float64, "
                                  "bfloat16, float16, complex64 and complex128 params")
    if grad.is_sparse:
        raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
    if grad.dtype != p.dtype or grad.shape != p.shape:
        raise RuntimeError(f"{label} of dtype {grad.dtype} and shape {tuple(grad.shape)} does not "
                           f"match its param's dtype {p.dtype} and shape {tuple(p.shape)}")
    check_device(p, grad)


def check_device(p: Tensor, t: Tensor) -> None:
    """torch's foreach error for a tensor (a grad, a moment) not on its param's device."""
    if t.device != p.device:
        raise RuntimeError(f"Tensor on device {t.device} is not on the expected device {p.device}!")


def _registry() -> dict[str, Backend]:
    from . import cpu, reference, torch_ops

    return {"reference": reference.BACKEND, "torch": torch_ops.BACKEND, "cpu": cpu.BACKEND}


BACKENDS: dict[str, Backend] = _registry()
AUTO_ORDER = ("cpu", "triton", "torch")
NAMES = ("auto", *BACKENDS)


def check_name(name: object) -> None:
    if name not in NAMES:
        valid = ", ".join(repr(n) for n in NAMES)
        raise ValueError(f"Invalid backend: {name!r}; valid backends are {valid}")


@functools.lru_cache(maxsize=None)
def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs tensors of ``device`` and ``dtype`` for the choice ``name``."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = BACKENDS.get(candidate)
            if backend is None or not backend.supports(device, dtype):
                continue
            reason = backend.unavailable_reason()
            if reason is None:
                return backend
            _warn_once(f"adamkit: backend {candidate!r} unavailable ({reason}); using 'torch'")
        return BACKENDS["torch"]
    backend = BACKENDS[name]
    reason = backend.unavailable_reason()
    if reason is None and backend.supports(device, dtype):
        return backend
    why = reason or f"it does not run {dtype} on {device.type}"
    _warn_once(f"adamkit: backend {name!r} unusable here ({why}); using 'torch'")
    return BACKENDS["torch"]


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)
