"""``adamkit bench``: the side-by-side benchmark of ``adamkit.bench`` on this machine.

Its options are adamkit.bench's own (``adamkit bench --help``); this module only
registers the subcommand so that it is listed, and hands the arguments over.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", add_help=False, prefix_chars="\0",  # every argument goes to adamkit.bench
        help="benchmark adamkit against torch.optim and peers (--quick: under a minute)",
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import main

    return main(args.rest)
