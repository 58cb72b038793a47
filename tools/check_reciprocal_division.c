/* Checks Markstein's theorem where benchmarks/kernel_ablation.py relies on it: for the
 * step's divisor b = √(1 − β2^t) (float32), x / b equals
 *     q = x·rb,  e = fma(−q, b, x),  q + e·rb     with rb = 1/b correctly rounded,
 * bit for bit, for every significand of x (x = √v, a normal float). The quotient's bits
 * depend only on the significands away from overflow and underflow, so three binades of
 * x cover the range. Divisors: β2 in ten values × t up to 3000, 3000 random b in (2^-10, 1],
 * and a few significand patterns (all ones, 1 + ulp).
 *
 *     gcc -O2 -mavx2 -mfma tools/check_reciprocal_division.c -o /tmp/chk -lm && /tmp/chk
 *
 * About 75 s on one core; prints every mismatch and the total (0 when the theorem holds). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long mismatches(float b, int exponent) {
    const __m256 vb = _mm256_set1_ps(b), rb = _mm256_set1_ps(1.0f / b);
    long bad = 0;
    for (uint32_t s = 0; s < (1u << 23); s += 8) {
        const uint32_t base = ((uint32_t)(exponent + 127) << 23) | s;
        const __m256 x = _mm256_castsi256_ps(
            _mm256_add_epi32(_mm256_set1_epi32((int)base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
        const __m256 q = _mm256_mul_ps(x, rb);
        const __m256 fused = _mm256_fmadd_ps(_mm256_fnmadd_ps(q, vb, x), rb, q);
        const __m256i same = _mm256_cmpeq_epi32(_mm256_castps_si256(_mm256_div_ps(x, vb)),
                                                _mm256_castps_si256(fused));
        bad += 8 - __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(same)));
    }
    return bad;
}

static long check(float b, const char* what) {
    const long bad = mismatches(b, 0) + mismatches(b, 20) + mismatches(b, -60);
    if (bad) printf("%s b=%a: %ld mismatches\n", what, b, bad);
    return bad;
}

int main(void) {
    long total = 0, divisors = 0;
    const double betas[] = {0.999, 0.99, 0.9, 0.95, 0.98, 0.9999, 0.5, 0.0, 0.3, 0.99999};
    for (int k = 0; k < 10; ++k)
        for (int t = 1; t <= 3000; t += t < 200 ? 1 : 37) {
            const float b = (float)sqrt(1.0 - pow(betas[k], t));
            if (b > 0) total += check(b, "beta2/t"), ++divisors;
        }
    srand(1);
    for (int k = 0; k < 3000; ++k) {
        const uint32_t u = ((uint32_t)(126 - rand() % 10) << 23) | ((uint32_t)rand() & 0x7FFFFF);
        float b;
        memcpy(&b, &u, 4);
        total += check(b, "random"), ++divisors;
    }
    const uint32_t patterns[] = {0x3F7FFFFF, 0x3F000001, 0x3F7FFFFE, 0x3F400000, 0x3F000000, 0x3F800000};
    for (int k = 0; k < 6; ++k) {
        float b;
        memcpy(&b, &patterns[k], 4);
        total += check(b, "pattern"), ++divisors;
    }
    printf("%ld divisors, %ld mismatches\n", divisors, total);
    return total != 0;
}
