"""Param groups edited between steps: the two weight-decay keys (adamkit's and torch's),
values no step can take and a moment cast to another dtype (raised before any update),
and values used as given, as torch.optim does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adamkit
from helpers import assert_close_scaled, assert_unchanged, snapshot
from registry import ALL_BACKENDS, TORCH_PARITY_TOL

# every test twice: the step cache's checks in Python and in C++ (conftest.checks_mode)
pytestmark = pytest.mark.usefixtures("checks_mode")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("make,group_value", [(adamkit.Adam, True), (adamkit.AdamW, False),
                                              (adamkit.AdamW, None)],
                         ids=["Adam-group-decoupled", "AdamW-group-coupled", "AdamW-group-None"])
def test_a_groups_decoupled_weight_decay_key_is_honoured(backend, make, group_value):
    """torch's per-group `decoupled_weight_decay` sets that group's decay mode, as in
    torch.optim (it was ignored: the other mode's math ran). None is falsy there, so
    coupled (adamkit took it for "not given" and decoupled AdamW's group)."""
    def run(factory):
        p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        opt = factory([{"params": [p]}, {"params": [q], "decoupled_weight_decay": group_value}])
        for _ in range(3):
            p.grad, q.grad = torch.full((3,), 0.1), torch.full((3,), 0.1)
            opt.step()
        return torch.cat([p.detach(), q.detach()]), opt
    torch_cls = torch.optim.Adam if make is adamkit.Adam else torch.optim.AdamW
    theirs, _ = run(lambda groups: torch_cls(groups, lr=0.1, weight_decay=0.5))
    ours, opt = run(lambda groups: make(groups, lr=0.1, weight_decay=0.5, backend=backend))
    assert_close_scaled(ours, theirs, *TORCH_PARITY_TOL[torch.float32])
    assert opt.state_dict()["param_groups"][1]["decoupled_weight_decay"] is bool(group_value)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("key", ["decoupled_weight_decay", "decouple_wd"])
@pytest.mark.parametrize("at_step", [0, 2], ids=["before-the-first-step", "between-steps"])
def test_either_decay_key_set_on_a_live_group_switches_the_mode(backend, key, at_step):
    """`group[key] = True` on a live group, with torch's key (as code written for
    torch.optim.Adam does) or adamkit's: the next steps decay as AdamW, and the two keys
    agree again after the step. (torch's key was missing from live groups, a KeyError for
    code reading it; set, it was ignored, and state_dict overwrote it with decouple_wd.)"""
    def run(make, name):
        p = torch.nn.Parameter(torch.ones(3))
        opt = make([p])
        for k in range(4):
            if k == at_step:
                opt.param_groups[0][name] = True
            p.grad = torch.full((3,), 0.1)
            opt.step()
        return p.detach(), opt
    theirs, _ = run(lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.5), "decoupled_weight_decay")
    ours, opt = run(lambda ps: adamkit.Adam(ps, lr=0.1, weight_decay=0.5, backend=backend), key)
    assert_close_scaled(ours, theirs, *TORCH_PARITY_TOL[torch.float32])
    group = opt.param_groups[0]
    assert group["decouple_wd"] is True and group["decoupled_weight_decay"] is True
    assert opt.state_dict()["param_groups"][0]["decoupled_weight_decay"] is True


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torchs_decay_key_set_to_none_on_a_live_group_makes_decay_coupled(backend):
    """As torch.optim reads it (None is falsy); adamkit kept the group decoupled."""
    def run(make):
        p = torch.nn.Parameter(torch.ones(3))
        opt = make([p])
        for k in range(4):
            if k == 1:
                opt.param_groups[0]["decoupled_weight_decay"] = None
            p.grad = torch.full((3,), 0.1)
            opt.step()
        return p.detach(), opt
    theirs, _ = run(lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5))
    ours, opt = run(lambda ps: adamkit.AdamW(ps, lr=0.1, weight_decay=0.5, backend=backend))
    assert_close_scaled(ours, theirs, *TORCH_PARITY_TOL[torch.float32])
    assert opt.param_groups[0]["decouple_wd"] is False


@pytest.mark.parametrize("make, mode", [(adamkit.Adam, False), (adamkit.AdamW, True)])
def test_live_groups_hold_torchs_decay_key(make, mode):
    """Code written for torch.optim reads group["decoupled_weight_decay"]: present from
    construction, from add_param_group and after a load, equal to decouple_wd."""
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = make([p])
    opt.add_param_group({"params": [q]})
    assert [g["decoupled_weight_decay"] for g in opt.param_groups] == [mode, mode]
    theirs = torch.optim.Adam([{"params": [p]}, {"params": [q]}])  # torch's key says False
    opt.load_state_dict(theirs.state_dict())
    assert [(g["decouple_wd"], g["decoupled_weight_decay"]) for g in opt.param_groups] == [(mode, mode)] * 2


@pytest.mark.parametrize("key", ["decoupled_weight_decay", "decouple_wd"])
def test_a_decay_key_set_after_a_load_is_honoured(key):
    """The mode both keys held is recorded at load too: otherwise a change to decouple_wd
    after load_state_dict lost to torch's unchanged key."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p], lr=0.1, weight_decay=0.5)
    opt.load_state_dict(adamkit.Adam([p], lr=0.1, weight_decay=0.5).state_dict())
    opt.param_groups[0][key] = True
    p.grad = torch.full((3,), 0.1)
    opt.step()
    ref = torch.nn.Parameter(torch.ones(3))
    theirs = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.5)
    ref.grad = torch.full((3,), 0.1)
    theirs.step()
    assert_close_scaled(p.detach(), ref.detach(), *TORCH_PARITY_TOL[torch.float32])
    assert opt.param_groups[0]["decouple_wd"] is opt.param_groups[0]["decoupled_weight_decay"] is True


def _two_groups_after_cached_steps(make=adamkit.AdamW, **kw):
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = make([{"params": [p]}, {"params": [q]}], lr=1e-2, weight_decay=1e-4, **kw)
    for _ in range(3):
        p.grad, q.grad = torch.ones(3), torch.ones(3)
        opt.step()
    return opt, p, q


# (key, value, the exception, its message, whether torch.optim's step raises that type too)
_UNSTEPPABLE_EDITS = [
    ("decouple_lr", True, ValueError, "max_lr", False),  # not a torch.optim key
    ("betas", (0.9,), ValueError, "betas must be a pair", True),  # torch: not enough values to unpack
    ("betas", 0.9, TypeError, "betas must be a pair", True),  # torch: cannot unpack non-iterable
    ("betas", (0.9, 1.5), ValueError, "Invalid beta parameter at index 1", False),  # √(1 − β2^t) complex
    ("betas", (0.9, -0.5), ValueError, "Invalid beta parameter at index 1", False),  # v < 0: NaN, int8 parted
    ("betas", (0.9, None), TypeError, r"Invalid betas\[1\]", True),
    ("lr", "0.1", TypeError, "Invalid lr", True),
    ("lr", None, TypeError, "Invalid lr", True),
    ("eps", None, TypeError, "Invalid eps", True),
    ("weight_decay", "0", TypeError, "Invalid weight_decay", True),
    ("lr", torch.tensor([1.0, 2.0]), ValueError, "Tensor lr must be 1-element", False),
    # torch's ops raise RuntimeError on these (shapes that do not broadcast, a complex
    # value cast to float): adamkit said TypeError
    ("eps", torch.tensor([1e-8, 1e-8]), RuntimeError, "Invalid eps", True),
    ("weight_decay", torch.tensor([0.1, 0.1]), RuntimeError, "Invalid weight_decay", True),
    ("lr", 1e-3 + 1j, RuntimeError, "Invalid lr", True),
    ("lr", torch.tensor(1e-3 + 1j), RuntimeError, "Invalid lr", False),
    ("lr", 3e38, RuntimeError, "value cannot be converted to type float without overflow", False),
    # beyond float32 below 0 too (the check took x > max, not |x|: the kernel wrote inf)
    ("lr", -3e38, RuntimeError, "value cannot be converted to type float without overflow", False),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("key, value, error, message, torch_too", _UNSTEPPABLE_EDITS)
def test_a_group_edited_into_one_no_step_can_take_raises_before_any_update(
        backend, key, value, error, message, torch_too):
    """A hyperparameter edited by hand after cached steps into a value the step cannot
    take: it fails before the first group's params move (decouple_lr without max_lr
    raised mid-step, with one group updated; lr=3e38, whose lr/(1 − β1^4) torch's step
    cannot pass to float32, wrote -inf on the cpu backend and raised midway on torch's;
    β2 = 1.5, whose 1 − β2^t has a complex square root, raised midway on cpu and torch
    and stepped on to other numbers on the reference). A value that is not a number is
    torch's TypeError (it was a ValueError)."""
    opt, p, q = _two_groups_after_cached_steps(backend=backend)
    opt.param_groups[1][key] = value
    snap = snapshot(opt, [p, q])
    with pytest.raises(error, match=message):
        opt.step()
    assert_unchanged(opt, [p, q], snap)


@pytest.mark.parametrize("key, value, error", [(k, v, e) for k, v, e, _, torch_too in _UNSTEPPABLE_EDITS if torch_too])
def test_torch_optim_raises_the_same_type_for_those_edits(key, value, error):
    """The other half of the table above: torch.optim.AdamW's step raises the same
    exception type for the edits marked as torch's (a drop-in's except clauses stay right)."""
    theirs, _, _ = _two_groups_after_cached_steps(make=torch.optim.AdamW)
    theirs.param_groups[1][key] = value
    with pytest.raises(error):
        theirs.step()


@pytest.mark.parametrize("make, backend", [(torch.optim.AdamW, None)] + [(adamkit.AdamW, b) for b in ALL_BACKENDS],
                         ids=["torch.optim"] + [f"adamkit-{b}" for b in ALL_BACKENDS])
def test_a_live_moment_cast_to_another_dtype_raises_torchs_runtime_error(make, backend):
    """torch.optim's step raises RuntimeError on a moment cast to float64 between steps;
    adamkit raises UnreadableStateError, which is that and a ValueError (what it raised
    before, and what an unloadable checkpoint raises), before anything changes."""
    kw = {} if make is torch.optim.AdamW else {"backend": backend}
    opt, p, q = _two_groups_after_cached_steps(make=make, **kw)
    opt.state[q]["exp_avg"] = opt.state[q]["exp_avg"].double()
    snap = snapshot(opt, [p, q])
    with pytest.raises(RuntimeError) as caught:
        opt.step()
    if make is adamkit.AdamW:
        assert isinstance(caught.value, adamkit.UnreadableStateError)
        assert isinstance(caught.value, ValueError)
        assert "cannot be read: exp_avg has dtype torch.float64" in str(caught.value)
        assert_unchanged(opt, [p, q], snap)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("key, value", [
    ("eps", -1e-3), ("lr", -1e-2), ("betas", (0.95, torch.tensor(0.99))), ("weight_decay", -0.5),
    ("lr", np.array(2e-2)), ("betas", torch.tensor([0.8, 0.99])),
], ids=["eps", "lr", "mixed-betas", "weight_decay", "lr-0dim-array", "betas-tensor"])
def test_values_set_on_a_live_group_are_used_as_given_as_torch_does(backend, key, value):
    """torch.optim checks hyperparameter ranges only for the groups it is given; values
    set later (schedulers, by hand) are stepped with. adamkit refused them at the step
    (a LinearLR decay to 0 ends on lr ≈ -2e-21). Now both step alike, and the edit
    changed the numbers (against a twin that kept the old value)."""
    mine, p, q = _two_groups_after_cached_steps(backend=backend)
    theirs, p2, q2 = _two_groups_after_cached_steps(make=torch.optim.AdamW)
    kept, p3, q3 = _two_groups_after_cached_steps(backend=backend)
    for opt in (mine, theirs):
        opt.param_groups[1][key] = value
    for _ in range(2):
        for x in (p, q, p2, q2, p3, q3):
            x.grad = torch.full((3,), 0.5)
        for opt in (mine, theirs, kept):
            opt.step()
    assert not torch.equal(q.detach(), q3.detach())
    for a, b in ((p, p2), (q, q2)):
        assert_close_scaled(a.detach(), b.detach(), *TORCH_PARITY_TOL[torch.float32])


@pytest.mark.parametrize("betas", [torch.tensor([0.8, 0.99]), np.array([0.8, 0.99])],
                         ids=["tensor", "array"])
def test_a_groups_betas_may_be_a_two_element_tensor_or_array(betas):
    """torch.optim takes a group's betas as any pair it can index; the live check asked
    for a tuple or list and refused them, calling them not a pair."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([{"params": [p], "betas": betas}])
    twin = torch.nn.Parameter(torch.ones(3))
    theirs = torch.optim.Adam([{"params": [twin], "betas": (0.8, 0.99)}])
    for x in (p, twin):
        x.grad = torch.full((3,), 0.5)
    opt.step()
    theirs.step()
    assert_close_scaled(p.detach(), twin.detach(), *TORCH_PARITY_TOL[torch.float32])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("how", ["constructor", "add_param_group"])
@pytest.mark.parametrize("betas", [(0, 0.99), (torch.tensor(0.9), 0.99), (np.float32(0.9), np.float32(0.99))],
                         ids=["int", "tensor-and-float", "numpy-float32"])
def test_a_groups_betas_of_any_kind_step_as_torch_does(backend, how, betas):
    """torch checks "both floats or both Tensors" on the constructor's betas only: a group
    dict's int, mixed or NumPy betas step there, and adamkit refused them (found by
    review). The torch backend steps them bit for bit (NumPy float32's β^t in float32,
    as torch's for-loop computes it), the cpu kernel within float32 rounding."""
    def run(make):
        gen = torch.Generator().manual_seed(0)
        p, q = (torch.nn.Parameter(torch.randn(40, generator=gen)) for _ in range(2))
        group = {"params": [q], "betas": betas}
        opt = make([{"params": [p]}, group] if how == "constructor" else [p])
        if how == "add_param_group":
            opt.add_param_group(group)
        for _ in range(4):
            p.grad, q.grad = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
            opt.step()
        return q.detach()
    theirs = run(lambda groups: torch.optim.Adam(groups, lr=0.01, foreach=False))
    ours = run(lambda groups: adamkit.Adam(groups, lr=0.01, backend=backend))
    if backend == "torch":
        assert torch.equal(ours, theirs)
    else:
        assert_close_scaled(ours, theirs, *TORCH_PARITY_TOL[torch.float32])


@pytest.mark.parametrize("make, torch_cls", [(adamkit.Adam, torch.optim.Adam), (adamkit.AdamW, torch.optim.AdamW)])
@pytest.mark.parametrize("key", ["decoupled_weight_decay", "decouple_wd"])
@pytest.mark.parametrize("value", [True, False])
def test_the_defaults_decay_mode_set_under_either_key_reaches_groups_added_later(make, torch_cls, key, value):
    """Code written for torch.optim sets ``opt.defaults["decoupled_weight_decay"]`` for the
    groups it adds later; adamkit read only its own key there, and the new group took
    the other mode (found by review). The key set wins, both keys end equal."""
    def added_group(cls):
        opt = cls([torch.nn.Parameter(torch.randn(3))], weight_decay=0.1)
        opt.defaults[key if cls is make else "decoupled_weight_decay"] = value
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
        return opt.param_groups[1]
    ours, theirs = added_group(make), added_group(torch_cls)
    assert ours["decoupled_weight_decay"] is ours["decouple_wd"] is theirs["decoupled_weight_decay"] is value


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_group_appended_to_param_groups_with_torchs_keys_steps_as_torch_does(backend):
    """``opt.param_groups.append({**torch_defaults, "params": [q]})`` bypasses
    add_param_group: torch steps it, adamkit raised KeyError 'decouple_lr' (found by
    review). Its missing keys take the optimizer's defaults, its decay mode torch's key."""
    def run(make, **kw):
        p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        opt = make([p], **kw)
        torch_defaults = torch.optim.Adam([torch.nn.Parameter(torch.ones(1))], lr=0.1, weight_decay=0.1,
                                          decoupled_weight_decay=True).defaults
        opt.param_groups.append({**torch_defaults, "params": [q]})
        for _ in range(2):
            p.grad, q.grad = torch.full((3,), 0.5), torch.full((3,), -0.25)
            opt.step()
        return torch.cat([p.detach(), q.detach()]), opt
    theirs, _ = run(torch.optim.Adam)
    ours, opt = run(adamkit.Adam, backend=backend)
    assert_close_scaled(ours, theirs, *TORCH_PARITY_TOL[torch.float32])
    assert opt.param_groups[1]["decouple_wd"] is True and opt.param_groups[1]["backend"] == backend


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_live_group_that_lost_both_decay_keys_keeps_its_mode(backend):
    """Both keys deleted from a live AdamW group (code that strips a group's keys): the
    mode it was last synced with stays, and both keys come back (a mutant that fell back
    to coupled decay there passed every test)."""
    def run(drop):
        p = torch.nn.Parameter(torch.ones(4))
        opt = adamkit.AdamW([p], lr=0.1, weight_decay=0.5, backend=backend)
        for t in range(3):
            p.grad = torch.full((4,), 0.1)
            if drop and t == 1:
                del opt.param_groups[0]["decouple_wd"], opt.param_groups[0]["decoupled_weight_decay"]
            opt.step()
        return p.detach().clone(), opt.param_groups[0]
    (kept, _), (dropped, group) = run(False), run(True)
    assert torch.equal(kept, dropped)
    assert group["decouple_wd"] is True and group["decoupled_weight_decay"] is True


@pytest.mark.parametrize("make", [torch.optim.Adam, adamkit.Adam], ids=["torch.optim", "adamkit"])
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("key", ["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"])
def test_a_hyperparameter_deleted_from_a_live_group_is_torchs_key_error_at_every_step(make, cached, key):
    """torch.optim's step reads each hyperparameter from the group, and raises KeyError
    for one deleted there, at every step. adamkit raised it once from a cached plan, then
    stepped with the defaults' value (lr 0.1 for the group's 0.01), and never raised
    for amsgrad."""
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = make([{"params": [p], "lr": 0.01}, {"params": [q]}], lr=0.1)
    for _ in range(2 if cached else 0):
        p.grad, q.grad = torch.full((3,), 0.1), torch.full((3,), 0.1)
        opt.step()
    del opt.param_groups[1][key]
    p.grad, q.grad = torch.full((3,), 0.1), torch.full((3,), 0.1)
    snap = snapshot(opt, [p, q])
    for _ in range(2):
        with pytest.raises(KeyError, match=key):
            opt.step()
        if make is adamkit.Adam:  # (torch's first group has stepped)
            assert_unchanged(opt, [p, q], snap)
