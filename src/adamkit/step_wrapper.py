"""torch.optim's wrapper of ``step``, without its cost where nothing uses it.

``torch.optim.Optimizer`` wraps every subclass's ``step`` (``profile_hook_step``): it
opens a profiler range (``record_function``, a dispatcher call that builds a
RecordFunction whether or not anything records it) and runs the global and per-optimizer
step hooks around the step. Right after a step has streamed the parameters through the
caches, that wrapper ran cold and took about 170 us per step on a 2-core Zen 5 (and 8 us
warm), more than the rest of adamkit's Python around the kernel
(benchmarks/step_overhead.py).

``profile_hook_step`` below keeps torch's wrapper for every step that can observe it: a
profiler is recording (torch's Python flag, which its profilers set, or its C++ state),
or any step hook is registered. Otherwise it calls the step and
``_optimizer_step_code`` (the profiler's Python-tracing entry point) directly. What
differs: a RecordFunction observer registered without a profiler (an execution-trace
observer started on its own) sees no ``Optimizer.step#...`` range; torch's Inductor
skips its ranges on the same flag.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.autograd.profiler as _profiler
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

_profiler_state_on = torch._C._autograd._profiler_enabled


def _global_hooks() -> tuple[dict, dict] | None:
    """torch's registries of global step hooks; None where this torch keeps them
    elsewhere (then every step takes torch's wrapper)."""
    pre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
    post = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
    return (pre, post) if isinstance(pre, dict) and isinstance(post, dict) else None


_GLOBAL_HOOKS = _global_hooks()


def observed(opt: Optimizer) -> bool:
    """Whether a step of ``opt`` has anything watching it: a profiler or a step hook."""
    if _GLOBAL_HOOKS is None or _profiler._is_profiler_enabled or _profiler_state_on():
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
