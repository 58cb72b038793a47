// int8 moments in 16-lane (512-bit) vectors, for the AVX-512 builds, every param dtype.
//
// The int8 step is compute-bound (the codec, benchmarks/RESULTS.md): about twice its
// memory time on every machine measured. On a CPU that executes 512-bit operations at
// full width (Zen 5, Intel's server cores) one instruction does the work of two 8-lane
// ones; on Zen 4, which splits them, it halves the instructions to decode. The step is
// simd.h's int8_blocks with one 16-lane vector per group of 16 instead of two 8-lane
// halves (the group interface below), every stream in memory order (AVX-512 widens and narrows 16 values in one
// instruction, so the unpack order of the 8-lane code buys nothing here), and the same
// templates of common.h doing the arithmetic, so the two agree bit for bit.
#pragma once

#if defined(__AVX512F__) && defined(ADAMKIT_SIMD16)
#define ADAMKIT_SIMD512 1

namespace {

inline f16v load_w(const float* p) { return _mm512_loadu_ps(p); }
inline f16v widen_w(__m256i bf16x16) {  // 16 bf16 in memory order, as float32
    return reinterpret_cast<f16v>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16), 16));
}
inline f16v load_w(const bf16* p) { return widen_w(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline f16v load_w(const half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void store_w(float* p, f16v x) { _mm512_storeu_ps(p, x); }
inline void store_w(bf16* p, __m256i bits) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits); }
inline void store_w(half* p, __m256i bits) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits); }
// float16: rounded to nearest even (F16C, as simd.h's half_bits).
inline __m256i half_bits_w(f16v x) { return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// bf16 bit patterns in the low half of each 32-bit lane, narrowed (vpmovdw) to memory order.
inline __m256i narrow_w(u16v bits) { return _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(bits)); }

// Codes: one byte per element, in the low bits of 32-bit lanes (vpmovzxbd / vpmovdb).
inline u16v load_codes_w(const uint8_t* q) {
    return reinterpret_cast<u16v>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}
inline void store_codes_w(uint8_t* q, u16v codes) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(reinterpret_cast<__m512i>(codes)));
}
// 16 m codes decoded with F16C's 16-lane form, as simd.h's decode_m16 (why it is exact
// is explained there).
inline f16v decode_m_w(const uint8_t* q, float scale) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    const __m256i h = _mm256_slli_epi16(_mm256_add_epi16(w, _mm256_and_si256(w, _mm256_set1_epi16(0x80))), 7);
    return _mm512_cvtph_ps(h) * 256.f * scale;
}

inline bool any_nan_w(f16v x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) != 0; }
inline u16v bf16_bits_w(f16v x, bool nan) { return nan ? bf16_bits(x) : bf16_bits_not_nan(x); }
inline f16v value_w(u16v bf16_bits) { return float_of(bf16_bits << 16); }  // bits_w's value
#if defined(ADAMKIT_HW_BF16)
// vcvtneps2bf16 rounds as bf16_bits but takes a denormal as ±0: the callers fall back to
// bf16_bits_w for a vector holding one (simd.h's hardware_bf16).
inline bool any_denormal_w(f16v x) { return _mm512_fpclass_ps_mask(x, 0x20) != 0; }
inline __m256i hardware_bf16_w(f16v x) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)); }
#endif
// sr_bits of the 16 elements from i (a multiple of 16): the 8 pair hashes read as 16
// 16-bit values are the elements' bits in memory order (simd.h's pair_hashes).
inline u16v sr_bits_w(int64_t i, uint32_t key) {
    return reinterpret_cast<u16v>(_mm512_cvtepu16_epi32(pair_hashes(i, key)));
}

// θ_new of 16 bf16 params, rounded by the update policy and stored (simd.h's write16).
template <int U>
ADAMKIT_INLINE void write_w(const Consts& c, f16v th, f16v d, bf16* p, bf16* comp, float* master,
                            int64_t i, uint32_t key) {
    const f16v x = apply(c, th, d);
#if defined(ADAMKIT_HW_BF16)
    if constexpr (U != STOCHASTIC) {  // a denormal: the software rounding below
        if (!any_denormal_w(x)) {
            const __m256i pb = hardware_bf16_w(x);
            f16v r = {};
            if constexpr (U == KAHAN) r = x - widen_w(pb);  // x − round(x): NaN also where x is ±∞
            if (U != KAHAN || !any_denormal_w(r)) {
                if constexpr (U == MASTER) store_w(master + i, x);
                store_w(p + i, pb);
                if constexpr (U == KAHAN) store_w(comp + i, hardware_bf16_w(r));
                return;
            }
        }
    }
#endif
    const bool nan = any_nan_w(U == KAHAN ? x - x : x);
    u16v pb;
    if constexpr (U == STOCHASTIC) {
        const u16v sr = stochastic_bf16_bits(x, sr_bits_w(i, key));
        pb = nan ? (x != x ? bf16_bits(x) : sr) : sr;  // a NaN to nearest (formats.md)
    } else {
        pb = bf16_bits_w(x, nan);
    }
    if constexpr (U == MASTER) store_w(master + i, x);
    store_w(p + i, narrow_w(pb));
    if constexpr (U == KAHAN) store_w(comp + i, narrow_w(bf16_bits_w(x - value_w(pb), nan)));
}

// θ_new of 16 float16 params (simd.h's write16 for half).
template <int U>
ADAMKIT_INLINE void write_w(const Consts& c, f16v th, f16v d, half* p, half* comp, float* master,
                            int64_t i, uint32_t key) {
    const f16v x = apply(c, th, d);
    __m256i pb;
    if constexpr (U == STOCHASTIC) {  // its value is a float16: converting it is exact
        pb = half_bits_w(stochastic_half_value(x, sr_bits_w(i, key)));
    } else {
        pb = half_bits_w(x);
    }
    if constexpr (U == MASTER) store_w(master + i, x);
    store_w(p + i, pb);
    if constexpr (U == KAHAN) store_w(comp + i, half_bits_w(x - _mm512_cvtph_ps(pb)));
}

// ---- run16 in 16 lanes: bf16/fp32 moments beside bf16 and float16 params, bf16 moments
// beside float32 params --------------------------------------------------------------------
// simd.h's run16 takes a group of 16 as two 8-lane halves (bf16 in unpack order), which
// is all AVX2 has. On AVX-512 those steps were compute-bound: on Zen 5 a bf16 step took
// the same time per element (0.305 ns, both cores) with its data in L3 as from DRAM,
// twice float32's from L3. Here a group is one 16-lane vector in memory order, with
// common.h's arithmetic on the wider type, so the bits are run16's (the scalar loop's):
// test_every_isa_build_gives_the_same_bits.
struct MomentsW {  // after stage 1: θ (effective) and the moments as stored
    f16v th, m, v;
};
struct DirectionW {  // after stage 2
    f16v th, d;
};

// Stage 1 (simd.h's moments16).
template <class Pt, class St, int U, bool AMSGRAD>
ADAMKIT_INLINE MomentsW moments_w(const Consts& c, const Pt* p, const Pt* g, St* m, St* v, St* vm,
                                  const Pt* comp, const float* master, int64_t i) {
    prefetch<U>(p, g, m, v, comp, master, i + PREFETCH_AHEAD);
    const f16v th0 = U == MASTER ? load_w(master + i) : load_w(p + i);
    const f16v G = load_w(g + i), M = load_w(m + i), V = load_w(v + i);
    const f16v X = AMSGRAD ? load_w(vm + i) : f16v{};
    MomentsW out;
    out.th = U == KAHAN ? th0 + load_w(comp + i) : th0;
    const f16v gi = grad(c, G, out.th);
    const f16v mf = lerp(c, M, gi);
    const f16v vf = c.beta2 * V + c.omb2 * gi * gi;
    if constexpr (std::is_same_v<St, float>) {
        out.m = mf;
        out.v = AMSGRAD ? max_nan(X, vf) : vf;
        store_w(m + i, mf);
        store_w(v + i, vf);
        if constexpr (AMSGRAD) store_w(vm + i, out.v);
        return out;
    } else {
#if defined(ADAMKIT_HW_BF16)
        // The max is one of the old max and v as stored: denormal only where one of them is.
        if (!(any_denormal_w(mf) | any_denormal_w(vf) | (AMSGRAD && any_denormal_w(X)))) {
            const __m256i mb = hardware_bf16_w(mf), vb = hardware_bf16_w(vf);
            store_w(m + i, mb);
            store_w(v + i, vb);
            out.m = widen_w(mb);
            out.v = widen_w(vb);
            if constexpr (AMSGRAD) {
                const __m256i xb = hardware_bf16_w(max_nan(X, out.v));
                store_w(vm + i, xb);
                out.v = widen_w(xb);
            }
            return out;
        }
#endif
        // The max is NaN only where the old max or v is (max_nan).
        const bool nan = any_nan_w(mf) | any_nan_w(vf) | (AMSGRAD && any_nan_w(X));
        const u16v mb = bf16_bits_w(mf, nan), vb = bf16_bits_w(vf, nan);
        out.m = value_w(mb);
        out.v = value_w(vb);
        store_w(m + i, narrow_w(mb));
        store_w(v + i, narrow_w(vb));
        if constexpr (AMSGRAD) {
            const u16v xb = bf16_bits_w(max_nan(X, out.v), nan);
            store_w(vm + i, narrow_w(xb));
            out.v = value_w(xb);
        }
        return out;
    }
}

// Stage 3, of run_w and of the 16-lane int8 blocks (write_group below): θ_new rounded by
// the update policy and stored (float32 params: nearest only).
template <int U, class Pt>
ADAMKIT_INLINE void write_param_w(const Consts& c, f16v th, f16v d, Pt* p, Pt* comp, float* master,
                                  int64_t i, uint32_t key) {
    if constexpr (std::is_same_v<Pt, float>) {
        static_assert(U == NEAREST, "float32 params are updated to nearest only");
        store_w(p + i, apply(c, th, d));
    } else {
        write_w<U>(c, th, d, p, comp, master, i, key);
    }
}

// run16 on 16-lane groups (simd.h's pipelined: three groups in flight).
template <class Pt, class St, int U, bool AMSGRAD, bool BC2_ONE = false>
int64_t run_w(const Consts& c, Pt* p, const Pt* g, St* m, St* v, St* vm, Pt* comp, float* master,
              uint32_t key, int64_t lo, int64_t hi) {
    return pipelined(
        lo, hi, [&](int64_t i) { return moments_w<Pt, St, U, AMSGRAD>(c, p, g, m, v, vm, comp, master, i); },
        [&](const MomentsW& s) { return DirectionW{s.th, direction<BC2_ONE>(c, s.m, s.v)}; },
        [&](const DirectionW& d, int64_t i) { write_param_w<U>(c, d.th, d.d, p, comp, master, i, key); });
}

// The group interface of simd.h's int8_blocks on 16 lanes: one vector per group.
struct Wide {};
template <> struct Lanes<Wide> {
    using F = f16v;
    using Q = u16v;
    static constexpr int H = 1;
};
template <class T> ADAMKIT_INLINE void load_group(Wide, const T* p, f16v (&x)[1]) { x[0] = load_w(p); }
ADAMKIT_INLINE void decode_m_group(Wide, const uint8_t* q, float scale, f16v (&x)[1]) { x[0] = decode_m_w(q, scale); }
ADAMKIT_INLINE void load_codes_group(Wide, const uint8_t* q, u16v (&c)[1]) { c[0] = load_codes_w(q); }
ADAMKIT_INLINE void store_codes_group(Wide, uint8_t* q, const u16v (&c)[1]) { store_codes_w(q, c[0]); }
template <int U, class P>
ADAMKIT_INLINE void write_group(Wide, const Consts& c, const f16v (&th)[1], const f16v (&d)[1], P* p,
                                P* comp, float* master, int64_t i, uint32_t key) {
    write_param_w<U>(c, th[0], d[0], p, comp, master, i, key);
}

}  // namespace
#endif
