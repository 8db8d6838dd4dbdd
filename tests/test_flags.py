"""Ignored and nonsensical `jaxcnn train` flags (issue 13, defect 6): refused or inferred before anything is
written, a flag with no effect warned about once and not saved, every error one line naming the flag as typed."""

import json
import os
import subprocess
import sys

import pytest

from data_files import write_npz
from jaxcnn import cli, train
from jaxcnn.train.config import Config


class Stopped(Exception):
    """Raised by the stand-in for train.fit once it has recorded the config it was given."""


@pytest.fixture
def fit_calls(monkeypatch):
    """train.fit replaced by a recorder that stops the command (exit 2) before any training."""
    calls = []

    def fake_fit(config, workdir, **kwargs):
        calls.append(config)
        raise Stopped("stopped by the test")

    monkeypatch.setattr(train, "fit", fake_fit)
    return calls


@pytest.fixture
def no_training(monkeypatch):
    """The epoch loop replaced by a stop: a run that gets as far as training has not been refused."""

    def stop(*args, **kwargs):
        raise Stopped("reached the training loop")

    monkeypatch.setattr(train.loop, "_train", stop)


def run_cli(*flags, workdir, capsys):
    code = cli.main(["train", *flags, "--workdir", str(workdir), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


# -- refused: one line naming the flag as typed, nothing written ----------------------------------------------

REFUSED = {
    "data path with digits": (
        ["--dataset", "digits", "--data-path", "{npz}"],
        "--data-path is for --dataset npz, not --dataset digits",
    ),
    "data path with synthetic": (["--dataset", "synthetic", "--data-path", "{npz}"], "not --dataset synthetic"),
    "data path with mnist": (["--dataset", "mnist", "--data-dir", "{dir}", "--data-path", "{npz}"], "--data-path is"),
    "data dir alone": (
        ["--data-dir", "{dir}"],
        "--data-dir is for --dataset cifar10, fashion_mnist, folder or mnist, not --dataset digits (the default)",
    ),
    "data dir with digits": (["--dataset", "digits", "--data-dir", "{dir}"], "not --dataset digits"),
    "data dir with synthetic": (["--dataset", "synthetic", "--data-dir", "{dir}"], "not --dataset synthetic"),
    "data dir with npz": (["--data-path", "{npz}", "--data-dir", "{dir}"], "--data-dir is for --dataset cifar10"),
    "translate = size": (["--augment-translate", "8"], "--augment-translate must be below the image size, 8x8, got 8"),
    "translate 20": (["--augment-translate", "20"], "--augment-translate must be below the image size, 8x8, got 20"),
    "translate 1e12": (["--augment-translate", "1000000000000"], "--augment-translate must be below the image size"),
    "translate npz": (["--data-path", "{npz}", "--augment-translate", "4"], "below the image size, 4x4, got 4"),
    "translate negative": (["--augment-translate", "-1"], "--augment-translate must be an int >= 0, got -1"),
    "ensemble 20000": (["--ensemble", "20000"], "--ensemble must be at most 1024, got 20000"),
    "ensemble seeds": (["--ensemble", "3", "--seed", str(2**32 - 2)], "--ensemble 3 from --seed 4294967294 needs"),
    "momentum": (["--momentum", "1.5"], "--momentum must be a number in [0, 1), got 1.5"),
    "momentum 0": (["--optimizer", "momentum", "--momentum", "0"], "--optimizer 'momentum' needs --momentum > 0"),
    "remat engine": (["--remat", "--gradients", "engine"], "--remat needs --gradients 'autodiff' or 'manual'"),
    "npz without path": (["--dataset", "npz"], "--dataset 'npz' needs --data-path"),
    "cifar without dir": (["--dataset", "cifar10"], "--dataset 'cifar10' needs --data-dir"),
    "warmup": (["--warmup-epochs", "-1"], "--warmup-epochs must be an int >= 0"),
    "schedule epochs": (["--schedule-epochs", "0"], "--schedule-epochs must be an int >= 1"),
    "decay rate": (["--decay-rate", "0"], "--decay-rate must be a number in (0, 1]"),
    "weight decay": (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    "dropout": (["--dropout", "1"], "--dropout must be a number in [0, 1)"),
    "noise": (["--augment-noise", "nan"], "--augment-noise must be a finite number >= 0"),
    "rotate 180": (["--augment-rotate", "180"], "--augment-rotate must be a number of degrees in [0, 180), got 180.0"),
    "rotate negative": (["--augment-rotate", "-5"], "--augment-rotate must be a number of degrees in [0, 180)"),
    "scale 1": (["--augment-scale", "1"], "--augment-scale must be a number in [0, 1), got 1.0"),
    "scale inf": (["--augment-scale", "inf"], "--augment-scale must be a number in [0, 1), got inf"),
    "early stopping": (["--early-stopping", "0"], "--early-stopping must be an int >= 1"),
    "keep": (["--keep", "0"], "--keep must be an int >= 1"),
    "seed": (["--seed", "-1"], "--seed must be an int >= 0"),
    "dtype": (["--dtype", "float16"], "unknown --dtype 'float16'; known: bfloat16, float32"),
    "model": (["--model", "conv_autoencoder"], "--model 'conv_autoencoder' reconstructs its input"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_nonsensical_flags_are_refused_in_one_line_naming_the_flag(case, tmp_path, capsys, no_training):
    flags, message = REFUSED[case]
    npz, directory = write_npz(tmp_path / "mine.npz"), tmp_path / "data"
    directory.mkdir()
    flags = [flag.format(npz=npz, dir=directory) for flag in flags]
    workdir = tmp_path / "run"
    code, _, err = run_cli(*flags, workdir=workdir, capsys=capsys)
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith("jaxcnn train: error: ") and message in last, err
    assert [line for line in err.splitlines() if "error" in line] == [last]
    field = flags[0].lstrip("-").replace("-", "_")
    assert "_" not in field or field not in last  # the flag as typed, never the Config field's name
    assert not workdir.exists()  # nothing written for a run that could not start


def test_a_resumed_run_keeps_its_files_when_a_flag_is_refused(tmp_path, capsys, no_training):
    workdir = tmp_path / "run"
    workdir.mkdir()
    saved = Config(optimizer="adam", schedule="constant").to_json()
    (workdir / "config.json").write_text(saved)
    npz = write_npz(tmp_path / "mine.npz")
    cases = {
        "--data-path is for --dataset npz, not --dataset digits (the run in this workdir)": ["--data-path", str(npz)],
        "--data-dir is for --dataset cifar10, fashion_mnist, folder or mnist, not --dataset digits (the run in this": [
            "--data-dir",
            str(tmp_path),
        ],
        "--augment-translate must be below the image size, 8x8, got 9": ["--augment-translate", "9"],
        "--batch-size must be an int >= 1, got 0": ["--batch-size", "0"],
    }
    for message, flags in cases.items():
        code, _, err = run_cli(*flags, workdir=workdir, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        # the run's files untouched (the writer's lock file, emptied on release, may be there)
        assert sorted(p.name for p in workdir.iterdir() if p.name != ".lock") == ["config.json"]
        assert (workdir / "config.json").read_text() == saved


# -- inferred ----------------------------------------------------------------------------------------------


def test_data_path_alone_implies_dataset_npz(tmp_path, capsys, fit_calls):
    npz = write_npz(tmp_path / "mine.npz")
    code, _, err = run_cli("--data-path", str(npz), workdir=tmp_path / "run", capsys=capsys)
    assert code == 2 and "stopped by the test" in err
    assert fit_calls[-1].dataset == "npz" and fit_calls[-1].data_path == str(npz)
    assert err.splitlines()[0] == "jaxcnn train: note: --data-path implies --dataset npz"
    # a resumed npz run takes --data-path alone as it is
    (tmp_path / "npzrun").mkdir()
    (tmp_path / "npzrun" / "config.json").write_text(Config(dataset="npz", data_path="/old.npz").to_json())
    code, _, err = run_cli("--data-path", str(npz), workdir=tmp_path / "npzrun", capsys=capsys)
    assert "note" not in err and fit_calls[-1].data_path == str(npz) and fit_calls[-1].dataset == "npz"


# -- warned once and not saved -----------------------------------------------------------------------------

NO_EFFECT = [
    (["--optimizer", "sgd", "--momentum", "0.5"], "momentum", "--momentum has no effect with --optimizer sgd"),
    (["--optimizer", "adam", "--momentum", "0.5"], "momentum", "--momentum has no effect with --optimizer adam"),
    (["--optimizer", "adamw", "--momentum", "0.5"], "momentum", "--momentum has no effect with --optimizer adamw"),
    (
        ["--schedule", "constant", "--warmup-epochs", "3"],
        "warmup_epochs",
        "--warmup-epochs has no effect with --schedule constant",
    ),
    (["--warmup-epochs", "3"], "warmup_epochs", "--warmup-epochs has no effect with --schedule exponential"),
    (["--schedule", "cosine", "--warmup-epochs", "3"], "warmup_epochs", "--schedule cosine"),
    (["--schedule", "constant", "--schedule-epochs", "9"], "schedule_epochs", "--schedule-epochs has no effect"),
    (["--schedule-epochs", "9"], "schedule_epochs", "--schedule-epochs has no effect with --schedule exponential"),
    (["--schedule", "constant", "--decay-rate", "0.5"], "decay_rate", "--decay-rate has no effect with --schedule"),
    (["--schedule", "cosine", "--decay-rate", "0.5"], "decay_rate", "--decay-rate has no effect with --schedule cos"),
    (["--schedule", "warmup_cosine", "--decay-rate", "0.5"], "decay_rate", "--schedule warmup_cosine"),
]


@pytest.mark.parametrize("flags, field, warning", NO_EFFECT, ids=[" ".join(case[0]) for case in NO_EFFECT])
def test_a_flag_with_no_effect_is_warned_once_and_not_saved(flags, field, warning, tmp_path, capsys, fit_calls):
    code, out, err = run_cli(*flags, workdir=tmp_path / "run", capsys=capsys)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("jaxcnn train: warning: ") and warning in warnings[0], err
    assert warnings[0].endswith("(ignored, not saved)") and "warning" not in out and code == 2
    assert getattr(fit_calls[-1], field) == getattr(Config(), field)  # the default, not the ignored value


EFFECTIVE = [
    ["--optimizer", "momentum", "--momentum", "0.5"],
    ["--optimizer", "nesterov", "--momentum", "0.5"],
    ["--optimizer", "rmsprop", "--momentum", "0.5"],
    ["--schedule", "warmup_cosine", "--warmup-epochs", "3", "--schedule-epochs", "9"],
    ["--schedule", "cosine", "--schedule-epochs", "9"],
    ["--schedule", "exponential", "--decay-rate", "0.5"],
]


@pytest.mark.parametrize("flags", EFFECTIVE, ids=[" ".join(flags) for flags in EFFECTIVE])
def test_flags_that_take_effect_are_kept_without_a_warning(flags, tmp_path, capsys, fit_calls):
    code, _, err = run_cli(*flags, workdir=tmp_path / "run", capsys=capsys)
    assert "warning" not in err and "note" not in err
    given = {flags[i].lstrip("-").replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
    for field, value in given.items():
        assert str(getattr(fit_calls[-1], field)) == value


def test_ignored_fields_follow_make_optimizer_and_make_schedule():
    from jaxcnn.train.config import ignored_fields

    assert ignored_fields(Config()) == {
        "data_path": "dataset",
        "data_dir": "dataset",
        "schedule_epochs": "schedule",
        "warmup_epochs": "schedule",
        **dict.fromkeys(("image_size", "data_workers", "skip_bad_files"), "dataset"),  # image folders only
    }
    assert "momentum" in ignored_fields(Config(optimizer="adam")) and "data_path" not in ignored_fields(
        Config(dataset="npz", data_path="x.npz")
    )
    assert set(ignored_fields(Config(schedule="warmup_cosine"))) - {"image_size", "data_workers", "skip_bad_files"} == {
        "data_path",
        "data_dir",
        "decay_rate",
    }
    assert not {"image_size", "data_workers", "skip_bad_files", "data_dir"} & set(
        ignored_fields(Config(dataset="folder", data_dir="images"))
    )


# -- in a real process ---------------------------------------------------------------------------------------


def jaxcnn(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "jaxcnn", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


def test_a_huge_translation_fails_in_one_line_before_the_workdir_is_written(tmp_path):
    """It used to fail with an overflow message not naming the flag, after config.json was written."""
    result = jaxcnn("train", "--augment-translate", "1000000000000", "--workdir", "w", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "--augment-translate must be below the image size" in result.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_warnings_and_inference_in_a_real_run(tmp_path):
    npz = write_npz(tmp_path / "mine.npz")
    flags = ["--data-path", str(npz), "--optimizer", "adam", "--momentum", "0.3", "--warmup-epochs", "4"]
    result = jaxcnn(
        "train", *flags, "--batch-size", "4", "--epochs", "1", "--workdir", "w", "--no-progress", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "jaxcnn train: note: --data-path implies --dataset npz",
        "jaxcnn train: warning: --momentum has no effect with --optimizer adam (ignored, not saved)",
        "jaxcnn train: warning: --warmup-epochs has no effect with --schedule exponential (ignored, not saved)",
    ]
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    assert saved["dataset"] == "npz" and saved["momentum"] == Config().momentum
    assert saved["warmup_epochs"] == Config().warmup_epochs
    assert train.read_metrics(tmp_path / "w")[-1]["epoch"] == 1


def test_a_harmful_translation_is_warned_once_on_stderr_naming_the_flag(tmp_path, capsys, no_training):
    """Shifts above half the image are allowed but warned about: one stderr line naming --augment-translate
    (was a stdout line naming neither flag nor field); the library issues a ConfigWarning naming the field."""
    code, out, err = run_cli("--augment-translate", "5", workdir=tmp_path / "run", capsys=capsys)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert code == 2 and "reached the training loop" in err and "warning" not in out, (out, err)
    assert warnings == [
        "jaxcnn train: warning: --augment-translate 5 is above half the image size, 8x8: shifts that large leave "
        "less than half of many images"
    ]
    with pytest.warns(train.config.ConfigWarning, match=r"^augment_translate 5 is above half the image size"):
        with pytest.raises(Stopped):
            train.fit(Config(augment_translate=5), None, log=None)
    assert run_cli("--augment-translate", "4", workdir=tmp_path / "ok", capsys=capsys)[2].count("warning") == 0
