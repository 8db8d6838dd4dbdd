"""The examples run as their docstrings say: each ``--quick`` run exits 0 and writes its figure and results
(marked slow: ``python -m pytest -m slow tests/test_examples.py``)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# example -> the files its --quick run writes
EXAMPLES = {
    "activations": ["activations.png", "results.json", "results.md"],
    "alternatives": ["alternatives.png", "results.json", "results.md"],
    "autoencoder": ["reconstructions.png", "loss.png", "results.json", "results.md"],
    "overfitting": ["overfitting.png", "results.json", "results.md"],
    "rnn_vs_cnn": ["rnn_vs_cnn.png", "results.json", "results.md"],
    "vanishing_gradients": ["vanishing_gradients.png", "results.json", "results.md"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_quick_run_writes_its_figures_and_results(name, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(tmp_path) in result.stdout  # the output directory is printed
    for file in EXAMPLES[name]:
        assert (tmp_path / file).stat().st_size > 0, file
    assert json.loads((tmp_path / "results.json").read_text())


@pytest.mark.slow
def test_alternatives_table_reports_accuracy_per_second_and_per_evaluation(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "alternatives.py"), "--quick", "--output", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["backprop", "es", "forward", "spsa"]
    for row in rows:
        assert row["accuracy_per_second"] == pytest.approx(row["test_accuracy"] / row["train_seconds"])
        assert row["accuracy_per_1k_evaluations"] == pytest.approx(
            1000 * row["test_accuracy"] / row["forward_evaluations"]
        )
    evaluations = {row["method"]: row["forward_evaluations"] for row in rows}
    assert evaluations == {"backprop": 150, "es": 150 * 64, "forward": 150 * 16, "spsa": 150 * 64}


def test_the_readme_links_every_example_with_a_figure():
    readme = (ROOT / "README.md").read_text()
    for name, files in EXAMPLES.items():
        assert f"(examples/{name}.py)" in readme, name
        figures = [f for f in files if f.endswith(".png") and f"(docs/figures/{f})" in readme]
        assert figures, f"no figure of {name} in the README"
        for figure in figures:
            assert (ROOT / "docs" / "figures" / figure).stat().st_size > 5000
