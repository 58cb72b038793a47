"""Where the CPU kernel's time goes: the 16-lane kernels timed with one piece removed.

    python benchmarks/kernel_ablation.py      # ~2 min, needs g++; run on a quiet machine

Copies the kernel headers (src/adamkit/backends/cpu/*.h) to a temporary directory,
applies one textual edit per variant (drop √ and the divisions, round bf16 by
truncation, ...), compiles a small C++ driver against each copy with setup.py's flags
for this CPU, and times the 16-lane paths the kernel runs (simd.h; the bf16 steps and
the int8 blocks of float32 and bf16 params: simd512.h's where the CPU has AVX-512) on
data that stays in L1, on one core: ns per element. The variants compute wrong numbers on purpose; only their
speed is of interest: what a piece costs is how much faster the kernel runs without it.
Variants run interleaved, several rounds, best round reported; a variant whose edit
no longer matches the source is reported as such (update its edit).

Writes benchmarks/results/kernel_ablation.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from adamkit.bench.report import machine

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "src" / "adamkit" / "backends" / "cpu"
FLAGS = ["-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
         "-march=native"]

# name: [(header, text in it, replacement)]; an empty list is the kernel as built.
VARIANTS = {
    "as built": [],
    "no √, no divisions": [("common.h", "const F denom = sqrt_(v) / c.bc2_sqrt + c.eps;\n        return m / denom;",
                            "return m * (v + c.eps);")],
    "√ and one division (÷√bc2 as ×)": [("common.h", "sqrt_(v) / c.bc2_sqrt + c.eps", "sqrt_(v) * c.bc2_sqrt + c.eps")],
    "÷√bc2 exact by reciprocal + 2 FMA (Markstein)": [("common.h", "const F denom = sqrt_(v) / c.bc2_sqrt + c.eps;",
        "const F x = sqrt_(v), rb = F{} + 1.f / c.bc2_sqrt, b = F{} + c.bc2_sqrt;\n"
        "        const auto fnmadd = [](F a, F b, F c) { if constexpr (sizeof(F) == 64) return F(_mm512_fnmadd_ps(a, b, c)); else return F(_mm256_fnmadd_ps(a, b, c)); };\n"
        "        const auto fmadd = [](F a, F b, F c) { if constexpr (sizeof(F) == 64) return F(_mm512_fmadd_ps(a, b, c)); else return F(_mm256_fmadd_ps(a, b, c)); };\n"
        "        const F q = x * rb, e = fnmadd(q, b, x), q1 = fmadd(e, rb, q);\n"
        "        const F denom = (q1 != q1 ? q : q1) + c.eps;")],
    # Late steps: the instantiation without ÷√bc2 the kernel takes once √bc2 is 1 (BC2_ONE),
    # made the default that the driver's calls get.
    "late steps (BC2_ONE: no ÷√bc2, exact)": [
        ("simd.h", "template <class Pt, class St, int U, bool AMSGRAD, bool BC2_ONE = false>",
         "template <class Pt, class St, int U, bool AMSGRAD, bool BC2_ONE = true>"),
        ("simd.h", "template <class L, class P, int U, bool AMSGRAD, bool BC2_ONE = false>",
         "template <class L, class P, int U, bool AMSGRAD, bool BC2_ONE = true>"),
        ("simd512.h", "template <class Pt, class St, int U, bool AMSGRAD, bool BC2_ONE = false>",
         "template <class Pt, class St, int U, bool AMSGRAD, bool BC2_ONE = true>")],
    "bf16 rounding by truncation": [("simd.h", "{ return nan ? bf16_bits(x) : bf16_bits_not_nan(x); }",
                                    "{ return bits_of(x) >> 16; }"),
                                   ("simd512.h", "{ return nan ? bf16_bits(x) : bf16_bits_not_nan(x); }",
                                    "{ return bits_of(x) >> 16; }"),
                                   ("simd.h", "#define ADAMKIT_HW_BF16 1", "")],
    # Where the CPU has AVX512_BF16 (-march=native), the kernel rounds with it; this row
    # is the software rounding that other CPUs run.
    "bf16 rounding in software (no AVX512_BF16)": [("simd.h", "#define ADAMKIT_HW_BF16 1", "")],
    "NaN test in every group": [("simd.h", "{ return nan ? bf16_bits(x) : bf16_bits_not_nan(x); }",
                                 "{ return bf16_bits(x); }"),
                                ("simd512.h", "{ return nan ? bf16_bits(x) : bf16_bits_not_nan(x); }",
                                 "{ return bf16_bits(x); }")],
    # The encoder also gives the stored value (session 5); without it: the codes only.
    "int8: no encode (codes = top bits)": [
        ("simd.h", "mc[h] = encode_m_bits<R>(B.m[H * k + h], mcod, B.m[H * k + h]);",
         "mc[h] = bits_of(B.m[H * k + h]) >> 24;"),
        ("simd.h", "vc[h] = encode_v_bits<R>(B.v[H * k + h], vcod, B.v[H * k + h]);",
         "vc[h] = bits_of(B.v[H * k + h]) >> 24;")],
    # What the block's range (common.h's BlockRange) saves: every block encoded as one
    # holding a NaN (the cap and the subnormal path), or finite ones with the subnormal path.
    "int8: every block encoded as ANY": [
        ("simd.h", "if (!(mmax < INFINITY && vmax < INFINITY)) encode(", "if (true) encode(")],
    "int8: v codes decoded with the subnormal path in every block": [
        ("simd.h", "if (codes_at_least_8(vq + b0)) step(", "if (false) step(")],
    "int8: no NORMAL blocks": [
        ("simd.h", "else if (min_lanes(mlow) * mcod.inv", "else if (false && min_lanes(mlow) * mcod.inv")],
    "no software prefetch": [("simd.h", "    at(U == MASTER ? static_cast<const void*>(master + i) : p + i);\n"
                                        "    at(g + i);\n"
                                        "    if constexpr (U == KAHAN) at(comp + i);\n"
                                        "    at(m + i);\n"
                                        "    at(v + i);\n", "")],
}

DRIVER = r"""
#include "simd.h"
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>
template <class P> P from(float x) { return from_f32<P>(x); }
// ns per element of f() over n elements, best of `rounds`.
template <class F> double best_ns(F f, int64_t n, int reps, int rounds) {
    double best = 1e30;
    for (int k = 0; k < rounds; ++k) {
        auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps; ++r) { f(); __asm__ volatile("" ::: "memory"); }
        double s = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
        best = std::min(best, s / (double(n) * reps));
    }
    return best;
}
struct Data {
    std::vector<bf16> p, g, m, v, comp; std::vector<float> pf, gf, master, ms, vs; std::vector<uint8_t> mq, vq;
    // Every stream padded: the kernels prefetch up to two int8 blocks (512 elements) ahead,
    // and prefetches past the data cost Zen 1's L1 loop 35-43% (RESULTS.md).
    static constexpr int64_t PAD = 1024;
    explicit Data(int64_t n) : p(n + PAD), g(n + PAD), m(n + PAD), v(n + PAD), comp(n + PAD),
                               pf(n + PAD), gf(n + PAD), master(n + PAD),
                               ms(n / 256, 1e-3f), vs(n / 256, 1e-5f), mq(n + PAD), vq(n + PAD) {
        std::mt19937 rng(1); std::normal_distribution<float> nd;
        for (int64_t i = 0; i < n; ++i) {
            pf[i] = nd(rng); gf[i] = 1e-2f * nd(rng); p[i] = from<bf16>(pf[i]); g[i] = from<bf16>(gf[i]);
            m[i] = from<bf16>(1e-3f * nd(rng)); v[i] = from<bf16>(1e-5f); comp[i] = from<bf16>(0.f);
            master[i] = pf[i]; mq[i] = rng() & 255; vq[i] = rng() & 127;
        }
    }
};
int main() {
    const int64_t n = 1024;  // bf16: 4-5 streams × 2 KiB, in L1
    Data d(n);
    const Hyper h{0.9f, 0.999f, 0.1f, 0.001f, 1e-8f, 0.f, 1.f, 1e-3f, 0.0447f, 1.f, 0, 0};
    const Consts c(h);
    auto bf16_run = [&](auto U) {  // the 16-wide groups the kernel runs on this build (adam.h)
        return best_ns([&] {
#if defined(ADAMKIT_SIMD512)
            run_w<bf16, bf16, decltype(U)::value, false>(
#else
            run16<bf16, bf16, decltype(U)::value, false>(
#endif
                c, d.p.data(), d.g.data(), d.m.data(), d.v.data(), nullptr, d.comp.data(), d.master.data(), 7u, 0, n);
        }, n, 20000, 7);
    };
    auto int8_run = [&](auto P, auto U) {
        using T = typename decltype(P)::type;
        T* p = std::is_same_v<T, float> ? (T*)d.pf.data() : (T*)d.p.data();
        const T* g = std::is_same_v<T, float> ? (const T*)d.gf.data() : (const T*)d.g.data();
        return best_ns([&] {  // the int8 blocks the kernel runs on this build (adam.h)
            int8_blocks<Int8Lanes<T>, T, decltype(U)::value, false>(c, p, g, d.mq.data(), d.ms.data(), d.vq.data(), d.vs.data(),
                                                   nullptr, nullptr, (T*)d.comp.data(), d.master.data(), 7u, 0, n);
        }, n, 10000, 7);
    };
    using I = std::integral_constant<int, NEAREST>;
    using K = std::integral_constant<int, KAHAN>;
    using S = std::integral_constant<int, STOCHASTIC>;
    std::printf("{\"bf16 nearest\": %.4f, \"bf16 kahan\": %.4f, \"bf16 stochastic\": %.4f, "
                "\"fp32 int8\": %.4f, \"bf16 kahan int8\": %.4f}\n",
                bf16_run(I{}), bf16_run(K{}), bf16_run(S{}),
                int8_run(std::type_identity<float>{}, I{}), int8_run(std::type_identity<bf16>{}, K{}));
}
"""


def build(variant: str, edits, tmp: Path) -> Path | str:
    src = tmp / variant.replace(" ", "_").replace(",", "").replace(":", "").replace("√", "sqrt")
    shutil.copytree(KERNEL, src, ignore=shutil.ignore_patterns("*.so", "*.py", "*.cpp", "__pycache__"))
    for header, old, new in edits:
        text = (src / header).read_text()
        if old not in text:
            return f"edit no longer matches {header}"
        (src / header).write_text(text.replace(old, new, 1))
    (src / "driver.cpp").write_text(DRIVER)
    exe = src / "driver"
    subprocess.run(["g++", "-std=c++20", *FLAGS[1:], str(src / "driver.cpp"), "-o", str(exe)],
                   check=True, capture_output=True)
    return exe


def main(rounds: int = 3) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        exes = {name: build(name, edits, Path(tmp)) for name, edits in VARIANTS.items()}
        times: dict[str, list[dict]] = {name: [] for name, exe in exes.items() if isinstance(exe, Path)}
        for _ in range(rounds):  # interleaved: drift of the machine hits every variant alike
            for name in times:
                out = subprocess.run([str(exes[name])], check=True, capture_output=True, text=True).stdout
                times[name].append(json.loads(out))
    best = {name: {k: min(r[k] for r in runs) for k in runs[0]} for name, runs in times.items()}
    base = best["as built"]
    cpu = machine()["cpu"]
    print(f"{cpu}: ns per element, one core, data in L1 "
          f"(best of {rounds} interleaved rounds)\n")
    print("| variant | " + " | ".join(base) + " |")
    print("|---|" + "---|" * len(base))
    for name, row in best.items():
        cells = [f"{row[k]:.2f}" + ("" if name == "as built" else f" ({row[k] / base[k] - 1:+.0%})")
                 for k in base]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, exe in exes.items():
        if not isinstance(exe, Path):
            print(f"| {name} | {exe} |")
    out = Path(__file__).parent / "results" / "kernel_ablation.json"
    out.write_text(json.dumps(dict(machine=cpu, rounds=rounds,
                                   ns_per_element=best,
                                   unmatched=[n for n, e in exes.items() if not isinstance(e, Path)]),
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
