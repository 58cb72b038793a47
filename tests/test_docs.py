"""The documentation stays true to the code: the site builds in strict mode (a missing
image or a broken link fails it), and the Python snippets of the guides run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ["README.md", "docs/index.md", "docs/adam.md", "docs/precision.md"]


def _snippets():
    for name in GUIDES:
        text = (ROOT / name).read_text()
        for k, code in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
            if not code.startswith("--8<--"):  # an included file, run by the tests of it
                yield pytest.param(code, id=f"{name}#{k}")


@pytest.mark.parametrize("code", _snippets())
def test_guide_snippets_run(code, capsys):
    """Each snippet runs, and a ``print(...)  # shown`` line prints what its comment shows
    (``...`` ending it: a prefix)."""
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
    printed = capsys.readouterr().out.splitlines()
    shown = [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+# (.*)$", code, flags=re.M)]
    if shown:  # such lines are the snippet's only prints: in order, one line each
        assert len(printed) == len(shown), printed
    for out, expected in zip(printed, shown):
        if expected.endswith("..."):
            assert out.startswith(expected[:-3]), (out, expected)
        else:
            assert out == expected, (out, expected)


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
