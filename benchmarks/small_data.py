"""Small data: jaxcnn against scikit-learn's SVC on the 8x8 digits, at training fractions from 25% to 80%.

For every fraction and split seed, the 1,797 digits are split at random, stratified by class
(``sklearn.model_selection.train_test_split(..., train_size=fraction, stratify=y, random_state=seed)``).
SVC is scikit-learn's classic digits recipe, ``SVC(gamma=0.001)`` on the raw 0..16 pixels (64 features).
jaxcnn trains each candidate recipe (a model and its training options) in process through
:func:`jaxcnn.train.fit` on the same split, its images scaled to [0, 1] and standardised with the training part's
statistics, as ``jaxcnn train --dataset npz`` does.

Two modes:

* ``--select``: chooses a recipe without touching any test part. Each training part is split again
  (stratified, ``--validation`` of it held out); every candidate recipe and SVC train on the rest and are
  scored on the held-out part. The candidate whose smallest margin over SVC (over every fraction and seed) is
  largest wins, ties broken by mean validation accuracy. Writes ``small_data_selection.{md,json}``.
* the default: the test accuracies of SVC, jaxcnn's defaults and the recipe given by ``--recipe`` (a
  candidate's name), trained on the whole training part. Writes ``small_data.{md,json}``.

Run from the repository root (about 25 and 15 minutes on one CPU core)::

    PYTHONPATH=src python benchmarks/small_data.py --select --candidates small-data digits-cnn digits-cnn-affine
    PYTHONPATH=src python benchmarks/small_data.py --recipe digits-cnn
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FRACTIONS = (0.25, 0.4, 0.5, 0.6, 0.8)
SEEDS = (0, 1, 2)

# Candidate recipes: Config fields changed from the defaults. "defaults" changes nothing.
CANDIDATES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "translate1": {"augment_translate": 1},
    "small-data": {"augment_translate": 1, "batch_size": 16, "learning_rate": 0.05, "epochs": 80, "decay_rate": 0.95},
    "small-data-noise": {
        "augment_translate": 1,
        "augment_noise": 0.3,
        "batch_size": 16,
        "learning_rate": 0.05,
        "epochs": 80,
        "decay_rate": 0.95,
    },
    "small-data-affine": {
        "augment_translate": 1,
        "augment_rotate": 12.0,
        "augment_scale": 0.1,
        "batch_size": 16,
        "learning_rate": 0.05,
        "epochs": 80,
        "decay_rate": 0.95,
    },
    "small-data-affine-mild": {
        "augment_translate": 1,
        "augment_rotate": 6.0,
        "augment_scale": 0.05,
        "batch_size": 16,
        "learning_rate": 0.05,
        "epochs": 80,
        "decay_rate": 0.95,
    },
    "small-data-affine-long": {
        "augment_translate": 1,
        "augment_rotate": 12.0,
        "augment_scale": 0.1,
        "batch_size": 16,
        "learning_rate": 0.05,
        "epochs": 120,
        "decay_rate": 0.95,
    },
    "digits-cnn": {
        "model": "digits_cnn",
        "augment_translate": 1,
        "batch_size": 16,
        "learning_rate": 0.05,
        "epochs": 80,
        "decay_rate": 0.95,
    },
    "digits-cnn-affine": {
        "model": "digits_cnn",
        "augment_translate": 1,
        "augment_rotate": 6.0,
        "augment_scale": 0.05,
        "batch_size": 16,
        "learning_rate": 0.05,
        "epochs": 80,
        "decay_rate": 0.95,
    },
}


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images ``(1797, 8, 8)`` float64 in 0..16 and labels ``(1797,)``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[tuple, tuple]:
    """A random stratified split: ``((x_train, y_train), (x_test, y_test))`` with ``fraction`` for training."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(x, y, train_size=fraction, stratify=y, random_state=seed)
    return (x_train, y_train), (x_test, y_test)


def svc_accuracy(train: tuple, test: tuple) -> float:
    """``SVC(gamma=0.001)`` on the raw 0..16 pixels, flattened to 64 features: its accuracy on ``test``."""
    from sklearn.svm import SVC

    (x_train, y_train), (x_test, y_test) = train, test
    model = SVC(gamma=0.001).fit(x_train.reshape(len(x_train), -1), y_train)
    return float(model.score(x_test.reshape(len(x_test), -1), y_test))


def cnn_accuracy(overrides: dict[str, Any], train: tuple, test: tuple, seed: int = 0) -> float:
    """jaxcnn's ``Config(**overrides, seed=seed)`` trained on ``train``: its final test accuracy on ``test``."""
    from jaxcnn.data import Dataset, standardize
    from jaxcnn.train import Config, fit

    def images(x: np.ndarray) -> np.ndarray:
        return (x.reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)

    (x_train, y_train), (x_test, y_test) = train, test
    config = Config(**overrides, seed=seed)
    data = Dataset("npz", images(x_train), y_train.astype(np.int32), images(x_test), y_test.astype(np.int32), 10)
    _, history = fit(config, data=standardize(data) if config.normalize else data, log=None)
    return float(history[-1]["test_accuracy"])


def _summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def select(fractions, seeds, validation: float, names: list[str], say) -> dict[str, Any]:
    """Score SVC and every candidate on a validation part carved from each training part (never the test part)."""
    x, y = digits()
    rows = []
    for fraction in fractions:
        for seed in seeds:
            train, _ = split(x, y, fraction, seed)  # the test part is dropped here, unseen
            fit_part, held_out = split(*train, 1 - validation, seed)
            row = {"fraction": fraction, "seed": seed, "svc": svc_accuracy(fit_part, held_out)}
            for name in names:
                started = time.perf_counter()
                row[name] = cnn_accuracy(CANDIDATES[name], fit_part, held_out)
                say(
                    f"fraction {fraction} seed {seed} {name}: validation {row[name]:.4f} (svc {row['svc']:.4f}) "
                    f"{time.perf_counter() - started:.1f}s"
                )
            rows.append(row)
    ranking = sorted(
        names,
        key=lambda n: (min(r[n] - r["svc"] for r in rows), statistics.mean(r[n] for r in rows)),
        reverse=True,
    )
    return {"validation": validation, "rows": rows, "ranking": ranking, "chosen": ranking[0]}


def report(fractions, seeds, recipe: str, say) -> dict[str, Any]:
    """Test accuracies of SVC, jaxcnn's defaults and ``recipe`` on each fraction and split seed."""
    x, y = digits()
    rows = []
    for fraction in fractions:
        for seed in seeds:
            train, test = split(x, y, fraction, seed)
            row = {"fraction": fraction, "seed": seed, "svc": svc_accuracy(train, test)}
            for name in dict.fromkeys(("defaults", recipe)):
                row[name] = cnn_accuracy(CANDIDATES[name], train, test)
            say(f"fraction {fraction} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "seed"))
            rows.append(row)
    return {"recipe": recipe, "overrides": CANDIDATES[recipe], "rows": rows}


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = [
        "| train fraction | train / test images | " + " | ".join(columns) + " | smallest margin over SVC | beats SVC |",
        "|---|---|" + "---:|" * (len(columns) + 1) + "---|",
    ]
    for fraction in dict.fromkeys(r["fraction"] for r in rows):
        part = [r for r in rows if r["fraction"] == fraction]
        n_train = math.floor(1797 * fraction)  # as train_test_split counts
        cells = [_summary([r[c] for r in part]) for c in columns]
        margin = min(r[columns[-1]] - r["svc"] for r in part)
        beats = statistics.mean(r[columns[-1]] for r in part) > statistics.mean(r["svc"] for r in part)
        lines.append(
            f"| {fraction:.0%} | {n_train} / {1797 - n_train} | "
            + " | ".join(cells)
            + f" | {margin:+.4f} | {'yes' if beats else 'no'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--select", action="store_true", help="Choose a recipe on validation parts only.")
    parser.add_argument("--recipe", default="digits-cnn", choices=sorted(CANDIDATES))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=sorted(CANDIDATES))
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--validation", type=float, default=0.25, help="Share of each training part held out.")
    parser.add_argument("--output", default=str(Path(__file__).parent), help="Directory for the .md and .json.")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    import jax
    import sklearn

    versions = f"python {platform.python_version()}, jax {jax.__version__}, scikit-learn {sklearn.__version__}"
    started = time.perf_counter()
    output = Path(args.output)
    if args.select:
        result = select(args.fractions, args.seeds, args.validation, args.candidates, say)
        stem, title = "small_data_selection", "Small data: choosing a recipe on validation parts"
        columns = ["svc", *args.candidates]
        notes = [
            f"Each training part split again, {args.validation:.0%} held out for validation; the test parts unseen.",
            f"Ranking (by smallest validation margin over SVC): {', '.join(result['ranking'])}.",
            f"Chosen: `{result['chosen']}` = `{CANDIDATES[result['chosen']]}`.",
        ]
        lines = [
            "| train fraction | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for fraction in args.fractions:
            part = [r for r in result["rows"] if r["fraction"] == fraction]
            lines.append(f"| {fraction:.0%} | " + " | ".join(_summary([r[c] for r in part]) for c in columns) + " |")
    else:
        result = report(args.fractions, args.seeds, args.recipe, say)
        stem, title = "small_data", "Small data: jaxcnn against SVC(gamma=0.001) on the digits"
        columns = ["svc", "defaults", args.recipe] if args.recipe != "defaults" else ["svc", "defaults"]
        notes = [f"Recipe `{args.recipe}`: `{CANDIDATES[args.recipe]}`; margins are the recipe's."]
        lines = _table(result["rows"], columns)
    result.update(versions=versions, seconds=round(time.perf_counter() - started, 1), seeds=args.seeds)
    given = list(sys.argv[1:] if argv is None else argv)
    if "--output" in given:  # where it wrote is no part of what it measured
        del given[given.index("--output") : given.index("--output") + 2]
    command = shlex.join(["PYTHONPATH=src", "python", "benchmarks/small_data.py", *given])
    text = [
        f"# {title}",
        "",
        f"Command: `{command}`; split seeds {', '.join(map(str, args.seeds))} per fraction (mean ± std).",
        f"Versions: {versions}; {result['seconds']} s.",
        *notes,
        "",
        *lines,
        "",
    ]
    (output / f"{stem}.md").write_text("\n".join(text), encoding="utf-8")
    (output / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
