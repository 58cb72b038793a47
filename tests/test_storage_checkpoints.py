"""Checkpoints describe their storage and convert into the loading optimizer's
(docs/design/formats.md, "Checkpoints"): every pair of registry.STORAGE of one param
dtype, round trips, tags and their absence, and checkpoints that cannot convert.
torch.optim's checkpoints, both ways: test_torch_optim_checkpoints.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import adamkit
from adamkit.formats import param as policy
from adamkit.formats import state as fmt_state
from adamkit import formats
from adamkit.formats import stored_formats
from registry import STORAGE
from storage_helpers import MOMENTS, make_opt, make_params, read_moment, train, with_legacy_tags
from test_checkpoints import _assert_unchanged, _save_load, _snapshot


PAIRS = [(a, b) for a in STORAGE for b in STORAGE if a.dtype == b.dtype]


@pytest.mark.parametrize("src,dst", PAIRS, ids=[f"{a.id}->{b.id}" for a, b in PAIRS])
def test_every_conversion_follows_the_spec(src, dst):
    """Moments: the same format is copied exactly; otherwise decoded to float32 and
    encoded in the new one. Buffers: none→kahan 0, none→master p, kahan→master p + comp,
    master→kahan round(master − p), dropped for nearest/stochastic; sr_seed kept, or
    derived from the loading optimizer's seed and the param's index."""
    params = make_params(src.dtype)
    opt = make_opt(params, src)
    train(params, opt, 3)
    saved = _save_load(opt.state_dict())["state"]
    loaded = make_opt(params, dst)
    loaded.load_state_dict(_save_load(opt.state_dict()))
    for index, p in enumerate(params):
        s, d = saved[index], loaded.state[p]
        assert stored_formats(d) == (dst.state_format, dst.param_update)
        assert float(d["step"]) == 3
        for name in MOMENTS:
            if src.state_format == dst.state_format:
                assert torch.equal(d[name], s[name])
                if dst.state_format == "int8":
                    assert torch.equal(d[f"{name}_scale"], s[f"{name}_scale"])
            elif dst.state_format == "fp32":  # widening from bf16 or int8 is exact
                assert torch.equal(d[name], read_moment(s, name))
            elif dst.state_format == "bf16":
                assert torch.equal(d[name], read_moment(s, name).to(torch.bfloat16))
            else:
                codes, scale = fmt_state.encode(read_moment(s, name), fmt_state.CODE_MAPS[name])
                assert torch.equal(d[name], codes) and torch.equal(d[f"{name}_scale"], scale)
        _check_buffers(p, s, d, src.param_update, dst.param_update, index)
    train(params, loaded, 1)  # and it steps
    assert stored_formats(loaded.state[params[0]])[0] == dst.state_format


def _check_buffers(p, s, d, src, dst, index):
    """formats.md's table of buffer conversions, written out."""
    theta = p.detach().float()
    if src == "kahan":
        saved_theta = theta + s["kahan_comp"].float()
    elif src == "master":
        saved_theta = s["master_param"]
    else:
        saved_theta = theta
    expected = {}
    if dst == "kahan":
        expected["kahan_comp"] = s["kahan_comp"] if src == "kahan" else (saved_theta - theta).to(p.dtype)
    elif dst == "master":
        expected["master_param"] = saved_theta
    elif dst == "stochastic":
        seed = s["sr_seed"] if src == "stochastic" else torch.tensor(policy.sr_seed(5, index))
        expected["sr_seed"] = seed
    assert {"kahan_comp", "master_param", "sr_seed"} & d.keys() == expected.keys()
    for key, value in expected.items():
        assert d[key].dtype == value.dtype and torch.equal(d[key], value), key


@pytest.mark.parametrize("storage", STORAGE, ids=lambda s: s.id)
def test_round_trip_resumes_bit_for_bit(storage):
    """Save (weights_only), load into a fresh optimizer of the same storage, go on: the
    same as never stopping, to the bit (stochastic rounding included: its bits depend on
    seed, index and step only)."""
    params = make_params(storage.dtype)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = make_opt(params, storage)
    train(params, opt, 4)
    with torch.no_grad():
        for a, b in zip(twin, params):
            a.copy_(b)
    twin_opt = make_opt(twin, storage, weight_decay=0.3)  # hyperparameters come from the dict
    twin_opt.load_state_dict(_save_load(opt.state_dict()))
    assert twin_opt.param_groups[0]["weight_decay"] == 0.0
    train(params, opt, 3, seed=9)
    train(twin, twin_opt, 3, seed=9)
    for a, b in zip(params, twin):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            other = twin_opt.state[b][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


@pytest.mark.parametrize("storage", STORAGE, ids=lambda s: s.id)
def test_a_checkpoint_with_str_tags_loads_as_its_tensor_tagged_twin(storage):
    """Earlier versions saved each state's tags as str ("int8", "kahan"): such a
    checkpoint loads into every storage exactly as the same checkpoint with today's tag
    tensors, and the loaded state holds tag tensors."""
    params = make_params(storage.dtype)
    opt = make_opt(params, storage)
    train(params, opt, 2)
    for dst in (s for s in STORAGE if s.dtype == storage.dtype):
        loaded = []
        for sd in (opt.state_dict(), with_legacy_tags(opt.state_dict(), opt)):
            twin = make_opt(params, dst)
            twin.load_state_dict(_save_load(sd))
            loaded.append(twin)
        assert isinstance(with_legacy_tags(opt.state_dict(), opt)["state"][0]["state_format"], str)
        for p in params:
            a, b = loaded[0].state[p], loaded[1].state[p]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert stored_formats(b) == (dst.state_format, dst.param_update)
            assert b["state_format"].dtype == torch.int64


@pytest.mark.parametrize("storage", STORAGE, ids=lambda s: s.id)
def test_a_state_without_tags_is_read_from_its_tensors(storage):
    """A state dict whose tags were removed (a state built by code) loads as the tagged
    one into every storage: uint8 codes with scales are int8, float moments their dtype's
    format, the buffer held (kahan_comp, master_param, sr_seed) says the policy."""
    params = make_params(storage.dtype)
    opt = make_opt(params, storage)
    train(params, opt, 2)
    untagged = copy.deepcopy(opt.state_dict())
    for st in untagged["state"].values():
        del st["state_format"], st["param_update"]
    assert formats.stored_formats(untagged["state"][0]) == (storage.state_format, storage.param_update)
    for dst in (s for s in STORAGE if s.dtype == storage.dtype):
        a, b = make_opt(params, dst), make_opt(params, dst)
        a.load_state_dict(_save_load(opt.state_dict()))
        b.load_state_dict(_save_load(untagged))
        for p in params:
            assert a.state[p].keys() == b.state[p].keys()
            assert all(torch.equal(v, b.state[p][k]) for k, v in a.state[p].items())


def test_an_untagged_state_with_two_policies_buffers_reads_the_configured_policys():
    """kahan_comp and master_param in one untagged state: a load into kahan reads the
    Kahan buffer, into master the master copy, and into nearest drops both."""
    params = make_params(torch.bfloat16)
    kahan = make_opt(params, next(s for s in STORAGE if s.id == "bfloat16-bf16-kahan"))
    train(params, kahan, 2)
    sd = copy.deepcopy(kahan.state_dict())
    masters = {}
    for i, st in sd["state"].items():
        del st["state_format"], st["param_update"]
        masters[i] = st["master_param"] = torch.randn(params[i].shape)
    for update, check in (("kahan", lambda st, i: torch.equal(st["kahan_comp"], sd["state"][i]["kahan_comp"])),
                          ("master", lambda st, i: torch.equal(st["master_param"], masters[i])),
                          ("nearest", lambda st, i: "kahan_comp" not in st and "master_param" not in st)):
        loaded = adamkit.Adam(params, lr=1e-2, state_format="bf16", param_update=update)
        loaded.load_state_dict(_save_load(sd))
        assert all(check(loaded.state[p], i) for i, p in enumerate(params)), update
        assert all(stored_formats(loaded.state[p]) == ("bf16", update) for p in params)


def _mutations():
    def unknown_format(sd):
        sd["state"][0]["state_format"] = "int4"

    # tags as earlier versions saved them: they decide (the tensors are checked against them)
    def unknown_update(sd):
        sd["state"][0].update(state_format="int8", param_update="sometimes")

    def listed_format(sd):  # unhashable: a TypeError from the lookup
        sd["state"][0]["state_format"] = ["int8"]

    def unknown_format_code(sd):
        sd["state"][0]["state_format"] = torch.tensor(9)

    def format_code_of_two_elements(sd):
        sd["state"][0]["state_format"] = torch.tensor([2, 2])

    def format_code_as_bool(sd):
        sd["state"][0]["state_format"] = torch.tensor(True)

    def unknown_update_code(sd):
        sd["state"][0]["param_update"] = torch.tensor(-1)

    def listed_update(sd):
        sd["state"][0].update(state_format="int8", param_update=["kahan"])

    def missing_scale(sd):
        del sd["state"][0]["exp_avg_scale"]

    def wrong_scale_shape(sd):
        sd["state"][0]["exp_avg_sq_scale"] = torch.zeros(99)

    def float_codes(sd):
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].float()

    def wrong_code_shape(sd):
        sd["state"][0]["exp_avg"] = torch.zeros(3, 3, dtype=torch.uint8)

    def wrong_comp_shape_late(sd):  # the last param: everything before it is valid
        sd["state"][1]["kahan_comp"] = torch.zeros(2, dtype=torch.bfloat16)

    def tagged_kahan_without_comp(sd):  # (untagged, it is a "nearest" state: comp = 0)
        sd["state"][0].update(state_format="int8", param_update="kahan")
        del sd["state"][0]["kahan_comp"]

    def bad_sr_seed(sd):
        sd["state"][0]["param_update"] = "stochastic"
        sd["state"][0]["sr_seed"] = torch.zeros(3, dtype=torch.int64)

    def complex_sr_seed(sd):  # cast to int64 it lost its imaginary part, silently
        sd["state"][0]["param_update"] = "stochastic"
        sd["state"][0]["sr_seed"] = torch.tensor(3 + 4j)

    def bool_sr_seed(sd):
        sd["state"][0]["param_update"] = "stochastic"
        sd["state"][0]["sr_seed"] = torch.tensor(True)

    def text_sr_seed(sd):  # was replaced by the loading optimizer's, silently
        sd["state"][0]["param_update"] = "stochastic"
        sd["state"][0]["sr_seed"] = "12345"

    # scales no encoder writes (they made NaN params, or v silently the block's max)
    def negative_scale(sd):
        sd["state"][0]["exp_avg_sq_scale"] = -sd["state"][0]["exp_avg_sq_scale"]

    def minus_inf_scale(sd):  # an encoder writes NaN and +∞ (non-finite blocks), never −∞
        sd["state"][0]["exp_avg_scale"][0] = -float("inf")

    def integer_scale(sd):
        sd["state"][0]["exp_avg_sq_scale"] = sd["state"][0]["exp_avg_sq_scale"].long()

    def huge_scale(sd):  # finite, but above max float32 / M: its codes decoded to ∞
        sd["state"][0]["exp_avg_sq_scale"][0] = 1e36

    def subnormal_scale(sd):  # below the floor's 2^-126
        sd["state"][0]["exp_avg_scale"][0] = 2.0**-130

    def zero_scale_beside_codes(sd):  # a fresh state's 0, but its block holds codes: v read as 0 there
        st = sd["state"][0]
        assert bool(st["exp_avg_sq"].reshape(-1)[:256].any())
        st["exp_avg_sq_scale"][0] = 0.0

    def integer_comp(sd):  # a buffer of param values in an integer dtype was cast in
        sd["state"][0]["kahan_comp"] = sd["state"][0]["kahan_comp"].long()

    # step counts the step cannot use: NaN and ∞ loaded and then failed every step
    def nan_step(sd):
        sd["state"][0]["step"] = torch.tensor(float("nan"))

    def infinite_step_late(sd):
        sd["state"][1]["step"] = float("inf")

    def fractional_step(sd):
        sd["state"][0]["step"] = torch.tensor(2.5)

    def negative_step(sd):
        sd["state"][0]["step"] = -1

    def text_step(sd):
        sd["state"][0]["step"] = "two"

    def two_element_step(sd):
        sd["state"][0]["step"] = torch.tensor([1.0, 2.0])

    def step_beyond_float32(sd):  # the float32 counter rounded it to ∞: every step failed
        sd["state"][0]["step"] = torch.tensor(1e39, dtype=torch.float64)

    def step_beyond_float64(sd):  # an int no float holds (OverflowError)
        sd["state"][1]["step"] = 10**400

    def state_not_a_dict(sd):
        sd["state"][0] = sd["state"][0]["exp_avg"]

    def state_none(sd):  # torch.optim loads it and fails at the next step (TypeError)
        sd["state"][1] = None

    return [unknown_format, unknown_update, listed_format, listed_update, unknown_format_code,
            format_code_of_two_elements, format_code_as_bool, unknown_update_code, missing_scale, wrong_scale_shape, float_codes,
            wrong_code_shape, wrong_comp_shape_late, tagged_kahan_without_comp, bad_sr_seed,
            negative_scale, minus_inf_scale, integer_scale, huge_scale, subnormal_scale,
            zero_scale_beside_codes, integer_comp,
            nan_step, infinite_step_late, fractional_step, negative_step, text_step,
            two_element_step, step_beyond_float32, step_beyond_float64, state_not_a_dict, state_none,
            complex_sr_seed, bool_sr_seed, text_sr_seed]


@pytest.mark.parametrize("target", ["bfloat16-int8-kahan", "bfloat16-fp32-master",
                                    "bfloat16-bf16-stochastic"])
@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_unconvertible_checkpoint_raises_and_changes_nothing(mutate, target):
    """A bfloat16 int8/kahan checkpoint, spoiled; loading it into an optimizer (target) with
    state raises ValueError and leaves params, state and groups as they were."""
    source = next(s for s in STORAGE if s.id == "bfloat16-int8-kahan")
    storage = next(s for s in STORAGE if s.id == target)
    params = make_params(torch.bfloat16)
    opt = make_opt(params, source)
    train(params, opt, 2)
    bad = copy.deepcopy(opt.state_dict())
    mutate(bad)
    target_opt = make_opt(params, storage)
    train(params, target_opt, 1, seed=3)
    snap = _snapshot(target_opt)
    before = [p.detach().clone() for p in params]
    if mutate.__name__.endswith("sr_seed") and storage.param_update != "stochastic":
        target_opt.load_state_dict(bad)  # an sr_seed nobody reads is dropped, not checked
        return
    if (mutate.__name__ in ("tagged_kahan_without_comp", "wrong_comp_shape_late", "integer_comp")
            and storage.param_update == "stochastic"):
        target_opt.load_state_dict(bad)  # kahan → stochastic drops the buffer unread
        return
    with pytest.raises(ValueError, match="loaded state for parameter"):
        target_opt.load_state_dict(bad)
    _assert_unchanged(target_opt, snap)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"])
def test_a_block_with_a_fresh_states_zero_scale_and_zero_codes_loads(name):
    """A 0 scale is a fresh state's, whose codes all decode to 0 (m's code 128, −0, too):
    such a block loads and reads 0, while a 0 beside other codes is refused (the
    mutations above)."""
    p = torch.nn.Parameter(torch.randn(4 * 256))
    opt = adamkit.Adam([p], state_format="int8", int8_min_size=0)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    st = sd["state"][0]
    st[name][:256] = 0
    if name == "exp_avg":
        st[name][:128] = 128
    st[f"{name}_scale"][0] = 0.0
    opt.load_state_dict(sd)
    assert float(opt.state[p][f"{name}_scale"][0]) == 0.0
    assert not opt.torch_state_dict()["state"][0][name][:256].any()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_checkpoint_whose_blocks_went_nan_or_infinite_round_trips(backend):
    """A NaN and an ∞ gradient give their int8 blocks scale NaN and +∞ (formats.md): what
    the optimizer saved then must load (it was refused as a damaged checkpoint), into the
    same state, from which both step alike."""
    p = torch.nn.Parameter(torch.randn(4 * 256))
    opt = adamkit.Adam([p], backend=backend, state_format="int8", int8_min_size=0)
    p.grad = torch.randn_like(p)
    opt.step()
    p.grad = torch.randn_like(p)
    p.grad[[5, 300]] = torch.tensor([float("nan"), float("inf")])
    opt.step()
    scale = opt.state[p]["exp_avg_scale"]
    assert scale[0].isnan() and scale[1] == float("inf") and scale[2:].isfinite().all()
    q = torch.nn.Parameter(p.detach().clone())
    loaded = adamkit.Adam([q], backend=backend, state_format="int8", int8_min_size=0)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key, value in opt.state[p].items():
        if isinstance(value, torch.Tensor):
            mine = loaded.state[q][key]
            assert torch.equal(mine.isnan(), value.isnan()) and torch.equal(mine.nan_to_num(), value.nan_to_num()), key
    g = torch.randn_like(p)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    loaded.step()
    assert torch.equal(p.isnan(), q.isnan()) and torch.equal(p.nan_to_num(), q.nan_to_num())
    assert p[512:].isfinite().all()  # the untouched blocks stay finite


def test_changing_the_group_storage_converts_at_the_next_step():
    params = make_params(torch.bfloat16)
    opt = adamkit.Adam(params, lr=1e-2, int8_min_size=0)
    train(params, opt, 2)
    assert stored_formats(opt.state[params[0]])[1] == "kahan"
    m = read_moment(opt.state[params[0]], "exp_avg")
    opt.param_groups[0].update(state_format="int8", param_update="master")
    opt.param_groups[0]["lr"] = 0.0  # a step that leaves the moments' conversion visible
    opt.param_groups[0]["betas"] = (0.0, 0.999)
    params[0].grad = torch.zeros_like(params[0])
    comp = opt.state[params[0]]["kahan_comp"].float()
    theta = params[0].detach().float()
    opt.step()
    st = opt.state[params[0]]
    assert stored_formats(st) == ("int8", "master")
    assert torch.equal(st["master_param"], theta + comp)  # kahan → master, then lr = 0
    assert float(st["step"]) == 3 and (m.abs().max() > 0)


def test_optimizer_pickled_before_formats_still_steps():
    """Groups without the storage keys and untagged float16 state (an older adamkit): the
    defaults fill in, and the state is converted (float16 params: fp32 state, kahan)."""
    p = torch.nn.Parameter(torch.randn(10).to(torch.float16))
    opt = adamkit.Adam([p], lr=1e-2)
    old = {"step": torch.tensor(2.0), "exp_avg": torch.full((10,), 0.5, dtype=torch.float16),
           "exp_avg_sq": torch.full((10,), 0.25, dtype=torch.float16)}
    state = opt.__getstate__()
    for key in ("state_format", "param_update", "seed", "int8_min_size"):
        state["defaults"].pop(key)
        state["param_groups"][0].pop(key)
    state["state"] = {p: old}
    opt.__setstate__(state)
    assert opt.param_groups[0]["int8_min_size"] == 4096
    p.grad = torch.ones(10, dtype=torch.float16)
    opt.step()
    st = opt.state[p]
    assert (*stored_formats(st), float(st["step"])) == ("fp32", "kahan", 3.0)
    assert st["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(st["exp_avg"], torch.full((10,), 0.9 * 0.5 + 0.1, dtype=torch.float32))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_float64_moments_in_bf16_round_once(backend):
    """A float64 param with bf16 moments: m = 1 + 2^-8 + 2^-40 lies just above a bf16
    midpoint, which float64 → float32 rounds onto, and float32 → bf16 then ties to even:
    1.0 where the correct rounding is 1.0078125 (the reference had it right, the torch
    backend, which the cpu backend hands float64 to, and a load conversion did not)."""
    x = 1 + 2**-8 + 2**-40
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = adamkit.Adam([p], betas=(0.0, 0.999), state_format="bf16", backend=backend)
    p.grad = torch.full((4,), x, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["exp_avg"].tolist() == [1.0078125] * 4
    q = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    plain = adamkit.Adam([q], betas=(0.0, 0.999), backend=backend)
    q.grad = torch.full((4,), x, dtype=torch.float64)
    plain.step()
    into_bf16 = adamkit.Adam([q], state_format="bf16", backend=backend)
    into_bf16.load_state_dict(plain.state_dict())
    assert into_bf16.state[q]["exp_avg"].tolist() == [1.0078125] * 4


def test_reference_master_keeps_the_param_its_masters_rounding():
    """The reference computes θ_new in float64 and rounded p from it, while master held
    float32(θ_new): where those disagree (double rounding, about 4e-6 of elements),
    p ≠ round(master), and the next write anywhere in p made master restart from p
    there. p is now round(master) on every backend."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2**18, generator=gen).bfloat16())
    opt = adamkit.Adam([p], lr=1e-3, param_update="master", backend="reference")
    for _ in range(5):
        p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        opt.step()
        assert torch.equal(p.detach(), opt.state[p]["master_param"].to(torch.bfloat16))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_complex_params_whose_precision_changed_convert_their_state(backend):
    """Complex params keep state like the param: after model.to(complex128), and from a
    torch.optim checkpoint of complex64 params into complex128 ones, the complex64
    moments convert, as float32 ones do for a float64 param (the tag check compared them
    with the new param's dtype and refused them)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=gen))
    twin = torch.nn.Parameter(p.detach().clone())
    mine, theirs = adamkit.Adam([p], backend=backend), torch.optim.Adam([twin])
    for _ in range(2):
        g = torch.randn(5, dtype=torch.complex64, generator=gen)
        p.grad, twin.grad = g.clone(), g.clone()
        mine.step()
        theirs.step()
    wide = torch.nn.Parameter(twin.detach().to(torch.complex128))
    loaded = adamkit.Adam([wide], backend=backend)
    loaded.load_state_dict(_save_load(theirs.state_dict()))
    assert loaded.state[wide]["exp_avg"].dtype == torch.complex128
    assert torch.equal(loaded.state[wide]["exp_avg"], theirs.state[twin]["exp_avg"].to(torch.complex128))
    p.data = p.data.to(torch.complex128)  # model.to(torch.complex128) keeps the Parameter
    p.grad = torch.ones(5, dtype=torch.complex128)
    m = mine.state[p]["exp_avg"].clone()
    mine.step()
    assert mine.state[p]["exp_avg"].dtype == torch.complex128 and stored_formats(mine.state[p])[0] == "fp64"
    torch.testing.assert_close(mine.state[p]["exp_avg"], 0.9 * m.to(torch.complex128) + 0.1)


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
@pytest.mark.parametrize("cached", [False, True], ids=["after one step", "cached steps"])
def test_master_restarted_by_a_write_to_its_param_is_saved_so(backend, cached):
    """A write to p in place (pruning, re-initialising) restarts master from p at the
    next step. state_dict() saved the stale master, and a load declares master and p in
    sync: the resumed run put the old weights back (max |p| 4.09 against 0.001)."""
    def make(p):
        return adamkit.Adam([p], lr=1e-3, param_update="master", backend=backend)

    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000, generator=gen).bfloat16())
    opt = make(p)
    for _ in range(3 if cached else 1):
        p.grad = torch.randn(1000, generator=gen).bfloat16()
        opt.step()
    with torch.no_grad():
        p.mul_(0)
    q = torch.nn.Parameter(p.detach().clone())
    resumed = make(q)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    g = torch.randn(1000, generator=gen).bfloat16()
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    resumed.step()
    assert torch.equal(p, q)
    assert p.abs().max() < 0.01  # stepped from zero, by about lr
    assert torch.equal(opt.state[p]["master_param"], resumed.state[q]["master_param"])


def _column_major(state_dict: dict) -> dict:
    """A copy of ``state_dict`` with every 2-D state tensor column-major (same values)."""
    saved = copy.deepcopy(state_dict)
    for st in saved["state"].values():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                st[key] = value.t().contiguous().t()
                assert not st[key].is_contiguous()
    return saved


@pytest.mark.parametrize("storage", [s for s in STORAGE if s.id in (
    "float32-fp32-nearest", "float32-int8-nearest", "bfloat16-bf16-kahan", "bfloat16-int8-master")],
    ids=lambda s: s.id)
def test_saved_tensors_in_another_layout_load_in_the_params(storage):
    """A checkpoint whose state tensors are column-major (same values) loaded them so: the
    param's state no longer matched its layout, and the cpu backend handed it to torch
    from then on (1-ulp differences, slower steps) without a warning."""
    params = make_params(storage.dtype)
    opt = make_opt(params, storage, backend="cpu")
    train(params, opt, 2)
    saved = _column_major(opt.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make_opt(resumed_params, storage, backend="cpu")
    resumed.load_state_dict(saved)
    for p in resumed_params:
        for key, value in resumed.state[p].items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert value.stride() == p.stride(), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the torch backend warns
        train(resumed_params, resumed, 2, seed=7)
    train(params, opt, 2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))


@pytest.mark.parametrize("src,dst", [("master", "kahan"), ("kahan", "master"), ("master", "master")])
def test_buffers_converted_from_another_layout_take_the_params(src, dst):
    """A column-major saved master_param loaded into "kahan" gave kahan_comp the saved
    layout (master → kahan computes round(master − p) from it), and the cpu backend ran the
    contiguous param on its torch fallback from then on, without a word."""
    params = make_params(torch.bfloat16)
    opt = adamkit.Adam(params, lr=1e-2, param_update=src, backend="cpu")
    train(params, opt, 2)
    saved = _column_major(opt.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = adamkit.Adam(resumed_params, lr=1e-2, param_update=dst, backend="cpu")
    resumed.load_state_dict(saved)
    buffer = policy.BUFFERS[dst]
    for p in resumed_params:
        assert resumed.state[p][buffer].stride() == p.stride()
    train(resumed_params, resumed, 1)
    assert all(not cb.prepared.rest for cb in resumed._step_cache.buckets)


def test_a_stochastic_seed_given_as_an_int_is_kept():
    """An sr_seed put into a checkpoint as a Python int is the seed it says (it was
    replaced by the loading optimizer's, silently); one beyond int64 raises."""
    params = make_params(torch.bfloat16)
    opt = adamkit.Adam(params, lr=1e-2, param_update="stochastic", seed=7)
    train(params, opt, 1)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["sr_seed"] = 12345
    back = adamkit.Adam(params, lr=1e-2, param_update="stochastic", seed=11)
    back.load_state_dict(saved)
    seed = back.state[params[0]]["sr_seed"]
    assert seed.dtype == torch.int64 and seed.shape == () and int(seed) == 12345
    saved["state"][0]["sr_seed"] = 2**63
    with pytest.raises(ValueError, match="sr_seed 9223372036854775808 is beyond int64"):
        adamkit.Adam(params, lr=1e-2, param_update="stochastic").load_state_dict(saved)


# ---- edges of what a load keeps --------------------------------------------------------

def test_a_block_of_zeros_keeps_the_smallest_scale_through_a_checkpoint():
    """A block whose moments are all 0 gets the floor's scale, 2^-126 exactly
    (formats.md): the smallest value the load's check of the scales accepts."""
    p = torch.nn.Parameter(torch.randn(512))
    opt = adamkit.Adam([p], state_format="int8", int8_min_size=256)
    grad = torch.randn(512)
    grad[:256] = 0
    p.grad = grad
    opt.step()
    assert float(opt.state[p]["exp_avg_scale"][0]) == 2.0**-126
    again = adamkit.Adam([p], state_format="int8", int8_min_size=256)
    again.load_state_dict(_save_load(opt.state_dict()))
    again.step()
    assert float(again.state[p]["step"]) == 2


def test_a_block_at_float32s_largest_keeps_the_largest_scale_through_a_checkpoint():
    """A block whose absmax is float32's largest gets the top of the scale range, a value
    the encoder writes, which the load's check accepts (a check that excluded it passed
    every other test)."""
    p = torch.nn.Parameter(torch.randn(512))
    opt = adamkit.Adam([p], betas=(0.0, 0.999), state_format="int8", int8_min_size=256)
    grad = torch.randn(512)
    grad[0] = torch.finfo(torch.float32).max
    p.grad = grad
    opt.step()
    assert float(opt.state[p]["exp_avg_scale"][0]) == fmt_state.CODE_MAPS["exp_avg"].scale_range[1]
    again = adamkit.Adam([p], betas=(0.0, 0.999), state_format="int8", int8_min_size=256)
    again.load_state_dict(_save_load(opt.state_dict()))
    assert torch.equal(again.state[p]["exp_avg_scale"], opt.state[p]["exp_avg_scale"])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_loaded_moments_take_the_params_memory_layout(backend):
    """A checkpoint's row-major moment loads in the layout of its param (here a
    transposed one), as a fresh state has it, so the param keeps its backend's path."""
    p = torch.nn.Parameter(torch.randn(6, 4).t())
    opt = adamkit.Adam([p], backend=backend)
    p.grad = torch.randn(4, 6)
    opt.step()
    sd = _save_load(opt.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].contiguous()
    assert sd["state"][0]["exp_avg"].stride() != p.stride()
    opt.load_state_dict(sd)
    assert opt.state[p]["exp_avg"].stride() == p.stride()


def test_a_loaded_seed_is_a_copy():
    """The stochastic-rounding seed is advanced in place past 2^24 steps: a loaded one
    must not be the caller's tensor."""
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = adamkit.Adam([p], param_update="stochastic", seed=1)
    p.grad = torch.randn(8).bfloat16()
    opt.step()
    sd = _save_load(opt.state_dict())
    opt.load_state_dict(sd)
    assert opt.state[p]["sr_seed"].data_ptr() != sd["state"][0]["sr_seed"].data_ptr()
    assert torch.equal(opt.state[p]["sr_seed"], sd["state"][0]["sr_seed"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_into_kahan_is_the_same_whether_the_params_are_loaded_before_or_after(dtype):
    """master→kahan made comp = round(master − p) from the live p: a resume that loads
    the optimizer before the model (p still a fresh init) put the init's distance from
    the saved weights into comp, and the next step started from there (found by review:
    0.25 off on a Linear's weights). A saved master declares p = round(master), so comp
    is taken against that, and the load order no longer matters."""
    params = make_params(dtype)
    opt = adamkit.Adam(params, lr=1e-2, amsgrad=True, param_update="master")
    train(params, opt, 3)
    saved_p = [p.detach().clone() for p in params]
    saved = _save_load(opt.state_dict())
    resumed = {}
    for order in ("params first", "optimizer first"):
        fresh = make_params(dtype, seed=9)  # another init, as a new model holds before its load
        kahan = adamkit.Adam(fresh, lr=1e-2, amsgrad=True, param_update="kahan")
        with torch.no_grad():
            if order == "optimizer first":
                kahan.load_state_dict(copy.deepcopy(saved))
            for p, value in zip(fresh, saved_p):
                p.copy_(value)
            if order == "params first":
                kahan.load_state_dict(copy.deepcopy(saved))
        for index, p in enumerate(fresh):  # p + comp is the saved master, to comp's rounding
            master = saved["state"][index]["master_param"]
            theta = p.detach().float() + kahan.state[p]["kahan_comp"].float()
            assert torch.all((theta - master).abs() <= master.abs() * 2.0 ** -16), order
        train(fresh, kahan, 1, seed=7)
        resumed[order] = [p.detach().clone() for p in fresh]
    assert all(torch.equal(a, b) for a, b in zip(*resumed.values()))
