"""adamkit.functional.adam_step: the caller's own lists of tensors, checked before any
is updated, and the same numbers on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim._functional import adam as torch_adam

from adamkit.functional import adam_step
from registry import ALL_BACKENDS


def _lists(n: int = 2, dtype=torch.float32):
    ps = [torch.ones(3, dtype=dtype) for _ in range(n)]
    gs = [torch.full((3,), 0.5, dtype=dtype) for _ in range(n)]
    return ps, gs, [torch.zeros(3, dtype=dtype) for _ in range(n)], [torch.zeros(3, dtype=dtype) for _ in range(n)]


def _assert_unchanged(tensors, before):
    for t, b in zip(tensors, before):
        assert t.is_meta or torch.equal(t, b), "a tensor changed before the error"  # meta: no values


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_functional_moments_of_the_wrong_size_raise_instead_of_being_overrun(backend):
    """adamkit.functional takes the caller's moments: one shorter than its param was
    written past its end by the cpu kernel (a segfault at 1M elements)."""
    big = torch.zeros(8)
    p, g = torch.ones(3), torch.ones(3)
    with pytest.raises(RuntimeError):
        adam_step([p], [g], [big[:2]], [torch.zeros(2)], step=1, lr=0.1, backend=backend)
    assert torch.equal(big, torch.zeros(8))


def test_functional_moments_of_two_dtypes_match_the_torch_backend():
    """A float16 exp_avg_sq beside a bfloat16 exp_avg was read as bfloat16 by the kernel."""
    out = {}
    for backend in ("cpu", "torch"):
        p, g = torch.ones(5, dtype=torch.bfloat16), torch.full((5,), 0.5, dtype=torch.bfloat16)
        m = torch.full((5,), 0.1, dtype=torch.bfloat16)
        v = torch.full((5,), 0.5, dtype=torch.float16)
        adam_step([p], [g], [m], [v], step=2, lr=0.1, backend=backend)
        out[backend] = (p, m, v)
    for a, b in zip(out["cpu"], out["torch"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["grad None", "sparse grad", "int params", "step True", "late misfit"])
def test_functional_checks_every_tensor_before_updating_any(bad):
    """A bad entry anywhere in the lists raises before any param moves."""
    ps = [torch.ones(3), torch.ones(3)]
    gs = [torch.ones(3), torch.ones(3)]
    ms, vs = [torch.zeros(3), torch.zeros(3)], [torch.zeros(3), torch.zeros(3)]
    step = 1
    if bad == "grad None":
        gs[1] = None
    elif bad == "sparse grad":
        gs[1] = torch.ones(3).to_sparse()
    elif bad == "int params":
        ps[1] = torch.ones(3, dtype=torch.int64)
        gs[1] = torch.ones(3, dtype=torch.int64)
    elif bad == "step True":
        step = True
    else:
        vs[1] = torch.zeros(4)
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        adam_step(ps, gs, ms, vs, step=step, lr=0.1)
    assert torch.equal(ps[0], torch.ones(3)) and torch.equal(ms[0], torch.zeros(3))


ODD_DEVICE = ["grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "grad of a later bucket"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("odd", ODD_DEVICE)
def test_a_tensor_on_another_device_than_its_param_raises_torchs_error_first(backend, odd):
    """The cpu kernel read a meta grad or moment as CPU memory (a segfault); the other
    backends raised from torch's op after earlier buckets had moved."""
    ps, gs, ms, vs = _lists()
    ps[1], gs[1], ms[1], vs[1] = (t.double() for t in (ps[1], gs[1], ms[1], vs[1]))  # a second bucket
    maxs = [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]
    column = {"grad": gs, "exp_avg": ms, "exp_avg_sq": vs, "max_exp_avg_sq": maxs, "grad of a later bucket": gs}[odd]
    k = 1 if odd == "grad of a later bucket" else 0
    column[k] = torch.zeros(3, dtype=column[k].dtype, device="meta")
    before = [t.clone() for t in ps + ms + vs]
    with pytest.raises(RuntimeError, match="Tensor on device meta is not on the expected device cpu!"):
        adam_step(ps, gs, ms, vs, maxs, step=1, lr=0.1, amsgrad=True, backend=backend)
    _assert_unchanged(ps + ms + vs, before)


BAD_MOMENTS = {  # (param dtype, moment dtype, error)
    "int64 moment": (torch.float32, torch.int64, ValueError),
    "uint8 moment": (torch.float32, torch.uint8, ValueError),
    "bool moment": (torch.float32, torch.bool, ValueError),
    "complex moment of a real param": (torch.float32, torch.complex64, RuntimeError),
    "real moment of a complex param": (torch.complex64, torch.float32, RuntimeError),
    "complex128 moment of a complex64 param": (torch.complex64, torch.complex128, RuntimeError),
    "complex64 moment of a complex128 param": (torch.complex128, torch.complex64, RuntimeError),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("which", ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
@pytest.mark.parametrize("case", BAD_MOMENTS)
def test_a_moment_of_no_state_format_or_the_wrong_kind_raises_before_any_update(backend, which, case):
    """Integer and bool v were stepped as if v were 0 (params moved by lr·m̂/ε, 5e6 here),
    a real moment of a complex param dropped its imaginary part, and so did one of the
    other complex precision (1+1j stepped to 0.9+0j) on every backend but the reference."""
    pdtype, mdtype, error = BAD_MOMENTS[case]
    ps, gs, ms, vs = _lists(dtype=pdtype)
    maxs = [torch.zeros(3, dtype=pdtype) for _ in ps]
    {"exp_avgs": ms, "exp_avg_sqs": vs, "max_exp_avg_sqs": maxs}[which][1] = torch.zeros(3, dtype=mdtype)
    before = [t.clone() for t in ps + ms + vs]
    with pytest.raises(error, match="no state format" if error is ValueError else "complex"):
        adam_step(ps, gs, ms, vs, maxs, step=1, lr=0.1, amsgrad=True, backend=backend)
    _assert_unchanged(ps + ms + vs, before)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["inference", "expanded"])
@pytest.mark.parametrize("which", ["exp_avgs", "exp_avg_sqs"])
def test_a_moment_no_in_place_op_may_write_raises_torchs_error_first(backend, kind, which):
    """The cpu kernel wrote into an inference moment (torch's ops refuse), and the other
    backends refused it only after the exp_avg had moved."""
    ps, gs, ms, vs = _lists()
    if kind == "inference":
        with torch.inference_mode():
            bad = torch.zeros(3)
        message = "Inplace update to inference tensor outside InferenceMode"
    else:
        bad = torch.zeros(1).expand(3)
        message = "more than one element of the written-to tensor refers to a single memory"
    (ms if which == "exp_avgs" else vs)[1] = bad
    before = [t.clone() for t in ps + ms + vs]
    with pytest.raises(RuntimeError, match=message):
        adam_step(ps, gs, ms, vs, step=1, lr=0.1, backend=backend)
    _assert_unchanged(ps + ms + vs, before)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shared", [False, True], ids=["own moments", "shared moments"])
@pytest.mark.parametrize("decay", [{}, {"weight_decay": 0.5}, {"weight_decay": 0.5, "decouple_wd": True}],
                         ids=["no decay", "L2", "decoupled"])
def test_a_tensor_listed_twice_is_updated_once_per_listing_as_torchs_for_loop(backend, shared, decay):
    """The cpu and torch backends read both listings before writing (as torch's foreach),
    the reference updated them in turn (as torch's for-loop): 0.907 against 0.854 here."""
    def lists():
        p = torch.ones(4)
        m1, v1 = torch.zeros(4), torch.zeros(4)
        m2, v2 = (m1, v1) if shared else (torch.zeros(4), torch.zeros(4))
        return [p, p], [torch.full((4,), 0.5), torch.full((4,), -0.2)], [m1, m2], [v1, v2]

    ps, gs, ms, vs = lists()
    adam_step(ps, gs, ms, vs, step=1, lr=0.1, backend=backend, **decay)
    tp, tg, tm, tv = lists()
    torch_adam(tp, tg, tm, tv, [], [torch.tensor(0.0), torch.tensor(0.0)], foreach=False, amsgrad=False,
               beta1=0.9, beta2=0.999, lr=0.1, weight_decay=decay.get("weight_decay", 0.0), eps=1e-8,
               maximize=False, decoupled_weight_decay=decay.get("decouple_wd", False))
    for ours, theirs in zip(ps[:1] + ms + vs, tp[:1] + tm + tv):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ps[0], torch.ones(4)) or not decay  # the step did move it


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["overlapping rows", "interleaved columns"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["L2", "decoupled"])
def test_views_that_share_memory_are_updated_in_turn_as_torchs_for_loop(backend, layout, decoupled):
    """Two params that are views sharing elements (rows 0-5 and 3-8 of one buffer, or a
    column and the whole matrix) were stepped in one fused call, which read both before
    writing either: the shared elements' decay did not see the first update."""
    def lists():
        buf = torch.linspace(-1.0, 1.0, 24).reshape(8, 3)
        ps = [buf[0:5], buf[3:8]] if layout == "overlapping rows" else [buf[:, 1], buf]
        gs = [torch.linspace(0.2, 0.7, p.numel()).reshape(p.shape) for p in ps]
        return buf, ps, gs, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]

    buf, ps, gs, ms, vs = lists()
    for step in (1, 2):
        adam_step(ps, gs, ms, vs, step=step, lr=0.1, weight_decay=0.5, decouple_wd=decoupled,
                  backend=backend)
    tbuf, tp, tg, tm, tv = lists()
    steps = [torch.tensor(0.0) for _ in tp]
    for _ in range(2):
        torch_adam(tp, tg, tm, tv, [], steps, foreach=False, amsgrad=False, beta1=0.9,
                   beta2=0.999, lr=0.1, weight_decay=0.5, eps=1e-8, maximize=False,
                   decoupled_weight_decay=decoupled)
    torch.testing.assert_close(buf, tbuf, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(buf, lists()[0])


def test_views_into_one_flat_buffer_keep_one_bucket(monkeypatch):
    """Params that are views of one buffer (a flat-parameter layout) are not "listed
    twice": they step in one call, not one index at a time."""
    import adamkit.backends as backends

    flat = torch.ones(12)
    ps = list(flat.view(4, 3))
    gs = [torch.full((3,), 0.5) for _ in ps]
    calls = []
    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda *a: calls.append(a) or real(*a))
    adam_step(ps, gs, [torch.zeros(3) for _ in ps], [torch.zeros(3) for _ in ps], step=1, lr=0.1)
    assert len(calls) == 1
    torch.testing.assert_close(flat, torch.full((12,), 0.9))


@pytest.mark.parametrize("step", [np.int64(3), torch.tensor(3)], ids=["numpy-int64", "0-dim-tensor"])
def test_an_integer_step_of_numpy_or_torch_is_taken(step):
    """A step count kept as a NumPy int or an integer tensor (it was refused as no int)
    is the step it says: the same update as step=3."""
    outs = []
    for s in (step, 3):
        p, m, v = [torch.ones(4)], [torch.full((4,), 0.1)], [torch.full((4,), 0.01)]
        adam_step(p, [torch.full((4,), 0.5)], m, v, step=s, lr=0.1)
        outs.append(p[0])
    assert torch.equal(*outs)


@pytest.mark.parametrize("step", [0, True, 2.0, torch.tensor(2.0), np.float64(2.0), "2"])
def test_a_step_that_is_no_count_from_1_raises(step):
    with pytest.raises(ValueError, match="step is an int counted from 1"):
        adam_step([torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)], step=step)


def test_the_reference_refuses_complex_tensors():
    """The oracle squares g as g·g, which for a complex g is not |g|²: a complex param
    gave silently wrong moments; callers step its real view, as torch.optim does."""
    from adamkit.reference import adam_step as reference_step

    z = torch.zeros(2, dtype=torch.complex128)
    with pytest.raises(TypeError, match="view_as_real"):
        reference_step(z + 1, z + 1j, z, z.real, None, 1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)


# ---- what the functional step and the oracle refuse (from a mutation audit) ---------------

def _columns(n=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    return ([torch.randn(n, generator=gen, dtype=dtype)], [torch.randn(n, generator=gen, dtype=dtype)],
            [torch.zeros(n, dtype=dtype)], [torch.zeros(n, dtype=dtype)])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"backend": "bogus"}, ValueError, "Invalid backend: 'bogus'"),
    ({"amsgrad": True}, ValueError, "amsgrad=True needs max_exp_avg_sqs"),
    ({"lr": 1e39}, RuntimeError, "cannot be converted to type float without overflow"),
    ({"weight_decay": 1e39}, RuntimeError, "cannot be converted to type float without overflow"),
], ids=["backend", "amsgrad-without-max", "lr-beyond-float32", "decay-beyond-float32"])
def test_the_functional_step_refuses_what_it_cannot_run_before_any_write(kwargs, error, message):
    cols = _columns()
    before = [[t.clone() for t in c] for c in cols]
    with pytest.raises(error, match=message):
        adam_step(*cols, step=1, **kwargs)
    for c, b in zip(cols, before):
        assert all(torch.equal(t, u) for t, u in zip(c, b))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_views_that_share_one_element_are_updated_in_turn(backend):
    """The overlap test of views (their spans of memory) counts the last element: views
    b[0:3] and b[2:5] share b[2] only, and are stepped one after the other, as one index
    at a time gives."""
    def columns():
        buf = torch.linspace(-1.0, 1.0, 5)
        ps = [buf[0:3], buf[2:5]]
        return buf, ps, [torch.full((3,), 0.4), torch.full((3,), -0.3)], [torch.zeros(3) for _ in ps], \
            [torch.zeros(3) for _ in ps]
    buf, ps, gs, ms, vs = columns()
    adam_step(ps, gs, ms, vs, step=1, lr=0.1, weight_decay=0.5, backend=backend)
    tbuf, tp, tg, tm, tv = columns()
    for i in range(2):
        adam_step(tp[i:i + 1], tg[i:i + 1], tm[i:i + 1], tv[i:i + 1], step=1, lr=0.1, weight_decay=0.5,
                  backend=backend)
    assert torch.equal(buf, tbuf)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_two_params_sharing_their_moments_are_updated_in_turn(backend):
    """Moments one tensor for two params are written twice: one index after the other,
    as torch's for-loop (the alias scan covers the moment columns, not only params)."""
    def columns():
        m, v = torch.zeros(4), torch.zeros(4)
        return [torch.ones(4), torch.full((4,), 2.0)], [torch.full((4,), 0.5), torch.full((4,), -0.2)], [m, m], [v, v]
    ours = columns()
    adam_step(*ours, step=1, lr=0.1, backend=backend)
    theirs = columns()
    for i in range(2):
        adam_step(*[c[i:i + 1] for c in theirs], step=1, lr=0.1, backend=backend)
    for a, b in zip(ours, theirs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs, message", [
    ({"step": 0}, "step counts from 1"),
    ({"step": 1, "weight_decay": 0.1, "decouple_lr": True, "max_lr": 0.0}, "decouple_lr needs max_lr > 0"),
], ids=["step-0", "max_lr-0"])
def test_the_reference_refuses_a_step_it_does_not_define(kwargs, message):
    from adamkit import reference

    p, g = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        reference.adam_step(p, g, z, z, None, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, **kwargs)


@pytest.mark.parametrize("which, delta", [("exp_avg_sqs", 1), ("exp_avg_sqs", -1), ("max_exp_avg_sqs", 1),
                                          ("max_exp_avg_sqs", -1)])
def test_every_state_list_must_be_as_long_as_the_params(which, delta):
    """Each list is compared, the second moments' too (a mutant comparing the first three
    passed every test: a longer exp_avg_sqs went unnoticed, a shorter one raised
    IndexError midway)."""
    ps, gs, ms, vs = _lists(2)
    maxes = [torch.zeros(3) for _ in range(2)]
    lists = {"exp_avg_sqs": vs, "max_exp_avg_sqs": maxes}
    if delta > 0:
        lists[which].append(torch.zeros(3))
    else:
        lists[which].pop()
    before = [t.clone() for t in ps + ms]
    with pytest.raises(ValueError, match="same length"):
        adam_step(ps, gs, ms, vs, maxes, step=1, lr=0.1, amsgrad=True)
    _assert_unchanged(ps + ms, before)


def test_float64_tensor_betas_on_float32_params_step_as_torchs_for_loop():
    """torch's for-loop computes with a Tensor β in its own dtype where it meets the
    moments (cast to the param's dtype there): the functional step does the same
    (``for_param_dtype``), bit for bit on the torch backend."""
    betas = (torch.tensor(0.9123456789, dtype=torch.float64), torch.tensor(0.999, dtype=torch.float64))
    ps, gs, ms, vs = _columns()
    tp, tg, tm, tv = _columns()
    steps = [torch.tensor(0.0)]
    for step in range(1, 4):
        adam_step(ps, gs, ms, vs, step=step, lr=0.1, betas=betas, backend="torch")
        torch_adam(tp, tg, tm, tv, [], steps, foreach=False, amsgrad=False, beta1=betas[0], beta2=betas[1],
                   lr=0.1, weight_decay=0.0, eps=1e-8, maximize=False)
    for ours, theirs in zip(ps + ms + vs, tp + tm + tv):
        assert torch.equal(ours, theirs)
