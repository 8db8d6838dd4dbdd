"""Alternatives to backpropagation: the same small CNN trained on the digits with backprop, evolution strategies,
forward gradients and SPSA (jaxcnn.alternatives), compared by test accuracy against wall-clock time and against
the number of forward evaluations of the model.

Every method gets the same model, data order, optimizer (Adam) and number of steps; only the gradient differs.
Backprop's forward evaluation count is one per step (its backward pass costs about two more forward passes, a
fact the wall-clock axis shows); ES costs 2P evaluations per step, SPSA 2S, forward gradients K jvps (one
forward pass carrying a tangent each).

Run:  python examples/alternatives.py [--quick] [--output DIR]
Writes alternatives.png, results.json and results.md into the output directory (printed at the end).
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
from jaxcnn import alternatives, nn

# method -> (estimator options, Adam learning rate): one rate for all, not tuned per method
METHODS = {
    "backprop": ({}, 3e-3),
    "es": ({"population": 32, "sigma": 0.02}, 3e-3),
    "forward": ({"directions": 16}, 3e-3),
    "spsa": ({"samples": 32, "c": 0.02}, 3e-3),
}


def small_cnn() -> nn.Sequential:
    """conv 8 3x3, relu, avg-pool 2, dense 10 on 8x8x1 digits: 1,370 parameters."""
    return nn.Sequential([nn.Conv2D(8, 3, padding="SAME"), nn.ReLU(), nn.AvgPool2D(2), nn.Flatten(), nn.Dense(10)])


def train_one(method, data, steps, batch_size, eval_every, seed):
    options, rate = METHODS[method]
    model = small_cnn()
    optimizer = optax.adam(rate)
    state = jc.train.create_train_state(model, optimizer, jax.random.key(seed), data.input_shape)
    step = alternatives.make_estimator_train_step(model, method, **options)
    evaluate = jc.train.make_eval_step(model)
    x_train, y_train = data.train
    x_test, y_test = data.test
    rng = np.random.default_rng(seed)
    # compile outside the clock, on a twin of the state (the step donates its input)
    twin = jc.train.create_train_state(model, optimizer, jax.random.key(seed), data.input_shape)
    jax.block_until_ready(step(twin, x_train[:batch_size], y_train[:batch_size]))
    history, seconds, evaluations = [], 0.0, 0
    for index in range(1, steps + 1):
        rows = rng.choice(len(x_train), batch_size, replace=False)
        started = time.perf_counter()
        state, metrics = step(state, x_train[rows], y_train[rows])
        jax.block_until_ready(state.params)
        seconds += time.perf_counter() - started
        evaluations += int(metrics["evaluations"])
        if index % eval_every == 0 or index == steps:
            result = jc.train.evaluate(model, state.params, state.model_state, x_test, y_test, eval_step=evaluate)
            history.append({"step": index, "seconds": seconds, "evaluations": evaluations, **result})
    return history


def first_reaching(history, threshold, field):
    for record in history:
        if record["accuracy"] >= threshold:
            return record[field]
    return None


def build_parser() -> argparse.ArgumentParser:
    """The command line: every help text a sentence."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), add_help=False)
    parser.add_argument("-h", "--help", action="help", help="Show this help message and exit.")
    parser.add_argument("--quick", action="store_true", help="Train for fewer steps (under a minute on 2 CPU cores).")
    parser.add_argument(
        "--output",
        default="runs/examples/alternatives",
        help="Directory for the figure and results (default: runs/examples/alternatives).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the parameters, the batches and the estimators (default: 0)."
    )
    return parser


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    steps, eval_every = (150, 15) if args.quick else (1500, 50)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    with jax.enable_x64(False):
        data = jc.data.load("digits")
        runs = {}
        for index, method in enumerate(METHODS, 1):
            print(f"training with {method} ({index}/{len(METHODS)}): {steps} steps ...", end=" ", flush=True)
            runs[method] = train_one(method, data, steps, 64, eval_every, args.seed)
            last = runs[method][-1]
            print(f"{last['seconds']:.1f} s of training, test accuracy {last['accuracy']:.3f}", flush=True)
    threshold = 0.8
    rows = []
    for method, history in runs.items():
        last = history[-1]
        rows.append(
            {
                "method": method,
                "options": METHODS[method][0],
                "steps": last["step"],
                "test_accuracy": last["accuracy"],
                "train_seconds": last["seconds"],
                "forward_evaluations": last["evaluations"],
                "accuracy_per_second": last["accuracy"] / last["seconds"],
                "accuracy_per_1k_evaluations": 1000 * last["accuracy"] / last["evaluations"],
                f"seconds_to_{threshold:.0%}": first_reaching(history, threshold, "seconds"),
                f"evaluations_to_{threshold:.0%}": first_reaching(history, threshold, "evaluations"),
            }
        )
    (output / "results.json").write_text(json.dumps({"rows": rows, "history": runs}, indent=2) + "\n")
    table = [
        f"| method | test acc | train s | forward evals | acc / s | acc / 1k evals | s to {threshold:.0%} "
        f"| evals to {threshold:.0%} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        reach_s = row[f"seconds_to_{threshold:.0%}"]
        reach_e = row[f"evaluations_to_{threshold:.0%}"]
        table.append(
            f"| {row['method']} | {row['test_accuracy']:.3f} | {row['train_seconds']:.2f} | "
            f"{row['forward_evaluations']:,} | {row['accuracy_per_second']:.3g} | "
            f"{row['accuracy_per_1k_evaluations']:.3g} | {'-' if reach_s is None else f'{reach_s:.2f}'} | "
            f"{'-' if reach_e is None else f'{reach_e:,}'} |"
        )
    (output / "results.md").write_text("\n".join(table) + "\n")
    _figure(runs, output / "alternatives.png")
    print("\n".join(table))
    print(f"written: {output / 'alternatives.png'}, {output / 'results.json'}, {output / 'results.md'}")
    return output


def _figure(runs, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, field, label in zip(
        figure.subplots(1, 2),
        ("seconds", "evaluations"),
        ("training wall-clock (s)", "forward evaluations"),
        strict=True,
    ):
        for method, history in runs.items():
            axes.plot([r[field] for r in history], [r["accuracy"] for r in history], "-o", markersize=3, label=method)
        axes.set_xscale("log")
        axes.set_xlabel(label)
        axes.set_ylabel("test accuracy")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("the same CNN on the digits: backprop against gradient-free estimators")
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
