"""Can the divider's work hide other vector work on this CPU? The floor of a compute-bound step.

    python benchmarks/divider_overlap.py      # seconds; needs g++ and AVX2; run on a quiet machine

The update's √ and two correctly rounded divisions (m / (√v / √bc2 + ε), the arithmetic
torch.optim performs and formats.md pins) run on the divider, a unit of their own, so in
principle the rest of a step (loads, moments, bf16 rounding, stores) could run beside them
and a compute-bound step would take max(divider, rest), not their sum. This measures how
much of that overlap the core delivers: one loop over L1-resident streams computes the
direction of 16 elements with the kernel's own `direction` and rounds k other float32
streams of 16 to bf16 with the kernel's own rounding and store (common.h, simd.h), which
depend on nothing the divider computes. Timed alone and together, k = 1..6, on one core,
ns per element: "saved" is what running them together saved against their sum, also as a
share of the shorter of the two (100%: the shorter one ran entirely inside the other).

Writes benchmarks/results/divider_overlap.json.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from adamkit.backends.cpu.build_flags import COMPILE_FLAGS
from adamkit.bench.report import machine

KERNEL = Path(__file__).resolve().parent.parent / "src" / "adamkit" / "backends" / "cpu"
FLAGS = [*COMPILE_FLAGS, "-march=native"]  # the kernel's own flags, for this CPU
MAX_STREAMS = 6
ROUNDS = 3  # runs of the program, interleaved by construction; best per entry

DRIVER = r"""
#include "simd.h"
#include <chrono>
#include <cstdio>
constexpr int N = 512, K = %(max)d;  // floats per stream: every stream together stays in L1
alignas(64) float M[N], V[N], O[N], X[K][N];
alignas(64) bf16 R[K][N];
// One pass: the direction of each group of 16 (DIV) beside the bf16 rounding of NR streams.
template <bool DIV, int NR> __attribute__((noinline)) void pass(const Consts& c) {
    for (int i = 0; i < N; i += 16) {
        if (DIV)
            for (int h = 0; h < 16; h += 8)
                _mm256_store_ps(O + i + h, direction(c, _mm256_load_ps(M + i + h), _mm256_load_ps(V + i + h)));
        for (int k = 0; k < NR; ++k)
            store16(Unpacked{}, R[k] + i, bf16_bits_not_nan(f8(_mm256_load_ps(X[k] + i))),
                    bf16_bits_not_nan(f8(_mm256_load_ps(X[k] + i + 8))));
    }
}
template <bool DIV, int NR> double ns(const Consts& c) {  // best of 7 rounds
    double best = 1e30;
    for (int r = 0; r < 7; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int k = 0; k < 8000; ++k) { pass<DIV, NR>(c); __asm__ volatile("" ::: "memory"); }
        const double t = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
        best = std::min(best, t / (8000.0 * N));
    }
    return best;
}
template <int NR> void row(const Consts& c) {
    std::printf(", [%%.4f, %%.4f]", ns<false, NR>(c), ns<true, NR>(c));
    if constexpr (NR < K) row<NR + 1>(c);
}
int main() {
    for (int i = 0; i < N; ++i) {
        M[i] = 1e-3f * (i %% 17 - 8); V[i] = 1e-6f * (1 + i %% 13);
        for (int k = 0; k < K; ++k) X[k][i] = (k + 1) * 0.37f * (i - 256);
    }
    const Hyper h{0.9f, 0.999f, 0.1f, 0.001f, 1e-8f, 0.f, 1.f, 1e-3f, 0.0447f, 1.f, 0, 0};
    const Consts c(h);
    std::printf("{\"divider\": %%.4f, \"rounding_and_both\": [null", ns<true, 0>(c));
    row<1>(c);
    std::printf("]}\n");
}
"""


def measure(rounds: int = ROUNDS) -> dict | None:
    """The driver's best-of-`rounds` times, or None where it cannot be built (no g++ or AVX2)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "overlap.cpp", Path(tmp) / "overlap"
        src.write_text(DRIVER % {"max": MAX_STREAMS})
        try:
            subprocess.run(["g++", *FLAGS, f"-I{KERNEL}", str(src), "-o", str(exe)], check=True,
                           capture_output=True)
            runs = [json.loads(subprocess.run([str(exe)], check=True, capture_output=True,
                                              text=True).stdout) for _ in range(rounds)]
        except (OSError, subprocess.CalledProcessError):
            return None
    divider = min(r["divider"] for r in runs)
    rows = []
    for k in range(1, MAX_STREAMS + 1):
        alone = min(r["rounding_and_both"][k][0] for r in runs)
        both = min(r["rounding_and_both"][k][1] for r in runs)
        rows.append(dict(streams_rounded=k, other_ns=alone, both_ns=both,
                         saved_ns=round(alone + divider - both, 4)))
    return dict(divider_ns=divider, rows=rows)


def main() -> None:
    result = measure()
    if result is None:
        print("needs g++ and an AVX2 CPU (the kernel's 16-lane code)")
        return
    cpu = machine()["cpu"]
    print(f"{cpu}: ns per element, one core, data in L1 (best of {ROUNDS} runs of 7 rounds)")
    print(f"√ and two divisions alone: {result['divider_ns']:.3f}\n")
    print("| bf16 roundings per element | that work alone | with √ and two divisions "
          "| sum | max | saved (of the shorter) |")
    print("|---|---|---|---|---|---|")
    d = result["divider_ns"]
    for r in result["rows"]:
        print(f"| {r['streams_rounded']} | {r['other_ns']:.3f} | {r['both_ns']:.3f} "
              f"| {r['other_ns'] + d:.3f} | {max(r['other_ns'], d):.3f} "
              f"| {r['saved_ns']:.3f} ({r['saved_ns'] / min(r['other_ns'], d):.0%}) |")
    out = Path(__file__).parent / "results" / "divider_overlap.json"
    out.write_text(json.dumps(dict(machine=cpu, rounds=ROUNDS, **result), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
