"""The cached step plan (adamkit/step_cache.py) must be invisible: every step equals the
full plan's, and anything that invalidates the plan sends the step down the full path."""

from __future__ import annotations

import contextlib
import math
import gc
import weakref
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adamkit
from adamkit import formats, step_cache

from helpers import Wrapped, on_a_cached_plan

# every test twice: the step cache's checks in Python and in C++ (conftest.checks_mode)
pytestmark = pytest.mark.usefixtures("checks_mode")


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(300, generator=g)),
        torch.nn.Parameter(torch.randn(64, 65, generator=g).to(torch.bfloat16)),
        torch.nn.Parameter(torch.randn(5000, generator=g)),
        torch.nn.Parameter(torch.randn(7, generator=g).double()),  # torch backend
    ]


def _optimizer(params, **kw):
    return adamkit.Adam([
        {"params": params[:2], "lr": torch.tensor(0.01), "amsgrad": True, "weight_decay": 0.1},
        {"params": params[2:], "state_format": "int8", "int8_min_size": 1000},
    ], lr=0.003, param_update="stochastic", seed=3, **kw)


def _grads(params, k):
    for i, p in enumerate(params):
        p.grad = torch.cos(p.detach().float() * (k + 1) + i).to(p.dtype)


class _Counting:
    """Counts full plans; ``disable`` makes every step take the full path."""

    def __init__(self, monkeypatch, disable=False):
        self.full = 0
        planned = adamkit.Adam._planned_step

        def counting(opt, *args):
            self.full += 1
            return planned(opt, *args)

        monkeypatch.setattr(adamkit.Adam, "_planned_step", counting)
        if disable:
            monkeypatch.setattr(step_cache.StepCache, "try_step", lambda *a: False)


def _run(monkeypatch, edit, disable, steps=6):
    counter = _Counting(monkeypatch, disable)
    params = _model()
    opt = _optimizer(params)
    for k in range(steps):
        _grads(params, k)
        edit(k, params, opt)
        opt.step()
        opt.zero_grad()
    monkeypatch.undo()
    return params, opt, counter.full


def _assert_same(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for x, y in zip(pa, pb):
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[key]), key
            else:
                assert value == sb[key], key


def _no_edit(k, params, opt):
    pass


def _skip_a_grad(k, params, opt):
    if k == 2:
        params[0].grad = None


def _replace_a_moment(k, params, opt):
    if k == 3:
        st = opt.state[params[0]]
        st["exp_avg"] = torch.full_like(st["exp_avg"], 0.5)


def _reset_a_state(k, params, opt):
    if k == 3:
        del opt.state[params[2]]


def _rewind_a_step_counter(k, params, opt):
    if k == 3:
        opt.state[params[2]]["step"].fill_(1.0)


def _move_a_param(k, params, opt):
    if k == 3:
        params[0].data = params[0].data.clone() * 2


def _swap_a_param(k, params, opt):
    if k == 3:  # the group's list edited in place: same list, same length
        fresh = torch.nn.Parameter(params[2].detach() * 0.5)
        fresh.grad = params[2].grad
        opt.param_groups[1]["params"][0] = fresh
        params[2] = fresh


def _recast_a_param(k, params, opt):
    if k == 3:  # float64 (torch backend) to float32, grad too, as model.float() does
        params[3].data = params[3].data.float()
        params[3].grad = params[3].grad.float()


def _drop_a_state_key(k, params, opt):
    if k == 3:
        del opt.state[params[0]]["max_exp_avg_sq"]


def _float64_step_counter(k, params, opt):
    if k == 3:  # one counter of another dtype in a float32 bucket
        st = opt.state[params[2]]
        st["step"] = st["step"].double()


def _new_storage_for_a_moment(k, params, opt):
    if k == 3:  # same tensor object, new memory
        st = opt.state[params[2]]
        st["exp_avg"].data = st["exp_avg"].data.clone()


def _non_contiguous_grad(k, params, opt):
    if k >= 2:
        g = params[1].grad
        params[1].grad = g.t().contiguous().t()


def _change_state_format(k, params, opt):
    if k == 3:
        opt.param_groups[0]["state_format"] = "bf16"


def _schedule_lr(k, params, opt):
    opt.param_groups[0]["lr"].fill_(0.01 / (k + 1))
    opt.param_groups[1]["lr"] = 0.003 * (k + 1)


def _reseed_in_place(k, params, opt):
    if k == 3:  # as a checkpoint loaded into the live state tensors does
        opt.state[params[1]]["sr_seed"].fill_(12345)


def _replace_a_seed(k, params, opt):
    if k == 3:  # a new tensor (not the planned one) under sr_seed
        opt.state[params[1]]["sr_seed"] = torch.tensor(12345)


def _wrap_a_grad(k, params, opt):
    if k >= 3:  # a wrapper subclass (no storage of its values: data_ptr 0) after the plan
        params[2].grad = Wrapped(params[2].grad)


EDITS = [_no_edit, _skip_a_grad, _replace_a_moment, _reset_a_state, _rewind_a_step_counter,
         _move_a_param, _swap_a_param, _recast_a_param, _drop_a_state_key,
         _float64_step_counter, _new_storage_for_a_moment,
         _non_contiguous_grad, _change_state_format, _schedule_lr, _wrap_a_grad, _reseed_in_place,
         _replace_a_seed]


@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__.strip("_"))
def test_cached_steps_equal_full_steps(monkeypatch, edit):
    cached = _run(monkeypatch, edit, disable=False)
    full = _run(monkeypatch, edit, disable=True)
    _assert_same(cached[:2], full[:2])
    assert full[2] == 6  # the control really planned every step


def test_an_unchanged_optimizer_plans_once(monkeypatch):
    assert _run(monkeypatch, _no_edit, disable=False)[2] == 1


@pytest.mark.parametrize("edit", [_skip_a_grad, _replace_a_moment, _reset_a_state,
                                  _rewind_a_step_counter, _move_a_param, _swap_a_param,
                                  _recast_a_param, _drop_a_state_key, _float64_step_counter,
                                  _new_storage_for_a_moment, _change_state_format])
def test_a_change_replans(monkeypatch, edit):
    # The edit at step k forces a full plan at k, and at k+1 if the edit repeats.
    assert _run(monkeypatch, edit, disable=False)[2] >= 2


def test_load_state_dict_and_new_groups_replan(monkeypatch):
    counter = _Counting(monkeypatch)
    params = _model()
    opt = _optimizer(params)
    for k in range(3):
        _grads(params, k)
        opt.step()
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    _grads(params, 3)
    opt.step()
    assert counter.full == 2
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(3)
    _grads(params, 4)
    opt.step()
    assert counter.full == 3 and float(opt.state[extra]["step"]) == 1.0
    assert all(float(opt.state[p]["step"]) == 5.0 for p in params)


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_step_counters_count_every_step(default):
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        params = _model()
        opt = _optimizer(params)
        for k in range(7):
            _grads(params, k)
            opt.step()
        for p in params:
            step = opt.state[p]["step"]
            assert step.dtype == default and float(step) == 7.0
    finally:
        torch.set_default_dtype(old)


def test_the_cache_holds_no_grads():
    params = _model()
    opt = _optimizer(params)
    for k in range(3):
        _grads(params, k)
        refs = [weakref.ref(p.grad) for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert all(r() is None for r in refs)


def test_sparse_grad_after_cached_steps_raises_and_changes_nothing():
    p = torch.nn.Parameter(torch.randn(10))
    opt = adamkit.Adam([p])
    for _ in range(2):
        p.grad = torch.ones(10)
        opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()
                                  if isinstance(v, torch.Tensor)}
    p.grad = torch.ones(10).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(p, before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


def test_counters_of_two_dtypes_in_one_bucket_count_right():
    params = _model()
    opt = _optimizer(params)
    for k in range(5):
        _grads(params, k)
        _float64_step_counter(k, params, opt)
        opt.step()
    steps = [opt.state[p]["step"] for p in params]
    assert steps[2].dtype == torch.float64
    assert [float(s) for s in steps] == [5.0] * 4


# ---- random sequences of edits: the cache against a run that plans every step ---------

def _act(action, k, params, opt):
    """One edit before step k (the same in both runs)."""
    g0, g1 = opt.param_groups
    if action == "skip_grad":
        params[k % len(params)].grad = None
    elif action == "lr":
        g1["lr"] = 0.001 * (1 + k % 3)
    elif action == "betas":
        g1["betas"] = (0.8, 0.99) if k % 2 else (0.9, 0.999)
    elif action == "amsgrad":
        g1["amsgrad"] = not g1["amsgrad"]
    elif action == "state_format":
        g0["state_format"] = "fp32" if g0.get("state_format") in (None, "bf16") else "bf16"
    elif action == "param_update":
        g0["param_update"] = ("kahan", "master", "stochastic", "nearest")[k % 4]
    elif action == "write_param":  # what model.load_state_dict does
        with torch.no_grad():
            params[1].mul_(0.5)
    elif action == "data_swap":
        params[2].data = params[2].data.clone()
    elif action == "save_load":
        opt.load_state_dict(opt.state_dict())
    elif action == "maximize":
        g0["maximize"] = not g0["maximize"]
    elif action == "state_data_swap":  # the "move the optimizer to a device" recipe
        for st_ in opt.state.values():
            for value in st_.values():
                if isinstance(value, torch.Tensor) and value.dim():
                    value.data = value.data.clone()


ACTIONS = ["step", "skip_grad", "lr", "betas", "amsgrad", "state_format", "param_update",
           "write_param", "data_swap", "save_load", "maximize", "state_data_swap"]


def _sequence_run(actions, plan_every_step):
    params = _model()
    opt = _optimizer(params)
    with mock.patch.object(step_cache.StepCache, "try_step", lambda *a: False) if plan_every_step \
            else contextlib.nullcontext():
        for k, action in enumerate(actions):
            _grads(params, k)
            _act(action, k, params, opt)
            opt.step()
    return params, opt


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(ACTIONS), min_size=3, max_size=9))
def test_random_edit_sequences_match_planning_every_step(actions):
    """Any sequence of the edits a training loop makes between steps (schedulers,
    storage changes, frozen params, checkpoint reloads, writes into params) gives the
    same bits with the cached plan as with a full plan at every step."""
    _assert_same(_sequence_run(actions, False), _sequence_run(actions, True))


def test_native_checks_take_the_kernel_buckets(checks_mode):
    """Under "native checks" the cache hands checks.cpp every kernel bucket (the float64
    param's torch-backend bucket keeps its Python checks); under "python checks" none."""
    params = _model()
    opt = _optimizer(params)
    for k in range(3):
        _grads(params, k)
        opt.step()
    cache = opt._step_cache
    if checks_mode == "python checks":
        assert cache.native is None
        return
    native_buckets = [cb.bucket.params[0].dtype for cb, rows in zip(cache.buckets, cache.native.key_rows)
                      if rows is not None]
    assert sorted(map(str, native_buckets)) == ["torch.bfloat16", "torch.float32", "torch.float32"]
    assert len(cache.buckets) == 4


# ---- state and grads whose memory the kernel cannot take as planned ------------------------

def _moment_sliced(st):  # another tensor at the same address, with fewer elements
    st["exp_avg"] = st["exp_avg"][:2]


def _moment_flattened(st):
    st["exp_avg"] = st["exp_avg"].view(-1)


def _moment_resized(st):
    st["exp_avg_sq"].resize_(2, 4)


def _moment_as_int32(st):
    st["exp_avg"].data = st["exp_avg"].data.view(torch.int32)


def _moment_transposed(st):
    st["exp_avg"].data = st["exp_avg"].data.t()


def _moment_negated(st):
    st["exp_avg"].data = torch._neg_view(st["exp_avg"].data)


def _step_edited(cached: bool, edit, at: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 8, generator=g))
    opt = adamkit.Adam([p], lr=1e-2, backend="cpu")
    off = mock.patch.object(step_cache.StepCache, "try_step", lambda *a: False)
    with contextlib.nullcontext() if cached else off:
        for t in range(3):
            p.grad = torch.randn(8, 8, generator=g)
            if t == at:
                edit(opt.state[p])
            try:
                opt.step()
            except Exception as exc:  # noqa: BLE001  (the full path's error, whichever)
                return type(exc), p.detach().clone()
    return None, p.detach().clone()


@pytest.mark.parametrize("edit", [_moment_sliced, _moment_flattened, _moment_resized, _moment_as_int32,
                                  _moment_transposed, _moment_negated], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("at", [1, 2], ids=["before the first cached step", "later"])
def test_a_state_tensor_edited_in_place_steps_as_the_full_path(edit, at):
    """The cached step checks each state tensor's identity, address, element count, dtype,
    contiguity and negative bit: with any of them changed it takes the full path, which
    raises (changing nothing) or steps as a fresh plan would. By address alone, a slice put
    back at the moment's address ran the kernel over 64 elements of a 2-element tensor (a
    tensor given a smaller storage at a freed tensor's address: a heap overflow). Edited
    before the first cached step, it is checked against the plan's layout too (the C++
    checks' arguments, made at that step, took the tensor's layout then)."""
    cached, fresh = _step_edited(True, edit, at), _step_edited(False, edit, at)
    assert cached[0] is fresh[0]
    assert torch.equal(cached[1], fresh[1])


@pytest.mark.parametrize("make", [lambda g: torch._neg_view(g.neg()), lambda g: torch._efficientzerotensor(g.shape)],
                         ids=["negative bit", "zero tensor"])
def test_grads_the_kernel_cannot_read_step_as_torch(make):
    """A grad with the negative bit (its memory holds -g) or a zero tensor (no memory:
    data_ptr 0) goes to the torch backend, planned or cached: the kernel stepped along -g,
    or read address 0."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, generator=g))
    q = torch.nn.Parameter(p.detach().clone())
    ours, theirs = adamkit.Adam([p], lr=0.1, backend="cpu"), torch.optim.Adam([q], lr=0.1)
    for t in range(4):
        grad = torch.randn(64, generator=g)
        p.grad = make(grad) if t % 2 else grad.clone()
        q.grad = grad if t % 2 == 0 or make(grad).any() else torch.zeros(64)
        ours.step()
        theirs.step()
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("key", ["step", "exp_avg_scale"])
def test_a_zero_tensor_in_the_state_is_not_read_by_the_kernel(key):
    """A state tensor with no memory at all (a zero tensor: data_ptr 0) put in the state
    goes to the torch backend, which raises torch's error for it (the kernel wrote the
    step counter at address 0: a segfault)."""
    p = torch.nn.Parameter(torch.randn(64))
    opt = adamkit.Adam([p], lr=0.1, backend="cpu", state_format="int8", int8_min_size=1)
    p.grad = torch.randn(64)
    opt.step()
    st = opt.state[p]
    st[key] = torch._efficientzerotensor(st[key].shape, dtype=st[key].dtype)
    with pytest.raises(RuntimeError):
        p.grad = torch.randn(64)
        opt.step()


@pytest.mark.parametrize("make", [lambda g: torch.empty(2 * g.numel())[::2].copy_(g),
                                  lambda g: torch._neg_view(g.neg()),
                                  lambda g: torch._efficientzerotensor(g.shape)],
                         ids=["not contiguous", "negative bit", "zero tensor"])
def test_a_param_whose_first_grad_kept_it_off_the_kernel_returns_to_it(make):
    """A param whose grad the kernel cannot read runs on the torch backend in that step;
    the cached plan kept it there in every later step (slower, and the torch backend's
    numbers, not the kernel's: 2.4e-7 apart after 20 steps). Cached steps now give the
    full path's numbers, bit for bit."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 8, generator=g).reshape(64)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    cached, fresh = adamkit.Adam(ps, lr=0.01, backend="cpu"), adamkit.Adam(twins, lr=0.01, backend="cpu")
    for t in range(8):
        for p, q in zip(ps, twins):
            grad = torch.randn(64, generator=g)
            p.grad = make(grad) if t == 0 and p is ps[0] else grad
            q.grad = p.grad
        fresh._step_cache = None  # the full path at every step
        cached.step()
        fresh.step()
        for p, q in zip(ps, twins):
            assert torch.equal(p, q), t
    assert cached._step_cache is not None


def test_a_cached_step_that_raises_keeps_no_grad(checks_mode):
    """The refresh hands the buckets the step's grads; they were let go only after a
    step that ran, so a step raising after the refresh (a group left without lr, an
    interrupt) kept them alive past zero_grad()."""
    import weakref

    ps, opt = on_a_cached_plan(64)
    alive = [weakref.ref(p.grad) for p in ps]
    lr = opt.param_groups[0].pop("lr")
    with pytest.raises(KeyError):
        opt.step()
    opt.zero_grad()
    assert all(r() is None for r in alive)
    opt.param_groups[0]["lr"] = lr
    for p in ps:
        p.grad = torch.ones(64)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in ps] == [3, 3, 3]


# ---- a state's tags, edited between steps ---------------------------------------------------

def _tag_names_another_format(st):  # its tensors stay int8 codes
    st["state_format"] = torch.tensor(formats.FORMAT_CODES["bf16"])


def _tag_written_in_place(st):  # the same tensor, another code: as dcp.load writes a checkpoint's
    st["state_format"].fill_(formats.FORMAT_CODES["bf16"])


def _tag_written_in_place_with_its_code(st):  # a write, nothing to read differently
    st["state_format"].copy_(st["state_format"].clone())


def _str_tag_names_another_format(st):  # as an earlier version wrote tags
    st["state_format"] = "bf16"


def _str_tags_as_stored(st):  # an optimizer pickled by an earlier version: read, then tensors
    st["state_format"], st["param_update"] = "int8", "kahan"


def _tag_removed(st):  # the state is then read from its tensors: int8 codes, a kahan buffer
    del st["state_format"]


def _policy_tag_edited(st):  # a kahan state said to be master's
    st["param_update"] = torch.tensor(formats.UPDATE_CODES["master"])


def _tag_rewritten_equal(st):  # the same value, another tensor: nothing to read differently
    st["state_format"] = st["state_format"].clone()


def _scale_swapped_negative(st):  # a new tensor: formats.md's scales are ≥ 2^-126 (or 0, NaN, +∞)
    st["exp_avg_sq_scale"] = -st["exp_avg_sq_scale"]


def _scale_swapped_minus_inf(st):  # (the cpu kernel moved the params, the torch backend did not)
    scale = st["exp_avg_scale"].clone()
    scale[0] = -math.inf
    st["exp_avg_scale"] = scale


def _scale_doubled_in_place(st):  # the same tensor: m doubled, a state an encoder can write
    st["exp_avg_scale"].mul_(2)


def _tag_edited_run(cached: bool, edit, backend: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000, generator=g).bfloat16())
    opt = adamkit.Adam([p], lr=1e-2, backend=backend, state_format="int8")
    off = mock.patch.object(step_cache.StepCache, "try_step", lambda *a: False)
    with contextlib.nullcontext() if cached else off:
        for t in range(4):
            p.grad = torch.randn(5000, generator=g).bfloat16()
            if t == 2:
                edit(opt.state[p])
                before = _state_copy(opt, p)
            try:
                opt.step()
            except Exception as exc:  # noqa: BLE001  (the full path's error, whichever)
                assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                           for a, b in zip(before, _state_copy(opt, p)))  # nothing changed
                return type(exc), p.detach().clone()
    return None, p.detach().clone()


def _state_copy(opt, p):
    st = opt.state[p]
    return [p.detach().clone()] + [v.clone() if isinstance(v, torch.Tensor) else v
                                   for _, v in sorted(st.items())]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("edit", [_tag_names_another_format, _tag_written_in_place,
                                  _tag_written_in_place_with_its_code, _str_tag_names_another_format,
                                  _str_tags_as_stored, _tag_removed,
                                  _policy_tag_edited, _tag_rewritten_equal, _scale_swapped_negative,
                                  _scale_swapped_minus_inf],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_state_tag_edited_between_steps_steps_as_the_full_path(checks_mode, edit, backend):
    """The full path reads a state by its tags (state_format, param_update): a tag that
    no longer says what the tensors hold raises UnreadableStateError with nothing changed.
    The cached step checks the tags by identity, as the tensors, so it does the same; by
    the tensors alone it stepped on, and the state dict it left could not be loaded. So
    does an int8 scale swapped for one holding values no encoder writes, which loading
    the state as a checkpoint refuses (it was used, and the backends parted). A state
    whose tags say what it holds, or that lost them (read from its tensors), steps on."""
    cached, fresh = _tag_edited_run(True, edit, backend), _tag_edited_run(False, edit, backend)
    assert cached[0] is fresh[0]
    assert torch.equal(cached[1], fresh[1])
    if edit in (_tag_rewritten_equal, _tag_removed, _str_tags_as_stored, _tag_written_in_place_with_its_code):
        assert cached[0] is None
        assert torch.equal(cached[1], _tag_edited_run(True, lambda st: None, backend)[1])
    else:
        assert cached[0] is adamkit.UnreadableStateError


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_values_edited_in_place_are_read_as_they_are_now(checks_mode, backend):
    """The cached plan holds tensors, never their values: an int8 scale edited in place
    (the moments rescaled) steps as the full path steps it, on both backends. Values are
    checked where a state is planned (first step, load, a swapped tensor: above); between
    cached steps a value edited in place is data, as torch.optim reads a moment edited in
    place (docs/precision.md)."""
    cached = _tag_edited_run(True, _scale_doubled_in_place, backend)
    fresh = _tag_edited_run(False, _scale_doubled_in_place, backend)
    untouched = _tag_edited_run(True, lambda st: None, backend)
    assert cached[0] is None and fresh[0] is None
    assert torch.equal(cached[1], fresh[1])
    assert not torch.equal(cached[1], untouched[1])  # the edit was read



class _TagSubclass(torch.Tensor):
    pass


def test_a_tag_of_a_tensor_subclass_written_in_place_raises_as_the_full_path(checks_mode):
    """checks.cpp checks a tag tensor's version and address only where it is a Tensor
    exactly: with a subclass there, a tag written in place to name another format
    stepped on under the C++ checks while the Python ones raised (found by review). A
    bucket with such a tag keeps its Python checks, as one with subclassed tensors does."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300, generator=g))
    opt = adamkit.Adam([p], lr=1e-2, backend="cpu")
    for t in range(3):  # the tag replaced at the second step (a re-plan), the third cached
        p.grad = torch.randn(300, generator=g)
        if t == 1:
            opt.state[p]["state_format"] = opt.state[p]["state_format"].as_subclass(_TagSubclass)
        opt.step()
    assert opt._step_cache is not None
    opt.state[p]["state_format"].fill_(formats.FORMAT_CODES["bf16"])  # the moments are fp32
    before = _state_copy(opt, p)
    p.grad = torch.randn(300, generator=g)
    with pytest.raises(adamkit.UnreadableStateError):
        opt.step()
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(before, _state_copy(opt, p)))

# ---- a bucket's params the kernel cannot take (its torch-backend `rest`) ---------------------

def _with_a_rest(seed=0):
    """A float32 param the cpu kernel steps, and a transposed one it leaves to the torch
    backend, in one bucket."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(300, generator=g)),
          torch.nn.Parameter(torch.randn(20, 20, generator=g).t())]
    return ps, adamkit.Adam(ps, lr=0.01, backend="cpu")


def _rest_grads(ps, k):
    for p in ps:
        p.grad = torch.sin(p.detach() * (k + 1))


def test_a_rest_param_given_an_expanded_view_raises_with_nothing_changed(checks_mode):
    ps, opt = _with_a_rest()
    for k in range(3):
        _rest_grads(ps, k)
        opt.step()
    assert opt._step_cache is not None
    ps[1].data = torch.randn(1, 20).expand(20, 20)
    _rest_grads(ps, 3)
    before = [p.detach().clone() for p in ps], [opt.state[p]["step"].clone() for p in ps]
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before[0]))
    assert all(torch.equal(opt.state[p]["step"], b) for p, b in zip(ps, before[1]))


def test_a_rest_params_counter_edited_between_cached_steps_steps_as_the_full_path(checks_mode, monkeypatch):
    def run(disable):
        counter = _Counting(monkeypatch, disable)
        ps, opt = _with_a_rest()
        for k in range(6):
            _rest_grads(ps, k)
            if k == 3:
                opt.state[ps[1]]["step"].fill_(1.0)
            opt.step()
        monkeypatch.undo()
        return ps, counter.full
    (cached, _), (full, planned) = run(False), run(True)
    assert planned == 6
    for a, b in zip(cached, full):
        assert torch.equal(a.detach(), b.detach())


def _two_groups(backend, noncontiguous=False):
    g = torch.Generator().manual_seed(5)
    a = torch.nn.Parameter(torch.randn(300, generator=g))
    b = torch.nn.Parameter(torch.randn(20, 15, generator=g).t() if noncontiguous else torch.randn(300, generator=g))
    opt = adamkit.Adam([{"params": [a]}, {"params": [b]}], lr=1e-2, backend=backend)
    for k in range(2):
        a.grad, b.grad = torch.full_like(a, 0.5 - k), torch.full_like(b, k - 0.5)
        opt.step()
    return a, b, opt


@pytest.mark.parametrize("backend,noncontiguous", [("torch", False), ("reference", False), ("cpu", True)])
def test_a_param_swapped_onto_another_device_steps_as_the_full_path_does(monkeypatch, backend, noncontiguous):
    """torch.utils.swap_tensors (what module.to() does with swap-on-conversion) keeps the
    Python object: the cached plan of a torch-backend bucket took it, and torch's ops
    raised after the other group had moved, at every later step again (the plan was
    kept). The plan now compares those params' addresses, and the step is the full
    path's, which moves the state to the param's device (found by review)."""
    runs = []
    for disable in (False, True):
        a, b, opt = _two_groups(backend, noncontiguous)
        if disable:
            monkeypatch.setattr(step_cache.StepCache, "try_step", lambda *args: False)
        torch.utils.swap_tensors(b, torch.nn.Parameter(torch.empty_strided(b.shape, b.stride(), device="meta")))
        for _ in range(2):
            a.grad, b.grad = torch.ones_like(a), torch.empty(b.shape, device="meta")
            opt.step()
        monkeypatch.undo()
        runs.append((a.detach().clone(), opt.state[a]["step"].item(), opt.state[b]["exp_avg"].device))
    (a1, t1, d1), (a2, t2, d2) = runs
    assert torch.equal(a1, a2) and t1 == t2 == 4 and d1 == d2 == torch.device("meta")


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
def test_a_param_given_a_zero_tensor_raises_on_a_cached_plan_with_nothing_changed(backend):
    """`.data =` a zero tensor keeps the param's identity: the torch and reference
    backends' cached plans ran the first group, then raised torch's "ZeroTensors are
    immutable" on the second. The full path's check now raises first."""
    a, b, opt = _two_groups(backend)
    b.data = torch._efficientzerotensor(300)
    a.grad, b.grad = torch.ones(300), torch.ones(300)
    before = a.detach().clone(), {k: v.clone() for k, v in opt.state[a].items()}
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
        opt.step()
    assert torch.equal(a, before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in opt.state[a].items())


def test_a_cached_step_that_raises_drops_the_plan(monkeypatch):
    """A plan whose step raised (an interrupt, an op's error) ran its buckets again at
    every later step until one of them moved past the error. The next step now plans
    anew."""
    a, b, opt = _two_groups("cpu")
    assert opt._step_cache is not None

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(step_cache, "run_bucket", interrupted)
    a.grad, b.grad = torch.ones(300), torch.ones(300)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert opt._step_cache is None
