"""State tensors edited into forms a step cannot write in place, or that torch's foreach
ops refuse.

torch.optim's for-loop step raises its own error at the first in-place op on a zero
tensor, an inference tensor or an expanded view, after the params before it have moved;
adamkit raises the same error while planning, so nothing changes. A negative-bit view
(``torch._neg_view``), or an integer step counter, the for-loop steps as any tensor: so
does adamkit, on every backend (the foreach ops and the native kernel cannot take them).
"""

from __future__ import annotations

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
