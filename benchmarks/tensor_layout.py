"""Why the kernel is slower on many small tensors: the same params in different layouts.

    python benchmarks/tensor_layout.py [--tensors 1024] [--storage "bf16 nearest"] [--thp]

The same 16.8M params (ab_builds.py's storages) stepped by the cpu kernel as 64 tensors
and as ``--tensors`` tensors laid out three ways, each stream (param, grad, moments, and
kahan's or master's buffer) alike:
  separate   each tensor allocated on its own, as a model's are;
  flat       views, in order, of one buffer per stream: the next tensor starts where the
             last ended;
  shuffled   the same views in a random order: every tensor starts somewhere unrelated.
``--thp`` backs the flat and shuffled buffers with transparent huge pages (Linux,
madvise), which takes most TLB misses away; the huge pages obtained are reported. Only
the cached plan's kernel calls are timed (the kernel and its version bumps, by checks.cpp
for every layout; no per-step checks), the layouts in turns, round after round, between
them a 256 MiB rewrite as a training step's other work would do; reported are medians
and paired ratios to 64 separate tensors. All layouts start from the same values and
must end with the same params (checked). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import adamkit
from adamkit.backends.cpu import library, native_checks

sys.path.insert(0, str(Path(__file__).parent))
from ab_builds import N_PARAMS, STORAGES  # noqa: E402
from native_checks_ab import kernel_calls  # noqa: E402

LAYOUTS = ("separate", "flat", "shuffled")
_MADV_HUGEPAGE = 14


def _buffer(numel: int, dtype: torch.dtype, thp: bool) -> torch.Tensor:
    """A contiguous zeroed buffer; with ``thp``, on 2 MiB pages (aligned, advised before first touch)."""
    if not thp:
        return torch.zeros(numel, dtype=dtype)
    nbytes, huge = numel * torch.empty(0, dtype=dtype).element_size(), 2 << 20
    raw = torch.empty(nbytes + 2 * huge, dtype=torch.uint8)
    start = -raw.data_ptr() % huge
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(raw.data_ptr() + start, nbytes, _MADV_HUGEPAGE) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed")
    return raw[start:start + nbytes].view(dtype).zero_()


def _tensors(values: list[torch.Tensor], layout: str, order: list[int], thp: bool) -> list[torch.Tensor]:
    """``values`` (equal sizes) copied into ``layout``; tensor k of the result holds values[k]."""
    if layout == "separate":
        return [v.clone() for v in values]
    n = values[0].numel()
    views = _buffer(n * len(values), values[0].dtype, thp).split(n)
    slots = order if layout == "shuffled" else range(len(values))
    out = [views[s] for s in slots]
    for t, v in zip(out, values):
        t.copy_(v)
    return out


def huge_pages_kB() -> int:
    """This process's anonymous memory on transparent huge pages (Linux), else 0."""
    try:
        rollup = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("AnonHugePages:"))


def build(storage: str, n_tensors: int, layout: str, thp: bool = False, seed: int = 0) -> adamkit.Adam:
    """An optimizer over ``n_tensors`` params in ``layout``, its state in the same layout,
    after its steps from the cached plan have begun (those kernel calls are timed)."""
    dtype, options = STORAGES[storage]
    gen = torch.Generator().manual_seed(seed)
    numel = N_PARAMS // n_tensors
    values = [torch.randn(numel, generator=gen).to(dtype) for _ in range(n_tensors)]
    grads = [(torch.randn(numel, generator=gen) * 1e-2).to(dtype) for _ in range(n_tensors)]
    order = torch.randperm(n_tensors, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    params = _tensors(values, layout, order, thp)
    for p, g in zip(params, _tensors(grads, layout, order, thp)):
        p.grad = g
    opt = adamkit.Adam(params, lr=1e-3, backend="cpu", **options)
    opt.step()
    if layout != "separate":  # every state tensor of the params' size into the same layout
        for key, first in opt.state[params[0]].items():
            if isinstance(first, torch.Tensor) and first.shape == params[0].shape:
                moved = _tensors([opt.state[p][key] for p in params], layout, order, thp)
                for p, t in zip(params, moved):
                    opt.state[p][key] = t
    opt.step()  # plans again where the state moved
    opt.step()  # from the cached plan: its checks (and so its version bumps) as every layout's
    return opt


def measure(storage: str, n_tensors: int, rounds: int, thp: bool = False) -> dict:
    if library.compiler_path() is not None:
        native_checks.load_now()  # every layout's plan takes the C++ checks, or none does
    huge_before = huge_pages_kB()
    opts = {"64 separate": build(storage, 64, "separate")}
    for layout in LAYOUTS:
        opts[f"{n_tensors} {layout}"] = build(storage, n_tensors, layout, thp and layout != "separate")
    bumps = set()
    for opt in opts.values():
        assert opt._step_cache is not None, "the plan was not cached"
        bumps |= {cb.prepared.native_bump is not None for cb in opt._step_cache.buckets}
    assert len(bumps) == 1, "the layouts' version bumps differ"
    flush = torch.empty(1 << 26)
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            flush.add_(1.0)
            t0 = time.perf_counter()
            kernel_calls(opt)
            times[name].append(time.perf_counter() - t0)
    finals = {name: torch.cat([p.detach().reshape(-1) for p in opt.param_groups[0]["params"]])
              for name, opt in opts.items()}
    reference = finals[f"{n_tensors} separate"]
    same = all(torch.equal(f, reference) for name, f in finals.items() if name != "64 separate")
    base = times["64 separate"]
    return {
        "ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
        "paired": {name: statistics.median(a / b for a, b in zip(t, base)) for name, t in times.items()},
        "same_params": same,
        "huge_pages_kB": huge_pages_kB() - huge_before,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=1024)
    ap.add_argument("--storage", action="append", choices=list(STORAGES), help="default: bf16 nearest, fp32")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--thp", action="store_true", help="flat and shuffled buffers on transparent huge pages")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if N_PARAMS % args.tensors:
        ap.error(f"--tensors must divide {N_PARAMS}")
    results = {}
    print(f"{N_PARAMS / 1e6:.1f}M params, {torch.get_num_threads()} threads, {args.rounds} rounds; "
          f"kernel ms per step (median), paired ratio to 64 separate tensors")
    for storage in args.storage or ["bf16 nearest", "fp32"]:
        r = results[storage] = measure(storage, args.tensors, args.rounds, args.thp)
        cells = "  ".join(f"{name} {r['ms'][name]:.2f} ({r['paired'][name]:.3f})" for name in r["ms"])
        huge = f"  (on huge pages: {r['huge_pages_kB'] / 1024:.0f} MiB)" if args.thp else ""
        print(f"{storage}: {cells}" + ("" if r["same_params"] else "  PARAMS DIFFER") + huge)
    if args.out:
        args.out.write_text(json.dumps({"thp": args.thp, "tensors": args.tensors, "results": results}, indent=1))


if __name__ == "__main__":
    main()
