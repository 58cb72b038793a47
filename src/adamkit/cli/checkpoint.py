"""Reading a checkpoint of ``adamkit train`` back: every check that turns a damaged,
foreign or hand-edited file into a one-line CliError (or ValueError, which the run
reports as "does not fit") before anything is restored, so none fails mid-run."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import torch

from .errors import CliError

METRICS = ("step", "loss", "val_loss", "lr", "elapsed")  # the fields of a metrics row


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise CliError(f"nothing to resume: {path} does not exist")
    if not path.is_file():
        raise CliError(f"cannot resume: {path} is not a file")
    try:
        saved = torch.load(path, weights_only=True)
    except OSError as err:  # the file's access, not its content (no read permission, say)
        raise CliError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except Exception as err:  # any unreadable file is the user's input, not our bug
        damaged = _failing_crc(path)  # a changed byte that breaks unpickling says so too
        if damaged:
            raise _damaged(path, damaged) from None
        raise CliError(f"cannot read checkpoint {path} ({type(err).__name__}): is it one adamkit train wrote?")
    if not isinstance(saved, dict) or "config" not in saved or "step" not in saved:
        raise CliError(f"{path} is not a checkpoint of adamkit train (no config and step)")
    step = saved["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CliError(f"{path} is not a checkpoint of adamkit train (step {step!r})")
    damaged = _failing_crc(path)
    if damaged:
        raise _damaged(path, damaged)
    return saved


def _damaged(path: Path, part: str) -> CliError:
    return CliError(f"checkpoint {path} is damaged: its part {part} fails its CRC-32 check "
                    "(the file changed after it was written)")


def _failing_crc(path: Path) -> str | None:
    """The first member of a checkpoint's zip whose data does not match its CRC-32, if
    any. torch.load never checks them, so a flipped byte in a tensor loaded silently.
    torch.save has always written them; a CRC of 0 is taken as one written without
    (torch.serialization.set_crc32_options(False)), and a file that is not a zip (torch's
    legacy format) is not checked."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):  # torch read it: another layout, not damage
        return None
    with archive:
        for info in archive.infolist():
            if info.CRC == 0:
                continue
            try:
                with archive.open(info) as member:  # raises at its end if the CRC differs
                    while member.read(1 << 20):
                        pass
            except (zipfile.BadZipFile, OSError, ValueError):
                return info.filename
    return None


def check_progress(saved: dict, steps: int) -> None:
    """The step, elapsed time and metric rows of a checkpoint, as `adamkit train` writes
    them (ValueError otherwise): a hand-edited one failed with a TypeError mid-run."""
    step, elapsed, rows = saved["step"], saved["elapsed"], saved["metrics"]
    if not 0 <= step <= steps:
        raise ValueError(f"step {step}, of {steps} steps")
    if not (is_number(elapsed) and 0 <= elapsed < math.inf):
        raise ValueError(f"elapsed {elapsed!r} is not a time in seconds")
    if not isinstance(rows, list) or len(rows) != step:
        raise ValueError(f"step {step} with metrics {_short(rows)}: not {step} rows")
    for i, row in enumerate(rows, 1):
        ok = (isinstance(row, dict) and set(row) == set(METRICS) and type(row["step"]) is int
              and row["step"] == i and all(is_number(row[k]) for k in ("loss", "lr", "elapsed"))
              and (row["val_loss"] is None or is_number(row["val_loss"])))
        if not ok:
            raise ValueError(f"metrics row {i} is {_short(row)}, not one of adamkit train's")


def check_scheduler(state: dict, step: int, n_groups: int) -> None:
    """The LambdaLR state as this trainer leaves it (ValueError otherwise): a hand-edited
    one loaded and then failed at the first step."""
    last, base = state.get("last_epoch"), state.get("base_lrs")
    if type(last) is not int or last != step:
        raise ValueError(f"scheduler last_epoch {last!r}, at step {step}")
    if not (isinstance(base, list) and len(base) == n_groups
            and all(is_number(x) and 0 < x < math.inf for x in base)):
        raise ValueError(f"scheduler base_lrs {base!r}: not {n_groups} learning rates")


def is_number(value: object) -> bool:
    """An int or float, not a bool (json and pickle keep True apart from 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
