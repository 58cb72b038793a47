"""The step's wrapper (wrappers.py) and its grad mode: torch.optim's behaviour wherever
anything can observe it, and no profiler range built where nothing does."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import adamkit

OPTIMIZERS = [adamkit.Adam, adamkit.AdamW]


class _CountingRange:
    """Stands in for torch.autograd.profiler.record_function, counting the ranges opened."""

    opened: list[str] = []

    def __init__(self, name: str, args: str | None = None) -> None:
        self.name = name

    def __enter__(self) -> _CountingRange:
        _CountingRange.opened.append(self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def ranges(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the profiler ranges steps open (torch's wrapper looks the class up at
    each call)."""
    _CountingRange.opened = []
    monkeypatch.setattr(torch.autograd.profiler, "record_function", _CountingRange)
    return _CountingRange.opened


def _stepped(make, **kwargs):
    p = torch.nn.Parameter(torch.randn(3))
    opt = make([p], **kwargs)
    p.grad = torch.ones(3)
    return opt, p


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_a_step_nothing_observes_opens_no_profiler_range(make, ranges):
    opt, p = _stepped(make)
    before = p.detach().clone()
    opt.step()
    opt.step()
    assert ranges == []
    assert not torch.equal(p, before)  # it stepped


@pytest.mark.parametrize("make", OPTIMIZERS)
@pytest.mark.parametrize("hook", ["pre", "post", "global pre", "global post"])
def test_any_step_hook_takes_torchs_wrapper(make, hook, ranges):
    """With a hook registered, the step runs inside torch's own wrapper: its range is
    opened, and the hook runs once."""
    opt, _ = _stepped(make)
    seen = []
    register = {"pre": opt.register_step_pre_hook, "post": opt.register_step_post_hook,
                "global pre": register_optimizer_step_pre_hook,
                "global post": register_optimizer_step_post_hook}[hook]
    handle = register(lambda o, a, k: seen.append(o))
    try:
        opt.step()
    finally:
        handle.remove()
    assert seen == [opt]
    assert ranges == [f"Optimizer.step#{make.__name__}.step"]
    opt.step()  # removed: the fast path again
    assert len(ranges) == 1


@pytest.mark.parametrize("make", [*OPTIMIZERS, torch.optim.Adam])
@pytest.mark.parametrize("hook", ["post", "global post"])
def test_a_post_hook_the_closure_registers_runs_after_that_step(make, hook):
    """torch's wrapper looks its post hooks up after the step: one registered during the
    step (by the closure) runs after it. The fast path had decided at entry that no hook
    watched, and skipped it."""
    opt, p = _stepped(make)
    seen, handles = [], []
    register = {"post": opt.register_step_post_hook,
                "global post": register_optimizer_step_post_hook}[hook]

    def closure():
        if not handles:
            handles.append(register(lambda o, a, k: seen.append((o, a, k))))
        return 0.0

    try:
        opt.step(closure)
        assert seen == [(opt, (opt, closure), {})]
        opt.step(closure)
        assert len(seen) == 2
    finally:
        handles[0].remove()


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_the_profilers_flag_takes_torchs_wrapper(make, ranges, monkeypatch):
    """torch's profilers set torch.autograd.profiler._is_profiler_enabled while they run
    (test_step_is_labelled_while_a_profiler_runs runs a real one)."""
    opt, _ = _stepped(make)
    monkeypatch.setattr(torch.autograd.profiler, "_is_profiler_enabled", True)
    opt.step()
    assert ranges == [f"Optimizer.step#{make.__name__}.step"]


@pytest.mark.parametrize("make", OPTIMIZERS)
@pytest.mark.parametrize("with_hook", [False, True])
def test_the_profilers_python_entry_point_runs_after_every_step(make, with_hook, monkeypatch):
    """torch's profiler, tracing Python, reads the optimizer at _optimizer_step_code: it is
    called once per step, after the update, on both paths."""
    opt, p = _stepped(make)
    calls = []
    monkeypatch.setattr(opt, "_optimizer_step_code", lambda: calls.append(p.detach().clone()))
    handle = opt.register_step_post_hook(lambda *a: None) if with_hook else None
    before = p.detach().clone()
    opt.step()
    if handle is not None:
        handle.remove()
    assert len(calls) == 1 and not torch.equal(calls[0], before)


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])  # auto: the kernel where built
def test_the_update_runs_without_grad_and_the_mode_is_restored(grad_enabled, backend, monkeypatch):
    """As torch.optim's steps (no_grad): the update runs with grad off, the closure with
    grad on; afterwards the caller's mode is back, also when the step raises."""
    opt, p = _stepped(adamkit.Adam, backend=backend)
    modes = []
    update = opt._update_without_grad

    def recording_update():
        modes.append(torch.is_grad_enabled())
        update()

    monkeypatch.setattr(opt, "_update_without_grad", recording_update)

    def closure():
        modes.append(("closure", torch.is_grad_enabled()))
        return torch.tensor(0.0)

    with torch.set_grad_enabled(grad_enabled):
        opt.step(closure)
        assert torch.is_grad_enabled() is grad_enabled
        p.grad = torch.ones(3).to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        assert torch.is_grad_enabled() is grad_enabled
    assert modes == [("closure", True), False, False]
    assert opt.state[p]["step"].item() == 1


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_zero_grad_sets_grads_to_none_without_a_range_where_no_profiler_records(make, ranges):
    opt, p = _stepped(make)
    other = torch.nn.Parameter(torch.zeros(2))  # no grad: stays without one
    opt.add_param_group({"params": [other]})
    opt.zero_grad()
    assert p.grad is None and other.grad is None
    assert ranges == []


@pytest.mark.parametrize("make", OPTIMIZERS)
@pytest.mark.parametrize("profiling", [False, True])
def test_zero_grad_is_torchs_for_zeros_and_while_a_profiler_records(make, profiling, ranges, monkeypatch):
    """set_to_none=False (torch's: detached grads zeroed in place), and any zero_grad
    while a profiler records, run torch.optim's zero_grad, range included."""
    monkeypatch.setattr(torch.autograd.profiler, "_is_profiler_enabled", profiling)
    opt, p = _stepped(make)
    grad = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is grad and torch.equal(grad, torch.zeros(3))
    opt.zero_grad()
    assert p.grad is None
    name = f"Optimizer.zero_grad#{make.__name__}.zero_grad"
    assert ranges == [name, name] if profiling else ranges == [name]


def test_a_standalone_execution_trace_observer_records_the_steps_ranges(tmp_path):
    """An observer that is no profiler (torch's Python flag and profiler state both down)
    still gets torch.optim's ranges: the wrapper asks libtorch whether any RecordFunction
    callback is registered."""
    from torch.profiler import ExecutionTraceObserver

    opt, _ = _stepped(adamkit.AdamW)
    trace = tmp_path / "trace.json"
    observer = ExecutionTraceObserver().register_callback(str(trace))
    observer.start()
    try:
        assert not torch.autograd.profiler._is_profiler_enabled
        opt.step()
        opt.zero_grad()
    finally:
        observer.stop()
        observer.unregister_callback()
    text = trace.read_text()
    assert "Optimizer.step#AdamW.step" in text and "Optimizer.zero_grad#AdamW.zero_grad" in text


@pytest.mark.parametrize("base", [torch.optim.Adam, adamkit.Adam], ids=["torch.optim", "adamkit"])
def test_a_subclass_overriding_step_runs_its_hooks_as_torch_optim_does(base, ranges):
    """torch.optim wraps each class's own ``step`` once: a subclass whose step calls its
    parent's, where the parent's is wrapped too (an instance of it was made), runs each
    hook once per wrapper. adamkit's wrapper delegates to torch's wherever a hook is
    registered, so the counts are torch.optim's, whichever the base."""
    base([torch.nn.Parameter(torch.zeros(1))])  # the parent's step is wrapped

    class Sub(base):
        def step(self, closure=None):
            return super().step(closure)

    p = torch.nn.Parameter(torch.randn(3))
    opt = Sub([p])
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    p.grad = torch.ones(3)
    opt.step()
    assert seen == ["pre", "pre", "post", "post"]
    assert ranges == ["Optimizer.step#Sub.step"] * 2


class _OpsSeen(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the profiler ops a dispatch mode sees (record_function is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "record_function" in str(func):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [torch.optim.Adam, adamkit.Adam], ids=["torch.optim", "adamkit"])
def test_a_dispatch_mode_sees_the_ranges_as_for_torch_optim(make):
    """record_function is an op: a dispatch mode sees it (DebugMode records it as the
    step's annotation), so with one active the step takes torch's wrapper."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = make([p])
    p.grad = torch.ones(3)
    with _OpsSeen() as mode:
        opt.step()
        opt.zero_grad()
    enters = [op for op in mode.ops if "enter" in op]
    assert len(enters) == 2, mode.ops  # the step's range and zero_grad's


@pytest.mark.parametrize("base", [torch.optim.Adam, adamkit.Adam], ids=["torch.optim", "adamkit"])
def test_a_mixins_overrides_of_torchs_methods_run(base):
    """adamkit calls torch's add_param_group, state_dict and zero_grad past their dynamo
    wrappers only where they are torch's own: a mixin's overrides run as for torch.optim."""
    calls = []

    class Mixin(torch.optim.Optimizer):
        def add_param_group(self, group):
            calls.append("add_param_group")
            super().add_param_group(group)

        def state_dict(self):
            calls.append("state_dict")
            return super().state_dict()

        def zero_grad(self, set_to_none=True):
            calls.append("zero_grad")
            super().zero_grad(set_to_none)

    class WithMixin(base, Mixin):
        pass

    p = torch.nn.Parameter(torch.randn(3))
    opt = WithMixin([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state_dict()
    opt.zero_grad()
    assert calls == ["add_param_group", "state_dict", "zero_grad"] and p.grad is None


def test_a_library_patch_of_torchs_method_runs(monkeypatch):
    """A patch of Optimizer.state_dict (functools.wraps style) runs for adamkit as for
    torch.optim: adamkit unwraps only torch's own dynamo wrapper."""
    import functools

    calls = []
    original = torch.optim.Optimizer.state_dict

    @functools.wraps(original)
    def patched(self):
        calls.append(type(self).__name__)
        return original(self)

    monkeypatch.setattr(torch.optim.Optimizer, "state_dict", patched)
    for make in (torch.optim.Adam, adamkit.Adam):
        make([torch.nn.Parameter(torch.randn(2))]).state_dict()
    assert calls == ["Adam", "Adam"]


def test_the_default_device_mode_keeps_the_fast_path(ranges):
    """``with torch.device(...)`` (and set_default_device) is a torch function mode that
    only fills in factory functions' device: it sees nothing of a range, so the step
    skips torch's wrapper under it; another function mode takes torch's."""
    opt, _ = _stepped(adamkit.Adam)
    with torch.device("cpu"):
        opt.step()
    assert ranges == []

    class Watching(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.device("cpu"), Watching():
        opt.step()
    assert ranges == ["Optimizer.step#Adam.step"]
