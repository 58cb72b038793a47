"""Max error of the CPU kernel against the float64 reference, per param dtype.

    python tools/kernel_error_report.py

Both run adamkit.Adam with default storage (fp32 state for float32 and float16 params,
bf16 state for bfloat16, param_update "nearest" so both round params the same way) for
5 steps from the same start on random tensors; errors are relative to each tensor's
largest magnitude, and also given in units of the dtype's unit roundoff.
"""

import torch

import adamkit

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def run(backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(10007,), (65, 129), (3,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    hp = dict(lr=1e-2, weight_decay=0.01, eps=1e-6)
    if backend == "torch-fused":  # torch's own fused kernel, for comparison (state in param dtype)
        opt = torch.optim.Adam(ps, fused=True, **hp)
    else:
        kw = {"param_update": "nearest"} if dtype != torch.float32 else {}
        if dtype == torch.float16 and backend == "reference-like-torch":
            kw["state_format"] = "fp32"
        opt = adamkit.Adam(ps, backend=backend, **hp, **kw)
    for _ in range(5):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(dtype)
        opt.step()
    return ps, opt


def main():
    print("| kernel | param dtype | tensor | max error / scale | in unit roundoffs |")
    print("|---|---|---|---|---|")
    for kernel in ("cpu", "torch-fused"):
        for dtype in UNIT_ROUNDOFF:
            if kernel == "torch-fused" and dtype == torch.float16:
                continue  # torch keeps fp16 state, adamkit fp32: not the same storage
            worst = {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
            for seed in range(5):
                (pa, oa), (pb, ob) = run(kernel, dtype, seed), run("reference", dtype, seed)
                for a, b in zip(pa, pb):
                    pairs = [("param", a, b)] + [(k, oa.state[a][k], ob.state[b][k]) for k in ("exp_avg", "exp_avg_sq")]
                    for name, x, y in pairs:
                        x, y = x.detach().double(), y.detach().double()
                        worst[name] = max(worst[name], ((x - y).abs().max() / y.abs().max()).item())
            for name, err in worst.items():
                print(f"| {kernel} | {str(dtype)[6:]} | {name} | {err:.2e} | {err / UNIT_ROUNDOFF[dtype]:.1f} |")


if __name__ == "__main__":
    main()
