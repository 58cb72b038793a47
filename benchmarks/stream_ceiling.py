"""What the memory system gives an Adam step's own streams, next to what adamkit gets.

    python benchmarks/stream_ceiling.py [rounds]   # ~1 min, needs g++; run on a quiet machine

`adamkit bench` holds every step against the bandwidth of STREAM-like patterns run with
torch's own kernels (the issue's definition: one stream read and written in place,
triad, ...). That is a yardstick, not the ceiling of a step: an Adam step reads four or
five streams and writes three or four, and the memory system may serve that mix faster
or slower than the probe's. This script measures that ceiling. A small native kernel
(compiled here with g++) reads and writes exactly the streams of one storage, chunk by
chunk over the same OpenMP threads and with the same software prefetch distance as
adamkit's kernel, but with two vector operations per 32 bytes instead of the math. It is
timed interleaved, in rotating order, with

* adamkit's kernel call alone (the cached plan's ``run``: no per-step Python checks),
* adamkit's whole ``step()`` (the cached plan's checks included),
* the benchmark's bandwidth probe over the same footprint (its best pattern's median,
  as `adamkit bench` reports it),

on 16.8M params in 64 tensors, for each storage below. Medians over the rounds; prints a
table and writes benchmarks/results/stream_ceiling.json.
"""

from __future__ import annotations

import ctypes
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import adamkit
from adamkit.bench.measure import BandwidthProbe
from adamkit.step_cache import scalars_for

N_TENSORS, PER_TENSOR = 64, 1 << 18
CHUNK = 16384  # elements per chunk, as adam.h
PREFETCH_AHEAD = 256  # elements, as simd.h


@dataclass(frozen=True)
class Storage:
    name: str
    pattern: int  # the native kernel's template instantiation (SOURCE)
    grad_bytes: int  # per element: read only
    rw_bytes: tuple[int, ...]  # per element, each read and written: param, moments, buffers
    dtype: torch.dtype
    options: dict

    @property
    def bytes_per_param(self) -> int:
        return self.grad_bytes + 2 * sum(self.rw_bytes)


STORAGES = [
    Storage("fp32", 0, 4, (4, 4, 4), torch.float32, {}),
    Storage("bf16 nearest", 1, 2, (2, 2, 2), torch.bfloat16, {"param_update": "nearest"}),
    Storage("bf16 kahan", 2, 2, (2, 2, 2, 2), torch.bfloat16, {"param_update": "kahan"}),
    Storage("fp32 int8", 3, 4, (4, 1, 1), torch.float32, {"state_format": "int8"}),
]

# One instantiation per storage, so every loop has a compile-time trip count and GCC
# vectorizes it: per 32 elements, the grad's vectors are XORed into one (every byte of it
# loaded) and that vector is added to each written stream's vectors (every byte loaded and
# stored). Streams are interleaved in 32-element steps, as a step reads them.
SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <omp.h>
typedef uint64_t v4 __attribute__((vector_size(32)));

template <int ZG, int Z0, int Z1, int Z2, int Z3>
static void run(uint8_t* const* rw, uint8_t* const* grads, int64_t n_tensors, int64_t numel,
                int64_t chunk, int64_t ahead, int n_threads) {
    constexpr int Z[4] = {Z0, Z1, Z2, Z3};
    const int64_t per = numel / chunk, total = n_tensors * per;
#pragma omp parallel num_threads(n_threads)
    {
        const int me = omp_get_thread_num(), nth = omp_get_num_threads();
        for (int64_t k = total * me / nth; k < total * (me + 1) / nth; ++k) {
            const int64_t t = k / per, lo = (k % per) * chunk;
            for (int64_t i = lo; i < lo + chunk; i += 32) {
                const uint8_t* g = grads[t] + i * ZG;
                for (int b = 0; b < 32 * ZG; b += 64) __builtin_prefetch(g + ahead * ZG + b);
                v4 acc = {0, 0, 0, 0};
                for (int j = 0; j < ZG; ++j) {
                    v4 x;
                    memcpy(&x, g + 32 * j, 32);
                    acc ^= x;
                }
                for (int s = 0; s < 4; ++s) {
                    if (Z[s] == 0) continue;
                    uint8_t* base = rw[s * n_tensors + t] + i * Z[s];
                    for (int b = 0; b < 32 * Z[s]; b += 64) __builtin_prefetch(base + ahead * Z[s] + b);
                    for (int j = 0; j < Z[s]; ++j) {
                        v4 x;
                        memcpy(&x, base + 32 * j, 32);
                        x += acc;
                        memcpy(base + 32 * j, &x, 32);
                    }
                }
            }
        }
    }
}

extern "C" int streams(int pattern, uint8_t* const* rw, uint8_t* const* grads, int64_t n_tensors,
                       int64_t numel, int64_t chunk, int64_t ahead, int n_threads) {
    switch (pattern) {
        case 0: run<4, 4, 4, 4, 0>(rw, grads, n_tensors, numel, chunk, ahead, n_threads); return 0;
        case 1: run<2, 2, 2, 2, 0>(rw, grads, n_tensors, numel, chunk, ahead, n_threads); return 0;
        case 2: run<2, 2, 2, 2, 2>(rw, grads, n_tensors, numel, chunk, ahead, n_threads); return 0;
        case 3: run<4, 4, 1, 1, 0>(rw, grads, n_tensors, numel, chunk, ahead, n_threads); return 0;
    }
    return 1;
}
"""


def build(tmp: Path) -> ctypes.CDLL:
    src, lib = tmp / "streams.cpp", tmp / "streams.so"
    src.write_text(SOURCE)
    subprocess.run(["g++", "-std=c++17", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared",
                    str(src), "-o", str(lib)], check=True, capture_output=True)
    out = ctypes.CDLL(str(lib))
    out.streams.restype = ctypes.c_int
    return out


class Ceiling:
    """One storage's streams as uint8 tensors, and the native kernel over them."""

    def __init__(self, lib: ctypes.CDLL, storage: Storage, n_tensors: int, numel: int) -> None:
        if numel <= 0 or numel % CHUNK:  # the kernel walks whole chunks only
            raise ValueError(f"numel must be a positive multiple of {CHUNK}, not {numel}")
        def tensors(z: int) -> list[torch.Tensor]:
            return [torch.randint(0, 256, (numel * z,), dtype=torch.uint8) for _ in range(n_tensors)]

        self.rw = [tensors(z) for z in storage.rw_bytes]
        self.grads = tensors(storage.grad_bytes)
        rw_ptrs = [t.data_ptr() for stream in self.rw for t in stream]
        self._rw = (ctypes.c_void_p * len(rw_ptrs))(*rw_ptrs)
        self._g = (ctypes.c_void_p * n_tensors)(*[t.data_ptr() for t in self.grads])
        self.lib, self.pattern, self.n_tensors, self.numel = lib, storage.pattern, n_tensors, numel

    def step(self) -> None:
        status = self.lib.streams(self.pattern, self._rw, self._g, ctypes.c_int64(self.n_tensors),
                                  ctypes.c_int64(self.numel), ctypes.c_int64(CHUNK),
                                  ctypes.c_int64(PREFETCH_AHEAD), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"no stream pattern {self.pattern}")


def adamkit_optimizer(storage: Storage, n_tensors: int, numel: int) -> adamkit.Adam:
    params = [torch.nn.Parameter(torch.randn(numel).to(storage.dtype)) for _ in range(n_tensors)]
    for p in params:
        p.grad = (torch.randn(numel) * 1e-2).to(storage.dtype)
    opt = adamkit.Adam(params, lr=1e-3, backend="cpu", **storage.options)
    opt.step()
    opt.step()  # the second step leaves the cached plan that every later step reuses
    return opt


def kernel_call(opt: adamkit.Adam):
    """The cached plan's kernel calls alone, as ``step()`` makes them after its checks."""
    cache = opt._step_cache

    def run() -> None:
        for cb in cache.buckets:
            cb.prepared.run(scalars_for(cb.group, cb.t + 1, 1.0, cb.dtype))
            cb.t += 1  # the kernel counted the step: keep the plan's own count in line

    return run


def measure(rounds: int, n_tensors: int = N_TENSORS, numel: int = PER_TENSOR) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        for storage in STORAGES:
            nbytes = storage.bytes_per_param * n_tensors * numel
            ceiling = Ceiling(lib, storage, n_tensors, numel)
            opt = adamkit_optimizer(storage, n_tensors, numel)
            probe = BandwidthProbe((storage.grad_bytes + sum(storage.rw_bytes)) * n_tensors * numel)
            timed = {"ceiling": ceiling.step, "adamkit kernel": kernel_call(opt),
                     "adamkit step": opt.step}
            times = {name: [] for name in timed}
            for r in range(rounds):  # rotating order: drift hits every item alike
                names = list(timed)
                names = names[r % len(names):] + names[:r % len(names)]
                for name in names:
                    t0 = time.perf_counter()
                    timed[name]()
                    times[name].append(time.perf_counter() - t0)
                probe.step()
            rate = {name: nbytes / statistics.median(ts) for name, ts in times.items()}
            probe_rates = probe.rates()
            best = max(probe_rates, key=probe_rates.get)
            results[storage.name] = dict(
                bytes_per_param=storage.bytes_per_param,
                ms={name: 1e3 * statistics.median(ts) for name, ts in times.items()},
                GBps={name: r / 1e9 for name, r in rate.items()},
                probe_GBps=probe_rates[best] / 1e9, probe_pattern=best,
            )
            del ceiling, opt, probe
    return results


def main(rounds: int = 15) -> None:
    results = measure(rounds)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{N_TENSORS} tensors of {PER_TENSOR} params, median of {rounds} interleaved rounds\n")
    print("| storage | B/param | ceiling GB/s | probe GB/s | ceiling / probe | adamkit kernel GB/s "
          "(% of ceiling) | adamkit step GB/s (% of ceiling) | step % of probe |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ceil, probe = r["GBps"]["ceiling"], r["probe_GBps"]
        kern, step = r["GBps"]["adamkit kernel"], r["GBps"]["adamkit step"]
        print(f"| {name} | {r['bytes_per_param']} | {ceil:.1f} | {probe:.1f} ({r['probe_pattern']}) | "
              f"{ceil / probe:.0%} | {kern:.1f} ({kern / ceil:.0%}) | {step:.1f} ({step / ceil:.0%}) | "
              f"{step / probe:.0%} |")
    out = Path(__file__).parent / "results" / "stream_ceiling.json"
    out.write_text(json.dumps(dict(machine=platform.processor() or platform.machine(),
                                   threads=torch.get_num_threads(), rounds=rounds,
                                   n_tensors=N_TENSORS, per_tensor=PER_TENSOR, results=results),
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
