"""One training run of the character model: set up (fresh or from a checkpoint), train,
write metrics, plots and checkpoints.

A run is fully determined by its ``RunConfig``. Resuming restores everything the
loop reads (params, optimizer and scheduler state, RNG states, step, metrics), so a run
split in two gives bitwise the same params and metrics (but the wall-clock ``elapsed``) as
one that never stopped, on the same machine with the same torch thread count: torch's
CPU kernels for the model round differently with another.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import adamkit

from .checkpoint import METRICS, check_progress, check_scheduler, is_number, load_checkpoint
from .data import CharCorpus
from .errors import CliError, Terminated, require
from .files import atomic_write, not_in_the_way
from .model import CharTransformer
from .plots import diverged_at, plot_runs

OPTIMIZERS = ("adam", "adamw", "torch-adam", "sgd")
ADAMKIT_OPTIMIZERS = ("adam", "adamw")
ADAMKIT_ONLY = ("backend", "state_format", "param_update")  # passed to adamkit only when given
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SGD needs a much larger lr than Adam: its step is proportional to the gradient's size.
DEFAULT_LR = {"adam": 3e-3, "adamw": 3e-3, "torch-adam": 3e-3, "sgd": 0.3}
DEFAULTS = dict(optimizer="adam", dtype="fp32", steps=1500, batch_size=32, seed=0)
SEED_LIMIT = 2**64  # torch.manual_seed takes 0 <= seed < 2^64
# The model's shape is fixed by the code, not by options, so checkpoints always fit it.
MODEL = dict(context=64, width=96, layers=3, heads=4)
EVALS_PER_RUN = 10
VAL_BATCHES = 8
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class RunConfig:
    """Everything that changes the numbers a run produces."""

    optimizer: str
    dtype: str
    steps: int
    lr: float
    batch_size: int
    seed: int
    weight_decay: float | None = None
    backend: str | None = None
    state_format: str | None = None
    param_update: str | None = None

    @classmethod
    def resolve(cls, given: dict, saved: dict | None, where: Path) -> RunConfig:
        """Options given on the command line (None = not given) over a checkpoint's or the
        defaults. Resuming with an option that differs from the checkpoint's is an error:
        it would silently make a different run."""
        if saved is not None:
            saved = checked_config(saved, where)
            for key, value in given.items():
                if value is not None and value != saved.get(key):
                    flag = "--" + key.replace("_", "-")
                    made = f"with {flag} {saved[key]}" if saved[key] is not None else f"without {flag}"
                    raise CliError(
                        f"the checkpoint in {where} was made {made}, not with {flag} {value}; "
                        f"drop {flag} to resume it, or use another --out"
                    )
            return cls(**saved)
        values = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
        values.setdefault("lr", DEFAULT_LR[values["optimizer"]])
        return cls(**values)


def checked_config(saved: object, where: Path) -> dict:
    """A checkpoint's config as `adamkit train` writes it, or a one-line error (a
    hand-edited or foreign checkpoint failed with tracebacks, or trained as SGD)."""
    def fail(why: str):
        raise CliError(f"the checkpoint in {where} does not fit adamkit train: its config {why}")

    if not isinstance(saved, dict):
        fail(f"is a {type(saved).__name__}, not a dict")
    kinds = {"optimizer": OPTIMIZERS, "dtype": tuple(DTYPES), "steps": int, "lr": float,
             "batch_size": int, "seed": int}
    config = {}
    for field in dataclasses.fields(RunConfig):
        value, kind = saved.get(field.name), kinds.get(field.name)
        if isinstance(kind, tuple):
            ok = value in kind
        elif kind is int:
            low, high = (0, SEED_LIMIT) if field.name == "seed" else (1, math.inf)
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value < high
        elif kind is float:
            ok = is_number(value) and 0 < value < math.inf
        elif field.name == "weight_decay":
            ok = value is None or (is_number(value) and 0 <= value < math.inf)
        else:
            ok = value is None or isinstance(value, str)
        if not ok:
            fail(f"has {field.name}={value!r}")
        config[field.name] = value
    return config


def build_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    extra = {k: getattr(config, k) for k in ADAMKIT_ONLY if getattr(config, k) is not None}
    decay = {} if config.weight_decay is None else {"weight_decay": config.weight_decay}
    if config.optimizer in ADAMKIT_OPTIMIZERS:
        cls = adamkit.Adam if config.optimizer == "adam" else adamkit.AdamW
        try:
            return cls(params, lr=config.lr, **decay, **extra)
        except (TypeError, ValueError) as err:
            given = ", ".join(f"{k}={v!r}" for k, v in {**decay, **extra}.items())
            raise CliError(f"adamkit.{cls.__name__} does not accept {given or f'lr={config.lr}'}: {err}")
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise CliError(f"{flags}: only for adamkit's optimizers ({', '.join(ADAMKIT_OPTIMIZERS)}), "
                       f"not {config.optimizer}")
    if config.optimizer == "torch-adam":
        return torch.optim.Adam(params, lr=config.lr, **decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, **decay)


def lr_factor(steps: int):
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Run:
    """A run in ``out``: everything that can fail on bad input fails in ``__init__``,
    before any file is written."""

    def __init__(self, corpus: CharCorpus, out: Path, given: dict, *, resume: bool, overwrite: bool, label: str = "") -> None:
        self.corpus, self.out, self.label = corpus, out, label or given.get("optimizer") or ""
        self.checkpoint_path = out / CHECKPOINT
        not_in_the_way(*(out / name for name in (CHECKPOINT, "metrics.csv", "loss.png")))
        saved = load_checkpoint(self.checkpoint_path) if resume else None
        if saved is None and self.checkpoint_path.exists() and not overwrite:
            raise CliError(
                f"{self.checkpoint_path} already exists; pass --resume to continue it "
                "or --overwrite to start again"
            )
        self.config = config = RunConfig.resolve(given, saved and saved["config"], out)
        self.label = label or config.optimizer
        _check_batch_size(corpus, config.batch_size)

        torch.manual_seed(config.seed)
        self.model = CharTransformer(corpus.vocab_size, **MODEL).to(DTYPES[config.dtype])
        self.optimizer = build_optimizer(config, self.model.parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config.steps))
        random.seed(config.seed)
        self.data_rng = torch.Generator().manual_seed(config.seed)
        # Global RNG states as of now (or the checkpoint's): train() reinstates them, so
        # that setting up other runs in between (--compare) cannot change this one.
        self.global_rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        self.step, self.elapsed, self.rows = 0, 0.0, []
        self.saved_step: int | None = None  # the step this run's checkpoint file holds
        self.saved_this_session = False
        self.rewrote_outputs = False  # metrics.csv and loss.png only (catch_up_outputs)
        if saved is not None:
            try:
                self._restore(saved)
            except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as err:  # a part not a dict
                raise CliError(f"checkpoint {self.checkpoint_path} does not fit this run: {err}")
        try:
            self.val_batches = corpus.val_batches(config.batch_size, MODEL["context"], VAL_BATCHES)
        except (RuntimeError, MemoryError) as err:  # torch's CPU allocator raises RuntimeError
            raise CliError(f"--batch-size {config.batch_size}: cannot allocate its validation batches "
                           f"({str(err).splitlines()[0] if str(err) else type(err).__name__})")

    # ---- checkpoints ----------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "elapsed": self.elapsed,
            "metrics": self.rows,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "data": self.data_rng.get_state(), "python": random.getstate()},
        }

    def _restore(self, saved: dict) -> None:
        # Everything the loop reads later is checked here: an edited field failed mid-run.
        check_progress(saved, self.config.steps)
        torch.Generator().set_state(saved["rng"]["torch"])  # fails now, on a throwaway
        dtype = DTYPES[self.config.dtype]  # load_state_dict would cast the params silently
        model = saved["model"]  # (not a dict, or no tensors: load_state_dict says so below)
        if isinstance(model, dict) and any(isinstance(t, torch.Tensor) and t.is_floating_point()
                                           and t.dtype != dtype for t in model.values()):
            raise ValueError(f"its model's params are not {self.config.dtype}, as its config says")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        check_scheduler(self.scheduler.state_dict(), saved["step"], len(self.optimizer.param_groups))
        self.data_rng.set_state(saved["rng"]["data"])
        self.global_rng = {"torch": saved["rng"]["torch"], "python": saved["rng"]["python"]}
        random.setstate(saved["rng"]["python"])  # fails now, not mid-run, if malformed
        self.step, self.elapsed, self.rows = saved["step"], float(saved["elapsed"]), list(saved["metrics"])
        self.saved_step = self.step

    def save(self) -> None:
        """Checkpoint, metrics and plot, each replaced atomically, checkpoint first (what
        a resume reads; the others follow from it: catch_up_outputs)."""
        state = self._state()
        atomic_write(self.checkpoint_path, lambda f: torch.save(state, f))
        self.saved_step, self.saved_this_session = self.step, True
        self.write_outputs()

    def write_outputs(self) -> None:
        atomic_write(self.out / "metrics.csv", lambda f: f.write(metrics_csv(self.rows).encode()))
        plot_runs({self.label: self.rows}, self.out / "loss.png", math.log(self.corpus.vocab_size),
                  f"adamkit train: {self.label}, {self.config.steps} steps, {self.config.dtype}")

    def catch_up_outputs(self) -> None:
        """After a session that saved nothing (a resume with nothing left to train):
        rewrite metrics.csv and loss.png where they lag the checkpoint, as a save
        interrupted (or failed) after the checkpoint's rename leaves them."""
        if self.saved_this_session or self.saved_step is None:
            return
        metrics, plot = self.out / "metrics.csv", self.out / "loss.png"
        try:
            current = metrics.read_bytes() == metrics_csv(self.rows).encode()
            behind = not current or plot.stat().st_mtime_ns < self.checkpoint_path.stat().st_mtime_ns
        except OSError:  # missing (or unreadable: rewriting says why)
            behind = True
        if behind:
            self.write_outputs()
            self.rewrote_outputs = True

    # ---- the loop -------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = [self.model.loss(x, y).item() for x, y in self.val_batches]
        self.model.train()
        return sum(losses) / len(losses)

    def train(self, stop_at: int | None = None) -> None:
        """Train up to step ``stop_at`` (default: the end), checkpointing at every evaluation."""
        tqdm = require("tqdm").tqdm
        config, context = self.config, MODEL["context"]
        stop = config.steps if stop_at is None else min(stop_at, config.steps)
        eval_every = max(1, config.steps // EVALS_PER_RUN)
        tokens = config.batch_size * context
        # no bar where there is nothing to train (a resume of a finished run drew one)
        bar = tqdm(total=config.steps, initial=self.step, desc=self.label, unit="step", dynamic_ncols=True,
                   disable=self.step >= stop)
        torch.set_rng_state(self.global_rng["torch"])
        random.setstate(self.global_rng["python"])
        start = session_start = time.perf_counter()
        start_step = self.step
        try:
            while self.step < stop:
                x, y = self.corpus.train_batch(config.batch_size, context, self.data_rng)
                loss = self.model.loss(x, y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
                self.scheduler.step()
                self.step += 1
                done = self.step % eval_every == 0 or self.step == config.steps
                val = self.evaluate() if done else None
                now = time.perf_counter()
                self.rows.append(dict(step=self.step, loss=loss.item(), val_loss=val, lr=lr,
                                      elapsed=self.elapsed + now - start))
                bar.update(1)
                rate = tokens * (self.step - start_step) / (now - session_start)
                bar.set_postfix_str(f"loss {loss.item():.3f}, {rate:,.0f} tok/s", refresh=False)
                if done or self.step == stop:
                    self.elapsed += now - start
                    start = now
                    self.save()
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (cli.main: Terminated)
            bar.close()  # before the message, which must be the last line
            how, code = ("terminated", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
            if self.saved_step is None:  # a file there is another run's (--overwrite)
                raise CliError(f"{how} at step {self.step}, before this run's first checkpoint: "
                               "nothing to resume", exit_code=code) from None
            raise CliError(f"{how} at step {self.step}; {self.checkpoint_path} holds step "
                           f"{self.saved_step}, continue with --resume", exit_code=code) from None
        except (RuntimeError, MemoryError) as err:
            if not _out_of_memory(err):
                raise
            raise CliError(f"out of memory in step {self.step + 1} at --batch-size {config.batch_size} "
                           "(try a smaller one)" + (f"; {self.checkpoint_path} holds step {self.saved_step}"
                                                    if self.saved_step is not None else "")) from None
        finally:
            bar.close()  # also on a failed write: the error line comes after the bar

    def final_losses(self) -> tuple[float, float | None]:
        """Mean train loss of the last 5% of steps, and the last validation loss."""
        tail = self.rows[-max(1, len(self.rows) // 20):]
        vals = [r["val_loss"] for r in self.rows if r["val_loss"] is not None]
        return sum(r["loss"] for r in tail) / len(tail), (vals[-1] if vals else None)

    def diverged_at(self) -> int | None:
        """If the run ends with a loss that is not finite, the first step with such a loss
        (plots.diverged_at); else None."""
        return diverged_at(self.rows)

    def sample(self, length: int = 300, prompt: str = "The ") -> str | None:
        """Generated text, or None when the model's outputs are not finite (it diverged)."""
        # Its own generator: sampling never touches the training RNG streams.
        try:
            ids = self.model.generate(self.corpus.encode(prompt), length, torch.Generator().manual_seed(self.config.seed))
        except FloatingPointError:
            return None
        return self.corpus.decode(ids)


def _check_batch_size(corpus: CharCorpus, batch_size: int) -> None:
    """A batch holds at most as many windows as the training text has (the starts
    ``train_batch`` draws from): more is not a batch of this text but an allocation
    failure (a traceback) or minutes of swapping."""
    windows = len(corpus.train) - MODEL["context"]
    if batch_size > windows:
        raise CliError(f"--batch-size {batch_size} is larger than the {windows} windows of "
                       f"{MODEL['context']} characters in the training text")


def metrics_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRICS)
    for row in rows:
        writer.writerow(["" if row[k] is None else (repr(row[k]) if isinstance(row[k], float) else row[k]) for k in METRICS])
    return buffer.getvalue()


def _out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: torch's CPU allocator raises RuntimeError for it."""
    return isinstance(err, MemoryError) or "can't allocate memory" in str(err)
