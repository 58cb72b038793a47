"""torch.optim's checkpoints into adamkit and adamkit's into torch.optim: what torch
saves loads as torch loads it (into kahan, master or int8 storage too), what adamkit
saves continues in torch.optim through ``torch_state_dict``, and what torch.optim's load
would misread is refused (docs/design/formats.md, "Checkpoints")."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import adamkit
from adamkit import checkpoints
from adamkit.formats import param as policy
from adamkit.formats import state as fmt_state
from adamkit.formats import stored_formats
from helpers import assert_close_scaled
from registry import STORAGE, TORCH_PARITY_TOL
from storage_helpers import MOMENTS, make_opt, make_params, read_moment, train, with_legacy_tags
from test_checkpoints import _assert_unchanged, _save_load, _snapshot


@pytest.mark.parametrize("update", ["kahan", "master"])
def test_torch_optim_checkpoint_into_kahan_or_master(update):
    """torch.optim.Adam on bfloat16 params keeps bfloat16 moments and no buffers: they load
    as "bf16" moments, with comp = 0 or master = p, and training goes on."""
    params = make_params(torch.bfloat16)
    opt = torch.optim.Adam(params, lr=1e-2, amsgrad=True)
    train(params, opt, 3)
    saved = _save_load(opt.state_dict())
    ours = adamkit.Adam(params, param_update=update)
    ours.load_state_dict(saved)
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[0]["amsgrad"]
    for i, p in enumerate(params):
        st = ours.state[p]
        assert stored_formats(st) == ("bf16", update)
        for name in MOMENTS:
            assert torch.equal(st[name], saved["state"][i][name])
        if update == "kahan":
            assert torch.equal(st["kahan_comp"], torch.zeros_like(p))
        else:
            assert torch.equal(st["master_param"], p.detach().float())
    train(params, ours, 2)


def test_torch_optim_float32_checkpoint_into_int8():
    params = make_params(torch.float32)
    opt = torch.optim.Adam(params, lr=1e-2)
    train(params, opt, 3)
    saved = _save_load(opt.state_dict())
    ours = adamkit.Adam(params, state_format="int8", int8_min_size=0)
    ours.load_state_dict(saved)
    for i, p in enumerate(params):
        st = ours.state[p]
        codes, scale = fmt_state.encode(saved["state"][i]["exp_avg_sq"], fmt_state.UNSIGNED)
        assert torch.equal(st["exp_avg_sq"], codes) and torch.equal(st["exp_avg_sq_scale"], scale)


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["m fp64, v fp32", "m fp32, v bf16"])
def test_a_torch_optim_checkpoint_with_moments_of_two_dtypes_loads_as_torch_loads_it(dtypes):
    """torch.optim casts each moment to its param's dtype on load; adamkit read the state's
    format from exp_avg alone and refused exp_avg_sq as not of format 'fp64'."""
    params = make_params(torch.float32)
    opt = torch.optim.Adam(params, lr=1e-2)
    train(params, opt, 3)
    saved = _save_load(opt.state_dict())
    for st in saved["state"].values():
        st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].to(dtypes[0]), st["exp_avg_sq"].to(dtypes[1])
    twins = [p.detach().clone().requires_grad_() for p in params]
    theirs = torch.optim.Adam(twins, lr=1e-2)
    theirs.load_state_dict(copy.deepcopy(saved))
    ours = adamkit.Adam(params, lr=1e-2)
    ours.load_state_dict(copy.deepcopy(saved))
    for p, t in zip(params, twins):
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[p][name], theirs.state[t][name])
    train(params, ours, 2)
    train(twins, theirs, 2)
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("legacy_tags", [False, True], ids=["tensors-only", "legacy-tags"])
def test_adamkit_to_torch_optim_and_back(legacy_tags):
    """torch.optim's load_state_dict casts every state tensor but the step to a floating
    param's dtype (the tags too), and rebuilds every str of a state from a generator (an
    earlier version's str tags): the checkpoint it saves again is read as torch.optim's
    (by its moments' dtype)."""
    params = make_params(torch.float32)
    opt = adamkit.Adam(params, lr=1e-2)
    train(params, opt, 2)
    theirs = torch.optim.Adam(params, lr=1e-2)
    sd = opt.state_dict()
    if legacy_tags:
        sd = with_legacy_tags(sd, opt)
    theirs.load_state_dict(_save_load(sd))
    train(params, theirs, 2)
    saved = _save_load(theirs.state_dict())
    if legacy_tags:
        assert saved["state"][0]["state_format"].startswith("<generator object")  # torch's doing
    else:
        assert saved["state"][0]["state_format"].dtype == torch.float32  # torch's cast
    back = adamkit.Adam(params)
    back.load_state_dict(saved)
    st = back.state[params[0]]
    assert stored_formats(st) == ("fp32", "nearest") and st["state_format"].dtype == torch.int64
    assert torch.equal(st["exp_avg"], saved["state"][0]["exp_avg"]) and float(st["step"]) == 4


def _through_torch_optim(params, opt):
    """opt's state dict after two steps, loaded into torch.optim.Adam and saved by it."""
    train(params, opt, 2)
    theirs = torch.optim.Adam(params, lr=1e-2)
    theirs.load_state_dict(_save_load(opt.state_dict()))
    return _save_load(theirs.state_dict())


def test_int8_state_through_torch_optim_is_refused_and_changes_nothing():
    """torch.optim casts adamkit's int8 codes (uint8) and its tags to the param dtype when
    it loads them; read as torch.optim's state those codes would be taken for moments
    (values 0-255). Refused with a clear error, state untouched."""
    params = make_params(torch.float32)
    saved = _through_torch_optim(params, adamkit.Adam(params, lr=1e-2, state_format="int8",
                                                      int8_min_size=0))
    assert saved["state"][0]["exp_avg"].dtype == torch.float32  # torch's cast
    back = adamkit.Adam(params, lr=1e-2)
    train(params, back, 1)
    before = {k: v.clone() for k, v in back.state[params[0]].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="int8 codes that passed through torch.optim"):
        back.load_state_dict(saved)
    after = back.state[params[0]]
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("storage", STORAGE, ids=lambda s: s.id)
def test_torch_state_dict_continues_in_torch_optim(storage):
    """Every storage exports torch.optim's own state: the step, the moments as adamkit
    reads them (cast to the param dtype by torch's load), the hyperparameters under
    torch's keys; no tags, scales, seeds or buffers, and nothing shared with the
    optimizer. From fp32 storage torch's next step is adamkit's next step."""
    params = make_params(storage.dtype)
    opt = make_opt(params, storage, weight_decay=0.1, decouple_wd=True)
    train(params, opt, 3)
    snap = _snapshot(opt)
    exported = opt.torch_state_dict()
    _assert_unchanged(opt, snap)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.Adam(twins)
    theirs.load_state_dict(_save_load(exported))
    group = theirs.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["amsgrad"]) == (1e-2, 0.1, True)
    assert group["decoupled_weight_decay"] is True
    assert not set(exported["param_groups"][0]) & {*checkpoints.ADAMKIT_ONLY_KEYS, "max_lr"}
    for p, q in zip(params, twins):
        mine, loaded = opt.state[p], theirs.state[q]
        assert sorted(loaded) == sorted(["step", *MOMENTS])
        assert float(loaded["step"]) == float(mine["step"]) == 3
        for name in MOMENTS:
            assert torch.equal(loaded[name], read_moment(mine, name).to(p.dtype)), name
    for state in exported["state"].values():  # a copy: zeroing it leaves the optimizer be
        for value in state.values():
            value.zero_()
    _assert_unchanged(opt, snap)
    if (storage.dtype, storage.state_format) == (torch.float32, "fp32"):
        train(params, opt, 1, seed=7)
        train(twins, theirs, 1, seed=7)
        for p, q in zip(params, twins):
            assert_close_scaled(p, q, *TORCH_PARITY_TOL[torch.float32])


def _go_on_side_by_side(params, ours, twins, theirs):
    """Three more steps of both on the same grads: within float32 rounding of each other."""
    for _ in range(3):
        train(params, ours, 1, seed=7)
        train(twins, theirs, 1, seed=7)
    for p, q in zip(params, twins):
        assert_close_scaled(p, q, *TORCH_PARITY_TOL[torch.float32])


def _fully_decoupled(params, **kw):
    return adamkit.Adam([{"params": params[:1]},
                         {"params": params[1:], "decouple_lr": True, "max_lr": 2e-2, "weight_decay": 1e-2}],
                        lr=1e-2, **kw)


def test_torch_state_dict_continues_fully_decoupled_decay_as_torchs_adamw():
    """Fully decoupled λ_f is torch's AdamW with λ_f/max_lr (docs/adam.md): exported so,
    torch.optim continues such a group (the export refused it), and a plain state_dict()
    (whose λ_f torch.optim would read as AdamW's) is not needed."""
    params = make_params(torch.float32)
    opt = _fully_decoupled(params, backend="torch")
    train(params, opt, 2)
    snap = _snapshot(opt)
    exported = opt.torch_state_dict()
    _assert_unchanged(opt, snap)
    group = exported["param_groups"][1]
    assert group["weight_decay"] == 1e-2 / 2e-2 and group["decoupled_weight_decay"] is True
    assert exported["param_groups"][0]["weight_decay"] == 0
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.Adam([{"params": twins[:1]}, {"params": twins[1:]}], lr=1e-2)
    theirs.load_state_dict(_save_load(exported))
    _go_on_side_by_side(params, opt, twins, theirs)


def test_a_torch_adamw_checkpoint_loads_into_fully_decoupled_decay_as_the_same_decay():
    """torch.optim saves no decouple_lr: its AdamW λ, loaded into a decouple_lr group,
    stepped as a fully decoupled λ_f, max_lr times the decay (1% per step for 0.01; found
    by review). It loads as λ·max_lr, the same decay: the run goes on as torch.optim's."""
    params = make_params(torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1)
    train(twins, theirs, 2)
    for p, q in zip(params, twins):
        p.data.copy_(q.detach())
    ours = adamkit.Adam(params, lr=1e-2, weight_decay=1e-3, decouple_lr=True, max_lr=0.05, backend="torch")
    ours.load_state_dict(_save_load(theirs.state_dict()))
    assert ours.param_groups[0]["weight_decay"] == 0.1 * 0.05
    _go_on_side_by_side(params, ours, twins, theirs)


def test_a_coupled_torch_checkpoint_into_fully_decoupled_decay_raises_and_changes_nothing():
    """Coupled decay (L2 through the moments) has no fully decoupled equivalent."""
    params = make_params(torch.float32)
    theirs = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=1e-2, weight_decay=0.1)
    train(params, theirs, 1)
    ours = _fully_decoupled(params)
    train(params, ours, 1)
    snap = _snapshot(ours)
    with pytest.raises(ValueError, match="group 1: torch.optim's coupled weight decay .* no fully decoupled"):
        ours.load_state_dict(theirs.state_dict())
    _assert_unchanged(ours, snap)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_torch_state_dict_keeps_float64_moments(dtype):
    """torch_state_dict rounded float64 (and complex128) moments to float32 on the way to
    torch.optim, which keeps them as they are: every element differed."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, generator=gen, dtype=dtype))
    opt = adamkit.Adam([p], lr=1e-2)
    p.grad = torch.randn(50, generator=gen, dtype=dtype)
    opt.step()
    exported = opt.torch_state_dict()["state"][0]
    for name in ("exp_avg", "exp_avg_sq"):
        assert exported[name].dtype == dtype
        assert torch.equal(exported[name], opt.state[p][name])


@pytest.mark.parametrize("step", [np.int64(2), np.float32(2.0), np.array(2.0)], ids=["int64", "float32", "0-dim"])
def test_a_numpy_step_count_loads_as_torch_loads_it(step):
    """A step count saved as a NumPy number (a count converted from JAX or optax, say):
    torch.optim loads it, adamkit refused it as no whole number."""
    params = make_params(torch.bfloat16)
    opt = adamkit.Adam(params, lr=1e-2)
    train(params, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    for st in saved["state"].values():
        st["step"] = step
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = adamkit.Adam(resumed_params, lr=1e-2)
    resumed.load_state_dict(saved)
    assert all(float(resumed.state[p]["step"]) == 2 for p in resumed_params)
    train(resumed_params, resumed, 1, seed=7)
    train(params, opt, 1, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))


def test_a_stochastic_seed_rounded_by_torch_optim_is_replaced_with_a_warning():
    """torch.optim casts every state tensor but `step` to the param's dtype on load: a
    32-bit sr_seed through a bfloat16 param comes back rounded (3950080511 as
    3942645760), and the resumed run drew other bits without a word. Now the loading
    optimizer's own seed replaces it, with a warning."""
    params = make_params(torch.bfloat16)
    saved = _through_torch_optim(params, adamkit.Adam(params, lr=1e-2, param_update="stochastic", seed=7))
    assert saved["state"][0]["sr_seed"].dtype == torch.bfloat16  # torch's cast
    back = adamkit.Adam(params, lr=1e-2, param_update="stochastic", seed=11)
    with pytest.warns(UserWarning, match="sr_seed of floating dtype"):
        back.load_state_dict(saved)
    for index, p in enumerate(params):
        assert back.state[p]["sr_seed"].dtype == torch.int64
        assert int(back.state[p]["sr_seed"]) == policy.sr_seed(11, index)
