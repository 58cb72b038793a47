// Types, the argument block shared with Python (cpu/library.py mirrors it with ctypes),
// and the per-element building blocks of the fused step. Everything follows
// docs/design/formats.md bit for bit.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

constexpr int ABI_VERSION = 4;
constexpr int64_t BLOCK = 256;     // int8 quantization block (elements)
constexpr int64_t CHUNK = 16384;   // unit of work per thread: a multiple of BLOCK

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { FP32 = 0, BF16 = 1, INT8 = 2 };
enum { NEAREST = 0, KAHAN = 1, MASTER = 2, STOCHASTIC = 3 };
enum { ERR_DTYPE = 1, ERR_STATE = 2, ERR_UPDATE = 3, ERR_STEP_DTYPE = 4 };
enum { STEP_NONE = 0, STEP_F32 = 1, STEP_F64 = 2 };  // dtype of the state["step"] counters

// A scoped enum, not a struct: GCC vectorizes scalar loads and stores of it, while a
// struct copy is an aggregate copy that blocks vectorization (3× slower steps).
enum class bf16 : uint16_t {};
enum class half : uint16_t {};  // IEEE binary16 bits; converted by hand below, because
                                // GCC does not vectorize _Float16 conversions without AVX512-FP16

// Scalars of one bucket, computed on the host in float64 and rounded once.
// 1−β is computed in float64 too: in float32 from a rounded β it would cancel
// (β2 = 0.999 loses 1e-5 of 1−β2).
struct Hyper {
    float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay, step_size,
        bc2_sqrt, grad_scale_inv;
    int32_t amsgrad, maximize;
};

struct StepArgs {
    int64_t n_tensors;
    int32_t n_threads, param_dtype, state_format, param_update;
    Hyper h;
    void* const* params;
    void* const* grads;
    void* const* exp_avgs;
    void* const* exp_avg_sqs;
    void* const* max_exp_avg_sqs;
    void* const* extras;  // kahan_comp (param dtype) or master_param (float32)
    float* const* exp_avg_scales;
    float* const* exp_avg_sq_scales;
    float* const* max_exp_avg_sq_scales;
    void* const* steps;  // state["step"] scalars: incremented by the call (step_dtype)
    void* const* sr_seeds;  // per tensor, its state["sr_seed"] (an int64 scalar), read each step (formats.md)
    const int64_t* numels;
    int64_t* chunk_start;  // scratch, n_tensors + 1 entries
    int64_t step;          // the bucket's step t (1-based), keys stochastic rounding
    int32_t step_dtype;
};

// Eight float32 lanes and their bit patterns (GCC vector extensions): the step's
// arithmetic below is written once, as templates over float and f8 (simd.h).
typedef float f8 __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));

namespace {

// ---- conversions ------------------------------------------------------------------
inline uint32_t bits_of(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
#if defined(__AVX__)
inline u8v bits_of(f8 x) { return reinterpret_cast<u8v>(x); }
#endif
inline float float_of(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }

inline float to_f32(float x) { return x; }
inline float to_f32(bf16 h) { return float_of(uint32_t(h) << 16); }
inline float to_f32(half h) {
    const uint32_t x = uint32_t(h), sign = (x & 0x8000u) << 16, e = (x >> 10) & 0x1Fu, f = x & 0x3FFu;
    const float normal = float_of(sign | ((e + 112u) << 23) | (f << 13));
    const float special = float_of(sign | 0x7F800000u | (f << 13));  // inf, NaN
    const float sub = std::copysign(float(f) * 0x1p-24f, float_of(sign | 0x3F800000u));
    return e == 0 ? sub : (e == 31 ? special : normal);
}

template <class T> inline T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
template <> inline half from_f32<half>(float x) {  // round to nearest even, as the hardware
    const uint32_t u = bits_of(x), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    // Subnormal halves: adding 0.5f (ulp 2^-24) rounds |x| to a multiple of 2^-24, RNE.
    const uint32_t sub = bits_of(float_of(a) + 0.5f) - 0x3F000000u;
    const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;  // rebias, RNE
    const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN, or inf on overflow
    const uint32_t h = a >= 0x47800000u ? big : (a < 0x38800000u ? sub : normal);
    return half(uint16_t(h | sign));
}
// The few helpers where float/uint32_t and the 8-lane f8/u8v differ (simd.h runs the
// same templates on both).
inline uint32_t when(bool m, uint32_t v) { return m ? v : 0u; }
inline float float_from_small(uint32_t x) { return float(int32_t(x)); }  // x < 2^31
inline float abs_(float x) { return std::fabs(x); }
inline float floor_(float x) { return std::floor(x); }
inline float copysign_(float x, float s) { return std::copysign(x, s); }
#if defined(__AVX__)
typedef int32_t i8v __attribute__((vector_size(32)));
inline f8 float_of(u8v u) { return reinterpret_cast<f8>(u); }
inline u8v when(i8v m, uint32_t v) { return reinterpret_cast<u8v>(m) & v; }
inline f8 float_from_small(u8v x) { return __builtin_convertvector(reinterpret_cast<i8v>(x), f8); }
inline f8 abs_(f8 x) { return float_of(bits_of(x) & 0x7FFFFFFFu); }
inline f8 floor_(f8 x) { return _mm256_floor_ps(x); }
inline f8 copysign_(f8 x, f8 s) { return float_of((bits_of(x) & 0x7FFFFFFFu) | (bits_of(s) & 0x80000000u)); }
#endif
#if defined(__AVX512F__)
// Sixteen lanes: the int8 blocks of the AVX-512 builds (simd512.h) run the same templates
// on these.
typedef float f16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
inline u16v bits_of(f16v x) { return reinterpret_cast<u16v>(x); }
inline f16v float_of(u16v u) { return reinterpret_cast<f16v>(u); }
inline u16v when(i16v m, uint32_t v) { return reinterpret_cast<u16v>(m) & v; }
inline f16v float_from_small(u16v x) { return __builtin_convertvector(reinterpret_cast<i16v>(x), f16v); }
inline f16v abs_(f16v x) { return float_of(bits_of(x) & 0x7FFFFFFFu); }
inline f16v floor_(f16v x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF); }
inline f16v copysign_(f16v x, f16v s) { return float_of((bits_of(x) & 0x7FFFFFFFu) | (bits_of(s) & 0x80000000u)); }
#endif

// bf16 bits of x, not NaN, rounded to nearest even: u + 0x7FFF + lsb, written as
// u + 0x8000 − [lsb = 0]: the rounding bit without a shift, one vector op fewer in simd.h.
// Infinity stays, overflow becomes it.
template <class F> inline auto bf16_bits_not_nan(F x) {
    const auto u = bits_of(x);
    return (u + 0x8000u + when((u & 0x10000u) == 0u, 0xFFFFFFFFu)) >> 16;
}
// bf16 bits of x, as torch rounds: to nearest even, NaN kept (quieted). x != x rather
// than a test on the bits: AVX2 has no unsigned vector compare.
template <class F> inline auto bf16_bits(F x) {
    return x != x ? (bits_of(x) >> 16) | 0x40u : bf16_bits_not_nan(x);
}
template <> inline bf16 from_f32<bf16>(float x) { return bf16{uint16_t(bf16_bits(x))}; }

template <class St> inline float load(St x) { return to_f32(x); }
// Store x in slot's format and return the stored value: moments are used as stored.
template <class St> inline float stored(St& slot, float x) {
    const St s = from_f32<St>(x);
    slot = s;
    return to_f32(s);
}

// ---- the step's arithmetic ------------------------------------------------------------
struct Consts {
    float gsign, wd, beta2, omb1, omb2, beta1_lerp, eps, decay, neg_step, bc2_sqrt;
    bool has_wd, lerp_low;
    explicit Consts(const Hyper& h)
        : gsign(h.maximize ? -h.grad_scale_inv : h.grad_scale_inv), wd(h.weight_decay),
          beta2(h.beta2), omb1(h.one_minus_beta1), omb2(h.one_minus_beta2), beta1_lerp(h.beta1),
          eps(h.eps), decay(h.decay), neg_step(-h.step_size), bc2_sqrt(h.bc2_sqrt),
          has_wd(h.weight_decay != 0.f), lerp_low(omb1 < 0.5f) {}
};

// F is float or f8: one formula for the scalar loop and the 16-wide groups (simd.h).
inline float sqrt_(float x) { return std::sqrt(x); }
#if defined(__AVX__)
inline f8 sqrt_(f8 x) { return _mm256_sqrt_ps(x); }
#endif
#if defined(__AVX512F__)
inline f16v sqrt_(f16v x) { return _mm512_sqrt_ps(x); }
#endif

// g (unscaled, negated when maximizing) plus coupled decay λθ.
template <class F> inline F grad(const Consts& c, F g, F th) {
    const F gi = g * c.gsign;
    return c.has_wd ? gi + c.wd * th : gi;
}

// m + (1−β1)(g − m), in the two forms torch's lerp uses for accuracy.
template <class F> inline F lerp(const Consts& c, F m, F g) {
    return c.lerp_low ? m + c.omb1 * (g - m) : g - (g - m) * c.beta1_lerp;
}

// max as std::max(a, b): a unless a < b (so a NaN in a is kept).
template <class F> inline F max_(F a, F b) { return a < b ? b : a; }
template <class F> inline F min_(F a, F b) { return b < a ? b : a; }
// The running maximum of an int8 block's magnitudes (|m|, or v = β2·v̂ + (1−β2)·g², which
// is never −0 or below while rounding is to nearest; or NaN), as an unsigned max of their
// float32 bits: the same order as the numbers', with every NaN above ∞, so that a NaN
// reaches the block's absmax and its scale, as torch's amax does in the torch backend's
// encoder (a float max dropped it: the NaN was encoded as the top code, a finite value,
// and a NaN gradient vanished from the params). One instruction, as the float max.
template <class F> inline F magnitude_max(F acc, F x) {
    const auto a = bits_of(acc), b = bits_of(x);
    return float_of(a < b ? b : a);
}

// AMSGRAD's running max as torch.maximum: NaN if either is NaN (max_ kept the old max
// where a NaN gradient made v NaN).
template <class F> inline F max_nan(F a, F b) {
    const F m = a < b ? b : a;
    return b != b ? b : m;
}

// θ_new = decay·θ − step_size · m / (√v / √bc2 + ε), in two parts so that simd.h can
// pipeline them: the direction m / (√v / √bc2 + ε), then its application to θ.
// BC2_ONE: once √bc2 rounds to 1 in float32 (β2^t < 2^-24: after ~16,600 steps with
// β2 = 0.999, ~166,000 with 0.9999, 324 with 0.95), ÷√bc2 divides by 1, which is exact
// for every input, NaN and ±∞ included: dropping it changes no bit and frees the divider,
// which √ and the two divisions keep busy (2-7% faster steps at 16.8M params for bf16,
// kahan and int8, interleaved A/B on Zen 3; RESULTS.md).
template <bool BC2_ONE = false, class F> inline F direction(const Consts& c, F m, F v) {
    if constexpr (BC2_ONE) {
        return m / (sqrt_(v) + c.eps);
    } else {
        const F denom = sqrt_(v) / c.bc2_sqrt + c.eps;
        return m / denom;
    }
}
// f(std::true_type{}) where √bc2 is 1 in float32 (the BC2_ONE instantiations), else
// f(std::false_type{}): the one place that decides which path a call takes.
template <class Fn> inline auto with_bc2_one(const Consts& c, Fn f) {
    return c.bc2_sqrt == 1.f ? f(std::true_type{}) : f(std::false_type{});
}
template <class F> inline F apply(const Consts& c, F th, F d) { return th * c.decay + c.neg_step * d; }
template <class F> inline F update(const Consts& c, F th, F m, F v) {
    return apply(c, th, direction(c, m, v));
}

// ---- stochastic rounding ----------------------------------------------------------------
template <class U> inline U mix32(U x) {
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    x ^= x >> 15;
    return x;
}

// formats.md's 16 random bits of element i: one hash per pair of elements (i >> 1), its
// low half for the even element, its high half for the odd one. Half the hashes of one
// per element, and a hash gives 32 good bits: the 16-lane paths were 10% faster at 16.8M
// params (two integer multiplies per hash are most of stochastic rounding's extra work).
inline uint32_t sr_bits(int64_t i, uint32_t key) {
    return (mix32(uint32_t(i >> 1) ^ key) >> (16 * (i & 1))) & 0xFFFFu;
}

// bf16 bits of x rounded up or down with probability by the 16 dropped bits vs r's low 16.
template <class F, class U> inline U stochastic_bf16_bits(F x, U r) {
    return ((bits_of(x) + (r & 0xFFFFu)) & 0xFFFF0000u) >> 16;
}
inline bf16 round_stochastic(float x, uint32_t r, bf16*) {  // a NaN to nearest (formats.md)
    return bf16{uint16_t(x != x ? bf16_bits(x) : stochastic_bf16_bits(x, r))};
}
// x rounded stochastically to a float16 value, as float32 (so converting it is exact):
// 13 dropped bits against r's low 13, in the normal range or in steps of 2^-24 below it.
template <class F, class U> inline F stochastic_half_value(F x, U r) {
    const F normal = float_of((bits_of(x) + (r & 0x1FFFu)) & 0xFFFFE000u);
    const F k = floor_(abs_(x) * 0x1p24f + float_from_small(r & 0x1FFFu) * 0x1p-13f);
    const F sub = copysign_(k * 0x1p-24f, x);
    return abs_(x) >= 0x1p-14f ? normal : sub;
}
inline half round_stochastic(float x, uint32_t r, half*) {
    return from_f32<half>(stochastic_half_value(x, r));
}
inline float round_stochastic(float x, uint32_t, float*) { return x; }

// ---- param update policies: how θ is read, and written back ------------------------------
template <class P, int U>
inline float theta_eff(const P* p, const P* comp, const float* master, int64_t i) {
    if constexpr (U == KAHAN) return to_f32(p[i]) + to_f32(comp[i]);
    else if constexpr (U == MASTER) return master[i];
    else return to_f32(p[i]);
}

template <class P, int U>
inline void write_theta(P* p, P* comp, float* master, int64_t i, float x, uint32_t key,
                        int64_t base) {
    if constexpr (U == KAHAN) {
        const P r = from_f32<P>(x);
        p[i] = r;
        comp[i] = from_f32<P>(x - to_f32(r));
    } else if constexpr (U == MASTER) {
        master[i] = x;
        p[i] = from_f32<P>(x);
    } else if constexpr (U == STOCHASTIC) {
        p[i] = round_stochastic(x, sr_bits(base + i, key), static_cast<P*>(nullptr));
    } else {
        p[i] = from_f32<P>(x);
    }
}

// ---- int8 moments: block-scaled 8-bit floats (E4M3 signed m, E5M3 unsigned v) ----------
constexpr float M_MAX = 480.f;     // (8+7)·2^(15−7−3)
constexpr float V_MAX = 122880.f;  // (8+7)·2^(31−15−3)
constexpr float M_MIN_NORMAL = 0x1p-6f, V_MIN_NORMAL = 0x1p-14f;  // 2^(1−7), 2^(1−15)

// absmax is floored at M·2^-126 (formats.md): scale stays a normal float32 and M/absmax
// finite; otherwise a tiny block (long-decayed v) gets inv = inf and 0·inf = NaN codes.
struct Codec {
    float inv, scale;
    Codec(float absmax, float top) {
        const float a = std::max(absmax, top * 0x1p-126f);
        inv = top / a;
        scale = a / top;
    }
};

// The codec is written for float/uint32_t and for f8/u8v alike (simd.h encodes 16 codes
// at a time); these few helpers are where the two differ.
inline uint32_t trunc_u32(float x) { return uint32_t(int32_t(x)); }  // |x| < 2^31
#if defined(__AVX__)
// AVX2 converts float↔int32 only: through int32, which holds every value used here.
inline u8v trunc_u32(f8 x) { return reinterpret_cast<u8v>(__builtin_convertvector(x, i8v)); }
#endif
#if defined(__AVX512F__)
inline u16v trunc_u32(f16v x) { return reinterpret_cast<u16v>(__builtin_convertvector(x, i16v)); }
#endif

template <int B, class U> inline auto decode_magnitude(U c) {
    const U e = c >> 3, f = c & 7u;
    const auto normal = float_of((c << 20) + (uint32_t(127 - B) << 23));  // e+127−B, f
    const auto sub = float_from_small(f) * float_of(uint32_t(127 - B - 2) << 23);
    return e == 0u ? sub : normal;
}

// What the encoders may assume about every y = x·inv of a block (simd.h's int8_blocks
// picks one per block from its maxima and minima; the scalar loop takes ANY):
// ANY: nothing (NaN, ∞). FINITE: y finite and at most top·(1 + 2^-24)², which the map's
// rounding takes to top or below, so the cap is left out. NORMAL: FINITE, and every y at
// least the map's smallest normal 2^(1−B), so its subnormal path is left out too.
// (tools/check_int8_encoder.cpp checks each against formats.md on the y it allows.)
enum BlockRange { ANY, FINITE, NORMAL };

// y ≥ 0 rounded (to nearest even) onto the E?M3 map with bias B, capped at the value of
// code cmax (also for NaN and ∞; for R = ANY only, the other ranges need no cap and leave
// cmax unused): the magnitude as stored, without forming the code.
template <int B, BlockRange R = ANY, class F> inline F round_to_map(F y, uint32_t cmax) {
    // The map's grid near y has spacing 2^(E−3), E = y's exponent, and 2^(−B−2) below
    // the smallest normal 2^(1−B). Adding big = 1.5·2^(E+20) (E at least 1−B) puts that
    // spacing at big's last bit (which is 0, so a tie goes to the even grid point, as
    // formats.md's +0x7FFFF + lsb), so the float addition rounds y onto the grid and the
    // subtraction is exact. (For y ≥ 2^107, ∞ and NaN the exponent sum overflows and r is
    // garbage; the cap below replaces it.)
    constexpr uint32_t min_normal = uint32_t(128 - B) << 23;
    const auto e = bits_of(y) & 0x7F800000u;
    const auto e_grid = R == NORMAL ? e : (e > min_normal ? e : min_normal);
    const F big = float_of(e_grid + ((20u << 23) | 0x400000u));
    const F r = (y + big) - big;
    if constexpr (R != ANY) return r;
    // From halfway between the largest code's value (mantissa 7, odd: that tie rounds
    // up) and the next power of two, and for NaN and ∞: the largest code's value.
    const float top = decode_magnitude<B>(cmax);
    return y < float_of(bits_of(top) + 0x80000u) ? r : F{} + top;
}

// The code of a magnitude on the map: below 2^(1−B), r·2^(B+2) ∈ [0, 8); above, r's
// exponent and 3 mantissa bits, u >> 20 = 8·(E + 127) + f, rebiased to 8·(E + B) + f.
template <int B, BlockRange R = ANY, class F> inline auto code_of(F r) {
    if constexpr (R == NORMAL) return (bits_of(r) >> 20) - uint32_t(8 * (127 - B));
    else return r < float_of(uint32_t(128 - B) << 23) ? trunc_u32(r * float(1 << (B + 2)))
                                                 : (bits_of(r) >> 20) - uint32_t(8 * (127 - B));
}

// Codes in the low bits of uint32 lanes: sign in bit 7 for m (never on a zero code).
// The encoders also give the value as stored (what the decoder returns for that code),
// from their own intermediate results: the kernel uses moments as stored, and decoding
// each code again was a fifth of an int8 step (benchmarks/kernel_ablation.py).
template <BlockRange R = ANY, class F> inline auto encode_m_bits(F x, const Codec& k, F& stored_value) {
    const F xs = x * k.inv;  // |xs| = |x|·inv: rounding is symmetric
    const F mag = round_to_map<7, R>(abs_(xs), 127u);
    // Negative with a nonzero code: |xs| above 2^-10, half the smallest magnitude 2^-9
    // (the tie rounds to 0); false for NaN.
    const auto neg = xs < -0x1p-10f;
    stored_value = float_of(bits_of(mag) ^ when(neg, 0x80000000u)) * k.scale;
    return code_of<7, R>(mag) | when(neg, 128u);
}
template <class U> inline auto decode_m_bits(U q, float scale) {
    const auto x = decode_magnitude<7>(q & 127u) * scale;
    return (q & 128u) != 0u ? -x : x;
}
template <BlockRange R = ANY, class F> inline auto encode_v_bits(F x, const Codec& k, F& stored_value) {
    F mag = round_to_map<15, R>(x * k.inv, 255u);
    // A positive v that rounds to 0 takes the smallest code, 1 (value 2^-17): an element
    // whose m survives its block's scale would otherwise step by lr·m̂/ε. mag is never
    // NaN and every nonzero mag is ≥ 2^-17, so a max does it (vmaxps: 1.3% of an int8
    // step at 16.8M params on Zen 1, against 5% for testing mag == 0 too).
    // (NORMAL: every mag is at least 2^-14 already.)
    if constexpr (R != NORMAL) mag = max_(mag, float_of(when(x > 0.0f, bits_of(0x1p-17f))));
    stored_value = mag * k.scale;
    return code_of<15, R>(mag);
}
// NORMAL: every code q is at least 8 (int8_blocks checks a block's codes first).
template <BlockRange R = ANY, class U> inline auto decode_v_bits(U q, float scale) {
    if constexpr (R == NORMAL) return float_of((q << 20) + (uint32_t(127 - 15) << 23)) * scale;
    else return decode_magnitude<15>(q) * scale;
}

inline uint8_t encode_m(float x, const Codec& k, float& stored_value) {
    return uint8_t(encode_m_bits(x, k, stored_value));
}
inline float decode_m(uint8_t q, float scale) { return decode_m_bits(uint32_t(q), scale); }
inline uint8_t encode_v(float x, const Codec& k, float& stored_value) {
    return uint8_t(encode_v_bits(x, k, stored_value));
}
inline float decode_v(uint8_t q, float scale) { return decode_v_bits(uint32_t(q), scale); }

}  // namespace
