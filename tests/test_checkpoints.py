"""state_dict: torch's layout, interop with torch.optim both ways, and safe loading."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import adamkit
from adamkit import formats
from helpers import TinyMLP, assert_same_state


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


PAIRS = [
    (lambda ps: adamkit.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=0.01),
     lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=0.01)),
    (lambda ps: adamkit.AdamW(ps, lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
    (lambda ps: adamkit.Adam(ps, lr=1e-2, decouple_wd=True, weight_decay=0.1),
     lambda ps: torch.optim.Adam(ps, lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1)),
]


def test_layout_uses_torch_keys():
    model = TinyMLP()
    opt = adamkit.Adam(model.parameters(), amsgrad=True)
    _train(model, opt, 2, 0)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    # torch's keys, plus the two tags by which a state describes its storage: tensors
    # only (torch.distributed.checkpoint's flattened state dicts take nothing else)
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                                   "state_format", "param_update"}
    assert all(isinstance(v, torch.Tensor) for v in sd["state"][0].values())
    assert (sd["state"][0]["state_format"].item(), sd["state"][0]["param_update"].item()) == (
        formats.FORMAT_CODES["fp32"], formats.UPDATE_CODES["nearest"])
    assert sd["state"][0]["step"].dtype == torch.float32 and sd["state"][0]["step"].item() == 2
    assert sd["param_groups"][0]["params"] == list(range(len(list(model.parameters()))))


@pytest.mark.parametrize("pair", range(len(PAIRS)))
@pytest.mark.parametrize("direction", ["torch_to_adamkit", "adamkit_to_torch"])
def test_interop_continues_identically(pair, direction):
    """Train 5 steps with one, save (weights_only round trip), load into the other and
    train on: the result equals training with the other all along."""
    make_ak, make_torch = PAIRS[pair]
    first, second = (make_torch, make_ak) if direction == "torch_to_adamkit" else (make_ak, make_torch)
    torch.manual_seed(0)
    model = TinyMLP()
    baseline = copy.deepcopy(model)

    opt = first(model.parameters())
    _train(model, opt, 5, seed=1)
    sd = _save_load(opt.state_dict())
    opt2 = second(model.parameters())
    opt2.load_state_dict(sd)
    _train(model, opt2, 5, seed=2)

    base_opt = second(baseline.parameters())
    _train(baseline, base_opt, 5, seed=1)
    _train(baseline, base_opt, 5, seed=2)
    assert_same_state(model, opt2, baseline, base_opt, rtol=1e-6, atol=1e-7)


def test_round_trip_mid_run_is_exact():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = adamkit.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    _train(model, opt, 7, 0)
    twin = copy.deepcopy(model)
    twin_opt = adamkit.Adam(twin.parameters(), lr=0.5)  # hyperparameters come from the dict
    twin_opt.load_state_dict(_save_load(opt.state_dict()))
    assert twin_opt.param_groups[0]["lr"] == 1e-2 and twin_opt.param_groups[0]["amsgrad"]
    _train(model, opt, 5, 3)
    _train(twin, twin_opt, 5, 3)
    assert_same_state(model, opt, twin, twin_opt, 0.0, 0.0)


def test_loaded_state_is_a_copy():
    p = torch.nn.Parameter(torch.randn(3))
    opt = adamkit.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    opt2 = adamkit.Adam([p])
    opt2.load_state_dict(sd)
    sd["state"][0]["exp_avg"].add_(100.0)
    assert opt2.state[p]["exp_avg"].abs().max() < 1.0


def test_decouple_lr_round_trip_keeps_max_lr():
    p = torch.nn.Parameter(torch.randn(3))
    opt = adamkit.AdamW([p], lr=3e-3, weight_decay=1e-5, decouple_lr=True)
    opt.param_groups[0]["lr"] = 1e-3  # as a scheduler would
    opt2 = adamkit.AdamW([p], lr=1.0)
    opt2.load_state_dict(_save_load(opt.state_dict()))
    g = opt2.param_groups[0]
    assert g["max_lr"] == 3e-3 and g["lr"] == 1e-3 and g["decouple_lr"]


def _trained():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = adamkit.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, 3, 0)
    return model, opt


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, snap):
    now = opt.state_dict()
    assert now["param_groups"] == snap["param_groups"]
    assert now["state"].keys() == snap["state"].keys()  # no param's state added or dropped
    for k, st in snap["state"].items():
        assert now["state"][k].keys() == st.keys()
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(now["state"][k][key], value)
            else:
                assert now["state"][k][key] == value


def _mutations():
    def fewer_groups(sd):
        sd["param_groups"] = []

    def more_params(sd):
        sd["param_groups"][0]["params"].append(99)

    def wrong_shape(sd):
        sd["state"][0]["exp_avg"] = torch.zeros(7, 7)

    def wrong_shape_late(sd):  # the last param's state: everything before it is valid
        last = max(sd["state"])
        sd["state"][last]["exp_avg_sq"] = torch.zeros(2)

    def missing_key(sd):
        del sd["state"][1]["exp_avg_sq"]

    # values no step can take (ranges are not checked on load, as in torch.optim: a
    # scheduler's lr ≈ -2e-21 loads, test_integrations)
    def bad_lr(sd):
        sd["param_groups"][0]["lr"] = torch.tensor([1e-3, 1e-3])

    def bad_betas(sd):
        sd["param_groups"][0]["betas"] = (0.9,)

    def bad_max_lr(sd):
        sd["param_groups"][0].update(decouple_lr=True, max_lr=0.0)

    def bad_lr_as_max_lr(sd):  # max_lr defaults to the lr: lr.item() raised RuntimeError
        sd["param_groups"][0].update(decouple_lr=True, max_lr=None, lr=torch.tensor([0.1, 0.2]))

    def lr_not_a_number(sd):  # loaded, then every step raised
        sd["param_groups"][0]["lr"] = "x"

    # tagged moments whose dtype disagrees with their tag (both loaded: the complex one
    # with its imaginary part dropped and only torch's UserWarning)
    def complex_moment(sd):
        m = sd["state"][0]["exp_avg"]
        sd["state"][0]["exp_avg"] = torch.complex(m, torch.ones_like(m))

    def legacy_tag_disagrees(sd):  # as an earlier version saved it, but a moment cast
        sd["state"][0].update(state_format="fp32", param_update="nearest")
        sd["state"][0]["exp_avg_sq"] = sd["state"][0]["exp_avg_sq"].bfloat16()

    # a group without a key torch.optim always saves: the live group's value filled it
    # in, and the run went on at an lr it never had
    def group_without_lr(sd):
        del sd["param_groups"][0]["lr"]

    def group_without_betas(sd):
        del sd["param_groups"][0]["betas"]

    def group_without_eps(sd):
        del sd["param_groups"][0]["eps"]

    # a param's state under a key its groups do not name: after a trip through JSON the
    # keys are str ("0") and the ids int; both optimizers loaded it and dropped every
    # param's state without a word (torch.optim kept it under the str keys, unused)
    def state_keys_as_str(sd):
        sd["state"] = {str(k): v for k, v in sd["state"].items()}

    def state_key_renumbered(sd):
        sd["state"][99] = sd["state"].pop(max(sd["state"]))

    # tensors that hold no values to load (torch's copy raised RuntimeError or
    # NotImplementedError from inside the conversion)
    def sparse_moment(sd):
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].to_sparse()

    def meta_moment(sd):
        sd["state"][1]["exp_avg_sq"] = torch.empty_like(sd["state"][1]["exp_avg_sq"], device="meta")

    def meta_step(sd):
        sd["state"][0]["step"] = torch.empty((), device="meta")

    # values no step can take, of the kinds torch's ops raise RuntimeError for (a live
    # group's check raises that; a load's is a ValueError as every misfit)
    def eps_of_two_elements(sd):
        sd["param_groups"][0]["eps"] = torch.tensor([1e-8, 1e-8])

    def complex_lr(sd):
        sd["param_groups"][0]["lr"] = 1e-3 + 1j

    def step_is_a_bool(sd):  # True would count as 1
        sd["state"][0]["step"] = True

    def group_without_weight_decay(sd):
        del sd["param_groups"][0]["weight_decay"]

    return [eps_of_two_elements, complex_lr, step_is_a_bool, group_without_weight_decay,
            sparse_moment, meta_moment, meta_step, fewer_groups, more_params, wrong_shape, wrong_shape_late, missing_key, bad_lr,
            bad_betas, bad_max_lr, bad_lr_as_max_lr, lr_not_a_number, complex_moment, legacy_tag_disagrees,
            group_without_lr, group_without_betas, group_without_eps, state_keys_as_str,
            state_key_renumbered]


@pytest.mark.parametrize("key", ["amsgrad", "maximize"])
def test_a_group_key_older_torch_did_not_save_loads_as_torch_loads_it(key):
    """torch.optim.Adam's __setstate__ gives a group without amsgrad or maximize False;
    adamkit took the loading optimizer's own value (True here), a different run."""
    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0][key]
    for make in (torch.optim.Adam, adamkit.Adam):
        other = make(model.parameters(), lr=1e-3, **{key: True})
        other.load_state_dict(copy.deepcopy(sd))
        assert other.param_groups[0][key] is False, make


def test_backend_is_the_loading_optimizers_not_the_checkpoints():
    """Where a step runs belongs to the machine, as the storage keys belong to the loading
    optimizer: a checkpoint saved with backend="reference" (or a name this install does
    not know) loads into an optimizer configured with "cpu" and runs there."""
    model, opt = _trained()
    sd = opt.state_dict()
    sd["param_groups"][0]["backend"] = "nope"
    other = adamkit.Adam(model.parameters(), lr=1e-3, backend="torch")
    other.load_state_dict(sd)
    assert other.param_groups[0]["backend"] == "torch"
    assert other.state_dict()["param_groups"][0]["backend"] == "torch"


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_misfit_state_dict_raises_and_changes_nothing(mutate):
    model, opt = _trained()
    snap = _snapshot(opt)
    params_before = [p.detach().clone() for p in model.parameters()]
    bad = copy.deepcopy(opt.state_dict())
    mutate(bad)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    _assert_unchanged(opt, snap)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params_before))


def test_torch_fused_checkpoint_loads_with_cpu_step():
    p = torch.nn.Parameter(torch.randn(4))
    t = torch.optim.Adam([p], fused=True)
    p.grad = torch.ones(4)
    t.step()
    opt = adamkit.Adam([p])
    opt.load_state_dict(t.state_dict())
    assert opt.state[p]["step"].device.type == "cpu" and float(opt.state[p]["step"]) == 1
    assert "fused" not in opt.param_groups[0]


@pytest.mark.parametrize("make", [adamkit.Adam, torch.optim.Adam])
def test_a_param_with_an_empty_state_entry_loads(make):
    """Reading opt.state[p] (a defaultdict) before p's first step leaves `{}`, and
    state_dict saves it; torch.optim loads that as a param without state, adamkit
    refused its own checkpoint ("lacks one of 'step', ...")."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = make([a, b])
    a.grad = torch.ones(3)
    opt.step()
    assert opt.state[b].get("step") is None  # the lookup that creates {}
    sd = _save_load(opt.state_dict())
    assert sd["state"][1] == {}
    fresh = adamkit.Adam([a, b])
    fresh.load_state_dict(sd)
    assert float(fresh.state[a]["step"]) == 1 and not fresh.state.get(b)
    b.grad = torch.ones(2)
    a.grad = torch.ones(3)
    fresh.step()  # b starts its own state at its first step
    assert float(fresh.state[b]["step"]) == 1 and float(fresh.state[a]["step"]) == 2


def test_torchs_decay_key_wins_after_a_trip_through_torch():
    """A checkpoint saved by adamkit carries decouple_wd and torch's
    decoupled_weight_decay, equal. torch.optim reads and changes only its own key, so when
    the two differ on load, torch's is the live one (the stale decouple_wd won)."""
    p = torch.nn.Parameter(torch.ones(3))
    sd = adamkit.Adam([p], weight_decay=0.1).state_dict()
    theirs = torch.optim.Adam([p])
    theirs.load_state_dict(sd)
    theirs.param_groups[0]["decoupled_weight_decay"] = True  # switched on in torch
    ours = adamkit.Adam([p])
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["decouple_wd"] is True
    assert ours.state_dict()["param_groups"][0]["decoupled_weight_decay"] is True


def test_state_dict_post_hooks_see_the_whole_dict():
    """torch.optim runs post-hooks inside its state_dict; adamkit added torch's decay key
    after them, so a hook saw the dict without it (and one keeping torch's keys only made
    adamkit raise KeyError)."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = adamkit.AdamW([p])
    seen = []

    def hook(optimizer, sd):
        seen.append(sd["param_groups"][0].get("decoupled_weight_decay"))
        sd["hooked"] = True
        return sd

    opt.register_state_dict_post_hook(hook)
    sd = opt.state_dict()
    assert seen == [True] and sd["hooked"] and sd["param_groups"][0]["decoupled_weight_decay"] is True


def test_state_dict_saves_torchs_decay_key_set_on_a_live_group():
    """Set between steps and saved before the next one: the checkpoint said the old mode
    while the next step used the new one."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = adamkit.Adam([p], decouple_wd=True, weight_decay=0.1)
    opt.param_groups[0]["decoupled_weight_decay"] = False
    group = opt.state_dict()["param_groups"][0]
    assert group["decoupled_weight_decay"] is False and group["decouple_wd"] is False


def test_state_entries_that_are_no_params_state_are_kept_as_torch_keeps_them():
    """torch.optim saves and loads an entry of opt.state under a key that is no param
    (something a user or a library keeps there) as it is; adamkit dropped it on load,
    and its state_bytes, state_dict after a master resync and torch_state_dict raised on
    it. Such an entry is not a param's state, so nothing converts or steps it."""
    model = TinyMLP()
    ours = adamkit.Adam(model.parameters(), lr=1e-2, param_update="master")
    theirs = torch.optim.Adam(model.parameters(), lr=1e-2)
    for opt in (ours, theirs):
        _train(model, opt, 2, seed=0)
        opt.state["note"] = {"epoch": 3}
        opt.state[7] = [1, 2]
        sd = _save_load(opt.state_dict())
        assert sd["state"]["note"] == {"epoch": 3} and sd["state"][7] == [1, 2]
        opt.load_state_dict(sd)
        assert opt.state["note"] == {"epoch": 3} and opt.state[7] == [1, 2]
    per_param = ours.state_bytes(per_element=True)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a master resync at state_dict
    again = ours.state_dict()
    assert again["state"]["note"] == {"epoch": 3}
    assert ours.state_bytes(per_element=True) == per_param
    exported = ours.torch_state_dict()
    assert exported["state"]["note"] == {"epoch": 3}
    theirs.load_state_dict(exported)
    _train(model, ours, 1, seed=1)
    assert ours.state["note"] == {"epoch": 3}


def test_the_loaded_state_keeps_the_saved_order_as_torch_optim_loads_it():
    """torch.optim fills opt.state in the saved dict's order; adamkit filled it in the
    params' order, with the entries of no param after them, so code that walks opt.state
    and the next checkpoint's key order differed (a param that started training later)."""
    def order(make):
        a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
        opt = make([a, b, c], lr=0.1)
        names = {id(a): "a", id(b): "b", id(c): "c"}
        c.grad = torch.ones(2)
        opt.step()
        opt.state["note"] = {"epoch": 1}
        a.grad = torch.ones(2)
        opt.step()
        saved = opt.state_dict()
        opt.load_state_dict(saved)
        return list(saved["state"]), [names.get(id(k), k) for k in opt.state]
    ours, theirs = order(adamkit.Adam), order(torch.optim.Adam)
    assert ours == theirs == ([2, "note", 0], ["c", "note", "a"])


@pytest.mark.parametrize("make", [adamkit.Adam, torch.optim.Adam])
def test_live_group_keys_a_checkpoint_lacks_are_dropped_as_torch_drops_them(make):
    """torch.optim's load builds each group from the saved one: a key only the live group
    has (a scheduler's initial_lr, a user's) is gone. adamkit kept it, so a scheduler
    made after the load started from the live initial_lr, not the loaded lr."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, StepLR

    p = torch.nn.Parameter(torch.ones(2))
    saved = make([p], lr=5e-4).state_dict()
    opt = make([p], lr=1e-3)
    StepLR(opt, 10)
    opt.param_groups[0]["note"] = "mine"
    opt.load_state_dict(saved)
    assert "initial_lr" not in opt.param_groups[0] and "note" not in opt.param_groups[0]
    assert CosineAnnealingLR(opt, T_max=10).base_lrs == [5e-4]


def test_adamkits_own_keys_a_torch_checkpoint_lacks_come_from_the_live_group():
    """torch.optim saves no decouple_lr, max_lr or storage keys: they stay the loading
    optimizer's (its configuration), as before (AdamW's λ then loads as λ·max_lr:
    test_torch_optim_checkpoints)."""
    model = TinyMLP()
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, theirs, 2, seed=0)
    ours = adamkit.Adam(model.parameters(), lr=1e-2, weight_decay=0.1, decouple_lr=True, max_lr=0.05,
                        backend="torch", state_format="bf16")
    ours.load_state_dict(_save_load(theirs.state_dict()))
    group = ours.param_groups[0]
    assert (group["decouple_lr"], group["max_lr"], group["backend"], group["state_format"]) == (
        True, 0.05, "torch", "bf16")


# ---- edges of the load and export contract ---------------------------------------------

def test_a_saved_step_of_zero_loads_as_a_counter_at_zero():
    """A state saved before its first step counted (a torch.optim state made by hand, or
    a step counter reset to 0) is a valid count: the next step is step 1."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = torch.tensor(0.0)
    opt.load_state_dict(sd)
    assert float(opt.state[p]["step"]) == 0
    opt.step()
    assert float(opt.state[p]["step"]) == 1


def test_meta_state_loads_into_meta_params():
    """A model built on the meta device (to be materialized later) loads a meta
    checkpoint, as torch.optim does: only a meta tensor for a real param is refused."""
    p = torch.nn.Parameter(torch.empty(4, device="meta"))
    opt = adamkit.Adam([p], backend="torch")
    meta = lambda: torch.empty(4, device="meta")  # noqa: E731
    opt.load_state_dict({"state": {0: {"step": torch.tensor(2.0), "exp_avg": meta(), "exp_avg_sq": meta()}},
                         "param_groups": [{**opt.state_dict()["param_groups"][0]}]})
    assert opt.state[p]["exp_avg"].is_meta and float(opt.state[p]["step"]) == 2


def test_torch_state_dict_leaves_out_params_without_state():
    """Reading opt.state[b] before b's first step stores {}; torch_state_dict exports
    only the params with state, as torch.optim's own checkpoints hold them."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = adamkit.Adam([a, b])
    a.grad = torch.ones(3)
    opt.step()
    assert opt.state[b] == {}
    exported = opt.torch_state_dict()
    assert list(exported["state"]) == [0]
    theirs = torch.optim.Adam([a, b])
    theirs.load_state_dict(exported)
    assert float(theirs.state[a]["step"]) == 1


def test_torch_state_dict_shares_nothing_with_the_optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p], lr=torch.tensor(0.01))
    p.grad = torch.ones(3)
    opt.step()
    exported = opt.torch_state_dict()
    assert exported["param_groups"][0]["lr"] is not opt.param_groups[0]["lr"]
    exported["param_groups"][0]["lr"].fill_(5.0)
    exported["state"][0]["exp_avg"].fill_(7.0)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01)
    assert not torch.equal(opt.state[p]["exp_avg"], torch.full((3,), 7.0))


def test_a_named_optimizer_keeps_its_param_names_loading_a_checkpoint_without_them():
    """torch.optim (2.6+) keeps the live group's param_names where the saved group has
    none; so does adamkit."""
    model = TinyMLP()
    plain = adamkit.Adam(model.parameters())
    _train(model, plain, 1, seed=0)
    named = adamkit.Adam(model.named_parameters())
    names = list(named.param_groups[0]["param_names"])
    named.load_state_dict(plain.state_dict())
    assert named.param_groups[0]["param_names"] == names


def test_load_copies_a_params_state_and_keeps_other_entries_as_torch_does():
    """Keys in a param's state that no format knows are copies, as the rest of its state
    (the caller's dict edited after the load changes nothing). An entry that is no
    param's, a partial one included (an EMA's {"step", "decay"}), is the caller's object
    itself, as torch.optim keeps it (an object deepcopy cannot copy loads too)."""
    import threading

    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"]["extra"] = [1]
    sd["state"]["ema"] = {"step": 10, "decay": 0.999}
    sd["state"]["lock"] = threading.Lock()
    sd["state"][0]["mine"] = torch.zeros(2)
    sd["state"][0]["mask"] = torch.tensor([1.0, 0.0, 0.0]).to_sparse()  # no format reads it
    opt.load_state_dict(sd)
    sd["state"][0]["mine"].fill_(3.0)
    assert torch.equal(opt.state[p]["mine"], torch.zeros(2))
    assert opt.state[p]["mask"].is_sparse
    for key in ("extra", "ema", "lock"):
        assert opt.state[key] is sd["state"][key]
    theirs = torch.optim.Adam([p])
    theirs.load_state_dict(sd)
    assert all(theirs.state[key] is sd["state"][key] for key in ("extra", "ema", "lock"))


def test_torch_state_dict_keeps_entries_that_are_no_params_falsy_ones_too():
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state["count"], opt.state["flags"] = 0, []
    exported = opt.torch_state_dict()
    assert exported["state"]["count"] == 0 and exported["state"]["flags"] == []
    assert opt.state_dict()["state"]["count"] == 0


def test_torchs_flags_given_in_a_group_stay_the_loading_groups():
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([{"params": [p], "foreach": True}])
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["foreach"] = False  # the checkpoint's flags are not read
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["foreach"] is True and opt.param_groups[0]["backend"] == "torch"


def test_a_meta_step_counter_into_a_meta_param_is_a_value_error():
    """A meta param's state may be meta tensors, but its step count must be a number:
    the load raised RuntimeError from `.item()` (torch.optim loads it, and its step fails
    there); now a ValueError, as every checkpoint that does not fit, and nothing changes."""
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = adamkit.Adam([p])
    saved = {"state": {0: {"step": torch.tensor(1.0, device="meta"),
                           "exp_avg": torch.zeros(3, device="meta"),
                           "exp_avg_sq": torch.zeros(3, device="meta")}},
             "param_groups": opt.state_dict()["param_groups"]}
    with pytest.raises(ValueError, match="step is a meta tensor"):
        opt.load_state_dict(saved)
    assert not opt.state


def test_the_tag_codes_are_the_ones_checkpoints_hold():
    """Saved checkpoints hold these numbers (docs/design/formats.md, "Checkpoints"):
    renumbering them would read every earlier checkpoint as another format."""
    assert formats.FORMAT_CODES == {"fp32": 0, "bf16": 1, "int8": 2, "fp64": 3, "fp16": 4}
    assert formats.UPDATE_CODES == {"nearest": 0, "kahan": 1, "stochastic": 2, "master": 3}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_states_are_created_in_the_params_order_as_torchs_are(backend):
    """A group of two dtypes runs as two buckets, whose states adamkit created bucket by
    bucket: opt.state and state_dict()["state"] listed them [0, 2, 1] where torch.optim
    lists [0, 1, 2], which code zipping ``opt.state.values()`` with the params trips on
    (found by review)."""
    def listed(make):
        ps = [torch.nn.Parameter(torch.randn(2, dtype=d)) for d in (torch.float32, torch.float64, torch.float32,
                                                                     torch.bfloat16)]
        opt = make([{"params": ps[:3]}, {"params": ps[3:]}])
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        return [next(i for i, p in enumerate(ps) if p is q) for q in opt.state], list(opt.state_dict()["state"])
    assert listed(lambda g: adamkit.Adam(g, backend=backend)) == listed(torch.optim.Adam) == ([0, 1, 2, 3],) * 2


def test_a_loaded_tensor_lr_is_the_optimizers_own():
    """load_state_dict copies the saved groups: a Tensor lr loaded as the checkpoint's
    own tensor was rewritten in the checkpoint by a scheduler's in-place write (a mutant
    that dropped the copy passed every test; 0.01 became 0.5 there)."""
    p = torch.nn.Parameter(torch.ones(3))
    saved = adamkit.Adam([p], lr=torch.tensor(0.01)).state_dict()
    opt = adamkit.Adam([p], lr=torch.tensor(0.02))
    opt.load_state_dict(saved)
    live, kept = opt.param_groups[0]["lr"], saved["param_groups"][0]["lr"].clone()
    assert live is not saved["param_groups"][0]["lr"] and torch.equal(live, kept)
    live.fill_(0.5)
    assert torch.equal(saved["param_groups"][0]["lr"], kept)


def test_a_checkpoint_with_decouple_lr_but_no_max_lr_takes_its_lr():
    """An older or edited checkpoint with decouple_lr and no max_lr, loaded into an
    optimizer whose group has none either (no decouple_lr there), takes max_lr = its lr
    (the constructor's default), and steps on as the run it came from."""
    def run(edit):
        p = torch.nn.Parameter(torch.ones(3))
        opt = adamkit.Adam([p], lr=0.05, weight_decay=0.1, decouple_lr=True)
        p.grad = torch.full((3,), 0.5)
        opt.step()
        saved = _save_load(opt.state_dict())
        edit(saved["param_groups"][0])
        q = torch.nn.Parameter(p.detach().clone())
        resumed = adamkit.Adam([q], lr=0.05, weight_decay=0.1)
        resumed.load_state_dict(saved)
        q.grad = torch.full((3,), -0.25)
        resumed.step()
        return q.detach(), resumed.param_groups[0]["max_lr"]
    (kept, kept_max), (popped, popped_max) = run(lambda g: None), run(lambda g: g.pop("max_lr"))
    assert kept_max == popped_max == 0.05
    assert torch.equal(kept, popped)


@pytest.mark.parametrize("kw", [{}, {"state_format": "bf16"}, {"param_update": "master"}],
                         ids=["fp32", "bf16 state", "master"])
def test_a_saved_state_that_requires_grad_loads_as_a_private_detached_copy(kw):
    """A checkpoint's moment that requires grad (torch.optim's differentiable state, or
    a tensor saved so) was copied with its graph: the loaded state had a grad_fn and kept
    the checkpoint's tensor alive, twice the memory state_bytes() reports (found by
    review)."""
    import gc
    import weakref

    dtype = torch.bfloat16 if "param_update" in kw else torch.float32
    p = torch.nn.Parameter(torch.randn(64, 64).to(dtype))
    m = torch.randn(64, 64).requires_grad_(True)
    saved = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": m, "exp_avg_sq": torch.rand(64, 64)}},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                               "amsgrad": False, "maximize": False, "params": [0]}]}
    opt = adamkit.Adam([p], **kw)
    opt.load_state_dict(saved)
    assert all(not v.requires_grad for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    alive = weakref.ref(m)
    del saved, m
    gc.collect()
    assert alive() is None
    p.grad = torch.ones_like(p)
    opt.step()
    assert not opt.state[p]["exp_avg"].requires_grad
