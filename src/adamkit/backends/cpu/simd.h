// Explicit 16-wide groups for bfloat16 params (bf16 or fp32 moments, every update
// policy), float16 params (every policy too) and float32 params with bf16 moments:
// GCC's own vectorization of the per-element loop
// widens and narrows bf16 one element at a time in effect (zero-extend, shift, pack,
// permute, spills), which made these steps compute-bound at a third of the float32
// step's speed on AVX2. Here one 32-byte load holds 16 values; interleaving it with zeros
// (vpunpck{l,h}wd) gives two float32 vectors directly, in the lane order
// {0-3, 8-11} and {4-7, 12-15}, and vpackusdw undoes exactly that order on the way back.
// Every stream is taken in that same order, so no permutation is ever needed: float32
// streams (fp32 moments, the master copy) load and store 128-bit halves into place.
// float16 params convert with F16C (vcvtph2ps / vcvtps2ph: IEEE round to nearest even,
// the bits from_f32<half> gives, NaN payloads aside) 8 at a time in memory order, so
// their groups take every stream in memory order instead (`InOrder`), as do float32
// params with bf16 moments (no unpacking of params to follow). (GCC's vectorized
// bit-level conversion had made float16 steps 2.4x slower than torch's fused one.)
//
// The arithmetic is common.h's: lerp, update, grad and the bf16 rounding are templates
// that run on float and on the vector type alike, so the two paths agree bit for bit.
#pragma once
#include "common.h"

#if defined(__AVX2__)
#include <immintrin.h>
#define ADAMKIT_SIMD16 1
// The stages of a group are inlined into run16's loop by force: GCC's heuristics had
// kept moments16 of the nearest/stochastic instantiations as an out-of-line function
// (a call per 16 elements, its 192-byte result through the stack), and which calls it
// inlined changed with unrelated edits elsewhere in the file.
#define ADAMKIT_INLINE inline __attribute__((always_inline))

namespace {

struct Half16 {  // 16 values as two float32 vectors, in the group's lane order
    f8 lo, hi;
};

// The lane order of a group: bf16 params' unpack order, or memory order (float16 params).
struct Unpacked {};
struct InOrder {};
template <class P> using LayoutOf = std::conditional_t<std::is_same_v<P, bf16>, Unpacked, InOrder>;

// 16 bf16 in memory order (one register) as two float32 vectors in unpack order.
inline Half16 widen16(Unpacked, __m256i x) {
    const __m256i z = _mm256_setzero_si256();
    return {reinterpret_cast<f8>(_mm256_unpacklo_epi16(z, x)),
            reinterpret_cast<f8>(_mm256_unpackhi_epi16(z, x))};
}
inline Half16 load16(Unpacked, const bf16* p) {
    return widen16(Unpacked{}, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// bf16 bit patterns in the low half of each 32-bit lane, back to 16 bf16 in memory order.
inline void store16(Unpacked, bf16* p, u8v lo, u8v hi) {
    const __m256i r = _mm256_packus_epi32(reinterpret_cast<__m256i>(lo), reinterpret_cast<__m256i>(hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
}

inline f8 widen(u8v bits16) { return reinterpret_cast<f8>(bits16 << 16); }

inline Half16 load16(Unpacked, const float* p) {
    return {_mm256_loadu2_m128(p + 8, p), _mm256_loadu2_m128(p + 12, p + 4)};
}
inline void store16(Unpacked, float* p, f8 lo, f8 hi) {
    _mm256_storeu2_m128(p + 8, p, lo);
    _mm256_storeu2_m128(p + 12, p + 4, hi);
}

// Memory order: elements 0-7 and 8-15.
inline Half16 load16(InOrder, const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store16(InOrder, float* p, f8 lo, f8 hi) {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
}
inline Half16 load16(InOrder, const half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline Half16 load16(InOrder, const bf16* p) {  // bf16 moments beside float16 params
    const auto eight = [](const bf16* q) {
        return reinterpret_cast<f8>(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))), 16));
    };
    return {eight(p), eight(p + 8)};
}
inline void store16(InOrder, bf16* p, u8v lo, u8v hi) {
    // packus interleaves 128-bit lanes ({lo 0-3, hi 0-3 | lo 4-7, hi 4-7}); the permute
    // restores memory order.
    const __m256i r = _mm256_packus_epi32(reinterpret_cast<__m256i>(lo), reinterpret_cast<__m256i>(hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(r, 0xD8));
}

#if defined(__AVX512BF16__)
// AVX512_BF16's vcvtne2ps2bf16 rounds 16 float32 to bf16 in one instruction, to nearest
// even with NaN quieted exactly as bf16_bits, but it takes denormal inputs as ±0 where
// torch (and formats.md) round them. moments16 and write16 take it first for a group
// holding no float32 denormal (one fpclass per 8 values decides) and otherwise fall
// through to the software rounding, the code every other build runs, unchanged.
#define ADAMKIT_HW_BF16 1
ADAMKIT_INLINE bool any_denormal(f8 a, f8 b) {
    constexpr int DENORMAL = 0x20;
    return (_mm256_fpclass_ps_mask(a, DENORMAL) | _mm256_fpclass_ps_mask(b, DENORMAL)) != 0;
}
// 16 bf16 in memory order. The instruction's result is {lo's 8, hi's 8}: memory order
// for InOrder; for Unpacked ({0-3, 8-11}, {4-7, 12-15}) the qword permute restores it.
ADAMKIT_INLINE __m256i hardware_bf16(Unpacked, f8 lo, f8 hi) {
    return _mm256_permute4x64_epi64(reinterpret_cast<__m256i>(_mm256_cvtne2ps_pbh(hi, lo)), 0xD8);
}
ADAMKIT_INLINE __m256i hardware_bf16(InOrder, f8 lo, f8 hi) {
    return reinterpret_cast<__m256i>(_mm256_cvtne2ps_pbh(hi, lo));
}
// Back to float32 values in memory order (widen16(Unpacked, ...) is above, beside load16;
// the in-order load widens two halves from memory instead, which saves a lane extract).
ADAMKIT_INLINE Half16 widen16(InOrder, __m256i x) {
    const auto eight = [](__m128i q) { return reinterpret_cast<f8>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(q), 16)); };
    return {eight(_mm256_castsi256_si128(x)), eight(_mm256_extracti128_si256(x, 1))};
}
ADAMKIT_INLINE void store16(bf16* p, __m256i bits) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits); }
#endif

// float16: rounded (to nearest even) as 8 halves, and their value as float32.
inline __m128i half_bits(f8 x) { return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline f8 half_value(__m128i h) { return _mm256_cvtph_ps(h); }
inline void store16(InOrder, half* p, __m128i lo, __m128i hi) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), hi);
}

// Whether a lane of a or b is NaN. A group whose values to round hold none (every group,
// in a healthy run) rounds them without bf16_bits' NaN test: 1.12-1.19x the throughput
// on Zen 1 (benchmarks/kernel_ablation.py).
inline bool any_nan(f8 a, f8 b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)); }
inline u8v bf16_bits(f8 x, bool nan) { return nan ? bf16_bits(x) : bf16_bits_not_nan(x); }

// A moment stream's storage: what is stored for a float32 value, and its value as stored.
template <class St> struct Store;
template <> struct Store<bf16> {
    using Bits = u8v;
    static u8v round(f8 x, bool nan) { return bf16_bits(x, nan); }
    static f8 value(u8v b) { return widen(b); }
};
template <> struct Store<float> {
    using Bits = f8;
    static f8 round(f8 x, bool) { return x; }
    static f8 value(f8 b) { return b; }
};

// sr_bits (common.h) of the 16 elements of a group starting at i (a multiple of 16, as
// every group start is), in the layout's lane order: the 8 pair hashes, read as 16
// 16-bit values, are the elements' random bits in memory order, so widening them as a
// bf16 load is widened (Unpacked) or in order (InOrder) puts each where its element is.
inline __m256i pair_hashes(int64_t i, uint32_t key) {
    return reinterpret_cast<__m256i>(mix32((uint32_t(i >> 1) + u8v{0, 1, 2, 3, 4, 5, 6, 7}) ^ key));
}
inline void sr_bits16(Unpacked, int64_t i, uint32_t key, u8v (&r)[2]) {
    const __m256i h = pair_hashes(i, key), z = _mm256_setzero_si256();
    r[0] = reinterpret_cast<u8v>(_mm256_unpacklo_epi16(h, z));
    r[1] = reinterpret_cast<u8v>(_mm256_unpackhi_epi16(h, z));
}
inline void sr_bits16(InOrder, int64_t i, uint32_t key, u8v (&r)[2]) {
    const __m256i h = pair_hashes(i, key);
    r[0] = reinterpret_cast<u8v>(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)));
    r[1] = reinterpret_cast<u8v>(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)));
}

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

// Software prefetch of every stream read, PREFETCH_AHEAD elements ahead (a prefetch past
// a tensor's end is harmless: it never faults). The hardware prefetcher alone left the
// 16-lane loops waiting on memory once both cores stream: 3-9% faster bf16 and float16
// steps on Zen 3 with it (16.8M params, interleaved A/B in one process; 256 ahead did as
// well as 1024; stochastic rounding, the most compute per element, unchanged; float16
// params with bf16 moments 12%, once the stages were inlined by force).
constexpr int64_t PREFETCH_AHEAD = 256;
template <int U, class Pt, class St>
inline void prefetch(const Pt* p, const Pt* g, const St* m, const St* v, const Pt* comp,
                     const float* master, int64_t i) {
    const auto at = [](const void* x) { _mm_prefetch(static_cast<const char*>(x), _MM_HINT_T0); };
    at(U == MASTER ? static_cast<const void*>(master + i) : p + i);
    at(g + i);
    if constexpr (U == KAHAN) at(comp + i);
    at(m + i);
    at(v + i);
}

// Stage 1, as Step::run's scalar loop (adam.h) up to the stored moments.
template <class Pt, class St, int U, bool AMSGRAD>
ADAMKIT_INLINE Moments16 moments16(const Consts& c, const Pt* p, const Pt* g, St* m, St* v, St* vm,
                           const Pt* comp, const float* master, int64_t i) {
    using S = Store<St>;
    const LayoutOf<Pt> L;
    prefetch<U>(p, g, m, v, comp, master, i + PREFETCH_AHEAD);
    const Half16 P = U == MASTER ? load16(L, master + i) : load16(L, p + i);
    const Half16 G = load16(L, g + i), M = load16(L, m + i), V = load16(L, v + i);
    const Half16 C = U == KAHAN ? load16(L, comp + i) : Half16{};
    const Half16 X = AMSGRAD ? load16(L, vm + i) : Half16{};
    const f8 ps[2] = {P.lo, P.hi}, gs[2] = {G.lo, G.hi}, ms[2] = {M.lo, M.hi},
             vs[2] = {V.lo, V.hi}, cs[2] = {C.lo, C.hi}, xs[2] = {X.lo, X.hi};
    Moments16 out;
    f8 mf[2], vf[2];
    for (int h = 0; h < 2; ++h) {
        out.th[h] = U == KAHAN ? ps[h] + cs[h] : ps[h];
        const f8 gi = grad(c, gs[h], out.th[h]);
        mf[h] = lerp(c, ms[h], gi);
        vf[h] = c.beta2 * vs[h] + c.omb2 * gi * gi;
    }
#if defined(ADAMKIT_HW_BF16)
    // The max is one of the old max and v as stored: denormal only where one of them is.
    if constexpr (std::is_same_v<St, bf16>) {
        if (!(any_denormal(mf[0], mf[1]) | any_denormal(vf[0], vf[1]) |
              (AMSGRAD && any_denormal(xs[0], xs[1])))) {
            const __m256i mb = hardware_bf16(L, mf[0], mf[1]), vb = hardware_bf16(L, vf[0], vf[1]);
            store16(m + i, mb);
            store16(v + i, vb);
            const Half16 m_stored = widen16(L, mb);
            Half16 v_stored = widen16(L, vb);
            if constexpr (AMSGRAD) {
                const __m256i xb = hardware_bf16(L, max_nan(xs[0], v_stored.lo), max_nan(xs[1], v_stored.hi));
                store16(vm + i, xb);
                v_stored = widen16(L, xb);
            }
            out.m[0] = m_stored.lo;
            out.m[1] = m_stored.hi;
            out.v[0] = v_stored.lo;
            out.v[1] = v_stored.hi;
            return out;
        }
    }
#endif
    // The max is NaN only where the old max or v is (max_nan).
    const bool nan = std::is_same_v<St, bf16> &&
                     (any_nan(mf[0], mf[1]) | any_nan(vf[0], vf[1]) | (AMSGRAD && any_nan(xs[0], xs[1])));
    typename S::Bits mb[2], vb[2], xb[2];
    for (int h = 0; h < 2; ++h) {
        mb[h] = S::round(mf[h], nan);
        vb[h] = S::round(vf[h], nan);
        f8 vi = S::value(vb[h]);
        if constexpr (AMSGRAD) {
            xb[h] = S::round(max_nan(xs[h], vi), nan);
            vi = S::value(xb[h]);
        }
        out.m[h] = S::value(mb[h]);
        out.v[h] = vi;
    }
    store16(L, m + i, mb[0], mb[1]);
    store16(L, v + i, vb[0], vb[1]);
    if constexpr (AMSGRAD) store16(L, vm + i, xb[0], xb[1]);
    return out;
}

// Stage 2: m / (√v / √bc2 + ε).
template <bool BC2_ONE>
ADAMKIT_INLINE Direction16 direction16(const Consts& c, const Moments16& s) {
    return {{s.th[0], s.th[1]},
            {direction<BC2_ONE>(c, s.m[0], s.v[0]), direction<BC2_ONE>(c, s.m[1], s.v[1])}};
}

// Stage 3: θ_new, rounded to the param by the update policy, and stored.
// float32 params (nearest only), in the group's lane order: int8_blocks takes int8 codes in
// unpack order for float32 and bf16 params alike (one code path), so there they are
// stored in that order; beside bf16 moments (run16) memory order, which needs no permute.
template <class L>
ADAMKIT_INLINE void write16(L layout, const Consts& c, const Direction16& s, float* p, int64_t i) {
    store16(layout, p + i, apply(c, s.th[0], s.d[0]), apply(c, s.th[1], s.d[1]));
}
template <int U>
ADAMKIT_INLINE void write16(const Consts& c, const Direction16& s, float* p, float*, float*, int64_t i,
                            uint32_t) {
    static_assert(U == NEAREST, "float32 params are updated to nearest only");
    write16(InOrder{}, c, s, p, i);
}

template <int U>
ADAMKIT_INLINE void write16(const Consts& c, const Direction16& s, bf16* p, bf16* comp, float* master,
                    int64_t i, uint32_t key) {
    u8v pb[2], cb[2];
    const f8 xs[2] = {apply(c, s.th[0], s.d[0]), apply(c, s.th[1], s.d[1])};
#if defined(ADAMKIT_HW_BF16)
    if constexpr (U != STOCHASTIC) {
        if (!any_denormal(xs[0], xs[1])) {
            const __m256i p16 = hardware_bf16(Unpacked{}, xs[0], xs[1]);
            f8 r[2] = {};
            if constexpr (U == KAHAN) {  // x − round(x): NaN also where x is ±∞
                const Half16 pv = widen16(Unpacked{}, p16);
                r[0] = xs[0] - pv.lo, r[1] = xs[1] - pv.hi;
            }
            if (U != KAHAN || !any_denormal(r[0], r[1])) {
                if constexpr (U == MASTER) store16(Unpacked{}, master + i, xs[0], xs[1]);
                store16(p + i, p16);
                if constexpr (U == KAHAN) store16(comp + i, hardware_bf16(Unpacked{}, r[0], r[1]));
                return;
            }
        }
    }
#endif
    // Kahan's residual x − round(x) is NaN also where x is ±∞: x − x finds both.
    const bool nan = U == KAHAN ? any_nan(xs[0] - xs[0], xs[1] - xs[1]) : any_nan(xs[0], xs[1]);
    u8v r[2];
    if constexpr (U == STOCHASTIC) sr_bits16(Unpacked{}, i, key, r);
    for (int h = 0; h < 2; ++h) {
        const f8 x = xs[h];
        if constexpr (U == STOCHASTIC) {
            const u8v sr = stochastic_bf16_bits(x, r[h]);
            pb[h] = nan ? (x != x ? bf16_bits(x) : sr) : sr;  // a NaN to nearest (formats.md)
        } else {
            pb[h] = bf16_bits(x, nan);
        }
        if constexpr (U == KAHAN) cb[h] = bf16_bits(x - widen(pb[h]), nan);
    }
    if constexpr (U == MASTER) store16(Unpacked{}, master + i, xs[0], xs[1]);
    store16(Unpacked{}, p + i, pb[0], pb[1]);
    if constexpr (U == KAHAN) store16(Unpacked{}, comp + i, cb[0], cb[1]);
}

// float16 params, in memory order.
template <int U>
ADAMKIT_INLINE void write16(const Consts& c, const Direction16& s, half* p, half* comp, float* master,
                    int64_t i, uint32_t key) {
    const f8 xs[2] = {apply(c, s.th[0], s.d[0]), apply(c, s.th[1], s.d[1])};
    __m128i pb[2];
    u8v r[2];
    if constexpr (U == STOCHASTIC) sr_bits16(InOrder{}, i, key, r);
    for (int h = 0; h < 2; ++h) {
        if constexpr (U == STOCHASTIC) {  // its value is a float16: converting it is exact
            pb[h] = half_bits(stochastic_half_value(xs[h], r[h]));
        } else {
            pb[h] = half_bits(xs[h]);
        }
    }
    if constexpr (U == MASTER) store16(InOrder{}, master + i, xs[0], xs[1]);
    store16(InOrder{}, p + i, pb[0], pb[1]);
    if constexpr (U == KAHAN)
        store16(InOrder{}, comp + i, half_bits(xs[0] - half_value(pb[0])),
                half_bits(xs[1] - half_value(pb[1])));
}

// Whole 16-element groups of [lo, hi) through the three stages, three groups in flight
// (moments of group k, direction of k−1, write of k−2); returns where the scalar loop
// takes over. Groups never overlap, so the stages' reads and writes are independent.
// run16 and simd512.h's run_w are its two instantiations.
template <class Moments, class Direction, class Write>
ADAMKIT_INLINE int64_t pipelined(int64_t lo, int64_t hi, Moments moments, Direction direction, Write write) {
    const int64_t n = (hi - lo) / 16;
    if (n == 0) return lo;
    auto a = moments(lo);
    if (n == 1) {
        write(direction(a), lo);
        return lo + 16;
    }
    auto b = direction(a);
    a = moments(lo + 16);
    for (int64_t k = 2; k < n; ++k) {
        write(b, lo + 16 * (k - 2));
        b = direction(a);
        a = moments(lo + 16 * k);
    }
    write(b, lo + 16 * (n - 2));
    write(direction(a), lo + 16 * (n - 1));
    return lo + 16 * n;
}

template <class Pt, class St, int U, bool AMSGRAD, bool BC2_ONE = false>
int64_t run16(const Consts& c, Pt* p, const Pt* g, St* m, St* v, St* vm, Pt* comp,
              float* master, uint32_t key, int64_t lo, int64_t hi) {
    return pipelined(
        lo, hi, [&](int64_t i) { return moments16<Pt, St, U, AMSGRAD>(c, p, g, m, v, vm, comp, master, i); },
        [&](const Moments16& s) { return direction16<BC2_ONE>(c, s); },
        [&](const Direction16& d, int64_t i) { write16<U>(c, d, p, comp, master, i, key); });
}


// ---- int8 moments: one whole block (BLOCK = 256 = 16 groups) at a time -------------------
// (The AVX-512 builds run them in 16-lane vectors instead: simd512.h.)
// Step::block's three passes (adam.h) on 16 lanes: decode and step, block maxima; encode
// (which also gives the values as stored); write the params. The codes follow the lane
// order of the params: for bf16 and float32 params, widened byte → 16 bit in order, then
// interleaved with zeros like bf16 (unpack order); for float16 params, in memory order.
template <class P> using BlockLayout = std::conditional_t<std::is_same_v<P, half>, InOrder, Unpacked>;

inline void load_codes(Unpacked, const uint8_t* q, u8v& lo, u8v& hi) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    const __m256i z = _mm256_setzero_si256();
    lo = reinterpret_cast<u8v>(_mm256_unpacklo_epi16(w, z));
    hi = reinterpret_cast<u8v>(_mm256_unpackhi_epi16(w, z));
}
inline void load_codes(InOrder, const uint8_t* q, u8v& lo, u8v& hi) {
    lo = reinterpret_cast<u8v>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
    hi = reinterpret_cast<u8v>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8))));
}
// 16 m codes decoded with F16C: the E4M3 magnitude placed in a float16's exponent and
// top mantissa bits reads as 2^-8 times its value (bias 15 for 7; E4M3's subnormals are
// float16 subnormals, which vcvtph2ps converts exactly: it ignores MXCSR.DAZ, so also
// under torch.set_flush_denormal(True)), and the sign moves from bit 7 to bit 15:
// (w + (w & 0x80)) << 7. ×256 is exact, so the product with the scale is decode_m_bits's,
// bit for bit. 3-5% faster int8 steps than decode_m_bits (interleaved A/B, Zen 3).
inline f8 decode_m8(__m128i h, float scale) { return _mm256_cvtph_ps(h) * 256.f * scale; }
template <class L> inline Half16 decode_m16(L, const uint8_t* q, float scale) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    __m256i h = _mm256_slli_epi16(_mm256_add_epi16(w, _mm256_and_si256(w, _mm256_set1_epi16(0x80))), 7);
    if constexpr (std::is_same_v<L, Unpacked>) h = _mm256_permute4x64_epi64(h, 0xD8);  // {0-3, 8-11}, {4-7, 12-15}
    return {decode_m8(_mm256_castsi256_si128(h), scale), decode_m8(_mm256_extracti128_si256(h, 1), scale)};
}
// packus_epi32 interleaves 128-bit lanes ({lo 0-3, hi 0-3 | lo 4-7, hi 4-7}): that is
// unpack order undone; memory order needs the qwords put back first.
inline void store_codes16(uint8_t* q, __m256i w) {
    const __m256i b = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm256_castsi256_si128(b));
}
inline void store_codes(Unpacked, uint8_t* q, u8v lo, u8v hi) {
    store_codes16(q, _mm256_packus_epi32(reinterpret_cast<__m256i>(lo), reinterpret_cast<__m256i>(hi)));
}
inline void store_codes(InOrder, uint8_t* q, u8v lo, u8v hi) {
    const __m256i w = _mm256_packus_epi32(reinterpret_cast<__m256i>(lo), reinterpret_cast<__m256i>(hi));
    store_codes16(q, _mm256_permute4x64_epi64(w, 0xD8));
}
// The block's absmax over lanes, as the scalar loop's (magnitude_max: a NaN is kept).
template <class F> inline float max_lanes(F x) {
    float m = 0.f;
    for (int k = 0; k < int(sizeof(F) / 4); ++k) m = magnitude_max(m, x[k]);
    return m;
}
// Whether every one of a block's BLOCK codes from q is at least 8.
inline bool codes_at_least_8(const uint8_t* q) {
    static_assert(BLOCK == 256, "eight 32-byte vectors");
    __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    for (int j = 1; j < 8; ++j)
        low = _mm256_min_epu8(low, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q) + j));
    const __m256i eight = _mm256_set1_epi8(8);
    return _mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8(low, eight), low)) == -1;
}
// The block's least magnitude, where its maxima are finite (no NaN).
template <class F> inline float min_lanes(F x) {
    float m = x[0];
    for (int k = 1; k < int(sizeof(F) / 4); ++k) m = min_(m, x[k]);
    return m;
}

// A group of 16 elements in the int8 blocks is H vectors of F. Here: 8 lanes, H = 2, in
// the BlockLayout's lane order (every SIMD build); simd512.h adds 16 lanes, H = 1 (Wide).
template <class L> struct Lanes {
    using F = f8;
    using Q = u8v;
    static constexpr int H = 2;
};
template <class L, class T> ADAMKIT_INLINE void load_group(L layout, const T* p, f8 (&x)[2]) {
    const Half16 h = load16(layout, p);
    x[0] = h.lo, x[1] = h.hi;
}
template <class L> ADAMKIT_INLINE void decode_m_group(L layout, const uint8_t* q, float scale, f8 (&x)[2]) {
    const Half16 h = decode_m16(layout, q, scale);
    x[0] = h.lo, x[1] = h.hi;
}
template <class L> ADAMKIT_INLINE void load_codes_group(L layout, const uint8_t* q, u8v (&c)[2]) {
    load_codes(layout, q, c[0], c[1]);
}
template <class L> ADAMKIT_INLINE void store_codes_group(L layout, uint8_t* q, const u8v (&c)[2]) {
    store_codes(layout, q, c[0], c[1]);
}
// θ_new of a group from θ (effective) and the direction, rounded and stored (write16).
template <int U, class L, class P>
ADAMKIT_INLINE void write_group(L layout, const Consts& c, const f8 (&th)[2], const f8 (&d)[2], P* p,
                                P* comp, float* master, int64_t i, uint32_t key) {
    const Direction16 s = {{th[0], th[1]}, {d[0], d[1]}};
    if constexpr (std::is_same_v<P, float>) write16(layout, c, s, p, i);
    else write16<U>(c, s, p, comp, master, i, key);
}

// Whole blocks [lo, hi) of one tensor (multiples of BLOCK), each in Step::block's three
// passes, on the lanes of layout L. For float32 and float16 params they are
// software-pipelined across blocks: the param writes of block j−1 (√ and two divisions,
// the divider's work) run inside block j's encoding loop (ALU work, no division), so the
// two overlap instead of taking turns: 6–10% faster int8 steps at 16.8M params
// (interleaved A/B, Zen 3). bf16 params in 8 lanes write each block right after encoding
// it: the same overlap made them 1–11% slower there (their write adds the bf16 rounding,
// ALU work that competes with the encoding, in 16 registers). In 16 lanes (AVX-512: 32
// registers) it made them faster on Zen 5, nearest 8–10%, kahan 2–4%, master 1–2%, but
// stochastic (the hash too) 2% slower, which stays as it was (interleaved A/B, 16.8M params).
template <class L, class P, int U, bool AMSGRAD, bool BC2_ONE = false>
inline void int8_blocks(const Consts& c, P* p, const P* g, uint8_t* mq, float* msc, uint8_t* vq,
                        float* vsc, uint8_t* vmq, float* vmsc, P* comp, float* master, uint32_t key,
                        int64_t lo, int64_t hi) {
    using F = typename Lanes<L>::F;
    using Q = typename Lanes<L>::Q;
    constexpr int H = Lanes<L>::H;
    const L layout;
    constexpr bool OVERLAP = !std::is_same_v<P, bf16> || (H == 1 && U != STOCHASTIC);
    struct Block {  // one block between its passes: per vector, θ (effective) and the moments
        F th[16 * H], m[16 * H], v[16 * H];
    } buf[2];
    const auto write = [&](const Block& B, int64_t b0, int k) {  // group k of a block
        F th[H], d[H];
        for (int h = 0; h < H; ++h) {
            th[h] = B.th[H * k + h];
            d[h] = direction<BC2_ONE>(c, B.m[H * k + h], B.v[H * k + h]);
        }
        write_group<U>(layout, c, th, d, p, comp, master, b0 + 16 * k, key);
    };
    for (int64_t b0 = lo; b0 < hi; b0 += BLOCK) {
        const int64_t blk = b0 / BLOCK;
        Block& B = buf[blk & 1];
        const Block& prev = buf[~blk & 1];  // block b0 − BLOCK; with OVERLAP encoded, not yet written
        const bool has_prev = OVERLAP && b0 > lo;
        F mabs = {}, vabs = {}, mlow = F{} + INFINITY, vlow = F{} + INFINITY;
        const float mscale = msc[blk], vscale = vsc[blk];
        const auto step = [&](auto v_range) {  // decode and step, block maxima and minima
          constexpr BlockRange VR = decltype(v_range)::value;
          for (int k = 0; k < 16; ++k) {
            const int64_t i = b0 + 16 * k;
            // Two blocks ahead: a block is three passes, well over a thousand micro-ops, so
            // the out-of-order window never reaches its loads (one block ahead: 8% faster
            // fp32 int8 steps on Zen 3; two, once 16-lane blocks made a block quicker:
            // 3-6% faster again on Zen 5, AVX2 builds unchanged; interleaved A/B).
            prefetch<U>(p, g, mq, vq, comp, master, i + 2 * BLOCK);
            if constexpr (AMSGRAD) _mm_prefetch(reinterpret_cast<const char*>(vmq + i + 2 * BLOCK), _MM_HINT_T0);
            F ts[H], gs[H], cs[H] = {}, ms[H];
            Q qv[H];
            if constexpr (U == MASTER) load_group(layout, master + i, ts);
            else load_group(layout, p + i, ts);
            load_group(layout, g + i, gs);
            if constexpr (U == KAHAN) load_group(layout, comp + i, cs);
            decode_m_group(layout, mq + i, mscale, ms);
            load_codes_group(layout, vq + i, qv);
            for (int h = 0; h < H; ++h) {
                const F th = U == KAHAN ? ts[h] + cs[h] : ts[h];
                const F gi = grad(c, gs[h], th);
                const F mi = lerp(c, ms[h], gi);
                const F vi = c.beta2 * decode_v_bits<VR>(qv[h], vscale) + c.omb2 * gi * gi;
                B.th[H * k + h] = th;
                B.m[H * k + h] = mi;
                B.v[H * k + h] = vi;
                mabs = magnitude_max(mabs, abs_(mi));
                vabs = magnitude_max(vabs, vi);
                mlow = min_(mlow, abs_(mi));
                vlow = min_(vlow, vi);
            }
          }
        };
        // v codes are decoded without their subnormal path where none of the block's is
        // below 8 (as in the blocks encoded NORMAL below, most of them): in L1 on one core
        // without it int8 steps took 2-7% longer (Zen 5, kernel_ablation.py); at 16.8M
        // params it saved 3-6% with bf16 params and 4-6% on avx2, fp32 int8 on avx512bf16
        // within the noise (interleaved A/B).
        if (codes_at_least_8(vq + b0)) step(std::integral_constant<BlockRange, NORMAL>{});
        else step(std::integral_constant<BlockRange, ANY>{});
        const float mmax = max_lanes(mabs), vmax = max_lanes(vabs);
        const Codec mcod(mmax, M_MAX), vcod(vmax, V_MAX);
        msc[blk] = mcod.scale;
        vsc[blk] = vcod.scale;
        const auto encode = [&](auto range) {  // the moments become their values as stored
            constexpr BlockRange R = decltype(range)::value;
            for (int k = 0; k < 16; ++k) {
                const int64_t i = b0 + 16 * k;
                Q mc[H], vc[H];
                for (int h = 0; h < H; ++h) mc[h] = encode_m_bits<R>(B.m[H * k + h], mcod, B.m[H * k + h]);
                for (int h = 0; h < H; ++h) vc[h] = encode_v_bits<R>(B.v[H * k + h], vcod, B.v[H * k + h]);
                store_codes_group(layout, mq + i, mc);
                store_codes_group(layout, vq + i, vc);
                if (has_prev) write(prev, b0 - BLOCK, k);
            }
        };
        // The block's range (BlockRange): every element is at most its maximum, so where
        // the maxima are finite x·inv ≤ top·(1 + 2^-24)², and at least its minimum, whose
        // x·inv (rounded as the encoder's, monotone) bounds every element's from below.
        // Most blocks are NORMAL: a block's m and v rarely span the 2^15 and 2^31 of the
        // maps' normal ranges (after 300 steps of `adamkit train`, 95.6% of the blocks had
        // no code below 8; the rest held a zero or a tiny m). In L1 on one core
        // (kernel_ablation.py), Zen 5: every block as ANY took 8-13% longer per int8
        // step, no NORMAL blocks 8-10%; at 16.8M params the ranges and the v-code test
        // together saved 8-16% (interleaved A/B, avx512bf16 and avx2).
        using std::integral_constant;
        if (!(mmax < INFINITY && vmax < INFINITY)) encode(integral_constant<BlockRange, ANY>{});
        else if (min_lanes(mlow) * mcod.inv >= M_MIN_NORMAL && min_lanes(vlow) * vcod.inv >= V_MIN_NORMAL)
            encode(integral_constant<BlockRange, NORMAL>{});
        else encode(integral_constant<BlockRange, FINITE>{});
        if constexpr (AMSGRAD) {  // max v: the old one decoded, against v as stored; re-encoded
            // by the block's range, as v above (the same decoder and encoder, and proofs):
            // amsgrad int8 steps 11% faster at 16.8M params than with ANY for every block
            // (interleaved A/B, Zen 5; avx2 build 8-9%)
            F vmabs = {}, vmlow = F{} + INFINITY;
            const float vmscale = vmsc[blk];
            const auto take_max = [&](auto old_range) {
                constexpr BlockRange OR = decltype(old_range)::value;
                for (int k = 0; k < 16; ++k) {
                    Q qvm[H];
                    load_codes_group(layout, vmq + b0 + 16 * k, qvm);
                    for (int h = 0; h < H; ++h) {
                        F& x = B.v[H * k + h];
                        x = max_nan(decode_v_bits<OR>(qvm[h], vmscale), x);
                        vmabs = magnitude_max(vmabs, x);
                        vmlow = min_(vmlow, x);
                    }
                }
            };
            if (codes_at_least_8(vmq + b0)) take_max(integral_constant<BlockRange, NORMAL>{});
            else take_max(integral_constant<BlockRange, ANY>{});
            const float vmmax = max_lanes(vmabs);
            const Codec vmcod(vmmax, V_MAX);
            vmsc[blk] = vmcod.scale;
            const auto reencode = [&](auto range) {
                constexpr BlockRange R = decltype(range)::value;
                for (int k = 0; k < 16; ++k) {
                    Q vc[H];
                    for (int h = 0; h < H; ++h) vc[h] = encode_v_bits<R>(B.v[H * k + h], vmcod, B.v[H * k + h]);
                    store_codes_group(layout, vmq + b0 + 16 * k, vc);
                }
            };
            if (!(vmmax < INFINITY)) reencode(integral_constant<BlockRange, ANY>{});
            else if (min_lanes(vmlow) * vmcod.inv >= V_MIN_NORMAL) reencode(integral_constant<BlockRange, NORMAL>{});
            else reencode(integral_constant<BlockRange, FINITE>{});
        }
        if (!OVERLAP)
            for (int k = 0; k < 16; ++k) write(B, b0, k);
    }
    if (OVERLAP && hi > lo)
        for (int k = 0; k < 16; ++k) write(buf[(hi / BLOCK - 1) & 1], hi - BLOCK, k);
}

}  // namespace
#endif
#include "simd512.h"

#if defined(ADAMKIT_SIMD16)
namespace {
// The lanes this build's int8 blocks run on (adam.h; benchmarks/kernel_ablation.py).
#if defined(ADAMKIT_SIMD512)
template <class P> using Int8Lanes = Wide;
#else
template <class P> using Int8Lanes = BlockLayout<P>;
#endif
}  // namespace
#endif
