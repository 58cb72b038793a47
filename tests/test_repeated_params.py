"""A param listed more than once (twice in one group, or in two groups): updated once per
listing, in turn, as torch.optim's for-loop step, and checked whole before the first
listing steps."""

from __future__ import annotations

import pytest
import torch

import adamkit
from helpers import assert_close_scaled, assert_unchanged, snapshot
from registry import ALL_BACKENDS, TORCH_PARITY_TOL

# every test twice: the step cache's checks in Python and in C++ (conftest.checks_mode)
pytestmark = pytest.mark.usefixtures("checks_mode")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("make,torch_cls", [(adamkit.Adam, torch.optim.Adam), (adamkit.AdamW, torch.optim.AdamW)])
def test_a_param_listed_twice_is_updated_once_per_listing_as_torchs_for_loop(backend, make, torch_cls):
    """torch.optim's default CPU step updates a param listed twice in a group twice, one
    full update after the other (its foreach and fused steps each give other numbers);
    every adamkit backend did something of its own (the reference a third answer)."""
    def run(factory):
        torch.manual_seed(0)
        p, q = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(7))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = factory([{"params": [p, q, p]}, {"params": [], "lr": 0.1}], lr=0.01, weight_decay=0.1,
                          amsgrad=True)
        for t in range(3):
            p.grad, q.grad = torch.sin(p.detach() * (t + 1)), torch.cos(q.detach())
            opt.step()
        return p.detach(), q.detach(), opt.state[p]["step"]
    ours = run(lambda *a, **k: make(*a, backend=backend, **k))
    theirs = run(lambda *a, **k: torch_cls(*a, foreach=False, **k))
    assert ours[2] == theirs[2] == 6
    again = run(lambda *a, **k: make(*a, backend=backend, **k))  # one listing at a time: no race
    assert all(torch.equal(x, y) for x, y in zip(ours, again))
    rtol, atol = (0.0, 0.0) if backend == "torch" else TORCH_PARITY_TOL[torch.float32]
    for x, y in zip(ours[:2], theirs[:2]):
        assert_close_scaled(x, y, rtol, atol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("late", [False, True], ids=["from-the-start", "after-3-steps"])
def test_a_param_in_two_groups_is_updated_by_each_in_turn_as_torchs_for_loop(backend, late):
    """A param put into a second group by an edit of param_groups (add_param_group refuses
    it): torch.optim's step updates it once per group, in group order, with one state.
    adamkit planned both groups from the state before either stored one: the second
    group's fresh state replaced the first's (step 3 where torch has 6, other numbers),
    and the replaced one lived on in the step cache's bucket; with state already there,
    both updates ran at one step count (2.6e-3 apart from torch's)."""
    def run(factory):
        torch.manual_seed(0)
        p, q = torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(7))
        opt = factory([{"params": [p]}, {"params": [q], "lr": 0.05, "weight_decay": 0.1}], lr=0.01)
        gen = torch.Generator().manual_seed(1)
        for t in range(6):
            if t == (3 if late else 0):
                opt.param_groups[1]["params"].append(p)
            p.grad, q.grad = torch.randn(300, generator=gen), torch.randn(7, generator=gen)
            opt.step()
        return p.detach(), q.detach(), opt.state[p]["exp_avg_sq"], opt.state[p]["step"]
    ours = run(lambda *a, **k: adamkit.Adam(*a, backend=backend, **k))
    theirs = run(lambda *a, **k: torch.optim.Adam(*a, foreach=False, **k))
    assert ours[3] == theirs[3] == (9 if late else 12)
    rtol, atol = (0.0, 0.0) if backend == "torch" else TORCH_PARITY_TOL[torch.float32]
    for x, y in zip(ours[:3], theirs[:3]):
        assert_close_scaled(x, y, rtol, atol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("edit", [{"lr": 1e39}, {"weight_decay": 1e39}], ids=["lr", "weight_decay"])
@pytest.mark.parametrize("late", [False, True], ids=["first-step", "after-2-steps"])
def test_a_later_listing_that_cannot_step_raises_before_the_first_listing_steps(backend, edit, late):
    """A param in two groups steps once per group, in turn: the second group's step
    raised for a scalar float32 cannot hold after the first had moved every param of the
    step (torch.optim's for-loop does so too)."""
    x, y = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(8))
    opt = adamkit.Adam([{"params": [y, x]}, {"params": [torch.nn.Parameter(torch.ones(1))]}],
                       lr=0.1, backend=backend)
    opt.param_groups[1]["params"] = [x]
    for t in range(4 if late else 2):
        if t == (2 if late else 0):
            opt.param_groups[1].update(edit)
        x.grad, y.grad = torch.randn_like(x), torch.randn_like(y)
        if t < 2 and late:
            opt.step()
            continue
        snap = snapshot(opt, [x, y])
        with pytest.raises(RuntimeError, match="cannot be converted to type float without overflow"):
            opt.step()
        assert_unchanged(opt, [x, y], snap)
        assert [float(opt.state[q]["step"]) for q in (x, y) if q in opt.state] == ([4, 2] if late else [])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_the_later_listing_is_checked_at_the_step_count_it_will_reach(backend):
    """A param in two groups: the second group steps it at t + 1 of the first's t. With
    β1 = −0.9, lr/(1 − β1^t) is 5.3e38 at t = 2 (beyond float32) but 5.3e37 at t = 1:
    checked at t = 1, the first group moved the param, then the second raised."""
    x = torch.nn.Parameter(torch.randn(64))
    opt = adamkit.Adam([{"params": [x]}, {"params": [torch.nn.Parameter(torch.ones(1))]}],
                       lr=0.1, backend=backend)
    opt.param_groups[1]["params"] = [x]
    opt.param_groups[1].update(lr=1e38, betas=(-0.9, 0.999))
    x.grad = torch.randn(64)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="cannot be converted to type float without overflow"):
        opt.step()
    assert torch.equal(x.detach(), before) and not opt.state


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_param_in_two_groups_with_a_counter_set_by_hand_raises_torchs_error_first(backend):
    """The later listings' check reads the counter: one that is no Tensor raises torch's
    RuntimeError there (not an AttributeError), before anything moved, as torch does."""
    x = torch.nn.Parameter(torch.randn(4))
    opt = adamkit.Adam([{"params": [x]}, {"params": [torch.nn.Parameter(torch.ones(1))]}],
                       lr=0.1, backend=backend)
    opt.param_groups[1]["params"] = [x]
    x.grad = torch.randn(4)
    opt.step()
    opt.state[x]["step"] = 3
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="state_steps"):
        opt.step()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
def test_a_param_listed_three_times_is_updated_three_times_in_torchs_order(backend):
    """Each listing after the first is numbered by the listings before it; the tests
    listed a param twice at most, where a count that stops at 1 still passes (a mutant
    gave 0.0553 for [p, p, p] where torch gives 0.1000)."""
    def run(make):
        p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
        opt = make([{"params": [p, p, q, p]}])
        for _ in range(2):
            p.grad, q.grad = torch.full((3,), 0.5), torch.full((3,), -0.25)
            opt.step()
        return torch.cat([p.detach(), q.detach()]), opt.state[p]["step"]
    (theirs, their_step), (ours, our_step) = (run(lambda g: torch.optim.Adam(g, lr=0.1, foreach=False)),
                                              run(lambda g: adamkit.Adam(g, lr=0.1, backend=backend)))
    assert_close_scaled(ours, theirs, *TORCH_PARITY_TOL[torch.float32])
    assert float(our_step) == float(their_step) == 6
