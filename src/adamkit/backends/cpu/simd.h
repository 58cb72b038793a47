// Explicit 16-wide groups for steps whose every stream is 16-bit (bfloat16 params with
// bf16 moments, and their kahan buffer): GCC's own vectorization of the per-element loop
// widens and narrows bf16 one element at a time in effect (zero-extend, shift, pack,
// permute, spills), which made these steps compute-bound at a third of the float32
// step's speed on AVX2. Here one 32-byte load holds 16 values; interleaving it with zeros
// (vpunpck{l,h}wd) gives two float32 vectors directly, in the lane order
// {0-3, 8-11} and {4-7, 12-15}, and vpackusdw undoes exactly that order on the way back.
// Every stream is taken in that same order, so no permutation is ever needed.
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

// Flat element indices of a group starting at `base`, in unpack order (stochastic keys).
inline u8v indices_lo(uint32_t base) { return base + u8v{0, 1, 2, 3, 8, 9, 10, 11}; }
inline u8v indices_hi(uint32_t base) { return base + u8v{4, 5, 6, 7, 12, 13, 14, 15}; }

// The bf16 bits (low half of each lane) of what one half of a group stores.
struct Lanes {
    u8v p, comp, m, v, vm;
};

// Eight lanes of Step::run's scalar loop (adam.h), operation for operation.
template <int U, bool AMSGRAD>
inline Lanes step8(const Consts& c, f8 p, f8 comp, f8 g, f8 m, f8 v, f8 vm, u8v index,
                   uint32_t key) {
    Lanes out{};
    const f8 th = U == KAHAN ? p + comp : p;
    const f8 gi = grad(c, g, th);
    out.m = bf16_bits(lerp(c, m, gi));
    out.v = bf16_bits(c.beta2 * v + c.omb2 * gi * gi);
    f8 vi = widen(out.v);
    if constexpr (AMSGRAD) {
        out.vm = bf16_bits(max_(vm, vi));
        vi = widen(out.vm);
    }
    const f8 x = update(c, th, widen(out.m), vi);
    if constexpr (U == KAHAN) {
        out.p = bf16_bits(x);
        out.comp = bf16_bits(x - widen(out.p));
    } else if constexpr (U == STOCHASTIC) {
        out.p = stochastic_bf16_bits(x, mix32(index ^ key));
    } else {
        out.p = bf16_bits(x);
    }
    return out;
}

// Whole 16-element groups of [lo, hi); returns where the scalar loop takes over.
template <int U, bool AMSGRAD>
int64_t run16(const Consts& c, bf16* p, const bf16* g, bf16* m, bf16* v, bf16* vm, bf16* comp,
              uint32_t key, int64_t lo, int64_t hi) {
    int64_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        const Half16 P = load16(p + i), G = load16(g + i), M = load16(m + i), V = load16(v + i);
        const Half16 C = U == KAHAN ? load16(comp + i) : Half16{};
        const Half16 X = AMSGRAD ? load16(vm + i) : Half16{};
        const auto a = step8<U, AMSGRAD>(c, P.lo, C.lo, G.lo, M.lo, V.lo, X.lo,
                                         indices_lo(uint32_t(i)), key);
        const auto b = step8<U, AMSGRAD>(c, P.hi, C.hi, G.hi, M.hi, V.hi, X.hi,
                                         indices_hi(uint32_t(i)), key);
        store16(m + i, a.m, b.m);
        store16(v + i, a.v, b.v);
        if constexpr (AMSGRAD) store16(vm + i, a.vm, b.vm);
        if constexpr (U == KAHAN) store16(comp + i, a.comp, b.comp);
        store16(p + i, a.p, b.p);
    }
    return i;
}

}  // namespace
#endif
