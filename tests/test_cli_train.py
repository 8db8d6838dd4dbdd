"""The jaxcnn train / eval / plot commands: end to end on every data format, exact resume after SIGKILL, and
every bad input as a one-line error with exit code 2 (3 for a diverging run), nothing lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from data_files import write_cifar, write_mnist, write_npz
from jaxcnn import cli, train


def jaxcnn(*args, cwd=None, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "jaxcnn", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def state_leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves((state.params, state.opt_state, state.step))]


def assert_same_bits(a, b):
    for x, y in zip(state_leaves(a), state_leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


# -- end to end ------------------------------------------------------------------------------------------------

# a small user model for the in-process runs where the command, not the model, is under test (each mnist_cnn
# configuration is another compile of its step, seconds of CPU); the runs in processes train mnist_cnn
SMALL = ("--model", "models_for_tests:small_digits_cnn")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """`jaxcnn train --epochs 4` in a fresh process: the reference for the resume tests."""
    workdir = tmp_path_factory.mktemp("cli") / "straight"
    result = jaxcnn("train", "--epochs", "4", "--workdir", str(workdir), "--no-progress")
    assert result.returncode == 0, result.stderr
    return workdir, result


def test_train_prints_workdir_epochs_and_a_final_line(straight):
    workdir, result = straight
    lines = result.stdout.splitlines()
    assert lines[0].startswith("training mnist_cnn on digits: 4 epochs")
    assert lines[1] == f"workdir: {workdir}"
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/4", "2/4", "3/4", "4/4"]
    assert lines[-1].startswith("done: test accuracy 0.9") and lines[-1].endswith(f"workdir {workdir}")
    assert "Traceback" not in result.stderr
    assert (workdir / "config.json").is_file() and len(train.read_metrics(workdir)) == 4
    assert train.restore(workdir).step == 4 * 45


def test_eval_and_plot(straight, capsys):
    workdir, _ = straight
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    accuracy = train.read_metrics(workdir)[-1]["test_accuracy"]
    assert out.startswith(f"test accuracy {accuracy:.4f}") and "on 360 images (checkpoint of epoch 4, step 180)" in out
    assert cli.main(["eval", "--workdir", str(workdir), "--split", "train", "--batch-size", "100"]) == 0
    assert "on 1437 images" in capsys.readouterr().out
    output = workdir.parent / "plots" / "curves.png"
    assert cli.main(["plot", "--workdir", str(workdir), "--output", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_sigkill_matches_the_straight_run(straight, tmp_path):
    """(A clean stop and resume, through the same code, is tested in-process in test_train.py.)"""
    reference = train.restore(straight[0])
    # killed with SIGKILL once epoch 2 is on disk (at whatever it is doing then), resumed with --workdir alone
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxcnn", "train", "--epochs", "4", "--workdir", str(killed), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while len(train.read_metrics(killed)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed, not finished
    result = jaxcnn("train", "--workdir", str(killed), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert_same_bits(train.restore(killed), reference)
    assert [r["epoch"] for r in train.read_metrics(killed)] == [1, 2, 3, 4]


def test_default_train_reaches_97_percent_on_digits(tmp_path):
    result = jaxcnn("train", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    workdir = tmp_path / last.rsplit("workdir ", 1)[1]
    assert workdir.parent.name == "runs" and workdir.is_dir()
    assert train.read_metrics(workdir)[-1]["test_accuracy"] >= 0.97
    assert train.restore(workdir).step == 40 * 45


# every loader is tested in test_data.py; here one file format trains end to end by default
@pytest.mark.parametrize("name", [*(pytest.param(n, marks=pytest.mark.slow) for n in ("fashion", "cifar")), "npz"])
def test_train_on_idx_cifar_and_npz_files(name, tmp_path, capsys):
    arrays = {
        "train_x": np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "train_y": np.arange(10, dtype=np.uint8),
        "test_x": np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "test_y": np.arange(4, dtype=np.uint8),
    }
    write_mnist(tmp_path / "fashion", arrays, gz=True)
    write_cifar(tmp_path / "cifar", train_counts=(5, 3), test_count=3)
    npz = write_npz(tmp_path / "mine.npz")
    runs = {
        "fashion": ["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "fashion"), "--model", "lenet5"],
        "cifar": ["--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar")],
        "npz": ["--dataset", "npz", "--data-path", str(npz), "--batch-size", "4", "--gradients", "engine", *SMALL],
    }
    for flags in [runs[name]]:  # one format per case (IDX is also read end to end by test_data)
        workdir = tmp_path / f"run-{name}"
        code = cli.main(["train", *flags, "--epochs", "1", "--workdir", str(workdir), "--no-progress"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert out.splitlines()[-1].startswith("done: test accuracy")
        assert train.read_config(workdir).dataset == flags[1]
        train.restore(workdir)


# -- bad input -------------------------------------------------------------------------------------------------


def bad_npz(tmp_path, **overrides):
    return ["--dataset", "npz", "--data-path", str(write_npz(tmp_path / "bad.npz", **overrides))]


def not_a_file(tmp_path, name, content=b"garbage"):
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


BAD_INPUT = {
    "epochs": (lambda t: ["--epochs", "0"], "--epochs must be an int >= 1, got 0"),
    "batch size": (lambda t: ["--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
    "batch size text": (lambda t: ["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    "lr nan": (lambda t: ["--learning-rate", "nan"], "--learning-rate must be a finite positive number, got nan"),
    "lr inf": (lambda t: ["--learning-rate", "inf"], "--learning-rate must be a finite positive number, got inf"),
    "lr negative": (lambda t: ["--learning-rate", "-0.1"], "--learning-rate must be a finite positive number"),
    "lr zero": (lambda t: ["--learning-rate", "0"], "--learning-rate must be a finite positive number, got 0.0"),
    "model": (lambda t: ["--model", "vgg"], "unknown --model 'vgg'; known: conv_autoencoder, digits_cnn, lenet5"),
    "dataset": (lambda t: ["--dataset", "svhn"], "unknown --dataset 'svhn'; known: cifar10, digits, fashion_mnist"),
    "optimizer": (lambda t: ["--optimizer", "sgdx"], "unknown --optimizer 'sgdx'; known: adam, adamw, momentum"),
    "schedule": (lambda t: ["--schedule", "linear"], "unknown --schedule 'linear'; known: constant, cosine"),
    "gradients": (lambda t: ["--gradients", "fd"], "unknown --gradients 'fd'; known: autodiff, engine, manual"),
    "no data dir": (lambda t: ["--dataset", "mnist"], "--dataset 'mnist' needs --data-dir"),
    "missing data dir": (
        lambda t: ["--dataset", "mnist", "--data-dir", str(t / "nowhere")],
        "does not exist",
    ),
    "missing idx file": (
        lambda t: ["--dataset", "mnist", "--data-dir", str(t)],
        "train-images-idx3-ubyte",
    ),
    "bad idx": (
        lambda t: ["--dataset", "mnist", "--data-dir", str(t)] if write_mnist(t, raw={"train_x": b"\0\0\x08"}) else [],
        "is not a valid IDX file",
    ),
    "bad cifar": (
        lambda t: ["--dataset", "cifar10", "--data-dir", write_cifar(t) and not_a_file(t, "data_batch_1.bin")[:-17]],
        "data_batch_1.bin",
    ),
    "missing npz": (lambda t: ["--dataset", "npz", "--data-path", str(t / "none.npz")], "none.npz"),
    "bad npz": (lambda t: ["--dataset", "npz", "--data-path", not_a_file(t, "x.npz")], "x.npz"),
    "nan images": (
        lambda t: bad_npz(t, x_train=np.full((6, 4, 4), np.nan, np.float32)),
        "x_train holds NaN or Inf",
    ),
    "inf images": (lambda t: bad_npz(t, x_test=np.full((3, 4, 4), np.inf, np.float32)), "x_test holds NaN or Inf"),
    "negative labels": (lambda t: bad_npz(t, y_train=np.array([0, 1, -2, 0, 1, 2])), "-2"),
    "labels too large": (lambda t: bad_npz(t, num_classes=np.array(3), y_test=np.array([2, 7, 0])), "7"),
    "count mismatch": (lambda t: bad_npz(t, y_train=np.array([0, 1, 2])), "y_train"),
    "shape the model cannot take": (
        lambda t: ["--model", "lenet5"],
        "model lenet5 cannot take digits images of shape (8, 8, 1)",
    ),
    "npz shape the model cannot take": (
        lambda t: [*bad_npz(t), "--model", "lenet5"],
        "model lenet5 cannot take npz images of shape (4, 4, 1)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    flags, message = BAD_INPUT[case]
    data = tmp_path / "data"
    data.mkdir()
    workdir = tmp_path / "run"
    try:
        code = cli.main(["train", *flags(data), "--workdir", str(workdir), "--no-progress"])
    except SystemExit as exit_:  # argparse's own errors (a flag of the wrong type) exit from the parser
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("jaxcnn train: error: ")
    assert message in err, err
    assert not workdir.exists()  # nothing written for a run that could not start


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    result = jaxcnn("train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see test_train.py
def test_corrupt_checkpoint_is_named_and_kept(straight, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(straight[0], workdir)
    from conftest import corrupt_latest

    latest = corrupt_latest(workdir)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    result = jaxcnn("eval", "--workdir", str(workdir))  # a real process: no traceback from orbax's threads either
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr and "error" not in result.stdout
    assert f"checkpoint {latest} is corrupt" in result.stderr and result.stderr.count("\n") == 1
    assert cli.main(["train", "--workdir", str(workdir), "--epochs", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {latest} is corrupt" in err and err.count("\n") == 1
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before
    shutil.rmtree(latest / "state" / "d")  # files gone: orbax itself fails to read (in this process, this time)
    assert cli.main(["eval", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and f"checkpoint {latest} is corrupt or unreadable" in err


def test_resuming_with_another_model_or_data_set_is_an_error(straight, capsys):
    workdir, _ = straight
    config = (workdir / "config.json").read_text()
    changes = ((["--model", "lenet5"], "model: 'mnist_cnn' -> 'lenet5'"), (["--dataset", "synthetic"], "dataset"))
    for flags, message in changes:
        assert cli.main(["train", "--workdir", str(workdir), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "cannot resume" in err and err.count("\n") == 1
    assert (workdir / "config.json").read_text() == config


def test_a_finished_run_without_metrics_reports_nothing_to_train(straight, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(straight[0], workdir)
    (workdir / "metrics.jsonl").unlink()
    assert cli.main(["train", "--workdir", str(workdir), "--no-progress"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"done: nothing to train (180 steps already taken); workdir {workdir}"


def test_data_paths_are_saved_absolute(tmp_path, monkeypatch, capsys):
    write_npz(tmp_path / "mine.npz")
    monkeypatch.chdir(tmp_path)
    flags = ["--dataset", "npz", "--data-path", "mine.npz", *SMALL, "--epochs", "1", "--workdir", "w"]
    assert cli.main(["train", *flags]) == 0
    assert train.read_config(tmp_path / "w").data_path == str(tmp_path / "mine.npz")
    monkeypatch.chdir(tmp_path.parent)
    assert cli.main(["eval", "--workdir", str(tmp_path / "w")]) == 0


def test_eval_and_plot_errors(tmp_path, capsys):
    assert cli.main(["eval", "--workdir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["plot", "--workdir", str(tmp_path)]) == 2
    assert "no metrics in" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
    assert "not a jaxcnn workdir" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    for command in ("eval", "plot"):
        assert cli.main([command, "--workdir", str(tmp_path / "file")]) == 2
        assert "is not a directory" in capsys.readouterr().err


def test_a_diverging_run_exits_3_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", *SMALL, "--workdir", str(workdir), "--no-progress"]) == 0
    good = train.restore(workdir)
    capsys.readouterr()
    code = cli.main(["train", "--epochs", "3", "--learning-rate", "1e12", "--workdir", str(workdir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3
    assert err.count("\n") == 1 and "training diverged" in err and "at epoch 2, step" in err
    assert_same_bits(train.restore(workdir), good)
    assert [json.loads(line)["epoch"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [1]
