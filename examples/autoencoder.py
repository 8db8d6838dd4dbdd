"""Backpropagation without labels: jaxcnn's conv_autoencoder learns to reconstruct the digits (mean squared error
against its own input), trained with the hand-derived gradients (``gradients="manual"``: every conv, transposed
conv, ReLU and the MSE loss through its own backward rule).

On the 8x8 digits the code (2x2x32 = 128 numbers) is larger than the 64-pixel image, so this shows that
backpropagation learns a reconstruction without labels, not that it compresses; on 28x28 images (MNIST,
``--dataset mnist`` data) the same model's code is 7x7x32 for 784 pixels.

Run:  python examples/autoencoder.py [--quick] [--output DIR]
Writes reconstructions.png, loss.png, results.json and results.md into the output directory (printed at the end).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxcnn as jc
import jaxcnn.functional as F


def build_parser() -> argparse.ArgumentParser:
    """The command line: every help text a sentence."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), add_help=False)
    parser.add_argument("-h", "--help", action="help", help="Show this help message and exit.")
    parser.add_argument("--quick", action="store_true", help="Train for fewer steps (under a minute on 2 CPU cores).")
    parser.add_argument(
        "--output",
        default="runs/examples/autoencoder",
        help="Directory for the figures and results (default: runs/examples/autoencoder).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the parameters and the batches (default: 0).")
    return parser


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    steps, eval_every = (400, 20) if args.quick else (4000, 100)
    report_every = steps // 4  # a progress line at each quarter
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    print(f"training conv_autoencoder on the digits with hand-derived gradients: {steps} steps ...", flush=True)
    started = time.perf_counter()
    with jax.enable_x64(False):
        data = jc.data.load("digits")  # standardised 8x8 images; the code is 2x2x32
        model = jc.models.get("conv_autoencoder")
        optimizer = optax.adam(3e-3)
        state = jc.train.create_train_state(model, optimizer, jax.random.key(args.seed), data.input_shape)
        step = jc.train.make_train_step(model, loss_fn=F.mean_squared_error, gradients="manual")
        evaluate = jc.train.make_eval_step(model, loss_fn=F.mean_squared_error)
        x_train, x_test = data.x_train, data.x_test
        rng = np.random.default_rng(args.seed)
        history = []
        for index in range(1, steps + 1):
            rows = rng.choice(len(x_train), 64, replace=False)
            state, metrics = step(state, x_train[rows], x_train[rows])  # the target is the input
            if index % eval_every == 0 or index == steps:
                test = jc.train.evaluate(model, state.params, state.model_state, x_test, x_test, eval_step=evaluate)
                history.append({"step": index, "train_mse": float(metrics["loss"]), "test_mse": test["loss"]})
            if index % report_every == 0:
                print(
                    f"  step {index}/{steps} ({index // report_every}/4): test MSE {history[-1]['test_mse']:.4f}, "
                    f"{time.perf_counter() - started:.1f} s",
                    flush=True,
                )
        shown = x_test[:10]
        reconstructed = np.asarray(model.apply(state.params, state.model_state, shown)[0])
    baseline = float(np.mean(x_test**2))  # predicting the mean image (0 after standardisation)
    result = {"steps": steps, "test_mse": history[-1]["test_mse"], "mean_image_mse": baseline, "history": history}
    (output / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = [
        "| model | parameters | steps | test MSE | MSE of predicting the mean image |",
        "|---|---:|---:|---:|---:|",
        f"| conv_autoencoder (hand-derived gradients) | "
        f"{sum(p.size for p in jax.tree.leaves(state.params)):,} | {steps} | {history[-1]['test_mse']:.4f} | "
        f"{baseline:.4f} |",
    ]
    (output / "results.md").write_text("\n".join(table) + "\n")
    _figures(shown, reconstructed, history, output)
    print("\n".join(table))
    print(
        f"written: {output / 'reconstructions.png'}, {output / 'loss.png'}, {output / 'results.json'}, "
        f"{output / 'results.md'}"
    )
    return output


def _figures(shown, reconstructed, history, output):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 2.4), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, len(shown))
    for column, (original, copy) in enumerate(zip(shown, reconstructed, strict=True)):
        for row, image in enumerate((original, copy)):
            grid[row, column].imshow(image[..., 0], cmap="gray")
            grid[row, column].set_axis_off()
    grid[0, 0].set_title("test images", loc="left", fontsize=9)
    grid[1, 0].set_title("reconstructions", loc="left", fontsize=9)
    figure.savefig(output / "reconstructions.png", dpi=100)

    figure = Figure(figsize=(5, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    steps = [r["step"] for r in history]
    axes.plot(steps, [r["train_mse"] for r in history], label="train batch")
    axes.plot(steps, [r["test_mse"] for r in history], label="test")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("mean squared error")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(output / "loss.png", dpi=100)


if __name__ == "__main__":
    main()
