// Explicit 16-wide groups for bfloat16 params (bf16 or fp32 moments, every update
// policy): GCC's own vectorization of the per-element loop
// widens and narrows bf16 one element at a time in effect (zero-extend, shift, pack,
// permute, spills), which made these steps compute-bound at a third of the float32
// step's speed on AVX2. Here one 32-byte load holds 16 values; interleaving it with zeros
// (vpunpck{l,h}wd) gives two float32 vectors directly, in the lane order
// {0-3, 8-11} and {4-7, 12-15}, and vpackusdw undoes exactly that order on the way back.
// Every stream is taken in that same order, so no permutation is ever needed: float32
// streams (fp32 moments, the master copy) load and store 128-bit halves into place.
//
// The arithmetic is common.h's: lerp, update, grad and the bf16 rounding are templates
// that run on float and on the vector type alike, so the two paths agree bit for bit.
#pragma once
#include "common.h"

#if defined(__AVX2__)
#include <immintrin.h>
#define ADAMKIT_SIMD16 1

namespace {

struct Half16 {  // 16 bf16 values as two float32 vectors, in unpack order
    f8 lo, hi;
};

inline Half16 load16(const bf16* p) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i z = _mm256_setzero_si256();
    return {reinterpret_cast<f8>(_mm256_unpacklo_epi16(z, x)),
            reinterpret_cast<f8>(_mm256_unpackhi_epi16(z, x))};
}

// bf16 bit patterns in the low half of each 32-bit lane, back to 16 bf16 in memory order.
inline void store16(bf16* p, u8v lo, u8v hi) {
    const __m256i r = _mm256_packus_epi32(reinterpret_cast<__m256i>(lo), reinterpret_cast<__m256i>(hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
}

inline f8 widen(u8v bits16) { return reinterpret_cast<f8>(bits16 << 16); }

inline Half16 load16(const float* p) {
    return {_mm256_loadu2_m128(p + 8, p), _mm256_loadu2_m128(p + 12, p + 4)};
}
inline void store16(float* p, f8 lo, f8 hi) {
    _mm256_storeu2_m128(p + 8, p, lo);
    _mm256_storeu2_m128(p + 12, p + 4, hi);
}

// A moment stream's storage: what is stored for a float32 value, and its value as stored.
template <class St> struct Store;
template <> struct Store<bf16> {
    using Bits = u8v;
    static u8v round(f8 x) { return bf16_bits(x); }
    static f8 value(u8v b) { return widen(b); }
};
template <> struct Store<float> {
    using Bits = f8;
    static f8 round(f8 x) { return x; }
    static f8 value(f8 b) { return b; }
};

// Flat element indices of a group starting at `base`, in unpack order (stochastic keys).
inline u8v indices_lo(uint32_t base) { return base + u8v{0, 1, 2, 3, 8, 9, 10, 11}; }
inline u8v indices_hi(uint32_t base) { return base + u8v{4, 5, 6, 7, 12, 13, 14, 15}; }

// The step in three stages, so that three groups are in flight at once (run16): the
// moments of group k, the direction of group k−1, the param write of group k−2. Each
// group's work is one long dependency chain (load, moments, rounding, √, two divisions,
// rounding, store: ~70 cycles on Zen 1, where a 256-bit op is two micro-ops); in program
// order the out-of-order window then held barely one group and waited on that chain.
// Interleaving independent groups lets it overlap them: 1.4x the throughput there.
struct Moments16 {  // after stage 1: θ (effective) and the moments as stored, two halves
    f8 th[2], m[2], v[2];
};
struct Direction16 {  // after stage 2
    f8 th[2], d[2];
};

// Stage 1, as Step::run's scalar loop (adam.h) up to the stored moments.
template <class St, int U, bool AMSGRAD>
inline Moments16 moments16(const Consts& c, const bf16* p, const bf16* g, St* m, St* v, St* vm,
                           const bf16* comp, const float* master, int64_t i) {
    using S = Store<St>;
    const Half16 P = U == MASTER ? load16(master + i) : load16(p + i);
    const Half16 G = load16(g + i), M = load16(m + i), V = load16(v + i);
    const Half16 C = U == KAHAN ? load16(comp + i) : Half16{};
    const Half16 X = AMSGRAD ? load16(vm + i) : Half16{};
    const f8 ps[2] = {P.lo, P.hi}, gs[2] = {G.lo, G.hi}, ms[2] = {M.lo, M.hi},
             vs[2] = {V.lo, V.hi}, cs[2] = {C.lo, C.hi}, xs[2] = {X.lo, X.hi};
    Moments16 out;
    typename S::Bits mb[2], vb[2], xb[2];
    for (int h = 0; h < 2; ++h) {
        const f8 th = U == KAHAN ? ps[h] + cs[h] : ps[h];
        const f8 gi = grad(c, gs[h], th);
        mb[h] = S::round(lerp(c, ms[h], gi));
        vb[h] = S::round(c.beta2 * vs[h] + c.omb2 * gi * gi);
        f8 vi = S::value(vb[h]);
        if constexpr (AMSGRAD) {
            xb[h] = S::round(max_(xs[h], vi));
            vi = S::value(xb[h]);
        }
        out.th[h] = th;
        out.m[h] = S::value(mb[h]);
        out.v[h] = vi;
    }
    store16(m + i, mb[0], mb[1]);
    store16(v + i, vb[0], vb[1]);
    if constexpr (AMSGRAD) store16(vm + i, xb[0], xb[1]);
    return out;
}

// Stage 2: m / (√v / √bc2 + ε).
inline Direction16 direction16(const Consts& c, const Moments16& s) {
    return {{s.th[0], s.th[1]}, {direction(c, s.m[0], s.v[0]), direction(c, s.m[1], s.v[1])}};
}

// Stage 3: θ_new, rounded to the param by the update policy, and stored.
template <int U>
inline void write16(const Consts& c, const Direction16& s, bf16* p, bf16* comp, float* master,
                    int64_t i, uint32_t key) {
    u8v pb[2], cb[2];
    f8 xs[2];
    for (int h = 0; h < 2; ++h) {
        const f8 x = xs[h] = apply(c, s.th[h], s.d[h]);
        if constexpr (U == STOCHASTIC) {
            const u8v index = h ? indices_hi(uint32_t(i)) : indices_lo(uint32_t(i));
            pb[h] = stochastic_bf16_bits(x, mix32(index ^ key));
        } else {
            pb[h] = bf16_bits(x);
        }
        if constexpr (U == KAHAN) cb[h] = bf16_bits(x - widen(pb[h]));
    }
    if constexpr (U == MASTER) store16(master + i, xs[0], xs[1]);
    store16(p + i, pb[0], pb[1]);
    if constexpr (U == KAHAN) store16(comp + i, cb[0], cb[1]);
}

// Whole 16-element groups of [lo, hi), software-pipelined; returns where the scalar loop
// takes over. Groups never overlap, so the stages' reads and writes are independent.
template <class St, int U, bool AMSGRAD>
int64_t run16(const Consts& c, bf16* p, const bf16* g, St* m, St* v, St* vm, bf16* comp,
              float* master, uint32_t key, int64_t lo, int64_t hi) {
    const int64_t n = (hi - lo) / 16;
    if (n == 0) return lo;
    const auto moments = [&](int64_t i) {
        return moments16<St, U, AMSGRAD>(c, p, g, m, v, vm, comp, master, i);
    };
    const auto write = [&](const Direction16& d, int64_t i) {
        write16<U>(c, d, p, comp, master, i, key);
    };
    Moments16 a = moments(lo);
    if (n == 1) {
        write(direction16(c, a), lo);
        return lo + 16;
    }
    Direction16 b = direction16(c, a);
    a = moments(lo + 16);
    for (int64_t k = 2; k < n; ++k) {
        write(b, lo + 16 * (k - 2));
        b = direction16(c, a);
        a = moments(lo + 16 * k);
    }
    write(b, lo + 16 * (n - 2));
    write(direction16(c, a), lo + 16 * (n - 1));
    return lo + 16 * n;
}

}  // namespace
#endif
