"""The native CPU backend: loading, fallback, thread-independence, routing, memory.

Its numbers are checked where every backend's are: test_backend_parity.py (against the
reference, hypothesis) and test_parity_torch.py (against torch.optim, 100+ steps).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import adamkit
from adamkit.backends import cpu
from adamkit.backends.cpu import build_flags, library
from helpers import assert_close_scaled, needs_gxx_avx2
from registry import REFERENCE_TOL

needs_kernels = pytest.mark.skipif(
    cpu.BACKEND.unavailable_reason() is not None,
    reason=f"CPU kernels unavailable: {cpu.BACKEND.unavailable_reason()}",
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
    )


@needs_kernels
def test_auto_picks_cpu_with_best_isa():
    opt = adamkit.Adam([torch.nn.Parameter(torch.ones(3))])
    from adamkit import backends

    assert backends.resolve("auto", torch.device("cpu"), torch.float32) is cpu.BACKEND
    assert cpu.BACKEND.isa == library.isa_candidates()[0]
    assert opt.param_groups[0]["backend"] == "auto"


@pytest.mark.parametrize("capability, bf16, expected", [
    ("AVX512", True, ["avx512bf16", "avx512", "avx2", "generic"]),
    ("AVX512", False, ["avx512", "avx2", "generic"]),
    ("AVX2", True, ["avx2", "generic"]),  # AVX512_BF16 without AVX-512 is not a thing
    ("DEFAULT", False, ["generic"]),
])
def test_isa_candidates_follow_torchs_detection(monkeypatch, capability, bf16, expected):
    """The AVX512_BF16 build comes first only where torch reports both AVX-512 and the
    extension (its instructions would fault elsewhere); without torch.cpu.get_capabilities
    (torch < 2.8) it is never chosen."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": bf16}, raising=False)
    assert library.isa_candidates() == expected
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert "avx512bf16" not in library.isa_candidates()


def test_float64_goes_to_torch_silently(recwarn):
    from adamkit import backends

    assert backends.resolve("auto", torch.device("cpu"), torch.float64) is backends.BACKENDS["torch"]
    assert not [w for w in recwarn if "adamkit" in str(w.message)]


def test_float64_on_an_explicit_cpu_backend_warns_once_and_runs_on_torch():
    """backend="cpu" asked for by name, for a dtype its kernels do not run: one
    RuntimeWarning naming why, then the torch backend's numbers (torch.optim's)."""
    import warnings

    from adamkit import backends

    backends.resolve.cache_clear()
    backends._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mine = [torch.nn.Parameter(torch.linspace(-1, 1, 7, dtype=torch.float64)) for _ in range(2)]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
        opt, ref = adamkit.Adam(mine, backend="cpu"), torch.optim.Adam(theirs, foreach=True)
        for _ in range(3):
            for p, q in zip(mine, theirs):
                p.grad = q.grad = torch.cos(p.detach() * 3)
            opt.step()
            ref.step()
    messages = [str(w.message) for w in caught if "adamkit" in str(w.message)]
    assert messages == ["adamkit: backend 'cpu' unusable here (it does not run torch.float64 on cpu); "
                        "using 'torch'"]
    assert all(torch.equal(p, q) for p, q in zip(mine, theirs))


FALLBACK = """
    import json, warnings, torch, adamkit
    warnings.simplefilter("always")
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        for name in ("auto", "cpu", "torch"):
            torch.manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(3, 4).bfloat16())]
            opt = adamkit.Adam(ps, lr=0.1, backend=name)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()
            results[name] = [p.float().sum().item() for p in ps]
    print(json.dumps({"results": results, "warnings": [str(w.message) for w in caught]}))
"""


def test_fallback_without_kernels_warns_once_and_runs_torch():
    """Kernels that cannot load: the portable backend runs, with one warning per reason."""
    done = _python(FALLBACK, ADAMKIT_DISABLE_CPU_KERNELS="1")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["results"]["auto"] == out["results"]["torch"] == out["results"]["cpu"]
    auto = [w for w in out["warnings"] if "backend 'cpu' unavailable" in w]
    explicit = [w for w in out["warnings"] if "backend 'cpu' unusable" in w]
    # Two dtypes, two choices of backend: still one warning each.
    assert len(auto) == 1 and len(explicit) == 1, out["warnings"]
    assert "ADAMKIT_DISABLE_CPU_KERNELS" in auto[0]


def _installed_builds() -> dict[str, Path]:
    paths = {isa: library._installed_path(isa) for isa in library.ISA_FLAGS}
    return {isa: p for isa, p in paths.items() if p is not None and p.exists()}


def test_installed_builds_carry_their_sources_digest():
    """Every build setup.py installed names the sources it was compiled from, and they are
    the sources beside it (a fresh install: this fails on a stale editable one)."""
    builds = _installed_builds()
    if not builds:
        pytest.skip("no installed kernel builds (installed without a compiler)")
    digest = library.source_digest(library.HERE)
    for isa, path in builds.items():
        if isa in library.isa_candidates():  # loadable here: the others' ISA may fault
            assert library._built_from(library._open(path)) == digest, isa
        assert digest.encode() in path.read_bytes(), isa


def test_source_digest_follows_every_source_file(tmp_path):
    for name in build_flags.SOURCES:
        (tmp_path / name).write_text("// one\n")
    before = library.source_digest(tmp_path)
    for name in build_flags.SOURCES:
        (tmp_path / name).write_text("// two\n")
        assert library.source_digest(tmp_path) != before, name
        (tmp_path / name).write_text("// one\n")
    assert library.source_digest(tmp_path) == before


def test_source_digest_follows_every_instruction_sets_flags(monkeypatch):
    """A flag changed for one instruction set is another build: the installed or cached
    build of the old flags is not reused (its digest left the per-ISA flags out)."""
    before = library.source_digest(library.HERE)
    for isa in build_flags.ISA_FLAGS:
        monkeypatch.setitem(build_flags.ISA_FLAGS, isa, [*build_flags.ISA_FLAGS[isa], "-fno-tree-vectorize"])
        assert library.source_digest(library.HERE) != before, isa
        monkeypatch.undo()
    assert library.source_digest(library.HERE) == before


@needs_kernels
def test_a_failed_build_falls_back_to_the_next_instruction_set(monkeypatch, tmp_path):
    """Only the best instruction set's build was tried: a compiler without its flags (an
    older GCC lacking -mavx512bf16) left the torch backend where the next build works."""
    candidates = library.isa_candidates()
    if len(candidates) < 2 or library._installed_path(candidates[1]) is None:
        pytest.skip("one instruction set here, or no installed build of the second")
    installed = library._installed_path
    monkeypatch.setattr(library, "_installed_path", lambda isa: None)
    tried = []

    def build(isa):
        tried.append(isa)
        if isa == candidates[0]:
            raise RuntimeError("building the CPU kernels failed: unknown flag")
        return installed(isa)  # the next one's installed build, as its compile would give

    monkeypatch.setattr(library, "_build", build)
    lib, isa, reason = library.load()
    assert tried == candidates[:2] and isa == candidates[1]
    assert lib is not None and reason is None


@needs_kernels
def test_stale_installed_build_is_not_run(monkeypatch, tmp_path):
    """An installed build from other sources (an editable install after a pull: setuptools
    does not rebuild it) is skipped with one warning, for the sources' own first-use build."""
    monkeypatch.setattr(library, "source_digest", lambda directory: "0123456789abcdef")
    monkeypatch.setenv("ADAMKIT_CACHE", str(tmp_path))
    built = []

    def build(isa):  # stands in for the compile (tested below): the installed file
        built.append(isa)
        return library._installed_path(isa)

    monkeypatch.setattr(library, "_build", build)
    with pytest.warns(RuntimeWarning, match="built from other sources") as caught:
        lib, isa, reason = library.load()
    assert built == [library.isa_candidates()[0]] == [isa]
    assert reason is None and lib is not None
    assert len(caught) == 1 and "cpu-abi" in str(caught[0].message)
    assert "being built once" in str(caught[0].message)


def test_build_without_a_digest_counts_as_stale():
    class OldBuild:  # a ctypes library from before builds carried the digest
        pass

    assert library._built_from(OldBuild()) is None


def test_failed_build_is_a_reason_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(library, "_installed_path", lambda isa: None)
    monkeypatch.setenv("ADAMKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    lib, isa, reason = library.load()
    assert lib is None and isa == ""
    assert "building the CPU kernels failed" in reason


@pytest.mark.slow
def test_build_on_first_use_into_cache(monkeypatch, tmp_path):
    """Without an installed build the kernel is compiled once into the cache, then reused."""
    monkeypatch.setattr(library, "_installed_path", lambda isa: None)
    monkeypatch.setenv("ADAMKIT_CACHE", str(tmp_path))
    lib, isa, reason = library.load()
    assert reason is None and lib is not None
    assert library._built_from(lib) == library.source_digest(library.HERE)
    built = list(tmp_path.rglob("_adam_*"))
    assert len(built) == 1 and built[0].stat().st_size > 0
    mtime = built[0].stat().st_mtime_ns
    assert library.load()[2] is None
    assert built[0].stat().st_mtime_ns == mtime


def _random_run(threads: int, dtype: torch.dtype, **kwargs):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        shapes = [(300_001,), (7,), (), (129, 257), (16384 * 3 + 5,)]
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        # eps = 1e-3: float16 state cannot hold 1e-8 (see test_backend_parity.py).
        opt = adamkit.Adam(ps, lr=0.01, eps=1e-3, backend="cpu", **kwargs)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        return ps, opt
    finally:
        torch.set_num_threads(previous)


@needs_kernels
# (float16 state is no kernel format; it goes to torch, whose float16 ops round
# differently in their vector body and scalar tail, so depend on the thread split.)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_result_does_not_depend_on_thread_count(dtype):
    """Work is split by whole chunks, never reduced across threads: bitwise the same."""
    one, opt1 = _random_run(1, dtype, weight_decay=0.1, amsgrad=True)
    two, opt2 = _random_run(2, dtype, weight_decay=0.1, amsgrad=True)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(opt1.state[a][key], opt2.state[b][key])


@needs_kernels
def test_non_contiguous_params_step_in_the_same_call():
    """A transposed view cannot be walked linearly: it goes to the torch backend, the rest
    to the kernel, and every param matches the reference."""
    results = []
    for backend in ("cpu", "reference"):
        base = torch.arange(12.0).reshape(3, 4)
        ps = [torch.nn.Parameter(base.t()), torch.nn.Parameter(torch.linspace(-1, 1, 10))]
        opt = adamkit.Adam(ps, lr=0.1, weight_decay=0.01, backend=backend)
        for k in range(3):
            for p in ps:
                p.grad = torch.sin(p.detach() * (k + 1))
            opt.step()
        assert not ps[0].is_contiguous()
        results.append(ps)
    for a, b in zip(*results):
        assert_close_scaled(a, b, *REFERENCE_TOL[torch.float32])


MEMORY = """
    import torch, adamkit

    def status(key):  # kB, from the kernel's accounting of this process
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    torch.set_num_threads(1)
    warm = torch.nn.Parameter(torch.ones(100_000))  # loads the kernel library first
    warm.grad = torch.ones(100_000)
    adamkit.Adam([warm], backend="{backend}").step()
    n = 4 * 1024 * 1024  # 16 MB of float32
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opt = adamkit.Adam([p], lr=1e-3, weight_decay=0.1, maximize=True, backend="{backend}")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    opt.step()  # allocates the two moments, 32 MB, and (for the kernel) nothing else
    print((status("VmHWM") - before) * 1024 / (n * 4))
"""


@needs_kernels
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_step_allocates_nothing_beyond_the_state():
    """Peak memory of a first step grows by the two moments only (2 × the param's bytes);
    the torch backend, for contrast, needs temporaries as large as the param."""
    grown = {b: float(_python(MEMORY.format(backend=b)).stdout) for b in ("cpu", "torch")}
    assert grown["cpu"] < 2.05, grown
    assert grown["torch"] > 2.5, grown


@needs_kernels
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_low_precision_params_with_float32_state_match_reference(param_dtype, amsgrad):
    """The kernel's own bfloat16/float16 conversions (by bits, vectorized) round exactly as
    torch's: with float32 state, params match the reference to the param's rounding."""
    from adamkit.functional import adam_step

    gen = torch.Generator().manual_seed(3)
    shapes = [(4099,), (33, 65), ()]
    runs = {}
    for backend in ("cpu", "reference"):
        gen.manual_seed(3)
        params = [torch.randn(s, generator=gen).to(param_dtype) for s in shapes]
        state = [[torch.zeros(s) for s in shapes] for _ in range(3)]
        for t in range(1, 4):
            grads = [(torch.randn(s, generator=gen) * 3).to(param_dtype) for s in shapes]
            adam_step(params, grads, *state[:2], state[2] if amsgrad else None, step=t, lr=0.01,
                      weight_decay=0.1, amsgrad=amsgrad, backend=backend)
        runs[backend] = (params, state)
    rtol, atol = REFERENCE_TOL[param_dtype]
    for a, b in zip(runs["cpu"][0], runs["reference"][0]):
        assert_close_scaled(a, b, 3 * rtol, 3 * atol)  # three steps, one rounding each
    for ka, kb in zip(runs["cpu"][1], runs["reference"][1]):
        for a, b in zip(ka, kb):
            assert_close_scaled(a, b, *REFERENCE_TOL[torch.float32])


def _check_int8_encoder(tmp_path, stride: int) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    exe = tmp_path / "check_int8_encoder"
    subprocess.run(["g++", "-std=c++17", "-O2", "-fno-math-errno", "-fno-trapping-math",
                    "-ffp-contract=off", *library.ISA_FLAGS["avx2"],
                    f"-I{library.HERE}", str(root / "tools" / "check_int8_encoder.cpp"),
                    "-o", str(exe)], check=True, timeout=300)
    return subprocess.run([str(exe), str(stride)], capture_output=True, text=True, timeout=3600)



@needs_gxx_avx2
@pytest.mark.parametrize("stride", [257, pytest.param(1, marks=pytest.mark.slow)])
def test_int8_codec_equals_the_spec(tmp_path, stride):
    """tools/check_int8_encoder.cpp: the kernel's encoders (one float and 8 lanes) and its
    F16C m decoder against formats.md's steps, bit for bit: edge values (ties, caps,
    branch points, non-finite), then every `stride`-th float32 pattern, for several block
    maxima (stride 1: all 2^32, ~25 minutes)."""
    done = _check_int8_encoder(tmp_path, stride)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 mismatches" in done.stdout


DENORMAL_MODE = """
import torch, adamkit
torch.set_num_threads(2)
if not torch.set_flush_denormal(True):
    print("skip")
    raise SystemExit
warm = torch.ones(1 << 16)
warm.grad = torch.ones_like(warm)
adamkit.Adam([warm], backend="cpu").step()  # the OpenMP threads start while flushing
torch.set_flush_denormal(False)
# A float32 denormal param with a zero grad: the step leaves it as it is, unless a
# thread reads it as zero (DAZ), as the pool's threads, started while flushing, would.
# (Not against the torch backend: torch's own parallel ops run on those threads too.)
p = torch.full((1 << 16,), 3e-39)
p.grad = torch.zeros_like(p)
adamkit.Adam([p], backend="cpu").step()
kept = int((p.view(torch.int32) == torch.tensor(3e-39).view(torch.int32)).sum())  # bits: no DAZ
print("same" if kept == p.numel() else f"differ: {p.numel() - kept} flushed")
"""


@needs_kernels
def test_kernel_threads_follow_the_callers_denormal_mode():
    """The OpenMP threads run under the calling thread's MXCSR (adam.h, FpMode), not the
    one they were created with: a pool started under torch.set_flush_denormal(True) kept
    flushing denormals after set_flush_denormal(False) (in half of each step's chunks)."""
    done = _python(DENORMAL_MODE)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "skip":
        pytest.skip("this CPU cannot flush denormals")
    assert done.stdout.strip() == "same"


@needs_kernels
def test_int8_kernel_equals_torch_backend_with_denormals_flushed():
    """Under torch.set_flush_denormal(True) (MXCSR FTZ/DAZ), the kernel's F16C decode of
    m's subnormal codes must still give their values: vcvtph2ps ignores DAZ."""
    # torch's OpenMP threads keep the mode they start under: start them before flushing,
    # or they flush for every later test (torch's own parallel ops included)
    torch.ones(1 << 20).sum()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        runs = []
        for backend in ("cpu", "torch"):
            gen = torch.Generator().manual_seed(1)
            p = torch.nn.Parameter(torch.randn(3 * 4096, generator=gen))
            opt = adamkit.Adam([p], lr=1e-2, backend=backend, state_format="int8", int8_min_size=1)
            for _ in range(5):  # grads over 9 decades: m codes in E4M3's subnormal range
                p.grad = torch.randn(p.shape, generator=gen) * 10 ** torch.empty(p.shape).uniform_(-8, 1, generator=gen)
                opt.step()
            runs.append((p.detach().clone(), opt.state[p]["exp_avg"].clone()))
    finally:
        torch.set_flush_denormal(False)
    (pa, ma), (pb, mb) = runs
    assert int(((ma & 127) < 8).sum()) > 100  # the case under test occurs
    assert torch.equal(ma, mb)
    assert torch.equal(pa, pb)


@needs_kernels
@pytest.mark.parametrize("scale", [torch.ones(1), torch.ones(80)[::2], torch.ones(40).double()],
                         ids=["short", "strided", "float64"])
def test_the_kernel_takes_no_int8_scale_it_cannot_address(scale):
    """The step's planning converts a state whose scales do not fit; a bucket prepared
    some other way with such a scale goes to the torch backend, not through the kernel's
    raw pointers (which would write past a short scale's end)."""
    p = torch.nn.Parameter(torch.randn(256 * 40))
    opt = adamkit.Adam([p], state_format="int8", backend="cpu")
    p.grad = torch.randn_like(p)
    opt.step()
    bucket = opt._step_cache.buckets[0].bucket
    bucket.grads = [p.grad]
    assert cpu.BACKEND.prepare(bucket).fast == [0]
    bucket.states[0]["exp_avg_scale"] = scale
    prepared = cpu.BACKEND.prepare(bucket)
    assert prepared.fast == [] and prepared.rest == [0]


def test_a_cxx_with_arguments_builds(monkeypatch, tmp_path):
    """CXX="ccache g++" was run as one program name: every first-use build failed, and
    adamkit fell back without its kernels (found by review)."""
    from adamkit.backends.cpu import library

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "one.cpp"
    source.write_text('extern "C" int one() { return 1; }\n')
    monkeypatch.setenv("CXX", f"env {compiler}")
    target = library.compile_into(tmp_path / "one.so", "a test library", ["-shared", "-fPIC", str(source)])
    assert ctypes.CDLL(str(target)).one() == 1


def test_kernels_whose_sources_are_not_installed_load_the_built_ones_or_fall_back(monkeypatch):
    """A frozen or zipped install (PyInstaller, a zip import) has the built kernels but
    not their sources: hashing the sources raised FileNotFoundError from every step,
    where a missing kernel should fall back with a warning (found by review). The
    installed build is taken as it is; without one the reason says why."""
    from adamkit.backends.cpu import library

    def unreadable(directory):
        raise FileNotFoundError(2, "No such file or directory", "simd512.h")

    monkeypatch.setattr(library, "source_digest", unreadable)
    installed = [isa for isa in library.isa_candidates()
                 if (path := library._installed_path(isa)) is not None and path.exists()]
    lib, isa, why = library.load()
    if installed:
        assert lib is not None and why is None and isa == installed[0]
    monkeypatch.setattr(library, "_installed_path", lambda isa: None)
    lib, isa, why = library.load()
    assert lib is None and isa == "" and "kernel sources are not readable" in why and "simd512.h" in why


@pytest.mark.parametrize("value", ["0", ""])
def test_disable_cpu_kernels_set_to_0_or_empty_does_not_disable(monkeypatch, value):
    """ADAMKIT_DISABLE_CPU_KERNELS=1 skips the kernels; =0 (as ADAMKIT_NATIVE_CHECKS=0 is
    "off") or empty leaves them on."""
    from adamkit.backends.cpu import library

    monkeypatch.setenv("ADAMKIT_DISABLE_CPU_KERNELS", "1")
    assert library.load()[2] == "disabled by ADAMKIT_DISABLE_CPU_KERNELS"
    monkeypatch.setenv("ADAMKIT_DISABLE_CPU_KERNELS", value)
    lib, isa, why = library.load()
    if lib is None:
        pytest.skip(f"no CPU kernel here: {why}")
    assert why is None and isa


def test_views_overlapping_a_long_one_all_leave_the_kernel():
    """buf[0:100] holds buf[10:20] and buf[30:40]: the overlap scan keeps the longest
    span's end, so both short views overlap it (not only the first), and the cpu backend
    gives the torch backend's bits for all three."""
    import adamkit

    def run(backend):
        buf = torch.linspace(-1.0, 1.0, 100)
        ps = [torch.nn.Parameter(buf[0:100]), torch.nn.Parameter(buf[10:20]), torch.nn.Parameter(buf[30:40])]
        opt = adamkit.Adam(ps, lr=0.01, weight_decay=0.5, backend=backend)
        for t in range(2):
            for p in ps:
                p.grad = torch.cos(torch.arange(p.numel()) * (t + 1.0))
            opt.step()
        return buf
    assert torch.equal(run("cpu"), run("torch"))


@pytest.mark.parametrize("state_format", [None, "bf16", "int8"])
@pytest.mark.parametrize("order", ["ab", "ba"])
@pytest.mark.parametrize("variant", ["strided view", "non-contiguous grad"])
def test_a_kernel_param_overlapping_one_the_torch_backend_runs_leaves_the_kernel(variant, order, state_format):
    """The overlap scan looked only at the kernel's candidates, and measured a strided
    view by its numel: a contiguous param sharing memory with a strided one (or with one
    whose non-contiguous grad keeps it off the kernel) stayed on the kernel, and the two
    paths wrote the shared memory one after the other: 2.6e-5 to 2.2e-3 from the torch
    backend (found by review). Both now run on the torch backend, bit for bit."""
    import adamkit

    def run(backend):
        buf = torch.linspace(-1, 1, 128)
        if variant == "strided view":  # b spans 63 elements of a's 32 and beyond
            a, b = torch.nn.Parameter(buf[:32]), torch.nn.Parameter(buf[0:64:2])
        else:
            a, b = torch.nn.Parameter(buf[:64].view(8, 8)), torch.nn.Parameter(buf[32:96].view(8, 8))
        opt = adamkit.Adam([a, b] if order == "ab" else [b, a], lr=1e-2, weight_decay=0.1,
                           backend=backend, state_format=state_format, int8_min_size=0)
        for t in range(3):
            ga = torch.sin(torch.arange(a.numel()) * (t + 1.0)).view(a.shape)
            if variant == "non-contiguous grad":
                ga = ga.t().contiguous().t()
            a.grad, b.grad = ga, torch.cos(torch.arange(b.numel()) * (t + 1.0)).view(b.shape)
            opt.step()
        return buf
    assert torch.equal(run("cpu"), run("torch"))


@pytest.mark.parametrize("share", ["state", "moment", "a param as a moment", "scale"])
def test_params_whose_states_share_memory_leave_the_kernel(share):
    """The overlap scan looked at the params alone: two params sharing a state tensor
    (``opt.state[b] = opt.state[a]``, a moment assigned another's or a param's, an int8
    scale) stayed on the kernel, whose threads then wrote the shared memory at once
    (numbers that changed from run to run; found by review). They run on the torch
    backend, bit for bit, beside a param that stays on the kernel."""
    import adamkit

    def run(backend):
        g = torch.Generator().manual_seed(0)
        a, b, c = (torch.nn.Parameter(torch.randn(40000, generator=g)) for _ in range(3))
        opt = adamkit.Adam([a, b, c], lr=1e-2, backend="torch", int8_min_size=0,
                           state_format="int8" if share == "scale" else None)
        for t in range(4):
            for p in (a, b, c):
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            if t == 0:
                if share == "state":
                    opt.state[b] = opt.state[a]
                elif share == "moment":
                    opt.state[b]["exp_avg"] = opt.state[a]["exp_avg"]
                elif share == "a param as a moment":
                    opt.state[b]["exp_avg"] = a.data
                else:
                    opt.state[b]["exp_avg_scale"] = opt.state[a]["exp_avg_scale"]
                opt.param_groups[0]["backend"] = backend
        # (a state shared whole counts its step twice, as torch.optim's: its own bucket)
        on_kernel = {id(cb.bucket.params[i]) for cb in opt._step_cache.buckets
                     for i in (cb.prepared.fast if cb.prepared else [])}
        return torch.cat([a.detach(), b.detach()]), on_kernel, id(c)
    (ours, on_kernel, c), (theirs, _, _) = run("cpu"), run("torch")
    assert torch.equal(ours, theirs)
    assert on_kernel == {c}


_HELD_BY_THE_STATE_ONLY = ("kahan_comp", "master_param", "exp_avg_scale", "exp_avg_sq_scale", "sr_seed")


@needs_kernels
@pytest.mark.parametrize("kw", [dict(param_update="kahan"), dict(param_update="master"),
                                dict(param_update="stochastic"), dict(state_format="int8")],
                         ids=lambda kw: next(iter(kw.values())))
def test_what_the_kernel_writes_outlives_a_state_cleared_during_the_step(monkeypatch, kw):
    """The kernel runs without the GIL. The tensors its table points to beyond the
    bucket's own lists (a Kahan or master buffer, int8 scales, a seed) were held by the
    state dicts alone: another thread's ``state.clear()`` or load during the step freed
    memory the kernel then wrote (found by review; here the process crashed). The
    prepared bucket holds them."""
    import gc
    import weakref

    dtype = torch.float32 if "state_format" in kw else torch.bfloat16
    p = torch.nn.Parameter(torch.randn(5000).to(dtype))
    opt = adamkit.Adam([p], backend="cpu", int8_min_size=0, **kw)
    real_run, alive = cpu.PreparedBucket.run, []

    def run(self, s):  # another thread drops them between the plan and the kernel
        refs = [(st, key, weakref.ref(st.pop(key))) for st in self.bucket.states
                for key in _HELD_BY_THE_STATE_ONLY if key in st]
        assert refs
        gc.collect()
        alive.extend(ref() is not None for _, _, ref in refs)
        real_run(self, s)
        for st, key, ref in refs:  # back, for the rest of the step to read
            st[key] = ref()

    monkeypatch.setattr(cpu.PreparedBucket, "run", run)
    p.grad = torch.randn(5000).to(dtype)
    opt.step()
    assert alive and all(alive)
