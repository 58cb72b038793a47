"""The command line's checkpoints: resume is exact, and a damaged, edited, unreadable or
half-written checkpoint is a one-line error before any training, never touched."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adamkit.cli import main
from adamkit.cli.data import CharCorpus
from cli_helpers import assert_one_line_error, read_metrics, train


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, optimizer):
    args = ["--optimizer", optimizer, "--steps", "6", "--batch-size", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--out", str(straight), *args]) == 0
    assert main(["train", "--out", str(split), *args, "--stop-at", "3"]) == 0
    assert torch.load(split / "checkpoint.pt", weights_only=True)["step"] == 3
    assert main(["train", "--out", str(split), "--resume"]) == 0  # options come from the checkpoint

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][key][name]
            if isinstance(value, str):  # the storage tags (state_format, param_update)
                assert value == other, name
            else:
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), name
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # noqa: E731
    assert drop_time(a["metrics"]) == drop_time(b["metrics"])
    assert drop_time(read_metrics(straight / "metrics.csv")) == drop_time(read_metrics(split / "metrics.csv"))


def _interrupt_at_batch(monkeypatch, n: int) -> None:
    """Ctrl-C when the n-th training batch is drawn."""
    calls = {"n": 0}
    real_batch = CharCorpus.train_batch

    def interrupting(self, *args):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_batch(self, *args)

    monkeypatch.setattr(CharCorpus, "train_batch", interrupting)


def test_ctrl_c_keeps_the_last_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    _interrupt_at_batch(monkeypatch, 3)
    assert train(tmp_path) == 130
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last_line.startswith("adamkit train: error: interrupted at step 2") and "holds step 2" in last_line
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert train(tmp_path, "--resume") == 0


def test_an_interrupted_compare_resumes_and_starts_the_runs_it_had_not_reached(tmp_path, capsys, monkeypatch):
    """Ctrl-C in --compare's first run said "continue with --resume", but the resume
    refused the later run, which had no checkpoint yet, and only --overwrite (which drops
    the finished work) went on (found by review). The later run now starts afresh, with
    the options the first was made with where the resume leaves them out; both end as
    an uninterrupted compare does."""
    compare = ["--compare", "adam,torch-adam:lr=0.01"]
    made = ["--steps", "6", "--batch-size", "4", "--seed", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--out", str(straight), *compare, *made]) == 0
    with monkeypatch.context() as m:
        _interrupt_at_batch(m, 5)
        assert main(["train", "--out", str(split), *compare, *made]) == 130
    assert "continue with --resume" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (split / "torch-adam_lr=0.01" / "checkpoint.pt").exists()
    assert main(["train", "--out", str(split), *compare, "--resume"]) == 0
    for run in ("adam", "torch-adam_lr=0.01"):
        a = torch.load(straight / run / "checkpoint.pt", weights_only=True)
        b = torch.load(split / run / "checkpoint.pt", weights_only=True)
        assert a["config"] == b["config"] and b["step"] == 6, run
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), (run, name)
    assert (split / "compare.png").exists()


def test_a_compare_resume_with_no_checkpoint_at_all_says_nothing_to_resume(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "d"), "--compare", "adam,sgd", "--steps", "4", "--resume"]) == 2
    assert "nothing to resume" in assert_one_line_error(capsys, 2)


def test_resume_errors_never_touch_the_checkpoint(tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path)]) == 2
    assert "nothing to resume" in assert_one_line_error(capsys, 2)

    assert train(tmp_path) == 0
    capsys.readouterr()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    for argv in (["--resume", "--lr", "0.5"], ["--resume", "--optimizer", "sgd"], []):
        assert train(tmp_path, *argv) == 2  # a different run, or a fresh one over it
        assert_one_line_error(capsys, 2)
        assert (tmp_path / "checkpoint.pt").read_bytes() == before

    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    assert train(tmp_path, "--resume") == 2
    assert "cannot read checkpoint" in assert_one_line_error(capsys, 2)
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"garbage"


def _edit_checkpoint(path: Path, edit) -> None:
    saved = torch.load(path, weights_only=True)
    edit(saved)
    torch.save(saved, path)


@pytest.mark.parametrize("edit", [
    lambda s: s["config"].pop("dtype"),
    lambda s: s.__setitem__("config", ["adam"]),
    lambda s: s.__setitem__("step", "3"),
    lambda s: s["config"].__setitem__("optimizer", "foo"),  # was trained as SGD
    lambda s: s.__setitem__("step", 99),  # beyond --steps
], ids=["no dtype", "config a list", "step a string", "unknown optimizer", "step too far"])
def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path, capsys, edit):
    assert train(tmp_path) == 0
    capsys.readouterr()
    _edit_checkpoint(tmp_path / "checkpoint.pt", edit)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert train(tmp_path, "--resume") == 2
    assert "checkpoint" in assert_one_line_error(capsys, 2)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resuming_a_finished_run_says_nothing_was_written(tmp_path, capsys):
    assert train(tmp_path) == 0
    capsys.readouterr()
    before = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    assert train(tmp_path, "--resume") == 0
    out, err = capsys.readouterr()
    assert "nothing written" in out
    assert "4/4" not in err  # no progress bar for nothing to train (it drew two)
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == before


def test_resume_with_stop_at_behind_the_checkpoint_says_nothing_to_do(tmp_path, capsys):
    """It said "already complete" of a run at step 3 of 4."""
    assert train(tmp_path, "--stop-at", "3") == 0
    capsys.readouterr()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert train(tmp_path, "--resume", "--stop-at", "2") == 0
    out = capsys.readouterr().out
    assert "step 3/4" in out and "already at step 3 (>= --stop-at 2), nothing to do" in out
    assert "complete" not in out and "sample" not in out
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.fixture(scope="module")
def half_run(tmp_path_factory) -> bytes:
    """The checkpoint of a 4-step run stopped at step 2: resuming it trains."""
    out = tmp_path_factory.mktemp("half")
    assert train(out, "--stop-at", "2") == 0
    return (out / "checkpoint.pt").read_bytes()


def _flip_tensor_bytes(path: Path, member=lambda infos: max(infos, key=lambda info: info.file_size)) -> None:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        chosen = member(archive.infolist())
    data = bytearray(path.read_bytes())
    middle = chosen.header_offset + 100 + chosen.file_size // 2  # past its local header
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def _flip_pickle_bytes(path: Path) -> None:  # torch.load then fails (UnicodeDecodeError, ...)
    _flip_tensor_bytes(path, lambda infos: next(i for i in infos if i.filename.endswith("data.pkl")))


EDITS = {
    "elapsed a string": lambda s: s.__setitem__("elapsed", "x"),
    "elapsed negative": lambda s: s.__setitem__("elapsed", -1.0),
    "metrics not rows": lambda s: s.__setitem__("metrics", [1, 2]),
    "a row without loss": lambda s: s["metrics"][0].pop("loss"),
    "a row's loss a string": lambda s: s["metrics"][1].__setitem__("loss", "1.5"),
    "a row's step wrong": lambda s: s["metrics"][1].__setitem__("step", 7),
    "torch rng state": lambda s: s["rng"].__setitem__("torch", torch.zeros(3)),
    "config lr a bool": lambda s: s["config"].__setitem__("lr", True),
    "config weight_decay a bool": lambda s: s["config"].__setitem__("weight_decay", False),
    "config optimizer unknown": lambda s: s["config"].__setitem__("optimizer", "rmsprop"),
    # found by review: these failed with tracebacks (torch.manual_seed, the first
    # scheduler step)
    "config seed beyond torch's": lambda s: s["config"].__setitem__("seed", 2**64),
    "scheduler last_epoch a string": lambda s: s["scheduler"].__setitem__("last_epoch", "x"),
    "scheduler last_epoch not the step": lambda s: s["scheduler"].__setitem__("last_epoch", 7),
    "scheduler without base_lrs": lambda s: s["scheduler"].__setitem__("base_lrs", []),
    "model of another dtype": lambda s: s["model"].update({k: v.double() for k, v in s["model"].items()}),
    "model a list": lambda s: s.__setitem__("model", []),
    "scheduler a list": lambda s: s.__setitem__("scheduler", []),
    "optimizer a list": lambda s: s.__setitem__("optimizer", []),
    "model with a number": lambda s: s["model"].update({next(iter(s["model"])): 3}),
    # from a mutation audit: each of these resumed before
    "metrics a row short": lambda s: s["metrics"].pop(),
    "scheduler base_lrs zero": lambda s: s["scheduler"].__setitem__("base_lrs", [0.0] * len(s["scheduler"]["base_lrs"])),
    "scheduler base_lrs infinite": lambda s: s["scheduler"].__setitem__(
        "base_lrs", [math.inf] * len(s["scheduler"]["base_lrs"])),
}


@pytest.mark.parametrize("damage", [*EDITS, "flipped tensor bytes", "flipped pickle bytes"])
def test_an_edited_or_damaged_checkpoint_fails_before_training(tmp_path, capsys, half_run, damage):
    """Bad elapsed or metric rows failed with a TypeError mid-run; flipped bytes in a
    tensor resumed silently (torch.load does not check the zip's CRCs)."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(half_run)
    if damage in EDITS:
        _edit_checkpoint(path, EDITS[damage])
    elif damage == "flipped pickle bytes":  # said "is it one adamkit train wrote?"
        _flip_pickle_bytes(path)
    else:
        _flip_tensor_bytes(path)
    before = path.read_bytes()
    assert train(tmp_path, "--resume") == 2
    err = assert_one_line_error(capsys, 2)
    assert "checkpoint" in err and ("is damaged: its part" in err) == (damage not in EDITS)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize("lost", ["metrics.csv", "loss.png"])
def test_a_final_save_interrupted_after_its_checkpoint_is_completed_by_resume(tmp_path, capsys, monkeypatch, lost):
    """Ctrl-C (or a failed write) after the final checkpoint's rename, before metrics.csv
    or loss.png were rewritten: the checkpoint said the run was complete, and --resume
    said so too and wrote nothing, leaving the files a validation behind for good."""
    from adamkit.cli import trainer

    real_write, real_plot = trainer.atomic_write, trainer.plot_runs

    def interrupt_at_the_end(path):
        if path.name == lost and torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4:
            raise KeyboardInterrupt

    def write(path, *args):
        interrupt_at_the_end(path)
        return real_write(path, *args)

    def plot(runs, path, *args):
        interrupt_at_the_end(path)
        return real_plot(runs, path, *args)

    monkeypatch.setattr(trainer, "atomic_write", write)
    monkeypatch.setattr(trainer, "plot_runs", plot)
    assert train(tmp_path) == 130
    monkeypatch.undo()
    stale_png = (tmp_path / "loss.png").stat().st_mtime_ns
    capsys.readouterr()
    assert train(tmp_path, "--resume") == 0
    assert "rewrote" in capsys.readouterr().out
    assert [int(r["step"]) for r in read_metrics(tmp_path / "metrics.csv")] == [1, 2, 3, 4]
    assert (tmp_path / "loss.png").stat().st_mtime_ns > stale_png
    capsys.readouterr()
    assert train(tmp_path, "--resume") == 0  # now current: nothing to write
    assert "nothing written" in capsys.readouterr().out


def test_a_checkpoint_that_cannot_be_opened_says_why(tmp_path, capsys, monkeypatch):
    """A checkpoint without read permission was 'cannot read checkpoint (PermissionError):
    is it one adamkit train wrote?', as if its content were foreign."""
    assert train(tmp_path, "--stop-at", "2") == 0
    capsys.readouterr()

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", denied)
    assert train(tmp_path, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"adamkit train: error: cannot read checkpoint {tmp_path / 'checkpoint.pt'}: Permission denied"


@pytest.mark.skipif(sys.platform == "win32", reason="no flock")
@pytest.mark.parametrize("compare", [False, True], ids=["one-run", "compare"])
def test_a_directory_another_run_is_writing_to_is_refused(tmp_path, capsys, compare):
    """Two runs into one --out both passed the 'checkpoint already exists' check and
    overwrote each other's files (each said it wrote them). The directory is locked
    for the run; here another process's lock, taken as a run takes it."""
    import fcntl

    target = tmp_path / "adam" if compare else tmp_path
    target.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); sys.stdin.read()"), str(target)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        extra = ("--compare", "adam") if compare else ()
        assert train(tmp_path, *extra) == 2
        assert "is in use by another adamkit train" in capsys.readouterr().err
        assert not (target / "checkpoint.pt").exists()
    finally:
        holder.communicate("")
    assert train(tmp_path, *extra) == 0  # the lock ends with its holder
    fd = os.open(target, os.O_RDONLY)  # and ours with the run
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
