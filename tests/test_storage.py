"""Every storage combination (registry.STORAGE: param dtype × state format × param update)
on every backend: the CPU kernel equals the torch backend bit for bit, and both equal
the float64 reference within the rounding of the storage (docs/design/formats.md)."""

from __future__ import annotations

import pytest
import torch

import adamkit
from adamkit.backends import cpu
from adamkit.backends.cpu import library
from adamkit.formats import param as policy
from adamkit.formats import state as fmt_state
from adamkit.formats import stored_formats
from helpers import assert_close_scaled
from adamkit.reference import adam_step
from registry import (EFFECTIVE_PARAM_TOL, FAST_BACKENDS, FP32_MOMENT_RTOL, NEAR_TIE_RTOL,
                      STORAGE, STORAGE_VARIANTS)

needs_cpu = pytest.mark.skipif(cpu.BACKEND.unavailable_reason() is not None, reason="no CPU kernels")
# Sizes: two CPU-kernel chunks (16384) and a partial one, partial int8 blocks, a 0-dim.
SHAPES = [(2 * 16384 + 300,), (7, 45), ()]


def _grad(shape, dtype, gen):
    """Gradients spanning 1e-4..10 within each block, so codes use the whole map."""
    g = torch.randn(shape, generator=gen) * 10 ** torch.empty(shape).uniform_(-4, 1, generator=gen)
    return g.to(dtype)


def _make(storage, backend, variant, seed=0, **overrides):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(storage.dtype)) for s in SHAPES]
    opt = adamkit.Adam(params, lr=1e-2, backend=backend, seed=7, **storage.kwargs(),
                       **{**STORAGE_VARIANTS[variant], **overrides})
    return params, opt


def _tensors(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


@needs_cpu
@pytest.mark.parametrize("variant", list(STORAGE_VARIANTS))
@pytest.mark.parametrize("storage", [s for s in STORAGE if s.id != "float32-fp32-nearest"],
                         ids=lambda s: s.id)
def test_cpu_kernel_equals_torch_backend_bitwise(storage, variant):
    """formats.md pins every float32 operation, so the fused kernel and the torch ops agree
    to the bit: params, moments (int8 codes and scales), kahan/master buffers, for 5 steps.
    (float32 params with fp32 state: the torch backend is torch.optim's op sequence
    instead, compared within rounding in test_parity_torch.py.)"""
    runs = []
    for backend in ("cpu", "torch"):
        params, opt = _make(storage, backend, variant)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = _grad(p.shape, storage.dtype, gen)
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a, b), f"param {i}: {(a != b).sum()} elements differ"
        sa, sb = _tensors(oa, a), _tensors(ob, b)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"param {i} {key}: {(sa[key] != sb[key]).sum()} differ"
        assert stored_formats(oa.state[a])[0] == storage.state_format
        assert stored_formats(oa.state[a])[1] == storage.param_update


def test_late_steps_variant_hands_the_kernel_bc2_sqrt_one_from_step_4():
    """The kernel drops ÷√bc2 where the float32 it receives is exactly 1 (common.h,
    BC2_ONE); the "late-steps" variant's 5 steps take both paths: 1-3 divide, 4-5 do not."""
    from adamkit.hyperparams import step_scalars

    opt = adamkit.Adam([torch.zeros(1)], **STORAGE_VARIANTS["late-steps"])
    group = opt.param_groups[0]
    as_passed = [library.Hyper(bc2_sqrt=step_scalars(group, t).bias_correction2_sqrt).bc2_sqrt
                 for t in range(1, 6)]
    assert [x == 1.0 for x in as_passed] == [False, False, False, True, True]


# The step (index from 0) at which the NaN tests inject non-finite values: for "late-steps"
# the first step without ÷√bc2, so that they enter the kernel on that path.
# The step whose grads get NaN/inf; with AMSGRAD after a step, so that the max of a NaN v
# and an old finite max is taken (the kernel kept the old max, torch.maximum gives NaN).
INJECT_AT = {"plain": 1, "late-steps": 3, "l2-amsgrad-max": 2}


@needs_cpu
@pytest.mark.parametrize("case", ["finite", "nonfinite", "amsgrad-max-binds"])
def test_every_isa_build_gives_the_same_bits(monkeypatch, case):
    """Built with -ffp-contract=off, the generic, AVX2 and AVX-512 kernels round alike
    (GCC otherwise fuses a·b + c into an FMA where the target has one). With NaN/inf
    grads in int8 blocks too: the builds differ there in how a block is walked (16 lanes
    or one element at a time), and must still agree (formats.md leaves only the torch
    backend free there). With β2 = 0.999, v stored in bf16 never falls within three steps
    (0.1% a step, under half its resolution), so AMSGRAD's max never chose the old one;
    "amsgrad-max-binds" takes β2 = 0.5 and grads 10× smaller each step, so it does."""
    nonfinite = case == "nonfinite"
    overrides = {"betas": (0.9, 0.5)} if case == "amsgrad-max-binds" else {}
    libs = []
    for isa in library.isa_candidates():
        path = library._installed_path(isa)
        if path is not None and path.exists():
            libs.append((isa, library._open(path)))
    if len(libs) < 2:
        pytest.skip("fewer than two instruction-set builds installed and runnable here")
    results = {}
    storages = [s for s in STORAGE if not nonfinite or s.state_format == "int8"]
    for storage in storages:
        for isa, lib in libs:
            monkeypatch.setattr(cpu, "_library", lambda lib=lib, isa=isa: (lib, isa, None))
            params, opt = _make(storage, "cpu", "plain" if nonfinite else "l2-amsgrad-max", **overrides)
            gen = torch.Generator().manual_seed(1)
            for step in range(3):
                for p in params:
                    p.grad = _grad(p.shape, storage.dtype, gen)
                    if overrides:
                        p.grad = (p.grad.float() * 10.0 ** -step).to(storage.dtype)
                    if nonfinite and step == 1 and p.numel() > 1000:
                        p.grad.view(-1)[[5, 300, 700]] = torch.tensor(
                            [float("inf"), float("nan"), -float("inf")]).to(p.dtype)
                opt.step()
            if overrides and storage.state_format != "int8":  # the case's premise
                st = opt.state[params[0]]
                assert (st["max_exp_avg_sq"] != st["exp_avg_sq"]).any(), storage.id
            results.setdefault(storage.id, []).append(
                (isa, [p.detach().clone() for p in params], [_tensors(opt, p) for p in params]))
    for sid, runs in results.items():
        (isa0, p0, s0), *rest = runs
        for isa, ps, ss in rest:
            for i in range(len(ps)):
                pairs = [(ps[i], p0[i], "param")] + [(ss[i][k], s0[i][k], k) for k in ss[i]]
                for x, y, what in pairs:
                    assert_equal_nan_aware(x, y, f"{sid}: {isa} != {isa0} {what} {i}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("state_format", ["fp32", "int8"])
def test_write_back_is_the_spec_formula(backend, dtype, state_format):
    """Each policy's write-back on each backend against formats.md's formulas, with θ_new
    taken from a "master" run (master_param holds θ_new exactly). On a first step every
    policy starts from the same θ_eff (comp = 0, master = p), so θ_new is the same:
    p = round(θ_new) for nearest, kahan and master, comp = round(θ_new − p), and
    stochastic p = SR(θ_new) with the bits of (seed, index, step, element)."""
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(5000, generator=gen).to(dtype)
    grad = _grad(start.shape, dtype, gen)
    after = {}
    for update in ("master", "kahan", "nearest", "stochastic"):
        p = torch.nn.Parameter(start.clone())
        other = torch.nn.Parameter(torch.zeros(3, dtype=dtype))  # p is index 1
        opt = adamkit.Adam([other, p], lr=1e-3, backend=backend, state_format=state_format,
                           param_update=update, int8_min_size=0, seed=11)
        p.grad = grad
        opt.step()
        after[update] = (p.detach(), opt.state[p])
    theta_new = after["master"][1]["master_param"]
    rounded = theta_new.to(dtype)
    assert not torch.equal(rounded, start), "the step should move some elements"
    for update in ("master", "kahan", "nearest"):
        assert torch.equal(after[update][0], rounded), update
    assert torch.equal(after["kahan"][1]["kahan_comp"], (theta_new - rounded.float()).to(dtype))
    sr_seed = int(after["stochastic"][1]["sr_seed"])
    assert sr_seed == policy.sr_seed(11, 1)
    bits = policy.random_bits(start.numel(), policy.step_key(sr_seed, 1), start.device)
    assert torch.equal(after["stochastic"][0], policy.round_stochastic(theta_new, bits, dtype))


# ---- every backend vs the float64 oracle ------------------------------------------------------


def _stored_values(name, fmt, a, b, st_a, st_b):
    """The two backends' stored moments as float64, and one storage step at each element
    (bfloat16: its ulp ≤ 2^-7·|x|; int8: one code, ≤ 2^-3·|x| or a subnormal step)."""
    if fmt == "int8":
        cmap = fmt_state.CODE_MAPS[name]
        assert_close_scaled(st_a[f"{name}_scale"], st_b[f"{name}_scale"], 2.0**-20, 0.0, f"{name}_scale")
        scale = st_b[f"{name}_scale"]
        va, vb = fmt_state.decode(a, scale, cmap).double(), fmt_state.decode(b, scale, cmap).double()
        sub = (scale.double().repeat_interleave(fmt_state.BLOCK)[: a.numel()] * 2.0 ** (-cmap.bias - 2))
        return va, vb, torch.maximum(2.0**-3 * torch.maximum(va.abs(), vb.abs()), sub.reshape(a.shape))
    va, vb = a.double(), b.double()
    return va, vb, 2.0**-7 * torch.maximum(va.abs(), vb.abs())


def _unrounded_moments(opt, p, before, grad, update, step):
    """The oracle's moments before storage rounds them (adamkit.reference, float64), from
    the state the step started with; and the size of their operands, elementwise."""
    group, fmt = opt.param_groups[0], stored_formats(opt.state[p])[0]
    zero = torch.zeros(p.shape, dtype=torch.float64)
    old = {name: fmt_state.read(before[name], before.get(f"{name}_scale"), fmt, name).double()
           if name in before else zero for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    first = "exp_avg" not in before  # before the first step: comp = 0, master = p
    theta = before["param"].double() if first else policy.theta_eff(
        before["param"], before, update, torch.float64)
    seen = {}
    adam_step(theta, grad.double(), old["exp_avg"], old["exp_avg_sq"], old["max_exp_avg_sq"],
              step, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
              eps=group["eps"], weight_decay=group["weight_decay"],
              decouple_wd=group["decouple_wd"], amsgrad=group["amsgrad"],
              maximize=group["maximize"], store=lambda x, name: seen.setdefault(name, x))
    g = grad.double().abs() + group["weight_decay"] * theta.abs()
    size = {"exp_avg": torch.maximum(old["exp_avg"].abs(), g),
            "exp_avg_sq": torch.maximum(old["exp_avg_sq"], g * g)}
    size["max_exp_avg_sq"] = size["exp_avg_sq"]
    return seen, size


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("variant", list(STORAGE_VARIANTS))
@pytest.mark.parametrize("storage", STORAGE, ids=lambda s: s.id)
def test_backend_matches_reference_every_step(storage, variant, backend):
    """Four steps, each from identical params and state (the reference re-synced to the
    fast backend), on a fast backend and on the float64 reference; compared with the
    tolerance tables of registry.py. bf16 and int8 moments must be stored identically,
    except one storage step apart where the oracle's unrounded value is a near-tie
    (registry.NEAR_TIE_RTOL); params are compared where the moments agree."""
    pa, oa = _make(storage, backend, variant)
    pb, ob = _make(storage, "reference", variant)
    gen = torch.Generator().manual_seed(2)
    fmt, update = storage.state_format, storage.param_update
    for step in range(1, 5):
        grads = [_grad(p.shape, storage.dtype, gen) for p in pa]
        before = [{k: v.clone() for k, v in {**_tensors(oa, p), "param": p.detach()}.items()}
                  for p in pa]
        for ps, opt in ((pa, oa), (pb, ob)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        for i, (a, b) in enumerate(zip(pa, pb)):
            sa, sb = oa.state[a], ob.state[b]
            msg = f"step {step} param {i}"
            same = torch.ones(a.shape, dtype=torch.bool)
            exact, size = _unrounded_moments(ob, b, before[i], grads[i], update, step)
            for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if name not in sa:
                    continue
                if fmt == "fp32":
                    assert_close_scaled(sa[name], sb[name], FP32_MOMENT_RTOL, 0.0, f"{msg} {name}",
                                        scale=size[name].max().item())
                    continue
                va, vb, one_step = _stored_values(name, fmt, sa[name], sb[name], sa, sb)
                apart = va != vb
                slack = NEAR_TIE_RTOL * size[name]
                assert ((va - vb).abs() <= one_step + 2 * slack).all(), f"{msg} {name}: > a step apart"
                off = (exact[name] - (va + vb) / 2).abs()
                bad = apart & (off > slack)
                assert not bad.any(), (
                    f"{msg} {name}: {bad.sum()} of {apart.sum()} elements stored apart are "
                    f"no near-tie (worst {(off / slack)[bad].max():.3g}× the bound)")
                same &= ~apart
            rtol, atol = EFFECTIVE_PARAM_TOL[(storage.dtype, update)]
            ea, eb = _effective(a, sa, update), _effective(b, sb, update)
            assert_close_scaled(ea[same], eb[same], rtol, atol, f"{msg} effective param",
                                scale=eb.abs().max().item())
        _resync(pa, oa, pb, ob)


def _effective(p, st, update):
    return policy.theta_eff(p.detach(), st, update, torch.float32)


@torch.no_grad()
def _resync(pa, oa, pb, ob):
    for a, b in zip(pa, pb):
        b.copy_(a)
        for key, value in _tensors(oa, a).items():
            ob.state[b][key].copy_(value)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_int8_one_spike_in_a_block_never_makes_its_neighbours_step_by_m_over_eps(backend, amsgrad):
    """Early in training a block's small v sit ~1e-11 below its largest after one large
    grad, under the E5M3 map's smallest step, while their m (~1e-6 below) keep a code:
    v decoded to 0 and those elements stepped by lr·m̂/ε, ~10^5·lr (found by review).
    A positive v now takes code 1, so v̂ > 0 and no update exceeds what fp32 state gives
    by more than int8's rounding."""
    n, lr = 4096, 1e-3
    steps = {}
    for fmt in ("fp32", "int8"):
        p = torch.nn.Parameter(torch.zeros(n))
        opt = adamkit.Adam([p], lr=lr, state_format=fmt, amsgrad=amsgrad, backend=backend)
        largest = 0.0
        for t in range(30):
            g = torch.full((n,), 1e-3)
            if t == 20:
                g[0] = 1e3
            before = p.detach().clone()
            p.grad = g
            opt.step()
            largest = max(largest, (p.detach() - before)[1:256].abs().max().item())
        steps[fmt] = largest
    assert steps["fp32"] <= lr * 1.01
    assert steps["int8"] <= steps["fp32"] * 1.1, steps


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_int8_neighbours_of_a_spike_spread_over_the_code_map_step_by_at_most_3_lr(backend):
    """docs/precision.md's bound for the floor, in the worst block a review found: one
    gradient 1e4 and 255 neighbours spread geometrically from 1e-7 to 1e-3 of it (their
    v across the map's subnormal codes), then 20 steps of the neighbours alone. fp32
    state steps them by at most lr; int8's rounding of small v, by up to 2.86·lr (1.19·lr
    at the first step), where without the floor it would be 10^4–10^5·lr."""
    lr, spike = 1e-3, 1e4
    neighbours = torch.logspace(-7, -3, 255, dtype=torch.float64).float() * spike
    worst = {}
    for fmt in ("fp32", "int8"):
        p = torch.nn.Parameter(torch.zeros(256))
        opt = adamkit.Adam([p], lr=lr, state_format=fmt, int8_min_size=0, backend=backend)
        worst[fmt] = 0.0
        for t in range(21):
            before = p.detach().clone()
            p.grad = torch.cat([torch.tensor([spike if t == 0 else 0.0]), neighbours])
            opt.step()
            worst[fmt] = max(worst[fmt], ((p.detach() - before)[1:].abs() / lr).max().item())
    assert worst["fp32"] <= 1.00001  # lr, in float32
    assert 1.0 < worst["int8"] <= 3.0, worst


def test_int8_small_tensors_stay_fp32():
    """Under "int8", params with fewer elements than int8_min_size (default 4096) keep
    fp32 state, judged on their full size."""
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(4095))
    opt = adamkit.Adam([big, small], state_format="int8")
    big.grad, small.grad = torch.ones(64, 64), torch.ones(4095)
    opt.step()
    assert stored_formats(opt.state[big])[0] == "int8" and opt.state[big]["exp_avg"].dtype == torch.uint8
    assert opt.state[big]["exp_avg_scale"].shape == (16,)
    assert stored_formats(opt.state[small])[0] == "fp32" and opt.state[small]["exp_avg"].dtype == torch.float32
    assert "exp_avg_scale" not in opt.state[small]


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize("storage", [s for s in STORAGE if s.dtype != torch.float32], ids=lambda s: s.id)
def test_grad_is_never_written(storage, backend):
    params, opt = _make(storage, backend, "l2-amsgrad-max")
    gen = torch.Generator().manual_seed(4)
    for p in params:
        p.grad = _grad(p.shape, storage.dtype, gen)
    before = [(p.grad.clone(), p.grad._version) for p in params]
    opt.step()
    for p, (grad, version) in zip(params, before):
        assert p.grad._version == version and torch.equal(p.grad, grad)


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize("storage", [s for s in STORAGE if s.dtype != torch.float32], ids=lambda s: s.id)
def test_grad_scaler_fast_path_is_exact(storage, backend):
    """With torch.amp.GradScaler's fast path the step unscales by 1/scale; GradScaler's
    scales are powers of two, so that is exact: the same bits as unscaled gradients."""
    runs = []
    for scaled in (True, False):
        params, opt = _make(storage, backend, "l2-amsgrad-max")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaler.scale(torch.ones(()))  # initialises the scale
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            for p in params:
                p.grad = _grad(p.shape, storage.dtype, gen)
                if scaled:
                    p.grad *= 2.0**10
            if scaled:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for key, value in _tensors(oa, a).items():
            assert torch.equal(value, _tensors(ob, b)[key]), key


def assert_equal_nan_aware(x, y, msg):
    """NaN in the same places (payloads may differ), the same bits everywhere else."""
    assert torch.equal(x.isnan(), y.isnan()), f"{msg}: NaNs differ"
    assert torch.equal(x[~x.isnan()], y[~y.isnan()]), msg


def _five_steps_on_both_backends(storage, variant, edit_grad=None, edit_state=None):
    """Params and optimizer of the cpu and the torch backend after five steps from the
    same start; edit_grad(step, grad) and edit_state(step, tensor) inject values."""
    runs = []
    for backend in ("cpu", "torch"):
        params, opt = _make(storage, backend, variant)
        gen = torch.Generator().manual_seed(1)
        for step in range(5):
            for p in params:
                p.grad = _grad(p.shape, storage.dtype, gen)
                if edit_grad and p.numel() > 40:
                    edit_grad(step, p.grad.view(-1))
            opt.step()
            for p in params:
                for t in _tensors(opt, p).values():
                    if edit_state and t.shape == p.shape and t.numel() > 40:  # not int8 scales
                        edit_state(step, t)
        runs.append((params, opt))
    return runs


@needs_cpu
@pytest.mark.parametrize("storage", [s for s in STORAGE if s.dtype != torch.float32
                                     or s.state_format == "int8"], ids=lambda s: s.id)
@pytest.mark.parametrize("variant", list(INJECT_AT))
def test_cpu_kernel_propagates_nan_and_inf_like_torch_backend(storage, variant):
    """Non-finite grads inside 16-wide groups and in the scalar tail: the same elements
    turn NaN/inf on both backends (NaN payloads may differ), the rest agrees bitwise.
    int8 moments too: a NaN makes its block's scale NaN on both (the kernel's block max
    dropped it, and its params stepped on as if the gradient had been finite), and a NaN
    y from an ∞ absmax takes the top code on both (the torch backend read its sign)."""
    def edit_grad(step, flat):
        if step == INJECT_AT[variant]:
            flat[[3, 17, 31, -1]] = torch.tensor([float("nan"), float("inf"), -float("inf"),
                                                  float("nan")]).to(flat.dtype)
            if flat.numel() > 600:  # int8 blocks with an ∞ and no NaN: absmax ∞, y = ∞·0
                flat[[300, 600]] = torch.tensor([float("inf"), -float("inf")]).to(flat.dtype)

    (pa, oa), (pb, ob) = _five_steps_on_both_backends(storage, variant, edit_grad=edit_grad)
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert_equal_nan_aware(a, b, f"param {i}")
        for k in _tensors(oa, a):
            if k != "step":
                assert_equal_nan_aware(oa.state[a][k], ob.state[b][k], f"param {i} {k}")
    assert any(torch.isnan(p).any() for p in pa), "the non-finite grads should reach a param"


def _int8_steps_on_both_backends(n, seed, dtype, update, amsgrad, grad_at, betas=(0.9, 0.999)):
    """Four int8 steps of one param of n elements on the cpu and torch backends, the grad
    of each step from grad_at(step, gen); compared bit for bit after every step (NaN
    where NaN). Returns the cpu backend's param and state after each step."""
    runs = {}
    for backend in ("cpu", "torch"):
        gen = torch.Generator().manual_seed(seed)
        p = torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype))
        kw = {"param_update": update} if update else {}
        opt = adamkit.Adam([p], lr=1e-2, backend=backend, state_format="int8", int8_min_size=0,
                           amsgrad=amsgrad, betas=betas, **kw)
        history = []
        for step in range(4):
            p.grad = grad_at(step, gen).to(dtype)
            opt.step()
            history.append({"param": p.detach().clone(),
                            **{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}})
        runs[backend] = history
    for step, (a, b) in enumerate(zip(runs["cpu"], runs["torch"])):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_nan_aware(a[key], b[key], f"step {step + 1}, {key}")
    return runs["cpu"]


@needs_cpu
@pytest.mark.parametrize("dtype, update", [(torch.float32, None), (torch.bfloat16, "kahan")], ids=["fp32", "bf16-kahan"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_int8_blocks_with_a_nan_or_an_inf_follow_formats_md_on_both_backends(dtype, update, amsgrad):
    """Compared after every step (later steps turn such blocks all NaN and hide what the
    first one gave): a NaN gradient makes its block's scale NaN and its params NaN (the
    kernel's float max dropped the NaN, and its params stepped on as if the gradient were
    finite); a block whose largest |m| is ∞ gets scale ∞ and the unsigned top code at the
    infinite element, for −∞ too (the torch backend read the sign of ∞·0's NaN). Blocks
    0-2 and the scalar tail hold one each; blocks 3 and 4 are untouched."""
    nan, inf = float("nan"), float("inf")
    n = 5 * 256 + 100

    def grad_at(step, gen):
        g = torch.randn(n, generator=gen) * 0.1
        if step == 1:
            g[[5, 300, 600, 1300]] = torch.tensor([nan, inf, -inf, nan])
        return g

    after = _int8_steps_on_both_backends(n, 0, dtype, update, amsgrad, grad_at)[1]
    blocks = after["param"].float().split(256)
    assert [bool(b.isnan().all()) for b in blocks] == [True, True, True, False, False, True]
    assert bool(torch.isfinite(torch.cat(blocks[3:5])).all())
    scale = after["exp_avg_scale"]
    assert scale[[0, 5]].isnan().all() and scale[1].isinf() and scale[2].isinf()
    assert after["exp_avg"][[300, 600]].tolist() == [127, 127]


@needs_cpu
@pytest.mark.parametrize("dtype, update", [(torch.float32, None), (torch.bfloat16, "kahan")], ids=["fp32", "bf16-kahan"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_int8_blocks_on_either_side_of_the_maps_normal_range_match_the_torch_backend(dtype, update, amsgrad):
    """The kernel encodes a finite block whose every x·inv is at least its map's smallest
    normal (2^-6 for m, 2^-14 for v) without the subnormal path, and others with it
    (common.h's BlockRange). Each block here holds one small gradient, its ratio to the
    block's largest log-spaced across both thresholds (and some exact zeros), so that the
    blocks fall on either side; compared bit for bit with the torch backend after every
    step, and both kinds of block must occur. The last block's one huge first gradient
    leaves its v below the normal range while its m (β1 = 0.5) is back in it by step 3."""
    blocks, n = 96, 97 * 256 + 40
    ratios = torch.logspace(-7.5, -3, blocks, dtype=torch.float64).float()

    def grad_at(step, gen):
        g = torch.rand(n, generator=gen) * 0.5 + 0.5
        g *= torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        body = g[: blocks * 256].view(blocks, 256)
        body *= torch.logspace(-3, 3, blocks).roll(step).unsqueeze(1)  # any block scale
        body[:, 7 + step] *= ratios
        body[::7, 200] = 0.0
        g[blocks * 256:(blocks + 1) * 256].abs_()  # one sign: its m stays away from 0
        if step == 0:
            g[blocks * 256 + 9] = 1e5
        return g

    history = _int8_steps_on_both_backends(n, 1, dtype, update, amsgrad, grad_at, betas=(0.5, 0.999))
    first = history[0]
    last = slice(blocks * 256, (blocks + 1) * 256)
    assert int((history[2]["exp_avg"][last].int() & 127).min()) >= 8  # m in range, v not
    assert int(history[2]["exp_avg_sq"][last].int().min()) < 8
    m = first["exp_avg"][: blocks * 256].view(blocks, 256).int() & 127
    v = first["exp_avg_sq"][: blocks * 256].view(blocks, 256).int()
    subnormal = ((m < 8) | (v < 8)).any(dim=1)  # a code below the map's normal range
    assert 10 < int(subnormal.sum()) < blocks - 10, subnormal


# NaNs whose low 16 bits are set: rounding them to bf16 by the finite formula carries into
# the exponent and sign (0x7FFFFFFF would become -0.0), so they test the NaN path.
NAN_PAYLOADS = [0x7FFFFFFF, -1, 0x7F800001, 0x7FC0FFFF]  # -1: 0xFFFFFFFF; 0x7F800001 signals


@needs_cpu
@pytest.mark.parametrize("storage, variant", [
    (s, v) for s in STORAGE for v in INJECT_AT
    if s.dtype != torch.float32 and (s.state_format == "fp32" or s.param_update == "master")
], ids=lambda x: getattr(x, "id", x))
def test_cpu_kernel_keeps_nan_payloads_nan(storage, variant):
    """NaNs with payload bits in float32 state (a moment, the master copy), inside 16-wide
    groups and in the scalar tail: every param they reach is NaN on both backends, under
    every rounding policy (stochastic rounding too: formats.md rounds a NaN to nearest)."""
    payload = torch.tensor(NAN_PAYLOADS, dtype=torch.int32).view(torch.float32)

    def edit_state(step, t):  # after the step before INJECT_AT: the next step reads them
        if step == INJECT_AT[variant] - 1 and t.dtype == torch.float32:
            t.view(-1)[[3, 17, 31, -1]] = payload

    (pa, _), (pb, _) = _five_steps_on_both_backends(storage, variant, edit_state=edit_state)
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert_equal_nan_aware(a, b, f"param {i}")
        if a.numel() > 40:
            assert a.detach().view(-1)[[3, 17, 31, -1]].isnan().all(), f"param {i}: a NaN was lost"


FLOAT32_MIN_NORMAL = 2.0**-126


def _bits(t):
    """A float tensor's bit patterns (torch.equal takes -0.0 for 0.0); others as they are."""
    if not t.is_floating_point():
        return t
    return t.detach().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@needs_cpu
@pytest.mark.parametrize("storage", [s for s in STORAGE if s.dtype != torch.float16 and (
    s.state_format == "bf16" or (s.dtype == torch.bfloat16 and s.state_format != "int8"))],
    ids=lambda s: s.id)
@pytest.mark.parametrize("variant", ["plain", "l2-amsgrad-max"])
def test_cpu_kernel_rounds_float32_denormals_like_torch_backend(storage, variant):
    """Moments, params and Kahan residuals below float32's smallest normal 2^-126, where
    bf16 has subnormals: bitwise as the torch backend. (The AVX512_BF16 conversion takes
    denormal inputs as zero; simd.h's groups holding one round in software.) The grads
    span 1e-40..1e-17 (each element keeps its magnitude across steps), so m is
    denormal for the small ones and v for the middle ones; params start around 2^-126
    and lr 1e-30 keeps their updates that small. (float16 grads cannot be small enough
    to make a moment denormal.)"""
    gen = torch.Generator().manual_seed(3)
    n = 2 * 16384 + 300
    start = (torch.randn(n, generator=gen) * FLOAT32_MIN_NORMAL
             * 10 ** torch.empty(n).uniform_(-2, 2, generator=gen)).to(storage.dtype)
    grad_scale = 10 ** torch.empty(n, dtype=torch.float64).uniform_(-40, -17, generator=gen)
    runs = []
    for backend in ("cpu", "torch"):
        p = torch.nn.Parameter(start.clone())
        opt = adamkit.Adam([p], lr=1e-30, backend=backend, **storage.kwargs(), **STORAGE_VARIANTS[variant])
        g_gen = torch.Generator().manual_seed(4)
        for _ in range(4):
            p.grad = (torch.randn(n, generator=g_gen, dtype=torch.float64) * grad_scale).to(storage.dtype)
            opt.step()
        runs.append((p, _tensors(opt, p)))
    (pa, sa), (pb, sb) = runs
    assert torch.equal(_bits(pa), _bits(pb)), f"param: {(_bits(pa) != _bits(pb)).sum()} differ"
    for key in sa:
        assert torch.equal(_bits(sa[key]), _bits(sb[key])), f"{key}: {(_bits(sa[key]) != _bits(sb[key])).sum()} differ"

    def denormal(t):
        t = t.detach().float()
        return ((t != 0) & (t.abs() < FLOAT32_MIN_NORMAL)).sum().item()

    assert denormal(sa["exp_avg"]) > 100 and denormal(sa["exp_avg_sq"]) > 100
    if storage.dtype == torch.bfloat16:
        assert denormal(pa) > 100
    if storage.param_update == "kahan":
        assert denormal(sa["kahan_comp"]) > 100


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_amsgrad_max_of_a_nan_v_is_nan_as_torch_optim(backend):
    """torch.maximum(max v, v) is NaN where v is: the kernel's max kept the old max there
    (float32 params, where the kernel and torch.optim are not bitwise: NaN-ness compared)."""
    torch.manual_seed(0)
    runs = []
    for make in (lambda ps: torch.optim.Adam(ps, amsgrad=True),
                 lambda ps: adamkit.Adam(ps, amsgrad=True, backend=backend)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 203))
        opt = make([p])
        for step in range(3):
            g = torch.sin(torch.arange(203.0) + step)
            if step == 1:
                g[[3, 17, 31, 200]] = float("nan")
            p.grad = g
            opt.step()
        runs.append(opt.state[p]["max_exp_avg_sq"])
    theirs, ours = runs
    assert theirs.isnan().sum() == 4
    assert torch.equal(ours.isnan(), theirs.isnan())
