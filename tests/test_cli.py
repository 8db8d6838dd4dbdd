"""The jaxcnn command: gradcheck prints its table and exits 0 on agreement; bad input is a one-line error."""

import subprocess
import sys

import pytest

from jaxcnn import cli


# a whole gradcheck of mnist_cnn through the CLI; test_cli_gradcheck.py and the failing case below run by default
@pytest.mark.slow
def test_gradcheck_command_passes(capsys):
    code = cli.main(["gradcheck", "--model", "lenet5", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "gradcheck: model lenet5" in out
    assert "Conv_0" in out and "engine vs autodiff" in out and "hand vs finite diff" in out
    assert out.strip().splitlines()[-1].endswith("all checks passed")


def test_gradcheck_float32_without_layers(capsys):
    code = cli.main(["gradcheck", "--dtype", "float32", "--no-layers", "--no-finite-differences", "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "checks in float32" in out


def run(*args):
    return subprocess.run([sys.executable, "-m", "jaxcnn.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.sample(3)  # each case starts a process; test_cli_train.py runs every bad input in process
@pytest.mark.parametrize(
    "args,message",
    [
        (["gradcheck", "--model", "nope"], "invalid choice: 'nope'"),
        (["gradcheck", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["gradcheck", "--dtype", "float16"], "invalid choice: 'float16'"),
        (["gradcheck", "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["gradcheck", "--seed", "99999999999999999999"], "--seed must be in [0, 2**32)"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1


def test_gradcheck_command_exits_1_on_a_mismatch(monkeypatch, capsys):
    from jaxcnn import models, nn
    from models_for_tests import WrongDense

    wrong = lambda: nn.Sequential(
        [nn.Conv2D(2, 3, padding="VALID"), nn.ReLU(), nn.Flatten(), WrongDense(4), nn.Dense(10)]
    )
    monkeypatch.setitem(models._SPECS, "wrong_dense", models.ModelSpec("wrong_dense", wrong, (28, 28, 1)))
    code = cli.main(["gradcheck", "--model", "wrong_dense", "--batch-size", "2", "--no-finite-differences"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "checks FAILED" in out.splitlines()[-1]
