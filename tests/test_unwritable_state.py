"""State tensors edited into forms a step cannot write in place, or that torch's foreach
ops refuse.

torch.optim's for-loop step raises its own error at the first in-place op on a zero
tensor, an inference tensor or an expanded view, after the params before it have moved;
adamkit raises the same error while planning, so nothing changes. A negative-bit view
(``torch._neg_view``), or an integer step counter, the for-loop steps as any tensor: so
does adamkit, on every backend (the foreach ops and the native kernel cannot take them).
"""

from __future__ import annotations

import re

import pytest
import torch

import adamkit
from helpers import assert_close_scaled
from registry import ALL_BACKENDS, TORCH_PARITY_TOL

N = 5000  # above int8's 4096-element threshold, so int8 state really is int8

UNWRITABLE = {
    "zero": "ZeroTensors are immutable",
    "inference": "Inplace update to inference tensor outside InferenceMode",
    "expanded": "more than one element of the written-to tensor refers to a single memory",
}

# (state key, optimizer kwargs, param dtype): every kind of tensor a step writes
WRITTEN = [
    ("step", {}, torch.float32),
    ("exp_avg", {}, torch.float32),
    ("exp_avg_sq", {}, torch.float32),
    ("max_exp_avg_sq", {"amsgrad": True}, torch.float32),
    ("exp_avg", {"state_format": "int8"}, torch.float32),
    ("exp_avg_sq_scale", {"state_format": "int8"}, torch.float32),
    ("exp_avg", {}, torch.bfloat16),
    ("kahan_comp", {"param_update": "kahan"}, torch.bfloat16),
    ("master_param", {"param_update": "master"}, torch.bfloat16),
]
WRITTEN_IDS = [f"{key}-{kw.get('state_format', kw.get('param_update', ''))}-{str(dtype)[6:]}"
               for key, kw, dtype in WRITTEN]


def _edited(kind: str, t: torch.Tensor) -> torch.Tensor:
    """t's values in the form ``kind``."""
    if kind == "zero":
        return torch._efficientzerotensor(t.shape, dtype=t.dtype)
    if kind == "inference":
        with torch.inference_mode():
            return t.clone()
    if kind == "expanded":
        return t.reshape(-1)[:1].clone().expand(t.numel()).view(t.shape)
    if kind == "neg":
        return torch._neg_view(-t)
    if kind == "int":
        return t.to(torch.int64)
    raise AssertionError(kind)


def _two_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(N, generator=gen).to(dtype)) for _ in range(2)]


def _set_grads(ps, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _snapshot(opt, ps):
    return ([p.detach().clone() for p in ps],
            [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
             for p in ps])


def _assert_unchanged(opt, ps, snap):
    params, states = snap
    for p, before, st in zip(ps, params, states):
        assert torch.equal(p.detach(), before)
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", list(UNWRITABLE))
@pytest.mark.parametrize("key, kwargs, dtype", WRITTEN, ids=WRITTEN_IDS)
@pytest.mark.parametrize("cached", [False, True], ids=["first", "cached"])
def test_a_state_tensor_no_in_place_op_writes_raises_torchs_error_and_changes_nothing(
        backend, kind, key, kwargs, dtype, cached):
    """The cpu backend ran the kernel over the first param, then raised the torch
    backend's error at the second one's tensor, or wrote into the inference tensor (or
    raced its threads over the expanded one); the torch backend raised after the params
    had moved where the step counter was the tensor."""
    if kind == "expanded" and key == "step":
        pytest.skip("a 0-dim counter has no stride to expand")
    if kind == "expanded" and key.endswith("_scale"):
        pytest.skip("a scale not contiguous is not the kernel's: the step converts it (state_fits)")
    ps = _two_params(dtype)
    opt = adamkit.Adam(ps, lr=0.01, backend=backend, **kwargs)
    for step in range(1 + 2 * cached):  # three steps: the step cache holds a plan
        _set_grads(ps, step)
        opt.step()
    assert key in opt.state[ps[1]]
    opt.state[ps[1]][key] = _edited(kind, opt.state[ps[1]][key])
    _set_grads(ps, 9)
    snap = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=UNWRITABLE[kind]):
        opt.step()
    _assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("kind", list(UNWRITABLE))
@pytest.mark.parametrize("key", ["step", "exp_avg"])
def test_torchs_for_loop_raises_the_same_errors(kind, key):
    """The errors above are torch.optim's own, at the same edits (its for-loop step, the
    default on CPU)."""
    if kind == "expanded" and key == "step":
        pytest.skip("a 0-dim counter has no stride to expand")
    ps = _two_params(torch.float32)
    opt = torch.optim.Adam(ps, lr=0.01, foreach=False)
    _set_grads(ps, 0)
    opt.step()
    opt.state[ps[1]][key] = _edited(kind, opt.state[ps[1]][key])
    _set_grads(ps, 9)
    with pytest.raises(RuntimeError, match=UNWRITABLE[kind]):
        opt.step()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind, key", [("neg", "step"), ("int", "step"), ("neg", "exp_avg"),
                                       ("neg", "exp_avg_sq")])
def test_negative_bit_state_and_integer_counters_step_as_torchs_for_loop(backend, kind, key):
    """torch's foreach ops refuse a list holding a negative-bit tensor, and the counter's
    `+ 1.0` an integer one: both backends raised after the params had moved. torch's
    for-loop steps them; so does adamkit, to its numbers, counting the same way."""
    ps, twins = _two_params(torch.float32), _two_params(torch.float32)
    opt = adamkit.Adam(ps, lr=0.01, backend=backend)
    theirs = torch.optim.Adam(twins, lr=0.01, foreach=False)
    for step in range(5):
        _set_grads(ps, step)
        _set_grads(twins, step)
        opt.step()
        theirs.step()
        if step == 1:
            for o, q in ((opt, ps[1]), (theirs, twins[1])):
                o.state[q][key] = _edited(kind, o.state[q][key])
        for a, b in zip(ps, twins):
            assert_close_scaled(a.detach(), b.detach(), *TORCH_PARITY_TOL[torch.float32])
    counter, their_counter = opt.state[ps[1]]["step"], theirs.state[twins[1]]["step"]
    assert counter.dtype == their_counter.dtype and float(counter) == float(their_counter) == 5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("key, kwargs, dtype", WRITTEN[1:], ids=WRITTEN_IDS[1:])
def test_a_negative_bit_state_tensor_steps_as_its_materialized_copy(backend, key, kwargs, dtype):
    """Every format and buffer: a negative-bit view of a state tensor (same values) gives
    the step of the plain tensor, bit for bit: it is copied into plain memory first."""
    runs = []
    for edit in (False, True):
        ps = _two_params(dtype)
        opt = adamkit.Adam(ps, lr=0.01, backend=backend, **kwargs)
        for step in range(4):
            _set_grads(ps, step)
            opt.step()
            if step == 1 and edit:
                opt.state[ps[1]][key] = _edited("neg", opt.state[ps[1]][key])
        runs.append((ps, opt))
    (plain, plain_opt), (negged, negged_opt) = runs
    assert not negged_opt.state[negged[1]][key].is_neg()
    for a, b in zip(plain, negged):
        assert torch.equal(a.detach(), b.detach())
        for k, v in plain_opt.state[a].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(negged_opt.state[b][k], v), k


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_wrapper_subclass_that_calls_an_expanded_view_contiguous_is_refused_too(backend):
    """The quick look before check_param asked the tensor whether it is contiguous; a
    wrapper subclass (as DTensor) computes that in Python and may say yes over a stride
    of 0: the step raised after the first param had moved."""
    from helpers import Wrapped

    ps = _two_params(torch.float32)
    opt = adamkit.Adam(ps, lr=0.01, backend=backend)
    _set_grads(ps, 0)
    opt.step()
    opt.state[ps[1]]["exp_avg_sq"] = Wrapped(torch.zeros(1).expand(N))
    _set_grads(ps, 1)
    snap = _snapshot(opt, ps[:1])
    with pytest.raises(RuntimeError, match=UNWRITABLE["expanded"]):
        opt.step()
    _assert_unchanged(opt, ps[:1], snap)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(("counter", "message"), [
    (lambda: torch.tensor(True), "result type Long can't be cast to the desired output type Bool"),
    # a number set by hand (a checkpoint's int step loads: it is made a counter there)
    (lambda: 1.0, "API has changed, `state_steps` argument must contain a list of singleton tensors"),
    (lambda: 3, "API has changed, `state_steps` argument must contain a list of singleton tensors"),
], ids=["bool tensor", "float", "int"])
def test_a_step_counter_torch_cannot_count_raises_torchs_error_before_anything_changes(
        backend, counter, message):
    ps, twins = _two_params(torch.float32), _two_params(torch.float32)
    opt = adamkit.Adam(ps, lr=0.01, backend=backend)
    theirs = torch.optim.Adam(twins, lr=0.01, foreach=False)
    for o, qs in ((opt, ps), (theirs, twins)):
        _set_grads(qs, 0)
        o.step()
        o.state[qs[1]]["step"] = counter()
        _set_grads(qs, 1)
    message = re.escape(message)
    with pytest.raises(RuntimeError, match=message):
        theirs.step()
    snap = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    _assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_state_a_step_no_longer_writes_is_not_checked(backend):
    """max v, amsgrad turned off since, made an inference tensor: torch's step does not
    touch it, and neither may adamkit's checks."""
    ps, twins = _two_params(torch.float32), _two_params(torch.float32)
    opt = adamkit.Adam(ps, lr=0.01, backend=backend, amsgrad=True)
    theirs = torch.optim.Adam(twins, lr=0.01, foreach=False, amsgrad=True)
    for step in range(3):
        for o, qs in ((opt, ps), (theirs, twins)):
            _set_grads(qs, step)
            o.step()
            if step == 0:
                o.param_groups[0]["amsgrad"] = False
                o.state[qs[1]]["max_exp_avg_sq"] = _edited("inference", o.state[qs[1]]["max_exp_avg_sq"])
    for a, b in zip(ps, twins):
        assert_close_scaled(a.detach(), b.detach(), *TORCH_PARITY_TOL[torch.float32])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kwargs", [{}, {"state_format": "int8"}], ids=["fp32", "int8"])
def test_a_checkpoint_loaded_in_inference_mode_steps_outside_it(backend, kwargs):
    """torch.optim's load keeps the given tensors; adamkit's copies them, and its copies
    made under torch.inference_mode() were inference tensors, which the next step outside
    it could not write (the cpu kernel wrote into them regardless)."""
    ps = _two_params(torch.float32)
    opt = adamkit.Adam(ps, lr=0.01, backend=backend, **kwargs)
    _set_grads(ps, 0)
    opt.step()
    saved = opt.state_dict()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = adamkit.Adam(twins, lr=0.01, backend=backend, **kwargs)
    with torch.inference_mode():
        resumed.load_state_dict(saved)
    assert not any(t.is_inference() for st in resumed.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor))
    for o, qs in ((opt, ps), (resumed, twins)):
        _set_grads(qs, 1)
        o.step()
    for a, b in zip(ps, twins):
        assert torch.equal(a.detach(), b.detach())


def test_an_integer_counter_first_in_a_bucket_keeps_only_itself_off_the_kernel():
    """The kernel took its counters' dtype from the bucket's first: an int64 counter
    there sent every param of the bucket to the torch backend."""
    ps = [torch.nn.Parameter(torch.randn(64)) for _ in range(3)]
    opt = adamkit.Adam(ps, lr=0.01, backend="cpu")
    _set_grads(ps, 0)
    opt.step()
    opt.state[ps[0]]["step"] = opt.state[ps[0]]["step"].long()
    _set_grads(ps, 1)
    opt.step()
    (bucket,) = opt._step_cache.buckets
    assert bucket.prepared.rest == [0] and bucket.prepared.fast == [1, 2]
    assert [float(opt.state[p]["step"]) for p in ps] == [2, 2, 2]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("column", [0, 2, 3, 4], ids=["params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
def test_the_functional_step_writes_negative_bit_tensors_as_plain_ones(backend, column):
    """torch's foreach ops refuse to write a negative-bit tensor: the cpu backend's
    functional step raised after its kernel had updated the other param. (The cpu
    backend runs a negative-bit tensor on the torch backend: to its numbers.)"""
    def columns(neg):
        gen = torch.Generator().manual_seed(3)
        cols = [[torch.randn(64, generator=gen) for _ in range(2)] for _ in range(5)]
        cols[3] = [c.abs() for c in cols[3]]
        cols[4] = [c.abs() + 1 for c in cols[4]]
        if neg:
            cols[column][1] = torch._neg_view(-cols[column][1])
        return cols
    plain, negged = columns(False), columns(True)
    for cols in (plain, negged):
        adamkit.functional.adam_step(*cols, step=3, lr=0.01, amsgrad=True, backend=backend)
    assert negged[column][1].is_neg()
    for a, b in zip(plain, negged):
        for x, y in zip(a, b):
            if backend == "cpu":
                assert_close_scaled(x, y, *TORCH_PARITY_TOL[torch.float32])
            else:
                assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("made", ["state", "params"])
def test_steps_in_inference_mode_then_outside_raise_torchs_error_and_change_nothing(backend, made):
    """State made by steps under torch.inference_mode(), or params made there, are
    inference tensors: torch's step outside it raises. The cached plan (made inside)
    stepped them outside, or, on the torch backend with decoupled decay, decayed the
    params and then raised."""
    def make():
        if made == "params":
            with torch.inference_mode():
                return [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
        return [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
    ps, twins = make(), make()
    opt = adamkit.AdamW(ps, lr=0.1, weight_decay=0.5, backend=backend)
    theirs = torch.optim.AdamW(twins, lr=0.1, weight_decay=0.5, foreach=False)
    for o, qs in ((opt, ps), (theirs, twins)):
        for q in qs:
            q.grad = torch.ones(4)
        with torch.inference_mode():
            o.step()
            o.step()
    for a, b in zip(ps, twins):
        assert_close_scaled(a.detach(), b.detach(), *TORCH_PARITY_TOL[torch.float32])
    with pytest.raises(RuntimeError, match=UNWRITABLE["inference"]):
        theirs.step()
    snap = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=UNWRITABLE["inference"]):
        opt.step()
    _assert_unchanged(opt, ps, snap)


# ---- the lazy conjugate bit of complex tensors --------------------------------------
# It has no real view (torch.view_as_real raises): torch.optim's step raised at the
# first such tensor, after the params before it had moved, and so did adamkit's.

CONJ_ERROR = "view_as_real doesn't work on unresolved conjugated tensors"


def _real_and_complex(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, generator=gen)),  # a bucket stepped first
            torch.nn.Parameter(torch.randn(64, dtype=torch.complex64, generator=gen))]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_conjugate_bit_grad_steps_as_its_values_and_stays_as_it_was(backend):
    """autograd gives z the grad conj(w)·... with the bit set for (z.conj()·w).real: a
    grad is only read, so it steps as its resolved values (one copy of that grad), on
    the full path and the cached one; .grad keeps its bit and its values."""
    w = torch.randn(64, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    conj, plain = _real_and_complex(), _real_and_complex()
    runs = [(qs, adamkit.Adam(qs, lr=0.01, weight_decay=0.1, backend=backend)) for qs in (conj, plain)]
    for _ in range(4):
        for qs, o in runs:
            o.zero_grad()
            ((qs[1].conj() * w).real.sum() + qs[0].square().sum()).backward()
            if qs is plain:
                qs[1].grad = qs[1].grad.resolve_conj()
            before = qs[1].grad.clone()
            o.step()
        assert conj[1].grad.is_conj() and not plain[1].grad.is_conj()
        assert torch.equal(conj[1].grad, before)
    for a, b in zip(conj, plain):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_the_functional_step_reads_a_conjugate_bit_grad_as_its_values(backend):
    def columns():
        gen = torch.Generator().manual_seed(5)
        cols = [[torch.randn(64, dtype=torch.complex64, generator=gen)] for _ in range(3)]
        return [cols[0], cols[1], cols[2], [torch.rand(64, dtype=torch.complex64, generator=gen)]]
    plain, conj = columns(), columns()
    conj[1][0] = conj[1][0].conj_physical().conj()  # the same values, with the bit
    plain[1][0] = plain[1][0].clone()
    for cols in (plain, conj):
        adamkit.functional.adam_step(*cols, step=2, lr=0.01, backend=backend)
    for a, b in zip(plain, conj):
        assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("key", ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("cached", [False, True], ids=["first", "cached"])
@pytest.mark.parametrize("how", ["replaced", "data"])
def test_a_conjugate_bit_tensor_a_step_writes_raises_torchs_error_and_changes_nothing(backend, key, cached, how):
    """A write through a resolved copy would be lost: a param (``p.data = z.conj()``) or
    a moment with the bit (a new tensor, or the same one given it through ``.data =``,
    which keeps its address: the cached plan's layout check) raises torch's error before
    anything moves."""
    if key == "param" and how == "replaced":
        pytest.skip("a param replaced is another param: it has no state")
    ps = _real_and_complex()
    opt = adamkit.Adam(ps, lr=0.01, amsgrad=True, backend=backend)
    for step in range(1 + 2 * cached):
        _set_grads(ps, step)
        opt.step()
    z = ps[1]
    if key == "param":
        z.data = z.data.conj_physical().conj()
    elif how == "data":  # the same memory, read conjugated
        t = opt.state[z][key]
        t.data = t.data.conj()
    else:
        opt.state[z][key] = opt.state[z][key].conj_physical().conj()
    _set_grads(ps, 9)
    snap = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=CONJ_ERROR):
        opt.step()
    _assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("column", [0, 2, 3], ids=["params", "exp_avgs", "exp_avg_sqs"])
def test_the_functional_step_refuses_a_conjugate_bit_tensor_it_writes(backend, column):
    gen = torch.Generator().manual_seed(6)
    cols = [[torch.randn(64, dtype=torch.complex64, generator=gen) for _ in range(2)] for _ in range(4)]
    cols[column][1] = cols[column][1].conj_physical().conj()
    before = [[t.clone() for t in c] for c in cols]
    with pytest.raises(RuntimeError, match=CONJ_ERROR):
        adamkit.functional.adam_step(*cols, step=2, lr=0.01, backend=backend)
    for c, b in zip(cols, before):
        for t, u in zip(c, b):
            assert torch.equal(t, u)
