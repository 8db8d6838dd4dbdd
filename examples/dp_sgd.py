"""Differentially private training: test accuracy against the privacy budget epsilon on the digits, for DP-SGD at
a few noise multipliers (jaxcnn.train.dp, ghost norms from the hand rules), with the non-private run as the ceiling.

Every step Poisson-samples the training set (each example in the batch with probability q = 64/1437, padded to a
fixed size with a mask: jaxcnn.data.poisson), clips each example's gradient to norm C = 1, adds Gaussian noise of
standard deviation sigma C to the sum and divides by the expected batch size 64. After each epoch (ceil(1/q) = 23
steps) the accountant (jaxcnn.train.privacy, dp_accounting's RDP accountant, sampling "poisson") says what epsilon
the run has spent at delta 1e-4; with Poisson sampling that figure is a proven bound for this loop. The
non-private run trains the same model with the same optimizer on shuffled batches of 64, without clipping or noise.

The model is a small CNN without BatchNorm (DP-SGD refuses running statistics: they mix the examples of a batch)
and with tanh, which tends to do better than ReLU under clipping and noise (Papernot et al. 2021). C = 1 lies
below the examples' gradient norms at the start (every example is clipped in the first epoch) and near their
mean once training settles (a fifth to a third of them clipped); the runs report the fraction each epoch. The
learning rate (SGD 0.05, momentum 0.9, one for every run) was picked from a few runs by their test accuracy, a
choice the accountant does not count (tuning on private data spends privacy too).

Run:  python examples/dp_sgd.py [--quick] [--output DIR]
Writes dp_sgd.png, results.json and results.md into the output directory (printed at the end).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcnn as jc
from jaxcnn import nn
from jaxcnn.train import dp

# jaxcnn.data.poisson and jaxcnn.train.privacy are imported where they are used: with scipy.stats and dp_accounting
# they take about 2 s to import, which --help need not wait for

EXPECTED_BATCH = 64
CLIP = 1.0
NOISES = (0.6, 1.0, 2.0)
QUICK_NOISES = (0.6, 2.0)  # each noise multiplier compiles its own step (it is a constant of the step)
LEARNING_RATE = 0.05
ACCOUNTANT = "rdp"


def dp_digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """conv16 3x3 SAME, tanh, avgpool 2, conv32 3x3 SAME, tanh, avgpool 2, flatten, dense10: 6,090 parameters on
    8x8x1 inputs, no running statistics."""
    return nn.Sequential(
        [
            nn.Conv2D(16, 3, padding="SAME"),
            nn.Tanh(),
            nn.AvgPool2D(2),
            nn.Conv2D(32, 3, padding="SAME"),
            nn.Tanh(),
            nn.AvgPool2D(2),
            nn.Flatten(),
            nn.Dense(num_classes),
        ]
    )


def optimizer() -> optax.GradientTransformation:
    return optax.sgd(LEARNING_RATE, momentum=0.9)


class Setup:
    """What every run shares, compiled once: the data on the device, the model, its evaluation step and the
    Poisson sampler (each DP run compiles only its own step, whose noise multiplier is a constant of it)."""

    def __init__(self, data: jc.data.Dataset, epochs: int):
        from jaxcnn.data import poisson
        from jaxcnn.train import privacy

        self.data, self.epochs = data, epochs
        self.n = len(data.y_train)
        self.rate = EXPECTED_BATCH / self.n
        self.delta = privacy.default_delta(self.n)
        self.steps_per_epoch = privacy.steps_per_epoch(self.rate)
        self.padded = poisson.padded_batch_size(self.n, self.rate, epochs * self.steps_per_epoch)
        self.model = dp_digits_cnn(data.num_classes)
        self.eval_step = jc.train.make_eval_step(self.model)
        x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

        @jax.jit
        def draw(key):  # one Poisson batch, padded to `padded` examples, gathered on the device
            batch = poisson.poisson_batch(key, self.n, sampling_rate=self.rate, max_batch_size=self.padded)
            return x_train[batch.indices], y_train[batch.indices], batch.mask, batch

        self.draw = draw

    def state(self, key: jax.Array) -> jc.train.TrainState:
        return jc.train.create_train_state(self.model, optimizer(), key, self.data.input_shape)

    def test_accuracy(self, state: jc.train.TrainState) -> float:
        data = self.data  # the whole test set in one call: one compile
        test = jc.train.evaluate(
            self.model, state.params, state.model_state, data.x_test, data.y_test, batch_size=len(data.y_test),
            eval_step=self.eval_step,
        )  # fmt: skip
        return test["accuracy"]


def train_private(setup: Setup, noise: float, seed: int) -> list[dict]:
    """DP-SGD on Poisson-sampled batches: per epoch the test accuracy, the epsilon spent, the fraction of examples
    whose gradient norm exceeded the clip and their mean norm before clipping (means over examples)."""
    from jaxcnn.data.poisson import check_fits
    from jaxcnn.train.privacy import PrivacyLedger

    init_key, sampling_key = jax.random.split(jax.random.key(seed))
    state = setup.state(init_key)
    step = dp.make_dp_train_step(
        setup.model, state.tx, l2_norm_clip=CLIP, noise_multiplier=noise, method="ghost", batch_size=EXPECTED_BATCH
    )
    ledger = PrivacyLedger(noise, setup.rate, setup.delta, accountant=ACCOUNTANT, sampling="poisson")
    history = []
    for epoch in range(1, setup.epochs + 1):
        clipped, norms, counts = [], [], []
        for index in range(setup.steps_per_epoch):
            x, y, mask, batch = setup.draw(jax.random.fold_in(sampling_key, ledger.steps + index))
            check_fits(batch, setup.padded)  # an overflow is an error, never a truncation
            state, metrics = step(state, x, y, mask)
            clipped.append(metrics["clipped"])
            norms.append(metrics["grad_norm"])
            counts.append(metrics["count"])
        ledger = ledger.advance(setup.steps_per_epoch)
        counts = np.asarray(counts, float)
        history.append(
            {
                "epoch": epoch,
                "steps": ledger.steps,
                "epsilon": ledger.epsilon(),
                "test_accuracy": setup.test_accuracy(state),
                "clipped": float(np.sum(np.asarray(clipped) * counts) / np.sum(counts)),
                "grad_norm": float(np.sum(np.asarray(norms) * counts) / np.sum(counts)),
                "mean_batch": float(np.mean(counts)),
            }
        )
    return history


def train_non_private(setup: Setup, seed: int) -> list[dict]:
    """The same model and optimizer on shuffled batches of the expected size (the last partial batch of each epoch
    dropped: one shape, one compile), no clipping and no noise."""
    init_key, order_key = jax.random.split(jax.random.key(seed))
    state = setup.state(init_key)
    step = jc.train.make_train_step(setup.model)
    x_train, y_train = setup.data.x_train, setup.data.y_train
    history = []
    for epoch in range(1, setup.epochs + 1):
        order = jc.data.epoch_order(jax.random.fold_in(order_key, epoch), setup.n)
        for start in range(0, setup.n - EXPECTED_BATCH + 1, EXPECTED_BATCH):
            rows = order[start : start + EXPECTED_BATCH]
            state, _ = step(state, x_train[rows], y_train[rows])
        history.append({"epoch": epoch, "test_accuracy": setup.test_accuracy(state)})
    return history


def parameter_count(data: jc.data.Dataset) -> int:
    shapes = jax.eval_shape(
        lambda key: jc.train.create_train_state(dp_digits_cnn(data.num_classes), optimizer(), key, data.input_shape),
        jax.random.key(0),
    )
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes.params))


def build_parser() -> argparse.ArgumentParser:
    """The command line: every help text a sentence."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), add_help=False)
    parser.add_argument("-h", "--help", action="help", help="Show this help message and exit.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Train for fewer epochs at two noise levels (under a minute on 2 CPU cores).",
    )
    parser.add_argument(
        "--output",
        default="runs/examples/dp_sgd",
        help="Directory for the figure and results (default: runs/examples/dp_sgd).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the parameters, the batches and the noise (default: 0)."
    )
    return parser


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    epochs, noises = (4, QUICK_NOISES) if args.quick else (40, NOISES)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP orders that fail to converge
    data = jc.data.load("digits")
    setup = Setup(data, epochs)
    total = len(noises) + 1
    print(f"training the non-private ceiling (1/{total}): {epochs} epochs ...", end=" ", flush=True)
    started = time.perf_counter()
    ceiling = train_non_private(setup, args.seed)
    print(f"{time.perf_counter() - started:.1f} s, test accuracy {ceiling[-1]['test_accuracy']:.3f}", flush=True)
    runs = {}
    for index, noise in enumerate(noises, 2):
        print(f"training DP-SGD sigma {noise} ({index}/{total}): {epochs} epochs ...", end=" ", flush=True)
        started = time.perf_counter()
        history = train_private(setup, noise, args.seed)
        runs[noise] = {"history": history, "seconds": time.perf_counter() - started}
        last = history[-1]
        print(
            f"{runs[noise]['seconds']:.1f} s, epsilon {last['epsilon']:.2f}, test accuracy {last['test_accuracy']:.3f}",
            flush=True,
        )
    setting = _setting(setup, epochs)
    rows = [
        {
            "noise_multiplier": noise,
            "epsilon": run["history"][-1]["epsilon"],
            "test_accuracy": run["history"][-1]["test_accuracy"],
            "clipped": float(np.mean([r["clipped"] for r in run["history"]])),
            "clipped_last_epoch": run["history"][-1]["clipped"],
            "seconds": run["seconds"],
        }
        for noise, run in runs.items()
    ]
    result = {
        **setting,
        "non_private": {"test_accuracy": ceiling[-1]["test_accuracy"], "history": ceiling},
        "rows": rows,
        "history": {str(noise): run["history"] for noise, run in runs.items()},
    }
    (output / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _table(setting, ceiling, rows)
    (output / "results.md").write_text("\n".join(table) + "\n")
    _figure(setting, ceiling, runs, output / "dp_sgd.png")
    print("\n".join(table))
    print(f"written: {output / 'dp_sgd.png'}, {output / 'results.json'}, {output / 'results.md'}")
    return output


def _setting(setup: Setup, epochs: int) -> dict:
    """The run's fixed settings, as results.json records them."""
    return {
        "dataset": "digits",
        "training_examples": setup.n,
        "model": "dp_digits_cnn",
        "parameters": parameter_count(setup.data),
        "expected_batch": EXPECTED_BATCH,
        "sampling_rate": setup.rate,
        "sampling": "poisson",
        "steps_per_epoch": setup.steps_per_epoch,
        "padded_batch": setup.padded,
        "l2_norm_clip": CLIP,
        "delta": setup.delta,
        "accountant": ACCOUNTANT,
        "method": "ghost",
        "optimizer": f"sgd {LEARNING_RATE}, momentum 0.9",
        "epochs": epochs,
    }


def _table(setting: dict, ceiling: list[dict], rows: list[dict]) -> list[str]:
    table = [
        f"DP-SGD on the digits ({setting['training_examples']} training images), {setting['epochs']} epochs of "
        f"{setting['steps_per_epoch']} steps: Poisson sampling q = {setting['expected_batch']}/"
        f"{setting['training_examples']}, clip C = {setting['l2_norm_clip']:g}, delta {setting['delta']:g} "
        f"({setting['accountant'].upper()} accountant)",
        "",
        "| run | noise multiplier | epsilon | test accuracy | clipped (mean over epochs) | clipped (last epoch) "
        "| seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| non-private | - | inf | {ceiling[-1]['test_accuracy']:.3f} | - | - | - |",
    ]
    for row in rows:
        table.append(
            f"| DP-SGD | {row['noise_multiplier']:g} | {row['epsilon']:.2f} | {row['test_accuracy']:.3f} | "
            f"{row['clipped']:.2f} | {row['clipped_last_epoch']:.2f} | {row['seconds']:.1f} |"
        )
    return table


def _figure(setting: dict, ceiling: list[dict], runs: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy, clipped = figure.subplots(1, 2, width_ratios=(3, 2))
    for index, (noise, run) in enumerate(runs.items()):
        history = run["history"]
        label = f"DP-SGD, sigma {noise:g}"
        accuracy.plot(
            [r["epsilon"] for r in history], [r["test_accuracy"] for r in history], "o-", color=f"C{index}",
            markersize=3, label=label,
        )  # fmt: skip
        epochs = [r["epoch"] for r in history]
        clipped.plot(epochs, [r["clipped"] for r in history], "-", color=f"C{index}", label=label)
    accuracy.axhline(
        ceiling[-1]["test_accuracy"],
        color="black",
        linestyle="--",
        label=f"non-private ({ceiling[-1]['test_accuracy']:.3f})",
    )
    accuracy.set_xscale("log")
    accuracy.set_xlabel(f"epsilon spent (delta {setting['delta']:g}, {setting['accountant'].upper()} accountant)")
    accuracy.set_ylabel("test accuracy (one point per epoch)")
    accuracy.grid(alpha=0.3, which="both")
    accuracy.legend(loc="lower right", fontsize=8)
    clipped.set_xlabel("epoch")
    clipped.set_ylabel(f"fraction of examples clipped (norm > C = {setting['l2_norm_clip']:g})")
    clipped.set_ylim(0, 1)
    clipped.grid(alpha=0.3)
    clipped.legend(fontsize=8)
    figure.suptitle(
        f"DP-SGD on the digits: Poisson sampling, q = {setting['expected_batch']}/{setting['training_examples']} "
        f"({setting['steps_per_epoch']} steps an epoch), ghost clipping, {setting['epochs']} epochs"
    )
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
