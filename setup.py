"""Builds the fused CPU kernels (adamkit/backends/cpu) at install time.

Four shared libraries from one source, one per instruction set; adamkit loads the best
one the CPU supports. They are plain C++ with OpenMP, called through ctypes on raw
pointers: no build against torch headers. Each is optional: where a compiler is missing
the install still succeeds and adamkit builds on first use into a cache, or falls back
to the portable torch backend with one warning.
"""

from setuptools import Extension, setup

FLAGS = ["-std=c++17", "-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
         "-ffp-contract=off"]
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
ISAS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": AVX512,
    "avx512bf16": AVX512 + ["-mavx512bf16"],  # bf16 rounding in hardware (simd.h)
}

setup(
    ext_modules=[
        Extension(
            f"adamkit.backends.cpu._adam_{isa}",
            sources=[f"src/adamkit/backends/cpu/adam_{isa}.cpp"],
            depends=["src/adamkit/backends/cpu/adam.h", "src/adamkit/backends/cpu/common.h",
                     "src/adamkit/backends/cpu/simd.h", "src/adamkit/backends/cpu/simd512.h"],
            language="c++",
            extra_compile_args=FLAGS + flags,
            extra_link_args=["-fopenmp"],
            optional=True,
        )
        for isa, flags in ISAS.items()
    ]
)
