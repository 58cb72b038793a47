"""Builds the fused CPU kernels (adamkit/backends/cpu) at install time.

Four shared libraries from one source, one per instruction set; adamkit loads the best
one the CPU supports. They are plain C++ with OpenMP, called through ctypes on raw
pointers: no build against torch headers. Each is optional: where a compiler is missing
the install still succeeds and adamkit builds on first use into a cache, or falls back
to the portable torch backend with one warning.
"""

import runpy
from pathlib import Path

from setuptools import Extension, setup

KERNELS = "src/adamkit/backends/cpu"
# The flags library.py builds with on first use, from the one file both read (torch-free).
BUILD = runpy.run_path(str(Path(__file__).parent / KERNELS / "build_flags.py"))

setup(
    ext_modules=[
        Extension(
            f"adamkit.backends.cpu._adam_{isa}",
            sources=[f"{KERNELS}/adam_{isa}.cpp"],
            depends=[f"{KERNELS}/{h}" for h in ("adam.h", "common.h", "simd.h", "simd512.h")],
            language="c++",
            extra_compile_args=[*BUILD["COMPILE_FLAGS"], *flags, BUILD["digest_define"](Path(__file__).parent / KERNELS)],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
        for isa, flags in BUILD["ISA_FLAGS"].items()
    ]
)
