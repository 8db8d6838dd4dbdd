"""The examples run as their docstrings say: each ``--quick`` run exits 0, says what it is doing as it goes and
writes its figure and results (marked slow: ``python -m pytest -m slow tests/test_examples.py``); each ``--help``
is whole sentences."""

import json
import pathlib
import re
import runpy
import subprocess
import sys
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# example -> the files its --quick run writes
EXAMPLES = {
    "activations": ["activations.png", "results.json", "results.md"],
    "alternatives": ["alternatives.png", "results.json", "results.md"],
    "autoencoder": ["reconstructions.png", "loss.png", "results.json", "results.md"],
    "dp_sgd": ["dp_sgd.png", "results.json", "results.md"],
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
    lines = result.stdout.splitlines()
    assert "..." in lines[0], lines[0]  # what it does first, said before doing it (the result follows on the line)
    # a line per run or phase, numbered (k/n) with k = 1..n, all before the results table
    numbered = [(i, re.search(r"\((\d+)/(\d+)\)", line)) for i, line in enumerate(lines)]
    numbered = [(i, int(m[1]), int(m[2])) for i, m in numbered if m]
    total = numbered[0][2]
    assert total >= 2 and [k for _, k, _ in numbered] == list(range(1, total + 1)), lines
    assert all(n == total for _, _, n in numbered)
    table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert numbered[-1][0] < table
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


@pytest.mark.slow
def test_dp_sgd_reports_each_epochs_poisson_epsilon_as_dp_accounting_computes_it(tmp_path):
    from dp_accounting import dp_event, rdp

    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dp_sgd.py"), "--quick", "--output", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads((tmp_path / "results.json").read_text())
    assert (result["sampling"], result["method"], result["accountant"]) == ("poisson", "ghost", "rdp")
    q, delta, steps_per_epoch = result["sampling_rate"], result["delta"], result["steps_per_epoch"]
    assert (q, delta, steps_per_epoch) == (64 / 1437, 1e-4, 23)
    finals = []
    for row in result["rows"]:
        sigma, history = row["noise_multiplier"], result["history"][str(row["noise_multiplier"])]
        assert [h["steps"] for h in history] == [steps_per_epoch * h["epoch"] for h in history]
        for h in history:  # the accountant's figure for Poisson sampling, computed here without jaxcnn
            event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
            accountant = rdp.RdpAccountant().compose(dp_event.SelfComposedDpEvent(event, h["steps"]))
            assert h["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
            assert 0 <= h["clipped"] <= 1 and abs(h["mean_batch"] - 64) < 8  # Poisson batches of mean q N = 64
        assert [h["epsilon"] for h in history] == sorted({h["epsilon"] for h in history})  # grows every epoch
        assert row["test_accuracy"] < result["non_private"]["test_accuracy"]  # the ceiling
        finals.append((sigma, row["epsilon"]))
    assert [e for _, e in sorted(finals)] == sorted((e for _, e in finals), reverse=True)  # more noise, less spent


def test_the_readme_links_every_example_with_a_figure():
    readme = (ROOT / "README.md").read_text()
    for name, files in EXAMPLES.items():
        assert f"(examples/{name}.py)" in readme, name
        figures = [f for f in files if f.endswith(".png") and f"(docs/figures/{f})" in readme]
        assert figures, f"no figure of {name} in the README"
        for figure in figures:
            assert (ROOT / "docs" / "figures" / figure).stat().st_size > 5000


def help_text(name, monkeypatch, capsys) -> str:
    """``python examples/NAME.py --help`` run in this process (no second jax import), unwrapped."""
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal width: one line per option
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="__main__")
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def is_sentence(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][^\n]*[.]", text)) and text.count("(") == text.count(")")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_help_is_whole_sentences(name, monkeypatch, capsys):
    text = help_text(name, monkeypatch, capsys)
    usage, description, options = text.strip().split("\n\n")
    assert usage.startswith(f"usage: {name}.py")
    assert is_sentence(description) and len(description) > 80, description
    first, *rest = options.splitlines()
    assert first == "options:" and len(rest) >= 4, options  # -h, --quick, --output, --seed
    for line in rest:
        invocation, help_ = re.fullmatch(r"  (-\S.*?)  +(.*)", line).groups()
        assert is_sentence(help_), f"{name} {invocation}: {help_!r}"


def test_an_example_says_what_it_does_at_once(tmp_path):
    """The first line comes (flushed) while the work is still going on, not with the results at the end."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "activations.py"), "--quick", "--output", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        first = []
        reader = threading.Thread(target=lambda: first.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert first and first[0].endswith("...\n"), first
        assert process.poll() is None  # still working: the line was not held back until the end
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
