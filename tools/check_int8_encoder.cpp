// The CPU kernel's int8 encoders (common.h: encode_m_bits, encode_v_bits, on float and
// on 8 lanes, for any block and for the x the finite and normal blocks of common.h's
// BlockRange hold) against docs/design/formats.md's encode, written here step by step as the
// page states it, for every float32 bit pattern x and several block maxima: the code
// and the value as stored (±value(c)·scale) must be equal bit for bit. Also the 16-lane
// m decoder (simd.h: decode_m16, through F16C) for every code, in both lane orders, and
// the v decoder of blocks without a code below 8 (and simd.h's test for such a block).
//
// The kernel rounds onto the code map by a float addition (round_to_map) instead of the
// page's two integer paths; this is the proof that the two agree everywhere, not only
// on the values a test happens to draw.
//
//   g++ -std=c++17 -O2 -fno-math-errno -fno-trapping-math -ffp-contract=off -mavx2 -mfma \
//       -mf16c -Isrc/adamkit/backends/cpu tools/check_int8_encoder.cpp -o /tmp/check && /tmp/check
//
// An optional argument k checks every k-th bit pattern only, plus a fixed list of edge
// values (tests/test_cpu_backend.py runs k = 257; the whole check takes about 25 minutes
// on one core). Exit status 1 on a mismatch.
//
// Why this covers every block: the code depends on x only through y = |x|·inv (m) or
// x·inv (v), and the value as stored only on the code and the scale. With the block
// maxima 480 (m) and 122880 (v), inv = 1, so y runs through every float32 pattern; the
// other maxima check the inv and scale multiplications around it.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common.h"
#include "simd.h"

namespace spec {

// value(c) = F·2^(−b−2) if E == 0 else (8 + F)·2^(E−b−3)
float value(uint32_t c, int b) {
    const uint32_t e = c >> 3, f = c & 7u;
    return e == 0 ? std::ldexp(float(f), -b - 2) : std::ldexp(float(8 + f), int(e) - b - 3);
}

uint32_t code(float y, int b, uint32_t cmax) {
    uint32_t c;
    if (y < std::ldexp(1.f, 1 - b)) {
        c = uint32_t(std::nearbyint(y * std::ldexp(1.f, b + 2)));  // half to even
    } else {
        uint32_t u = bits_of(y);
        u += 0x7FFFFu + ((u >> 20) & 1u);
        c = ((((u >> 23) - 127u + uint32_t(b)) << 3) | ((u >> 20) & 7u));
    }
    return c < cmax ? c : cmax;
}

uint32_t encode_m(float x, const Codec& k, float& stored) {
    const uint32_t c = code(std::fabs(x) * k.inv, 7, 127u);
    const bool neg = x < 0.f && c > 0;
    stored = neg ? -(value(c, 7) * k.scale) : value(c, 7) * k.scale;
    return c | (neg ? 128u : 0u);
}

uint32_t encode_v(float x, const Codec& k, float& stored) {
    uint32_t c = code(x * k.inv, 15, 255u);
    if (x > 0.f && c == 0) c = 1;  // a positive v never encodes to 0
    stored = value(c, 15) * k.scale;
    return c;
}

}  // namespace spec

long mismatches = 0;

void report(char which, float absmax, float x, uint32_t want, float want_value, uint32_t got,
            float got_value, const char* path) {
    if (mismatches++ < 10)
        std::printf("%c absmax=%a x=%a (%s): code %u value %a, formats.md: code %u value %a\n",
                    which, absmax, x, path, got, got_value, want, want_value);
}

// Reports unless the code and the value as stored are formats.md's.
void expect(char which, float absmax, float x, uint32_t want, float want_value, uint32_t got,
            float got_value, const char* path) {
    if (got != want || bits_of(got_value) != bits_of(want_value))
        report(which, absmax, x, want, want_value, got, got_value, path);
}

// Where the recipe branches, rounds a tie, or caps, each ±1 ulp, whatever the stride:
// ±0, ±∞, NaNs of both signs, float32 subnormals, every code's value and the midpoints
// between neighbouring codes (both maps, times the scale of the block under test).
std::vector<uint32_t> edge_values(float scale) {
    std::vector<uint32_t> out = {0u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u,
                                 0xFFC00000u, 0x7F800001u, 0xFFFFFFFFu, 1u, 0x807FFFFFu};
    for (int b : {7, 15}) {
        for (uint32_t c = 0; c < 256; ++c) {
            const float here = spec::value(c, b), next = spec::value(c + 1, b);
            for (float y : {here, (here + next) / 2, std::ldexp(1.f, 1 - b), std::ldexp(1.f, -b - 3)}) {
                for (float x : {y * scale, -y * scale}) {
                    for (int d = -1; d <= 1; ++d) out.push_back(bits_of(x) + uint32_t(d));
                }
            }
        }
    }
    return out;
}

template <bool M>
void check(float absmax, uint64_t stride) {
    const Codec k(absmax, M ? M_MAX : V_MAX);
    std::vector<uint32_t> edges = edge_values(k.scale);
    while (edges.size() % 8) edges.push_back(0u);
    const uint64_t n_edges = edges.size() / 8;
    for (uint64_t step = 0, base = 0; base < (1ull << 32); ++step) {
        u8v bits;
        if (step < n_edges) {
            for (int j = 0; j < 8; ++j) bits[j] = edges[8 * step + j];
        } else {
            for (int j = 0; j < 8; ++j) bits[j] = uint32_t(base + j * stride);
            base += 8 * stride;
        }
        const f8 x = float_of(bits);
        f8 lanes_value, finite_value, normal_value;
        const u8v lanes = M ? encode_m_bits(x, k, lanes_value) : encode_v_bits(x, k, lanes_value);
        const u8v finite = M ? encode_m_bits<FINITE>(x, k, finite_value) : encode_v_bits<FINITE>(x, k, finite_value);
        const u8v normal = M ? encode_m_bits<NORMAL>(x, k, normal_value) : encode_v_bits<NORMAL>(x, k, normal_value);
        for (int j = 0; j < 8; ++j) {
            // v ≥ 0: a negative v is never encoded (−0 and NaNs of either sign are).
            if (!M && (bits[j] >> 31) && bits[j] != 0x80000000u && x[j] == x[j]) continue;
            float want_value, got_value;
            const uint32_t want = M ? spec::encode_m(x[j], k, want_value) : spec::encode_v(x[j], k, want_value);
            const char which = M ? 'm' : 'v';
            uint32_t got = M ? encode_m_bits(x[j], k, got_value) : encode_v_bits(x[j], k, got_value);
            expect(which, absmax, x[j], want, want_value, got, got_value, "float");
            expect(which, absmax, x[j], want, want_value, lanes[j], lanes_value[j], "8 lanes");
            // FINITE (BlockRange): every x a block of this maximum holds.
            if (!(std::fabs(x[j]) <= absmax)) continue;
            got = M ? encode_m_bits<FINITE>(x[j], k, got_value) : encode_v_bits<FINITE>(x[j], k, got_value);
            expect(which, absmax, x[j], want, want_value, got, got_value, "float, FINITE");
            expect(which, absmax, x[j], want, want_value, finite[j], finite_value[j], "8 lanes, FINITE");
            // NORMAL: and x·inv at least the map's smallest normal.
            if (!(std::fabs(x[j]) * k.inv >= (M ? 0x1p-6f : 0x1p-14f))) continue;
            got = M ? encode_m_bits<NORMAL>(x[j], k, got_value) : encode_v_bits<NORMAL>(x[j], k, got_value);
            expect(which, absmax, x[j], want, want_value, got, got_value, "float, NORMAL");
            expect(which, absmax, x[j], want, want_value, normal[j], normal_value[j], "8 lanes, NORMAL");
        }
    }
}

// The FINITE and NORMAL encoders at the largest element of a finite block, ±absmax, for every
// stride-th positive finite float32 absmax and the edges (powers of two, the codec's
// floor, FLT_MAX): where x·inv comes closest to the cap, whatever top/absmax rounds to.
void check_block_maxima(uint64_t stride) {
    std::vector<uint32_t> maxima = {1u, 0x7F7FFFFFu, 0x7F7FFFFEu};
    for (uint32_t e = 1; e < 255; ++e)
        for (int d = -2; d <= 2; ++d) maxima.push_back((e << 23) + uint32_t(d));
    for (float top : {M_MAX, V_MAX})
        for (int d = -2; d <= 2; ++d) maxima.push_back(bits_of(top * 0x1p-126f) + uint32_t(d));
    // The edges, then every stride-th pattern (not stored: 2^31 of them at stride 1).
    const uint64_t n_edges = maxima.size();
    for (uint64_t t = 0, u = 1; t < n_edges || u < 0x7F800000u; ++t) {
        const uint32_t a_bits = t < n_edges ? maxima[t] : uint32_t(u);
        if (t >= n_edges) u += stride;
        const float a = float_of(a_bits);
        if (!(a > 0.f && a < INFINITY)) continue;
        const Codec km(a, M_MAX), kv(a, V_MAX);
        for (float x : {a, -a}) {
            float want_value, got_value;
            uint32_t want = spec::encode_m(x, km, want_value);
            uint32_t got = encode_m_bits<FINITE>(x, km, got_value);
            expect('m', a, x, want, want_value, got, got_value, "block maximum, FINITE");
            got = encode_m_bits<NORMAL>(x, km, got_value);  // (a block maximum below the floor: no)
            if (std::fabs(x) * km.inv >= 0x1p-6f) expect('m', a, x, want, want_value, got, got_value, "block maximum, NORMAL");
            if (x < 0.f) continue;
            want = spec::encode_v(x, kv, want_value);
            got = encode_v_bits<FINITE>(x, kv, got_value);
            expect('v', a, x, want, want_value, got, got_value, "block maximum, FINITE");
            got = encode_v_bits<NORMAL>(x, kv, got_value);
            if (x * kv.inv >= 0x1p-14f) expect('v', a, x, want, want_value, got, got_value, "block maximum, NORMAL");
        }
    }
}

// Every m code, 16 at a time, in both lane orders, against ±value(c)·scale.
template <class L>
void check_decode_m16(L layout, const int* lane_element, float scale) {
    for (int c0 = 0; c0 < 256; c0 += 16) {
        uint8_t q[16];
        for (int j = 0; j < 16; ++j) q[j] = uint8_t(c0 + j);
        const Half16 x = decode_m16(layout, q, scale);
        for (int j = 0; j < 16; ++j) {
            const uint32_t code = q[lane_element[j]];
            const float magnitude = spec::value(code & 127u, 7) * scale;
            const float want = code & 128u ? -magnitude : magnitude;
            const float got = j < 8 ? x.lo[j] : x.hi[j - 8];
            // (A NaN scale or 0·∞ gives NaN, whose sign IEEE 754 leaves open.)
            if (bits_of(got) != bits_of(want) && !(got != got && want != want))
                report('d', scale, float(code), code, want, code, got, "decode_m16");
        }
    }
}

// decode_v_bits<NORMAL> (no subnormal path) for every code from 8, and codes_at_least_8,
// which picks it for a block, with one low code at every position.
void check_normal_v_decode() {
    for (float scale : {1.f, 0x1p-126f, 3.7e-3f, 1e37f, 3.4e38f, 1e-45f, INFINITY, NAN}) {
        for (uint32_t c = 8; c < 256; ++c) {
            const float want = spec::value(c, 15) * scale, got = decode_v_bits<NORMAL>(c, scale);
            if (bits_of(got) != bits_of(want) && !(got != got && want != want))
                report('d', scale, float(c), c, want, c, got, "decode_v_bits<NORMAL>");
        }
    }
    alignas(32) uint8_t q[BLOCK];
    for (int j = 0; j < BLOCK; ++j) {
        for (uint32_t c = 0; c < 256; ++c) {
            for (int i = 0; i < BLOCK; ++i) q[i] = uint8_t(255 - (i % 200));
            q[j] = uint8_t(c);
            if (codes_at_least_8(q) != (c >= 8)) report('b', 0.f, float(j), c >= 8, 0.f, !(c >= 8), 0.f, "codes_at_least_8");
        }
    }
}

int main(int argc, char** argv) {
    const int unpacked[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
    const int in_order[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (float scale : {1.f, 0x1p-126f, 3.7e-3f, 1e37f, 3.4e38f, 1e-45f, INFINITY, NAN}) {
        check_decode_m16(Unpacked{}, unpacked, scale);
        check_decode_m16(InOrder{}, in_order, scale);
    }
    const uint64_t stride = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1;
    // Block maxima: code-map maxima (inv = 1), ordinary, tiny, huge, below the floor, zero.
    const float absmaxes[] = {480.f, 122880.f, 1.0f, 3.3e-20f, 7.1e37f, 1e-38f, 0.f};
    for (float a : absmaxes) {
        check<true>(a, stride);
        check<false>(a, stride);
    }
    check_block_maxima(stride);
    check_normal_v_decode();
    std::printf("int8 encoders (and decode_m16) vs formats.md, edge values and every %llu-th float32 x, %zu block maxima (and every %llu-th at ±absmax): %ld mismatches\n",
                (unsigned long long)stride, sizeof(absmaxes) / sizeof(float), (unsigned long long)stride, mismatches);
    return mismatches != 0;
}
