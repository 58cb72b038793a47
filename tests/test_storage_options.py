"""The storage options: defaults, validation, and the memory they cost (state_bytes)."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

import adamkit
from adamkit.formats import param as fmt_param
from adamkit.formats import state as fmt_state
from adamkit.formats import stored_formats


def _stepped(p, **kwargs):
    opt = adamkit.Adam([p], **kwargs)
    p.grad = torch.ones_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("dtype,state_format,update,moment_dtype", [
    (torch.float64, "fp64", "nearest", torch.float64),
    (torch.float32, "fp32", "nearest", torch.float32),
    (torch.bfloat16, "bf16", "kahan", torch.bfloat16),
    (torch.float16, "fp32", "kahan", torch.float32),  # float16 state cannot hold ε = 1e-8
    (torch.complex64, "fp32", "nearest", torch.complex64),
], ids=str)
def test_defaults(dtype, state_format, update, moment_dtype):
    opt = _stepped(torch.nn.Parameter(torch.randn(5).to(dtype)))
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert stored_formats(st) == (state_format, update)
    assert st["exp_avg"].dtype == moment_dtype and st["exp_avg_sq"].dtype == moment_dtype


def test_param_update_is_ignored_for_float32():
    opt = _stepped(torch.nn.Parameter(torch.randn(5)), param_update="master")
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert stored_formats(st)[1] == "nearest" and "master_param" not in st


def test_nearest_bfloat16_with_bf16_state_has_no_buffers():
    opt = _stepped(torch.nn.Parameter(torch.randn(5).to(torch.bfloat16)), param_update="nearest")
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq", "state_format", "param_update"}


@pytest.mark.parametrize("kwargs,match", [
    ({"state_format": "int4"}, r"Invalid state_format: 'int4'; valid values are None, 'fp32', 'bf16', 'int8'"),
    ({"state_format": "float32"}, "Invalid state_format"),
    ({"param_update": "round"},
     r"Invalid param_update: 'round'; valid values are None, 'nearest', 'kahan', 'stochastic', 'master'"),
    ({"seed": 1.5}, "Invalid seed"),
    ({"seed": True}, "Invalid seed"),
    ({"int8_min_size": -1}, "Invalid int8_min_size"),
    ({"int8_min_size": 4.0}, "Invalid int8_min_size"),
])
def test_invalid_storage_options(kwargs, match):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=match):
        adamkit.Adam([p], **kwargs)
    opt = adamkit.Adam([p])
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=match):  # per group too, before anything is stored
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], **kwargs})
    assert opt.param_groups == before


def test_a_group_edited_into_an_invalid_choice_fails_before_any_change():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = adamkit.Adam([{"params": [a]}, {"params": [b]}])
    opt.param_groups[1]["state_format"] = "fp8"
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    before = a.detach().clone()
    with pytest.raises(ValueError, match="Invalid state_format"):
        opt.step()
    assert torch.equal(a, before) and len(opt.state) == 0


def test_adamw_takes_the_storage_options():
    p = torch.nn.Parameter(torch.randn(300, 20).to(torch.bfloat16))
    opt = adamkit.AdamW([p], state_format="int8", param_update="stochastic", seed=3, int8_min_size=10)
    p.grad = torch.ones_like(p)
    opt.step()
    st = opt.state[p]
    assert stored_formats(st) == ("int8", "stochastic")
    assert opt.param_groups[0]["decouple_wd"]


# ---- memory ----------------------------------------------------------------------------------

N = 256 * 1024  # a "large" tensor: per-element figures are the formats' own
STEP = 4 + 2 * 8  # per param: the float32 step counter and the two int64 tags


def _bytes(dtype, state_format=None, param_update=None, amsgrad=False):
    p = torch.nn.Parameter(torch.zeros(N, dtype=dtype))
    opt = _stepped(p, state_format=state_format, param_update=param_update, amsgrad=amsgrad)
    return opt.state_bytes(), opt.state_bytes(per_element=True)


@pytest.mark.parametrize("dtype,state_format,update,amsgrad,moment_bytes,buffer_bytes", [
    (torch.float32, "fp32", None, False, 2 * 4, 0),
    (torch.float32, "fp32", None, True, 3 * 4, 0),
    (torch.float32, "bf16", None, False, 2 * 2, 0),
    (torch.bfloat16, None, "nearest", False, 2 * 2, 0),
    (torch.bfloat16, None, "kahan", False, 2 * 2, 2),
    (torch.bfloat16, None, "master", False, 2 * 2, 4),
    (torch.bfloat16, "fp32", "kahan", False, 2 * 4, 2),
    (torch.float16, None, None, False, 2 * 4, 2),  # fp32 state, kahan
    (torch.float32, "int8", None, False, 2 * (1 + 4 / 256), 0),
    (torch.bfloat16, "int8", "kahan", False, 2 * (1 + 4 / 256), 2),
    (torch.bfloat16, "int8", "master", True, 3 * (1 + 4 / 256), 4),
], ids=str)
def test_state_bytes(dtype, state_format, update, amsgrad, moment_bytes, buffer_bytes):
    """Bytes per element from formats.md: fp32 4 and bf16 2 per moment, int8 1 plus a
    float32 scale per 256; kahan a param-dtype buffer, master a float32 one."""
    total, per_element = _bytes(dtype, state_format, update, amsgrad)
    assert total == N * (moment_bytes + buffer_bytes) + STEP
    assert per_element == pytest.approx(moment_bytes + buffer_bytes, abs=1e-4)


def test_state_bytes_headline_figures():
    """The figures docs/precision.md quotes for large tensors: 8 fp32, 4 bf16, ≤ 2.05
    int8 (+2 kahan, +4 master with bfloat16 params)."""
    assert _bytes(torch.float32, "fp32")[1] == pytest.approx(8, abs=1e-4)
    assert _bytes(torch.bfloat16, "bf16", "nearest")[1] == pytest.approx(4, abs=1e-4)
    assert _bytes(torch.float32, "int8")[1] <= 2.05
    nearest = _bytes(torch.bfloat16, "bf16", "nearest")[1]
    assert _bytes(torch.bfloat16, "bf16", "kahan")[1] - nearest == pytest.approx(2)
    assert _bytes(torch.bfloat16, "bf16", "master")[1] - nearest == pytest.approx(4)


def test_state_bytes_counts_every_param_and_small_int8_tensors_as_fp32():
    big = torch.nn.Parameter(torch.zeros(8192))
    small = torch.nn.Parameter(torch.zeros(100))
    idle = torch.nn.Parameter(torch.zeros(50))  # no grad: no state, not counted
    opt = adamkit.Adam([big, small, idle], state_format="int8")
    assert opt.state_bytes() == 0 and opt.state_bytes(per_element=True) == 0.0
    big.grad, small.grad = torch.ones(8192), torch.ones(100)
    opt.step()
    expected = (2 * 8192 + 2 * 4 * math.ceil(8192 / fmt_state.BLOCK)) + 2 * 4 * 100 + 2 * STEP
    assert opt.state_bytes() == expected
    assert opt.state_bytes(per_element=True) == pytest.approx(expected / 8292)
    opt.state[idle].get("step")  # reading the state's defaultdict stores {} for idle
    assert opt.state_bytes(per_element=True) == pytest.approx(expected / 8292)


def _master_opt(backend, n=300, **kwargs):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n).bfloat16())
    return p, adamkit.Adam([p], lr=1e-3, param_update="master", backend=backend, **kwargs)


def _grad_step(opt, p, k):
    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(k)).bfloat16()
    opt.step()


@pytest.fixture
def swap_on_conversion():
    """torch.__future__'s mode in which nn.Module's load_state_dict and .to() swap each
    param's tensor for a new one (torch.utils.swap_tensors) instead of writing into it."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


def _load_into(p, new):
    holder = torch.nn.Module()
    holder.w = p
    holder.load_state_dict({"w": new})


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
@pytest.mark.parametrize("write", ["no_grad", "load_state_dict", "swapped", "init"])
def test_master_follows_a_param_written_in_place(backend, write, request):
    """With "master" the float32 copy is what the step updates; a write to p in place
    (a model checkpoint loaded into it, nn.init, an in-place op) was undone by the next
    step (p ← round(master)). Such a write bumps p's version counter: master restarts
    from the new p, with the moments kept. The same for a tensor swapped in (the record
    of p's versions held a weak reference to p, which swap_tensors refused)."""
    p, opt = _master_opt(backend)
    for k in range(3):  # cached steps, on the kernel's path
        _grad_step(opt, p, k)
    new = torch.full_like(p, 5.0)
    if write == "no_grad":
        with torch.no_grad():
            p.copy_(new)
    elif write == "load_state_dict":
        _load_into(p, new)
    elif write == "swapped":
        request.getfixturevalue("swap_on_conversion")
        _load_into(p, new)
    else:
        torch.nn.init.constant_(p, 5.0)
    m_before = opt.state[p]["exp_avg"].clone()
    _grad_step(opt, p, 3)
    master = opt.state[p]["master_param"]
    assert (master - 5.0).abs().max() <= 2e-3  # one Adam step of lr 1e-3 from 5.0
    assert torch.equal(p, master.bfloat16())
    assert not torch.equal(opt.state[p]["exp_avg"], torch.zeros_like(m_before))  # moments kept


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("swapped", [False, True])
def test_master_follows_a_param_written_after_a_load(backend, swapped):
    """Optimizer loaded first (master made from p then), the model's weights after it:
    the first step starts from the loaded weights. Swapped in (torch.utils.swap_tensors),
    the new tensor's version counter can be the one p had at the load (0 both here):
    which tensor p holds tells."""
    p, opt = _master_opt(backend)
    _grad_step(opt, p, 0)
    sd = opt.state_dict()
    q, fresh = _master_opt(backend)
    fresh.load_state_dict(sd)
    if swapped:
        version = q._version
        torch.utils.swap_tensors(q, torch.nn.Parameter(torch.full_like(q, -2.0)))
        assert q._version == version
    else:
        with torch.no_grad():
            q.fill_(-2.0)
    _grad_step(fresh, q, 1)
    assert (fresh.state[q]["master_param"] + 2.0).abs().max() <= 2e-3


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_masters_record_keeps_no_param_alive(backend):
    """The record of master params' writes holds its params (no weak references, which
    swap_tensors refuses): one taken out of its group with its state is dropped from it."""
    p, opt = _master_opt(backend)
    q = torch.nn.Parameter(torch.randn(300).bfloat16())
    opt.param_groups[0]["params"].append(q)
    for k in range(2):
        q.grad = torch.ones_like(q)
        _grad_step(opt, p, k)
    opt.param_groups[0]["params"] = [p]
    del opt.state[q]
    _grad_step(opt, p, 2)
    gone = weakref.ref(q)
    del q
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_master_is_not_reseeded_by_the_optimizers_own_steps(backend):
    """The optimizer's own writes bump p's version too; a re-plan after cached steps must
    not take them for a user's write (master would lose its low bits to p's rounding)."""
    p, opt = _master_opt(backend)
    q, ref = _master_opt(backend)
    for k in range(7):
        if k in (3, 5):  # a change that re-plans and alters no number
            opt.param_groups[0]["int8_min_size"] += 1
        _grad_step(opt, p, k)
        _grad_step(ref, q, k)
    assert torch.equal(opt.state[p]["master_param"], ref.state[q]["master_param"])
    assert not torch.equal(opt.state[p]["master_param"], p.float())  # master holds more than p


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_master_keeps_its_bits_where_an_in_place_write_left_p_as_it_was(backend):
    """A write to some elements (a pruning mask) re-seeds those only: the others keep
    master's extra bits, as does a write of p's own values (both p and master restored
    by hand, or a broadcast of equal weights)."""
    p, opt = _master_opt(backend)
    for k in range(3):
        _grad_step(opt, p, k)
    master = opt.state[p]["master_param"].clone()
    assert not torch.equal(master, p.float())
    with torch.no_grad():
        p[:10] = 0.0
        p.copy_(p.clone())  # the same values again
    opt.param_groups[0]["lr"] = 0.0  # a step that moves nothing: master as re-seeded
    _grad_step(opt, p, 3)
    now = opt.state[p]["master_param"]
    assert torch.equal(now[:10], torch.zeros(10)) and torch.equal(now[10:], master[10:])


@pytest.mark.parametrize("change", [{"state_format": "fp32"}, {"state_format": "int8"},
                                    {"param_update": "kahan"}, {"param_update": "nearest"}],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_a_write_to_p_survives_a_storage_change_in_the_same_interval(change):
    """The re-seed ran only when the state kept its storage: with the group changed too,
    the conversion took the stale master (master→kahan made p + comp the old master)."""
    p, opt = _master_opt("cpu", n=5000)
    _grad_step(opt, p, 0)
    with torch.no_grad():
        p.fill_(5.0)
    opt.param_groups[0].update(change, lr=0.0)
    _grad_step(opt, p, 1)
    assert torch.equal(p.detach(), torch.full_like(p, 5.0))
    if "kahan_comp" in opt.state[p]:
        theta = fmt_param.theta_eff(p.detach(), opt.state[p], "kahan", torch.float32)
        assert torch.equal(theta, torch.full((5000,), 5.0))  # p + comp: not the old master


@pytest.mark.parametrize("copy_how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_follows_a_write_to_p(copy_how):
    """The record of versions does not travel with a copy (torch's __getstate__ keeps
    defaults, state and groups only); after it, master counted as in sync with nothing."""
    import copy
    import io

    p, opt = _master_opt("cpu")
    for k in range(2):
        _grad_step(opt, p, k)
    if copy_how == "deepcopy":
        p, opt = copy.deepcopy((p, opt))
    else:
        buf = io.BytesIO()
        torch.save((p, opt), buf)
        buf.seek(0)
        p, opt = torch.load(buf, weights_only=False)
    torch.nn.init.constant_(p, 3.0)
    opt.param_groups[0]["lr"] = 0.0
    _grad_step(opt, p, 2)
    assert torch.equal(p.detach(), torch.full_like(p, 3.0))


def test_master_views_of_one_tensor_keep_the_cached_plan(monkeypatch):
    """Views of one tensor share a version counter: recorded after each bucket, a later
    bucket's write made an earlier one's params look written, and every other step
    re-planned (the numbers were right, the plan was not reused)."""
    flat = torch.randn(8192).bfloat16()
    a, b = torch.nn.Parameter(flat[:4096]), torch.nn.Parameter(flat[4096:])
    opt = adamkit.Adam([{"params": [a]}, {"params": [b], "lr": 2e-3}], lr=1e-3,
                       param_update="master")
    plans = []
    planned = adamkit.Adam._planned_step
    monkeypatch.setattr(adamkit.Adam, "_planned_step", lambda o, *x: plans.append(1) or planned(o, *x))
    for k in range(6):
        a.grad, b.grad = torch.full_like(a, 0.1 * (k + 1)), torch.full_like(b, -0.1)
        opt.step()
    assert len(plans) == 1
