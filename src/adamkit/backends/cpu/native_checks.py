"""The step cache's per-tensor checks in C++ (checks.cpp): built, loaded, or left out.

A cached step checks, per tensor, that its plan still holds (step_cache.py). In Python
that costs about 3 us per tensor once a step has pushed the tensors' objects out of the
caches: 3.4 ms per step for 1024 tensors on a 2-core Zen 5, a third of a 16.8M-param
bfloat16 step. checks.cpp makes the same decisions in about a fifth of that time.

It is built against the installed torch's headers, so it cannot be built with the
kernels at install time (pip builds adamkit in an isolated environment, before torch
is installed). Instead it is compiled once per torch version into the cache directory
(``$ADAMKIT_CACHE`` or ``~/.cache/adamkit``, as the kernels' first-use build), in a
background thread, the first time a cached plan has ``MANY_TENSORS`` tensors or more;
steps use the Python checks until it has loaded, and from then on it (the build takes
10-15 s of one core). Below that size the Python checks cost well under a millisecond
and nothing is built; a library an earlier build left in the cache is loaded all the same
(milliseconds, looked for once per process): at 16.8M params in 64 tensors the step's
cost over its kernel was 0.09 ms against 0.28 with the Python checks for float32, 0.17
against 0.27 for bfloat16 (benchmarks/native_checks_ab.py --tensors 64, Zen 5). Wherever
the build or the load fails (no compiler, no headers, a torch it was not built for), the
Python checks stay: nothing else changes.

``ADAMKIT_NATIVE_CHECKS=0`` turns it off; ``=1`` builds it in the foreground at first
need (the benchmark, and tests, which must not race a background build). It is read when
a plan first asks for the checks: a plan that already took them keeps them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import sysconfig
import threading
from pathlib import Path

import torch

from . import library

HERE = Path(__file__).parent
VERSION = 8  # adamkit_checks_version() in checks.cpp
MANY_TENSORS = 128

_lock = threading.Lock()
_lib: ctypes.PyDLL | None = None
# or "not in the cache" (looked for below MANY_TENSORS), "building", "loaded", "failed: <why>"
_state = "not needed yet"


def status() -> str:
    """What the native checks are doing in this process (for reports and tests)."""
    if os.environ.get("ADAMKIT_NATIVE_CHECKS") == "0":
        return "off (ADAMKIT_NATIVE_CHECKS=0)"
    if not _gil_enabled():
        return "off (no GIL)"
    return _state


def _gil_enabled() -> bool:
    """checks.cpp reads lists' and dicts' borrowed items on torch's threads while the
    caller holds the GIL, which keeps every other thread from changing them; a
    free-threaded interpreter (3.13t, the GIL off) keeps the Python checks."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_enabled is None or is_enabled()


def get(n_tensors: int) -> ctypes.PyDLL | None:
    """The loaded library, or None; for a plan of ``n_tensors`` tensors, starts (or, with
    ADAMKIT_NATIVE_CHECKS=1, runs) the build the first time one is worth it."""
    setting = os.environ.get("ADAMKIT_NATIVE_CHECKS", "")
    if setting == "0" or sys.platform == "win32" or not _gil_enabled():
        return None
    if _lib is not None:
        return _lib
    if n_tensors < MANY_TENSORS:
        return _load_if_built() if _state == "not needed yet" else None
    with _lock:
        if _state not in ("not needed yet", "not in the cache"):
            return _lib
        _set_state("building")
    if setting == "1":
        _build_and_load()
    else:
        threading.Thread(target=_build_and_load, name="adamkit-native-checks", daemon=True).start()
    return _lib


def load_now() -> ctypes.PyDLL:
    """Build (if needed) and load in the foreground; raises with the reason on failure."""
    global _lib
    if _lib is None:
        try:
            _lib = _open(_build())
        except Exception as exc:
            _set_state(f"failed: {exc}")
            raise
        _set_state("loaded")
    return _lib


def _load_if_built() -> ctypes.PyDLL | None:
    """The library where an earlier build left it in the cache, loaded; else None, and
    ``get`` looks no more until a plan of MANY_TENSORS wants a build. Never raises: where
    the cache cannot be read or its file not loaded, status() says why and the Python
    checks stay (a build would find the same file: ``_build`` keeps an existing one)."""
    with _lock:
        if _state != "not needed yet":
            return _lib
        try:
            built = _target().exists()  # (the cache's root may not resolve: no home directory)
        except Exception as exc:  # noqa: BLE001  (any failure leaves the Python checks)
            _set_state(f"failed: {exc}")
            return None
        if not built:
            _set_state("not in the cache")
            return None
    try:
        return load_now()  # finds the file built: loads it, or says why it failed
    except Exception:  # noqa: BLE001
        return None


def _set_state(value: str) -> None:
    global _state
    _state = value


def _build_and_load() -> None:
    try:
        load_now()
    except Exception:  # noqa: BLE001  (any failure leaves the Python checks; status() says why)
        pass


def _compile_args() -> list[str]:
    """checks.cpp's compiler arguments, against this torch's own headers and libraries,
    where torch.utils.cpp_extension looks (importing that would pull setuptools into the
    training process)."""
    root = Path(torch.__file__).parent
    include, libs = root / "include", root / "lib"
    abi = int(getattr(torch, "compiled_with_cxx11_abi", lambda: True)())
    # -fopenmp: the OpenMP runtime torch loaded (its libgomp), whose threads the checks share
    return ["-std=c++20", "-O2", "-fopenmp", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
            f"-I{sysconfig.get_paths()['include']}", f"-I{include}", f"-I{include / 'torch/csrc/api/include'}",
            str(HERE / "checks.cpp"), f"-L{libs}", f"-Wl,-rpath,{libs}",
            "-ltorch_python", "-ltorch_cpu", "-lc10"]


def _target() -> Path:
    """The cached build's path, named by what it is built from: the source, the
    arguments (a changed flag is a new build, not the old one reused), torch, Python."""
    digest = hashlib.sha256((HERE / "checks.cpp").read_bytes())
    for part in (*_compile_args(), torch.__version__, str(torch.version.git_version), torch.__file__,
                 sys.version):
        digest.update(part.encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return library.cache_root() / f"checks-{digest.hexdigest()[:16]}{suffix}"


def _build() -> Path:
    """Compile checks.cpp against this torch into the cache."""
    target = _target()
    if target.exists():
        return target
    return library.compile_into(target, "checks.cpp", _compile_args())


def _open(path: Path) -> ctypes.PyDLL:
    lib = ctypes.PyDLL(str(path))  # PyDLL: called with the GIL held (it reads Python objects)
    if lib.adamkit_checks_version() != VERSION:
        raise RuntimeError(f"{path.name} is version {lib.adamkit_checks_version()}, expected {VERSION}")
    obj, ptr, c_int = ctypes.py_object, ctypes.c_void_p, ctypes.c_int
    i64 = ctypes.c_int64
    signatures = {
        "adamkit_scalar_type": [obj],
        "adamkit_list_is": [obj, ptr, i64],
        "adamkit_dict_is": [obj, ptr, ptr, i64],
        "adamkit_grads_present": [obj, ptr],
        "adamkit_state_ptrs_equal": [obj, obj, ptr, c_int, obj, ptr],
        "adamkit_refresh": [obj, c_int, ptr, ptr, ptr, ptr, ptr, c_int, obj],
        "adamkit_bump_versions": [obj],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, c_int
    return lib
