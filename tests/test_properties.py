"""Properties of the algorithm that hold whatever the implementation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import adamkit
from helpers import assert_close_scaled
from registry import ALL_BACKENDS


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@given(beta2=st.floats(0.5, 0.999), lr=st.floats(1e-4, 1e-1), eps=st.sampled_from([1e-8, 1e-4]),
       seed=st.integers(0, 1000))
def test_beta1_zero_is_rmsprop_with_bias_correction(backend, beta2, lr, eps, seed):
    """With β1=0, m = g and Adam is RMSprop on v̂ = v/(1−β2^t). torch.optim.RMSprop (no bias
    correction, θ −= lr·g/(√v + ε')) matches when at step t it gets lr' = lr·√(1−β2^t) and
    ε' = ε·√(1−β2^t), since √(v/b) + ε = (√v + ε√b)/√b."""
    gen = torch.Generator().manual_seed(seed)
    p_adam = torch.randn(7, generator=gen, dtype=torch.float64)
    p_rms = p_adam.clone()
    adam = adamkit.Adam([p_adam], lr=lr, betas=(0.0, beta2), eps=eps, backend=backend)
    rms = torch.optim.RMSprop([p_rms], lr=lr, alpha=beta2, eps=eps)
    for t in range(1, 11):
        g = torch.randn(7, generator=gen, dtype=torch.float64)
        p_adam.grad, p_rms.grad = g.clone(), g.clone()
        adam.step()
        root = math.sqrt(1 - beta2**t)
        rms.param_groups[0].update(lr=lr * root, eps=eps * root)
        rms.step()
    assert_close_scaled(p_adam, p_rms, 1e-12, 1e-15)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@given(seed=st.integers(0, 1000), amsgrad=st.booleans())
def test_adamw_with_zero_decay_is_adam(backend, seed, amsgrad):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 4, generator=gen)
    b = a.clone()
    oa = adamkit.AdamW([a], lr=1e-2, weight_decay=0.0, amsgrad=amsgrad, backend=backend)
    ob = adamkit.Adam([b], lr=1e-2, amsgrad=amsgrad, backend=backend)
    for _ in range(5):
        g = torch.randn(3, 4, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@given(lr=st.floats(1e-4, 1e-1), scale=st.floats(-6, 4), seed=st.integers(0, 1000))
def test_first_step_moves_by_lr_times_sign(backend, lr, scale, seed):
    """m̂₁ = g and v̂₁ = g², so the first step is lr·g/(|g| + ε) ≈ lr·sign(g), whatever the
    gradient's scale: the relative deviation from lr is ε/(|g| + ε) ≤ ε/min|g|."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(50, generator=gen, dtype=torch.float64)
    g = torch.randn(50, generator=gen, dtype=torch.float64) * 10**scale
    g = torch.where(g.abs() < 10**scale * 0.1, 10**scale * 0.1 * torch.sign(g + 1e-300), g)
    before = p.clone()
    p.grad = g
    adamkit.Adam([p], lr=lr, backend=backend).step()
    moved = before - p
    # `before - p` cancels: it is exact only to a few float64 ulps of |p|.
    atol = 8 * torch.finfo(torch.float64).eps * before.abs().max().item()
    torch.testing.assert_close(moved, lr * g / (g.abs() + 1e-8), rtol=1e-12, atol=atol)
    bound = 1e-8 / g.abs().min().item()
    torch.testing.assert_close(moved, lr * torch.sign(g), rtol=bound + 1e-12, atol=atol)


def test_decouple_lr_at_max_lr_is_adamw_with_rescaled_decay():
    """θ·(1 − (lr/max_lr)·λ) with lr = max_lr equals AdamW's θ·(1 − lr·λ') for λ' = λ/lr:
    checked against torch.optim.AdamW, an independent implementation."""
    torch.manual_seed(0)
    a = torch.randn(20, dtype=torch.float64)
    b = a.clone()
    lr, lam = 3e-3, 1e-4
    oa = adamkit.AdamW([a], lr=lr, weight_decay=lam, decouple_lr=True)  # max_lr defaults to lr
    ob = torch.optim.AdamW([b], lr=lr, weight_decay=lam / lr)
    assert oa.param_groups[0]["max_lr"] == lr
    for _ in range(20):
        g = torch.randn(20, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert_close_scaled(a, b, 1e-12, 1e-15)


def test_decouple_lr_decay_follows_schedule_not_lr_size():
    """Fully decoupled decay shrinks a zero-gradient param by (1 − (lr/max_lr)·λ) per step:
    halving lr halves the decay, but the decay does not depend on max_lr's size."""
    for max_lr in (1e-3, 1.0):
        p = torch.ones(3, dtype=torch.float64)
        opt = adamkit.Adam([p], lr=max_lr / 2, weight_decay=0.1, decouple_lr=True, max_lr=max_lr)
        p.grad = torch.zeros(3, dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(p, torch.full((3,), 1 - 0.5 * 0.1, dtype=torch.float64))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_converges_on_rosenbrock(backend):
    xy = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = adamkit.Adam([xy], lr=2e-2, backend=backend)
    for _ in range(3000):
        opt.zero_grad()
        x, y = xy
        loss = (1 - x) ** 2 + 100 * (y - x**2) ** 2
        loss.backward()
        opt.step()
    assert torch.allclose(xy.detach(), torch.ones(2, dtype=torch.float64), atol=1e-2), xy
