"""Activations and their derivatives: each activation's hand-derived derivative (its ``*_vjp`` in
jaxcnn.functional, with a cotangent of ones) drawn next to autodiff's (``jax.grad``), their largest difference in
float64, and each activation's effect on a short training run of the same small CNN on the digits.

Run:  python examples/activations.py [--quick] [--output DIR]
Writes activations.png, results.json and results.md into the output directory (printed at the end).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxcnn as jc
import jaxcnn.functional as F
from jaxcnn import nn

# name -> (functional forward, its hand VJP, the layer)
ACTIVATIONS = {
    "relu": (F.relu, F.relu_vjp, nn.ReLU),
    "leaky_relu": (F.leaky_relu, F.leaky_relu_vjp, nn.LeakyReLU),
    "elu": (F.elu, F.elu_vjp, nn.ELU),
    "gelu": (F.gelu, F.gelu_vjp, nn.GELU),
    "softplus": (F.softplus, F.softplus_vjp, nn.Softplus),
    "sigmoid": (F.sigmoid, F.sigmoid_vjp, nn.Sigmoid),
    "tanh": (F.tanh, F.tanh_vjp, nn.Tanh),
}


def derivatives(name: str, x: jax.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(f(x), hand f'(x), autodiff f'(x))`` on a grid, in float64."""
    forward, vjp, _ = ACTIVATIONS[name]
    hand = vjp(x, jnp.ones_like(x))
    auto = jax.vmap(jax.grad(forward))(x)
    return np.asarray(forward(x)), np.asarray(hand), np.asarray(auto)


def small_cnn(activation) -> nn.Sequential:
    return nn.Sequential(
        [
            nn.Conv2D(16, 3, padding="SAME"),
            activation(),
            nn.AvgPool2D(2),
            nn.Conv2D(32, 3, padding="SAME"),
            activation(),
            nn.AvgPool2D(2),
            nn.Flatten(),
            nn.Dense(10),
        ]
    )


def train(name: str, data, epochs: int, seed: int) -> list[dict]:
    """The small CNN with this activation, trained by ``jc.train.fit`` (Adam 3e-3, batches of 64, the hand rules):
    one record per epoch, with its step, test loss and test accuracy."""
    config = jc.train.Config(
        optimizer="adam", learning_rate=3e-3, schedule="constant", weight_decay=0.0, batch_size=64,
        epochs=epochs, seed=seed, gradients="manual",
    )  # fmt: skip
    _, history = jc.train.fit(config, None, model=small_cnn(ACTIVATIONS[name][2]), data=data, log=None)
    return [{key: record[key] for key in ("step", "test_loss", "test_accuracy")} for record in history]


def build_parser() -> argparse.ArgumentParser:
    """The command line: every help text a sentence."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), add_help=False)
    parser.add_argument("-h", "--help", action="help", help="Show this help message and exit.")
    parser.add_argument("--quick", action="store_true", help="Train for fewer epochs (under a minute on 2 CPU cores).")
    parser.add_argument(
        "--output",
        default="runs/examples/activations",
        help="Directory for the figure and results (default: runs/examples/activations).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the parameters and the batches (default: 0).")
    return parser


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    epochs = 4 if args.quick else 40  # 23 steps of 64 digits an epoch
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    print(f"derivatives of the {len(ACTIVATIONS)} activations, hand against autodiff, in float64 ...", flush=True)
    with jax.enable_x64(True):  # the derivative comparison in float64
        grid = jnp.linspace(-4.0, 4.0, 801, dtype=jnp.float64)
        curves = {name: derivatives(name, grid) for name in ACTIVATIONS}
    with jax.enable_x64(False):
        data = jc.data.load("digits")
        runs = {}
        for index, name in enumerate(ACTIVATIONS, 1):
            print(f"training {name} ({index}/{len(ACTIVATIONS)}): {epochs} epochs ...", end=" ", flush=True)
            started = time.perf_counter()
            runs[name] = train(name, data, epochs, args.seed)
            seconds = time.perf_counter() - started
            print(f"{seconds:.1f} s, test accuracy {runs[name][-1]['test_accuracy']:.3f}", flush=True)
    rows = []
    for name, (_, hand, auto) in curves.items():
        last = runs[name][-1]
        rows.append(
            {
                "activation": name,
                "max_abs_difference_hand_vs_autodiff": float(np.max(np.abs(hand - auto))),
                "test_accuracy": last["test_accuracy"],
                "test_loss": last["test_loss"],
            }
        )
    (output / "results.json").write_text(json.dumps({"epochs": epochs, "rows": rows, "history": runs}, indent=2) + "\n")
    table = [
        f"hand-derived against autodiff derivative on [-4, 4] (801 points, float64); small CNN, Adam, {epochs} epochs",
        "",
        "| activation | max abs difference of f' | test acc | test loss |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        table.append(
            f"| {row['activation']} | {row['max_abs_difference_hand_vs_autodiff']:.1e} | "
            f"{row['test_accuracy']:.3f} | {row['test_loss']:.4f} |"
        )
    (output / "results.md").write_text("\n".join(table) + "\n")
    _figure(grid, curves, runs, output / "activations.png")
    print("\n".join(table))
    print(f"written: {output / 'activations.png'}, {output / 'results.json'}, {output / 'results.md'}")
    return output


def _figure(grid, curves, runs, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(2, 4).reshape(-1)
    x = np.asarray(grid)
    for axes, (name, (value, hand, auto)) in zip(panels[: len(curves)], curves.items(), strict=True):
        axes.plot(x, value, color="C0", label="f")
        axes.plot(x, hand, color="C1", linewidth=3, alpha=0.6, label="f' hand")
        axes.plot(x, auto, "k:", label="f' autodiff")
        axes.set_title(name)
        axes.grid(alpha=0.3)
        axes.set_ylim(-1.5, 4.2)
    panels[0].legend(fontsize=8)
    training = panels[-1]
    for name, history in runs.items():
        training.plot(
            [r["step"] for r in history], [r["test_accuracy"] for r in history], "-o", markersize=2, label=name
        )
    training.set_title("test accuracy while training")
    training.set_xlabel("step")
    training.grid(alpha=0.3)
    training.legend(fontsize=7)
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
