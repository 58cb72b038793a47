"""Writing output files so that a kill at any moment leaves either the old file or the
new one, never a truncated mix: write a temp file in the same directory, fsync it,
then ``os.replace`` it over the target (atomic on POSIX and Windows)."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import CliError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp makes files only their owner can read (0600); outputs get what open() gives
_FILE_MODE = 0o666 & ~_umask()


def lock_dir(stack: contextlib.ExitStack, path: Path) -> Path:
    """Hold an exclusive lock on the directory ``path`` until ``stack`` closes, or raise
    CliError where another process holds it: two runs into one --out both passed the
    "checkpoint already exists" check, and overwrote each other's files. flock on the
    directory itself: no lock file is left behind, and the lock ends with the process,
    however it ends. Unguarded where there is no flock (Windows, some network file
    systems)."""
    try:
        import fcntl
    except ImportError:
        return path
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not a directory we can open: writing into it will say why
        return path
    stack.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CliError(f"{path} is in use by another adamkit train; wait for it to end, "
                       "or pick another --out") from None
    except OSError:  # a file system without flock
        pass
    return path


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temp file next to ``path``, then move it into place. Any
    failure to write (disk full, a directory made unwritable mid-run) is a one-line
    CliError, with the temp file removed and the old file as it was; KeyboardInterrupt
    propagates, also after removing the temp file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CliError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # an existing file keeps its mode, as when rewritten in place
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.is_file() else _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, Exception):
            raise CliError(f"cannot write {path}: {_why(err)}") from err
        raise
    _fsync_dir(path.parent)


def _why(err: Exception) -> str:
    # torch.save reports a failed write from its C++ zip writer as RuntimeError
    # ("[enforce fail at inline_container.cc:...] unexpected pos ..."), not OSError.
    if isinstance(err, OSError):
        return err.strerror or str(err)
    hint = " (is the disk full?)" if isinstance(err, RuntimeError) else ""
    return f"{type(err).__name__}: {err}{hint}"


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened on Windows.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def output_dir(text: str) -> Path:
    """An --out option's directory (argparse type): an empty one was the current
    directory, silently."""
    if not text:
        raise argparse.ArgumentTypeError("must name a directory, got an empty path")
    return Path(text)


def output_png(text: str) -> Path:
    """An --out option's PNG file (argparse type): an empty one read as the current
    directory ("--out . is a directory")."""
    if not text:
        raise argparse.ArgumentTypeError("must name a .png file, got an empty path")
    return Path(text)


def not_in_the_way(*paths: Path) -> None:
    """Output files to be (re)written: each is a file or absent, checked before any work
    (os.replace onto a directory failed only at the first save)."""
    for path in paths:
        if path.exists() and not path.is_file():
            raise CliError(f"{path} is in the way of an output file: it is not a file")


def writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and check that files can be created in it."""
    if path.exists() and not path.is_dir():
        raise CliError(f"output path {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise CliError(f"cannot write to output directory {path}: {err.strerror or err}")
    return path


@contextlib.contextmanager
def removed_if_failing(*paths: Path):
    """Directories among ``paths`` (and their parents) that do not exist yet are removed
    again, if still empty, when the block raises: a run that fails in its set-up
    leaves no empty output directories behind."""
    new = {q for path in paths for q in (path, *path.parents) if not q.exists()}
    try:
        yield
    except BaseException:
        for q in sorted(new, key=lambda q: len(q.parts), reverse=True):  # children first
            with contextlib.suppress(OSError):
                q.rmdir()
        raise
