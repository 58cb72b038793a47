"""torch.optim.lr_scheduler, torch.amp.GradScaler and torch.compile work with adamkit."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import adamkit
from helpers import assert_close_scaled
from registry import ALL_BACKENDS, FAST_BACKENDS, TORCH_PARITY_TOL


def _model_and_data():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2), torch.randn(16, 4), torch.randn(16, 2)


@pytest.mark.parametrize("make_sched", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
], ids=["step", "onecycle", "cosine"])
def test_schedulers_match_torch(make_sched):
    """The same schedule gives the same lr, betas and params as with torch.optim.Adam."""
    results = []
    for cls in (adamkit.Adam, torch.optim.Adam):
        model, x, y = _model_and_data()
        opt = cls(model.parameters(), lr=0.05)
        sched = make_sched(opt)
        lrs = []
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
            lrs.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]))
        results.append((lrs, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_reduce_lr_on_plateau():
    model, x, y = _model_and_data()
    opt = adamkit.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for _ in range(3):
        sched.step(1.0)  # a loss that never improves
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_decouple_lr_follows_scheduler_shape():
    """max_lr stays at the initial lr while a scheduler lowers lr."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = adamkit.AdamW([p], lr=0.1, weight_decay=1e-4, decouple_lr=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    sched.step()
    assert opt.param_groups[0]["max_lr"] == 0.1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_decouple_lr_with_a_tensor_lr_takes_its_initial_value_as_max_lr(backend):
    """A Tensor lr's default max_lr is its value then, not the tensor: a scheduler writes
    a Tensor lr in place, and a max_lr that is the same tensor would follow it (lr/max_lr
    stays 1, the decay ignoring the schedule; a mutant did this and passed every test)."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = adamkit.AdamW([p], lr=torch.tensor(0.1), weight_decay=0.5, decouple_lr=True, backend=backend)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.1 if epoch else 1.0).step()
    group = opt.param_groups[0]
    assert float(group["lr"]) == pytest.approx(0.01) and group["max_lr"] == pytest.approx(0.1)
    assert not isinstance(group["max_lr"], torch.Tensor)
    p.grad = torch.zeros(2)  # the decay alone moves p: θ·(1 − λ·lr/max_lr)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((2,), 1 - 0.5 * 0.1), rtol=0, atol=1e-6)


def test_decouple_lr_takes_one_cycle_peak_as_max_lr():
    """OneCycleLR writes its peak into the group's `max_lr` (the key decouple_lr reads):
    the decay is then relative to that peak, so at the peak step it removes λ exactly."""
    lam = 1e-3
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p], lr=1e-3, weight_decay=lam, decouple_lr=True, max_lr=5e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10, pct_start=0.5)
    assert opt.param_groups[0]["max_lr"] == 0.2
    for _ in range(4):  # up to the peak (step 4 of 10 with pct_start=0.5: 0.5·10 − 1)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    p.grad = torch.zeros(3)  # no Adam update: only the decay moves the param
    before = p.detach().clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before * (1 - lam), rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_grad_scaler_skips_step_on_inf_and_leaves_state(bad, backend):
    model, x, y = _model_and_data()
    opt = adamkit.Adam(model.parameters(), lr=0.1, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    # One good step so state exists.
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items() if torch.is_tensor(v)}
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    model.weight.grad[0, 0] = bad
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    for k, v in state.items():
        assert torch.equal(opt.state[model.weight][k], v)
    assert scaler.get_scale() == 2.0**9


def _scaled_vs_plain(backend, unscale_first):
    """Three steps through a GradScaler and three without; returns params and grads."""
    model, x, y = _model_and_data()
    model2 = torch.nn.Linear(4, 2)
    model2.load_state_dict(model.state_dict())
    opt = adamkit.Adam(model.parameters(), lr=0.1, backend=backend)
    opt2 = adamkit.Adam(model2.parameters(), lr=0.1, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(3):
        opt.zero_grad()
        opt2.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if unscale_first:
            scaler.unscale_(opt)  # e.g. to clip: step must then not unscale again
        scaled_grads = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        torch.nn.functional.mse_loss(model2(x), y).backward()
        opt2.step()
    return model, model2, scaled_grads, scaler


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("unscale_first", [False, True], ids=["fast_path", "unscaled_by_user"])
def test_grad_scaler_steps_match_unscaled(backend, unscale_first):
    model, model2, scaled_grads, scaler = _scaled_vs_plain(backend, unscale_first)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The fast path unscales inside the step: .grad keeps the scaled values.
    for p, g in zip(model.parameters(), scaled_grads):
        assert torch.equal(p.grad, g)
    grads2 = [p.grad for p in model2.parameters()]
    ratio = 1.0 if unscale_first else scaler.get_scale()
    for g, g2 in zip(scaled_grads, grads2):
        torch.testing.assert_close(g, g2 * ratio, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("with_closure", [False, True], ids=["plain", "closure"])
def test_compiled_step_is_the_eager_step(backend, with_closure):
    """torch.compile(opt.step) runs the update eagerly: the same bits as an eager step on
    the same grads, and dynamo does not trace the planning (whose lru_caches and ctypes
    calls it warned about). A closure is still compiled."""
    import torch._dynamo

    torch._dynamo.reset()
    model, x, y = _model_and_data()
    model2 = torch.nn.Linear(4, 2)
    model2.load_state_dict(model.state_dict())
    opt = adamkit.AdamW(model.parameters(), lr=0.1, backend=backend)
    opt2 = adamkit.AdamW(model2.parameters(), lr=0.1, backend=backend)
    compiled = torch.compile(opt.step)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            if with_closure:
                loss = compiled(closure)
                assert type(loss.grad_fn).__name__ == "CompiledFunctionBackward"
            else:
                closure()
                assert compiled() is None
            for a, b in zip(model.parameters(), model2.parameters()):
                b.grad = a.grad.clone()  # the grads the compiled step used (steps never write .grad)
            opt2.step()
    assert [str(w.message) for w in caught] == []
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
        assert opt.state[a].keys() == opt2.state[b].keys()
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt2.state[b][k]) if torch.is_tensor(v) else v == opt2.state[b][k], k


_COMPILED_AFTER_IMPORT = textwrap.dedent("""
    import sys, warnings
    import torch
    preloaded = "torch._dynamo" in sys.modules  # a device plugin may import it with torch
    import adamkit
    assert preloaded or "torch._dynamo" not in sys.modules, "import adamkit imported torch._dynamo"
    compiling = []  # torch.compiler.is_compiling() inside the update: False when eager
    original = adamkit.Adam._amp_grad_scale_inv
    def probe(self):
        compiling.append(torch.compiler.is_compiling())
        return original(self)
    adamkit.Adam._amp_grad_scale_inv = probe
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    twin.load_state_dict(model.state_dict())
    opt = adamkit.AdamW(model.parameters(), lr=0.1)  # before anything imports dynamo
    eager = adamkit.AdamW(twin.parameters(), lr=0.1)
    # Training without compiling imports it neither (torch.optim's constructor, zero_grad
    # and state_dict would: torch._disable_dynamo's wrappers)
    other = torch.nn.Linear(4, 2)
    plain = adamkit.Adam(other.parameters(), lr=0.1, state_format="int8", int8_min_size=1)
    for set_to_none in (True, False):
        other(torch.randn(3, 4)).sum().backward()
        plain.step()
        plain.zero_grad(set_to_none=set_to_none)
    plain.load_state_dict(plain.state_dict())
    plain.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert preloaded or "torch._dynamo" not in sys.modules, "an eager training imported torch._dynamo"
    assert compiling == [False, False], compiling
    compiling.clear()
    compiled = torch.compile(opt.step)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            assert compiled() is None
            for a, b in zip(model.parameters(), twin.parameters()):
                b.grad = a.grad.clone()
            eager.step()
    assert [str(w.message) for w in caught] == [], caught
    assert compiling == [False] * 6, compiling  # 3 compiled steps, 3 eager ones
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
        for k, v in opt.state[a].items():
            assert torch.equal(v, eager.state[b][k]) if torch.is_tensor(v) else v == eager.state[b][k], k
    print("same bits")
""")


def test_import_leaves_dynamo_out_and_a_later_compile_still_runs_the_step_eagerly():
    """``import adamkit`` does not import torch._dynamo (torch.compiler.disable would: 1.4 s
    of a 2.6 s import), nor does training without torch.compile; an optimizer made before
    anything imported it still runs its update eagerly under a later torch.compile: the
    same bits as an eager step, no warnings. In a fresh interpreter, where nothing has
    imported dynamo yet."""
    done = subprocess.run([sys.executable, "-c", _COMPILED_AFTER_IMPORT], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "same bits"


def _train_pair(make_opts, make_sched, steps, backend="torch"):
    """The same model trained by adamkit (``backend``) and by torch.optim under one
    schedule; returns both optimizers, schedulers and params."""
    out = []
    for cls, kw in ((adamkit.AdamW, {"backend": backend}), (torch.optim.AdamW, {})):
        model, x, y = _model_and_data()
        opt = make_opts(cls, list(model.parameters()), kw)
        sched = make_sched(opt)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        out.append((opt, sched, list(model.parameters())))
    return out


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_linear_decay_to_zero_steps_on_past_its_end_and_its_checkpoint_loads(backend):
    """LinearLR(start_factor=0.1, end_factor=0) ends on lr = -2.2e-21 (its float
    arithmetic), which torch.optim steps with; adamkit re-validated every live group's
    lr and raised at that step, and refused to load its own checkpoint saved after it."""
    sched = lambda o: torch.optim.lr_scheduler.LinearLR(  # noqa: E731
        o, start_factor=0.1, end_factor=0.0, total_iters=10)
    make = lambda cls, ps, kw: cls(ps, lr=1e-2, **kw)  # noqa: E731
    (mine, _, ps), (theirs, _, qs) = _train_pair(make, sched, 12, backend)
    lr = mine.param_groups[0]["lr"]
    assert lr < 0 and lr == theirs.param_groups[0]["lr"]
    for p, q in zip(ps, qs):
        if backend == "torch":
            assert torch.equal(p, q)
        else:
            assert_close_scaled(p, q, *TORCH_PARITY_TOL[torch.float32])
    saved = mine.state_dict()
    for target in (adamkit.AdamW(ps, backend=backend), torch.optim.AdamW(qs)):
        target.load_state_dict(saved)
        assert target.param_groups[0]["lr"] == lr


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_one_cycle_with_tensor_betas_steps_as_torch_does(backend):
    """OneCycleLR with cycle_momentum writes a float beta1 beside a Tensor beta2; torch
    checks the betas' kinds only when the optimizer is made, adamkit at every step did.
    Both step on with torch.optim's numbers from the same Tensor betas (its for-loop
    path computes √(1 − β2^t) in float32 from the float32 β2: 0.8-1.2e-6 away from its
    float path in this run, where adamkit had been)."""
    sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10)  # noqa: E731
    make = lambda cls, ps, kw: cls(  # noqa: E731
        ps, lr=0.01, betas=(torch.tensor(0.9), torch.tensor(0.999)), **kw)
    (mine, _, ps), (theirs, _, qs) = _train_pair(make, sched, 6, backend)
    beta1, beta2 = mine.param_groups[0]["betas"]
    assert isinstance(beta1, float) and isinstance(beta2, torch.Tensor)
    assert (beta1, beta2) == theirs.param_groups[0]["betas"]
    for p, q in zip(ps, qs):
        if backend == "torch":
            assert torch.equal(p, q)
        else:
            assert_close_scaled(p, q, *TORCH_PARITY_TOL[torch.float32])


def test_torch_state_dict_keeps_one_cycles_peak_for_torch_to_resume():
    """OneCycleLR keeps its peak lr under the group key `max_lr` and reads it at every
    step: torch_state_dict dropped the key (adamkit's own, for decouple_lr), and torch's
    next scheduler step raised KeyError. Resumed in torch.optim, the run goes on as the
    twin that stayed in adamkit (the torch backend: torch.optim's numbers)."""
    sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20)  # noqa: E731
    make = lambda cls, ps, kw: cls(ps, lr=0.01, **kw)  # noqa: E731
    (mine, mine_sched, ps), (_, _, qs) = _train_pair(make, sched, 5)
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    theirs = torch.optim.AdamW(qs, lr=0.01)
    theirs_sched = sched(theirs)
    theirs.load_state_dict(mine.torch_state_dict())
    theirs_sched.load_state_dict(mine_sched.state_dict())
    assert theirs.param_groups[0]["max_lr"] == 0.1
    model, x, y = _model_and_data()
    for opt, sch, params in ((mine, mine_sched, ps), (theirs, theirs_sched, qs)):
        with torch.no_grad():
            for m, p in zip(model.parameters(), params):
                m.copy_(p)
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(torch.nn.functional.linear(x, *params), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sch.step()
    assert mine.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    plain = adamkit.AdamW([torch.nn.Parameter(torch.ones(2))]).torch_state_dict()
    assert "max_lr" not in plain["param_groups"][0]  # adamkit's None: torch has no use for it


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_grad_scaler_steps_an_optimizer_without_grads_as_a_no_op(backend):
    """One scaler, two optimizers, grads for one: GradScaler hands the other found_inf =
    sum([]) = 0, a Python int, where adamkit called .item() and raised AttributeError."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt_a, opt_b = adamkit.Adam([a], backend=backend), adamkit.Adam([b], backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(b.sum()).backward()
    scaler.step(opt_a)
    scaler.step(opt_b)
    scaler.update()
    assert torch.equal(a.detach(), torch.ones(3)) and not opt_a.state
    torch.testing.assert_close(b.detach(), torch.full((3,), 1 - 1e-3))


_DTENSOR_SCRIPT = r"""
import sys, torch, adamkit
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor, Shard, init_device_mesh
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
gen = torch.Generator().manual_seed(0)
for dtype, kw in ((torch.float32, {}), (torch.bfloat16, {"param_update": "kahan"})):
    start = torch.randn(4096, generator=gen).to(dtype)
    grads = [torch.randn(4096, generator=gen).to(dtype) for _ in range(3)]
    p = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
    plain = torch.nn.Parameter(start.clone())
    mine = adamkit.Adam([p], lr=1e-2, **kw)  # backend "auto": the cpu backend's bucket
    twin = adamkit.Adam([plain], lr=1e-2, backend="torch", **kw)
    for g in grads:
        p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        plain.grad = g.clone()
        mine.step()
        twin.step()
    assert torch.equal(p.to_local().detach(), plain.detach()), dtype
    print("ok", dtype)
for dtype, kw in ((torch.float32, {"state_format": "int8"}),
                  (torch.bfloat16, {"param_update": "stochastic"})):
    start = torch.randn(4096, generator=gen).to(dtype)
    p = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.ones(4096, dtype=dtype), mesh, [Shard(0)])
    opt = adamkit.Adam([p], lr=1e-2, **kw)
    try:
        opt.step()
    except NotImplementedError as e:
        assert "not supported for DTensor params" in str(e), e
        assert torch.equal(p.to_local().detach(), start) and not opt.state
        print("refused", next(iter(kw.values())))
# listed in a second group that gives it int8 moments: refused before the first group steps it
start = torch.randn(4096, generator=gen)
p = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
p.grad = distribute_tensor(torch.ones(4096), mesh, [Shard(0)])
opt = adamkit.Adam([{"params": [p]}, {"params": [torch.nn.Parameter(torch.ones(1))],
                                      "state_format": "int8"}], lr=1e-2)
opt.param_groups[1]["params"] = [p]
try:
    opt.step()
except NotImplementedError as e:
    assert torch.equal(p.to_local().detach(), start) and not opt.state
    print("refused in a later group")
dist.destroy_process_group()
"""


def test_dtensor_params_step_on_the_torch_backend_not_the_kernel(tmp_path):
    """A DTensor param's data_ptr is no storage of its values: the cpu backend took it
    into the kernel and the process died (SIGSEGV). Such tensors now run on the torch
    backend, which gives the plain tensor's numbers. In a subprocess (a crash fails the
    test, not the suite; and the process group stays out of this one). int8 moments and
    stochastic rounding, defined on a tensor's flat indices, are refused before anything
    changes (they raised midway on mixing DTensor and plain tensors)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _DTENSOR_SCRIPT, str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:5] == ["ok torch.float32", "ok torch.bfloat16",
                                           "refused int8", "refused stochastic", "refused in a later group"]


_ZERO_SCRIPT = r"""
import sys, torch, adamkit
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
for bucket_view in (False, True):
    results = []
    for make in (torch.optim.AdamW, adamkit.AdamW):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=make, lr=1e-2,
                                      weight_decay=0.1, parameters_as_bucket_view=bucket_view)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        opt.consolidate_state_dict(to=0)
        saved = opt.state_dict()
        again = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=make, lr=0.5,
                                        parameters_as_bucket_view=bucket_view)
        again.load_state_dict(saved)
        for _ in range(2):
            again.zero_grad()
            model(x).square().mean().backward()
            again.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    print("ok", bucket_view)
dist.destroy_process_group()
"""


def test_zero_redundancy_optimizer_runs_adamkit_as_torch_optim(tmp_path):
    """ZeroRedundancyOptimizer builds its local optimizer from ``optimizer_class`` and the
    defaults, and with ``parameters_as_bucket_view`` makes the params views of one flat
    buffer: adamkit.AdamW there (world size 1, gloo) steps, saves and resumes as
    torch.optim.AdamW does. In a subprocess, so the process group stays out of this one."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _ZERO_SCRIPT, str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == ["ok False", "ok True"]


_DCP_STORAGE = [dict(state_format="int8", int8_min_size=0, param_update="stochastic"),
                dict(param_update="master"), dict(state_format="bf16")]


def _dcp_save_and_load(model, opt, storage, options, directory):
    """opt's state through get_optimizer_state_dict, dcp.save to ``directory`` and dcp.load
    into a new optimizer's own state dict (DCP loads into the live tensors), then
    set_optimizer_state_dict: as torchtitan resumes. Returns the new model and optimizer."""
    import copy
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    with warnings.catch_warnings():  # no process group: DCP warns that it runs on one process
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=directory)
        resumed_model = copy.deepcopy(model)
        resumed = adamkit.Adam(resumed_model.parameters(), lr=1e-2, **storage)
        into = get_optimizer_state_dict(resumed_model, resumed, options=options)
        dcp.load({"optim": into}, checkpoint_id=directory)
    set_optimizer_state_dict(resumed_model, resumed, into, options=options)
    return resumed_model, resumed


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("storage", _DCP_STORAGE, ids=["int8-stochastic", "master", "bf16-kahan"])
def test_a_distributed_checkpoint_of_the_optimizer_resumes_bit_for_bit(storage, flatten, tmp_path):
    """torch.distributed.checkpoint's get/set_optimizer_state_dict (the state keyed by
    parameter names; flattened to one key per tensor, as torchtitan saves it, which takes
    tensors and numbers only: str tags raised NotImplementedError there) carry adamkit's
    tagged state through dcp.save and dcp.load: the resumed run is the uninterrupted one
    (docs/precision.md, "Checkpoints")."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3)).bfloat16()
    opt = adamkit.Adam(model.parameters(), lr=1e-2, **storage)
    x = torch.randn(8, 64).bfloat16()
    model(x).square().sum().backward()
    opt.step()
    saved = get_optimizer_state_dict(model, opt, options=options)
    assert ("state.0.weight.state_format" in saved) if flatten else ("0.weight" in saved["state"])
    resumed_model, resumed = _dcp_save_and_load(model, opt, storage, options, tmp_path / "ckpt")
    for m, o in ((model, opt), (resumed_model, resumed)):
        for _ in range(2):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    p, q = next(model.parameters()), next(resumed_model.parameters())
    assert set(opt.state[p]) == set(resumed.state[q])
    assert all(torch.equal(v, resumed.state[q][k]) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_a_distributed_checkpoint_of_another_format_is_refused(flatten, tmp_path):
    """DCP loads a checkpoint into the live state's own tensors, so int8 codes saved from
    one run land in another's float32 moments (values 0-255) and its scales are left
    out. The tags, tensors too, land in the live ones: the load sees int8 tags on float
    moments and refuses them, and so does the next step (its cached plan notices the
    tags written in place), instead of training on codes as moments."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    torch.manual_seed(0)
    model, other = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)
    opt = adamkit.Adam(model.parameters(), lr=1e-2, state_format="int8", int8_min_size=0)
    running = adamkit.Adam(other.parameters(), lr=1e-2)  # an fp32 run, mid-way: a cached plan
    for m, o in ((model, opt), (model, opt), (other, running), (other, running)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()  # both at step 2: the counter dcp.load writes reads what the plan expects
    assert running._step_cache is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=tmp_path)
        into = get_optimizer_state_dict(other, running, options=options)
        dcp.load({"optim": into}, checkpoint_id=tmp_path)
    with pytest.raises(ValueError, match="exp_avg is int8 state but has dtype torch.float32"):
        set_optimizer_state_dict(other, running, into, options=options)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(adamkit.UnreadableStateError, match="int8 state but has dtype torch.float32"):
        running.step()
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


@pytest.mark.parametrize("src, dst", [({"param_update": "kahan"}, {"param_update": "stochastic"}),
                                      ({}, {"state_format": "int8", "int8_min_size": 0})],
                         ids=["kahan-to-stochastic", "bf16-to-int8"])
def test_a_flattened_distributed_state_dict_loads_into_another_storage(src, dst):
    """set_optimizer_state_dict rebuilds a flattened state dict from the live state's
    keys, and gives {} for one the checkpoint lacks (sr_seed, int8 scales): read as
    absent, the state converts as any checkpoint does ("sr_seed is a dict" before)."""
    import copy

    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).bfloat16()
    opt = adamkit.Adam(model.parameters(), lr=1e-2, **src)
    model(torch.randn(8, 64).bfloat16()).square().sum().backward()
    opt.step()
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    into = copy.deepcopy(model)
    theirs = adamkit.Adam(into.parameters(), lr=1e-2, **dst)
    set_optimizer_state_dict(into, theirs, saved, options=options)
    twin = adamkit.Adam(copy.deepcopy(model).parameters(), lr=1e-2, **dst)
    twin.load_state_dict(opt.state_dict())  # the same conversion from adamkit's own state dict
    for p, q in zip(into.parameters(), twin.param_groups[0]["params"]):
        a, b = theirs.state[p], twin.state[q]
        assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_grad_scale_of_zero_raises_a_clear_error_and_changes_nothing(backend):
    """A GradScaler whose scale halved to 0 (about 166 inf steps in a row) hands the step
    grad_scale 0: 1/0 raised Python's ZeroDivisionError, where torch's fused step writes
    NaN into every param. Now a ValueError that says why."""
    model, _, _ = _model_and_data()
    opt = adamkit.Adam(model.parameters(), lr=0.1, backend=backend)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.grad_scale, opt.found_inf = torch.tensor(0.0), torch.tensor(0.0)
    with pytest.raises(ValueError, match="grad_scale is 0"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    for p, saved in zip(model.parameters(), state["state"].values()):
        for k, v in saved.items():
            assert torch.equal(opt.state[p][k], v), k
