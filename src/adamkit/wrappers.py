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
profilers' Python flag is up, or a step hook is registered. Otherwise no range could be
recorded, and it calls the step and ``_optimizer_step_code`` (the profiler's
Python-tracing entry point) directly. ``zero_grad`` keeps torch's where a range could be
recorded and for ``set_to_none=False``, and otherwise sets the grads to None itself.
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
from pathlib import Path
from typing import Any, Callable

import torch
import torch.autograd.profiler as _profiler
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer



def _find_has_callbacks() -> Callable[[], bool] | None:
    """libtorch's ``at::hasCallbacks()``: whether any RecordFunction callback is registered,
    global or on this thread (a profiler's, on-demand Kineto's, an execution-trace
    observer's), which is when torch's ``record_function`` can record anything. None where
    it is not found (then every step takes torch's wrapper)."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (lib_dir / name).exists():
            try:
                fn = ctypes.CDLL(str(lib_dir / name))["_ZN2at12hasCallbacksEv"]
            except (OSError, AttributeError):
                return None
            fn.restype, fn.argtypes = ctypes.c_bool, []
            return fn
    return None


_has_callbacks = _find_has_callbacks()


def _global_hooks() -> tuple[dict, dict] | None:
    """torch's registries of global step hooks; None where this torch keeps them
    elsewhere (then every step takes torch's wrapper)."""
    pre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
    post = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
    return (pre, post) if isinstance(pre, dict) and isinstance(post, dict) else None


_GLOBAL_HOOKS = _global_hooks()


def profiling() -> bool:
    """Whether anything can record a profiler range here: a RecordFunction callback is
    registered, or torch's profilers' Python flag is up (also for one running on another
    thread, which records nothing of this one's: conservative)."""
    return _has_callbacks is None or _profiler._is_profiler_enabled or _has_callbacks()


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
        if observed(opt):
            return hooked(*args, **kwargs)
        out = func(*args, **kwargs)
        opt._optimizer_step_code()
        return out

    return wrapper


def zero_grad(opt: Optimizer, set_to_none: bool) -> None:
    """``Optimizer.zero_grad`` (see the module docstring)."""
    if profiling() or not set_to_none:
        torch_eagerly(Optimizer.zero_grad)(opt, set_to_none)
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


def torch_eagerly(method: Callable) -> Callable:
    """An Optimizer method that torch wraps in ``torch._disable_dynamo``: until dynamo is
    imported, the method unwrapped (no trace can be running into it); from then on
    torch's wrapper, which runs it eagerly under a trace as torch.optim does."""
    if "torch._dynamo" in sys.modules:
        return method
    return getattr(method, "__wrapped__", method)
