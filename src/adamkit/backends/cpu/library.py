"""Finding, building and loading the native kernel library, and its ctypes argument block.

The library is normally built at install time (setup.py). If it is missing (no compiler
then, or a source checkout), it is built once on first use into a cache directory
(``$ADAMKIT_CACHE`` or ``~/.cache/adamkit``) keyed by a hash of the sources, and loaded
from there afterwards. Only the best instruction set the CPU supports is built then.
An installed build whose sources have changed since (editable installs: setuptools does
not rebuild them) is not run: the sources' build in the cache is, with a warning.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .build_flags import COMPILE_FLAGS, ISA_FLAGS, digest_define, source_digest

HERE = Path(__file__).parent
ABI_VERSION = 4
FLAGS = [*COMPILE_FLAGS, "-fPIC", "-shared"]


def _has_avx512_bf16() -> bool:
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    return bool(capabilities and capabilities().get("avx512_bf16", False))


def isa_candidates() -> list[str]:
    """Instruction sets this CPU runs, best first (torch's own detection)."""
    capability = torch.backends.cpu.get_cpu_capability()
    order = {"AVX512": ["avx512", "avx2"], "AVX2": ["avx2"]}.get(capability, [])
    if order[:1] == ["avx512"] and _has_avx512_bf16():
        order.insert(0, "avx512bf16")
    return order + ["generic"]


class Hyper(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_float)
        for name in ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "weight_decay",
                     "decay", "step_size", "bc2_sqrt", "grad_scale_inv")
    ] + [("amsgrad", ctypes.c_int32), ("maximize", ctypes.c_int32)]


POINTER_ROWS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "extras",
                "exp_avg_scales", "exp_avg_sq_scales", "max_exp_avg_sq_scales", "steps")
STEP_DTYPES = {None: 0, torch.float32: 1, torch.float64: 2}


class StepArgs(ctypes.Structure):
    _fields_ = [
        ("n_tensors", ctypes.c_int64),
        ("n_threads", ctypes.c_int32),
        ("param_dtype", ctypes.c_int32),
        ("state_format", ctypes.c_int32),
        ("param_update", ctypes.c_int32),
        ("h", Hyper),
        *[(row, ctypes.c_void_p) for row in POINTER_ROWS],
        ("sr_seeds", ctypes.c_void_p),
        ("numels", ctypes.c_void_p),
        ("chunk_start", ctypes.c_void_p),
        ("step", ctypes.c_int64),
        ("step_dtype", ctypes.c_int32),
    ]


def _installed_path(isa: str) -> Path | None:
    spec = importlib.util.find_spec(f"adamkit.backends.cpu._adam_{isa}")
    return Path(spec.origin) if spec and spec.origin else None


def cache_root() -> Path:
    """Where first-use builds go: ``$ADAMKIT_CACHE`` or ``~/.cache/adamkit``."""
    return Path(os.environ.get("ADAMKIT_CACHE") or Path.home() / ".cache" / "adamkit")


def _cache_dir() -> Path:
    return cache_root() / f"cpu-abi{ABI_VERSION}-{source_digest(HERE)}"


def compiler_path() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


# Builds run in a directory of their own beside the target. One whose process died (the
# background build of checks.cpp is a daemon thread, stopped mid-compile at exit) leaves
# it behind; the next build removes those that no build could still be using.
BUILD_PREFIX = ".build-"
STALE_BUILD_S = 3600.0


def _remove_stale_builds(parent: Path) -> None:
    now = time.time()
    for old in parent.glob(BUILD_PREFIX + "*"):
        try:
            if now - old.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # removed meanwhile by another process's build
            pass


def compile_into(target: Path, what: str, args: list[str]) -> Path:
    """Compile (the compiler, then ``args``, then ``-o``) into ``target`` unless it is
    there already, atomically: a killed build leaves no target, only a build directory
    that a later build removes. ``what`` names it in errors."""
    if target.exists():
        return target
    compiler = compiler_path()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler found to build {what}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target.parent)
    with tempfile.TemporaryDirectory(prefix=BUILD_PREFIX, dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        # CXX may hold a command with arguments ("ccache g++"), as make reads it
        done = subprocess.run([*shlex.split(compiler), *args, "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {what} failed: {done.stderr.strip()[-400:]}")
        os.replace(out, target)
    return target


def _built_path(isa: str) -> Path:
    return _cache_dir() / f"_adam_{isa}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"


def _build(isa: str) -> Path:
    """Compile one variant into the cache."""
    return compile_into(_built_path(isa), "the CPU kernels",
                        [*FLAGS, *ISA_FLAGS[isa], digest_define(HERE), str(HERE / f"adam_{isa}.cpp")])


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.adamkit_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path.name} has ABI {lib.adamkit_abi_version()}, expected {ABI_VERSION}")
    lib.adamkit_step.argtypes = [ctypes.POINTER(StepArgs)]
    lib.adamkit_step.restype = ctypes.c_int
    lib.adamkit_steps_equal.argtypes = [ctypes.POINTER(StepArgs), ctypes.c_double]
    lib.adamkit_steps_equal.restype = ctypes.c_int
    return lib


def _built_from(lib: ctypes.CDLL) -> str | None:
    """The source digest a build carries; None for one from before builds carried it."""
    try:
        digest = lib.adamkit_source_digest
    except AttributeError:
        return None
    digest.restype = ctypes.c_char_p
    return digest().decode()


def load() -> tuple[ctypes.CDLL | None, str, str | None]:
    """(library, its instruction set, None) or (None, "", why it is unavailable)."""
    if os.environ.get("ADAMKIT_DISABLE_CPU_KERNELS", "0") not in ("", "0"):  # =0: not disabled
        return None, "", "disabled by ADAMKIT_DISABLE_CPU_KERNELS"
    if sys.platform == "win32":
        return None, "", "the CPU kernels are built for Linux and macOS only"
    errors, stale = [], []
    try:
        digest = source_digest(HERE)
    except OSError as exc:  # a frozen or zipped install without the sources: an installed
        # build is then the kernel (nothing to be stale against), and nothing can be built
        digest = None
        errors.append(f"the kernel sources are not readable ({exc})")
    for isa in isa_candidates():
        path = _installed_path(isa)
        if path is not None and path.exists():
            try:
                lib = _open(path)
            except (OSError, RuntimeError, AttributeError) as exc:
                errors.append(f"{path.name}: {exc}")
                continue
            if digest is None or _built_from(lib) == digest:
                return lib, isa, None
            stale.append(path.name)
    if digest is None:
        return None, "", "; ".join(errors)
    isa = isa_candidates()[0]
    if stale:
        names = ", ".join(stale)
        errors.append(f"{names}: built from other sources than {HERE} holds")
        target = _cache_dir()
        warnings.warn(f"adamkit: the installed CPU kernels ({names}) were built from other sources than "
                      f"{HERE} holds (an editable install after an edit or a pull?), so they are not used; "
                      f"the '{isa}' kernels for these sources " + ("are" if _built_path(isa).exists() else
                      "are being built once") + f" in {target} instead (reinstalling adamkit rebuilds "
                      "the installed ones)", RuntimeWarning, stacklevel=2)
    for isa in isa_candidates():  # the best first; an older compiler may lack its flags
        try:
            return _open(_build(isa)), isa, None
        except (OSError, RuntimeError) as exc:
            errors.append(str(exc))
            if compiler_path() is None:  # every build fails alike
                break
    return None, "", "; ".join(errors)
