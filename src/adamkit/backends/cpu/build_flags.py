"""The CPU kernels' compiler flags, one list for both builds: setup.py's at install time
(which runs without torch, so this file imports nothing) and library.py's on first use."""

# -ffp-contract=off: one rounding per operation on every instruction set (formats.md).
# -fno-math-errno: sqrtf vectorizes only without errno.
COMPILE_FLAGS = ["-std=c++17", "-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                 "-ffp-contract=off"]
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
ISA_FLAGS = {
    # AVX-512 with AVX512_BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids and later):
    # bf16 rounding in hardware (simd.h).
    "avx512bf16": AVX512 + ["-mavx512bf16"],
    "avx512": AVX512,
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}
