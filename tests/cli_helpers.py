"""Helpers shared by the command-line tests: a tiny training run and its outputs."""

from __future__ import annotations

import csv
from pathlib import Path

from adamkit.cli import main
from adamkit.cli.trainer import METRICS


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--steps", "4", "--batch-size", "4"]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--out", str(out), *TINY, *extra])


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == METRICS
        return list(reader)


def assert_one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, captured
    assert err and "\n" not in err, err
    assert "Traceback" not in captured.err and err.startswith("adamkit")
    return err
