"""Reusing the last step's plan while nothing it depends on has changed.

Planning a step (which params have grads, their state, the buckets and, for the cpu
backend, the kernel's pointer table) is Python work per tensor. For many small tensors
it costs more than the update itself: 1024 tensors took ~20 ms of planning per step on
a 2-core EPYC, against ~18 ms for the update of 16.8M params. Checking that the last
plan still holds costs a fraction of that, so ``Adam.step`` keeps it here and reuses it
while

* no param group was added or changed its storage settings, no state dict or state
  tensor was replaced, added or removed (identity checks, not values: the state
  mapping's keys and values in order; each bucket's state tensors by identity and
  address, and by element count, dtype, contiguity and negative bit, which catch one
  resized, recast or restrided in place), and no state's tags (``state_format``,
  ``param_update``: the full path reads a state by them) were replaced, removed or
  written in place (by their version counters: dcp.load copies a checkpoint's tags
  into the live ones);
* the same params have grads, and those are dense and contiguous, of their param's
  dtype, size and shape, with memory of their own values (no wrapper subclass, negative
  bit or zero tensor) (a param sliced in place keeps its address; a grad reshaped
  through ``.grad.data =`` skips the check of assigning ``.grad``, and the full path
  raises for it; so does it for a param reshaped through ``.data =``, whose state keeps
  the old shape: the params keep their planned shapes);
* the params and state tensors keep their storage (data pointers: `.data =` keeps a
  tensor's identity), layout and dtype, and the params their strides, and every step counter still reads what the last
  step left (a counter edited by hand sends the step down the full path).
* the params of "master" buckets have the version counters the last step left (a write
  to p in place since then, which the full path takes as p's new value for master).

Any miss runs the full plan (``Adam._planned_step``), which builds a new cache. The cache never
holds a grad: between steps ``zero_grad`` must be able to free them.
"""

from __future__ import annotations

import operator
from array import array
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from . import backends, formats
from .backends import version_of, write_mark
from .formats import param as param_policy
from .backends.cpu import native_checks
from .hyperparams import check_live_group, check_scalar_range, for_param_dtype, step_scalars

# Group keys that decide storage and backends; a change to any of them re-plans.
_STORAGE_KEYS = ("state_format", "param_update", "amsgrad", "backend", "int8_min_size", "seed",
                 # the decay mode's two keys: a change to either takes the full path,
                 # which makes them equal again (Adam._sync_decay_modes)
                 "decouple_wd", "decoupled_weight_decay")


# The tags a state is read by (formats/__init__.py): checked by identity, and a tag tensor
# by its version counter and address too (dcp.load copies a checkpoint's into it).
_TAG_KEYS = formats.TAGS


def _tag_marks(row: list) -> list[tuple[int, int]]:
    """(version counter or -1, address) of each tag tensor of a row; (0, 0) for a str
    tag (an earlier version's, immutable)."""
    return [(version_of(t), t.data_ptr()) if isinstance(t, Tensor) else (0, 0) for t in row]


# What checks.cpp reads as a tensor: Tensor or Parameter exactly (a subclass may mean
# something else by its data).
_EXACT = (Tensor, torch.nn.Parameter)


# A state tensor's layout: what the kernel's pointer alone does not say. A complex
# bucket's also holds the lazy conjugate bit, which check_param refuses (`.data =
# t.conj()` keeps the address); a real tensor cannot have it without a new dtype.
_LAYOUT = (Tensor.numel, operator.attrgetter("dtype"), Tensor.is_contiguous, Tensor.is_neg)
_COMPLEX_LAYOUT = (*_LAYOUT, Tensor.is_conj)


def _layout(row: list, complex_: bool) -> list[list]:
    return [list(map(f, row)) for f in (_COMPLEX_LAYOUT if complex_ else _LAYOUT)]


def _same(xs: list, ys: list) -> bool:
    return len(xs) == len(ys) and all(map(operator.is_, xs, ys))


@dataclass
class CachedBucket:
    group_index: int
    group: dict[str, Any]
    positions: list[int]  # indices into the group's params
    t: int  # what its step counters read after its last step (backends.counter_reads)
    backend: Any
    bucket: backends.Bucket
    prepared: Any = None  # backend.prepare(bucket), where the backend offers it
    # (state key, the state tensors under it, their data pointers, layouts): checked by
    # identity and address, which catch a replaced tensor and one given new storage
    # through `.data =`, and by layout (_LAYOUT), which catches one resized, recast,
    # restrided or negated in place (a tensor put back at an address a freed one had, or
    # given a smaller storage there, would have the kernel write past its end).
    key_rows: tuple = ()
    # (tag key, the states' values under it, their _tag_marks): a tag replaced or written
    # in place between steps (the state then says another format than its tensors hold)
    # takes the full path, which raises for it
    tag_rows: tuple = ()
    dtype: Any = None  # the params' dtype when planned
    # "master" buckets: the params' write marks (backends.write_mark) after this bucket's
    # last step; one that moved was written in place or swapped, and the full path
    # re-seeds its master copy
    versions: list[tuple[int, int]] | None = None
    # the params' strides when planned: a param given a stride-0 view of its own storage
    # through `.data =` keeps its address, and check_param refuses it on the full path
    strides: list[tuple] | None = None
    # the params' addresses when planned, for those the torch backend runs: one given a
    # zero tensor, or swapped onto another device (torch.utils.swap_tensors, as
    # module.to() can), had torch's ops raise mid-step, after other buckets had moved
    # (the kernel's own params are checked by its refresh)
    param_ptrs: list[int] | None = None


def scalars_for(group: dict[str, Any], t: int, grad_scale_inv: float, dtype: torch.dtype) -> Any:
    """The StepScalars at step t of a bucket of ``dtype`` params, unscaling by a
    GradScaler's 1/scale; check_scalar_range's errors for scalars no step can take."""
    scalars = for_param_dtype(step_scalars(group, t), dtype)
    check_scalar_range(scalars, dtype)
    return scalars if grad_scale_inv == 1.0 else replace(scalars, grad_scale_inv=grad_scale_inv)


def run_bucket(backend: Any, bucket: backends.Bucket, scalars: Any, prepared: Any = None,
               stalled: bool = False) -> Any:
    """Run one bucket (and count its steps) with what the backend prepared for it, or
    prepare it now where the backend offers that; returns the prepared object, if any.
    ``stalled``: the counters cannot count this step (backends.counter_reads), so it is
    taken at the number they read, as the last one was: stochastic rounding advances its
    seeds first, or the key would repeat."""
    if stalled and bucket.param_update == "stochastic":
        param_policy.advance_seeds(bucket.states)
    if prepared is None and hasattr(backend, "prepare"):
        prepared = backend.prepare(bucket)
    if prepared is None:
        backend.step(bucket, scalars)
        backends.count_steps(backend, bucket)
    else:
        prepared.run(scalars)
    return prepared


class StepCache:
    def __init__(self, optimizer: Any, buckets: list[CachedBucket]) -> None:
        self.state = optimizer.state
        # The mapping param → state dict, by identity: same keys and values in the same
        # order (cheaper than looking each param up: a tensor's hash is Python code).
        self.state_keys = list(optimizer.state.keys())
        self.state_values = list(optimizer.state.values())
        self.groups = [self._signature(g) for g in optimizer.param_groups]
        self.group_params = [list(g["params"]) for g in optimizer.param_groups]
        self.buckets = buckets
        for cb in buckets:
            keys = ["step", "exp_avg", "exp_avg_sq", *_extra_keys(cb.bucket)]
            rows = [(k, [st[k] for st in cb.bucket.states]) for k in keys]
            complex_ = cb.bucket.params[0].dtype.is_complex
            cb.key_rows = tuple((k, row, list(map(Tensor.data_ptr, row)), _layout(row, complex_))
                                for k, row in rows)
            cb.tag_rows = tuple((k, row, _tag_marks(row))
                                for k in _TAG_KEYS for row in [[st.get(k) for st in cb.bucket.states]])
            cb.dtype = cb.bucket.params[0].dtype
            cb.strides = list(map(Tensor.stride, cb.bucket.params))
            cb.param_ptrs = list(map(Tensor.data_ptr, cb.bucket.params))
            if cb.bucket.param_update == "master":
                cb.versions = list(map(write_mark, cb.bucket.params))
            cb.bucket.grads = []
        # Per group, the positions of the params that had grads.
        self.masks = [sorted(i for cb in buckets if cb.group_index == k for i in cb.positions)
                      for k in range(len(optimizer.param_groups))]
        self.n_tensors = sum(len(cb.bucket.params) for cb in buckets)
        self.native: _NativeArgs | None = None
        self.native_fits = _native_fits(optimizer.param_groups)
        # inference tensors (params, state) may be written only in inference mode: the
        # full path's check_param and check_written decide it, for the mode they ran in
        self.inference_mode = torch.is_inference_mode_enabled()

    @staticmethod
    def _signature(group: dict[str, Any]) -> tuple:
        return (id(group), id(group["params"]), len(group["params"]),
                *(group.get(k) for k in _STORAGE_KEYS))

    def try_step(self, optimizer: Any, grad_scale_inv: float) -> bool:
        """Run the step from the cached plan and return True, or change nothing and
        return False when the plan no longer holds."""
        try:
            return self._try_step(optimizer, grad_scale_inv)
        finally:  # the refreshes hand the buckets this step's grads: none kept after it,
            # also where it raised (a group edited into one without lr, an interrupt)
            for cb in self.buckets:
                cb.bucket.grads = []

    def _try_step(self, optimizer: Any, grad_scale_inv: float) -> bool:
        state, groups = optimizer.state, optimizer.param_groups
        if state is not self.state or len(groups) != len(self.groups) or any(
            self._signature(g) != sig for g, sig in zip(groups, self.groups)
        ) or torch.is_inference_mode_enabled() != self.inference_mode:
            return False
        if self.native is None and self.native_fits:
            checks = native_checks.get(self.n_tensors)
            if checks is not None:
                self.native = _NativeArgs(checks, self)
        if self.native is not None:
            if not self.native.holds(state, groups, self.buckets):
                return False
        elif not self._python_checks(state, groups):
            return False
        try:  # before any bucket runs: a group edited into an invalid one re-plans, and
            # the full path raises its validation error with nothing changed
            for group in groups:
                check_live_group(group)
            counted = [backends.counter_reads(cb.t + 1, cb.bucket.steps) for cb in self.buckets]
            scalars = [scalars_for(cb.group, t, grad_scale_inv, cb.dtype)
                       for cb, t in zip(self.buckets, counted)]
        except (TypeError, ValueError, ZeroDivisionError, RuntimeError):
            return False
        # Everything holds: run. Nothing above changed the optimizer.
        for cb, s, t in zip(self.buckets, scalars, counted):
            run_bucket(cb.backend, cb.bucket, s, cb.prepared, stalled=t != cb.t + 1)
            cb.t = t
        for cb in self.buckets:  # after all ran: views of one tensor share a counter
            if cb.versions is not None:
                cb.versions = list(map(write_mark, cb.bucket.params))
        return True

    def _python_checks(self, state: dict, groups: list[dict[str, Any]]) -> bool:
        """The checks of the module docstring's list, in Python."""
        if not (_same(list(state.values()), self.state_values)
                and _same(list(state.keys()), self.state_keys)):
            return False
        if not all(_same(g["params"], ps) for g, ps in zip(groups, self.group_params)):
            return False  # a param swapped in place in a group's list
        all_grads = []
        for group, mask in zip(groups, self.masks):
            grads = [p.grad for p in group["params"]]
            if [i for i, g in enumerate(grads) if g is not None] != mask:
                return False
            all_grads.append(grads)
        return all(_bucket_holds(cb, [all_grads[cb.group_index][i] for i in cb.positions])
                   for cb in self.buckets)

    def record_master_versions(self, versions: Any) -> None:
        """Hand the master buckets' last-step write marks to the optimizer's record before
        this cache is dropped, so the full path compares against the latest step."""
        for cb in self.buckets:
            if cb.versions is not None:
                for p, v in zip(cb.bucket.params, cb.versions):
                    versions[p] = v


def _bucket_holds(cb: CachedBucket, grads: list) -> bool:
    """One bucket's checks, in Python, given its params' grads (all present); a bucket
    the torch backend runs gets them as ``bucket.grads``."""
    b = cb.bucket
    planned = (*((key, row) for key, row, _ in cb.tag_rows), *((key, row) for key, row, _, _ in cb.key_rows))
    try:  # the planned tags and tensors, by identity (a key gone: None)
        if not all(_same(list(map(dict.get, b.states, repeat(key))), row) for key, row in planned):
            return False
    except TypeError:  # a state that is no dict
        return False
    if any(_tag_marks(row) != marks for _, row, marks in cb.tag_rows):
        return False  # a tag written in place
    for _, row, pointers, layout in cb.key_rows:
        if list(map(Tensor.data_ptr, row)) != pointers or _layout(row, cb.dtype.is_complex) != layout:
            return False
    if _versions_moved(cb):
        return False
    if cb.prepared is not None:
        if not (cb.prepared.refresh(grads) and cb.prepared.steps_equal(cb.t)):
            return False
        rest = cb.prepared.rest  # as the unprepared bucket below (the torch backend runs them)
        return not rest or (_steps_read(b, rest, cb.t) and all(
            b.params[i].dtype == cb.dtype and b.params[i].stride() == cb.strides[i]
            and b.exp_avgs[i].shape == b.params[i].shape
            and b.params[i].data_ptr() == cb.param_ptrs[i] for i in rest))
    # Recast or restrided params re-plan; sparse or misfit grads, resized params and
    # conjugate-bit ones too, and the full path raises on them before anything changes.
    complex_ = cb.dtype.is_complex
    if any(p.dtype != cb.dtype or not backends.grad_fits(p, g) or m.shape != p.shape
           or (complex_ and p.is_conj()) for p, g, m in zip(b.params, grads, b.exp_avgs)):
        return False
    if list(map(Tensor.stride, b.params)) != cb.strides or list(map(Tensor.data_ptr, b.params)) != cb.param_ptrs:
        return False
    if not _steps_read(b, range(len(b.params)), cb.t):
        return False
    b.grads = grads
    return True


def _versions_moved(cb: CachedBucket) -> bool:
    """A "master" bucket's param written in place since its last step."""
    return cb.versions is not None and list(map(write_mark, cb.bucket.params)) != cb.versions


def _extra_keys(bucket: backends.Bucket) -> list[str]:
    keys = ["max_exp_avg_sq"] if bucket.max_exp_avg_sqs else []
    if bucket.states:
        st = bucket.states[0]
        keys += [k for k in ("kahan_comp", "master_param", "sr_seed", "exp_avg_scale",
                             "exp_avg_sq_scale", "max_exp_avg_sq_scale") if k in st]
    return keys


def _steps_read(bucket: backends.Bucket, idx, t: int) -> bool:
    return all(bucket.steps[i].item() == t for i in idx)


def _native_fits(groups: list[dict[str, Any]]) -> bool:
    """Whether checks.cpp can take the plan's group-level checks: the param lists are
    lists of ``_EXACT`` tensors. Which buckets it checks too, ``_native_bucket`` says."""
    return all(type(g["params"]) is list and all(type(p) in _EXACT for p in g["params"])
               for g in groups)


def _native_bucket(cb: CachedBucket) -> bool:
    """A kernel call without a torch-backend ``rest``, whose states are dicts of tensors
    exactly, tags too (checks.cpp checks a tag's version and address where it is a Tensor
    exactly, and would pass a subclass's write): checks.cpp checks it; other buckets keep
    their Python checks."""
    return (cb.prepared is not None and not cb.prepared.rest
            and hasattr(cb.prepared, "refresh_native")
            and type(cb.bucket.states) is list and all(type(st) is dict for st in cb.bucket.states)
            and all(type(t) in _EXACT for _, row, _, _ in cb.key_rows for t in row)
            and all(v is not None and (type(v) in _EXACT or not isinstance(v, Tensor))
                    for _, row, _ in cb.tag_rows for v in row))


class _NativeArgs:
    """The plan's checks as checks.cpp's arguments (native_checks.py): the identities the
    cache holds, per group which params have grads, per bucket the state tensors' planned
    objects, addresses, element counts and layouts (None for a bucket that keeps its
    Python checks)."""

    def __init__(self, checks: Any, cache: StepCache) -> None:
        self.checks = checks
        self.state_keys = array("q", map(id, cache.state_keys))
        self.state_values = array("q", map(id, cache.state_values))
        self.group_params = [array("q", map(id, ps)) for ps in cache.group_params]
        self.key_rows = []
        scalar_types: dict[torch.dtype, int] = {}

        def scalar_type(dtype: torch.dtype) -> int:
            if dtype not in scalar_types:
                scalar_types[dtype] = checks.adamkit_scalar_type(torch.empty(0, dtype=dtype))
            return scalar_types[dtype]

        for cb in cache.buckets:
            if not _native_bucket(cb):
                self.key_rows.append(None)
                continue
            keys = tuple(key for key, _, _, _ in cb.key_rows)
            # checks.cpp's planned tensors, four rows of them (each by key, then by param):
            # their addresses, objects, element counts and layout codes (layout_code in
            # checks.cpp), from the plan's layouts, not the tensors' now (this runs at the
            # first cached step: a tensor recast in place since the plan must fail the
            # check, not become it)
            addresses, objects, numels, codes = [], [], [], []
            for _, row, pointers, (counts, dtypes, contiguous, negative) in cb.key_rows:
                addresses += pointers
                objects += map(id, row)
                numels += counts
                codes += (scalar_type(dtype) + 256 * c + 512 * neg
                          for dtype, c, neg in zip(dtypes, contiguous, negative))
            planned = array("q", addresses + objects + numels + codes)
            tags = tuple(key for key, _, _ in cb.tag_rows)
            tag_objects = array("q", [id(v) for _, row, _ in cb.tag_rows for v in row]
                                + [m[0] for _, _, marks in cb.tag_rows for m in marks]
                                + [m[1] for _, _, marks in cb.tag_rows for m in marks])
            self.key_rows.append((keys, planned, tags, tag_objects))
        # Which params have grads, for a group whose buckets leave some out or keep their
        # Python checks; in the others every param is in a native bucket, whose refresh
        # checks that it has a grad.
        self.has_grad = []
        for k, (params, mask) in enumerate(zip(cache.group_params, cache.masks)):
            all_native = all(rows is not None for cb, rows in zip(cache.buckets, self.key_rows)
                             if cb.group_index == k)
            row = None
            if len(mask) != len(params) or not all_native:
                row = array("B", bytes(len(params)))
                for i in mask:
                    row[i] = 1
            self.has_grad.append(row)

    def holds(self, state: dict, groups: list[dict[str, Any]], buckets: list[CachedBucket]) -> bool:
        """The Python checks' decision (``StepCache._python_checks``)."""
        checks = self.checks
        n_threads = torch.get_num_threads()  # the longest checks split the tensors (checks.cpp)
        if not checks.adamkit_dict_is(state, self.state_keys.buffer_info()[0],
                                      self.state_values.buffer_info()[0], len(self.state_keys)):
            return False
        for group, ids, has_grad in zip(groups, self.group_params, self.has_grad):
            params = group["params"]
            if not checks.adamkit_list_is(params, ids.buffer_info()[0], len(ids)):
                return False  # a param swapped in place in a group's list
            if has_grad is not None and not checks.adamkit_grads_present(params, has_grad.buffer_info()[0]):
                return False
        for cb, rows in zip(buckets, self.key_rows):
            if rows is None:
                if not _bucket_holds(cb, [p.grad for p in cb.bucket.params]):
                    return False
                continue
            keys, pointers, tags, tag_objects = rows
            if not checks.adamkit_state_ptrs_equal(cb.bucket.states, keys, pointers.buffer_info()[0], n_threads,
                                                   tags, tag_objects.buffer_info()[0]):
                return False
            if _versions_moved(cb):
                return False
            if not (cb.prepared.refresh_native(checks, n_threads) and cb.prepared.steps_equal(cb.t)):
                return False
        return True
