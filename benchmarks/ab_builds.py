"""Interleaved A/B of CPU kernel builds: is a kernel change faster, on this machine?

    python benchmarks/ab_builds.py avx512 avx512bf16                # installed builds
    python benchmarks/ab_builds.py /tmp/old/_adam_avx2.so avx2 --storage "bf16 nearest"
    python benchmarks/ab_builds.py avx2 avx512 --tensors 1024 --rounds 31

Each build is an installed instruction-set variant (`avx2`, `avx512`, ...) or the path of
a shared library compiled from the kernel sources (for a change under test: build it with
`library.FLAGS` and the ISA's `library.ISA_FLAGS`). For each storage, one optimizer per
build steps the same params (16.8M in 64 or 1024 tensors); the builds take turns, round
after round, so the machine's drift between minutes reaches them alike. Reported: each
build's median ms per step, and the median over rounds of each build's time divided by
the first build's in the same round (paired ratios, steadier than a ratio of medians on
a machine whose speed moves between minutes). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

import adamkit
from adamkit.backends import cpu
from adamkit.backends.cpu import library

N_PARAMS = 64 * 262_144
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
STORAGES = {
    "fp32": (F32, {}),
    "fp32 bf16-state": (F32, dict(state_format="bf16")),
    "fp32 int8": (F32, dict(state_format="int8")),
    "fp32 int8 amsgrad": (F32, dict(state_format="int8", amsgrad=True)),
    "bf16 nearest": (BF16, dict(param_update="nearest", state_format="bf16")),
    "bf16 kahan": (BF16, dict(param_update="kahan", state_format="bf16")),
    "bf16 stochastic": (BF16, dict(param_update="stochastic", state_format="bf16")),
    "bf16 master": (BF16, dict(param_update="master", state_format="bf16")),
    "bf16 nearest int8": (BF16, dict(param_update="nearest", state_format="int8")),
    "bf16 kahan int8": (BF16, dict(param_update="kahan", state_format="int8")),
    "bf16 kahan int8 amsgrad": (BF16, dict(param_update="kahan", state_format="int8", amsgrad=True)),
    "bf16 stochastic int8": (BF16, dict(param_update="stochastic", state_format="int8")),
    "bf16 master int8": (BF16, dict(param_update="master", state_format="int8")),
    "fp16 nearest": (F16, dict(param_update="nearest")),
    "fp16 kahan": (F16, dict(param_update="kahan")),
    "fp16 bf16-state": (F16, dict(param_update="nearest", state_format="bf16")),
}


def open_build(name: str):
    """(library, label) of an installed ISA build or of a shared library's path."""
    if name in library.ISA_FLAGS:
        path = library._installed_path(name)
        if path is None or not path.exists():
            raise SystemExit(f"no installed {name} build")
    else:
        path = Path(name)
        if not path.exists():
            raise SystemExit(f"{name}: neither an ISA ({', '.join(library.ISA_FLAGS)}) nor a file")
    return library._open(path), name


def optimizer_on(lib, label: str, params, options: dict) -> adamkit.Adam:
    """An optimizer whose cached plan calls `lib`: planned (first step) while the cpu
    backend hands out that library, and reused afterwards (the plan keeps it)."""
    original = cpu._library
    cpu._library = functools.lru_cache(maxsize=1)(lambda: (lib, label, None))
    try:
        opt = adamkit.Adam(params, lr=1e-3, backend="cpu", **options)
        opt.step()
    finally:
        cpu._library = original
    return opt


def compare(builds: list, storage: str, n_tensors: int, rounds: int, steps: int) -> dict:
    dtype, options = STORAGES[storage]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(N_PARAMS // n_tensors, generator=gen).to(dtype) for _ in range(n_tensors)]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype)
    opts = [optimizer_on(lib, label, params, options) for lib, label in builds]
    times: list[list[float]] = [[] for _ in builds]
    for _ in range(rounds):
        for opt, row in zip(opts, times):
            opt.step()  # warm: this build's state and code back in cache
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            row.append((time.perf_counter() - t0) / steps * 1e3)
    return {
        "ms": [statistics.median(row) for row in times],
        "paired": [statistics.median(b / a for a, b in zip(times[0], row)) for row in times[1:]],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+", help="installed ISA names or shared-library paths; the first is the baseline")
    ap.add_argument("--storage", action="append", choices=list(STORAGES), help="default: all")
    ap.add_argument("--tensors", type=int, default=64, choices=[64, 1024])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    args = ap.parse_args(argv)
    if len(args.builds) < 2:
        ap.error("give at least two builds")
    builds = [open_build(b) for b in args.builds]
    print(f"{N_PARAMS / 1e6:.1f}M params in {args.tensors} tensors, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.steps} steps; ms per step (median), paired ratio to "
          f"{args.builds[0]}\n")
    print("| storage | " + " | ".join(args.builds) + " | " + " | ".join(f"{b} / first" for b in args.builds[1:]) + " |")
    print("|---" * (2 * len(args.builds)) + "|")
    for storage in args.storage or list(STORAGES):
        r = compare(builds, storage, args.tensors, args.rounds, args.steps)
        print(f"| {storage} | " + " | ".join(f"{m:.2f}" for m in r["ms"]) + " | "
              + " | ".join(f"{x:.3f}" for x in r["paired"]) + " |", flush=True)


if __name__ == "__main__":
    main()
