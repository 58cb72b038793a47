"""Params off the CPU: the torch backend's device paths, checked on the meta device
(which raises where tensors of two devices meet, and computes no values), as CI has no
GPU; and on CUDA where there is one (marked gpu: skipped without)."""

from __future__ import annotations

import pytest
import torch

import adamkit
from adamkit import backends
from adamkit.backends import torch_ops


@pytest.mark.parametrize("fmt", [None, "fp32"])  # (int8's conversion reads scale values: none on meta)
def test_master_follows_its_param_to_another_device(fmt):
    """A master param moved to another device after its state exists (``module.to()``
    under swap-on-conversion; on CUDA also a load of the optimizer, then of the model,
    then ``model.cuda()``): the resync compared p with master across devices and raised
    in step, state_dict and torch_state_dict, where every other storage moves its state
    to the param's device."""
    p = torch.nn.Parameter(torch.randn(5000).bfloat16())
    opt = adamkit.Adam([p], param_update="master", state_format=fmt, int8_min_size=0, backend="torch")
    p.grad = torch.randn_like(p)
    opt.step()
    torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().to("meta")))
    p.grad = torch.empty_like(p)
    exported = opt.torch_state_dict()
    assert exported["state"][0]["exp_avg"].shape == p.shape
    opt.step()
    assert {t.device.type for t in opt.state[p].values() if t.dim() > 0} == {"meta"}


def test_a_grad_on_another_device_than_its_param_is_torchs_error():
    """``.grad`` refuses a grad of another device, but moving p through ``p.data =`` leaves
    its grad where it was (CPU and CUDA tensors are compatible there): the CPU kernel read
    the GPU address as host memory. (meta cannot be given to ``.data`` beside a CPU
    tensor, so the check is called directly here.)"""
    p = torch.zeros(4)
    with pytest.raises(RuntimeError, match="Tensor on device meta is not on the expected device cpu!"):
        backends.check_grad(p, torch.zeros(4, device="meta"))
    assert not backends.grad_fits(p, torch.zeros(4, device="meta"))
    backends.check_grad(p, torch.zeros(4))
    assert backends.grad_fits(p, torch.zeros(4))


def test_the_cached_kernel_plan_refuses_a_grad_off_the_cpu():
    """The Python refresh of a cached kernel plan (checks.cpp checks the same) took a
    grad of the planned dtype and size wherever it was."""
    ps = [torch.nn.Parameter(torch.randn(64)) for _ in range(2)]
    opt = adamkit.Adam(ps, backend="cpu")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    (cb,) = opt._step_cache.buckets
    assert cb.prepared.refresh([p.grad for p in ps])
    assert not cb.prepared.refresh([ps[0].grad, torch.empty_like(ps[1].grad, device="meta")])


def test_float32_sqrt_takes_float64_only_where_it_is_needed_and_exists():
    """CPU: torch's float32 sqrt is off by an ulp for part of the inputs, float64 rounds
    correctly. CUDA's float32 sqrt is correctly rounded itself (test below), and MPS has
    no float64: both their own."""
    assert torch_ops._float64_sqrt(torch.device("cpu"))
    assert not torch_ops._float64_sqrt(torch.device("cuda"))
    assert not torch_ops._float64_sqrt(torch.device("mps"))
    x = torch.randint(0x00800000, 0x7F800000, (1 << 16,), dtype=torch.int32).view(torch.float32)
    assert torch.equal(torch_ops._sqrt(x), x.double().sqrt().float())


@pytest.mark.gpu
def test_cudas_float32_sqrt_is_correctly_rounded():
    """What _sqrt relies on to skip the float64 detour on CUDA."""
    x = torch.randint(0x00800000, 0x7F800000, (1 << 24,), dtype=torch.int32, device="cuda").view(torch.float32)
    assert torch.equal(x.sqrt(), x.double().sqrt().float())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, kw", [(torch.bfloat16, {}), (torch.float32, {"state_format": "int8"}),
                                       (torch.bfloat16, {"param_update": "stochastic"})],
                         ids=["bf16 kahan", "fp32 int8", "bf16 stochastic"])
def test_the_torch_backend_on_cuda_is_the_cpu_kernels_bits(dtype, kw):
    """formats.md's operations, each rounded once, give the same bits on CUDA."""
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(1 << 14, generator=gen).to(dtype)
    grads = [torch.randn(1 << 14, generator=gen).to(dtype) for _ in range(5)]
    runs = []
    for device, backend in (("cpu", "cpu"), ("cuda", "torch")):
        p = torch.nn.Parameter(init.clone().to(device))
        opt = adamkit.AdamW([p], lr=1e-2, weight_decay=0.1, backend=backend, **kw)
        for g in grads:
            p.grad = g.to(device)
            opt.step()
        runs.append([p.detach().cpu(), *(t.cpu() for t in opt.state[p].values() if t.dim() > 0)])
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.uint8 else a, b)
