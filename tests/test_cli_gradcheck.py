"""`jaxcnn gradcheck`: the header at once, each row as it is made, `--failures-only`, `--perturbations`."""

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

from jaxcnn import cli, gradcheck, models, nn


class Saved(NamedTuple):
    x: jax.Array


class Scale(nn.Layer):
    """y = gamma * x with a scalar gamma initialised to 1, and a backward that forgets gamma in dx (right only at
    gamma = 1, so only the perturbed point catches it)."""

    def init(self, key, input_shape, *, dtype=jnp.float32):
        return {"gamma": jnp.ones((), dtype)}, {}

    def forward(self, params, x):
        return params["gamma"] * x, Saved(x)

    def backward(self, params, residuals, dy):
        return dy, {"gamma": jnp.sum(dy * residuals.x)}


@pytest.fixture
def tiny_models():
    """Two tiny models registered for the command (and unregistered after): one right, one with the wrong Scale."""
    builders = {
        "tiny_right": lambda: nn.Sequential([nn.Flatten(), nn.Dense(4), nn.Tanh(), nn.Dense(3)]),
        "tiny_wrong": lambda: nn.Sequential([nn.Flatten(), nn.Dense(4), Scale(), nn.Tanh(), nn.Dense(3)]),
    }
    for name, build in builders.items():
        models.register(name, build, input_shape=(3, 3, 1))
    yield
    for name in builders:
        models.unregister(name)


ROW = re.compile(r"^(layer|model)\s+\S+\s+\S+\s+(given|perturbed\(seed=\d+\))\s+")


def test_header_at_once_and_rows_as_they_come(tiny_models, capsys, monkeypatch):
    seen = {}
    check_model = gradcheck.check_model

    def watched(*args, progress, **kwargs):
        seen["before"] = capsys.readouterr().out  # what was printed before the check began

        def watch(check):
            progress(check)
            if "first row" not in seen:
                seen["first row"] = capsys.readouterr().out  # printed while the check still runs

        return check_model(*args, progress=watch, **kwargs)

    monkeypatch.setattr(gradcheck, "check_model", watched)
    code = cli.main(["gradcheck", "--model", "tiny_right", "--batch-size", "2"])
    rest = capsys.readouterr().out
    assert code == 0
    before = seen["before"].splitlines()
    assert before[0] == "gradcheck: model tiny_right, input (3, 3, 1), batch 2, seed 0"
    assert before[1].split() == ["scope", "layer", "quantity", "point", "check", "max", "abs", "err", "max", "rel",
                                 "err", "cosine", "worst", "index", "ok"]  # fmt: skip
    assert set(before[2]) == {"-", " "} and len(before) == 3
    assert ROW.match(seen["first row"]) and seen["first row"].count("\n") == 1
    lines = rest.splitlines()
    rows = [line for line in lines if ROW.match(line)]
    assert {ROW.match(row).group(2) for row in rows} == {"given", "perturbed(seed=0)"}
    assert lines[-2] == f"{len(rows) + 1} rows checked, 0 failed"
    assert lines[-1] == f"{len(rows) + 1} checks in float64: all checks passed"


def test_failures_only_prints_the_failing_rows(tiny_models, capsys):
    code = cli.main(["gradcheck", "--model", "tiny_wrong", "--batch-size", "2", "--failures-only"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.out.splitlines()
    assert lines[0].startswith("gradcheck: model tiny_wrong") and lines[1].startswith("scope")
    rows = lines[3:-2]
    assert rows and all(ROW.match(row) and row.endswith("FAIL") for row in rows)
    # at gamma = 1 the wrong rule is right: at the given point only the finite differences, taken a little off
    # it, see a difference
    assert all("perturbed(seed=0)" in row or "finite diff" in row for row in rows)
    assert any(row.split()[:4] == ["layer", "Scale_0", "input", "perturbed(seed=0)"] for row in rows)
    total = int(lines[-2].split()[0])
    assert lines[-2] == f"{total} rows checked, {len(rows)} failed" and total > len(rows)
    assert lines[-1].endswith(f"{len(rows)} of {total} checks FAILED")
    # progress goes to stderr, a line per layer
    progress = captured.err.splitlines()
    assert "checking layer Scale_0 at given ..." in progress
    assert "checking layer Scale_0 at perturbed(seed=0) ..." in progress
    assert progress.count("checking model gradients at perturbed(seed=0) ...") == 1


def test_given_point_only_is_fooled(tiny_models, capsys):
    # (without finite differences: those are taken a little off the given point, where this rule is already off)
    args = ["--model", "tiny_wrong", "--batch-size", "2", "--perturbations", "0", "--no-finite-differences"]
    code = cli.main(["gradcheck", *args])
    out = capsys.readouterr().out
    assert code == 0 and "perturbed" not in out


def test_bad_perturbations_is_one_line(tiny_models, capsys):
    code = cli.main(["gradcheck", "--model", "tiny_right", "--perturbations", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err == "jaxcnn gradcheck: error: --perturbations must be >= 0, got -1\n"
