"""The command line under failure: Ctrl-C and SIGTERM, failing or unwritable output,
out of memory, divergence, closed streams. Each is one line (no traceback), exit codes
are the documented ones, and nothing already written is lost."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import pytest
import torch

from adamkit.cli import main
from adamkit.cli.data import CharCorpus
from adamkit.cli.errors import CliError
from adamkit.cli.files import atomic_write
from cli_helpers import PNG_MAGIC, TINY, assert_one_line_error, read_metrics, train


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def half_then_crash(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert train(blocker / "run") == 2  # works even as root, unlike chmod
    assert "cannot write" in assert_one_line_error(capsys, 2)
    assert train(blocker) == 2
    assert_one_line_error(capsys, 2)


def test_a_write_failing_mid_run_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """Disk full or a directory made read-only mid-run: one line, not a traceback."""
    import adamkit.cli.files as files

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    assert train(tmp_path) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err and last.startswith("adamkit train: error: cannot write")
    assert "No space left on device" in last


def test_ctrl_c_before_the_first_checkpoint_does_not_point_to_resume(tmp_path, capsys, monkeypatch):
    """With --overwrite the old run's checkpoint is still there; before this run's first
    save there is nothing of it to resume (the message sent the user to --resume)."""
    assert train(tmp_path) == 0
    real_batch = CharCorpus.train_batch

    def interrupt(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(CharCorpus, "train_batch", interrupt)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path), "--steps", "40", "--batch-size", "4",
                 "--optimizer", "sgd", "--overwrite"]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "before this run's first checkpoint" in last and "--resume" not in last
    monkeypatch.setattr(CharCorpus, "train_batch", real_batch)


def test_ctrl_c_during_set_up_is_one_line(tmp_path, capsys, monkeypatch):
    import adamkit.cli.trainer as trainer

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_optimizer", interrupt)
    assert train(tmp_path) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "adamkit train: interrupted"


def test_output_files_follow_the_umask(tmp_path):
    """mkstemp's 0600 stayed on every output file after the rename."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    import adamkit.cli.files as files

    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == files._FILE_MODE == 0o666 & ~old


def test_a_run_failing_in_its_set_up_leaves_no_directories(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    assert train(out, "--backend", "abacus") == 2
    assert_one_line_error(capsys, 2)
    assert not (tmp_path / "a").exists()
    assert main(["train", "--compare", "adam,adamw:backend=../../x", "--out", str(out), *TINY]) == 2
    assert_one_line_error(capsys, 2)
    assert list(tmp_path.iterdir()) == []


def test_a_rewritten_file_keeps_its_mode(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    target.chmod(0o600)
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o600


def test_a_diverged_run_says_so_instead_of_crashing(tmp_path, capsys):
    """lr 1e30 makes the params NaN: sampling (multinomial on NaN) raised a traceback,
    at the end of the run and again on --resume."""
    argv = ["train", "--out", str(tmp_path), "--steps", "2", "--batch-size", "2", "--lr", "1e30"]
    for extra in ([], ["--resume"]):
        assert main([*argv, *extra]) == 0
        captured = capsys.readouterr()
        assert "--- no sample from adam: the model diverged" in captured.out
        assert "Traceback" not in captured.err
        assert "adamkit train: warning: adam diverged: its loss is not finite, first at step 1" in captured.err
    assert not math.isfinite(float(read_metrics(tmp_path / "metrics.csv")[-1]["loss"]))


def test_a_diverged_runs_plot_spans_the_run_and_marks_where_it_diverged(tmp_path, monkeypatch):
    """Its loss.png showed steps 1-2 of 12 (autoscaling drops the non-finite losses), with
    nothing marking the divergence (found by review)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from adamkit.cli import plots

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    nan = float("nan")
    rows = [dict(step=s, loss=4.7 if s == 1 else nan, val_loss=(4.6 if s == 1 else nan) if s % 4 == 1 else None,
                 lr=1.0, elapsed=0.1 * s) for s in range(1, 13)]
    plots.plot_runs({"adam": rows}, tmp_path / "loss.png", 4.63, "a diverged run")
    ax = figures[0].axes[0]
    assert ax.get_xlim() == (0, 12)
    assert "adam diverged at step 2" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


SAVE_FAILURES = {
    "torch's zip writer": RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4310"),
    "disk full": OSError(28, "No space left on device"),
}


@pytest.mark.parametrize("failure", SAVE_FAILURES.values(), ids=SAVE_FAILURES.keys())
def test_atomic_write_turns_any_failing_write_into_one_line(tmp_path, failure):
    """torch.save reports a full disk as RuntimeError when it closes its zip; only
    OSError was a CliError, the RuntimeError a traceback."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def save_failing(f):
        f.write(b"partial")
        raise failure

    with pytest.raises(CliError, match="cannot write .*checkpoint.pt") as info:
        atomic_write(path, save_failing)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_checkpoint_save_failing_in_torch_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise SAVE_FAILURES["torch's zip writer"]

    monkeypatch.setattr(torch, "save", save_then_fail)
    assert train(tmp_path) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("adamkit train: error: cannot write")
    assert os.listdir(tmp_path) == []  # no checkpoint, no temp file


def test_ctrl_c_while_the_subcommands_import_is_one_line(capsys, monkeypatch):
    """build_parser imports the subcommands (and torch with them) outside main's guard:
    Ctrl-C there was a KeyboardInterrupt traceback."""
    import adamkit.cli as cli

    def interrupt(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "import_module", interrupt)
    assert main(["train", "--steps", "1"]) == 130
    assert capsys.readouterr().err == "adamkit: interrupted\n"


def test_a_batch_that_cannot_be_allocated_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 41600000000000 bytes.")

    monkeypatch.setattr(CharCorpus, "val_batches", no_memory)
    assert train(tmp_path) == 2
    assert "--batch-size 4: cannot allocate" in assert_one_line_error(capsys, 2)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sink", ["closed pipe", "full device"])
def test_output_that_cannot_be_written_is_no_traceback(tmp_path, sink):
    """`adamkit train | head` gave a BrokenPipeError traceback (exit 1); a full stdout an
    OSError one. Now: quiet, exit 141, where the reader closed the pipe; one line and
    exit 2 where the write failed. The run's files are as the last save left them."""
    cmd = [sys.executable, "-m", "adamkit", "viz", "--out", str(tmp_path / "v.png")]
    # buffered, as a pipe or a file is by default: the output is written at the end
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if sink == "full device":
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full here")
        with open("/dev/full", "w") as full:
            done = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300, env=env)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == "adamkit viz: error: cannot write output: No space left on device"
        return
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    proc = subprocess.Popen(cmd, stdout=write, stderr=subprocess.PIPE, text=True, env=env)
    os.close(write)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and err == "", err
    assert (tmp_path / "v.png").read_bytes()[:8] == PNG_MAGIC


def test_running_out_of_memory_in_a_step_is_one_line_and_leaves_no_directory(tmp_path, capsys, monkeypatch):
    from adamkit.cli.model import CharTransformer

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(CharTransformer, "loss", no_memory)
    out = tmp_path / "new" / "run"
    assert train(out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "adamkit train: error: out of memory in step 1 at --batch-size 4 (try a smaller one)"
    assert not (tmp_path / "new").exists()  # made by this run, empty: removed


def test_ctrl_c_before_the_first_checkpoint_leaves_no_new_directory(tmp_path, capsys, monkeypatch):
    def interrupt(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(CharCorpus, "train_batch", interrupt)
    assert train(tmp_path / "a" / "b") == 130
    assert "before this run's first checkpoint" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_unwinds_as_ctrl_c(tmp_path, capsys, monkeypatch):
    """SIGTERM left a temp file of the save it interrupted; now it unwinds as Ctrl-C
    (exit 143): the temp file removed, the last checkpoint kept."""
    import signal

    import adamkit.cli.files as files

    assert train(tmp_path, "--stop-at", "2") == 0
    capsys.readouterr()
    real_fsync = files.os.fsync

    def terminated_mid_save(fd):
        real_fsync(fd)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(files.os, "fsync", terminated_mid_save)
    handler = signal.getsignal(signal.SIGTERM)
    assert train(tmp_path, "--resume") == 143
    assert signal.getsignal(signal.SIGTERM) is handler  # main's own, for its run only
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("adamkit train: error: terminated at step 3;") and "holds step 2" in last
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "loss.png", "metrics.csv"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_an_error_naming_a_path_keeps_stdout(tmp_path, capsys):
    """An OSError of a path (a name too long) is one line naming it; standard output,
    which only a failed write to it sends to /dev/null, stays as it was."""
    code = main(["viz", "--out", str(tmp_path / ("a" * 300 + ".png"))])
    err = assert_one_line_error(capsys, code)
    assert "File name too long" in err
    print("still here")
    assert capsys.readouterr().out == "still here\n"


@pytest.mark.parametrize("inherited", ["ignored", "own handler"])
def test_main_leaves_a_sigterm_handler_it_did_not_set_as_it_was(tmp_path, monkeypatch, inherited):
    """An ignored SIGTERM (a parent's `trap '' TERM`) stays ignored during the run; a
    handler of the host program is put back after it."""
    import signal

    import adamkit.cli.viz as viz

    seen = []
    mine = signal.SIG_IGN if inherited == "ignored" else (lambda *a: None)
    monkeypatch.setattr(viz, "draw", lambda out: seen.append(signal.getsignal(signal.SIGTERM)))
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert main(["viz", "--out", str(tmp_path / "v.png")]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (seen[0] is signal.SIG_IGN) == (inherited == "ignored")


class _Unwritable(io.TextIOBase):
    """A stdout whose writes fail as a full disk's or a closed pipe's."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def write(self, text: str) -> int:
        raise self.error


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["train", "--help"]], ids=" ".join)
@pytest.mark.parametrize("error,code", [(OSError(28, "No space left on device"), 2), (BrokenPipeError(32, "Broken pipe"), 141)],
                         ids=["full", "closed-pipe"])
def test_help_and_version_that_cannot_be_written_say_so(argv, error, code, capsys, monkeypatch):
    """argparse drops an OSError of its own writes: unbuffered (PYTHONUNBUFFERED) into
    /dev/full or a pipe without a reader, --help and --version exited 0, unwritten."""
    monkeypatch.setattr(sys, "stdout", _Unwritable(error))
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err == ("" if code == 141 else "adamkit: error: cannot write output: No space left on device\n")


def test_a_sample_the_terminal_cannot_encode_is_escaped(tmp_path, monkeypatch):
    """Under LC_ALL=C (an ASCII stdout) the finished run's sample, whose text has ’ and …,
    raised UnicodeEncodeError with a traceback after the run had written its files."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(CharCorpus, "decode", lambda self, ids: "’…" + "".join(self.chars[i] for i in ids.tolist()))
    assert train(tmp_path) == 0
    out.flush()
    assert b"\\u2019\\u2026" in out.buffer.getvalue()


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_closed_stdout_or_stderr_is_no_crash(tmp_path, monkeypatch, closed):
    """`>&-` or `2>&-` (Python makes the stream None): the flush after the run, or the
    progress bar at step 1, failed with an AttributeError traceback."""
    monkeypatch.setattr(sys, closed, None)
    assert train(tmp_path) == 0
    assert (tmp_path / "checkpoint.pt").exists()
