"""The CPU kernels' compiler flags and source digest, one definition for both builds:
setup.py's at install time (which runs without torch, so this file imports only the
standard library) and library.py's on first use."""

import hashlib
from pathlib import Path

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

# Every file a kernel build reads: the headers and the per-ISA translation units.
SOURCES = ("adam.h", "common.h", "simd.h", "simd512.h", *(f"adam_{isa}.cpp" for isa in ISA_FLAGS))


def source_digest(directory) -> str:
    """What a kernel build is built from: its sources' bytes, the shared flags and every
    instruction set's own. Each build carries it (``adamkit_source_digest()``, from
    ``digest_define``), so a stale build (an editable install after an edit or a pull:
    setuptools does not rebuild) is recognised instead of run; first-use builds are
    cached under it."""
    digest = hashlib.sha256(" ".join(COMPILE_FLAGS).encode())
    digest.update(repr(sorted(ISA_FLAGS.items())).encode())
    for name in SOURCES:
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()[:16]


def digest_define(directory) -> str:
    return f'-DADAMKIT_SOURCE_DIGEST="{source_digest(directory)}"'
