"""``adamkit bench``: adamkit against torch.optim and peers, side by side, on this machine.

Every optimizer of a config and dtype runs in one process, interleaved round-robin, on
the same parameter layout; the memory bandwidth, and the compute the steps get (a probe
whose slow blocks are named after the table), are measured in the same rounds. For each:
ms/step, Mparam/s, the bytes per param its storage must move, the fraction of the
measured bandwidth that makes, its measured state bytes per param, its first step
(allocation and any compilation: torchao's; adamkit's kernel library, built at install
or into the cache, is loaded before the timing, as are the peers' modules) and its speed relative to torch's fused
Adam. A table is printed, and JSON plus a bar chart are written to ``--out``.

``python benchmarks/run.py`` runs the full suite; ``adamkit bench --quick`` a small one.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from typing import Any

import torch

from . import measure, report
from .suite import CONFIGS, CONTENDERS, Contender, available

# (ours, theirs): the ratios the issues set targets for, and fp16 beside them; each pair
# stores alike (same param dtype and bytes per param), so the ratio compares kernels.
COMPARISONS = [
    ("adamkit cpu fp32", "torch fused fp32"),
    ("adamkit cpu bf16 nearest", "torch fused bf16"),
    ("adamkit cpu fp16 bf16-state", "torch fused fp16"),  # both 14 B/param
    ("adamkit cpu bf16 kahan", "optimi kahan bf16"),
    ("adamkit cpu fp32 int8", "bitsandbytes 8bit fp32"),
    ("adamkit cpu fp32 int8", "torchao 8bit fp32"),
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    from ..cli import OneLineErrorParser  # a bad option is one line and exit code 2
    from ..cli.files import output_dir

    ap = OneLineErrorParser(prog="adamkit bench", description=__doc__.split("\n\n")[0].replace("``", ""))
    ap.add_argument("--quick", action="store_true",
                    help="a small config of its own and the main contenders (< 1 min; not with --config)")
    ap.add_argument("--config", action="append", choices=[c for c in CONFIGS if c != "quick"],
                    help="parameter layout(s) to run (default: all)")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only optimizers whose name contains TEXT (repeatable)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 6)")
    ap.add_argument("--steps-per-round", type=int, default=None,
                    help="steps each optimizer takes in its turn of a round (default 2, quick 1); "
                         "ms/step is the median step")
    ap.add_argument("--out", type=output_dir, default=Path("bench-results"),
                    help="directory for bench.json and bench.png (default bench-results)")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.rounds < 1 or args.steps_per_round is not None and args.steps_per_round < 1:
        ap.error("--rounds and --steps-per-round must be at least 1")
    if args.quick and args.config:  # --quick has its own small config: one would be dropped
        ap.error("--quick runs its own small config; drop --config, or --quick to run the configs named")
    return args


def _nothing_selected(args: argparse.Namespace, configs: list[str], selections) -> str:
    """Why no contender is left: none can run here, or (per --only TEXT) what left out
    the optimizers TEXT names: --quick, or configs they do not run in."""
    unavailable = sorted({why for _, skipped in selections for why in skipped})
    if unavailable:
        return f"nothing to run: {'; '.join(unavailable)}"
    if not args.only:
        return "no optimizer matches the options given (names as in the table; see RESULTS.md)"
    reasons = []
    for text in args.only:
        named = [c for c in CONTENDERS if text in c.name]
        if not named:
            reasons.append(f"no optimizer matches {text!r} (names as in the table; see RESULTS.md)")
        elif args.quick and not any(c.quick for c in named):
            reasons.append(f"{text!r} is not part of --quick (run it without --quick)")
        else:
            reasons.append(f"{text!r} runs only in the configs {', '.join(_configs_of(named))}, "
                           f"not in {', '.join(configs)}")
    return "; ".join(reasons)


def _configs_of(contenders: list[Contender]) -> list[str]:
    return list(dict.fromkeys(k for c in contenders for k in (c.configs or CONFIGS) if k != "quick"))


def _selected(args: argparse.Namespace, config: str) -> tuple[list[Contender], list[str]]:
    chosen, skipped = [], []
    for c in CONTENDERS:
        if args.quick and not c.quick:
            continue
        if args.only and not any(text in c.name for text in args.only):
            continue
        if c.configs is not None and config not in c.configs:
            continue
        why = available(c)
        if why:
            skipped.append(f"{c.name}: {why}")
        else:
            chosen.append(c)
    return chosen, skipped


def run_config(config: str, contenders: list[Contender], rounds: int, steps: int,
               log=print) -> list[dict[str, Any]]:
    shapes = CONFIGS[config]()
    n = sum(torch.Size(s).numel() for s in shapes)
    results = []
    for dtype in dict.fromkeys(c.dtype for c in contenders):
        group = [c for c in contenders if c.dtype == dtype]
        # Same footprint as param + grad + two moments of this dtype (torch's layout), and
        # at least 128 MiB (the full configs' bf16 footprint): --quick's bf16 footprint,
        # 32 MiB, fitted a large L3, where the contenders' working sets together do not
        # (that probe read 108 GB/s where fp32's read 71, in a review's run on Zen 4).
        footprint = max(4 * n * torch.empty((), dtype=dtype).element_size(), 128 << 20)
        grads = measure.grads_for(shapes, dtype)
        runs = []
        for c in group:
            log(f"  {config}: first step of {c.name} ...")
            runs.append(measure.start(c, shapes, grads))
        probe, compute = measure.BandwidthProbe(footprint), measure.ComputeProbe()
        measure.interleave([*runs, probe, compute], rounds, steps)
        del grads
        # The best pattern's median: the same statistic, over the same minutes, as the steps.
        rates, peaks = probe.rates(), probe.peak_rates()
        bw, peak = max(rates.values()), max(peaks.values())
        compute_ns = compute.ns_per_element()
        del probe, compute
        gc.collect()
        log(f"  {config} {str(dtype).removeprefix('torch.')} params: bandwidth {bw / 1e9:.1f} GB/s (best sample {peak / 1e9:.1f}) "
            f"over {footprint / 2**20:.0f} MiB; compute probe {compute_ns:.3f} ns/element")
        for run in runs:
            results.append({
                "config": config, "optimizer": run.contender.name, "library": run.contender.library,
                "dtype": str(dtype).replace("torch.", ""), "n_params": n, "n_tensors": len(shapes),
                "ms_per_step": run.ms_per_step, "mparams_per_s": n / run.ms_per_step / 1e3,
                "bytes_per_param": run.contender.bytes_per_param,
                "state_bytes_per_param": run.state_bytes_per_param(),
                "first_step_s": run.first_step_s, "steps_timed": len(run.times),
                "bandwidth_Bps": bw, "bandwidth_peak_Bps": peak,
                "bandwidth_patterns_Bps": {"median": rates, "peak": peaks},
                "compute_probe_ns_per_element": compute_ns,
            })
        del runs
        gc.collect()
    return results


def _annotate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {(r["config"], r["optimizer"]): r for r in results}
    for r in results:
        rate = r["bytes_per_param"] * r["n_params"] / (r["ms_per_step"] / 1e3)
        r["bandwidth_fraction"] = rate / r["bandwidth_Bps"]
        r["bandwidth_fraction_of_peak"] = rate / r["bandwidth_peak_Bps"]
        short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(r["dtype"], r["dtype"])
        fused = by_name.get((r["config"], f"torch fused {short}"))
        r["speedup_vs_torch_fused"] = fused["ms_per_step"] / r["ms_per_step"] if fused else None
    ratios = []
    for ours, theirs in COMPARISONS:
        for config in dict.fromkeys(r["config"] for r in results):
            a, b = by_name.get((config, ours)), by_name.get((config, theirs))
            if a and b:
                ratios.append({"config": config, "ours": ours, "theirs": theirs,
                               "speedup": b["ms_per_step"] / a["ms_per_step"]})
    return ratios


# A block whose compute probe ran this much slower than the run's fastest block is named:
# its compute-bound steps (bf16, int8) ran slow with it, whatever the bandwidth read.
SLOW_COMPUTE = 1.25


def slow_compute(results: list[dict[str, Any]]) -> list[str]:
    """A warning per config and dtype whose compute probe read ``SLOW_COMPUTE`` times the
    run's best or slower."""
    blocks = {(r["config"], r["dtype"]): r["compute_probe_ns_per_element"] for r in results}
    if not blocks:
        return []
    best = min(blocks.values())
    return [f"warning: {config} {dtype}: compute ran {ns / best:.2f}x slower than in the run's "
            f"fastest block (compute probe {ns:.3f} against {best:.3f} ns/element), likely other "
            "load on this machine; its compute-bound steps are slow with it"
            for (config, dtype), ns in blocks.items() if ns >= SLOW_COMPUTE * best]


def _native_checks_now() -> None:
    """Build the step cache's C++ checks before measuring (native_checks.py), so that no
    background build runs during the rounds; where it fails, the Python checks are
    measured, and the header says so."""
    from ..backends.cpu import library, native_checks

    if os.environ.get("ADAMKIT_NATIVE_CHECKS") != "0" and library.compiler_path():
        try:
            native_checks.load_now()
        except Exception:  # noqa: BLE001  (status() says why)
            pass


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except SystemExit as stop:  # --help, or a bad option (already reported on one line)
        return stop.code if isinstance(stop.code, int) else 0
    configs = ["quick"] if args.quick else (args.config or ["64 tensors", "1024 tensors", "gpt2-small"])
    rounds = args.rounds or (6 if args.quick else 5)
    # --quick's layouts (34-67 MB) are about the L3's size: a second step in a turn found
    # the first one's data in the cache, 7-17% faster (found by review); one step a turn
    # follows another contender's, which evicted it
    if args.steps_per_round is None:
        args.steps_per_round = 1 if args.quick else 2
    # Before any measuring: a run that measures nothing, or cannot save its results, is
    # reported now, not after minutes of work; and before --out is made, so that an
    # error leaves nothing behind.
    from ..cli.errors import CliError
    from ..cli.files import not_in_the_way, removed_if_failing, writable_dir

    selections = [_selected(args, config) for config in configs]
    if not any(chosen for chosen, _ in selections):
        print(f"adamkit bench: error: {_nothing_selected(args, configs, selections)}", file=sys.stderr)
        return 2
    try:
        with removed_if_failing(args.out):  # nor does Ctrl-C while measuring leave an empty --out
            writable_dir(args.out)
            not_in_the_way(args.out / "bench.json", args.out / "bench.png")
            return _run(args, configs, rounds)
    except CliError as err:
        print(f"adamkit bench: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, configs: list[str], rounds: int) -> int:
    _native_checks_now()
    info = report.machine()
    print(f"machine: {info['cpu']} ({info['cpu_vendor_family_model_stepping']}), {info['torch_threads']} torch threads, kernel "
          f"{info['adamkit_cpu_kernel']}, step-cache checks in C++: {info['adamkit_native_checks']}")

    results, skipped = [], []
    for config in configs:
        contenders, why = _selected(args, config)
        skipped += [f"{config}: {w}" for w in why]
        results += run_config(config, contenders, rounds, args.steps_per_round)
    ratios = _annotate(results)
    print()
    print(report.table(results))
    if ratios:
        print()
        for r in ratios:
            print(f"{r['config']}: {r['ours']} is {r['speedup']:.2f}x {r['theirs']}")
    warnings = slow_compute(results)
    for line in warnings:
        print(line)
    for line in skipped:
        print(f"skipped {line}")
    # the warnings too: a block named slow is read differently from the JSON alone
    payload = {"machine": info, "rounds": rounds, "steps_per_round": args.steps_per_round,
               "results": results, "comparisons": ratios, "skipped": skipped, "warnings": warnings}
    report.save_json(args.out / "bench.json", payload)  # a failed write: CliError, one line
    chart = args.out / "bench.png"
    charted = report.save_chart(chart, results)
    if not charted and chart.is_file():  # an earlier run's: it would sit beside these numbers
        chart.unlink()
    print(f"\nwrote {args.out / 'bench.json'}" + (f" and {chart}" if charted else
                                                 " (no chart: pip install matplotlib)"))
    return 0
