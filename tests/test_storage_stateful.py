"""Random sequences of low-precision training calls, on the cpu kernel and the torch backend.

test_storage.py holds each storage (param dtype × state format × param update) fixed for
a few steps. Here hypothesis's state machine changes it mid-run: a group's storage edited
between steps, checkpoints loaded into optimizers of another storage (fp32/bf16/int8 into
one another, kahan and master into nearest and back), states handed through
torch.optim's form, params written in place (master copies follow them), hyperparameters
edited, steps with some grads missing or run under a GradScaler-style scale. After every
call the two backends, and the cpu backend made to plan every step afresh (no step cache),
hold the same bits: params, moments, int8 codes and scales, kahan and master buffers, step
counters and tags. formats.md pins every float32 operation, so no tolerance is needed,
and none is given. Moments edited in place or replaced between steps check that the step
cache notices what the full path reads.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import adamkit
from adamkit.backends import cpu
from adamkit.formats import stored_formats
from test_checkpoints import _save_load  # torch.save, then torch.load(weights_only=True)

pytestmark = pytest.mark.skipif(cpu.BACKEND.unavailable_reason() is not None, reason="no CPU kernels")

# A tensor of more than one int8 block (with int8_min_size lowered to 256) and a partial
# one, a small matrix that int8 leaves in fp32, a 0-dim.
SHAPES = [(700,), (3, 5), ()]
BACKENDS = ("torch", "cpu", "cpu uncached")
FORMATS = st.sampled_from([None, "fp32", "bf16", "int8"])
# float32 params with fp32 state: the torch backend is torch.optim's op sequence, not
# formats.md's, and is compared with the kernel within rounding (test_api_stateful.py).
FLOAT32_FORMATS = st.sampled_from(["bf16", "int8"])
UPDATES = st.sampled_from([None, "nearest", "kahan", "stochastic", "master"])


class StorageMachine(RuleBasedStateMachine):
    @initialize(data=st.data(), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
                param_update=UPDATES, amsgrad=st.booleans(), decouple_wd=st.booleans(),
                seed=st.integers(0, 2**16))
    def build(self, data, dtype, param_update, amsgrad, decouple_wd, seed):
        self.formats = FLOAT32_FORMATS if dtype == torch.float32 else FORMATS
        state_format = data.draw(self.formats)
        gen = torch.Generator().manual_seed(seed)
        start = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
        self.dtype, self.gen = dtype, gen
        # int8 from 256 elements: the small matrix and the 0-dim keep fp32 moments, except
        # beside float32 params, where fp32 moments are torch.optim's arithmetic
        self.kw = dict(lr=1e-2, weight_decay=0.05, amsgrad=amsgrad, decouple_wd=decouple_wd,
                       seed=seed, int8_min_size=1 if dtype == torch.float32 else 256)
        self.params = {b: [torch.nn.Parameter(x.clone()) for x in start] for b in BACKENDS}
        self.opts = {b: self._make(b, state_format, param_update) for b in BACKENDS}

    def _make(self, backend, state_format, param_update):
        return adamkit.Adam(self.params[backend], backend=backend.split()[0], state_format=state_format,
                            param_update=param_update, **self.kw)

    @rule(mask=st.lists(st.booleans(), min_size=3, max_size=3),
          log_scale=st.sampled_from([-4, 0, 1]), grad_scale=st.sampled_from([None, 1024.0]))
    def step(self, mask, log_scale, grad_scale):
        grads = [None if not keep else
                 (torch.randn(s, generator=self.gen) * 10.0 ** log_scale).to(self.dtype)
                 for s, keep in zip(SHAPES, mask)]
        for b in BACKENDS:
            for p, g in zip(self.params[b], grads):
                p.grad = None if g is None else g.clone()
            opt = self.opts[b]
            if b == "cpu uncached":
                opt._step_cache = None  # the full path: plans, validates and steps
            if grad_scale is None:
                opt.step()
            else:  # GradScaler's fast path: grads scaled, the optimizer unscales them
                scaler = torch.amp.GradScaler("cpu", init_scale=grad_scale)
                scaler.scale(torch.ones(()))  # initialises the scale
                for p in self.params[b]:
                    if p.grad is not None:
                        p.grad.mul_(grad_scale)
                scaler.step(opt)

    @rule(data=st.data(), param_update=UPDATES)
    def change_group_storage(self, data, param_update):
        """The next step converts every state into the group's new storage."""
        state_format = data.draw(self.formats)
        for opt in self.opts.values():
            opt.param_groups[0]["state_format"] = state_format
            opt.param_groups[0]["param_update"] = param_update

    @rule(data=st.data(), param_update=UPDATES, torch_form=st.booleans())
    def load_into_another_storage(self, data, param_update, torch_form):
        """Each backend's checkpoint (its own, or torch.optim's form of it) loaded into a
        new optimizer configured with another storage."""
        state_format = data.draw(self.formats)
        for b in BACKENDS:
            old = self.opts[b]
            saved = _save_load(old.torch_state_dict() if torch_form else old.state_dict())
            self.opts[b] = self._make(b, state_format, param_update)
            self.opts[b].load_state_dict(saved)

    @rule(index=st.integers(0, 2), factor=st.sampled_from([0.5, -2.0]))
    @torch.no_grad()
    def write_param_in_place(self, index, factor):
        """A write to a param between steps: master copies restart from it."""
        for b in BACKENDS:
            self.params[b][index].mul_(factor)

    @rule(index=st.integers(0, 2), replace=st.booleans())
    @torch.no_grad()
    def edit_state(self, index, replace):
        """Every float state tensor of one param (moments, kahan and master buffers, int8
        scales) halved in place, or replaced by a copy; int8 codes are left alone (halving
        a code is no edit of a value that a user would make)."""
        for b in BACKENDS:
            state = self.opts[b].state.get(self.params[b][index], {})
            for key, value in list(state.items()):
                if key == "step" or not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    continue
                if replace:
                    state[key] = value.clone()
                else:
                    value.mul_(0.5)

    @rule(lr=st.floats(1e-4, 1e-1), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999))
    def set_hyperparameters(self, lr, beta1, beta2):
        for opt in self.opts.values():
            opt.param_groups[0].update(lr=lr, betas=(beta1, beta2))

    @invariant()
    def same_bits(self):
        for other in BACKENDS[1:]:
            self._same_bits("torch", other)

    def _same_bits(self, one, other):
        ta, tc = self.opts[one], self.opts[other]
        for i, (pa, pc) in enumerate(zip(self.params[one], self.params[other], strict=True)):
            assert torch.equal(pa, pc), f"{other} param {i}: {(pa != pc).sum().item()} elements differ"
            sa, sc = ta.state.get(pa, {}), tc.state.get(pc, {})
            assert sa.keys() == sc.keys(), (i, sa.keys(), sc.keys())
            for key in sa:
                a, c = sa[key], sc[key]
                assert type(a) is type(c), (i, key)
                if isinstance(a, torch.Tensor):
                    assert a.dtype == c.dtype and torch.equal(a, c), f"{other} param {i} {key} differs"
                else:
                    assert a == c, (i, key)
            if sa:
                assert stored_formats(sa) == stored_formats(sc)


def test_random_storage_sequences_agree_bitwise(checks_mode):
    """Run with the step cache's checks in Python and in C++ (conftest.checks_mode). Five
    times the profile's examples: a run takes seconds, and the failures it looks for need
    a step cached, then an edit, then another step."""
    run_state_machine_as_test(StorageMachine, settings=settings(
        stateful_step_count=20, max_examples=5 * settings.default.max_examples))
