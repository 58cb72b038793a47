"""Behaviour at the edges: empty steps, untouched grads, torch.optim's conveniences."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import adamkit
from helpers import assert_close_scaled, assert_unchanged, snapshot
from registry import ALL_BACKENDS, FAST_BACKENDS, TORCH_PARITY_TOL

# every test twice: the step cache's checks in Python and in C++ (conftest.checks_mode)
pytestmark = pytest.mark.usefixtures("checks_mode")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_grads_is_a_no_op(backend):
    p = torch.nn.Parameter(torch.randn(5))
    opt = adamkit.Adam([p], backend=backend, weight_decay=0.1, decouple_wd=True)
    before = p.detach().clone()
    assert opt.step() is None
    assert torch.equal(p, before) and len(opt.state) == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_zero_grads_without_decay_leave_params_unchanged(backend, amsgrad):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = adamkit.Adam([p], backend=backend, amsgrad=amsgrad)
    before = p.detach().clone()
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.equal(p, before)
    assert float(opt.state[p]["step"]) == 3


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(), dict(weight_decay=0.1), dict(maximize=True),
                                    dict(weight_decay=0.1, maximize=True, amsgrad=True),
                                    dict(weight_decay=0.1, decouple_wd=True)])
def test_grad_is_never_written(backend, kwargs):
    p = torch.nn.Parameter(torch.randn(6))
    opt = adamkit.Adam([p], backend=backend, **kwargs)
    p.grad = torch.randn(6)
    grad_before, version = p.grad.clone(), p.grad._version
    opt.step()
    assert p.grad._version == version
    assert torch.equal(p.grad, grad_before)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_counts_as_an_in_place_change_for_autograd(backend, dtype):
    """As with torch.optim, a graph that saved a param before the step cannot be
    back-propagated after it: autograd sees the param's version change, even where the
    fused kernel writes it through a raw pointer (and on the cached path, step 2)."""
    p = torch.nn.Parameter(torch.randn(40, dtype=dtype))
    opt = adamkit.Adam([p], backend=backend)
    for _ in range(2):
        loss = (p * p).sum()  # saves p for backward
        p.grad = torch.randn(40, dtype=dtype)
        version = p._version
        opt.step()
        assert p._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_closure_returns_loss_and_runs_with_grad():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    opt = adamkit.Adam([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.item() == 4.0 and p.item() < 2.0


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_param_groups_with_their_own_settings_match_torch(backend):
    # The torch backend runs torch.optim's op sequence: equal bit for bit. The cpu kernel
    # rounds once per operation where torch's vectorized code may fuse (AVX2 FMA): a few ulps.
    rtol, atol = (0.0, 0.0) if backend == "torch" else TORCH_PARITY_TOL[torch.float32]
    torch.manual_seed(0)
    a1, b1 = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))
    a2, b2 = torch.nn.Parameter(a1.detach().clone()), torch.nn.Parameter(b1.detach().clone())
    groups = lambda a, b: [{"params": [a]}, {"params": [b], "lr": 0.1, "amsgrad": True,  # noqa: E731
                                            "weight_decay": 0.01, "betas": (0.8, 0.99)}]
    ours = adamkit.Adam(groups(a1, b1), lr=0.01, backend=backend)
    theirs = torch.optim.Adam(groups(a2, b2), lr=0.01)
    extra1, extra2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    ours.add_param_group({"params": [extra1], "lr": 0.5})
    theirs.add_param_group({"params": [extra2], "lr": 0.5})
    for _ in range(5):
        for ps, o in (((a1, b1, extra1), ours), ((a2, b2, extra2), theirs)):
            for p in ps:
                p.grad = torch.cos(p.detach() * 3)
            o.step()
    for x, y in ((a1, a2), (b1, b2), (extra1, extra2)):
        assert_close_scaled(x, y, rtol, atol)


def test_tensor_lr_matches_float_lr():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(4))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = adamkit.Adam([p1], lr=torch.tensor(0.01))
    o2 = adamkit.Adam([p2], lr=0.01)
    for _ in range(3):
        p1.grad, p2.grad = torch.ones(4), torch.ones(4)
        o1.step()
        o2.step()
    assert torch.equal(p1, p2)


def test_hooks_run():
    p = torch.nn.Parameter(torch.randn(2))
    opt = adamkit.Adam([p])
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("loaded"))
    p.grad = torch.ones(2)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post", "loaded"]


@pytest.mark.parametrize("make", [torch.optim.Adam, adamkit.Adam, adamkit.AdamW],
                         ids=["torch.optim.Adam", "adamkit.Adam", "adamkit.AdamW"])
def test_step_hooks_behave_as_torch_optims(make):
    """Step hooks as torch.optim runs them: global and per-optimizer hooks once each, in
    torch's order, seeing (optimizer, args, kwargs) with the optimizer first in args; a
    pre-hook may swap the args, and a bad return value is torch's RuntimeError."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    p = torch.nn.Parameter(torch.randn(2))
    opt = make([p])
    seen = []
    closure_calls = []

    def add_closure(o, args, kwargs):  # turns step() into step(closure)
        seen.append(("pre", args[0] is o, len(args), dict(kwargs)))
        return (args[0], lambda: closure_calls.append(1)), kwargs

    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append("global pre")),
               opt.register_step_pre_hook(add_closure),
               opt.register_step_post_hook(lambda o, a, k: seen.append(("post", len(a)))),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append("global post"))]
    try:
        p.grad = torch.ones(2)
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert seen == ["global pre", ("pre", True, 1, {}), ("post", 2), "global post"]
    assert closure_calls == [1]

    bad = opt.register_step_pre_hook(lambda o, a, k: "not args")
    with pytest.raises(RuntimeError, match="must return None or a tuple of"):
        opt.step()
    bad.remove()


@pytest.mark.parametrize("make,name", [(adamkit.Adam, "Adam"), (adamkit.AdamW, "AdamW")])
def test_step_is_labelled_while_a_profiler_runs(make, name):
    """Every step carries torch.optim's profiler label, once (torch wraps adamkit's step
    as it wraps its own: a label of our own as well would show twice)."""
    p = torch.nn.Parameter(torch.randn(2))
    opt = make([p])
    p.grad = torch.ones(2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.name for e in prof.events()]
    assert names.count(f"Optimizer.step#{name}.step") == 1
    assert type(opt).step.hooked and not hasattr(type(opt).step.__wrapped__, "hooked")


def test_deepcopy_is_independent_and_repr_shows_groups():
    p = torch.nn.Parameter(torch.randn(3))
    opt = adamkit.AdamW([p], lr=0.01)
    p.grad = torch.ones(3)
    opt.step()
    clone = copy.deepcopy(opt)
    clone.state[clone.param_groups[0]["params"][0]]["exp_avg"].add_(1.0)
    assert not torch.equal(clone.state[clone.param_groups[0]["params"][0]]["exp_avg"],
                           opt.state[p]["exp_avg"])
    text = repr(opt)
    assert text.startswith("AdamW (") and "decouple_wd: True" in text and "lr: 0.01" in text


def test_zero_grad_sets_none():
    p = torch.nn.Parameter(torch.randn(2))
    opt = adamkit.Adam([p])
    p.grad = torch.ones(2)
    opt.zero_grad()
    assert p.grad is None


def test_zero_dim_and_empty_params():
    p0 = torch.nn.Parameter(torch.tensor(1.0))
    pe = torch.nn.Parameter(torch.empty(0, 3))
    opt = adamkit.Adam([p0, pe], lr=0.1)
    p0.grad, pe.grad = torch.tensor(2.0), torch.empty(0, 3)
    opt.step()
    assert p0.item() == pytest.approx(0.9, rel=1e-6)
    assert opt.state[pe]["exp_avg"].shape == (0, 3)


# ---- what a cached plan and the native kernel must not take on trust -------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_param_sliced_in_place_raises_and_changes_nothing(backend):
    """`p.data = p.data[:8]` keeps p's address and contiguity; its state still has the
    old shape. torch.optim raises (RuntimeError); so must adamkit, cached plan or not,
    instead of running the kernel over the old size (which read past the new grad)."""
    emb = torch.nn.Embedding(4096, 4)
    other = torch.nn.Parameter(torch.randn(8))
    opt = adamkit.Adam([emb.weight, other], lr=0.1, backend=backend)
    for _ in range(2):
        emb.weight.grad, other.grad = torch.ones(4096, 4), torch.ones(8)
        opt.step()
    emb.weight.data = emb.weight.data[:8]
    emb.weight.grad, other.grad = torch.ones(8, 4), torch.ones(8)
    snap = snapshot(opt, [emb.weight, other])
    with pytest.raises(RuntimeError, match="resized in place"):
        opt.step()
    assert_unchanged(opt, [emb.weight, other], snap)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype, grad", [
    (torch.float32, lambda: torch.randn(64, dtype=torch.float16)),  # fewer bytes
    (torch.bfloat16, lambda: torch.randn(32)),  # as many bytes: float32 bits read as bf16
], ids=["narrower", "same-bytes"])
def test_a_grad_of_another_dtype_raises_as_torch_optim_does(backend, dtype, grad):
    """torch.optim fails on a grad whose dtype is not its param's; the kernel would read
    it as the param's dtype (past its end for a narrower grad). `.grad.data =` skips the
    grad setter's own check, and the cached plan must notice it too."""
    p = torch.nn.Parameter(torch.randn(64).to(dtype))
    opt = adamkit.Adam([p], backend=backend)
    for _ in range(2):
        p.grad = torch.randn(64).to(dtype)
        opt.step()
    p.grad.data = grad()
    snap = snapshot(opt, [p])
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()
    assert_unchanged(opt, [p], snap)
    with pytest.raises(RuntimeError):
        torch.optim.Adam([p]).step()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("steps", [0, 2], ids=["first step", "cached plan"])
def test_a_grad_of_another_shape_raises_as_torch_optim_does(backend, steps):
    """A grad of as many elements in another shape, set through `.grad.data =` (which
    skips the setter's shape check): torch.optim raises, and so did adamkit's full path,
    but the cached plan of the cpu backend stepped it in memory order."""
    p = torch.nn.Parameter(torch.randn(6, 2))
    opt = adamkit.Adam([p], backend=backend)
    for _ in range(steps):
        p.grad = torch.randn(6, 2)
        opt.step()
    p.grad = torch.randn(6, 2)
    p.grad.data = torch.randn(2, 6)
    snap = snapshot(opt, [p])
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    assert_unchanged(opt, [p], snap)
    with pytest.raises(RuntimeError):
        torch.optim.Adam([p]).step()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("state_format", [None, "bf16", "int8"])
@pytest.mark.parametrize("steps", [1, 2], ids=["second step", "cached plan"])
def test_a_param_reshaped_through_data_raises_as_torch_optim_does(backend, state_format, steps):
    """`p.data = p.data.view(4, 64)` keeps p's address and bytes: the cpu backend's
    cached plan stepped it in memory order with its (16, 16) state, whose checkpoint then
    failed to load, and the next step that re-planned raised (found by review). The full
    path, the other backends and torch.optim raise at once."""
    p = torch.nn.Parameter(torch.randn(16, 16))
    opt = adamkit.Adam([p], backend=backend, state_format=state_format, int8_min_size=0)
    for _ in range(steps):
        p.grad = torch.randn(16, 16)
        opt.step()
    p.grad = None
    p.data = p.data.view(4, 64)
    p.grad = torch.randn(4, 64)
    snap = snapshot(opt, [p])
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    assert_unchanged(opt, [p], snap)
    if state_format is None:
        theirs = torch.optim.Adam([p])
        theirs.load_state_dict(opt.state_dict())
        with pytest.raises(RuntimeError):
            theirs.step()


@pytest.mark.parametrize("state_format", ["bf16", "fp32", "int8"])
def test_model_half_after_bf16_training_converts_the_kahan_buffer(state_format):
    """`model.half()` keeps the Parameter objects and the state's tags; the Kahan buffer
    is bfloat16 still and must become float16, as a checkpoint conversion makes it, not
    be read by the kernel as float16 bits (that moved weights by 0.7 at lr 1e-3)."""
    results = {}
    for backend in ("cpu", "torch"):
        torch.manual_seed(0)
        m = torch.nn.Linear(64, 64).to(torch.bfloat16)
        opt = adamkit.Adam(m.parameters(), lr=1e-3, backend=backend, state_format=state_format,
                           int8_min_size=0)
        x = torch.randn(8, 64)
        for _ in range(3):
            opt.zero_grad()
            m(x.bfloat16()).float().pow(2).mean().backward()
            opt.step()
        m.half()
        w0 = m.weight.detach().float().clone()
        opt.zero_grad()
        m(x.half()).float().pow(2).mean().backward()
        opt.step()
        assert opt.state[m.weight]["kahan_comp"].dtype == torch.float16
        assert (m.weight.detach().float() - w0).abs().max() < 2e-3  # lr-sized, not 0.7
        results[backend] = m.weight.detach().clone()
    assert torch.equal(results["cpu"], results["torch"])


def test_a_sparse_grad_beside_the_kernel_raises_before_any_update():
    """A param the cpu bucket hands to the torch backend (non-contiguous) gets a sparse
    grad: the cached step must raise before the kernel updates the others."""
    a = torch.nn.Parameter(torch.zeros(6, 4).t())  # non-contiguous: the bucket's torch rest
    b = torch.nn.Parameter(torch.zeros(8))
    opt = adamkit.Adam([b, a], lr=0.1, backend="cpu")
    for _ in range(2):
        a.grad, b.grad = torch.ones(4, 6), torch.ones(8)
        opt.step()
    a.grad, b.grad = torch.ones(4, 6).to_sparse(), torch.ones(8)
    snap = snapshot(opt, [a, b])
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, [a, b], snap)


def test_params_sharing_memory_update_one_after_another():
    """Two params viewing one storage would be updated by the kernel's threads at once:
    nondeterministic. They run one after another instead, bit for bit as on the torch
    backend, every time. (A param listed twice is updated once per listing: below.)"""
    def run(backend):
        base = torch.linspace(-1, 1, 1 << 17)
        params = [torch.nn.Parameter(base[: 3 << 15]), torch.nn.Parameter(base[1 << 15:])]
        opt = adamkit.Adam(params, lr=1e-2, backend=backend)
        for t in range(3):
            for q in params:
                q.grad = torch.sin(torch.arange(q.numel()) * (t + 1.0))
            opt.step()
        return torch.cat([q.detach().flatten() for q in params])
    reference = run("torch")
    for _ in range(3):
        assert torch.equal(run("cpu"), reference)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", ["inference", "expanded"])
def test_a_param_no_in_place_op_may_write_raises_torchs_error_and_changes_nothing(backend, bad):
    """torch.optim's first in-place op on such a param raises (after the params before
    it moved); adamkit's torch backend did the same, its cpu backend wrote into the
    inference tensor, and into the expanded one (the kernel's threads racing on it)."""
    if bad == "inference":
        with torch.inference_mode():
            b = torch.zeros(4)
        message = "Inplace update to inference tensor outside InferenceMode"
    else:
        b = torch.zeros(1, 4).expand(3, 4)
        message = "more than one element of the written-to tensor refers to a single memory"
    b.grad = torch.ones_like(b)
    with pytest.raises(RuntimeError, match=message):
        torch.optim.Adam([b]).step()
    a = torch.nn.Parameter(torch.zeros(4))
    opt = adamkit.Adam([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    a.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(4)) and not opt.state
    with pytest.raises(RuntimeError, match=message):  # the functional form checks it too
        adamkit.functional.adam_step([b], [b.grad], [torch.zeros(b.shape)], [torch.zeros(b.shape)],
                                     step=1, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("key, value", [("lr", 1e38), ("weight_decay", 1e39)])
def test_a_scalar_beyond_float32_raises_torchs_error_before_any_change(backend, dtype, key, value):
    """lr/(1 − β1^t) and a coupled λ beyond float32's range: torch's for-loop and foreach
    steps raise "value cannot be converted to type float without overflow" (float32 and
    lower-precision params) once the moments have moved; adamkit raises it before
    anything is changed. float64 params step, as in torch."""
    p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    twin = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    opt = adamkit.Adam([p], backend=backend, **{key: value})
    theirs = torch.optim.Adam([twin], **{key: value})
    p.grad, twin.grad = torch.ones_like(p), torch.ones_like(twin)
    if dtype == torch.float64:
        opt.step()
        theirs.step()
        assert torch.equal(p.detach().isfinite(), twin.detach().isfinite())
        return
    with pytest.raises(RuntimeError, match="without overflow"):
        theirs.step()
    with pytest.raises(RuntimeError, match="value cannot be converted to type float without overflow"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4, dtype=dtype)) and not opt.state


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_params_raise_as_torch_optim_does_and_change_nothing(backend, dtype):
    """torch.optim's step fails on integer and bool params (its lerp has no such kernel:
    NotImplementedError); adamkit truncated the update into them ([5, 7, 9] became
    [4, 8, 8]), then raised a RuntimeError; now torch's type."""
    p, g = torch.tensor([5, 7, 9]).to(dtype), torch.tensor([1, -1, 2]).to(dtype)
    with pytest.raises(NotImplementedError):
        q = p.clone()
        q.grad = g.clone()
        torch.optim.Adam([q], lr=1.0).step()
    f = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([f, p], lr=1.0, backend=backend)
    f.grad, p.grad = torch.ones(3), g
    with pytest.raises(NotImplementedError, match=f"dtype {dtype}"):
        opt.step()
    assert torch.equal(p, torch.tensor([5, 7, 9]).to(dtype)) and torch.equal(f, torch.ones(3))
    assert not opt.state


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_param_given_inference_data_through_dot_data_steps_as_torchs_does(backend):
    """Such a param keeps its version counter, so torch's in-place ops (and torch.optim)
    update it; check_param refused every inference tensor, this one too."""
    with torch.inference_mode():
        data, torch_data = torch.ones(4), torch.ones(4)
    p, twin, torch_p = (torch.nn.Parameter(torch.ones(4)) for _ in range(3))
    p.data, torch_p.data = data, torch_data
    assert p.is_inference() and torch_p.is_inference() and not twin.is_inference()
    for q in (p, twin, torch_p):
        q.grad = torch.full((4,), 0.5)
    torch.optim.Adam([torch_p], lr=0.1).step()
    opt = adamkit.Adam([{"params": [p]}, {"params": [twin]}], lr=0.1, backend=backend)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(4))
    assert torch.equal(p.detach(), twin.detach())
    assert_close_scaled(p.detach(), torch_p.detach(), *TORCH_PARITY_TOL[torch.float32])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_param_restrided_in_place_after_cached_steps_raises_before_anything_changes(backend):
    """`q.data = q.data[:1].expand(4)` keeps q's address, dtype and shape: the cached plan
    took it, and the torch and reference backends raised the overlap error midway, after
    the params before q had moved. The plan now compares the params' strides."""
    ps = [torch.nn.Parameter(torch.ones(4)) for _ in range(3)]
    opt = adamkit.Adam(ps, lr=0.1, backend=backend)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones(4)
        opt.step()
    ps[1].data = ps[1].data[:1].expand(4)
    for p in ps:
        p.grad = torch.ones(4)
    snap = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        opt.step()
    assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_a_misfit_grad_beside_the_kernel_raises_on_the_cached_path_too(bad):
    """Params sharing memory leave the kernel for the torch backend (`rest`); the cached
    plan checked their grads for sparsity only: a grad of another shape broadcast, one
    of another dtype raised after the kernel had stepped the other param."""
    flat = torch.zeros(12)
    p1, p2 = torch.nn.Parameter(flat[:8]), torch.nn.Parameter(flat[4:12])
    q = torch.nn.Parameter(torch.ones(64))
    opt = adamkit.Adam([p1, p2, q], backend="cpu")
    for _ in range(2):
        p1.grad, p2.grad, q.grad = torch.ones(8), torch.ones(8), torch.ones(64)
        opt.step()
    q.grad = torch.ones(64)
    p1.grad.data = torch.ones(1) if bad == "shape" else torch.ones(8, dtype=torch.float64)
    snap = snapshot(opt, [p1, p2, q])
    with pytest.raises(RuntimeError, match="does not match"):
        opt.step()
    assert_unchanged(opt, [p1, p2, q], snap)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sparse_params_and_empty_expanded_ones_get_torchs_behaviour(backend):
    """check_param looked at every param's strides: a sparse param (strides (0, 0)) got
    the overlap error instead of torch's sparse one, and an empty expanded param, which
    torch steps (nothing to write), was refused."""
    sparse = torch.sparse_coo_tensor([[0, 1]], [1.0, 2.0], (3,)).requires_grad_()
    sparse.grad = torch.sparse_coo_tensor([[0]], [1.0], (3,))
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        torch.optim.Adam([sparse]).step()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        adamkit.Adam([sparse], backend=backend).step()
    empty = torch.zeros(0, 1).expand(0, 3).requires_grad_()
    empty.grad = torch.zeros(0, 3)
    torch.optim.Adam([empty]).step()
    opt = adamkit.Adam([empty], backend=backend)
    opt.step()
    assert float(opt.state[empty]["step"]) == 1


# ---- state and groups edited between steps (from a mutation audit) -----------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("edit, message", [
    (lambda st: st.pop("exp_avg"), "the state lacks exp_avg"),
    (lambda st: st.update(kahan_comp=torch.zeros(24, dtype=torch.bfloat16)),
     r"kahan_comp is \(24,\), expected a tensor of shape \(4, 6\)"),
], ids=["moment-deleted", "kahan-buffer-reshaped"])
def test_a_state_edited_so_no_step_reads_it_raises_before_anything_changes(backend, edit, message):
    """Between cached steps: the full path raises UnreadableStateError while planning
    (a planner that let them through raised a KeyError mid-step, or let the kernel read
    a buffer of another shape)."""
    p = torch.nn.Parameter(torch.randn(4, 6).bfloat16())
    q = torch.nn.Parameter(torch.randn(4, 6).bfloat16())
    opt = adamkit.Adam([q, p], lr=0.01, param_update="kahan", backend=backend)
    for _ in range(3):
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.step()
    edit(opt.state[p])
    snap = snapshot(opt, [p, q])
    with pytest.raises(adamkit.UnreadableStateError, match=message):
        opt.step()
    assert_unchanged(opt, [p, q], snap)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_seed_cast_to_a_float_is_replaced_with_a_warning(backend):
    """A floating sr_seed (what torch.optim's load makes of it) cannot be an integer
    key: the step warns and keeps an int64 one."""
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = adamkit.Adam([p], param_update="stochastic", backend=backend)
    p.grad = torch.randn(8).bfloat16()
    opt.step()
    opt.state[p]["sr_seed"] = opt.state[p]["sr_seed"].double()
    with pytest.warns(UserWarning, match="sr_seed of floating dtype"):
        opt.step()
    assert opt.state[p]["sr_seed"].dtype == torch.int64


def test_seeds_are_derived_from_the_position_in_the_optimizer_not_among_the_params_with_grads():
    """A param without a grad still holds its place: the seed of the second param is
    derived from index 1 even when the first never stepped (so it does not change with
    which params happen to have grads)."""
    from adamkit.formats import param as param_policy

    a, b = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = adamkit.Adam([{"params": [a]}, {"params": [b]}], param_update="stochastic", seed=5)
    b.grad = torch.randn(8).bfloat16()
    opt.step()
    assert int(opt.state[b]["sr_seed"]) == param_policy.sr_seed(5, 1)


def test_state_dict_after_a_master_param_was_given_another_shape_leaves_it_to_the_step():
    """The master resync at state_dict skips a master copy that no longer fits its param
    (the next step raises for it, with nothing changed): state_dict itself must work."""
    p = torch.nn.Parameter(torch.randn(4, 2).bfloat16())
    opt = adamkit.Adam([p], param_update="master")
    p.grad = torch.randn(4, 2).bfloat16()
    opt.step()
    p.data = torch.randn(8).bfloat16()
    with torch.no_grad():
        p.add_(1)
    sd = opt.state_dict()
    assert sd["state"][0]["master_param"].shape == (4, 2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype, storage", [
    (torch.float32, {}), (torch.float32, {"state_format": "int8", "int8_min_size": 0}),
    (torch.bfloat16, {"param_update": "stochastic"}), (torch.bfloat16, {"param_update": "master"}),
], ids=["fp32", "int8", "stochastic", "master"])
def test_a_default_device_context_leaves_the_host_state_on_the_host(backend, dtype, storage):
    """Under ``with torch.device("meta")`` (or "cuda"), torch.tensor(...) without a device
    makes a tensor there: the step counter, the tags and sr_seed were made so, and the
    cpu kernel, which reads them as host memory, crashed the process (SIGSEGV) on the
    meta counter; elsewhere `.item()` on it raised. They are made on the host now:
    steps and a load inside the context give the numbers of steps outside it."""
    params = [torch.nn.Parameter(torch.randn(300).to(dtype)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    inside = adamkit.Adam(params, backend=backend, **storage)
    outside = adamkit.Adam(twins, backend=backend, **storage)
    for t in range(4):
        for p, q in zip(params, twins):
            p.grad = torch.full_like(p, 0.5 + t)
            q.grad = torch.full_like(q, 0.5 + t)
        with torch.device("meta"):
            if t == 2:
                inside.load_state_dict(inside.state_dict())
            inside.step()
        outside.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))
    assert {v.device.type for st in inside.state.values() for v in st.values()} == {"cpu"}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_steps_and_loads_inference_params_as_any_others(backend, dtype):
    """Inference tensors have no version counter, which master's record of p's writes
    read: every step raised after it had written p and its state, and a load raised after
    it had replaced the state. Stepped in inference mode, they now move as plain tensors
    do (cached steps too), and a checkpoint loads into them."""
    with torch.inference_mode():
        p = (torch.randn(300, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    plain = p.clone()
    opts = [adamkit.Adam([q], lr=1e-3, backend=backend, param_update="master") for q in (p, plain)]
    for step in range(4):
        with torch.inference_mode():
            for q, opt in zip((p, plain), opts):
                q.grad = torch.full_like(q, 0.5 - step)
                opt.step()
    assert torch.equal(p, plain) and not torch.equal(p, p.new_zeros(300))
    for key, value in opts[1].state[plain].items():
        assert torch.equal(opts[0].state[p][key], value), key
    saved = opts[1].state_dict()
    opts[0].load_state_dict(saved)
    with torch.inference_mode():
        for q, opt in zip((p, plain), opts):
            q.grad = torch.ones_like(q)
            opt.step()
    assert torch.equal(p, plain)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_params_are_refused_before_anything_changes_as_torch_does(backend, dtype):
    """torch.optim has no kernel for float8 params (NotImplementedError); adamkit rounded
    every update to nearest, even where master or stochastic was asked for, and 3 mantissa
    bits dropped most of them."""
    q = torch.ones(4).to(dtype)
    q.grad = torch.ones(4).to(dtype)
    with pytest.raises(NotImplementedError):
        torch.optim.Adam([q], lr=0.1).step()
    f = torch.nn.Parameter(torch.ones(3))
    p = torch.ones(4).to(dtype)
    opt = adamkit.Adam([f, p], lr=0.1, backend=backend, param_update="master")
    f.grad, p.grad = torch.ones(3), torch.ones(4).to(dtype)
    with pytest.raises(NotImplementedError, match=f"dtype {dtype}"):
        opt.step()
    assert torch.equal(p.float(), torch.ones(4)) and torch.equal(f, torch.ones(3))
    assert not opt.state


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_complex32_params_are_refused_where_their_imaginary_parts_were_dropped(backend):
    """torch.optim steps complex32 (ComplexHalf) params; adamkit has no state format for
    them, and the auto and torch backends read them as real tensors: [0.5-1j] stepped to
    [0.3+0j]. Refused, clearly and before anything changes."""
    p = torch.tensor([0.5 - 1j, 2 + 1j]).to(torch.complex32)
    p.grad = torch.tensor([1 + 2j, -3 + 0.5j]).to(torch.complex32)
    before = p.clone()
    opt = adamkit.Adam([p], lr=0.1, backend=backend)
    with pytest.raises(NotImplementedError, match="dtype torch.complex32"):
        opt.step()
    assert torch.equal(torch.view_as_real(p), torch.view_as_real(before)) and not opt.state


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_one_optimizer_stepped_from_two_threads_steps_as_in_turn(backend):
    """The cached plan is the optimizer's: two threads stepping it at once emptied each
    other's grads (IndexError on the torch backend; NaN blocks from the GIL-free kernel;
    found by review). Steps now take turns: with the same grads every step, the result
    is that of the steps one after another, bit for bit."""
    import threading

    def make():
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5000, generator=g)) for _ in range(40)]
        opt = adamkit.Adam(ps, lr=1e-3, state_format="int8", int8_min_size=0, backend=backend)
        for p in ps:
            p.grad = torch.full_like(p, 0.5)
        opt.step()
        return ps, opt

    ps, opt = make()
    errors = []

    def stepper():
        try:
            for _ in range(30):
                opt.step()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=stepper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    serial_ps, serial = make()
    for _ in range(60):
        serial.step()
    for p, q in zip(ps, serial_ps):
        assert torch.equal(p, q)
        assert float(opt.state[p]["step"]) == 61


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("shape", [(3,), (64,)], ids=["other count", "same count"])
def test_a_later_moment_of_another_shape_raises_before_anything_changes(backend, key, shape):
    """Only exp_avg's shape was checked: an exp_avg_sq of 3 elements raised torch's
    broadcast error after the group before it had stepped, and one of 64 elements for
    an (8, 8) param stepped silently on the cpu kernel (found by review)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(8, 8, generator=g)) for _ in range(2))
    opt = adamkit.Adam([{"params": [a]}, {"params": [b]}], amsgrad=True, backend=backend)
    for p in (a, b):
        p.grad = torch.randn(8, 8, generator=g)
    opt.step()
    good = opt.state[b][key]
    opt.state[b][key] = torch.zeros(shape)
    snap = snapshot(opt, [a, b])
    with pytest.raises(RuntimeError, match=re.escape(f"has shape {shape}")):
        opt.step()
    assert_unchanged(opt, [a, b], snap)
    opt.state[b][key] = good
    opt.step()
    assert float(opt.state[a]["step"]) == float(opt.state[b]["step"]) == 2
