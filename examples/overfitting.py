"""Overfitting and its cures: mnist_cnn trained on 100 of the digits' training images, without regularisation and
with each of augmentation, dropout, weight decay and early stopping (and all together), through the library's
own train options (jaxcnn.train.Config, the same as ``jaxcnn train`` flags).

The model has about 87,000 parameters for 100 images, so without help it learns the training set by heart: the
training loss goes to zero while the test loss turns back up. Each cure narrows that gap in its own way.

Run:  python examples/overfitting.py [--quick] [--output DIR]
Writes overfitting.png, results.json and results.md into the output directory (printed at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

import jaxcnn as jc

SUBSET = 100
BASE = {"optimizer": "adam", "learning_rate": 3e-3, "schedule": "constant", "weight_decay": 0.0, "batch_size": 32}
VARIANTS = {
    "none": {},
    "augmentation": {"augment_translate": 1, "augment_noise": 0.1},
    "dropout": {"dropout": 0.5},
    "weight decay": {"optimizer": "adamw", "weight_decay": 0.5},
    "early stopping": {"early_stopping": 5},
    "all": {
        "augment_translate": 1,
        "augment_noise": 0.1,
        "dropout": 0.5,
        "optimizer": "adamw",
        "weight_decay": 0.5,
        "early_stopping": 5,
    },
}


def subset(data: jc.data.Dataset, count: int, seed: int) -> jc.data.Dataset:
    """The first ``count`` training images of a seeded shuffle (every class present), the full test set."""
    order = np.random.default_rng(seed).permutation(len(data.y_train))[:count]
    return dataclasses.replace(data, x_train=data.x_train[order], y_train=data.y_train[order])


def build_parser() -> argparse.ArgumentParser:
    """The command line: every help text a sentence."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), add_help=False)
    parser.add_argument("-h", "--help", action="help", help="Show this help message and exit.")
    parser.add_argument("--quick", action="store_true", help="Train for fewer epochs (under a minute on 2 CPU cores).")
    parser.add_argument(
        "--output",
        default="runs/examples/overfitting",
        help="Directory for the figure and results (default: runs/examples/overfitting).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the subset, the parameters and the batches (default: 0)."
    )
    return parser


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    epochs = 60 if args.quick else 150
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    data = subset(jc.data.load("digits"), SUBSET, args.seed)
    runs = {}
    for index, (name, changes) in enumerate(VARIANTS.items(), 1):
        print(f"training {name} ({index}/{len(VARIANTS)}): {epochs} epochs at most ...", end=" ", flush=True)
        started = time.perf_counter()
        config = jc.train.Config(epochs=epochs, seed=args.seed, **{**BASE, **changes})
        _, history = jc.train.fit(config, None, data=data, log=None)
        runs[name] = history
        seconds = time.perf_counter() - started
        print(
            f"{seconds:.1f} s, {len(history)} epochs, test loss {history[-1]['test_loss']:.4f}, "
            f"train loss {history[-1]['train_loss']:.4f}",
            flush=True,
        )
    rows = []
    for name, history in runs.items():
        last = history[-1]
        best = min(history, key=lambda r: r["test_loss"])
        rows.append(
            {
                "variant": name,
                "epochs": last["epoch"],
                "train_accuracy": last["train_accuracy"],
                "test_accuracy": last["test_accuracy"],
                "train_loss": last["train_loss"],
                "test_loss": last["test_loss"],
                "gap": last["test_loss"] - last["train_loss"],
                "best_test_loss": best["test_loss"],
                "best_epoch": best["epoch"],
            }
        )
    (output / "results.json").write_text(json.dumps({"subset": SUBSET, "rows": rows, "history": runs}, indent=2) + "\n")
    table = [
        f"mnist_cnn on {SUBSET} digits, {epochs} epochs at most (Adam 3e-3)",
        "",
        "| cure | epochs | train acc | test acc | train loss | test loss | gap (test - train loss) "
        "| best test loss (epoch) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        table.append(
            f"| {row['variant']} | {row['epochs']} | {row['train_accuracy']:.3f} | {row['test_accuracy']:.3f} | "
            f"{row['train_loss']:.4f} | {row['test_loss']:.4f} | {row['gap']:.4f} | "
            f"{row['best_test_loss']:.4f} ({row['best_epoch']}) |"
        )
    (output / "results.md").write_text("\n".join(table) + "\n")
    _figure(runs, output / "overfitting.png")
    print("\n".join(table))
    print(f"written: {output / 'overfitting.png'}, {output / 'results.json'}, {output / 'results.md'}")
    return output


def _figure(runs, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    curves, gaps = figure.subplots(1, 2)
    for index, (name, history) in enumerate(runs.items()):
        colour = f"C{index}"
        epochs = [r["epoch"] for r in history]
        # early stopping is the "none" run until it stops: a wide translucent band under the thin lines shows both
        band = name == "early stopping"
        wide = {"linewidth": 7, "alpha": 0.45, "zorder": 1} if band else {"zorder": 2}
        label = name
        if len(history) < len(max(runs.values(), key=len)):
            label = f"{name} (stopped at epoch {epochs[-1]}, X)"
        test = [r["test_loss"] for r in history]
        gap = [r["test_loss"] - r["train_loss"] for r in history]
        train = {"linewidth": 5, "alpha": 0.45, "zorder": 1} if band else {"linewidth": 1, "zorder": 2}
        curves.plot(epochs, [r["train_loss"] for r in history], "--", color=colour, **train)
        curves.plot(epochs, test, "-", color=colour, label=label, **wide)
        gaps.plot(epochs, gap, "-", color=colour, label=label, **wide)
        if label != name:  # where the run stopped
            curves.plot(epochs[-1], test[-1], "X", color=colour, markersize=10, markeredgecolor="black", zorder=3)
            gaps.plot(epochs[-1], gap[-1], "X", color=colour, markersize=10, markeredgecolor="black", zorder=3)
    curves.set_yscale("log")
    curves.set_xlabel("epoch")
    curves.set_ylabel("loss (solid: test, dashed: train)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    gaps.set_xlabel("epoch")
    gaps.set_ylabel("generalisation gap: test loss - train loss")
    gaps.grid(alpha=0.3)
    gaps.legend(fontsize=8)
    figure.suptitle(f"overfitting {SUBSET} digits, and its cures")
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
