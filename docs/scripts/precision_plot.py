"""Draws docs/img/precision.png from the runs of examples/low_precision.py.

    PYTHONPATH=src python docs/scripts/precision_plot.py

Three panels: the regression whose updates are ~10× below half a bfloat16 ulp (loss per
step for each param update policy), the MLP with fp32 vs int8 moments, and the state
memory per param element (``Adam.state_bytes(per_element=True)`` on a 2^20-element
tensor). Also prints the numbers docs/precision.md quotes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import adamkit  # noqa: E402
import low_precision  # noqa: E402

MEMORY = {  # label: (param dtype, optimizer kwargs)
    "fp32 params\nfp32 state": (torch.float32, {}),
    "fp32 params\nbf16 state": (torch.float32, {"state_format": "bf16"}),
    "fp32 params\nint8 state": (torch.float32, {"state_format": "int8"}),
    "bf16 params\nbf16, nearest": (torch.bfloat16, {"param_update": "nearest"}),
    "bf16 params\nbf16, kahan": (torch.bfloat16, {}),
    "bf16 params\nbf16, master": (torch.bfloat16, {"param_update": "master"}),
    "bf16 params\nint8, kahan": (torch.bfloat16, {"state_format": "int8"}),
}


def state_bytes(dtype: torch.dtype, kwargs: dict) -> float:
    p = torch.nn.Parameter(torch.zeros(2**20, dtype=dtype))
    opt = adamkit.Adam([p], **kwargs)
    p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_bytes(per_element=True)


def main() -> None:
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))

    base = low_precision.regression(torch.float32)
    ax1.plot(base, label="float32 params", color="black", lw=2)
    print("regression: final loss, share of float32's loss reduction")
    for update, color in (("nearest", "tab:red"), ("kahan", "tab:blue"), ("master", "tab:green"),
                          ("stochastic", "tab:orange")):
        losses = low_precision.regression(torch.bfloat16, param_update=update)
        share = low_precision.reduction(losses) / low_precision.reduction(base)
        ax1.plot(losses, label=f"bfloat16, {update} ({share:.1%})", color=color,
                 ls="--" if update == "master" else "-")
        print(f"  {update:10s} {losses[-1]:.5f} {share:.1%}")
    ax1.set(yscale="log", xlabel="step", ylabel="loss (MSE)",
            title="Updates ~10× below half a bfloat16 ulp\n(share of float32's loss reduction)")
    ax1.legend(fontsize=8)

    print("mlp: final loss fp32 / int8 moments")
    for seed, alpha in ((0, 1.0), (1, 0.5), (2, 0.5)):
        fp32, _ = low_precision.mlp(seed)
        int8, _ = low_precision.mlp(seed, state_format="int8", int8_min_size=0)
        label = seed == 0
        ax2.plot(fp32, color="black", alpha=alpha, label="fp32 moments" if label else None)
        ax2.plot(int8, color="tab:purple", ls="--", alpha=alpha,
                 label="int8 moments (every tensor)" if label else None)
        print(f"  seed {seed}: {fp32[-1]:.5f} {int8[-1]:.5f} {int8[-1] / fp32[-1] - 1:+.2%}")
    ax2.set(yscale="log", xlabel="step", ylabel="loss (MSE)", title="MLP 16-64-64-1, 3 seeds")
    ax2.legend(fontsize=8)

    print("state bytes per param element (2^20-element tensor)")
    labels, values = [], []
    for label, (dtype, kwargs) in MEMORY.items():
        labels.append(label)
        values.append(state_bytes(dtype, kwargs))
        print(f"  {label.replace(chr(10), ', '):28s} {values[-1]:.3f}")
    colors = ["tab:gray"] * 3 + ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    bars = ax3.barh(range(len(values)), values, color=colors)
    ax3.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax3.set_yticks(range(len(values)), [label.replace("\n", ", ") for label in labels], fontsize=8)
    ax3.invert_yaxis()
    ax3.set_xlim(0, 9)
    ax3.set(xlabel="bytes per param element", title="Optimizer state (Adam.state_bytes)")

    fig.tight_layout()
    out = ROOT / "docs" / "img" / "precision.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
