"""Small models and a lockstep runner shared by the parity tests, and shared skip marks."""

from __future__ import annotations

import copy
import shutil
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

from adamkit import formats
from adamkit.backends.cpu import library

# Tests that compile C++ against the kernel headers for AVX2 (tools/, benchmarks/).
needs_gxx_avx2 = pytest.mark.skipif(
    shutil.which("g++") is None or "avx2" not in library.isa_candidates(),
    reason="needs g++ and AVX2")


class Wrapped(torch.Tensor):
    """A wrapper tensor subclass (as DTensor is one): no storage of its values (its
    data_ptr is 0), ops unwrap it; its strides and contiguity are computed in Python."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                   device=elem.device, dispatch_sizes_strides_policy="strides")

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.is_contiguous.default, torch.ops.aten.is_contiguous.memory_format):
            return True
        if func is torch.ops.aten.stride.default:
            return args[0].elem.stride()
        unwrap = lambda x: x.elem if isinstance(x, Wrapped) else x  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


class TinyMLP(nn.Module):
    """An MLP with a 0-dim parameter (a learned output scale)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.to(dtype)

    def forward(self, x):
        return self.net(x) * self.scale


def lockstep(
    make_a: Callable, make_b: Callable, *, dtype: torch.dtype, steps: int = 120, seed: int = 0,
    compare: Callable[[int, nn.Module, object, nn.Module, object], None],
    freeze: tuple[int, int] = (30, 60), resync: bool = False,
) -> None:
    """Train two copies of TinyMLP side by side on the same batches, calling ``compare``
    after every step. One parameter is frozen (no grad) for the steps in ``freeze``.

    With ``resync``, b's params and state are set to a's after each comparison, so every
    step is judged from identical inputs: rounding differences of one step are then not
    amplified through the model's gradients into the next (the dynamics are chaotic)."""
    torch.manual_seed(seed)
    model_a = TinyMLP(dtype)
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = make_a(model_a.parameters()), make_b(model_b.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        x = torch.randn(32, 6, generator=gen, dtype=dtype)
        y = torch.randn(32, 3, generator=gen, dtype=dtype)
        frozen = freeze[0] <= step < freeze[1]
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            model.net[0].bias.requires_grad_(not frozen)
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        compare(step, model_a, opt_a, model_b, opt_b)
        if resync:
            _copy_into(model_a, opt_a, model_b, opt_b)


@torch.no_grad()
def _copy_into(model_a, opt_a, model_b, opt_b):
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        pb.copy_(pa)
        for key, value in opt_a.state[pa].items():
            if isinstance(value, torch.Tensor) and key not in formats.TAGS:  # (torch.optim has none)
                opt_b.state[pb][key].copy_(value)


def assert_close_scaled(
    actual, expected, rtol: float, atol: float, msg: str = "", scale: float | None = None
) -> float:
    """max|actual − expected| ≤ rtol·scale + atol; returns the error relative to scale.

    Rounding errors of an elementwise update are relative to the magnitudes of its
    operands, and where ``β1·m + (1−β1)·g`` cancels, an element can be far smaller than
    them. So the error is measured against the tensor's scale (by default its largest
    magnitude; callers pass a larger one when the operands were larger), not element
    by element."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, msg
    a, e = actual.detach().double(), expected.detach().double()
    if a.is_complex():
        a, e = torch.view_as_real(a), torch.view_as_real(e)
    err = (a - e).abs().max().item() if a.numel() else 0.0
    if scale is None:
        scale = e.abs().max().item() if e.numel() else 0.0
    assert err <= rtol * scale + atol, f"{msg}: max error {err:.3g} > {rtol:g}·{scale:.3g} + {atol:g}"
    return err / scale if scale else err


def assert_same_state(model_a, opt_a, model_b, opt_b, rtol: float, atol: float, msg: str = ""):
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert_close_scaled(pa, pb, rtol, atol, f"{msg} {name}")
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        # Storage tags (adamkit's state_format/param_update; torch.optim has none) agree
        # where both sides have them.
        tags = set(formats.TAGS)
        tensors_a = {k for k, v in sa.items() if isinstance(v, torch.Tensor)} - tags
        tensors_b = {k for k, v in sb.items() if isinstance(v, torch.Tensor)} - tags
        assert tensors_a == tensors_b, f"{msg} {name}: state keys differ"
        for key in sa.keys() & sb.keys() & tags:
            assert torch.equal(sa[key], sb[key]), f"{msg} {name}.{key}: {sa[key]!r} != {sb[key]!r}"
        for key in tensors_a:
            if key == "step":
                assert float(sa[key]) == float(sb[key]), f"{msg} {name}: step differs"
            else:
                assert_close_scaled(sa[key], sb[key], rtol, atol, f"{msg} {name}.{key}")


def on_a_cached_plan(numel: int, n_params: int = 3):
    """n zero params on the cpu backend, stepped twice with grads of ones and given new
    ones: their next step runs from the cached plan. Returns (params, optimizer)."""
    import adamkit

    ps = [nn.Parameter(torch.zeros(numel)) for _ in range(n_params)]
    opt = adamkit.Adam(ps, backend="cpu")
    for step in range(3):
        for p in ps:
            p.grad = torch.ones(numel)
        if step < 2:  # and the third set of grads waits for the caller's step
            opt.step()
    return ps, opt


def snapshot(opt, params):
    """Copies of ``params`` and of every state tensor, for ``assert_unchanged``."""
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for p, st in opt.state.items()})


def assert_unchanged(opt, params, snap):
    """A failed step or edit left ``params`` and the state as ``snapshot`` saw them: the
    same bits, and no state entry or key added or dropped."""
    before_p, before_s = snap
    for p, b in zip(params, before_p):
        assert torch.equal(p.detach(), b)
    assert {id(p) for p in opt.state} == before_s.keys()
    for p, st in opt.state.items():
        assert st.keys() == before_s[id(p)].keys()
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, before_s[id(p)][k]), k
