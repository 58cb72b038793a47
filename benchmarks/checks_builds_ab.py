"""Two builds of the step cache's C++ checks (checks.cpp), A against B: interleaved A/B.

    python benchmarks/checks_builds_ab.py A.so B.so [--tensors 1024] [--rounds 31]

A and B are checks libraries of the version native_checks.py expects (build one from
another checks.cpp with the compiler line ``native_checks._build`` runs). For each
storage (fp32; fp32 with int8 state; bf16 kahan with int8 state; bf16), 16.8M params
split evenly into ``--tensors`` tensors:

- the state check alone (``adamkit_state_ptrs_equal`` over the plan's buckets), each
  build in turn on the same optimizer;
- whole steps of two identical optimizers, one checked by A and one by B, in turn; then
  the builds swap optimizers, since two optimizers' steps differ by a few percent on
  their own (memory placement), and the geometric mean of the two orders' paired ratios
  cancels that.

Before each timed call a 256 MiB buffer is rewritten, as a real step (and the backward
before it) pushes the tensors' objects out of the caches. Reports medians and median
paired ratios B/A. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import adamkit
from adamkit.backends.cpu import native_checks

N = 1 << 24
STORAGES = [("fp32", torch.float32, {}), ("fp32 int8", torch.float32, {"state_format": "int8"}),
            ("bf16 kahan int8", torch.bfloat16, {"state_format": "int8", "param_update": "kahan"}),
            ("bf16", torch.bfloat16, {"param_update": "nearest"})]


def _optimizer(n_tensors: int, dtype: torch.dtype, kw: dict) -> adamkit.Adam:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(N // n_tensors, generator=g).to(dtype) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    opt = adamkit.Adam(params, lr=1e-3, backend="cpu", **kw)
    for _ in range(3):
        opt.step()
    assert opt._step_cache.native is not None, "the C++ checks did not take the plan"
    return opt


def _paired(a: list[float], b: list[float]) -> float:
    return statistics.median(y / x for x, y in zip(a, b))


def state_check(libs, opt, flush, rounds: int) -> str:
    cache = opt._step_cache
    calls = [(cb.bucket.states, *rows) for cb, rows in zip(cache.buckets, cache.native.key_rows)]
    n_threads = torch.get_num_threads()
    times = {"A": [], "B": []}
    for r in range(rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            flush.add_(1.0)
            t0 = time.perf_counter()
            ok = all(libs[name].adamkit_state_ptrs_equal(s, k, p.buffer_info()[0], n_threads, tags, ids.buffer_info()[0])
                     for s, k, p, tags, ids in calls)
            times[name].append(time.perf_counter() - t0)
            assert ok
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    return f"state check A {med['A']:.0f} us, B {med['B']:.0f} us, paired B/A {_paired(times['A'], times['B']):.3f}"


def steps(libs, opts, flush, rounds: int) -> str:
    ratios, meds = [], []
    for order in (("A", "B"), ("B", "A")):  # which optimizer each build checks
        checked = dict(zip(order, opts))
        for name, opt in checked.items():
            opt._step_cache.native.checks = libs[name]
        times = {"A": [], "B": []}
        for r in range(rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                opt = checked[name]
                cache = opt._step_cache
                flush.add_(1.0)
                t0 = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t0)
                assert opt._step_cache is cache, "the plan was dropped"
        ratios.append(_paired(times["A"], times["B"]))
        meds.append(f"{statistics.median(times['A']) * 1e3:.2f}/{statistics.median(times['B']) * 1e3:.2f}")
    geo = (ratios[0] * ratios[1]) ** 0.5
    return (f"steps A/B {meds[0]} and {meds[1]} ms, paired B/A {ratios[0]:.3f} and {ratios[1]:.3f}, "
            f"geometric mean {geo:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--tensors", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    native_checks.load_now()  # the plans take the C++ checks; the builds under test replace them
    libs = {"A": native_checks._open(args.a), "B": native_checks._open(args.b)}
    flush = torch.empty(1 << 26)
    for label, dtype, kw in STORAGES:
        opts = (_optimizer(args.tensors, dtype, kw), _optimizer(args.tensors, dtype, kw))
        print(f"{args.tensors} tensors, {label}: {state_check(libs, opts[0], flush, args.rounds)}; "
              f"{steps(libs, opts, flush, args.rounds)}", flush=True)


if __name__ == "__main__":
    main()
