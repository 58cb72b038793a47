"""A live state edited between steps (a cast, a replaced or deleted int8 scale) is
checked as a loaded checkpoint is: one no format reads raises before anything changes,
one of the right values in another layout is stepped with."""

from __future__ import annotations

import pytest
import torch

import adamkit


def _int8_after_a_step(backend, **kw):
    p = torch.nn.Parameter(torch.randn(256 * 20 + 17, generator=torch.Generator().manual_seed(3)))
    opt = adamkit.Adam([p], state_format="int8", amsgrad=True, backend=backend, **kw)
    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(4))
    opt.step()
    return p, opt


def _cast_float_state_to_bf16(st):  # a common memory-saving helper written for torch.optim
    for key, value in list(st.items()):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
            st[key] = value.bfloat16()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("edit", [
    _cast_float_state_to_bf16,
    lambda st: st.update(exp_avg_scale=torch.ones(1)),
    lambda st: st.pop("max_exp_avg_sq_scale"),
    lambda st: st.update(exp_avg_sq_scale=st["exp_avg_sq_scale"].double()),
], ids=["cast-to-bf16", "short-scale", "scale-deleted", "float64-scale"])
def test_a_live_int8_state_edited_into_one_no_format_reads_raises_before_any_change(backend, edit):
    """The CPU kernel reads and writes int8 scales through raw pointers, and the step did
    not look at them again after planning them: a cast, short or deleted scale made it
    abort (malloc: unaligned tcache chunk), segfault or read garbage; the torch backend
    raised after exp_avg was rewritten. Now the step checks the state as a checkpoint
    is checked, and raises ValueError before anything changes."""
    p, opt = _int8_after_a_step(backend)
    edit(opt.state[p])
    before_p = p.detach().clone()
    before = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="optimizer state of param 0 .* cannot be read"):
        opt.step()
    assert torch.equal(p.detach(), before_p)
    assert before.keys() == {k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    for key, value in before.items():
        assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_live_int8_scale_replaced_by_a_valid_one_is_stepped_with(backend):
    """A replacement of the right values but not contiguous (every other element of a
    longer tensor): the kernel would have read its neighbours; the step converts it and
    runs as with the same values contiguous."""
    runs = []
    for contiguous in (True, False):
        p, opt = _int8_after_a_step(backend)
        scale = opt.state[p]["exp_avg_scale"]
        wide = torch.zeros(2 * scale.numel())
        wide[::2] = scale
        opt.state[p]["exp_avg_scale"] = scale.clone() if contiguous else wide[::2]
        p.grad = torch.ones_like(p)
        opt.step()
        runs.append((p.detach().clone(), {k: v for k, v in opt.state[p].items()
                                          if isinstance(v, torch.Tensor)}))
    (p1, st1), (p2, st2) = runs
    assert torch.equal(p1, p2) and st1.keys() == st2.keys()
    assert all(torch.equal(st1[k], st2[k]) for k in st1)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("storage", ["fp32", "master"])
def test_a_live_float_state_cast_away_from_its_format_raises_before_any_change(backend, storage):
    """fp32 moments (or a float32 master copy) cast to bfloat16 by code: the step used to
    run them on the torch backend as whatever they had become; the tags say fp32, and
    the step now says so before changing anything (state_format="bf16" stores bf16)."""
    kw = {"state_format": "fp32"} if storage == "fp32" else {"param_update": "master"}
    dtype = torch.float32 if storage == "fp32" else torch.bfloat16
    p = torch.nn.Parameter(torch.randn(300).to(dtype))
    opt = adamkit.Adam([p], backend=backend, **kw)
    p.grad = torch.randn(300).to(dtype)
    opt.step()
    _cast_float_state_to_bf16(opt.state[p])
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="cannot be read: .*(stores torch.float32|expected torch.float32)"):
        opt.step()
    assert torch.equal(p.detach(), before)
