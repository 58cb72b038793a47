"""Reporting: the table, the JSON record and the bar chart."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..cli.files import atomic_write  # a kill mid-write leaves the old file or the new


def machine() -> dict[str, Any]:
    """What the numbers were measured on. /proc/cpuinfo's family, model and cache size
    with the name: virtual machines often say only "AMD EPYC", which told Zen 4 runs from
    Zen 5 runs by nothing but the host kernel's string."""
    model = platform.processor() or "unknown"
    cpuinfo: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            if not line.strip():
                break  # the first processor's block
            key, _, value = line.partition(":")
            cpuinfo.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = cpuinfo.get("model name", model)
    memory = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except (OSError, ValueError, IndexError):
        pass
    from ..backends import cpu
    from ..backends.cpu import native_checks

    return {
        "cpu": model,
        "cpu_vendor_family_model_stepping": " ".join(
            cpuinfo.get(k, "?") for k in ("vendor_id", "cpu family", "model", "stepping")),
        "cpu_cache": cpuinfo.get("cache size"),
        "memory": memory,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "adamkit_cpu_kernel": cpu.BACKEND.isa if cpu.BACKEND.unavailable_reason() is None else None,
        "adamkit_native_checks": native_checks.status(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


HEADER = ("config", "optimizer", "ms/step", "Mparam/s", "B/param", "bw GB/s", "% bw", "% peak bw",
          "state B/param", "first step s", "vs torch")


def rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = []
    for r in results:
        ratio = f"{r['speedup_vs_torch_fused']:.2f}x" if r.get("speedup_vs_torch_fused") else ""
        out.append((
            r["config"], r["optimizer"], f"{r['ms_per_step']:.2f}", f"{r['mparams_per_s']:.0f}",
            f"{r['bytes_per_param']:.2f}", f"{r['bandwidth_Bps'] / 1e9:.1f}",
            f"{100 * r['bandwidth_fraction']:.0f}%", f"{100 * r['bandwidth_fraction_of_peak']:.0f}%",
            f"{r['state_bytes_per_param']:.2f}", f"{r['first_step_s']:.3f}", ratio,
        ))
    return out


def table(results: list[dict[str, Any]]) -> str:
    """A plain-text table (markdown pipe syntax, so it pastes into RESULTS.md)."""
    body = [HEADER, *rows(results)]
    widths = [max(len(row[i]) for row in body) for i in range(len(HEADER))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    lines = [fmt(HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt(row) for row in body[1:]])


def save_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))


def save_chart(path: Path, results: list[dict[str, Any]]) -> bool:
    """One panel per config: fraction of the measured bandwidth per optimizer. False if
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    configs = list(dict.fromkeys(r["config"] for r in results))
    fig, axes = plt.subplots(len(configs), 1, figsize=(9, 0.32 * len(results) + 1.2 * len(configs)),
                             squeeze=False)
    for ax, config in zip(axes[:, 0], configs):
        rs = [r for r in results if r["config"] == config]
        names = [r["optimizer"] for r in rs]
        fractions = [100 * r["bandwidth_fraction"] for r in rs]
        colors = ["tab:blue" if r["library"] == "adamkit" else "tab:gray" for r in rs]
        ax.barh(names, fractions, color=colors)
        for y, (f, r) in enumerate(zip(fractions, rs)):
            ax.text(f + 1, y, f"{r['ms_per_step']:.1f} ms", va="center", fontsize=7)
        ax.axvline(100, color="k", lw=0.8, ls="--")
        ax.invert_yaxis()
        # room for the longest bar's label (a bar at the old fixed 130 lost its label)
        ax.set_xlim(0, max(130, 1.15 * max(fractions, default=0)))
        ax.set_title(f"{config}: % of the memory bandwidth measured in the same rounds "
                     "(bytes moved / time, medians)", fontsize=9)
        ax.set_xlabel("% of the measured bandwidth (labels: ms per step)", fontsize=7)
        ax.tick_params(labelsize=7)
    from matplotlib.patches import Patch

    axes[0, 0].legend(handles=[Patch(color="tab:blue", label="adamkit"), Patch(color="tab:gray", label="others")],
                      fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return True
