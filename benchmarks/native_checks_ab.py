"""The step cache's checks in C++ against the same checks in Python: interleaved A/B.

    python benchmarks/native_checks_ab.py [--tensors 1024] [--rounds 21]

Two optimizers over two copies of the same params (16.8M, split evenly), identical but
for the step cache's checks (native_checks.py: C++, or Python), step in turn, round after
round; between steps a 256 MiB buffer is rewritten, as a real step (and the backward
before it) pushes the tensors' objects out of the caches. Also timed in the same rounds:
each optimizer's kernel calls alone, so "over the kernel" is the per-step cost of
everything else. Reports medians and the median of the paired ratios. Run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import adamkit
from adamkit.backends.cpu import native_checks
from adamkit.step_cache import scalars_for

N = 1 << 24


def _optimizer(n_tensors: int, dtype: torch.dtype, native: bool) -> adamkit.Adam:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(N // n_tensors, generator=g).to(dtype) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    opt = adamkit.Adam(params, lr=1e-3, backend="cpu", param_update="nearest")
    opt.step()
    opt.step()
    cache = opt._step_cache
    if not native:
        cache.native, cache.native_fits = None, False
    opt.step()
    assert (cache.native is not None) == native and opt._step_cache is cache
    return opt


def kernel_calls(opt: adamkit.Adam) -> None:
    """One step of the cached plan's kernel calls alone (no checks), its counters kept in sync."""
    for cb in opt._step_cache.buckets:
        cb.prepared.run(scalars_for(cb.group, cb.t + 1, 1.0, cb.dtype))
        cb.t += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    native_checks.load_now()
    flush = torch.empty(1 << 26)
    for dtype in (torch.float32, torch.bfloat16):
        opts = {"C++": _optimizer(args.tensors, dtype, True), "Python": _optimizer(args.tensors, dtype, False)}
        times = {f"{name} {what}": [] for name in opts for what in ("step", "kernel")}
        for _ in range(args.rounds):
            for name, opt in opts.items():
                for what, run in (("step", opt.step), ("kernel", lambda: kernel_calls(opt))):
                    flush.add_(1.0)
                    t0 = time.perf_counter()
                    run()
                    times[f"{name} {what}"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        over = {name: statistics.median(s - k for s, k in zip(times[f"{name} step"], times[f"{name} kernel"])) * 1e3
                for name in opts}
        ratio = statistics.median(a / b for a, b in zip(times["C++ step"], times["Python step"]))
        print(f"{args.tensors} tensors, {str(dtype).split('.')[1]}: step {med['C++ step']:.2f} ms (C++ checks) vs "
              f"{med['Python step']:.2f} ms (Python checks), paired ratio {ratio:.3f}; over the kernel "
              f"{over['C++']:.2f} vs {over['Python']:.2f} ms; kernel {med['C++ kernel']:.2f} / {med['Python kernel']:.2f} ms")


if __name__ == "__main__":
    main()
