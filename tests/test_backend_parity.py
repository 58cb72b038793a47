"""Every backend equals the float64 reference on random shapes, dtypes and hyperparameters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adamkit.functional import adam_step
from helpers import assert_close_scaled
from registry import FAST_BACKENDS, REFERENCE_TOL, TORCH_PARITY_TOL

shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)
# float16 state cannot hold ε = 1e-8 (it rounds to 0, and torch then divides by zero
# where v underflows): with float16 state, ε must be ≥ 1e-4, float16's normal range.
EPS = {torch.float16: [1e-4, 1e-3]}
# Nor can it hold v below 6e-5 with any precision (subnormals): one subnormal ulp of v
# changes the update by tens of percent, so two correct roundings differ wildly. The
# default state for float16 params is float32 for that reason (docs/design/formats.md).
# For float16, gradients are therefore drawn element-wise with |g| ≥ 10^-0.5 and
# β2 ≤ 0.999, which keeps (1−β2)·g² ≥ 1e-4, in float16's normal range.
BETA2_MAX = {torch.float16: 0.999}
GRAD_LOG10_MIN = {torch.float16: -0.5}


def hyperparams(dtype):
    return st.fixed_dictionaries(
    {
        "lr": st.floats(1e-5, 1e-1),
        "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, BETA2_MAX.get(dtype, 0.9999))),
        "eps": st.sampled_from(EPS.get(dtype, [1e-8, 1e-6, 1e-3])),
        "weight_decay": st.sampled_from([0.0, 1e-4, 0.1]),
        "decouple_wd": st.booleans(),
        "decouple_lr": st.booleans(),
        "amsgrad": st.booleans(),
        "maximize": st.booleans(),
    }
    )


def _run(backend, dtype, shape_list, hp, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shape_list]
    grads_per_step = [[_grad(s, dtype, gen) for s in shape_list] for _ in range(steps)]
    state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    # The largest magnitude each moment had along the way: where β·m and (1−β)·g
    # cancel, the final moment is small but its rounding error is relative to them.
    peak = [[0.0 for _ in params] for _ in range(3)]
    for t in range(1, steps + 1):
        adam_step(params, grads_per_step[t - 1], *state, step=t, backend=backend, **hp)
        for k, tensors in enumerate(state):
            for i, s in enumerate(tensors):
                if s.numel():
                    peak[k][i] = max(peak[k][i], s.abs().max().item())
    return params, state, peak


def _grad(shape, dtype, gen):
    if dtype in GRAD_LOG10_MIN:
        magnitude = 10 ** torch.empty(shape).uniform_(GRAD_LOG10_MIN[dtype], 2, generator=gen)
        sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        return (sign * magnitude).to(dtype)
    return (torch.randn(shape, generator=gen) * 10 ** torch.empty(()).uniform_(-3, 2, generator=gen)).to(dtype)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", list(REFERENCE_TOL), ids=str)
@given(data=st.data(), shape_list=st.lists(shapes, min_size=1, max_size=4),
       steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_backend_matches_reference(backend, dtype, data, shape_list, steps, seed):
    """Run a few steps on both from the same start. Low-precision dtypes round state to
    storage after every step in both, so the comparison is within a few storage ulps
    per step."""
    hp = data.draw(hyperparams(dtype), label="hp")
    # The table gives the tolerance of one step. Each step rounds param and moments
    # afresh (the reference once, a fast path once per operation), so the bound on the
    # accumulated difference grows with the number of steps.
    rtol, atol = (steps * tol for tol in REFERENCE_TOL[dtype])
    fast_params, fast_state, _ = _run(backend, dtype, shape_list, hp, steps, seed)
    ref_params, ref_state, ref_peak = _run("reference", dtype, shape_list, hp, steps, seed)
    start, _, _ = _run(backend, dtype, shape_list, hp, 0, seed)
    for i, (a, b) in enumerate(zip(fast_params, ref_params)):
        # The operands were the start value, the end value and updates of size ~lr.
        scale = max(start[i].abs().max().item(), b.abs().max().item(), hp["lr"])
        assert_close_scaled(a, b, rtol, atol, f"param {i}", scale=scale)
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for name, fast, ref, peak in zip(names, fast_state, ref_state, ref_peak):
        if name == "max_exp_avg_sq" and not hp["amsgrad"]:
            continue
        for i, (a, b) in enumerate(zip(fast, ref)):
            assert_close_scaled(a, b, rtol, atol, f"{name} {i}", scale=peak[i])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_complex_params_match_reference(backend):
    """Complex params step as torch does: real and imaginary parts as separate coordinates."""
    _, fast = _complex_run(backend)
    _, ref = _complex_run("reference")
    assert_close_scaled(fast, ref, *REFERENCE_TOL[torch.float32])


def _complex_run(backend):
    import adamkit

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.complex64))
    opt = adamkit.Adam([p], lr=0.05, weight_decay=0.1, amsgrad=True, backend=backend)
    for _ in range(5):
        opt.zero_grad()
        (p * p.conj()).real.sum().backward()
        opt.step()
    return opt, p.detach().clone()


def test_complex_matches_torch():
    import adamkit

    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(4, dtype=torch.complex128))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = adamkit.Adam([p1], lr=0.1), torch.optim.Adam([p2], lr=0.1)
    for _ in range(10):
        for p, o in ((p1, o1), (p2, o2)):
            o.zero_grad()
            (p.abs() ** 3).sum().backward()
            o.step()
    assert_close_scaled(p1.detach(), p2.detach(), 1e-12, 0.0)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.1), dict(weight_decay=0.1, amsgrad=True, maximize=True),
                                    dict(weight_decay=0.1, decoupled_weight_decay=True)],
                         ids=["coupled decay", "coupled, amsgrad, maximize", "decoupled"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_complex_params_are_torchs_bits_on_cpu(dtype, kwargs, backend):
    """torch.optim.Adam's default step on CPU (its for-loop) adds coupled decay to a
    complex grad in complex arithmetic, which rounds otherwise than the same add on the
    real view (its foreach step): adamkit steps CPU complex params with torch's bits,
    mixed with a real param in the same group (which "auto" gives the cpu kernel: float32
    within its rounding, the kernel's documented tolerance, not bitwise)."""
    import adamkit

    gen = torch.Generator().manual_seed(0)
    z, x = torch.randn(64, dtype=dtype, generator=gen), torch.randn(64, dtype=dtype, generator=gen)
    real = torch.randn(16, dtype=torch.float64 if dtype == torch.complex128 else torch.float32, generator=gen)
    mine = [torch.nn.Parameter(z.clone()), torch.nn.Parameter(real.clone())]
    theirs = [torch.nn.Parameter(z.clone()), torch.nn.Parameter(real.clone())]
    opt = adamkit.Adam(mine, lr=0.01, backend=backend, **kwargs)
    ref = torch.optim.Adam(theirs, lr=0.01, **kwargs)
    for _ in range(4):
        for (p, q), o in ((mine, opt), (theirs, ref)):
            o.zero_grad()
            ((p * x).abs().pow(2).sum() + q.pow(2).sum()).backward()
            o.step()
    assert torch.equal(mine[0], theirs[0])
    if backend == "torch" or dtype == torch.complex128:  # float64 goes to the torch backend
        assert torch.equal(mine[1], theirs[1])
    else:
        assert_close_scaled(mine[1].detach(), theirs[1].detach(), *TORCH_PARITY_TOL[torch.float32])
