"""Measuring: the machine's memory bandwidth, and optimizer steps, interleaved.

Bandwidth is measured in the same process and run as the optimizers, with torch's own
multi-threaded elementwise kernels, on buffers whose total size is the optimizers' own
working set (param, grad and both moments), so that both see the same level of the
memory hierarchy (a large L3 cache holds small configs):

* ``read+write``: ``a.mul_(s)``: one stream read and written in place (8 B/element);
* ``2 reads + write``: ``a.add_(b)``: in place, as an optimizer updates its state;
* ``triad``: ``torch.add(b, c, alpha=s, out=a)``: STREAM's triad (12 B/element counted;
  the hardware also reads ``a`` before writing it unless it streams the stores);
* ``3 reads + write``: ``a.addcmul_(b, c)``: more reads than writes, as Adam (4 streams
  read, 3 written) does; where reads stream faster than writes this is the highest.

The best of them is the bandwidth an Adam step is held against: Adam reads and writes
its param and moments in place, and only reads the grad.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

from .suite import Contender


def _best_rate(fn, nbytes: float, reps: int) -> float:
    fn()  # touch the pages
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times)


def bandwidth(footprint_bytes: int, reps: int = 10) -> dict[str, float]:
    """Measured bytes/second of three patterns, each over buffers totalling footprint_bytes."""
    rates = {}
    n = footprint_bytes // 4
    a = torch.rand(n)
    rates["read+write"] = _best_rate(lambda: a.mul_(1.0000001), 8.0 * n, reps)
    n = footprint_bytes // 8
    a, b = torch.rand(n), torch.rand(n)
    rates["2 reads + write"] = _best_rate(lambda: a.add_(b), 12.0 * n, reps)
    n = footprint_bytes // 12
    a, b, c = torch.rand(n), torch.rand(n), torch.rand(n)
    rates["triad"] = _best_rate(lambda: torch.add(b, c, alpha=0.5, out=a), 12.0 * n, reps)
    n = footprint_bytes // 16
    a, b, c = torch.rand(n), torch.rand(n), torch.rand(n)
    # Adam reads more streams than it writes; on some machines reads stream faster.
    rates["3 reads + write"] = _best_rate(lambda: a.addcmul_(b, c), 16.0 * n, reps)
    del a, b, c
    gc.collect()
    return rates


@dataclass
class Run:
    """One contender on one config: its optimizer and the times of its steps."""

    contender: Contender
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    first_step_s: float
    times: list[float] = field(default_factory=list)

    def step(self) -> None:
        t0 = time.perf_counter()
        self.optimizer.step()
        self.times.append(time.perf_counter() - t0)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * statistics.median(self.times)

    def state_bytes_per_param(self) -> float:
        """Measured: every tensor in the optimizer's state, over the number of params."""
        total = 0
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    total += value.numel() * value.element_size()
        return total / sum(p.numel() for p in self.params)


def start(contender: Contender, shapes, grads: list[torch.Tensor], seed: int = 0) -> Run:
    """Params of the contender's dtype sharing the read-only grads; first step timed."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, grad in zip(shapes, grads):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(contender.dtype))
        p.grad = grad  # never written by any optimizer here, so shared between them
        params.append(p)
    optimizer = contender.make(params)
    t0 = time.perf_counter()
    optimizer.step()
    return Run(contender, params, optimizer, time.perf_counter() - t0)


def interleave(runs: list[Run], rounds: int, steps_per_round: int) -> None:
    """Round-robin with a rotating order, so drift in the machine's state (frequency,
    other load) spreads over every contender instead of landing on one."""
    for r in range(rounds):
        k = r % len(runs)
        for run in runs[k:] + runs[:k]:
            for _ in range(steps_per_round):
                run.step()


def grads_for(shapes, dtype: torch.dtype, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 1e-2).to(dtype) for s in shapes]
