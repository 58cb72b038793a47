"""Steps past what a float32 step counter counts (2^24, as torch.optim's counter).

``state["step"]`` is a float32 tensor, as in torch.optim, so past 2^24 it stays at 2^24,
and torch.optim takes every step there at t = 2^24. adamkit took them at 2^24 + 1 (bias
corrections one step off torch's), its stochastic rounding key then repeated (every
element rounded the same way step after step: 90% of them never moved in 300 steps),
and the step cache re-planned every step because the counters no longer read t."""

from __future__ import annotations

import copy

import pytest
import torch

import adamkit
from adamkit import step_cache
from adamkit.formats import param as fmt_param

LIMIT = 2**24
N = 4096


def _stochastic_at(step, backend, n=N):
    """A bfloat16 param of ones stepped once, its counter then set to ``step`` and its
    moments to what grads of −1 keep them at (m = −1, v = 1): each update is then +lr,
    an eighth of the bfloat16 spacing at 1."""
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = adamkit.Adam([p], lr=2**-7 / 8, param_update="stochastic", backend=backend)
    p.grad = -torch.ones_like(p)
    opt.step()
    st = opt.state[p]
    st["step"].fill_(step)
    st["exp_avg"].fill_(-1)
    st["exp_avg_sq"].fill_(1)
    return p, opt


def _moves(p, opt, steps):
    """Which elements each step moved (a bool row per step)."""
    rows = []
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = -torch.ones_like(p)
        opt.step()
        rows.append(p.detach() != before)
    return torch.stack(rows)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_stochastic_rounding_draws_new_bits_past_the_counters_limit(backend):
    """Each step moves a random eighth of the elements: in 64 steps about (7/8)^64 = 2e-4
    of them never move, against 7/8 with a repeated key."""
    p, opt = _stochastic_at(LIMIT - 4, backend)
    moves = _moves(p, opt, 64)
    assert opt.state[p]["step"].item() == LIMIT  # where torch.optim's counter stops too
    never = (~moves.any(0)).float().mean().item()
    assert never < 0.01, never
    assert all(not torch.equal(moves[k], moves[k + 1]) for k in range(63))
    rate = moves.float().mean().item()  # each step moves an element with probability 1/8
    assert abs(rate - 1 / 8) < 0.01, rate


def test_past_the_limit_the_backends_give_the_same_bits_and_resume_exactly():
    """The seed's advance is state (in the checkpoint, on every backend): cpu and torch
    agree bit for bit, and a run resumed past the limit continues as the one that was not."""
    (p, opt), (q, other) = _stochastic_at(LIMIT - 2, "cpu"), _stochastic_at(LIMIT - 2, "torch")
    seed0 = opt.state[p]["sr_seed"].item()
    _moves(p, opt, 6)
    _moves(q, other, 6)
    assert torch.equal(p.detach(), q.detach())
    assert opt.state[p]["sr_seed"].item() == other.state[q]["sr_seed"].item() != seed0
    saved, p_saved = copy.deepcopy(opt.state_dict()), p.detach().clone()  # (as torch.save)
    _moves(p, opt, 6)
    r = torch.nn.Parameter(p_saved)
    resumed = adamkit.Adam([r], lr=2**-7 / 8, param_update="stochastic")
    resumed.load_state_dict(saved)
    _moves(r, resumed, 6)
    assert torch.equal(p.detach(), r.detach())


def test_the_seed_advances_only_where_the_counter_stopped():
    """Below the limit the key is formats.md's mix32(sr_seed ^ mix32(t)) with the seed
    unchanged; from the first step the counter cannot count, one stride per step."""
    p, opt = _stochastic_at(LIMIT - 3, "cpu", n=16)
    seed = opt.state[p]["sr_seed"].item()
    seeds = []
    for _ in range(5):
        _moves(p, opt, 1)
        seeds.append(opt.state[p]["sr_seed"].item())
    # steps 2^24 − 2, 2^24 − 1 and 2^24 are counted; 2^24 + 1 twice is not
    s = fmt_param.SEED_STRIDE
    assert seeds == [seed, seed, seed, (seed + s) % 2**32, (seed + 2 * s) % 2**32]


@pytest.mark.parametrize("dtype,kwargs", [(torch.float32, {}), (torch.bfloat16, {"param_update": "stochastic"}),
                                          (torch.bfloat16, {"state_format": "int8"})], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_the_step_cache_holds_past_the_counters_limit(monkeypatch, backend, dtype, kwargs):
    params = [torch.nn.Parameter(torch.randn(N).to(dtype)) for _ in range(3)]
    opt = adamkit.Adam(params, backend=backend, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        opt.state[p]["step"].fill_(LIMIT - 1)
    full = []
    planned = adamkit.Adam._planned_step
    monkeypatch.setattr(adamkit.Adam, "_planned_step", lambda o, *a: full.append(1) or planned(o, *a))
    for _ in range(6):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(full) == 1  # the step after the counters were edited
    assert isinstance(opt._step_cache, step_cache.StepCache)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "planned"])
def test_past_the_limit_bias_corrections_are_torchs(monkeypatch, cached):
    """torch.optim takes each step past 2^24 at t = 2^24 (its counter's reading); adamkit
    took t = 2^24 + 1: with β2 = 1 − 1e-7 every float64 element differed (by up to 1.5e-8)
    from torch.optim resumed from the same checkpoint."""
    if not cached:
        monkeypatch.setattr(step_cache.StepCache, "try_step", lambda *a: False)
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
    kw = dict(lr=1e-2, betas=(0.9, 1 - 1e-7))
    ref = torch.optim.Adam([theirs], **kw)
    theirs.grad = torch.randn_like(x)
    ref.step()
    ref.state[theirs]["step"].fill_(LIMIT - 2)
    with torch.no_grad():
        ours.copy_(theirs)
    opt = adamkit.Adam([ours], backend="torch", **kw)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for _ in range(4):
        g = torch.randn_like(x)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert torch.equal(ours.detach(), theirs.detach())
    assert opt.state[ours]["step"].item() == ref.state[theirs]["step"].item() == LIMIT


@pytest.mark.parametrize("saved, reads", [(LIMIT + 1, LIMIT), (float(LIMIT + 3), LIMIT + 4),
                                          (torch.tensor(LIMIT + 1, dtype=torch.float64), LIMIT)],
                         ids=["int", "float", "float64-tensor"])
def test_a_saved_count_the_float32_counter_cannot_hold_loads_rounded_as_it_counts(saved, reads):
    """A count the float32 counter cannot hold exactly (saved by a float64 counter, or
    written by hand) loads rounded to nearest, as the counter's own adding rounds (never
    ValueError); stepping on, it stays there, as torch.optim's float32 counter does past
    2^24 (its spacing there is 2, and t + 1 rounds back to t)."""
    p = torch.nn.Parameter(torch.randn(8))
    opt = adamkit.Adam([p])
    p.grad = torch.randn(8)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = saved
    opt.load_state_dict(sd)
    assert opt.state[p]["step"].dtype == torch.float32
    assert float(opt.state[p]["step"]) == reads
    opt.step()
    assert float(opt.state[p]["step"]) == reads
