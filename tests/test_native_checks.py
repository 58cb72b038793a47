"""checks.cpp (the step cache's per-tensor checks in C++) decides as the Python checks do,
and native_checks.py builds, loads or leaves it out as documented.

test_step_cache.py, test_edge_cases.py, test_group_edits.py and test_repeated_params.py
run whole optimizers through both (the ``checks_mode`` fixture); here each check meets
each kind of change on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from array import array
from pathlib import Path

import pytest
import torch

import adamkit
from adamkit import formats
from adamkit.backends.cpu import library, native_checks
from helpers import on_a_cached_plan

pytestmark = pytest.mark.skipif(library.compiler_path() is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def checks():
    return native_checks.load_now()


@pytest.fixture
def fresh_module_state():
    saved = native_checks._lib, native_checks._state, native_checks.MANY_TENSORS
    native_checks._lib, native_checks._state = None, "not needed yet"
    yield
    native_checks._lib, native_checks._state, native_checks.MANY_TENSORS = saved


# (tensors, threads, where the changes go): the checks on one thread, and split between
# threads (checks.cpp's in_parallel gives each at least PER_THREAD = 128 tensors: 300
# params are 2 shares of the refresh and, with 3 keys or more, 3 of the state check), with
# the changes made to the first tensors (the calling thread's share) or to the last.
SPLITS = [pytest.param(6, 1, "first", id="one thread"),
          pytest.param(300, 3, "first", id="split, first share"),
          pytest.param(300, 3, "last", id="split, last share")]


def _at(params, where):
    return params if where == "first" else params[::-1]


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _cached(n=6, dtype=torch.bfloat16, **kw):
    params = [torch.nn.Parameter(torch.randn(37 + i, dtype=dtype)) for i in range(n)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = adamkit.Adam(params, lr=1e-3, backend="cpu", **kw)
    opt.step()
    opt.step()  # the second step runs from the cache
    (cb,) = opt._step_cache.buckets
    return params, opt, cb


# ---- refresh: each way a param or grad can stop fitting the plan --------------------------

def _grad_none(ps):
    ps[1].grad = None


def _grad_sparse(ps):
    ps[2].grad = ps[2].grad.to_sparse()


def _grad_strided(ps):
    ps[3].grad = torch.randn(2 * ps[3].numel(), dtype=ps[3].dtype)[::2]


def _grad_other_dtype(ps):  # `.grad.data =` skips the setter's dtype check
    ps[0].grad.data = ps[0].grad.data.float()


def _grad_other_size(ps):
    ps[4].grad.data = ps[4].grad.data[:5]


def _grad_same_bytes_other_shape(ps):  # same bytes: it ran in memory order; the full path raises
    ps[5].grad.data = ps[5].grad.data.view(1, -1)


def _param_same_bytes_other_shape(ps):  # with its grad: it ran in memory order, its state kept the old shape
    p = ps[5]
    shape = (1, p.numel())
    p.grad = None
    p.data = p.data.view(shape)
    p.grad = torch.randn(shape, dtype=p.dtype)


def _param_moved(ps):
    ps[1].data = ps[1].data.clone()


def _param_same_bytes_other_dtype(ps):  # same address, bf16 bits read as fp16
    ps[2].data = ps[2].data.view(torch.float16)


def _param_strided(ps):  # same address, every other element
    ps[0].data = ps[0].data.as_strided((ps[0].numel() // 2,), (2,))


def _grad_negated(ps):  # its memory holds -grad
    ps[1].grad = torch._neg_view(ps[1].grad.neg())


def _grad_zero_tensor(ps):  # no memory: data_ptr 0
    ps[2].grad = torch._efficientzerotensor(ps[2].shape, dtype=ps[2].dtype)


def _param_negated(ps):  # same address, its memory holds -param
    ps[3].data = torch._neg_view(ps[3].data)


def _no_change(ps):
    pass


CHANGES = [_no_change, _grad_none, _grad_sparse, _grad_strided, _grad_other_dtype, _grad_other_size,
           _grad_same_bytes_other_shape, _param_same_bytes_other_shape, _param_moved, _param_same_bytes_other_dtype, _param_strided,
           _grad_negated, _grad_zero_tensor, _param_negated]


@pytest.mark.parametrize(("n", "n_threads", "where"), SPLITS)
@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_refresh_decides_as_python(checks, change, n, n_threads, where):
    params, _, cb = _cached(n)
    change(_at(params, where))
    prepared = cb.prepared
    row = slice(prepared.grad_row, prepared.grad_row + prepared.n)
    before = list(prepared.table[row])
    native = prepared.refresh_native(checks, n_threads)
    native_row = list(prepared.table[row])
    prepared.table[row] = array("q", before)
    grads = [p.grad for p in params]
    python = None not in grads and prepared.refresh(grads)
    assert native == python
    assert native == (change is _no_change)
    if native:  # the grads' addresses, as the Python refresh writes them
        assert native_row == list(prepared.table[row]) == [p.grad.data_ptr() for p in params]
    else:
        assert native_row == before  # nothing written when a check fails


# ---- the state tensors, by address -------------------------------------------------------

def _state_replaced(opt, ps):
    st = opt.state[ps[1]]
    st["exp_avg"] = st["exp_avg"].clone()


def _state_new_storage(opt, ps):
    opt.state[ps[2]]["exp_avg_sq"].data = opt.state[ps[2]]["exp_avg_sq"].data.clone()


def _state_key_dropped(opt, ps):
    del opt.state[ps[3]]["exp_avg"]


def _state_not_a_tensor(opt, ps):
    opt.state[ps[0]]["step"] = 2.0


class _Subclass(torch.Tensor):
    pass


def _state_subclass(opt, ps):  # same storage, another type
    st = opt.state[ps[4]]
    st["exp_avg"] = st["exp_avg"].as_subclass(_Subclass)


def _state_key_of_a_str_subclass(opt, ps):  # equal to "exp_avg", but not an exact str
    st = opt.state[ps[5]]
    st[_Key("exp_avg")] = st.pop("exp_avg")


class _Key(str):
    pass


def _state_sliced(opt, ps):  # another tensor at the planned address, with fewer elements
    st = opt.state[ps[1]]
    st["exp_avg"] = st["exp_avg"][:3]


def _state_resized(opt, ps):  # the planned tensor, at its address, with fewer elements
    opt.state[ps[2]]["exp_avg_sq"].resize_(3)


def _state_recast(opt, ps):
    st = opt.state[ps[3]]
    st["exp_avg"].data = st["exp_avg"].data.view(torch.int16)


def _state_strided(opt, ps):
    st = opt.state[ps[4]]
    st["exp_avg"].data = st["exp_avg"].data.as_strided((3,), (2,))


def _state_negated(opt, ps):
    st = opt.state[ps[5]]
    st["exp_avg_sq"].data = torch._neg_view(st["exp_avg_sq"].data)


def _tag_edited(opt, ps):  # the state now says another format than its tensors hold
    opt.state[ps[1]]["state_format"] = torch.tensor(formats.FORMAT_CODES["fp32"])


def _tag_written_in_place(opt, ps):  # the same tensor at the same address: its version moved
    opt.state[ps[4]]["param_update"].fill_(formats.UPDATE_CODES["master"])


def _tag_dropped(opt, ps):
    del opt.state[ps[2]]["param_update"]


def _tag_equal_but_another_object(opt, ps):  # by identity, as the tensors: a re-plan, no more
    st = opt.state[ps[3]]
    st["state_format"] = st["state_format"].clone()


STATE_CHANGES = [_state_replaced, _state_new_storage, _state_key_dropped, _state_not_a_tensor,
                 _state_subclass, _state_key_of_a_str_subclass, _state_sliced, _state_resized,
                 _state_recast, _state_strided, _state_negated, _tag_edited, _tag_written_in_place, _tag_dropped,
                 _tag_equal_but_another_object]


@pytest.mark.parametrize(("n", "n_threads", "where"), SPLITS)
@pytest.mark.parametrize("change", STATE_CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_state_changes_are_caught(checks, change, n, n_threads, where):
    """Each change fails the address check (the Python one accepts a tensor subclass at
    the planned address; checks.cpp re-plans, and the new plan keeps Python checks)."""
    params, opt, cb = _cached(n)
    rows = opt._step_cache.native.key_rows[0]  # the planned tensors and tags (step_cache._NativeArgs)
    assert _state_check(checks, cb, rows, n_threads) == 1
    change(opt, _at(params, where))
    assert _state_check(checks, cb, rows, n_threads) == 0


def _state_check(checks, cb, rows, n_threads, keys=None):
    planned_keys, pointers, tags, tag_objects = rows
    return checks.adamkit_state_ptrs_equal(cb.bucket.states, planned_keys if keys is None else keys,
                                           pointers.buffer_info()[0], n_threads, tags,
                                           tag_objects.buffer_info()[0])


def _keys_rebuilt(opt, ps):  # equal str keys, other objects: as a checkpoint's may be
    for p in ps:
        st = opt.state[p]
        items = list(st.items())
        st.clear()
        st.update(("".join(list(k)), v) for k, v in items)


def _keys_added(opt, ps):  # keys of the user's own, of any type, are not read
    opt.state[ps[0]]["note"] = "mine"
    opt.state[ps[1]][7] = None
    opt.state[ps[2]][_Key("extra")] = 1


@pytest.mark.parametrize(("n", "n_threads", "where"), SPLITS)
@pytest.mark.parametrize("change", [_keys_rebuilt, _keys_added], ids=lambda f: f.__name__.strip("_"))
def test_state_keys_are_matched_by_value(checks, change, n, n_threads, where):
    """checks.cpp walks each state dict and matches its keys to the planned ones by
    identity or as exact str, as a lookup would find them; other keys are skipped."""
    params, opt, cb = _cached(n)
    rows = opt._step_cache.native.key_rows[0]
    keys = rows[0]
    change(opt, _at(params, where))
    if change is _keys_rebuilt:
        assert not any(k is key for st in cb.bucket.states for k in st for key in keys)
    assert _state_check(checks, cb, rows, n_threads) == 1
    not_str = (*keys[:-1], _Key(keys[-1]))  # the planned keys are exact str
    assert _state_check(checks, cb, rows, n_threads, keys=not_str) == 0
    opt.step()  # and the cached step runs on
    assert opt._step_cache is not None and opt._step_cache.native is not None


def test_bump_versions_is_increment_version(checks):
    """adamkit_bump_versions bumps each counter once, as torch.autograd.graph.increment_version,
    skips inference tensors (which have none), and bumps nothing where an item is not a
    Tensor or Parameter exactly."""
    tensors = [torch.zeros(3), torch.nn.Parameter(torch.zeros(2)), torch.zeros(4)]
    with torch.inference_mode():
        inference = torch.zeros(2)
    before = [t._version for t in tensors]
    assert checks.adamkit_bump_versions(tensors + [inference]) == 1
    assert [t._version for t in tensors] == [v + 1 for v in before]
    torch.autograd.graph.increment_version(tensors + [inference])  # torch skips it too
    assert [t._version for t in tensors] == [v + 2 for v in before]
    assert checks.adamkit_bump_versions(tensors + [torch.zeros(1).as_subclass(_Subclass)]) == 0
    assert checks.adamkit_bump_versions(tuple(tensors)) == 0
    assert [t._version for t in tensors] == [v + 2 for v in before]


def test_a_cached_step_bumps_each_param_once(checks, monkeypatch):
    params, opt, cb = _cached()  # its second step ran from the plan, under checks.cpp
    assert opt._step_cache.native is not None and cb.prepared.native_bump is not None
    versions = [p._version for p in params]
    from adamkit.backends import cpu

    def python_bump(tensors):
        raise AssertionError("the Python bump ran: checks.cpp's did not")

    monkeypatch.setattr(cpu, "_increment_versions", python_bump)
    opt.step()
    assert [p._version for p in params] == [v + 1 for v in versions]
    saved = params[0] * params[0]  # a graph that saved the param refuses to back-propagate
    opt.step()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_identity_checks_read_addresses_only(checks):
    items = [object() for _ in range(5)]
    ids = array("q", map(id, items))
    assert checks.adamkit_list_is(items, ids.buffer_info()[0], 5) == 1
    assert checks.adamkit_list_is(items[:4], ids.buffer_info()[0], 5) == 0
    assert checks.adamkit_list_is(tuple(items), ids.buffer_info()[0], 5) == 0  # not a list
    swapped = items[:2] + [object()] + items[3:]
    assert checks.adamkit_list_is(swapped, ids.buffer_info()[0], 5) == 0
    d = {k: v for k, v in zip(items, reversed(items))}
    keys, values = array("q", map(id, d.keys())), array("q", map(id, d.values()))
    assert checks.adamkit_dict_is(d, keys.buffer_info()[0], values.buffer_info()[0], 5) == 1
    d[items[0]] = object()
    assert checks.adamkit_dict_is(d, keys.buffer_info()[0], values.buffer_info()[0], 5) == 0
    assert checks.adamkit_dict_is(list(d), keys.buffer_info()[0], values.buffer_info()[0], 5) == 0


def test_grads_present_follows_the_mask(checks):
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    params[1].grad = torch.randn(3)
    params[3].grad = torch.randn(3)
    mask = array("B", [0, 1, 0, 1])
    assert checks.adamkit_grads_present(params, mask.buffer_info()[0]) == 1
    params[0].grad = torch.randn(3)
    assert checks.adamkit_grads_present(params, mask.buffer_info()[0]) == 0
    assert checks.adamkit_grads_present([params[1], 5], mask.buffer_info()[0]) == 0


# ---- building and loading ----------------------------------------------------------------

def _wait_for_build():
    for thread in threading.enumerate():
        if thread.name == "adamkit-native-checks":
            thread.join(timeout=120)


def test_many_tensors_build_in_the_background_then_take_over(checks, fresh_module_state, monkeypatch,
                                                               tmp_path):
    """Below MANY_TENSORS nothing is built, and the Python checks run; a plan of that
    many starts the build, whose library the next cached step takes."""
    import shutil

    monkeypatch.delenv("ADAMKIT_NATIVE_CHECKS", raising=False)
    native_checks.MANY_TENSORS = 4
    built = native_checks._target()
    monkeypatch.setenv("ADAMKIT_CACHE", str(tmp_path))  # an empty cache
    params, opt, cb = _cached(n=3)
    opt.step()
    assert native_checks.status() == "not in the cache" and opt._step_cache.native is None
    assert not list(tmp_path.glob("checks-*"))
    shutil.copy(built, native_checks._target())  # as if built: the plan of 6 loads it at once
    params, opt, cb = _cached(n=6)
    _wait_for_build()
    assert native_checks.status() == "loaded"
    opt.step()
    assert opt._step_cache.native is not None  # the next cached step took it


@pytest.mark.parametrize("cache", ["unreadable", "junk"])
def test_fewer_tensors_step_on_where_the_cache_fails(fresh_module_state, monkeypatch, tmp_path, cache):
    """Below MANY_TENSORS, a cache whose root does not resolve (no home directory) or
    whose library will not load leaves the Python checks, says why, and steps."""
    monkeypatch.delenv("ADAMKIT_NATIVE_CHECKS", raising=False)
    native_checks.MANY_TENSORS = 100
    if cache == "unreadable":
        monkeypatch.delenv("ADAMKIT_CACHE", raising=False)
        monkeypatch.setattr(native_checks.library.Path, "home", classmethod(lambda cls: 1 / 0))
    else:
        monkeypatch.setenv("ADAMKIT_CACHE", str(tmp_path))
        native_checks._target().write_bytes(b"not a library")
    params, opt, cb = _cached(n=3)
    assert native_checks.status().startswith("failed: ") and opt._step_cache.native is None
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_fewer_tensors_load_a_library_already_in_the_cache(checks, fresh_module_state, monkeypatch):
    """Below MANY_TENSORS a library an earlier build left in the cache is loaded (nothing
    is built), once per process: the C++ checks run from the first cached step."""
    monkeypatch.delenv("ADAMKIT_NATIVE_CHECKS", raising=False)
    native_checks.MANY_TENSORS = 100
    assert native_checks._target().exists()  # the module fixture built it
    params, opt, cb = _cached(n=3)
    assert native_checks.status() == "loaded" and opt._step_cache.native is not None
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_a_failed_build_leaves_the_python_checks(fresh_module_state, monkeypatch, tmp_path):
    monkeypatch.setenv("ADAMKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    monkeypatch.setenv("ADAMKIT_NATIVE_CHECKS", "1")
    native_checks.MANY_TENSORS = 1
    params, opt, cb = _cached()
    assert native_checks.status().startswith("failed: building checks.cpp failed")
    before = [p.detach().clone() for p in params]
    opt.step()
    assert opt._step_cache.native is None
    assert all(not torch.equal(a, b) for a, b in zip(before, params))  # it stepped


def test_turned_off_even_when_loaded(checks, monkeypatch):
    monkeypatch.setenv("ADAMKIT_NATIVE_CHECKS", "0")
    monkeypatch.setattr(native_checks, "MANY_TENSORS", 1)
    assert native_checks._lib is not None and native_checks.get(100) is None
    _, opt, _ = _cached()
    assert opt._step_cache.native is None


def test_a_free_threaded_interpreter_keeps_the_python_checks(checks, monkeypatch):
    """checks.cpp reads borrowed list and dict items on torch's threads, safe while its
    caller holds the GIL; without one (3.13t) another thread could free them meanwhile."""
    monkeypatch.setattr(native_checks, "MANY_TENSORS", 1)
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    assert native_checks._lib is not None and native_checks.get(100) is None
    assert native_checks.status() == "off (no GIL)"
    _, opt, _ = _cached()
    assert opt._step_cache.native is None


@pytest.mark.parametrize("native", [False, True], ids=["python checks", "native checks"])
def test_every_param_reinterpreted_before_the_first_cached_step_replans(checks, native, monkeypatch):
    """The planned dtype is the plan's, not read off the params when checks.cpp first
    runs: with every param of a bf16 bucket viewed as float16 (same addresses, float16
    grads) before the first cached step, both checks re-plan (the native ones used to
    accept, and the bf16 kernel ran on float16 bits)."""
    if not native:
        monkeypatch.setattr(native_checks, "_lib", None)
        monkeypatch.setenv("ADAMKIT_NATIVE_CHECKS", "0")
    plans = []
    planned = adamkit.Adam._planned_step
    monkeypatch.setattr(adamkit.Adam, "_planned_step", lambda opt, *a: plans.append(1) or planned(opt, *a))
    params = [torch.nn.Parameter(torch.randn(37 + i, dtype=torch.bfloat16)) for i in range(6)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = adamkit.Adam(params, lr=1e-3, backend="cpu", param_update="nearest")
    opt.step()
    for p in params:
        p.data = p.data.view(torch.float16)
        p.grad = torch.randn(p.shape, dtype=torch.float16)
    try:
        opt.step()
    except RuntimeError:
        pass  # the full path may refuse the edit; what matters is that the plan was not reused
    assert len(plans) == 2


@pytest.mark.skipif(not hasattr(torch, "_lazy_clone"), reason="no copy-on-write tensors in this torch")
@pytest.mark.parametrize("native", [False, True], ids=["python checks", "native checks"])
@pytest.mark.parametrize("which", ["param", "moment"])
@pytest.mark.parametrize("n", [6, 300], ids=["few", "many"])
def test_a_copy_on_write_clone_is_not_written_through(checks, native, which, n, monkeypatch, two_threads):
    """A param or moment that came to share copy-on-write memory with another tensor
    between steps: its address is read as Tensor.data_ptr() reads it (mutable_data, which
    gives it its own copy), so the plan no longer holds and the other tensor keeps its
    values (checks.cpp read the shared address and the kernel wrote into both)."""
    if not native:
        monkeypatch.setattr(native_checks, "_lib", None)
        monkeypatch.setenv("ADAMKIT_NATIVE_CHECKS", "0")
    params, opt, _ = _cached(n)  # with many, the native checks are split: the last is the second thread's
    shared = params[-1].detach() if which == "param" else opt.state[params[-1]]["exp_avg"]
    other = torch._lazy_clone(shared)
    before = other.clone()
    opt.step()
    assert torch.equal(other, before)


@pytest.mark.skipif(not hasattr(torch, "_lazy_clone"), reason="no copy-on-write tensors in this torch")
def test_params_viewing_one_copy_on_write_buffer_are_read_on_one_thread(checks, two_threads):
    """Params that are views of one buffer share its storage. Once the buffer is
    copy-on-write, reading any param's address gives the storage its own copy: the split
    checks leave that to the calling thread (two threads copying one storage at once would
    corrupt it), the plan no longer holds, and the step is the one the same optimizer
    takes without the clone, which keeps its values."""

    def make():
        g = torch.Generator().manual_seed(0)
        flat = torch.randn(300, 40, generator=g)
        params = [torch.nn.Parameter(row) for row in flat]  # each shares flat's storage
        for p in params:
            p.grad = torch.randn(40, generator=g)
        opt = adamkit.Adam(params, lr=1e-3, backend="cpu")
        opt.step()
        opt.step()
        return flat, params, opt

    flat, params, opt = make()
    cache = opt._step_cache
    assert cache.native is not None and all(rows is not None for rows in cache.native.key_rows)
    clone = torch._lazy_clone(flat)
    before = clone.clone()
    opt.step()
    _, twin_params, twin = make()
    twin.step()
    assert torch.equal(clone, before)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
    assert all(p.untyped_storage().data_ptr() == params[0].untyped_storage().data_ptr() for p in params)


_PYTHON_GRAD = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    import torch, adamkit
    from adamkit.backends.cpu import native_checks
    from helpers import Wrapped

    checks = native_checks.load_now()
    runs = []
    for wrap in (True, False):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(40, generator=g)) for _ in range(300)]
        for p in params:
            p.grad = torch.randn(40, generator=g)
        opt = adamkit.Adam(params, lr=1e-3, backend="cpu")
        opt.step()
        opt.step()
        assert opt._step_cache.native is not None
        if wrap:
            (cb,) = opt._step_cache.buckets
            params[-1].grad = Wrapped(params[-1].grad)  # in the last share
            print("decided", cb.prepared.refresh_native(checks, 1), cb.prepared.refresh_native(checks, 2),
                  cb.prepared.refresh([p.grad for p in params]))
        opt.step()  # re-planned: the wrapped grad goes to the torch backend
        runs.append(torch.stack([p.detach() for p in params]))
    print("same steps", torch.equal(*runs))
""")


def test_a_wrapper_subclass_grad_fails_the_plan(checks):
    """A wrapper subclass assigned to a grad after the plan was made: it has no storage of
    its values (data_ptr 0), so every refresh (checks.cpp on one thread and split, and
    Python's) rejects it, and the step re-plans (both refreshes used to accept it, and the
    kernel read address 0). Its strides are computed in Python: on a thread of the split
    refresh, asking for them would wait for the GIL that the step's thread holds while it
    waits for that thread. In a subprocess, so that a crash or a deadlock fails the test."""
    done = subprocess.run([sys.executable, "-c", _PYTHON_GRAD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["decided", "False", "False", "False", "same", "steps", "True"]


@pytest.mark.slow
def test_a_background_build_compiles_then_takes_over(fresh_module_state, monkeypatch, tmp_path):
    """The whole first-need path on an empty cache: the step after the plan starts the
    compile in a thread and runs the Python checks meanwhile; once it has loaded, the
    next cached step takes it (10-15 s of compiling)."""
    monkeypatch.setenv("ADAMKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("ADAMKIT_NATIVE_CHECKS", raising=False)
    native_checks.MANY_TENSORS = 4
    params, opt, _ = _cached(n=6)
    assert native_checks.status() == "building" and opt._step_cache.native is None
    _wait_for_build()
    assert native_checks.status() == "loaded" and list(tmp_path.glob("checks-*"))
    opt.step()
    assert opt._step_cache.native is not None


def test_a_build_removes_build_directories_that_dead_builds_left(tmp_path):
    """A build killed mid-compile (the daemon build thread, at exit) leaves its build
    directory; the next build beside it removes those older than any build takes, and
    leaves a younger one (another process's, still compiling), and its own."""
    dead, running = (tmp_path / (library.BUILD_PREFIX + name) for name in ("dead", "running"))
    for d in (dead, running):
        d.mkdir()
        (d / "partial.so").write_bytes(b"\0")
    stale = time.time() - library.STALE_BUILD_S - 60
    os.utime(dead, (stale, stale))
    src = tmp_path / "tiny.cpp"
    src.write_text("extern \"C\" int tiny() { return 1; }\n")
    target = library.compile_into(tmp_path / "tiny.so", "tiny", ["-shared", "-fPIC", str(src)])
    assert target.exists()
    assert sorted(p.name for p in tmp_path.glob(library.BUILD_PREFIX + "*")) == [running.name]


def test_the_grads_stay_alive_while_the_kernel_reads_them(checks_mode, monkeypatch):
    """The kernel runs without the GIL. The native refresh wrote the grads' addresses
    into the kernel's table and kept no reference to them: another thread's zero_grad()
    during a cached step freed them under the kernel (a segfault with 64 MB grads). Here
    the zero_grad() runs just before the kernel, as that thread could."""
    import gc
    import weakref

    from adamkit.backends.cpu import PreparedBucket

    ps, opt = on_a_cached_plan(256)
    cache = opt._step_cache
    alive = [weakref.ref(p.grad) for p in ps]
    seen, run = [], PreparedBucket.run

    def run_after_zero_grad(self, s):
        opt.zero_grad()
        gc.collect()
        seen.append([r() is not None for r in alive])
        run(self, s)

    monkeypatch.setattr(PreparedBucket, "run", run_after_zero_grad)
    opt.step()
    assert opt._step_cache is cache  # the cached step ran (the full path makes a new cache)
    assert seen == [[True, True, True]]
    assert all(r() is None for r in alive)  # and the cache let them go after the step
    assert all(float(opt.state[p]["step"]) == 3 for p in ps)


def test_a_grad_cleared_while_the_refresh_wraps_the_grads_is_still_the_one_read(checks_mode, monkeypatch):
    """Wrapping a grad autograd made (no Python object yet) allocates, and an allocation
    may run the garbage collector's callbacks, and so another thread: one clearing a later
    grad there freed it, while its address, checked already, went to the kernel (a
    segfault with 64 MB grads), and `held` got None. Here a gc callback clears it."""
    import gc
    import sys

    from adamkit.backends.cpu import PreparedBucket

    ps = [torch.nn.Parameter(torch.zeros(1024)) for _ in range(3)]
    opt = adamkit.Adam(ps, backend="cpu")

    def backward():
        opt.zero_grad()
        sum((p * (i + 1)).sum() for i, p in enumerate(ps)).backward()

    for _ in range(2):
        backward()
        opt.step()
    backward()
    fired, seen, run = [], [], PreparedBucket.run

    def clear_a_grad(phase, info):
        frame = sys._getframe(1)
        if phase == "start" and not fired and frame.f_code.co_name == "refresh_native" \
                and (frame.f_locals.get("held") or [None])[0] is not None:
            fired.append(True)
            ps[2].grad = None

    def run_and_look(self, s):
        table = list(self.table[self.grad_row:self.grad_row + self.n])
        seen.append((table, [None if g is None else g.data_ptr() for g in self.bucket.grads]))
        run(self, s)

    monkeypatch.setattr(PreparedBucket, "run", run_and_look)
    threshold = gc.get_threshold()
    gc.callbacks.append(clear_a_grad)
    gc.set_threshold(1)
    try:
        opt.step()
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(clear_a_grad)
    if checks_mode == "native checks":
        assert fired, "the gc callback did not run inside the refresh: nothing was tested"
    (table, held), = seen
    assert held == table  # every address the kernel reads belongs to a grad held alive
    assert [float(opt.state[p]["step"]) for p in ps] == [3, 3, 3]
    assert torch.allclose(ps[2].detach(), ps[0].detach())  # grad 3 read as 3 (Adam: sign)
