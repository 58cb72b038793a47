"""The command line: files written, exact resume, --compare, viz, and bad arguments.

Runs are tiny (a few steps, small batches) so the whole file stays fast on 2 cores.
"""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adamkit.cli import main
from adamkit.cli.data import CharCorpus, load_text
from adamkit.cli.errors import CliError
from adamkit.cli.files import atomic_write
from adamkit.cli.train import parse_compare
from adamkit.cli.trainer import METRICS, MODEL, _check_batch_size, lr_factor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--steps", "4", "--batch-size", "4"]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--out", str(out), *TINY, *extra])


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == METRICS
        return list(reader)


def test_train_writes_metrics_plot_checkpoint_and_sample(tmp_path, capsys):
    assert train(tmp_path) == 0
    out = capsys.readouterr().out
    assert "--- sample from adam ---" in out and "val loss" in out

    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert rows[-1]["val_loss"] != ""  # the last step always evaluates
    elapsed = [float(r["elapsed"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    factor = lr_factor(4)
    assert [float(r["lr"]) for r in rows] == pytest.approx([3e-3 * factor(s) for s in range(4)])

    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and saved["config"]["optimizer"] == "adam"
    assert {"model", "optimizer", "scheduler", "rng", "metrics"} <= saved.keys()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bf16_params(tmp_path):
    assert train(tmp_path, "--dtype", "bf16", "--optimizer", "adamw") == 0
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {t.dtype for t in saved["model"].values()} == {torch.bfloat16}


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


def test_compare_plots_all_runs(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path), "--steps", "2", "--batch-size", "4",
                 "--compare", "adam,sgd:lr=0.1"])
    assert code == 0
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_MAGIC
    for label in ("adam", "sgd_lr=0.1"):
        assert len(read_metrics(tmp_path / label / "metrics.csv")) == 2
    assert torch.load(tmp_path / "sgd_lr=0.1" / "checkpoint.pt", weights_only=True)["config"]["lr"] == 0.1


def test_parse_compare():
    assert parse_compare("adam,adamw:lr=1e-3:dtype=bf16") == [
        ("adam", {"optimizer": "adam"}),
        ("adamw_lr=1e-3_dtype=bf16", {"optimizer": "adamw", "lr": 1e-3, "dtype": "bf16"}),
    ]
    for bad in ("adam,", "adam:lr", "adam:lr=-1", "adam:color=red", "rmsprop"):
        with pytest.raises(CliError):
            parse_compare(bad)


def test_train_batches_draw_every_window_of_the_text():
    """Every start 0 .. len - context - 1 is drawn, the last one included: the window that
    ends on the text's last character (randint's bound is exclusive: it was one short, so
    that character was never a target)."""
    corpus = CharCorpus("abcdefghij" * 2, val_fraction=0.5)  # train: "abcdefghij"
    gen = torch.Generator().manual_seed(0)
    x, y = corpus.train_batch(2000, 4, gen)
    starts = {corpus.decode(row)[0] for row in x}
    assert starts == set("abcdef")  # 10 - 4 windows of 5 characters
    assert corpus.decode(y[[corpus.decode(r)[0] == "f" for r in x]][0]) == "ghij"


def test_the_batch_size_limit_is_the_number_of_windows_train_batch_draws_from():
    """As many windows as train_batch has starts pass (the check was one short of them)."""
    context = MODEL["context"]
    corpus = CharCorpus("abcdefghij" * ((context + 6) // 5), val_fraction=0.5)
    windows = len(corpus.train) - context
    x, _ = corpus.train_batch(40 * windows, context, torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in x}) == windows  # every start drawn
    _check_batch_size(corpus, windows)
    with pytest.raises(CliError, match=f"larger than the {windows} windows"):
        _check_batch_size(corpus, windows + 1)


def test_viz_writes_a_png(tmp_path, capsys):
    out = tmp_path / "viz.png"
    assert main(["viz", "--out", str(out)]) == 0
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.shape[0] > 800 and image.shape[1] > 1200
    assert image[..., :3].std() > 0.05  # not a blank canvas


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


def test_ctrl_c_keeps_the_last_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real_batch = CharCorpus.train_batch

    def interrupt_on_third(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_batch(self, *args)

    monkeypatch.setattr(CharCorpus, "train_batch", interrupt_on_third)
    assert train(tmp_path) == 130
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last_line.startswith("adamkit train: error: interrupted at step 2") and "holds step 2" in last_line
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert train(tmp_path, "--resume") == 0


# ---- bad arguments: exit 2, one line on stderr, nothing lost ------------------------

BAD = {
    "no command": [],
    "unknown command": ["bogus"],
    "negative steps": ["train", "--steps", "-5"],
    "zero steps": ["train", "--steps", "0"],
    "steps not a number": ["train", "--steps", "many"],
    "unknown optimizer": ["train", "--optimizer", "nadam"],
    "zero lr": ["train", "--lr", "0"],
    "nan lr": ["train", "--lr", "nan"],
    "unknown dtype": ["train", "--dtype", "fp8"],
    "negative batch": ["train", "--batch-size", "-1"],
    "bad compare name": ["train", "--compare", "adam,lion"],
    "bad compare key": ["train", "--compare", "adam:betas=3"],
    "duplicate compare": ["train", "--compare", "adam,adam"],
    "optimizer with compare": ["train", "--optimizer", "adam", "--compare", "sgd"],
    "resume and overwrite": ["train", "--resume", "--overwrite"],
    "backend for sgd": ["train", "--optimizer", "sgd", "--backend", "torch", "--steps", "1"],
    "unknown backend": ["train", "--backend", "abacus", "--steps", "1"],
    "unknown state format": ["train", "--state-format", "no-such-format", "--steps", "1"],
    "unknown param update": ["train", "--param-update", "no-such-mode", "--steps", "1"],
    "seed too large": ["train", "--seed", "99999999999999999999", "--steps", "1"],
    "negative seed": ["train", "--seed", "-1", "--steps", "1"],
    "compare key twice": ["train", "--compare", "adam:lr=0.01:lr=0.02"],
    "batch larger than the text": ["train", "--batch-size", "10000000000", "--steps", "1"],
    "viz not png": ["viz", "--out", "picture.txt"],
    "viz no dir": ["viz", "--out", "no/such/dir/v.png"],
    "viz dir a file": ["viz", "--out", f"{sys.executable}/v.png"],
    "train empty out": ["train", "--out", "", "--steps", "1"],  # was the current directory
    "bench empty out": ["bench", "--quick", "--out", ""],
}


def assert_one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, captured
    assert err and "\n" not in err, err
    assert "Traceback" not in captured.err and err.startswith("adamkit")
    return err


@pytest.mark.parametrize("argv", BAD.values(), ids=BAD.keys())
def test_bad_arguments(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (and the default --out) land in tmp
    given_out = "--out" in argv
    code = main([*argv, "--out", str(tmp_path / "run")] if argv[:1] == ["train"] and not given_out else argv)
    assert_one_line_error(capsys, code)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert train(blocker / "run") == 2  # works even as root, unlike chmod
    assert "cannot write" in assert_one_line_error(capsys, 2)
    assert train(blocker) == 2
    assert_one_line_error(capsys, 2)


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


def test_missing_extra_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail
    assert train(tmp_path) == 2
    assert "pip install 'adamkit[cli]'" in assert_one_line_error(capsys, 2)


def test_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    bad = subprocess.run([sys.executable, "-m", "adamkit", "train", "--steps", "-3", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "--steps" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "adamkit.cli", "--help"], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0 and "train" in ok.stdout and "viz" in ok.stdout


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    assert main(["train", "--out", str(tmp_path)]) == 0
    rows = read_metrics(tmp_path / "metrics.csv")
    uniform = math.log(CharCorpus(load_text()).vocab_size)
    assert float(rows[-1]["val_loss"]) < uniform - 2.5


# ---- found by review: paths, damaged checkpoints, interrupts, permissions --------------

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


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.csv", "loss.png"])
def test_an_output_name_taken_by_a_directory_fails_before_training(tmp_path, capsys, name):
    """os.replace onto a directory failed with a traceback, after training to the first
    save; a directory named checkpoint.pt also gave "does not exist" on --resume."""
    (tmp_path / name).mkdir()
    for extra in ((), ("--resume",), ("--overwrite",)):
        assert train(tmp_path, *extra) == 2
        assert "not a file" in assert_one_line_error(capsys, 2)


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


def test_resuming_a_finished_run_says_nothing_was_written(tmp_path, capsys):
    assert train(tmp_path) == 0
    capsys.readouterr()
    before = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    assert train(tmp_path, "--resume") == 0
    out, err = capsys.readouterr()
    assert "nothing written" in out
    assert "4/4" not in err  # no progress bar for nothing to train (it drew two)
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == before


def test_bench_refuses_a_selection_of_nothing_and_an_unusable_out_before_measuring(tmp_path, capsys):
    assert main(["bench", "--only", "no-such-optimizer", "--out", str(tmp_path / "b")]) == 2
    assert "no optimizer matches" in assert_one_line_error(capsys, 2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["bench", "--quick", "--out", str(blocker)]) == 2
    assert "not a directory" in assert_one_line_error(capsys, 2)


def test_a_run_failing_in_its_set_up_leaves_no_directories(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    assert train(out, "--backend", "abacus") == 2
    assert_one_line_error(capsys, 2)
    assert not (tmp_path / "a").exists()
    assert main(["train", "--compare", "adam,adamw:backend=../../x", "--out", str(out), *TINY]) == 2
    assert_one_line_error(capsys, 2)
    assert list(tmp_path.iterdir()) == []


def test_compare_labels_name_one_directory_each():
    assert parse_compare("adam:backend=a/b")[0][0] == "adam_backend=a_b"


def test_bench_names_why_nothing_it_matched_can_run(tmp_path, capsys, monkeypatch):
    import adamkit.bench as bench

    monkeypatch.setattr(bench, "available", lambda c: "not installed here")
    assert main(["bench", "--quick", "--out", str(tmp_path / "b")]) == 2
    assert "nothing to run" in assert_one_line_error(capsys, 2)


def test_a_rewritten_file_keeps_its_mode(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    target.chmod(0o600)
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("command", ["train", "bench", "viz"])
def test_unknown_argument_points_to_the_subcommands_help(command, capsys):
    """One line, exit code 2, naming the help that lists the subcommand's options."""
    assert main([command, "--no-such-option", "extra"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"adamkit {command}: error: unrecognized arguments: --no-such-option extra "
                   f"(see 'adamkit {command} --help')")


# ---- found by review: divergence, failing writes, start-up, edited checkpoints -----------

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


def test_a_batch_that_cannot_be_allocated_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 41600000000000 bytes.")

    monkeypatch.setattr(CharCorpus, "val_batches", no_memory)
    assert train(tmp_path) == 2
    assert "--batch-size 4: cannot allocate" in assert_one_line_error(capsys, 2)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


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


def test_compare_names_its_own_keys_in_errors():
    with pytest.raises(CliError, match="bad setting 'optimizer=sgd'.*name before the first ':'"):
        parse_compare("adam:optimizer=sgd")  # it said "optimizer given twice"
    with pytest.raises(CliError) as info:
        parse_compare("adam,sgd:backend=cpu")  # it said "--backend", a flag never given
    assert "backend in 'sgd:backend=cpu' is only for adamkit's optimizers" in str(info.value)
    assert "--backend" not in str(info.value)
    assert parse_compare("adamw:backend=cpu")[0][1]["backend"] == "cpu"


# ---- found by review: closed output, out of memory, SIGTERM, --compare's picture -------

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


def test_compare_picture_in_the_way_fails_before_training_and_a_finished_resume_writes_nothing(tmp_path, capsys):
    (tmp_path / "compare.png").mkdir()
    assert main(["train", "--out", str(tmp_path), *TINY, "--compare", "adam"]) == 2
    assert "compare.png is in the way" in assert_one_line_error(capsys, 2)
    assert sorted(os.listdir(tmp_path)) == ["compare.png"]  # nothing trained
    (tmp_path / "compare.png").rmdir()
    assert main(["train", "--out", str(tmp_path), *TINY, "--compare", "adam,sgd:lr=0.1"]) == 0
    before = (tmp_path / "compare.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path), "--resume", "--compare", "adam,sgd:lr=0.1"]) == 0
    assert "already complete, nothing written" in capsys.readouterr().out
    assert (tmp_path / "compare.png").stat().st_mtime_ns == before


def test_bench_output_names_in_the_way_fail_before_measuring(tmp_path, capsys):
    (tmp_path / "bench.json").mkdir()
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 2
    err = assert_one_line_error(capsys, 2)
    assert "bench.json is in the way" in err and "machine:" not in capsys.readouterr().out


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


def test_viz_into_a_directory_names_the_directory(tmp_path, capsys):
    """`--out somedir` was refused for its missing .png suffix, not for being a directory."""
    assert main(["viz", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"adamkit viz: error: --out {tmp_path} is a directory; name a .png file"


def test_a_matplotlib_whose_pyplot_cannot_import_fails_before_training(tmp_path, capsys, monkeypatch):
    """require("matplotlib") checked the package only: a pyplot that fails to import
    (a broken install, a dependency missing) failed at the first save, after training
    and with the checkpoint written; and "not installed" was not why."""
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # makes its import fail
    assert train(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adamkit train: error: cannot import matplotlib.pyplot")
    assert os.listdir(tmp_path) == []
