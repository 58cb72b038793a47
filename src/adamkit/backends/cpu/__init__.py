"""The "cpu" backend: fused native kernels, one call per bucket, one pass over memory.

Per element, the kernel reads param, grad and the moments once and writes them once
(28 bytes per float32 param, 14 for bfloat16 params with bfloat16 state), in float32
registers, vectorized for the CPU's instruction set (AVX-512, AVX2 or generic) and split
over torch's thread count with OpenMP. Storage (param dtype, moment format, param
update policy) is a compile-time choice: each combination is its own instantiation of
one template (adam.h), so formats join without touching the loop.

Storage comes from the bucket (``state_format``, ``param_update``). Tensors it cannot run
(non-contiguous ones, wrapper subclasses such as DTensor, whose data_ptr is not their
values' storage, tensors with the negative bit or zero tensors, stochastic seeds that are
not int64 scalars, or moments in a format it has no kernel for, such as float16 moments
handed to the functional API) go to the torch backend, in the same step.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import operator
from array import array
from itertools import repeat

import torch
from torch import Tensor

from ...formats import state as state_formats
from ...hyperparams import StepScalars
from .. import Bucket, count_steps, grad_fits, is_wrapper, is_wrapper_type
from . import library

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
STATE_FORMATS = {"fp32": 0, "bf16": 1, "int8": 2}
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}
UPDATES = {"nearest": 0, "kahan": 1, "master": 2, "stochastic": 3}
EXTRA_KEY = {"kahan": "kahan_comp", "master": "master_param"}
SCALE_KEYS = ("exp_avg_scale", "exp_avg_sq_scale", "max_exp_avg_sq_scale")
_NBYTES = operator.attrgetter("nbytes")
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_IS_CPU = operator.attrgetter("is_cpu")


@functools.lru_cache(maxsize=1)
def _library():
    return library.load()


def _fits(tensors, fmt: str, policy: str) -> bool:
    """Whether the kernel can run (param, grad, m, v, max v, buffer): all contiguous, the
    grad of the param's dtype and size, a Kahan buffer of the param's dtype and a master
    copy float32 (the kernel reads them as such), the moments in the format's storage."""
    p, g, m, v, vmax, extra = tensors
    if fmt not in STATE_FORMATS or g.dtype != p.dtype:
        return False
    if not all(t is None or _own_memory(t) for t in tensors):
        return False
    moments_fit = all(t.dtype == STORAGE[fmt] for t in (m, v, vmax) if t is not None)
    buffer_dtype = p.dtype if policy == "kahan" else torch.float32
    n = p.numel()  # the kernel walks n elements of every stream (functional API callers
    # pass their own moments: a shorter one would be written past its end)
    return (moments_fit and (extra is None or extra.dtype == buffer_dtype)
            and all(t is None or (t.numel() == n and t.is_contiguous()) for t in tensors))


def _own_memory(t: Tensor) -> bool:
    """Whether t's data_ptr holds its values as the kernel reads them: not a wrapper
    subclass (no storage of its values), not a zero tensor (no memory at all), no
    negative bit (the memory holds -t)."""
    return not (is_wrapper(t) or t._is_zerotensor() or t.is_neg())


def _seed_fits(seed) -> bool:
    """A stochastic param's seed as the kernel reads it each step: an int64 scalar of
    its own memory (the step cache checks it stays so, step_cache._LAYOUT)."""
    return (type(seed) in (Tensor, torch.nn.Parameter) and seed.dtype == torch.int64 and seed.dim() == 0
            and seed.device.type == "cpu" and _own_memory(seed))


def _overlapping(written: list[list[Tensor]]) -> set[int]:
    """The indices of params whose memory a step writes (``written[i]``: the param, its
    moments, buffer and int8 scales) overlaps memory written for another param, or another
    of its own: the kernel's threads would update them concurrently (nondeterministic
    numbers), or the kernel and the torch backend one after the other. Views of one
    storage as params; a param listed twice, which Adam.step splits into one step per
    listing, functional callers may not; states shared between params
    (``opt.state[b] = opt.state[a]``, a moment assigned another's). All of them go to the
    torch backend, whose foreach ops give params sharing memory torch.optim's foreach
    numbers (its default CPU for-loop, which steps them in turn, differs there:
    functional.adam_step steps aliased tensors in turn)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + _extent(t), i) for i, ts in enumerate(written)
                   for t in ts if t.numel())
    shared, end, owner = set(), -1, None
    for lo, hi, i in spans:
        if lo < end:
            shared.update((i, owner))
        if hi > end:
            end, owner = hi, i
    return shared


def _extent(p: Tensor) -> int:
    """Bytes from p's first element to past its last: a strided view spans more than its
    numel (torch's strides are never negative)."""
    if p.is_contiguous():
        return p.nbytes
    return (1 + sum((n - 1) * s for n, s in zip(p.shape, p.stride()))) * p.element_size()


class CpuBackend:
    name = "cpu"
    counts_steps = True  # the kernel adds 1 to each bucket.steps counter itself

    def unavailable_reason(self) -> str | None:
        return _library()[2]

    @property
    def isa(self) -> str:
        return _library()[1]

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in DTYPES

    @torch.no_grad()
    def step(self, bucket: Bucket, s: StepScalars) -> None:
        prepared = self.prepare(bucket)
        prepared.run(s)

    def prepare(self, bucket: Bucket) -> PreparedBucket:
        """The bucket's kernel call, ready to run now and, while ``refresh`` accepts
        new grads, again at later steps (``adamkit.step_cache`` keeps it)."""
        return PreparedBucket(_library()[0], bucket)


class PreparedBucket:
    """One bucket's argument block and pointer table, kept between steps.

    Building the table is the per-tensor Python cost of a step (1024 tensors: several
    ms, more than the update itself for small tensors). Between steps only the grads
    are new, so ``refresh`` rewrites that one row, after checking what the kernel relies
    on: the params kept their storage and layout, the grads are dense and contiguous."""

    def __init__(self, lib, bucket: Bucket) -> None:
        self.lib, self.bucket = lib, bucket
        policy = bucket.param_update
        extra_key = EXTRA_KEY.get(policy)
        int8 = bucket.state_format == "int8"
        steps = bucket.steps or [None] * len(bucket.params)
        # One counter dtype per call (float32, or float64 under a float64 default): the
        # first the kernel counts; a counter of another dtype goes to `rest`.
        step_dtype = next((c.dtype for c in bucket.steps if c.dtype in library.STEP_DTYPES), None)
        rows = {name: [] for name in library.POINTER_ROWS}
        pointer_rows = [rows[name] for name in library.POINTER_ROWS[:6]]
        scale_rows = [rows[name] for name in library.POINTER_ROWS[6:9]]
        numels, seeds, candidates, grad_bound, written = [], [], [], [], []
        for i, p in enumerate(bucket.params):
            st = bucket.states[i]
            vmax = bucket.max_exp_avg_sqs[i] if bucket.max_exp_avg_sqs else None
            extra = st[extra_key] if extra_key else None
            members = (p, bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i], vmax, extra)
            written.append([t for t in (p, *members[2:], *(st.get(k) for k in SCALE_KEYS))
                            if isinstance(t, Tensor)])
            step = steps[i]
            # the step's planning converts a state whose int8 scales do not fit; this
            # keeps a bucket built some other way off the kernel's raw pointers
            moments = state_formats.MOMENTS[:3 if vmax is not None else 2]
            scales_fit = not int8 or (state_formats.scales_fit(st, p, moments, values=False) and all(
                _own_memory(st[f"{name}_scale"]) for name in moments))
            seed_fits = policy != "stochastic" or _seed_fits(st.get("sr_seed"))
            if not (scales_fit and seed_fits and (step is None or (
                    step.dtype == step_dtype and step.is_contiguous() and _own_memory(step)))):
                continue
            if _fits(members, bucket.state_format, policy):
                candidates.append((i, members, step))
            elif _fits((p, p, *members[2:]), bucket.state_format, policy):
                grad_bound.append((i, members))  # only its grad keeps it off the kernel
        # against every param of the bucket, those the torch backend runs too: a kernel
        # param it overlaps would be written by both, in an order neither path takes
        shared = _overlapping(written)
        self.fast = [i for i, _, _ in candidates if i not in shared]
        fast = set(self.fast)
        self.rest = [i for i in range(len(bucket.params)) if i not in fast]
        # refresh re-plans when one of these gets a grad the kernel reads: a param's
        # first grad (a transposed view, a wrapper) must not keep it on the torch backend
        # (unless it shares memory with another param, which keeps it there)
        self.grad_bound = [(i, members) for i, members in grad_bound if i not in shared]
        # What the table points to beyond the bucket's own lists (buffers, int8 scales,
        # seeds), held here: the kernel runs without the GIL, and another thread's
        # ``state.clear()`` or load would free memory it writes
        self.held = held = []
        for i, members, step in candidates:
            if i in shared:
                continue
            p, st = members[0], bucket.states[i]
            for row, t in zip(pointer_rows, members):
                row.append(0 if t is None else t.data_ptr())
            if members[5] is not None:  # kahan's or master's buffer
                held.append(members[5])
            for row, key in zip(scale_rows, SCALE_KEYS):
                row.append(st[key].data_ptr() if int8 and key in st else 0)
                if int8 and key in st:
                    held.append(st[key])
            rows["steps"].append(0 if step is None else step.data_ptr())
            numels.append(p.numel())
            seeds.append(st["sr_seed"].data_ptr() if policy == "stochastic" else 0)
            if policy == "stochastic":
                held.append(st["sr_seed"])
        n = self.n = len(numels)
        self.kernel_params = [bucket.params[i] for i in self.fast]
        self.table = table = array("q")
        for row in library.POINTER_ROWS:
            table.extend(rows[row])
        table.extend(numels)
        table.extend([0] * (n + 1))  # chunk_start scratch
        self.seeds = array("q", seeds)
        self.param_ptrs = rows["params"]
        # A grad of another size or dtype (a param sliced in place, `.grad.data =`) would
        # be read past its end: refresh compares the grads' bytes with the params'.
        self.grad_nbytes = [p.numel() * p.element_size() for p in self.kernel_params]
        # and their shapes: a param reshaped through `.data =` keeps its address and
        # bytes, while its state keeps the old shape (the full path raises for it)
        self.shapes = list(map(_SHAPE, self.kernel_params))
        self.dtype = bucket.params[0].dtype
        base = table.buffer_info()[0]
        self.args = library.StepArgs(
            n_tensors=n,
            param_dtype=DTYPES[bucket.params[0].dtype],
            state_format=STATE_FORMATS.get(bucket.state_format, -1),
            param_update=UPDATES[policy],
            sr_seeds=self.seeds.buffer_info()[0],
            numels=base + 8 * n * len(library.POINTER_ROWS),
            chunk_start=base + 8 * n * (len(library.POINTER_ROWS) + 1),
            step_dtype=library.STEP_DTYPES[step_dtype if bucket.steps and n else None],
        )
        for k, row in enumerate(library.POINTER_ROWS):
            setattr(self.args, row, base + 8 * n * k)
        self.grad_row = library.POINTER_ROWS.index("grads") * n
        self.native_args = None  # refresh_native's arrays, made at its first call
        self.native_bump = None  # checks.cpp's version bump, from refresh_native's first call

    def refresh(self, grads: list[Tensor]) -> bool:
        """Take this step's grads (parallel to bucket.params). False when the table no
        longer describes the tensors (a param was given new storage, a grad is not dense
        and contiguous or not of the planned size and dtype, a grad the torch backend
        would run is sparse): then nothing is changed and the caller prepares anew."""
        params = self.bucket.params
        if self.rest:  # grads the full path would raise on: it raises, nothing changed
            if not all(grad_fits(params[i], grads[i]) for i in self.rest):
                return False
            fmt, policy = self.bucket.state_format, self.bucket.param_update
            if any(_fits((members[0], grads[i], *members[2:]), fmt, policy) for i, members in self.grad_bound):
                return False  # the kernel can run this param now
            params, kernel_grads = [params[i] for i in self.fast], [grads[i] for i in self.fast]
        else:
            kernel_grads = grads
        # _own_memory, a test at a time over all grads (cheaper than a call per grad): a
        # wrapper subclass (assigned to .grad since the plan) has data_ptr 0, where the
        # kernel would read; the kernel reads memory, not a negative bit, nor a zero
        # tensor's (it has none)
        if any(map(is_wrapper_type, set(map(type, kernel_grads)))):
            return False
        if any(map(Tensor.is_neg, kernel_grads)) or any(map(Tensor._is_zerotensor, kernel_grads)):
            return False
        if not all(map(_IS_CPU, kernel_grads)):  # one left elsewhere by `p.data =` (checks.cpp too)
            return False
        if any(map(Tensor.is_neg, params)):
            return False
        try:
            if not all(map(Tensor.is_contiguous, kernel_grads)):
                return False
        except RuntimeError:  # sparse grads have no strides
            return False
        # same bytes and dtype: the kernel reads exactly the planned elements
        if list(map(_NBYTES, kernel_grads)) != self.grad_nbytes:
            return False
        # and the planned shapes: a grad reshaped through `.grad.data =` (which skips the
        # check of assigning `.grad`) would run in memory order, where the full path raises
        if list(map(_SHAPE, kernel_grads)) != self.shapes or list(map(_SHAPE, params)) != self.shapes:
            return False
        if not all(map(operator.is_, map(_DTYPE, kernel_grads), repeat(self.dtype))):
            return False
        if list(map(Tensor.data_ptr, params)) != self.param_ptrs:
            return False
        if not all(map(Tensor.is_contiguous, params)):  # `p.data = p.data.t()` keeps the address
            return False
        if not all(map(operator.is_, map(_DTYPE, params), repeat(self.dtype))):
            return False  # so does `p.data = p.data.view(torch.float16)` on a bf16 param
        self.table[self.grad_row:self.grad_row + self.n] = array("q", map(Tensor.data_ptr, kernel_grads))
        self.bucket.grads = grads
        return True

    def refresh_native(self, checks, n_threads: int) -> bool:
        """``refresh`` by checks.cpp (native_checks.py), for a bucket the kernel runs whole
        (no ``rest``): the same checks, and the grads' row rewritten only when all hold;
        on up to ``n_threads`` threads.
        ``bucket.grads`` holds the grads until the step is done (the kernel runs without
        the GIL: another thread's ``zero_grad()`` would free memory the table points to)."""
        if self.native_args is None:  # the planned dtype: not the params' (they may have changed)
            planned = checks.adamkit_scalar_type(torch.empty(0, dtype=self.dtype))
            offsets = array("q", [0])
            for shape in self.shapes:
                offsets.append(offsets[-1] + len(shape))
            shapes = array("q", [n for shape in self.shapes for n in shape] or [0])
            self.native_args = (planned, array("q", self.param_ptrs), array("q", self.grad_nbytes),
                                shapes, offsets)
            self.native_bump = checks.adamkit_bump_versions
        planned, param_ptrs, grad_nbytes, shapes, offsets = self.native_args
        held = [None] * self.n
        if not checks.adamkit_refresh(
                self.kernel_params, planned, param_ptrs.buffer_info()[0], grad_nbytes.buffer_info()[0],
                shapes.buffer_info()[0], offsets.buffer_info()[0],
                self.table.buffer_info()[0] + 8 * self.grad_row, n_threads, held):
            return False
        self.bucket.grads = held
        return True

    def steps_equal(self, value: int) -> bool:
        """Whether every counter of the kernel's tensors still reads ``value``."""
        return self.n == 0 or bool(self.lib.adamkit_steps_equal(ctypes.byref(self.args), value))

    def run(self, s: StepScalars) -> None:
        if self.n:
            args = self.args
            args.n_threads = torch.get_num_threads()
            args.step = s.step
            args.h = library.Hyper(
                beta1=s.beta1, beta2=s.beta2, one_minus_beta1=1.0 - s.beta1,
                one_minus_beta2=1.0 - s.beta2, eps=s.eps, weight_decay=s.weight_decay,
                decay=s.decay, step_size=s.step_size, bc2_sqrt=s.bias_correction2_sqrt,
                grad_scale_inv=s.grad_scale_inv, amsgrad=int(s.amsgrad), maximize=int(s.maximize),
            )
            status = self.lib.adamkit_step(ctypes.byref(args))
            if status != 0:
                raise RuntimeError(f"adamkit cpu kernel rejected the bucket (status {status})")
            # The kernel wrote the params through raw pointers; tell autograd, as an
            # in-place op would, so a graph that saved them refuses to back-propagate
            # (by checks.cpp where the step cache's C++ checks run: the same bumps, with
            # the counters' cache misses overlapped).
            if self.native_bump is None or not self.native_bump(self.kernel_params):
                _increment_versions(self.kernel_params)
        if self.rest:
            from ..torch_ops import BACKEND as torch_backend

            rest = _subset(self.bucket, self.rest)
            torch_backend.step(rest, s)
            count_steps(torch_backend, rest)


def _increment_versions(tensors: list[Tensor]) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)  # one call (newer torch)
    except (TypeError, RuntimeError) as exc:  # older torch takes one tensor at a time
        if isinstance(exc, RuntimeError) and "expect a Tensor" not in str(exc):
            raise  # (torch 2.3: "increment_version expect a Tensor as input")
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _subset(bucket: Bucket, idx: list[int]) -> Bucket:
    pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
    return dataclasses.replace(
        bucket, params=pick(bucket.params), grads=pick(bucket.grads),
        exp_avgs=pick(bucket.exp_avgs), exp_avg_sqs=pick(bucket.exp_avg_sqs),
        max_exp_avg_sqs=pick(bucket.max_exp_avg_sqs), states=pick(bucket.states),
        steps=pick(bucket.steps))


BACKEND = CpuBackend()
