"""The ``adamkit`` command line.

Each subcommand is one module of this package that exposes ``add_parser(subparsers)``
(which registers its options and sets ``run`` as the parser's default) and
``run(args) -> int``. Adding a subcommand means adding its module name to
:data:`SUBCOMMANDS`.

Exit codes: 0 success (a run that diverged included: it warns), 2 a usage error (bad
option, unusable path, a checkpoint that does not fit) or a failed write, or 130 on
Ctrl-C, reported as one line on stderr, never as a traceback. main() imports the
subcommands, and torch with them, inside its guard; only an interrupt while the
``adamkit`` package itself imports torch (before main runs) is Python's traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .errors import CliError

SUBCOMMANDS = ("train", "bench", "viz")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; we print one line only,
    so that every bad argument reads the same whether argparse or our code found it."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


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
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:  # left over past a subcommand: its own --help lists what it takes
                parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as stop:  # --help, --version and argparse's errors end here
            return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
        command = f"adamkit {args.command}"
        return args.run(args)
    except CliError as err:
        message = " ".join(str(err).split())  # always a single line
        print(f"{command}: error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # outside a training loop (start-up, set-up, plotting), which says more
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
