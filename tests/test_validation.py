"""Bad input raises torch's own exception types and messages, before anything changes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import adamkit
from adamkit.hyperparams import TORCH_FLAGS

BAD = [
    dict(lr=-1e-3),
    dict(lr=math.nan),
    dict(eps=-1.0),
    dict(eps=math.nan),
    dict(betas=(1.0, 0.999)),
    dict(betas=(-0.1, 0.999)),
    dict(betas=(0.9, 1.0)),
    dict(betas=(math.nan, 0.999)),
    dict(betas=(0.9, math.nan)),
    dict(betas=(0.9, 1)),  # an int out of range: torch names the beta, not its kind
    dict(betas=(1, 0.9)),
    dict(weight_decay=-0.1),
    dict(weight_decay=math.nan),
    dict(lr=torch.tensor([1e-3, 1e-3])),
]
# torch's foreach path refuses Tensor hyperparameters (a constructor check, not a group's),
# the betas after their ranges and kinds
BAD_FOREACH = [
    dict(lr=torch.tensor(1e-3), foreach=True),
    dict(lr=torch.tensor([1e-3, 1e-3]), foreach=True),
    dict(lr=torch.tensor(-1.0), foreach=True),
    dict(betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=True),
    dict(betas=(torch.tensor(1.5), torch.tensor(0.999)), foreach=True),
    dict(betas=(torch.tensor(0.9), 0.999), foreach=True),
]
# betas of the wrong kind or length: torch's IndexError and TypeError, in torch's order
# (adamkit raised ValueError for (0.9,), and "not iterable" for a float)
BAD_BETAS_KIND = [
    dict(betas=(0.9,)),
    dict(betas=[]),  # "list index out of range": the message names what was given
    dict(betas=[0.9]),
    dict(betas=0.9),
    dict(betas=None),
    dict(lr=-1.0, betas=0.9),
    dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.999))),
]

# two things wrong: torch names the value, and checks its flags only once the params are
# in (adamkit raised the flags' error first, and the fused one for an empty list)
BAD_TOGETHER = [
    dict(lr=-1.0, fused=True, foreach=True),
    dict(lr=-1.0, differentiable=True),
    dict(lr=-1.0, capturable=True),
    dict(eps=-1.0, fused=True, differentiable=True),
    dict(fused=True, differentiable=True),
    dict(fused=True, foreach=True),
]


@pytest.mark.parametrize("n_params", [1, 0], ids=["a-param", "no-params"])
@pytest.mark.parametrize("kwargs", BAD + BAD_FOREACH + BAD_BETAS_KIND + BAD_TOGETHER, ids=lambda kw: repr(kw))
def test_same_error_as_torch(kwargs, n_params):
    """(With no params torch names the value first: its constructor checks values before
    params; adamkit's said "empty parameter list".)"""
    params = [torch.zeros(2, requires_grad=True)] * n_params
    with pytest.raises(Exception) as theirs:
        torch.optim.Adam(params, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        adamkit.Adam(params, **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("betas", [
    (torch.tensor([0.9]), torch.tensor([0.999])),
    [0.9, 0.999],
    __import__("numpy").array([0.9, 0.999]),
], ids=["1-element Tensors", "list", "ndarray"])
def test_defaults_store_betas_as_torch_does(betas):
    """A tuple, 1-element Tensors squeezed to 0-dim (a state_dict saved by either then
    carries the same betas)."""
    p = torch.zeros(2, requires_grad=True)
    theirs = torch.optim.Adam([p], betas=betas).param_groups[0]["betas"]
    ours = adamkit.Adam([p], betas=betas).param_groups[0]["betas"]
    assert type(ours) is type(theirs) is tuple
    for a, b in zip(ours, theirs):
        assert type(a) is type(b)
        if isinstance(a, torch.Tensor):
            assert a.shape == b.shape == () and torch.equal(a, b)
        else:
            assert a == b


@pytest.mark.parametrize("kwargs", BAD, ids=lambda kw: repr(kw))
def test_per_group_values_are_validated_too(kwargs):
    """torch checks only the defaults; adamkit checks every group when it is added."""
    opt = adamkit.Adam([torch.zeros(2, requires_grad=True)])
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], **kwargs})
    assert len(opt.param_groups) == 1 and opt.param_groups[0] == before[0]


def test_empty_params():
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        adamkit.Adam([])


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match="'auto'.*'reference'.*'torch'"):
        adamkit.Adam([torch.zeros(1, requires_grad=True)], backend="gpu-magic")


@pytest.mark.parametrize("max_lr", [0.0, -1.0, math.nan, math.inf, "0.01", "abc", 1j, [0.1],
                                    torch.tensor([0.1, 0.2])], ids=repr)
def test_bad_max_lr(max_lr):
    with pytest.raises(ValueError, match="Invalid max_lr value"):
        adamkit.Adam([torch.zeros(1, requires_grad=True)], weight_decay=1e-4, decouple_lr=True,
                     max_lr=max_lr)


def test_a_max_lr_that_is_no_number_set_later_fails_the_step_with_nothing_changed():
    """A str max_lr was stepped with (and saved as a str); "abc" raised a raw TypeError."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p], weight_decay=1e-4, decouple_lr=True)
    opt.param_groups[0]["max_lr"] = "0.01"
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="Invalid max_lr value"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state


def test_the_two_names_of_the_decay_mode_given_in_contradiction_raise():
    """decouple_wd=True with decoupled_weight_decay=False stepped decoupled, dropping the
    explicit False without a word; in agreement either is fine."""
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="contradict"):
        adamkit.Adam([p], decouple_wd=True, decoupled_weight_decay=False)
    # (decouple_wd's default False is not told from a False given: torch's True decouples)
    for kw in (dict(decouple_wd=True, decoupled_weight_decay=True), dict(decoupled_weight_decay=True),
               dict(decouple_wd=False, decoupled_weight_decay=False),
               dict(decouple_wd=False, decoupled_weight_decay=True)):
        opt = adamkit.Adam([p], **kw)
        assert opt.defaults["decouple_wd"] == opt.defaults["decoupled_weight_decay"] == any(kw.values())


def test_decouple_lr_with_zero_lr_needs_explicit_max_lr():
    p = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="pass it explicitly"):
        adamkit.Adam([p], lr=0.0, decouple_lr=True)
    adamkit.Adam([p], lr=0.0, decouple_lr=True, max_lr=1e-3)  # fine


def test_sparse_grad_raises_and_changes_nothing():
    dense = torch.nn.Parameter(torch.randn(3))
    sparse = torch.nn.Parameter(torch.randn(4))
    opt = adamkit.Adam([dense, sparse])
    dense.grad = torch.randn(3)
    sparse.grad = torch.randn(4).to_sparse()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()
    assert torch.equal(dense, before)
    assert len(opt.state) == 0  # no state was created for the dense param either


def test_torch_flags_are_accepted_for_drop_in_use():
    p = torch.zeros(1, requires_grad=True)
    assert adamkit.Adam([p], foreach=True).param_groups[0]["backend"] == "torch"
    assert adamkit.Adam([p], fused=True).param_groups[0]["backend"] == "auto"
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        adamkit.Adam([p], foreach=True, fused=True)
    assert adamkit.Adam([p], decoupled_weight_decay=True).param_groups[0]["decouple_wd"]



@pytest.mark.parametrize("make, torch_cls", [(adamkit.Adam, torch.optim.Adam), (adamkit.AdamW, torch.optim.AdamW)])
def test_defaults_and_groups_hold_torchs_keys_with_torchs_values(make, torch_cls):
    """Code written for torch.optim reads ``opt.defaults`` and the groups (a scheduler, a
    trainer's logging): every key torch's hold, other than its four backend flags
    (documented as left out), is there with the same value and type."""
    p = [torch.nn.Parameter(torch.randn(2))]
    ours, theirs = make(p), torch_cls(p)
    for mine, torchs in [(ours.defaults, theirs.defaults),
                         (ours.param_groups[0], theirs.param_groups[0])]:
        for key in torchs.keys() - set(TORCH_FLAGS) - {"params"}:
            assert key in mine, key
            assert type(mine[key]) is type(torchs[key]) and mine[key] == torchs[key], key
    assert repr(ours.defaults["weight_decay"]) == repr(theirs.defaults["weight_decay"])


@pytest.mark.parametrize("betas", [(0, 0.9), (0.9, torch.tensor(0.99))], ids=["int", "mixed"])
def test_betas_of_mixed_kinds_raise_torchs_error(betas):
    p = [torch.nn.Parameter(torch.randn(2))]
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adam(p, betas=betas)
    with pytest.raises(ValueError) as ours:
        adamkit.Adam(p, betas=betas)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("make", [adamkit.Adam, adamkit.AdamW])
def test_torchs_capturable_and_differentiable_flags(make):
    """Accepted as False, as drop-in code passes them; True is refused clearly (CUDA-graph
    capture and differentiating through the step are torch.optim's); fused with
    differentiable gives torch's own error."""
    p = [torch.nn.Parameter(torch.randn(2))]
    make(p, capturable=False, differentiable=False)
    for flag in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{flag}=True"):
            make(p, **{flag: True})
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        make(p, fused=True, differentiable=True)
    # torch takes a Tensor lr with foreach when capturable: the refusal names capturable
    # (it said "not supported for capturable=False and foreach=True")
    torch.optim.Adam(p, lr=torch.tensor(0.01), foreach=True, capturable=True)
    with pytest.raises(ValueError, match="capturable=True"):
        make(p, lr=torch.tensor(0.01), foreach=True, capturable=True)



def test_foreach_with_another_explicit_backend_is_an_error():
    """foreach=True means the torch backend; an explicit other backend beside it was
    replaced silently."""
    p = torch.nn.Parameter(torch.randn(2))
    assert adamkit.Adam([p], foreach=True, backend="torch").param_groups[0]["backend"] == "torch"
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match="foreach=True"):
            adamkit.Adam([p], foreach=True, backend=backend)


@pytest.mark.parametrize("how", ["constructor", "add_param_group"])
def test_torchs_flags_in_a_group_are_read_as_the_constructors(how):
    """torch.optim honours foreach, fused, capturable and differentiable per group; in a
    group dict adamkit kept them and stepped without a word (a group asking for a
    differentiable step got a plain one)."""
    def add(group):
        p = torch.nn.Parameter(torch.ones(2))
        if how == "constructor":
            return adamkit.Adam([{"params": [p], **group}])
        opt = adamkit.Adam([torch.nn.Parameter(torch.ones(2))])
        opt.add_param_group({"params": [p], **group})
        return opt

    for flag in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"adamkit does not support {flag}=True"):
            add({flag: True})
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        add({"fused": True, "differentiable": True})
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        add({"foreach": True, "fused": True})
    with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
        add({"foreach": True, "lr": torch.tensor(0.01)})
    with pytest.raises(ValueError, match=r"betas\[0\] as a Tensor is not supported"):
        add({"foreach": True, "betas": (torch.tensor(0.9), torch.tensor(0.99))})
    with pytest.raises(ValueError, match="foreach=True asks for the 'torch' backend"):
        add({"foreach": True, "backend": "cpu"})
    for group, backend in (({"foreach": True}, "torch"), ({"foreach": False}, "auto"),
                           ({"fused": True}, "auto"), ({"capturable": False}, "auto")):
        opt = add(group)
        for stored in (opt.param_groups[-1], copy.deepcopy(opt).param_groups[-1]):
            assert stored["backend"] == backend
            assert all(stored[key] == value for key, value in group.items())  # kept, as torch keeps them


def test_a_failed_add_param_group_adds_nothing():
    p = torch.nn.Parameter(torch.ones(2))
    opt = adamkit.Adam([p])
    group = {"params": [torch.nn.Parameter(torch.ones(2))], "differentiable": True}
    with pytest.raises(ValueError):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and group["differentiable"] is True


@pytest.mark.parametrize("edit, error", [
    ({"capturable": True}, "adamkit does not support capturable=True"),
    ({"differentiable": True}, "adamkit does not support differentiable=True"),
    ({"backend": "bogus"}, "Invalid backend: 'bogus'"),
], ids=["capturable", "differentiable", "backend"])
def test_torchs_flags_or_a_bad_backend_set_on_a_live_group_raise_before_the_step(edit, error):
    """Set between steps (on the cached plan's path too): capturable/differentiable were
    ignored, and an unknown backend was a bare KeyError."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p])
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
    opt.param_groups[0].update(edit)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=error):
        opt.step()
    assert torch.equal(p, before) and opt.state[p]["step"].item() == 2


def test_add_param_group_takes_a_dict_as_torch_does():
    p = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(TypeError) as theirs:
        torch.optim.Adam([p]).add_param_group([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(TypeError) as ours:
        adamkit.Adam([p]).add_param_group([torch.nn.Parameter(torch.randn(2))])
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("make", [adamkit.Adam, torch.optim.Adam])
def test_the_group_dict_passed_is_the_one_stored(make):
    """torch.optim stores the caller's dict (defaults filled in), so later edits to it
    reach the optimizer; adamkit stored a copy and ignored them (the param kept moving
    after its group's lr was set to 0 through the caller's reference)."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    first = {"params": [a], "lr": 0.5}
    opt = make([first])
    second = {"params": [b], "lr": 0.1}
    opt.add_param_group(second)
    assert opt.param_groups[0] is first and opt.param_groups[1] is second
    assert first["betas"] == (0.9, 0.999)  # defaults filled into the caller's dict
    second["lr"] = 0.0
    for _ in range(3):
        a.grad, b.grad = torch.ones(2), torch.ones(2)
        opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and not torch.equal(a.detach(), torch.ones(2))


def test_an_invalid_group_leaves_the_callers_dict_as_it_was():
    opt = adamkit.Adam([torch.nn.Parameter(torch.ones(2))])
    bad = {"params": [torch.nn.Parameter(torch.ones(2))], "lr": -1.0, "decoupled_weight_decay": True}
    before = dict(bad)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group(bad)
    assert bad == before and len(opt.param_groups) == 1


@pytest.mark.parametrize("params, error, message", [
    (lambda: [torch.ones(2, requires_grad=True) * 2], ValueError, "can't optimize a non-leaf Tensor"),
    (lambda: [1.0], TypeError, "optimizer can only optimize Tensors"),
    (lambda: "first", None, "some parameters appear in more than one parameter group"),
], ids=["non-leaf", "not-a-tensor", "in-another-group"])
def test_a_group_torchs_checks_of_its_params_refuse_leaves_the_callers_dict_as_it_was(params, error, message):
    """The hyperparameters were valid, so the decay keys were written into the caller's
    dict before torch's add_param_group refused the params."""
    first = torch.nn.Parameter(torch.ones(2))
    opt = adamkit.Adam([first])
    bad = {"params": [first] if params() == "first" else params(), "weight_decay": 0.1}
    before = dict(bad)
    with pytest.raises(error or ValueError, match=message):
        opt.add_param_group(bad)
    assert bad == before and len(opt.param_groups) == 1


@pytest.mark.parametrize("kwargs", [dict(eps=0.0), dict(lr=0.0), dict(weight_decay=0.0), dict(betas=(0.0, 0.0))],
                         ids=lambda kw: repr(kw))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_the_bounds_torch_accepts_are_accepted_and_stepped_as_torch(kwargs, backend):
    """torch's ranges are closed at 0 (0 <= eps, lr, weight_decay, betas): each bound
    constructs, steps and gives torch's numbers (a mutant refusing eps=0 passed every
    test). Grads without zeros: eps=0 with a zero grad is 0/0 in both."""
    def run(make):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(6, generator=gen))
        opt = make([p])
        for _ in range(3):
            p.grad = torch.randn(6, generator=gen).abs() + 0.1
            opt.step()
        return p.detach()
    theirs = run(lambda ps: torch.optim.Adam(ps, **{"weight_decay": 0.1, **kwargs}, foreach=False))
    ours = run(lambda ps: adamkit.Adam(ps, **{"weight_decay": 0.1, **kwargs}, backend=backend))
    torch.testing.assert_close(ours, theirs, rtol=0 if backend == "torch" else 1e-6, atol=0 if backend == "torch" else 1e-7)


@pytest.mark.parametrize("make", [
    lambda O, p: O([{"lr": -1}]),
    lambda O, p: O([{"params": {p}, "lr": -1}]),
    lambda O, p: O([p]).add_param_group({"params": {torch.zeros(1, requires_grad=True)}, "eps": -1}),
    lambda O, p: O([p]).add_param_group({"betas": (1.0, 0.9)}),
], ids=["ctor no params", "ctor set", "add set", "add no params"])
def test_a_group_whose_params_torch_refuses_raises_torchs_error_before_a_bad_hyperparameter(make):
    """torch.optim checks a group's params (KeyError without them, TypeError for a set)
    and never range-checks its hyperparameters; adamkit raised its ValueError for the
    lr first (found by review)."""
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises((KeyError, TypeError)) as theirs:
        make(torch.optim.Adam, p)
    with pytest.raises(type(theirs.value)) as ours:
        make(adamkit.Adam, p)
    assert str(ours.value) == str(theirs.value)
