"""The ``adamkit`` command line.

Each subcommand is one module of this package that exposes ``add_parser(subparsers)``
(which registers its options and sets ``run`` as the parser's default) and
``run(args) -> int``. Adding a subcommand means adding its module name to
:data:`SUBCOMMANDS`.

Exit codes: 0 success (a run that diverged included: it warns), 2 a usage error (bad
option, unusable path, a checkpoint that does not fit) or a failed write (standard
output too), 130 on Ctrl-C, 143 on SIGTERM (both as interrupts: temp files removed,
the checkpoint as the last save left it), reported as one line on stderr, never as a
traceback; 141, silently, where standard output was closed (``adamkit train | head``). main() imports the
subcommands, and torch with them, inside its guard; only an interrupt while the
``adamkit`` package itself imports torch (before main runs) is Python's traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib import import_module

from .errors import CliError, Terminated

SUBCOMMANDS = ("train", "bench", "viz")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; we print one line only,
    so that every bad argument reads the same whether argparse or our code found it."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def _print_message(self, message: str, file=None) -> None:
        # argparse drops an OSError here, so --help into a full disk or a closed pipe
        # exited 0 unwritten; on stdout it is main's to report (stderr has no one to tell)
        if message and (file or sys.stderr) is sys.stdout:
            sys.stdout.write(message)
        else:
            super()._print_message(message, file)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineErrorParser(
        prog="adamkit", description="Adam-family optimizers for PyTorch: demos and tools."
    )
    parser.add_argument("--version", action="version", version=f"adamkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        import_module(f"{__name__}.{name}").add_parser(subparsers)
    parser.subcommands = subparsers.choices  # their parsers, by name
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Everything heavy (the subcommands import torch and adamkit's optimizers) is imported
    inside the guard below, so Ctrl-C while it loads is one line too."""
    command = "adamkit"  # until the subcommand is known
    previous = _terminate_as_interrupt()
    _usable_streams()
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:  # left over past a subcommand: its own --help lists what it takes
                parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as stop:  # --help, --version and argparse's errors end here
            sys.stdout.flush()  # in the guard: a closed or full stdout fails here, not at exit
            return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
        command = f"adamkit {args.command}"
        code = args.run(args)
        sys.stdout.flush()  # what a pipe or file still buffers
        return code
    except CliError as err:
        message = " ".join(str(err).split())  # always a single line
        print(f"{command}: error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as stop:  # outside a training loop (start-up, set-up, plotting), which says more
        print(f"{command}: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except BrokenPipeError:  # stdout closed by its reader: stop quietly, as `head` expects
        _stdout_to_devnull()
        return 141
    except OSError as err:
        if err.filename is not None:  # a path's (files are CliErrors: files.atomic_write)
            print(f"{command}: error: {err.filename}: {err.strerror or err}", file=sys.stderr)
            return 2
        _stdout_to_devnull()  # a write to stdout failed: what is buffered would fail again
        print(f"{command}: error: cannot write output: {err.strerror or err}", file=sys.stderr)
        return 2
    finally:
        if previous is not _UNCHANGED:
            signal.signal(signal.SIGTERM, previous)


_UNCHANGED = object()


def _usable_streams() -> None:
    """A closed stdout or stderr (``>&-``: Python makes it None) takes os.devnull, as
    print() treats None, so tqdm and our flushes do not fail on it; and text the stream's
    encoding cannot hold (the sample of text with ’ or …, under LC_ALL=C) is escaped
    rather than an UnicodeEncodeError after the run."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w"))
        elif hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # detached, or not reconfigurable now
                pass


def _terminate_as_interrupt():
    """SIGTERM raises Terminated (a KeyboardInterrupt), so that it unwinds as Ctrl-C does:
    temp files removed, new empty directories too. Returns the previous handler, or
    _UNCHANGED where it is left as it is: an ignored SIGTERM (the parent's choice), a
    handler set outside Python (which could not be put back), or a thread other than the
    main one (which cannot set handlers)."""
    def handler(signum, frame):
        raise Terminated()

    current = signal.getsignal(signal.SIGTERM)
    if current is signal.SIG_IGN or current is None:
        return _UNCHANGED
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # signal only works in the main thread
        return _UNCHANGED


def _stdout_to_devnull() -> None:
    # what is still buffered would fail again at exit, as a second error
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (captured, closed)
        pass
