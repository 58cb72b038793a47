// The fused Adam step for CPU: one pass over memory per step, every tensor of a bucket
// in one call. Built as four shared libraries (adam_generic/avx2/avx512/avx512bf16.cpp
// include this file; build_flags.py gives each its -m flags) and one is loaded at run time for
// the CPU at hand. The loops are plain C++ that GCC vectorizes for each target.
//
// The math is adamkit/reference.py's; storage follows docs/design/formats.md:
//   P  param dtype: float, bf16, half
//   S  moment format: FP32, BF16 or INT8 (block-scaled 8-bit floats)
//   U  param update policy: NEAREST, KAHAN, MASTER, STOCHASTIC
// Compute is float32; moments enter the update as stored (encoded then decoded).

#include "common.h"
#include "simd.h"
#if defined(__SSE__)
#include <xmmintrin.h>  // _mm_getcsr, _mm_setcsr
#endif

namespace {

template <class P, int S, int U, bool AMSGRAD>
struct Step {
    // One contiguous run [lo, hi) of tensor t. For INT8, lo and hi are multiples of
    // BLOCK (or hi is the tensor's end), so every quantization block is whole.
    static void run(const StepArgs& a, int64_t t, int64_t lo, int64_t hi) {
        P* p = static_cast<P*>(a.params[t]);
        const P* g = static_cast<const P*>(a.grads[t]);
        void* m = a.exp_avgs[t];
        void* v = a.exp_avg_sqs[t];
        void* vmax = AMSGRAD ? a.max_exp_avg_sqs[t] : nullptr;
        P* comp = U == KAHAN ? static_cast<P*>(a.extras[t]) : nullptr;
        float* master = U == MASTER ? static_cast<float*>(a.extras[t]) : nullptr;
        // formats.md's per-step key: mix32(seed ^ mix32(t)), the seed's low 32 bits read
        // from the state tensor itself (a seed changed in place takes effect, as on the
        // full path).
        const uint32_t key = U == STOCHASTIC
            ? mix32(uint32_t(*static_cast<const int64_t*>(a.sr_seeds[t])) ^ mix32(uint32_t(a.step))) : 0u;
        const Consts c(a.h);
        if constexpr (S == INT8) {
            float mbuf[BLOCK], vbuf[BLOCK], xbuf[BLOCK];
            // The scalar block loop takes what int8_blocks leaves: a tensor's last, partial
            // block (every block in the generic build).
            int64_t b0 = lo;
#if defined(ADAMKIT_SIMD16)
            b0 = lo + (hi - lo) / BLOCK * BLOCK;
            with_bc2_one(c, [&](auto bc2_one) {
                int8_blocks<Int8Lanes<P>, P, U, AMSGRAD, decltype(bc2_one)::value>(
                    c, p, g, static_cast<uint8_t*>(m), a.exp_avg_scales[t], static_cast<uint8_t*>(v),
                    a.exp_avg_sq_scales[t], static_cast<uint8_t*>(vmax),
                    AMSGRAD ? a.max_exp_avg_sq_scales[t] : nullptr, comp, master, key, lo, b0);
            });
#endif
            for (; b0 < hi; b0 += BLOCK) {
                const int64_t n = hi - b0 < BLOCK ? hi - b0 : BLOCK;
                const int64_t blk = b0 / BLOCK;
                block(c, p + b0, g + b0, static_cast<uint8_t*>(m) + b0, a.exp_avg_scales[t] + blk,
                      static_cast<uint8_t*>(v) + b0, a.exp_avg_sq_scales[t] + blk,
                      AMSGRAD ? static_cast<uint8_t*>(vmax) + b0 : nullptr,
                      AMSGRAD ? a.max_exp_avg_sq_scales[t] + blk : nullptr,
                      comp ? comp + b0 : nullptr, master ? master + b0 : nullptr, key, b0, n,
                      mbuf, vbuf, xbuf);
            }
        } else {
            using St = std::conditional_t<S == FP32, float, bf16>;
            St* ms = static_cast<St*>(m);
            St* vs = static_cast<St*>(v);
            St* vm = static_cast<St*>(vmax);
            int64_t first = lo;  // the scalar loop takes what 16-wide groups leave
#if defined(ADAMKIT_SIMD16)
            // float32 params with float32 moments stay with GCC's loop: memory-bound, and
            // software prefetch made it slower (RESULTS.md).
            if constexpr (std::is_same_v<P, bf16> || std::is_same_v<P, half> || std::is_same_v<St, bf16>)
                first = with_bc2_one(c, [&](auto bc2_one) {
#if defined(ADAMKIT_SIMD512)
                    return run_w<P, St, U, AMSGRAD, decltype(bc2_one)::value>(c, p, g, ms, vs, vm, comp,
                                                                              master, key, lo, hi);
#else
                    return run16<P, St, U, AMSGRAD, decltype(bc2_one)::value>(c, p, g, ms, vs, vm, comp,
                                                                              master, key, lo, hi);
#endif
                });
#endif
#pragma omp simd
            for (int64_t i = first; i < hi; ++i) {
                const float th = theta_eff<P, U>(p, comp, master, i);
                const float gi = grad(c, to_f32(g[i]), th);
                const float mi = stored<St>(ms[i], lerp(c, load<St>(ms[i]), gi));
                float vi = stored<St>(vs[i], c.beta2 * load<St>(vs[i]) + c.omb2 * gi * gi);
                if constexpr (AMSGRAD) vi = stored<St>(vm[i], max_nan(load<St>(vm[i]), vi));
                write_theta<P, U>(p, comp, master, i, update(c, th, mi, vi), key, 0);
            }
        }
    }

    // One int8 block: decode, step, find the new block maxima, encode, then update the
    // params from the decoded (as stored) moments. Buffers are on the stack: no allocation.
    static void block(const Consts& c, P* p, const P* g, uint8_t* mq, float* msc, uint8_t* vq,
                      float* vsc, uint8_t* vmq, float* vmsc, P* comp, float* master, uint32_t key,
                      int64_t base, int64_t n, float* mbuf, float* vbuf, float* xbuf) {
        const float mscale = *msc, vscale = *vsc;
        uint32_t mabs = 0, vabs = 0;  // magnitude_max's bits (a NaN is kept)
#pragma omp simd reduction(max : mabs, vabs)
        for (int64_t i = 0; i < n; ++i) {
            const float th = theta_eff<P, U>(p, comp, master, i);
            xbuf[i] = th;
            const float gi = grad(c, to_f32(g[i]), th);
            const float mi = lerp(c, decode_m(mq[i], mscale), gi);
            const float vi = c.beta2 * decode_v(vq[i], vscale) + c.omb2 * gi * gi;
            mbuf[i] = mi;
            vbuf[i] = vi;
            mabs = std::max(mabs, bits_of(std::fabs(mi)));
            vabs = std::max(vabs, bits_of(vi));
        }
        const Codec mcod(float_of(mabs), M_MAX), vcod(float_of(vabs), V_MAX);
        *msc = mcod.scale;
        *vsc = vcod.scale;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            mq[i] = encode_m(mbuf[i], mcod, mbuf[i]);  // and the moments as stored
            vq[i] = encode_v(vbuf[i], vcod, vbuf[i]);
        }
        if constexpr (AMSGRAD) {
            const float vmscale = *vmsc;
            uint32_t xabs = 0;
#pragma omp simd reduction(max : xabs)
            for (int64_t i = 0; i < n; ++i) {
                const float x = max_nan(decode_v(vmq[i], vmscale), vbuf[i]);
                vbuf[i] = x;
                xabs = std::max(xabs, bits_of(x));
            }
            const Codec xcod(float_of(xabs), V_MAX);
            *vmsc = xcod.scale;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
                vmq[i] = encode_v(vbuf[i], xcod, vbuf[i]);
            }
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i)
            write_theta<P, U>(p, comp, master, i, update(c, xbuf[i], mbuf[i], vbuf[i]), key,
                              base);
    }
};

// The calling thread's floating-point mode (MXCSR: denormals flushed or not, rounding),
// for the OpenMP threads to run under. torch.set_flush_denormal sets it for the calling
// thread only, and a thread starts with its creator's: the pool's threads run under
// whatever mode the thread that first started them had (a test that flushed denormals
// around the first parallel step left them flushing for the rest of the process), while
// torch's single-threaded ops, and so the torch backend, follow the caller's.
struct FpMode {
#if defined(__SSE__)
    unsigned csr = _mm_getcsr();
    void apply() const { _mm_setcsr(csr); }
#else
    void apply() const {}
#endif
};

// All tensors of the bucket, split into chunks of whole blocks, chunks spread over threads.
template <class P, int S, int U, bool AMSGRAD>
void step_all(const StepArgs& a) {
    const int64_t nt = a.n_tensors;
    // chunk_start[t] = index of tensor t's first chunk (prefix sums, ≤ a few KB).
    int64_t total = 0;
    for (int64_t t = 0; t < nt; ++t) {
        a.chunk_start[t] = total;
        total += (a.numels[t] + CHUNK - 1) / CHUNK;
    }
    a.chunk_start[nt] = total;
    const FpMode caller;
#pragma omp parallel num_threads(a.n_threads) if (total > 1)
    {
        const FpMode own;  // restored below: later work on this thread keeps its mode
        caller.apply();
        const int nth = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t first = total * me / nth, last = total * (me + 1) / nth;
        int64_t t = std::upper_bound(a.chunk_start, a.chunk_start + nt + 1, first) - a.chunk_start - 1;
        for (int64_t k = first; k < last; ++k) {
            while (k >= a.chunk_start[t + 1]) ++t;
            const int64_t lo = (k - a.chunk_start[t]) * CHUNK;
            const int64_t hi = std::min(lo + CHUNK, a.numels[t]);
            Step<P, S, U, AMSGRAD>::run(a, t, lo, hi);
        }
        own.apply();
    }
}

template <class P, int S, int U>
void pick_amsgrad(const StepArgs& a) {
    if (a.h.amsgrad) step_all<P, S, U, true>(a);
    else step_all<P, S, U, false>(a);
}

template <class P, int S>
int pick_update(const StepArgs& a) {
    if constexpr (std::is_same_v<P, float>) {
        if (a.param_update != NEAREST) return ERR_UPDATE;  // float32 params: nearest only
        pick_amsgrad<P, S, NEAREST>(a);
    } else {
        switch (a.param_update) {
            case NEAREST: pick_amsgrad<P, S, NEAREST>(a); break;
            case KAHAN: pick_amsgrad<P, S, KAHAN>(a); break;
            case MASTER: pick_amsgrad<P, S, MASTER>(a); break;
            case STOCHASTIC: pick_amsgrad<P, S, STOCHASTIC>(a); break;
            default: return ERR_UPDATE;
        }
    }
    return 0;
}

template <class P>
int pick_state(const StepArgs& a) {
    switch (a.state_format) {
        case FP32: return pick_update<P, FP32>(a);
        case BF16: return pick_update<P, BF16>(a);
        case INT8: return pick_update<P, INT8>(a);
        default: return ERR_STATE;
    }
}

int run(const StepArgs& a) {
    switch (a.param_dtype) {
        case DT_F32: return pick_state<float>(a);
        case DT_BF16: return pick_state<bf16>(a);
        case DT_F16: return pick_state<half>(a);
        default: return ERR_DTYPE;
    }
}

// The step counters live in one scalar tensor per param (torch's layout); adding 1 to
// each from Python costs more than the whole update of 1024 small tensors.
template <class T> bool steps_equal(const StepArgs& a, double value) {
    for (int64_t t = 0; t < a.n_tensors; ++t)
        if (double(*static_cast<const T*>(a.steps[t])) != value) return false;
    return true;
}
template <class T> void increment_steps(const StepArgs& a) {
    for (int64_t t = 0; t < a.n_tensors; ++t) *static_cast<T*>(a.steps[t]) += T(1);
}

int step(const StepArgs& a) {
    if (a.step_dtype != STEP_NONE && a.step_dtype != STEP_F32 && a.step_dtype != STEP_F64)
        return ERR_STEP_DTYPE;
    const int status = run(a);
    if (status != 0) return status;
    if (a.step_dtype == STEP_F32) increment_steps<float>(a);
    if (a.step_dtype == STEP_F64) increment_steps<double>(a);
    return 0;
}

}  // namespace

// The sources this build was compiled from (build_flags.source_digest: setup.py and
// library.py define it), so that adamkit runs no build its sources have moved past.
#ifndef ADAMKIT_SOURCE_DIGEST
#define ADAMKIT_SOURCE_DIGEST ""
#endif

extern "C" {
int adamkit_abi_version() { return ABI_VERSION; }
const char* adamkit_source_digest() { return ADAMKIT_SOURCE_DIGEST; }
// Runs the bucket, then adds 1 to every step counter (all or nothing: a bad argument
// block is rejected before anything is written).
int adamkit_step(const StepArgs* a) { return step(*a); }
// 1 when every step counter of the bucket equals `value`: a cached plan's check that
// nobody changed them since the last step.
int adamkit_steps_equal(const StepArgs* a, double value) {
    if (a->step_dtype == STEP_F32) return steps_equal<float>(*a, value);
    if (a->step_dtype == STEP_F64) return steps_equal<double>(*a, value);
    return 0;
}
}
