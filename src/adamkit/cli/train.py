"""``adamkit train``: train a small character-level transformer on Python's own docs.

Compares optimizers on a real (if small) language-modelling task that needs no
download: the text is ``pydoc_data.topics`` from the Python standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

from .errors import CliError, require
from .files import lock_dir, not_in_the_way, output_dir, removed_if_failing, writable_dir
from .trainer import ADAMKIT_ONLY, ADAMKIT_OPTIMIZERS, DEFAULT_LR, DEFAULTS, DTYPES, OPTIMIZERS, SEED_LIMIT, Run

COMPARE_HELP = """\
--compare takes configurations separated by commas; each is an optimizer name,
optionally followed by ':key=value' settings for that run only. Keys: lr, dtype,
weight_decay, backend, state_format, param_update. Example:
  adamkit train --compare adam,torch-adam,sgd:lr=0.3,adamw:weight_decay=0.1
Each run writes into DIR/<configuration>/ and all curves go into DIR/compare.png."""


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def seed_int(text: str) -> int:
    """torch.manual_seed's range (SEED_LIMIT); larger seeds failed with a traceback."""
    value = _number(int, text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^64), got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(float, text)
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _number(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}")


def dtype_name(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r} (choose from {', '.join(DTYPES)})")
    return text


# What a --compare setting may change, and how its value is checked.
COMPARE_KEYS = {"lr": positive_float, "dtype": dtype_name, "weight_decay": non_negative_float,
                "backend": str, "state_format": str, "param_update": str}


def parse_compare(text: str) -> list[tuple[str, dict]]:
    """``"adam,sgd:lr=0.3"`` → ``[("adam", {"optimizer": "adam"}), ("sgd_lr=0.3", {...})]``."""
    configs = []
    for item in (part.strip() for part in text.split(",")):
        name, *settings = item.split(":")
        if name not in OPTIMIZERS:
            raise CliError(f"--compare: unknown optimizer {name!r} in {item!r} (choose from {', '.join(OPTIMIZERS)})")
        config = {"optimizer": name}
        for setting in settings:
            key, sep, value = setting.partition("=")
            if not sep or key not in COMPARE_KEYS:  # before the duplicate check: optimizer is in config
                hint = "; the optimizer is the name before the first ':'" if key == "optimizer" else ""
                raise CliError(f"--compare: bad setting {setting!r} in {item!r}; use key=value with key one of "
                               f"{', '.join(COMPARE_KEYS)}{hint}")
            if key in config:
                raise CliError(f"--compare: {key} given twice in {item!r}")
            try:
                config[key] = COMPARE_KEYS[key](value)
            except argparse.ArgumentTypeError as err:
                raise CliError(f"--compare: {key} in {item!r}: {err}")
        adamkit_only = [key for key in ADAMKIT_ONLY if key in config]
        if adamkit_only and name not in ADAMKIT_OPTIMIZERS:  # name the key given, not a flag
            verb = "is" if len(adamkit_only) == 1 else "are"
            raise CliError(f"--compare: {', '.join(adamkit_only)} in {item!r} {verb} only for adamkit's "
                           f"optimizers ({', '.join(ADAMKIT_OPTIMIZERS)}), not {name}")
        # the label names the run's directory: no separators in it
        configs.append((item.replace(":", "_").replace("/", "_").replace("\\", "_"), config))
    labels = [label for label, _ in configs]
    if len(set(labels)) != len(labels):
        raise CliError(f"--compare lists a configuration twice: {text!r}")
    return configs


def add_parser(subparsers) -> argparse.ArgumentParser:
    lrs = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
    p = subparsers.add_parser(
        "train", help="train a small character-level transformer on Python's docs",
        description=__doc__.replace("``", ""), epilog=COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Options that shape the run default to None: on --resume, "not given" means "as
    # the checkpoint says"; otherwise the defaults in trainer.DEFAULTS apply.
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {DEFAULTS['optimizer']}; "
                   "adam/adamw are adamkit's, torch-adam is torch.optim.Adam, sgd is SGD with momentum 0.9")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default: {lrs})")
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps (default {DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=positive_int, help=f"sequences per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--seed", type=seed_int, help=f"seed of init and data order (default {DEFAULTS['seed']})")
    p.add_argument("--dtype", type=dtype_name, help="dtype of the model's params: fp32 (default) or bf16")
    p.add_argument("--weight-decay", type=non_negative_float, help="passed to the optimizer (default: its own)")
    p.add_argument("--backend", help="adamkit backend (passed to adamkit only when given)")
    p.add_argument("--state-format", help="adamkit state format (passed only when given)")
    p.add_argument("--param-update", help="adamkit param update mode (passed only when given)")
    p.add_argument("--compare", metavar="CONFIGS", help="run several configurations and plot them together (see below)")
    p.add_argument("--out", metavar="DIR", type=output_dir, default=Path("runs/train"), help="output directory (default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in DIR")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if DIR holds a checkpoint")
    p.add_argument("--stop-at", type=positive_int, metavar="STEP",
                   help="stop after STEP steps with a checkpoint (split a run; continue it with --resume)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise CliError("--resume and --overwrite contradict each other")
    require("tqdm")  # fail now, not after setting up
    from .plots import pyplot

    pyplot()  # (pyplot itself: its import can fail where matplotlib's does not)
    given = {k: getattr(args, k) for k in
             ("optimizer", "lr", "steps", "batch_size", "seed", "dtype", "weight_decay", "backend", "state_format", "param_update")}
    if args.compare is not None:
        if args.optimizer is not None:
            raise CliError("--optimizer and --compare cannot be used together; name the optimizers in --compare")
        plans = [(args.out / label, label, {**given, **config}, config) for label, config in parse_compare(args.compare)]
    else:
        plans = [(args.out, "", given, {})]

    with contextlib.ExitStack() as locks:  # each run's directory, until its files are written
        return _train_all(args, plans, locks)


def _train_all(args: argparse.Namespace, plans: list, locks: contextlib.ExitStack) -> int:
    from .data import CharCorpus, load_text  # after the cheap checks

    # Set every run up before training any, so a bad configuration fails before hours of
    # work; and one that fails (or is interrupted, or runs out of memory, before its first
    # checkpoint) leaves no directories behind.
    compare_png = args.out / "compare.png"
    with removed_if_failing(args.out, *(out for out, *_ in plans)):
        writable_dir(args.out)
        if args.compare is not None:
            lock_dir(locks, args.out)  # compare.png's (a run's own directory is below it)
            not_in_the_way(compare_png)
        corpus = CharCorpus(load_text())
        runs = [Run(corpus, lock_dir(locks, writable_dir(out)), config, resume=resume,
                    overwrite=args.overwrite, label=label)
                for out, label, config, resume in _resumed(plans, args.resume and args.compare is not None)
                or [(out, label, config, args.resume) for out, label, config, _ in plans]]
        for r in runs:
            r.train(stop_at=args.stop_at)
            r.catch_up_outputs()
    baseline = math.log(corpus.vocab_size)
    # one configuration too: the docs promise DIR/compare.png; a resume of finished runs
    # writes nothing, as it says
    if args.compare is not None and (any(r.saved_this_session or r.rewrote_outputs for r in runs)
                                     or not compare_png.exists()):
        from .plots import plot_runs

        plot_runs({r.label: r.rows for r in runs}, compare_png, baseline,
                  f"adamkit train --compare ({runs[0].config.steps} steps)")
    for r in runs:
        report(r, baseline, args.stop_at)
    if args.compare is not None:
        print(f"curves of all runs: {args.out / 'compare.png'}")
    return 0


def _resumed(plans: list, compare_resume: bool) -> list:
    """``--compare --resume``: (out, label, config, resume) per configuration, where one an
    interrupt stopped before its first checkpoint (a later one in the list, say) starts
    afresh, with the options the first configuration that has a checkpoint was made with
    where this command line and its own settings leave them open: the runs stay
    comparable when the options are dropped on resume, as a single run allows. Empty
    where no configuration has a checkpoint: each resumes, and the first says there is
    nothing to resume."""
    from .checkpoint import load_checkpoint
    from .trainer import CHECKPOINT, checked_config

    started = [(out, own) for out, _, _, own in plans if (out / CHECKPOINT).exists()]
    if not compare_resume or not started:
        return []
    first_out, first_own = started[0]
    made = checked_config(load_checkpoint(first_out / CHECKPOINT)["config"], first_out)
    resumed = []
    for out, label, config, own in plans:
        if (out / CHECKPOINT).exists():
            resumed.append((out, label, config, True))
            continue
        filled = dict(config)
        for key, value in made.items():
            if key == "optimizer" or key not in config or config[key] is not None or key in own or key in first_own:
                continue  # given now, this configuration's own, or the other's own
            if key == "lr" and value == DEFAULT_LR[made["optimizer"]]:
                continue  # its optimizer's default, not a --lr: this one takes its own default
            if key in ADAMKIT_ONLY and config["optimizer"] not in ADAMKIT_OPTIMIZERS:
                continue
            filled[key] = value
        resumed.append((out, label, filled, False))
    return resumed


def report(r: Run, baseline: float, stop_at: int | None) -> None:
    """The run's summary line and, for a finished run, a sample (or why there is none)."""
    train_loss, val_loss = r.final_losses()
    val = "n/a" if val_loss is None else f"{val_loss:.3f}"
    if r.saved_this_session:
        wrote = f"wrote {r.out}/metrics.csv, loss.png, checkpoint.pt"
    elif r.rewrote_outputs:
        wrote = f"rewrote {r.out}/metrics.csv, loss.png from the checkpoint (they were behind it)"
    elif r.step == r.config.steps:
        wrote = f"already complete, nothing written to {r.out}"
    else:  # resumed with --stop-at at or below the checkpoint's step
        wrote = f"already at step {r.step} (>= --stop-at {stop_at}), nothing to do, nothing written to {r.out}"
    print(f"{r.label}: step {r.step}/{r.config.steps}, train loss {train_loss:.3f}, val loss {val} "
          f"(uniform guess: {baseline:.3f}), {r.elapsed:.1f} s; {wrote}")
    diverged = r.diverged_at()
    if diverged is not None:
        # A result, not a failure of the tool: the files record it, and a --compare
        # of several runs still plots the others. Exit code 0, one line on stderr.
        print(f"adamkit train: warning: {r.label} diverged: its loss is not finite, first at step {diverged} "
              "(try a smaller --lr)", file=sys.stderr)
    if r.step == r.config.steps:
        sample = r.sample()
        if sample is None:
            print(f"--- no sample from {r.label}: the model diverged (its outputs are not finite) ---")
        else:
            print(f"--- sample from {r.label} ---\n{sample}\n---")
