"""What a step costs beyond its kernel, and what wrappers.py saves of it: interleaved A/B.

    python benchmarks/step_overhead.py [--rounds 31] [--params 16777216]

Two optimizers over two copies of the same params, identical but for the wrapper around
``step``: adamkit's (wrappers.py: torch's wrapper only where a hook or a profiler can
see the step; grad mode set by two C calls) and torch.optim's (``profile_hook_step``'s
profiler range and hooks, and ``@torch.no_grad()``), step in turn, round after round. Also
timed in the same rounds: the cached plan's kernel calls alone, so "over the kernel" is
everything else a step does. Between timings a 256 MiB buffer is rewritten, as a real
step (and the backward before it) pushes the interpreter's and the tensors' objects out of
the caches. Configurations: 1 and 64 tensors of tiny size (the step's fixed cost), and
``--params`` in 64 tensors (the cost against a step's own streaming). The step cache's
checks run in C++ (native_checks.py), as in ``adamkit bench``, unless ``--python-checks``.
Reports medians (us) and the median of the paired ratios. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.optim import Optimizer

import adamkit
from adamkit.backends.cpu import native_checks
from adamkit.step_cache import scalars_for


class TorchWrapped(adamkit.Adam):
    """adamkit.Adam with torch.optim's wrapper of ``step`` and its no_grad decorator (around
    adamkit's step, whose own wrapper then takes its fast path: a few us it adds here)."""

    profile_hook_step = staticmethod(Optimizer.profile_hook_step)

    @torch.no_grad()
    def step(self, closure=None):
        return super().step(closure)


def _optimizer(cls: type, n_tensors: int, numel: int, dtype: torch.dtype, kwargs: dict) -> adamkit.Adam:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel, generator=g).to(dtype)) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    opt = cls(params, lr=1e-3, backend="cpu", **kwargs)
    opt.step()
    opt.step()  # the plan every later step reuses
    return opt


def _kernel_calls(opt: adamkit.Adam):
    def run() -> None:
        for cb in opt._step_cache.buckets:
            cb.prepared.run(scalars_for(cb.group, cb.t + 1, 1.0, cb.dtype))
            cb.t += 1
    return run


def measure(rounds: int, n_tensors: int, numel: int, dtype: torch.dtype, kwargs: dict) -> dict:
    ours = _optimizer(adamkit.Adam, n_tensors, numel, dtype, kwargs)
    theirs = _optimizer(TorchWrapped, n_tensors, numel, dtype, kwargs)
    timed = {"adamkit wrapper": ours.step, "torch.optim wrapper": theirs.step,
             "kernel alone": _kernel_calls(ours)}
    flush = torch.empty(1 << 26)
    times = {name: [] for name in timed}
    for r in range(rounds):
        names = list(timed)
        names = names[r % len(names):] + names[:r % len(names)]  # rotating order
        for name in names:
            flush.add_(1.0)
            t0 = time.perf_counter()
            timed[name]()
            times[name].append(time.perf_counter() - t0)
    assert ours._step_cache is not None and theirs._step_cache is not None  # both cached
    ratios = [a / b for a, b in zip(times["adamkit wrapper"], times["torch.optim wrapper"])]
    return {"us": {k: 1e6 * statistics.median(v) for k, v in times.items()},
            "paired ratio adamkit/torch.optim wrapper": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--params", type=int, default=1 << 24)
    parser.add_argument("--python-checks", action="store_true",
                        help="the step cache's checks in Python (ADAMKIT_NATIVE_CHECKS=0)")
    args = parser.parse_args()
    if args.python_checks:  # (a build in the cache would otherwise serve these plans too)
        os.environ["ADAMKIT_NATIVE_CHECKS"] = "0"
    else:
        native_checks.load_now()
    configs = [("1 tensor of 256, fp32", 1, 256, torch.float32, {}),
               ("64 tensors of 256, fp32", 64, 256, torch.float32, {}),
               (f"{args.params / 1e6:.1f}M in 64 tensors, fp32", 64, args.params // 64, torch.float32, {}),
               (f"{args.params / 1e6:.1f}M in 64 tensors, fp32 int8", 64, args.params // 64, torch.float32,
                {"state_format": "int8"})]
    print(f"{torch.get_num_threads()} threads, {args.rounds} rounds, step-cache checks "
          f"{'in Python' if args.python_checks else 'in C++'}; medians in us\n")
    print("| config | adamkit wrapper | torch.optim wrapper | kernel alone | adamkit over the kernel "
          "| torch.optim's over the kernel | paired ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, n, numel, dtype, kwargs in configs:
        r = measure(args.rounds, n, numel, dtype, kwargs)
        us = r["us"]
        k = us["kernel alone"]
        print(f"| {name} | {us['adamkit wrapper']:.0f} | {us['torch.optim wrapper']:.0f} | {k:.0f} | "
              f"{us['adamkit wrapper'] - k:.0f} | {us['torch.optim wrapper'] - k:.0f} | "
              f"{r['paired ratio adamkit/torch.optim wrapper']:.3f} |")


if __name__ == "__main__":
    main()
