"""adamkit.bench: the side-by-side benchmark runs, measures and records (not timed here)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from adamkit import bench
from adamkit.backends import cpu as cpu_backend
from adamkit.backends.cpu import library
from adamkit.bench import measure, suite
from helpers import needs_gxx_avx2


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(suite.CONFIGS, "quick", lambda: [(4096,)] * 3 + [(5, 7)])


def test_quick_run_records_every_measure(tiny, tmp_path, capsys):
    code = bench.main(["--quick", "--only", "adamkit cpu fp32", "--only", "torch fused fp32",
                       "--rounds", "1", "--steps-per-round", "2", "--out", str(tmp_path)])
    assert code == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    results = {r["optimizer"]: r for r in payload["results"]}
    # --only matches substrings: "adamkit cpu fp32 int8" runs too where int8 state exists.
    assert set(results) - {"adamkit cpu fp32 int8"} == {"adamkit cpu fp32", "torch fused fp32"}
    results = {k: v for k, v in results.items() if k != "adamkit cpu fp32 int8"}
    for r in results.values():
        assert r["n_params"] == 3 * 4096 + 35 and r["n_tensors"] == 4
        assert r["steps_timed"] == 2 and r["ms_per_step"] > 0 and r["first_step_s"] > 0
        assert r["bytes_per_param"] == 28  # p, m, v read and written, g read: 7 × 4 bytes
        assert r["state_bytes_per_param"] == pytest.approx(8.0)  # measured from the state
        assert 0 < r["bandwidth_fraction"] and r["bandwidth_Bps"] > 0
        # the best pattern's median, and its best sample beside it
        assert r["bandwidth_Bps"] == max(r["bandwidth_patterns_Bps"]["median"].values())
        assert r["bandwidth_peak_Bps"] == max(r["bandwidth_patterns_Bps"]["peak"].values())
        assert r["bandwidth_peak_Bps"] >= r["bandwidth_Bps"]
        assert r["compute_probe_ns_per_element"] > 0
        assert r["bandwidth_fraction_of_peak"] == pytest.approx(
            r["bandwidth_fraction"] * r["bandwidth_Bps"] / r["bandwidth_peak_Bps"])
    assert results["torch fused fp32"]["speedup_vs_torch_fused"] == pytest.approx(1.0)
    [ratio] = payload["comparisons"]
    assert ratio["speedup"] == pytest.approx(
        results["torch fused fp32"]["ms_per_step"] / results["adamkit cpu fp32"]["ms_per_step"])
    assert "adamkit cpu fp32" in capsys.readouterr().out
    assert payload["machine"]["torch_threads"] >= 1


def test_without_matplotlib_an_earlier_chart_is_removed(tiny, tmp_path, capsys, monkeypatch):
    """With matplotlib missing, bench.json was rewritten and an earlier run's bench.png
    stayed beside it, charting other numbers."""
    (tmp_path / "bench.png").write_bytes(b"an earlier run's chart")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert bench.main(["--quick", "--only", "torch fused fp32", "--rounds", "1", "--out", str(tmp_path)]) == 0
    assert "(no chart: pip install matplotlib)" in capsys.readouterr().out
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "bench.png").exists()


class _ScratchGrads(torch.optim.Optimizer):
    """Steps as optimi's foreach Adam treats the grads: as scratch space."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad.zero_()


def test_a_contender_writing_into_the_grads_gets_its_own(tmp_path):
    """The grads are shared by every contender; optimi's step wrote into them, and every
    other contender after it stepped on what it left. The writer now keeps copies, and
    the shared grads are as they were."""
    grads = measure.grads_for([(64,), (3, 5)], torch.float32)
    clean = [g.clone() for g in grads]
    writer = suite.Contender("scratch", "torch", torch.float32, _ScratchGrads, 28.0)
    run = measure.start(writer, [(64,), (3, 5)], grads)
    assert all(torch.equal(g, c) for g, c in zip(grads, clean))
    assert all(p.grad is not g for p, g in zip(run.params, grads))
    reader = suite.Contender("reader", "torch", torch.float32, lambda ps: torch.optim.Adam(ps), 28.0)
    assert all(p.grad is g for p, g in zip(measure.start(reader, [(64,), (3, 5)], grads).params, grads))


def test_state_bytes_count_what_a_tensor_subclass_holds():
    """torchao's 8-bit state is a tensor subclass reporting float32 of the param's shape:
    the table said 8.00 B/param, where it holds uint8 codes and a float32 scale per block."""
    torchao = pytest.importorskip("torchao.optim")
    params = [torch.nn.Parameter(torch.randn(65536))]
    params[0].grad = torch.randn(65536)
    opt = torchao.AdamW8bit(params, lr=1e-3, weight_decay=0.0)
    opt.step()
    run = measure.Run(suite.Contender("torchao", "torchao", torch.float32, None, 16.0), params, opt, 0.0)
    assert 2.0 <= run.state_bytes_per_param() <= 2.1


def test_bandwidth_probe_takes_turns_with_the_steps():
    """The probe is timed inside the interleaved rounds, steps_per_round samples of every
    pattern per round, and reports the median and the best of them."""
    from adamkit.bench import measure

    probe = measure.BandwidthProbe(3 * 2**20)
    calls = []

    class Fake:
        def step(self):
            calls.append(len(probe.times["triad"]))

    measure.interleave([Fake(), probe], rounds=3, steps_per_round=2)
    assert {len(t) for t in probe.times.values()} == {6}
    # rounds rotate: fake then probe, probe then fake, fake then probe
    assert calls == [0, 0, 4, 4, 4, 4]
    n = 3 * 2**20 // 4
    nbytes = {"read+write": 8 * n, "2 reads + write": 12 * (n // 2), "triad": 12 * (n // 3),
              "3 reads + write": 16 * (n // 3)}
    for name, rate in probe.rates().items():
        assert rate == pytest.approx(nbytes[name] / statistics.median(probe.times[name]))
        assert probe.peak_rates()[name] == pytest.approx(nbytes[name] / min(probe.times[name]))
        assert probe.peak_rates()[name] >= rate > 0


def test_compute_probe_takes_turns_and_reports_its_median():
    from adamkit.bench import measure

    probe = measure.ComputeProbe(reps=2)
    measure.interleave([probe], rounds=3, steps_per_round=2)
    assert len(probe.times) == 6
    assert probe.ns_per_element() == pytest.approx(
        1e9 * statistics.median(probe.times) / (probe.N * 2))
    assert torch.equal(probe.y, torch.sqrt(probe.x) / probe.x)  # it computes what it says


def test_blocks_with_slow_compute_are_named():
    def block(config, dtype, ns):
        return {"config": config, "dtype": dtype, "compute_probe_ns_per_element": ns}
    results = [block("64 tensors", "float32", 0.40), block("64 tensors", "float32", 0.40),
               block("64 tensors", "bfloat16", 0.80), block("1024 tensors", "float32", 0.45)]
    [line] = bench.slow_compute(results)
    assert line.startswith("warning: 64 tensors bfloat16: compute ran 2.00x slower")
    assert bench.slow_compute([block("64 tensors", "float32", 0.4)]) == []
    assert bench.slow_compute([]) == []


def test_traffic_model():
    assert suite._traffic(4, 4) == 28
    assert suite._traffic(2, 2) == 14
    assert suite._traffic(2, 2, extra=2) == 18  # kahan buffer read and written
    assert suite._traffic(2, 2, extra=4, param_read=False) == 20  # master read instead of param
    assert suite._traffic(4, suite.INT8) == pytest.approx(12 + 4 * (1 + 1 / 64))


def test_every_comparison_is_like_for_like():
    """A ratio between two storages says nothing about kernels: "fp16 nearest" (fp32 state,
    22 B/param) was compared with torch fused fp16 (fp16 state, 14 B/param)."""
    by_name = {c.name: c for c in suite.CONTENDERS}
    for ours, theirs in bench.COMPARISONS:
        a, b = by_name[ours], by_name[theirs]
        assert (a.dtype, a.bytes_per_param) == (b.dtype, b.bytes_per_param), (ours, theirs)


def test_gpt2_shapes_have_gpt2_small_size():
    n = sum(math.prod(s) for s in suite.gpt2_small_shapes())
    assert 124_000_000 < n < 124_500_000


def test_unwritable_out_is_a_clean_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert bench.main(["--quick", "--out", str(blocker / "sub")]) == 2
    assert "cannot write" in capsys.readouterr().err


def _benchmark_script(name: str):
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _kernel_ablation():
    return _benchmark_script("kernel_ablation")


def test_kernel_ablation_edits_still_match_the_kernel_sources():
    """benchmarks/kernel_ablation.py removes pieces of the kernel by editing copies of its
    headers; an edit that no longer matches would silently drop its row from RESULTS."""
    ablation = _kernel_ablation()
    assert ablation.VARIANTS["as built"] == [] and len(ablation.VARIANTS) > 1
    for name, edits in ablation.VARIANTS.items():
        for header, old, new in edits:
            text = (ablation.KERNEL / header).read_text()
            assert text.count(old) == 1, f"{name}: its edit of {header} no longer matches once"
            assert old != new, name


@needs_gxx_avx2
def test_kernel_ablation_driver_still_compiles_against_the_kernel(tmp_path):
    """Its C++ driver calls the kernel's templates directly; a changed signature must
    fail here, not in the next benchmark session."""
    ablation = _kernel_ablation()
    exe = ablation.build("as built", [], tmp_path)
    assert exe.exists()


@needs_gxx_avx2
def test_divider_overlap_driver_runs_against_the_kernel():
    """benchmarks/divider_overlap.py's driver calls the kernel's own direction and bf16
    rounding; a changed signature must fail here, not in the next benchmark session."""
    result = _benchmark_script("divider_overlap").measure(rounds=1)
    assert result is not None and result["divider_ns"] > 0
    assert [r["streams_rounded"] for r in result["rows"]] == [1, 2, 3, 4, 5, 6]
    for r in result["rows"]:
        assert r["other_ns"] > 0 and r["both_ns"] > 0
        assert r["saved_ns"] == round(r["other_ns"] + result["divider_ns"] - r["both_ns"], 4)


@needs_gxx_avx2
def test_stream_ceiling_kernel_moves_every_byte_of_every_stream(tmp_path):
    """benchmarks/stream_ceiling.py's kernel is the ceiling only if it really reads every
    byte of the grad and reads and writes every byte of the other streams: per 32
    elements, the grad's 32-byte vectors XORed into one, added (64-bit lanes, wrapping) to
    each written stream's vectors; the grad unchanged."""
    import torch

    ceiling = _benchmark_script("stream_ceiling")
    lib = ceiling.build(tmp_path)
    numel = 2 * ceiling.CHUNK
    for storage in ceiling.STORAGES:
        c = ceiling.Ceiling(lib, storage, 3, numel)
        before = [[t.clone() for t in stream] for stream in c.rw]
        grads = [g.clone() for g in c.grads]
        c.step()
        for t, g in enumerate(grads):
            assert torch.equal(c.grads[t], g)
            acc = g.view(torch.int64).view(-1, storage.grad_bytes, 4)  # per 32 elements: ZG vectors
            acc = acc[:, 0].clone()
            for j in range(1, storage.grad_bytes):
                acc ^= g.view(torch.int64).view(-1, storage.grad_bytes, 4)[:, j]
            for stream, old, z in zip(c.rw, before, storage.rw_bytes):
                words = old[t].view(torch.int64).view(-1, z, 4)
                expected = words + acc[:, None, :]
                assert torch.equal(stream[t].view(torch.int64).view(-1, z, 4), expected), storage.name


def test_stream_ceiling_refuses_sizes_it_would_not_cover_whole():
    """The kernel walks whole chunks: a tail would be skipped and its rate overstated."""
    ceiling = _benchmark_script("stream_ceiling")
    for numel in (0, ceiling.CHUNK - 1, ceiling.CHUNK + 32):
        with pytest.raises(ValueError, match="multiple of"):
            ceiling.Ceiling(None, ceiling.STORAGES[0], 1, numel)


@needs_gxx_avx2
def test_stream_ceiling_runs_and_reports_every_item():
    """A tiny run: every storage gets a ceiling, a kernel and a step rate, and the probe."""
    ceiling = _benchmark_script("stream_ceiling")
    results = ceiling.measure(rounds=1, n_tensors=2, numel=ceiling.CHUNK)
    assert set(results) == {s.name for s in ceiling.STORAGES}
    for r in results.values():
        assert set(r["GBps"]) == {"ceiling", "adamkit kernel", "adamkit step"}
        assert all(v > 0 for v in r["GBps"].values()) and r["probe_GBps"] > 0


@pytest.mark.skipif(cpu_backend.BACKEND.unavailable_reason() is not None, reason="no CPU kernels")
def test_ab_builds_steps_each_optimizer_with_its_own_build(monkeypatch):
    """benchmarks/ab_builds.py: each optimizer's cached plan calls the build it was made
    with (else an A/B would time one library twice), and a tiny comparison reports a
    median per build and a paired ratio per build after the first."""
    ab = _benchmark_script("ab_builds")
    monkeypatch.setattr(ab, "N_PARAMS", 64 * 512)
    installed = [isa for isa in library.isa_candidates()
                 if library._installed_path(isa) and library._installed_path(isa).exists()]
    lib_a, label_a = ab.open_build(installed[0])
    lib_b = library._open(library._installed_path(installed[-1]))  # another handle, maybe another ISA
    params = [torch.nn.Parameter(torch.randn(512).to(torch.bfloat16)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    original = cpu_backend._library
    for lib in (lib_a, lib_b):
        opt = ab.optimizer_on(lib, "x", params, {"param_update": "kahan"})
        assert [cb.prepared.lib for cb in opt._step_cache.buckets] == [lib]
        assert cpu_backend._library is original  # other optimizers get the backend's own
    result = ab.compare([(lib_a, label_a), (lib_b, "b")], "bf16 kahan", 64, rounds=2, steps=1)
    assert len(result["ms"]) == 2 and all(m > 0 for m in result["ms"]) and len(result["paired"]) == 1


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("adamkit bench: error: ")
    return err


def test_quick_refuses_config_instead_of_dropping_it(tmp_path, capsys):
    out = tmp_path / "b"
    assert "--quick runs its own small config" in _one_line_error(
        capsys, bench.main(["--quick", "--config", "gpt2-small", "--out", str(out)]))
    assert not out.exists()


@pytest.mark.parametrize("only, expected", [
    ("zzz", "no optimizer matches 'zzz'"),
    ("torch foreach", "'torch foreach' is not part of --quick (run it without --quick)"),
])
def test_an_empty_selection_says_why_and_writes_nothing(tmp_path, capsys, only, expected):
    """An existing optimizer that --quick leaves out was "no optimizer matches"; and the
    error came after --out was created, which it left behind empty."""
    out = tmp_path / "new" / "b"
    assert expected in _one_line_error(capsys, bench.main(["--quick", "--only", only, "--out", str(out)]))
    assert list(tmp_path.iterdir()) == []


def test_an_optimizer_outside_the_chosen_configs_is_named(tmp_path, capsys):
    code = bench.main(["--config", "gpt2-small", "--only", "torchao", "--out", str(tmp_path / "b")])
    assert "'torchao' runs only in the configs 64 tensors, not in gpt2-small" in _one_line_error(capsys, code)


@pytest.mark.skipif(cpu_backend.BACKEND.unavailable_reason() is not None, reason="no CPU kernels")
@pytest.mark.parametrize("thp", [False, True], ids=["pages", "huge-pages"])
def test_tensor_layout_steps_every_layout_alike(monkeypatch, thp):
    """benchmarks/tensor_layout.py: the flat and shuffled layouts really are views of one
    buffer per stream (state included) in order and out of it, and every layout of the same
    params ends a tiny run with the same params."""
    if thp and not sys.platform.startswith("linux"):
        pytest.skip("madvise(MADV_HUGEPAGE) is Linux's")
    layout = _benchmark_script("tensor_layout")
    monkeypatch.setattr(layout, "N_PARAMS", 64 * 512)
    if thp:
        try:
            layout._buffer(16, torch.float32, True)
        except OSError as exc:  # a kernel without transparent huge pages: EINVAL
            pytest.skip(f"no transparent huge pages here: {exc}")
    for kind in layout.LAYOUTS:
        opt = layout.build("bf16 kahan", 16, kind, thp and kind != "separate")
        assert opt._step_cache is not None
        params = opt.param_groups[0]["params"]
        for row in (params, [p.grad for p in params], [opt.state[p]["exp_avg"] for p in params],
                    [opt.state[p]["kahan_comp"] for p in params]):
            bases = {t.untyped_storage().data_ptr() for t in row}
            assert len(bases) == (16 if kind == "separate" else 1), (kind, len(bases))
            if kind != "separate":
                offsets = [t.storage_offset() for t in row]
                assert (offsets == sorted(offsets)) == (kind == "flat")
    result = layout.measure("bf16 kahan", 16, rounds=2, thp=thp)
    assert result["same_params"]
    assert set(result["ms"]) == {"64 separate", "16 separate", "16 flat", "16 shuffled"}
    assert all(v > 0 for v in result["ms"].values()) and result["paired"]["64 separate"] == 1.0


@pytest.mark.skipif(cpu_backend.BACKEND.unavailable_reason() is not None, reason="no CPU kernels")
@pytest.mark.skipif(library.compiler_path() is None, reason="no C++ compiler")
def test_checks_builds_ab_checks_each_optimizer_with_each_build_in_turn(monkeypatch):
    """benchmarks/checks_builds_ab.py: both builds check the same optimizer's state, and
    in the whole-step A/B each optimizer is checked by A in one pairing and by B in the
    other (else the geometric mean would not cancel the optimizers' own difference)."""
    from adamkit.backends.cpu import native_checks

    ab = _benchmark_script("checks_builds_ab")
    monkeypatch.setattr(ab, "N", 256 * 64)
    native_checks.load_now()
    path = native_checks._target()
    libs = {"A": native_checks._open(path), "B": native_checks._open(path)}
    opts = (ab._optimizer(256, torch.float32, {}), ab._optimizer(256, torch.float32, {}))
    flush = torch.empty(1024)
    assert "paired B/A" in ab.state_check(libs, opts[0], flush, rounds=2)
    seen = []
    native_args = type(opts[0]._step_cache.native)
    holds = native_args.holds
    monkeypatch.setattr(native_args, "holds", lambda self, *a: seen.append(self.checks) or holds(self, *a))
    report = ab.steps(libs, opts, flush, rounds=2)
    assert "geometric mean" in report
    # 2 pairings x 2 rounds x 2 optimizers: A and B each check 4 steps, 2 of each optimizer
    assert seen.count(libs["A"]) == seen.count(libs["B"]) == 4
    assert opts[0]._step_cache.native.checks is libs["B"] and opts[1]._step_cache.native.checks is libs["A"]


def test_state_bytes_count_memory_several_states_share_once():
    """bitsandbytes keeps one code map that every param's state refers to: it is counted
    once, by its storage, however many states hold a view of it."""
    from adamkit.bench.measure import Run

    ps = [torch.nn.Parameter(torch.ones(256)) for _ in range(2)]
    opt = torch.optim.Adam(ps)
    shared = torch.zeros(64)
    for p in ps:
        opt.state[p] = {"exp_avg": torch.zeros(256), "code": shared[:32], "code2": shared[32:]}
    run = Run(contender=None, params=ps, optimizer=opt, first_step_s=0.0)
    assert run.state_bytes_per_param() == (2 * 256 * 4 + 64 * 4) / 512


@pytest.mark.parametrize("given", [[], ["--out", "elsewhere"], ["--out=elsewhere"]])
def test_benchmarks_run_py_writes_into_results_unless_out_names_another_directory(monkeypatch, given):
    """`--out=DIR` was missed by run.py's check for `--out`, which then added its own:
    the run went into benchmarks/results/, over the recorded results (found by review)."""
    import runpy

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(bench.parse(argv).out) or 0)
    monkeypatch.setattr(sys, "argv", ["run.py", *given])
    run_py = Path(__file__).parents[1] / "benchmarks" / "run.py"
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(run_py), run_name="__main__")
    assert done.value.code == 0
    expected = run_py.parent / "results" if not given else Path("elsewhere")
    assert Path(seen[0]) == expected


def test_quick_takes_one_step_a_turn_and_six_rounds(tiny, tmp_path):
    """--quick's layout is about an L3's size: a second step in a turn found the first
    one's data in the cache, 7-17% faster (found by review). One step a turn follows
    another contender's; six rounds keep six samples for the median."""
    assert bench.main(["--quick", "--only", "torch fused fp32", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert (payload["rounds"], payload["steps_per_round"]) == (6, 1)
    assert bench.parse([]).steps_per_round is None  # the full suite's 2 is decided in main


def test_the_slow_compute_warnings_are_recorded_in_the_json(tiny, tmp_path, monkeypatch, capsys):
    """They were printed only: bench.json alone did not say which blocks to read with care."""
    line = "warning: quick float32: compute ran 1.40x slower than in the run's fastest block"
    monkeypatch.setattr(bench, "slow_compute", lambda results: [line])
    assert bench.main(["--quick", "--only", "torch fused fp32", "--rounds", "1", "--out", str(tmp_path)]) == 0
    assert line in capsys.readouterr().out
    assert json.loads((tmp_path / "bench.json").read_text())["warnings"] == [line]
