"""What torch.optim wraps around an optimizer's methods, and adamkit's leaner versions.

Profiler ranges and step hooks. ``torch.optim.Optimizer`` wraps every subclass's ``step``
(``profile_hook_step``): it opens a profiler range (``record_function``, a dispatcher call
that builds a RecordFunction whether or not anything records it) and runs the global and
per-optimizer step hooks around the step. Right after a step has streamed the parameters
through the caches, that wrapper ran cold and took about 170 us per step on a 2-core Zen 5
(8 us warm), more than the rest of adamkit's Python around the kernel
(benchmarks/step_overhead.py); its ``zero_grad`` opens a range too. ``profile_hook_step``
below keeps torch's wrapper for every step that anything can observe: a RecordFunction
callback is registered (libtorch's ``at::hasCallbacks``: a profiler, on-demand Kineto, an
execution-trace observer started on its own, on this thread or globally), torch's
profilers' Python flag is up, a torch function or dispatch mode other than the default
device's is active (the range is an op they see), dynamo is tracing, or a step hook is
registered. Otherwise nothing could see the range or the hooks, and it calls the step
and ``_optimizer_step_code`` (the profiler's Python-tracing entry point) directly.
``zero_grad`` keeps torch's (or a mixin's) where a range could be seen and for
``set_to_none=False``, and otherwise sets the grads to None itself.
(Session 9 replaced the wrapper on torch's profiler state alone, which misses such
observers, and reverted it: benchmarks/RESULTS.md.)

torch._dynamo. Importing it takes 1.4 s (Zen 5). torch.compiler.disable imports it, and
so does the first call of every Optimizer method torch wraps in ``torch._disable_dynamo``
(``add_param_group``, which its constructor calls; ``state_dict``, ``zero_grad``).
``eagerly`` and ``torch_eagerly`` keep a program that never compiles from importing it,
and one that does from tracing adamkit's planning.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from itertools import chain
from typing import Any, Callable

import torch
import torch.autograd.profiler as _profiler
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer


def _find_has_callbacks() -> Callable[[], bool] | None:
    """libtorch's ``at::hasCallbacks()``: whether any RecordFunction callback is registered,
    global or on this thread (a profiler's, on-demand Kineto's, an execution-trace
    observer's), which is when torch's ``record_function`` can record anything. Looked up
    through torch._C's extension, whose dependencies hold libtorch wherever it is
    installed. None where it is not found (then every step takes torch's wrapper)."""
    try:
        fn = ctypes.CDLL(torch._C.__file__)["_ZN2at12hasCallbacksEv"]
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_bool, []
    return fn


_has_callbacks = _find_has_callbacks()


def _global_hooks() -> tuple[dict, dict] | None:
    """torch's registries of global step hooks; None where this torch keeps them
    elsewhere (then every step takes torch's wrapper)."""
    pre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
    post = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
    return (pre, post) if isinstance(pre, dict) and isinstance(post, dict) else None


_GLOBAL_HOOKS = _global_hooks()


def profiling() -> bool:
    """Whether anything can see a profiler range opened here: a RecordFunction callback is
    registered; torch's profilers' Python flag is up (also for one running on another
    thread, which records nothing of this one's: conservative); or a torch function or
    dispatch mode is active (``record_function`` is an op they see, as
    torch.utils._debug_mode.DebugMode records it)."""
    return (_has_callbacks is None or _profiler._is_profiler_enabled or _has_callbacks()
            or _function_mode_watches() or torch._C._len_torch_dispatch_stack() > 0)


def _function_mode_watches() -> bool:
    """A torch function mode is active that is not torch's default-device one (the
    DeviceContext of ``with torch.device(...)`` and ``torch.set_default_device``, which
    only fills in factory functions' device: under set_default_device it is always on)."""
    if not torch._C._is_torch_function_mode_enabled():
        return False
    if _DeviceContext is None:
        return True
    stack = (torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack()))
    return not all(type(mode) is _DeviceContext for mode in stack)


try:
    from torch.utils._device import DeviceContext as _DeviceContext
except ImportError:  # another torch: every function mode counts as watching
    _DeviceContext = None


def observed(opt: Optimizer) -> bool:
    """Whether a step of ``opt`` has anything watching it: a profiler or a step hook."""
    if _GLOBAL_HOOKS is None or profiling():
        return True
    pre, post = _GLOBAL_HOOKS
    return bool(pre or post or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks)


def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
    """``Optimizer.profile_hook_step`` for adamkit's optimizers (see the module docstring)."""
    hooked = Optimizer.profile_hook_step(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = args[0]
        # under torch.compile, torch's wrapper: dynamo traces it as for torch.optim
        if torch.compiler.is_compiling() or observed(opt):
            return hooked(*args, **kwargs)
        out = func(*args, **kwargs)
        opt._optimizer_step_code()
        # post hooks the step registered (its closure, say): torch's wrapper runs them
        if opt._optimizer_step_post_hooks or _GLOBAL_HOOKS[1]:
            for hook in chain(opt._optimizer_step_post_hooks.values(), _GLOBAL_HOOKS[1].values()):
                hook(opt, args, kwargs)
        return out

    return wrapper


def zero_grad(opt: Optimizer, set_to_none: bool, inherited: Callable[[bool], None]) -> None:
    """``Optimizer.zero_grad`` (see the module docstring); ``inherited``: the zero_grad the
    optimizer's class inherits (torch's, or a mixin's, which then always runs)."""
    if profiling() or not set_to_none or not _is_torchs(inherited, "zero_grad"):
        torch_eagerly(inherited, "zero_grad")(set_to_none)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = None


def eagerly(fn: Callable) -> Callable:
    """``fn`` as torch.compiler.disable wraps it, once torch._dynamo is imported; until
    then ``fn`` itself, which nothing can trace (applied at class definition, the wrapper
    was 1.4 of the 2.6 s that ``import adamkit`` took). The wrapper is made once per
    function and kept on it: at construction where dynamo is already imported, else at the
    first call after, which may be inside dynamo's trace of it (dynamo then runs the
    making eagerly, at a graph break, and skips the wrapper)."""
    if "torch._dynamo" not in sys.modules:
        return fn
    wrapped = fn.__dict__.get("_adamkit_eagerly")
    if wrapped is None:
        wrapped = fn._adamkit_eagerly = torch.compiler.disable(fn)
    return wrapped


def _torchs_unwrapped(name: str) -> Callable | None:
    """torch's own ``Optimizer.<name>`` without its ``torch._disable_dynamo`` wrapper, where
    the class attribute is exactly that wrapper around torch's function (its code object is
    the one _disable_dynamo makes every wrapper with); None where a library replaced it."""
    method = Optimizer.__dict__.get(name)
    raw = getattr(method, "__wrapped__", None)
    if (raw is None or _DISABLE_DYNAMO_CODE is None
            or getattr(method, "__code__", None) is not _DISABLE_DYNAMO_CODE):
        return None
    # defined in torch.optim.optimizer itself (a patch defined elsewhere is not unwrapped)
    return raw if getattr(raw, "__globals__", None) is vars(_torch_optimizer) else None


_DISABLE_DYNAMO_CODE = getattr(torch._disable_dynamo(lambda: None), "__code__", None)


def torch_eagerly(bound: Callable, name: str) -> Callable:
    """``bound``, ``super().<name>`` of an adamkit optimizer. Where that is torch's own
    Optimizer method in its ``torch._disable_dynamo`` wrapper (whose first call imports
    torch._dynamo): until dynamo is imported, the method unwrapped (no trace can be
    running into it); from then on torch's wrapper, which runs it eagerly under a trace as
    torch.optim does. Anything else (a mixin's override, a library's patch) as is."""
    if "torch._dynamo" in sys.modules or not _is_torchs(bound, name):
        return bound
    return functools.partial(_torchs_unwrapped(name), bound.__self__)


def _is_torchs(bound: Callable, name: str) -> bool:
    """Whether ``bound`` is torch's own ``Optimizer.<name>``, in its dynamo wrapper."""
    return (getattr(bound, "__func__", None) is Optimizer.__dict__.get(name)
            and _torchs_unwrapped(name) is not None)
