"""Measuring: the machine's memory bandwidth and compute, and optimizer steps, interleaved.

Bandwidth is measured in the same process and rounds as the optimizers, with torch's own
multi-threaded elementwise kernels, on one buffer whose size is the optimizers' own
working set (param, grad and both moments), so that both see the same level of the
memory hierarchy (a large L3 cache holds small configs). Four patterns:

* ``read+write``: ``a.mul_(s)``: one stream read and written in place (8 B/element);
* ``2 reads + write``: ``a.add_(b)``: in place, as an optimizer updates its state;
* ``triad``: ``torch.add(b, c, alpha=s, out=a)``: STREAM's triad (12 B/element counted;
  the hardware also reads ``a`` before writing it unless it streams the stores);
* ``3 reads + write``: ``a.addcmul_(b, c)``: more reads than writes, as Adam (4 streams
  read, 3 written) does; where reads stream faster than writes this is the highest.

The probe takes its turn in the interleaved rounds like one more optimizer, and its
rate is the median over its samples, the statistic the steps get: on a machine whose
speed drifts between minutes (other tenants), a bandwidth measured at other moments, or
its best sample against the steps' median, would describe another machine. The best
pattern is the bandwidth an Adam step is held against (Adam reads and writes its param
and moments in place, and only reads the grad); the best single sample (``peak``) is
recorded beside it. ``ComputeProbe`` takes its turn too: the compute the same minutes
gave, which the bandwidth probe does not see.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from .suite import Contender


class BandwidthProbe:
    """The four patterns over one float32 buffer of ``footprint_bytes``; each ``step``
    times every pattern once. Its buffers are views of the one allocation, so the probe
    adds the footprint once to the run's memory."""

    def __init__(self, footprint_bytes: int) -> None:
        buf = torch.rand(footprint_bytes // 4)  # touches every page before any timing
        n = buf.numel()

        def part(k: int, of: int) -> torch.Tensor:  # the k-th of `of` equal slices
            return buf[k * (n // of):(k + 1) * (n // of)]

        a2, b2 = part(0, 2), part(1, 2)
        a3, b3, c3 = part(0, 3), part(1, 3), part(2, 3)
        # (work, bytes it moves); the values only grow, slowly: finite for thousands of rounds
        self.patterns = {
            "read+write": (lambda: buf.mul_(1.0000001), 8.0 * n),
            "2 reads + write": (lambda: a2.add_(b2), 12.0 * a2.numel()),
            "triad": (lambda: torch.add(b3, c3, alpha=0.5, out=a3), 12.0 * a3.numel()),
            # Adam reads more streams than it writes; on some machines reads stream faster.
            "3 reads + write": (lambda: a3.addcmul_(b3, c3), 16.0 * a3.numel()),
        }
        self.times: dict[str, list[float]] = {name: [] for name in self.patterns}

    def step(self) -> None:
        for name, (work, _) in self.patterns.items():
            t0 = time.perf_counter()
            work()
            self.times[name].append(time.perf_counter() - t0)

    def rates(self) -> dict[str, float]:
        """Bytes/second of each pattern: its median sample."""
        return self._rates(statistics.median)

    def peak_rates(self) -> dict[str, float]:
        """Bytes/second of each pattern: its best sample."""
        return self._rates(min)

    def _rates(self, seconds) -> dict[str, float]:  # seconds: list of samples -> one
        return {k: nbytes / seconds(self.times[k]) for k, (_, nbytes) in self.patterns.items()}


class ComputeProbe:
    """The compute a block's steps got: √ and a division per element, an Adam step's
    divider work, on torch's threads over float32 data that stays in the caches (2 × 512
    KiB), ``reps`` times per ``step``. Its median is what the bandwidth probe cannot see:
    on a shared machine a neighbour can take compute while memory streams as usual
    (Zen 1, session 14: every bf16 step of one block about twice as slow as in the run
    before, the bandwidth probe at its usual rate), and compute-bound steps then slow
    with it. Elements per call are above torch's grain size (32768), so both threads work."""

    N = 1 << 17

    def __init__(self, reps: int = 20) -> None:
        self.reps = reps
        self.x = torch.rand(self.N) + 0.5
        self.y = torch.empty_like(self.x)
        self.times: list[float] = []

    def step(self) -> None:
        t0 = time.perf_counter()
        for _ in range(self.reps):
            torch.sqrt(self.x, out=self.y)
            self.y.div_(self.x)
        self.times.append(time.perf_counter() - t0)

    def ns_per_element(self) -> float:
        """Wall time per element of one √ and one division, all threads: its median sample."""
        return 1e9 * statistics.median(self.times) / (self.N * self.reps)


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
        """Measured: the memory of every tensor in the optimizer's state, over the number
        of params. A tensor subclass counts what it holds (torchao's 8-bit state reports
        float32 of the param's shape, and holds uint8 codes and fp32 scales), and memory
        several states share once (bitsandbytes' code maps)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    total += _held_bytes(value, seen)
        return total / sum(p.numel() for p in self.params)


def _held_bytes(t: torch.Tensor, seen: set[tuple[int, int]]) -> int:
    if hasattr(type(t), "__tensor_flatten__"):  # a wrapper subclass: what its inner tensors hold
        names, _ = t.__tensor_flatten__()
        return sum(_held_bytes(getattr(t, name), seen) for name in names)
    key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    if key in seen:
        return 0
    seen.add(key)
    return t.untyped_storage().nbytes()


def start(contender: Contender, shapes, grads: list[torch.Tensor], seed: int = 0) -> Run:
    """Params of the contender's dtype sharing the grads; first step timed. A contender
    whose step writes into ``.grad`` (optimi's foreach step uses it as scratch) gets its
    own copies from then on (which it goes on overwriting: its ops do not depend on the
    values), and the shared ones are put back: every other contender stepped on what it
    left (61.7% zeros), where int8 steps ran 1.2× slower."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, grad in zip(shapes, grads):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(contender.dtype))
        p.grad = grad
        params.append(p)
    optimizer = contender.make(params)
    before = [g.clone() for g in grads]
    t0 = time.perf_counter()
    optimizer.step()
    first_step_s = time.perf_counter() - t0
    if not all(torch.equal(g, b) for g, b in zip(grads, before)):
        for p, g, b in zip(params, grads, before):
            g.copy_(b)
            p.grad = b
    return Run(contender, params, optimizer, first_step_s)


def interleave(runs: list, rounds: int, steps_per_round: int) -> None:
    """Round-robin with a rotating order, so drift in the machine's state (frequency,
    other load) spreads over every contender instead of landing on one. Each of ``runs``
    (a Run, or the BandwidthProbe) steps ``steps_per_round`` times per round."""
    for r in range(rounds):
        k = r % len(runs)
        for run in runs[k:] + runs[:k]:
            for _ in range(steps_per_round):
                run.step()


def grads_for(shapes, dtype: torch.dtype, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 1e-2).to(dtype) for s in shapes]
