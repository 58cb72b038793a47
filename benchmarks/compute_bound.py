"""Is a step memory-bound or compute-bound here? Compute throughput without DRAM traffic.

    python benchmarks/compute_bound.py      # ~1 min; run on a quiet machine

Each optimizer steps one tensor small enough to stay in the core's L2 cache, on one
thread, so its time is arithmetic, not memory traffic: ns per element per core. Python
overhead per step is measured on a 16-element tensor and subtracted. Against it stands
the memory floor of the same storage at the bandwidth measured in this run (all cores),
and what the cores could at best deliver: elements / (cores · compute time).

A C++ loop of just the update's divisions, m / (√v / √bc2 + ε) — one square root and two
correctly rounded divisions per element, the arithmetic torch's fused Adam and adamkit
(formats.md) both perform — gives the floor that no implementation of that arithmetic can
beat on this CPU, whatever it does with memory. Needs g++ for that part.

Writes benchmarks/results/compute_bound.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import adamkit
from adamkit.bench import measure
from adamkit.bench.report import machine

N = 1 << 15  # elements: bf16 streams (8 B/elem, 256 KiB) stay in a 512 KiB L2; fp32 (16 B) overflow it
# into L3, so fp32 rows here are an upper bound on its compute. Fewer elements would fit, but
# then the Python overhead subtracted below drowns the kernel (negative results).
CONFIGS = {
    # name: (make optimizer, param dtype, bytes per param a perfect step moves)
    "torch fused fp32": (lambda ps: torch.optim.Adam(ps, fused=True), torch.float32, 28),
    "adamkit cpu fp32": (lambda ps: adamkit.Adam(ps), torch.float32, 28),
    "torch fused bf16": (lambda ps: torch.optim.Adam(ps, fused=True), torch.bfloat16, 14),
    "adamkit cpu bf16 nearest": (lambda ps: adamkit.Adam(ps, param_update="nearest"),
                                 torch.bfloat16, 14),
    "adamkit cpu bf16 kahan": (lambda ps: adamkit.Adam(ps, param_update="kahan"),
                               torch.bfloat16, 18),
    "adamkit cpu bf16 stochastic": (lambda ps: adamkit.Adam(ps, param_update="stochastic"),
                                    torch.bfloat16, 14),
    "adamkit cpu fp32 int8": (lambda ps: adamkit.Adam(ps, state_format="int8", int8_min_size=16),
                              torch.float32, 16.06),
}

DIVIDER_LOOP = r"""
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>
int main() {
    const int n = 4096, reps = 100000;
    std::vector<float> m(n), v(n), out(n);
    for (int i = 0; i < n; ++i) { m[i] = 1e-3f * (i % 7); v[i] = 1e-6f * (1 + i % 11); }
    volatile float b = 0.97f, eps = 1e-8f;
    const float bc = b, e = eps;
    double best = 1e30;
    for (int k = 0; k < 5; ++k) {
        auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps / 5; ++r) {
#pragma omp simd
            for (int i = 0; i < n; ++i) out[i] = m[i] / (std::sqrt(v[i]) / bc + e);
            __asm__ volatile("" : : "r"(out.data()) : "memory");
        }
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::min(best, s / (double(reps / 5) * n));
    }
    std::printf("%.6f\n", best * 1e9);
}
"""


def per_element_ns(make, dtype, numel: int, steps: int = 200) -> float:
    """Median over 5 rounds of one step's time per element (ns), on one thread."""
    p = torch.nn.Parameter(torch.randn(numel).to(dtype))
    p.grad = (torch.randn(numel) * 1e-2).to(dtype)
    opt = make([p])
    for _ in range(5):
        opt.step()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        rounds.append((time.perf_counter() - start) / steps)
    return sorted(rounds)[2] / numel * 1e9


def divider_floor_ns() -> float | None:
    """ns per element of m / (√v / b + ε) alone, vectorized, on one core (g++ needed)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "div.cpp", Path(tmp) / "div"
        src.write_text(DIVIDER_LOOP)
        flags = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno",
                 "-fno-trapping-math", "-ffp-contract=off"]
        try:
            subprocess.run(["g++", *flags, str(src), "-o", str(exe)], check=True,
                           capture_output=True)
            return float(subprocess.run([str(exe)], check=True, capture_output=True,
                                        text=True).stdout)
        except (OSError, subprocess.CalledProcessError):
            return None


def main() -> None:
    cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    probe = measure.BandwidthProbe(256 << 20)  # DRAM-sized, all threads
    for _ in range(10):
        probe.step()
    # GB/s: the best sample, as the recorded runs took it (a floor below the steps'
    # median-based one: it leans the verdict toward "compute"), and the median beside it
    bw = max(probe.peak_rates().values()) / 1e9
    bw_median = max(probe.rates().values()) / 1e9
    torch.set_num_threads(1)
    rows = []
    for name, (make, dtype, nbytes) in CONFIGS.items():
        overhead = per_element_ns(make, dtype, 16) * 16 / N
        compute = per_element_ns(make, dtype, N) - overhead
        floor = nbytes / bw  # ns per element at the measured bandwidth (GB/s = bytes/ns)
        rows.append(dict(optimizer=name, bytes_per_param=nbytes, compute_ns_per_core=compute,
                         compute_ns_all_cores=compute / threads, memory_floor_ns=floor,
                         memory_floor_median_ns=nbytes / bw_median))
    torch.set_num_threads(threads)
    divider = divider_floor_ns()
    cpu = machine()["cpu"]
    print(f"{cpu}, {cores} cores, {threads} threads; "
          f"bandwidth {bw:.1f} GB/s (best sample; median {bw_median:.1f})")
    if divider is not None:
        print(f"√ and two divisions alone: {divider:.3f} ns/element/core "
              f"= {divider / threads:.3f} ns/element on {threads} threads")
    print(f"\n| optimizer | B/param | compute ns/elem (1 core) | compute ns/elem ({threads} cores) "
          "| memory floor ns/elem (best / median) | bound by (best / median) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        bound = ["compute" if r["compute_ns_all_cores"] > r[k] else "memory"
                 for k in ("memory_floor_ns", "memory_floor_median_ns")]
        print(f"| {r['optimizer']} | {r['bytes_per_param']:.2f} | {r['compute_ns_per_core']:.3f} "
              f"| {r['compute_ns_all_cores']:.3f} | {r['memory_floor_ns']:.3f} / "
              f"{r['memory_floor_median_ns']:.3f} | {' / '.join(bound)} |")
    out = Path(__file__).parent / "results" / "compute_bound.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(dict(machine=cpu, bandwidth_gbs=bw, bandwidth_median_gbs=bw_median,
                                   threads=threads, cores=cores,
                                   divider_ns_per_core=divider, rows=rows), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
