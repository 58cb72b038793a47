"""Random sequences of optimizer API calls, run on torch.optim and on adamkit side by side.

The other parity tests train one fixed script. Here hypothesis's state machine picks the
script: steps with some grads missing or a closure, zero_grad in both forms, hyperparameters
edited between steps, new param groups, params and grads edited in place, checkpoints
round-tripped through ``torch.save(weights_only=True)``, and state handed from torch.optim
to adamkit and back. After every call:

* adamkit's torch backend holds torch.optim's foreach numbers bit for bit;
* the cpu backend holds them within float32 rounding (registry.TORCH_PARITY_TOL), and is
  then re-synced to them, so each call is judged from identical inputs (and the re-sync,
  an in-place write into params and moments, exercises the step cache's invalidation).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

import adamkit
from adamkit import formats
from helpers import assert_close_scaled
from test_checkpoints import _assert_unchanged, _save_load, _snapshot
from registry import TORCH_PARITY_TOL

SHAPES = [(3, 4), (5,), (), (40, 17)]
COMPARED_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
RTOL, ATOL = TORCH_PARITY_TOL[torch.float32]
# A float64 group on backend="cpu" runs on the torch backend, with this warning (tested in
# test_cpu_backend.py); here it is expected.
pytestmark = pytest.mark.filterwarnings("ignore:adamkit. backend 'cpu' unusable here:RuntimeWarning")


def _groups_of(params_by_group, lrs):
    return [{"params": ps, "lr": lr} for ps, lr in zip(params_by_group, lrs)]


def _largest(t):
    return t.detach().abs().max().item() if t.numel() else 0.0


class AdamApiMachine(RuleBasedStateMachine):
    """Three optimizers over three copies of the same params: torch.optim (T), adamkit's
    torch backend (A) and adamkit's cpu backend (C)."""

    NAMES = ("T", "A", "C")

    @initialize(adamw=st.booleans(), amsgrad=st.booleans(), maximize=st.booleans(),
                weight_decay=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
    def build(self, adamw, amsgrad, maximize, weight_decay, seed):
        self.ak_cls, self.torch_cls = (adamkit.AdamW, torch.optim.AdamW) if adamw else (adamkit.Adam, torch.optim.Adam)
        self.kw = dict(amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        base = [torch.randn(s, generator=gen) for s in SHAPES[:3]]
        self.params = {n: [[torch.nn.Parameter(b.clone()) for b in base]] for n in self.NAMES}
        self.lrs = [1e-2]
        self.opts = {n: self._make(n) for n in self.NAMES}
        self.gen = gen
        self.scales = {}  # after a step: what C's tensors are judged against (_scales)

    def _make(self, name):
        groups = _groups_of(self.params[name], self.lrs)
        if name == "T":
            return self.torch_cls(groups, foreach=True, **self.kw)
        return self.ak_cls(groups, backend="torch" if name == "A" else "cpu", **self.kw)

    def _flat(self, name):
        return [p for ps in self.params[name] for p in ps]

    def _group_of(self, p):  # T's group holding p
        return next(g for g in self.opts["T"].param_groups if any(q is p for q in g["params"]))

    # ---- rules ---------------------------------------------------------------------------
    @rule(mask=st.lists(st.booleans(), min_size=8, max_size=8), closure=st.booleans(),
          grad_scale=st.sampled_from([1e-3, 1.0, 30.0]))
    def step(self, mask, closure, grad_scale):
        grads = [torch.randn(p.shape, generator=self.gen, dtype=p.dtype) * grad_scale if mask[i % len(mask)] else None
                 for i, p in enumerate(self._flat("T"))]
        before = self._operands(grads)
        losses = {}
        for name, opt in self.opts.items():
            params = self._flat(name)

            def set_grads(params=params):
                for p, g in zip(params, grads):
                    p.grad = None if g is None else g.clone()
                return torch.tensor(float(sum(g.sum() for g in grads if g is not None)))

            if closure:
                losses[name] = opt.step(set_grads)
            else:
                set_grads()
                losses[name] = opt.step()
        self.scales = self._scales(before)
        if closure:
            assert all(torch.equal(losses["T"], loss) for loss in losses.values())
        else:
            assert all(loss is None for loss in losses.values())

    def _operands(self, grads):
        """Per param with a grad: the largest |θ|, |m|, |v| and |g| (with coupled decay)
        that T's step starts from."""
        out = {}
        opt = self.opts["T"]
        for i, (p, g) in enumerate(zip(self._flat("T"), grads)):
            if g is None:
                continue
            group = self._group_of(p)
            coupled = self.torch_cls is torch.optim.Adam and not group.get("decoupled_weight_decay")
            g_eff = g + group["weight_decay"] * p.detach() if coupled else g
            state = opt.state.get(p, {})
            out[i] = dict(param=_largest(p), grad=_largest(g_eff),
                          **{k: _largest(state[k]) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in state})
        return out

    def _scales(self, before):
        """The scale each of C's tensors is judged against after a step: its operands'
        magnitudes, not its own, since an update can cancel far below them (m ← β1·m +
        (1 − β1)·g with m ≈ g) while float32 rounds at the operands' size."""
        scales = {}
        opt = self.opts["T"]
        for i, p in enumerate(self._flat("T")):
            if i not in before:
                continue
            b, state = before[i], opt.state[p]
            group = self._group_of(p)
            m_scale = max(b.get("exp_avg", 0.0), b["grad"])
            v_scale = max(b.get("exp_avg_sq", 0.0), b["grad"] ** 2, _largest(state["exp_avg_sq"]))
            step = float(state["step"])
            beta1, beta2 = group["betas"]
            # |lr·m̂/(√v̂ + ε)| ≤ lr·max|m̂| / ε at worst; bound it by the update as taken.
            direction = (state["exp_avg"] / (1 - beta1 ** step)) / (
                (state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]).sqrt()
                / (1 - beta2 ** step) ** 0.5 + group["eps"])
            scales[i] = dict(param=max(b["param"], _largest(p), group["lr"] * _largest(direction)),
                             exp_avg=m_scale, exp_avg_sq=v_scale,
                             max_exp_avg_sq=max(v_scale, b.get("max_exp_avg_sq", 0.0)))
        return scales

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=set_to_none)

    @rule(data=st.data(), key=st.sampled_from(["lr", "betas", "eps", "weight_decay", "maximize"]))
    def set_hyperparameter(self, data, key):
        index = data.draw(st.integers(0, len(self.lrs) - 1))
        value = data.draw({
            "lr": st.floats(1e-4, 1e-1),
            "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
            "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 1e-2, 0.3]),
            "maximize": st.booleans(),
        }[key])
        if key == "lr":
            self.lrs[index] = value
        for opt in self.opts.values():
            opt.param_groups[index][key] = value

    @precondition(lambda self: len(self.lrs) < 3)
    @rule(lr=st.floats(1e-4, 1e-1), big=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
    def add_param_group(self, lr, big, dtype):
        # float64: the cpu backend hands it to the portable one, as torch's fused kernel does not.
        value = torch.randn(SHAPES[3] if big else SHAPES[0], generator=self.gen, dtype=dtype)
        self.lrs.append(lr)
        for name, opt in self.opts.items():
            p = torch.nn.Parameter(value.clone())
            self.params[name].append([p])
            opt.add_param_group({"params": [p], "lr": lr})

    @rule(index=st.integers(0, 7), factor=st.sampled_from([0.5, -1.0, 3.0]))
    @torch.no_grad()
    def edit_param_in_place(self, index, factor):
        for name in self.NAMES:
            params = self._flat(name)
            params[index % len(params)].mul_(factor)

    @rule(index=st.integers(0, 7), factor=st.sampled_from([0.0, 2.0]))
    @torch.no_grad()
    def edit_grad_in_place(self, index, factor):
        for name in self.NAMES:
            params = self._flat(name)
            grad = params[index % len(params)].grad
            if grad is not None:
                grad.mul_(factor)

    @rule(index=st.integers(0, 7))
    def step_with_a_sparse_grad(self, index):
        """Every optimizer raises torch's error. adamkit's change nothing; torch.optim may
        have stepped the groups before the sparse grad's (it is put back, to go on)."""
        grads = [torch.randn(p.shape, generator=self.gen, dtype=p.dtype) for p in self._flat("T")]
        index %= len(grads)
        kept = {n: self._snapshot(n) for n in self.NAMES}
        errors = {}
        for name, opt in self.opts.items():
            for i, (p, g) in enumerate(zip(self._flat(name), grads)):
                p.grad = g.to_sparse() if i == index else g.clone()
            try:
                opt.step()
            except RuntimeError as e:
                errors[name] = str(e)
            self._flat(name)[index].grad = None
        assert set(errors) == set(self.NAMES) and len(set(errors.values())) == 1, errors
        for name in ("A", "C"):
            self._assert_unchanged(name, kept[name])
        self._restore("T", kept["T"])

    @rule(kind=st.sampled_from(["group size", "group count", "unknown param"]))
    def load_a_broken_state_dict(self, kind):
        """A state dict that does not fit: ValueError with torch's message (adamkit's may
        say more after it), and nothing changes. One with an entry that is no param's
        loads (the invariants compare the rest with torch's)."""
        saved = self.opts["T"].state_dict()
        groups = saved["param_groups"]
        if kind == "group size":
            groups[0]["params"] = groups[0]["params"][:-1]
        elif kind == "group count":
            saved["param_groups"] = groups + [dict(groups[0], params=[])]
        else:  # a state entry for an id that no group lists
            saved["state"][10_000] = {"step": torch.tensor(1.0)}
        messages = {}
        for name, opt in self.opts.items():
            kept = self._snapshot(name)
            try:
                opt.load_state_dict(_save_load(saved))
            except ValueError as e:
                messages[name] = str(e)
                self._assert_unchanged(name, kept)
        if kind == "unknown param":
            # torch.optim loads it, keeping the entry that is no param's: so does adamkit.
            assert not messages, messages
            assert all(10_000 in opt.state for opt in self.opts.values())
        else:
            assert set(messages) == set(self.NAMES), messages
            assert all(m.startswith(messages["T"]) for m in messages.values()), messages

    def _snapshot(self, name):
        return [p.detach().clone() for p in self._flat(name)], _snapshot(self.opts[name])

    def _assert_unchanged(self, name, kept):
        values, saved = kept
        for i, (p, value) in enumerate(zip(self._flat(name), values, strict=True)):
            assert torch.equal(p.detach(), value), f"{name} param {i} changed"
        _assert_unchanged(self.opts[name], saved)

    @torch.no_grad()
    def _restore(self, name, kept):
        values, saved = kept
        for p, value in zip(self._flat(name), values):
            p.copy_(value)
        self.opts[name].load_state_dict(saved)

    @rule(index=st.integers(0, 7))
    def forget_a_params_state(self, index):
        """``del opt.state[p]``: the next step starts p afresh, at step 1."""
        for name, opt in self.opts.items():
            params = self._flat(name)
            opt.state.pop(params[index % len(params)], None)

    @rule()
    def checkpoint_round_trip(self):
        """Each optimizer saved, reloaded into a new one of its kind over the same params."""
        for name, opt in list(self.opts.items()):
            saved = _save_load(opt.state_dict())
            self.opts[name] = self._make(name)
            self.opts[name].load_state_dict(saved)

    @rule(torch_to_adamkit=st.booleans(), torch_form=st.booleans())
    def hand_over_state(self, torch_to_adamkit, torch_form):
        """torch.optim's state loaded into both adamkit optimizers, or adamkit's (torch
        backend; as its own state_dict or as torch_state_dict()) into torch.optim and
        adamkit's cpu one."""
        source = "T" if torch_to_adamkit else "A"
        opt = self.opts[source]
        saved = _save_load(opt.torch_state_dict() if torch_form and source == "A" else opt.state_dict())
        for name in self.NAMES:
            if name != source:
                self.opts[name] = self._make(name)
                self.opts[name].load_state_dict(saved)

    # ---- invariants ----------------------------------------------------------------------
    @invariant()
    def same_groups(self):
        for name in ("A", "C"):
            for gt, ga in zip(self.opts["T"].param_groups, self.opts[name].param_groups, strict=True):
                for key in COMPARED_KEYS:
                    assert ga[key] == gt[key], (name, key, ga[key], gt[key])

    @invariant()
    def same_numbers_then_resync(self):
        # One invariant, not two: hypothesis may run invariants in any order.
        self._same_numbers()
        self._resync_cpu()
        self.scales = {}

    def _same_numbers(self):
        torch_params = self._flat("T")
        for name, (rtol, atol) in (("A", (0.0, 0.0)), ("C", (RTOL, ATOL))):
            for i, (pt, pa) in enumerate(zip(torch_params, self._flat(name), strict=True)):
                scales = self.scales.get(i, {}) if name == "C" else {}
                assert_close_scaled(pa, pt, rtol, atol, f"{name} param {i}", scales.get("param"))
                assert (pa.grad is None) == (pt.grad is None), f"{name} grad {i}"
                if pt.grad is not None:
                    assert torch.equal(pa.grad, pt.grad), f"{name} grad {i}: written into"
                st_t, st_a = self.opts["T"].state.get(pt, {}), self.opts[name].state.get(pa, {})
                keys_a = {k for k in st_a if k not in formats.TAGS}
                keys_t = {k for k in st_t if k not in formats.TAGS}  # (T's, after loading A's)
                assert keys_a == keys_t, f"{name} param {i}: state keys {keys_a} vs {keys_t}"
                for key in keys_t:
                    value = st_t[key]
                    if key == "step":
                        assert float(st_a[key]) == float(value), f"{name} param {i}: step"
                    else:
                        assert_close_scaled(st_a[key], value, rtol, atol, f"{name} param {i} {key}",
                                            scales.get(key))

    @torch.no_grad()
    def _resync_cpu(self):
        """C from T's numbers: the next call starts both from the same inputs."""
        for pt, pc in zip(self._flat("T"), self._flat("C")):
            pc.copy_(pt)
            for key, value in self.opts["T"].state.get(pt, {}).items():
                if key not in formats.TAGS:
                    self.opts["C"].state[pc][key].copy_(value)


def test_random_api_sequences_match_torch(checks_mode):
    """With the step cache's checks in Python and in C++ (conftest.checks_mode)."""
    run_state_machine_as_test(AdamApiMachine, settings=settings(stateful_step_count=25))
