"""Small data (issue 13, defect 11): the README's small-data recipe is the one benchmarks/small_data.py measured,
its table is that benchmark's figures, and the recipe beats SVC(gamma=0.001) on the digits at every fraction."""

import json
import pathlib
import re
import shlex
import statistics

import numpy as np
import pytest

from conftest import load_file
from jaxcnn import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = json.loads((ROOT / "benchmarks" / "small_data.json").read_text())


def _benchmark():
    return load_file("benchmarks/small_data.py")


def _section() -> str:
    return README.split("### Small data", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


def _recipe_overrides() -> dict:
    """The Config fields the README's small-data `jaxcnn train` command sets, parsed by the real CLI parser."""
    command = re.search(r"^\$? ?(jaxcnn train .*)$", _section(), flags=re.M).group(1)
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    names = set(cli._TRAIN_FLAGS) | set(cli._SWITCHES)
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def test_readme_recipe_is_the_measured_one():
    overrides = _recipe_overrides()
    overrides.pop("dataset", None), overrides.pop("data_path", None)  # the user's data, not the recipe
    assert overrides == _benchmark().CANDIDATES[RESULTS["recipe"]] == RESULTS["overrides"]


def test_readme_table_is_the_benchmark_and_says_where_svc_wins():
    fractions = sorted({row["fraction"] for row in RESULTS["rows"]})
    assert fractions[0] <= 0.25 and fractions[-1] >= 0.8 and len(fractions) >= 4
    table = _section()
    for fraction in fractions:
        rows = [row for row in RESULTS["rows"] if row["fraction"] == fraction]
        assert len(rows) >= 3  # several random splits
        svc, defaults, recipe = (
            statistics.mean(row[name] for row in rows) for name in ("svc", "defaults", RESULTS["recipe"])
        )
        assert recipe > defaults, fraction  # the recipe is worth showing at every fraction
        line = next(line for line in table.splitlines() if line.startswith(f"| {fraction:.0%} |"))
        assert all(f"{value:.4f}" in line for value in (svc, defaults, recipe)), line
        assert line.rstrip(" |").endswith("yes" if recipe > svc else "no"), line  # no claim the figures do not make


@pytest.mark.slow
def test_benchmark_row_reproduces():
    """One recorded split (40% for training, split seed 0) trained again: the recipe's figure comes back (to a
    couple of test images, for another machine's float order) and it beats SVC there."""
    bench = _benchmark()
    row = next(r for r in RESULTS["rows"] if r["fraction"] == 0.4 and r["seed"] == 0)
    train, test = bench.split(*bench.digits(), 0.4, 0)
    svc = bench.svc_accuracy(train, test)
    recipe = bench.cnn_accuracy(bench.CANDIDATES[RESULTS["recipe"]], train, test)
    assert svc == pytest.approx(row["svc"], abs=1e-9)
    assert recipe == pytest.approx(row[RESULTS["recipe"]], abs=0.002) and recipe > svc


def test_recipe_is_the_one_chosen_on_validation_parts_among_the_rotation_and_zoom_candidates():
    selection = json.loads((ROOT / "benchmarks" / "small_data_selection.json").read_text())
    assert selection["chosen"] == RESULTS["recipe"] == selection["ranking"][0]
    candidates = _benchmark().CANDIDATES
    assert any(candidates[name].get("augment_rotate") for name in selection["ranking"])  # the warp was in the race
    rows = selection["rows"]

    def rank_key(name):
        return (min(r[name] - r["svc"] for r in rows), statistics.mean(r[name] for r in rows))

    assert max(selection["ranking"], key=rank_key) == selection["chosen"]  # the stated rule, recomputed


def test_recipe_beats_svc_at_every_fraction():
    """The defect itself: on the recorded test parts the chosen recipe's mean accuracy is above SVC's at every
    training fraction from 25% to 80% (v0.1's defaults, and the earlier mnist_cnn recipe, were below at 25-60%)."""
    fractions = sorted({row["fraction"] for row in RESULTS["rows"]})
    assert fractions == [0.25, 0.4, 0.5, 0.6, 0.8]
    for fraction in fractions:
        rows = [row for row in RESULTS["rows"] if row["fraction"] == fraction]
        recipe, svc = (statistics.mean(row[name] for row in rows) for name in (RESULTS["recipe"], "svc"))
        assert recipe > svc, (fraction, recipe, svc)


def test_the_recipe_model_trains_from_the_cli(tmp_path, capsys):
    """`jaxcnn train --model digits_cnn` (the recipe's model) on a tiny 8x8 npz set: one epoch, a checkpoint."""
    from jaxcnn import train

    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 17, (12, 8, 8)).astype(np.float32),
        "y_train": np.arange(12) % 10,
        "x_test": rng.integers(0, 17, (5, 8, 8)).astype(np.float32),
        "y_test": np.arange(5),
    }
    np.savez(tmp_path / "tiny.npz", **arrays)
    workdir = tmp_path / "run"
    flags = ["--dataset", "npz", "--data-path", str(tmp_path / "tiny.npz"), "--model", "digits_cnn"]
    code = cli.main(["train", *flags, "--batch-size", "4", "--epochs", "1", "--workdir", str(workdir), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].startswith("training digits_cnn on npz") and "done: test accuracy" in out
    assert train.read_config(workdir).model == "digits_cnn" and train.restore(workdir).step == 3
