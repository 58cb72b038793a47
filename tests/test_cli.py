"""The command line: files written, --compare, viz, bench, and bad arguments (exit 2,
one line on stderr, nothing lost). Resume and checkpoints: test_cli_resume.py;
interrupts and failures: test_cli_failures.py.

Runs are tiny (a few steps, small batches) so the whole file stays fast on 2 cores.
"""

from __future__ import annotations

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
from adamkit.cli.train import parse_compare
from adamkit.cli.trainer import MODEL, _check_batch_size, lr_factor
from cli_helpers import PNG_MAGIC, TINY, assert_one_line_error, read_metrics, train


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


@pytest.mark.parametrize("argv", BAD.values(), ids=BAD.keys())
def test_bad_arguments(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (and the default --out) land in tmp
    given_out = "--out" in argv
    code = main([*argv, "--out", str(tmp_path / "run")] if argv[:1] == ["train"] and not given_out else argv)
    assert_one_line_error(capsys, code)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


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


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.csv", "loss.png"])
def test_an_output_name_taken_by_a_directory_fails_before_training(tmp_path, capsys, name):
    """os.replace onto a directory failed with a traceback, after training to the first
    save; a directory named checkpoint.pt also gave "does not exist" on --resume."""
    (tmp_path / name).mkdir()
    for extra in ((), ("--resume",), ("--overwrite",)):
        assert train(tmp_path, *extra) == 2
        assert "not a file" in assert_one_line_error(capsys, 2)


def test_bench_refuses_a_selection_of_nothing_and_an_unusable_out_before_measuring(tmp_path, capsys):
    assert main(["bench", "--only", "no-such-optimizer", "--out", str(tmp_path / "b")]) == 2
    assert "no optimizer matches" in assert_one_line_error(capsys, 2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["bench", "--quick", "--out", str(blocker)]) == 2
    assert "not a directory" in assert_one_line_error(capsys, 2)


def test_compare_labels_name_one_directory_each():
    assert parse_compare("adam:backend=a/b")[0][0] == "adam_backend=a_b"


def test_bench_names_why_nothing_it_matched_can_run(tmp_path, capsys, monkeypatch):
    import adamkit.bench as bench

    monkeypatch.setattr(bench, "available", lambda c: "not installed here")
    assert main(["bench", "--quick", "--out", str(tmp_path / "b")]) == 2
    assert "nothing to run" in assert_one_line_error(capsys, 2)


@pytest.mark.parametrize("command", ["train", "bench", "viz"])
def test_unknown_argument_points_to_the_subcommands_help(command, capsys):
    """One line, exit code 2, naming the help that lists the subcommand's options."""
    assert main([command, "--no-such-option", "extra"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"adamkit {command}: error: unrecognized arguments: --no-such-option extra "
                   f"(see 'adamkit {command} --help')")


def test_compare_names_its_own_keys_in_errors():
    with pytest.raises(CliError, match="bad setting 'optimizer=sgd'.*name before the first ':'"):
        parse_compare("adam:optimizer=sgd")  # it said "optimizer given twice"
    with pytest.raises(CliError) as info:
        parse_compare("adam,sgd:backend=cpu")  # it said "--backend", a flag never given
    assert "backend in 'sgd:backend=cpu' is only for adamkit's optimizers" in str(info.value)
    assert "--backend" not in str(info.value)
    assert parse_compare("adamw:backend=cpu")[0][1]["backend"] == "cpu"


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


def test_viz_with_an_empty_out_says_the_path_is_empty(capsys):
    """`--out ""` read as the current directory: "--out . is a directory" (found by review)."""
    assert main(["viz", "--out", ""]) == 2
    assert "--out: must name a .png file, got an empty path" in assert_one_line_error(capsys, 2)
