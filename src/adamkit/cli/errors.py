"""Errors the command line reports as one line (exit code 2), and optional imports."""

from __future__ import annotations

import importlib
from types import ModuleType


class CliError(Exception):
    """A mistake in the user's input or environment: ``main`` prints it as one line and
    exits with ``exit_code`` (2, the usage-error code of argparse, unless set)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by ``main``'s handler: unwinds as Ctrl-C does, exit code 143."""


def require(module: str, extra: str = "cli") -> ModuleType:
    """Import an optional dependency, or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        if err.name == top:  # the package itself is missing
            raise CliError(f"{top} is not installed; install it with: pip install 'adamkit[{extra}]'") from None
        # installed, but it (or one of its own dependencies) fails to import
        raise CliError(f"cannot import {module} ({err}); reinstall it with: "
                       f"pip install --force-reinstall 'adamkit[{extra}]'") from None
