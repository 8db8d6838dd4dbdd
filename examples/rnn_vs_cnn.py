"""Backpropagation through time against backpropagation through space: an Elman RNN that reads each digit row
by row (8 steps of 8 pixels) and a small CNN, both trained on the digits with hand-derived gradients only.

The contrast the figure shows: a convolution uses one kernel at every position, so its weight gradient is a
sum of one term per output position; the RNN uses one recurrent matrix at every time step, so its weight
gradient is a sum of one term per step (backpropagation through time). The left panels show the size of each
term at initialisation: per position for the CNN's kernel, per time step for the RNN's ``w_h``. The right
panel shows test accuracy while training.

The RNN's training step is written out by hand from the functional ops and their VJPs
(``elman_rnn_vjp``, ``dense_vjp``, ``softmax_cross_entropy_vjp``); no JAX differentiation is used.

Run:  python examples/rnn_vs_cnn.py [--quick] [--output DIR]
Writes rnn_vs_cnn.png, results.json and results.md into the output directory (printed at the end).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcnn as jc
import jaxcnn.functional as F
from jaxcnn import nn

HIDDEN = 32


def small_cnn() -> nn.Sequential:
    return nn.Sequential([nn.Conv2D(8, 3, padding="SAME"), nn.ReLU(), nn.AvgPool2D(2), nn.Flatten(), nn.Dense(10)])


def rnn_init(key: jax.Array, rows: int = 8, hidden: int = HIDDEN) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w_x": jax.random.normal(k1, (rows, hidden)) / np.sqrt(rows),
        "w_h": jax.random.normal(k2, (hidden, hidden)) * (0.9 / np.sqrt(hidden)),
        "b": jnp.zeros((hidden,)),
        "w_o": jax.random.normal(k3, (hidden, 10)) / np.sqrt(hidden),
        "b_o": jnp.zeros((10,)),
    }


def rnn_loss_and_grads(params: dict, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """Forward, loss and the hand-derived backward of the RNN classifier: ``(loss, logits, grads)``.

    images ``(N, 8, 8, 1)`` are read as sequences of 8 rows of 8 pixels; the last hidden state is classified.
    """
    x = images[..., 0]  # (N, T=8, D=8)
    h0 = jnp.zeros((x.shape[0], HIDDEN), x.dtype)
    hs = F.elman_rnn(x, h0, params["w_x"], params["w_h"], params["b"])
    logits = F.dense(hs[:, -1], params["w_o"], params["b_o"])
    loss = F.softmax_cross_entropy(logits, labels)
    dlogits, _ = F.softmax_cross_entropy_vjp(logits, labels, jnp.ones((), loss.dtype))
    dlast, dw_o, db_o = F.dense_vjp(hs[:, -1], params["w_o"], params["b_o"], dlogits)
    dhs = jnp.zeros_like(hs).at[:, -1].set(dlast)  # only the last step feeds the loss
    _, _, dw_x, dw_h, db = F.elman_rnn_vjp(x, h0, params["w_x"], params["w_h"], params["b"], dhs)
    return loss, logits, {"w_x": dw_x, "w_h": dw_h, "b": db, "w_o": dw_o, "b_o": db_o}


def rnn_step_terms(params: dict, images: jax.Array, labels: jax.Array) -> np.ndarray:
    """The norm of each time step's term of ``dw_h = sum_t h_{t-1}^T da_t``: the BPTT recursion unrolled in
    Python for display (its sum is checked against ``elman_rnn_vjp``'s ``dw_h``)."""
    x = images[..., 0]
    h0 = jnp.zeros((x.shape[0], HIDDEN), x.dtype)
    hs = F.elman_rnn(x, h0, params["w_x"], params["w_h"], params["b"])
    logits = F.dense(hs[:, -1], params["w_o"], params["b_o"])
    dlogits, _ = F.softmax_cross_entropy_vjp(logits, labels, jnp.ones((), logits.dtype))
    g = F.dense_vjp(hs[:, -1], params["w_o"], params["b_o"], dlogits)[0]
    h_prev = jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)
    terms = []
    for t in reversed(range(x.shape[1])):
        da = g * (1 - hs[:, t] ** 2)
        terms.append(h_prev[:, t].T @ da)
        g = da @ params["w_h"].T
    terms = terms[::-1]
    total = rnn_loss_and_grads(params, images, labels)[2]["w_h"]
    np.testing.assert_allclose(sum(terms), total, rtol=1e-4, atol=1e-6)
    return np.array([float(jnp.linalg.norm(term)) for term in terms])


def cnn_position_terms(model, params, images, labels) -> np.ndarray:
    """The norm of each output position's term of the first conv's ``dw = sum_(n,i,j) patch(x)_(n,i,j) (x)
    dy_(n,i,j)``, as an (H, W) map (its sum is checked against ``conv2d_vjp``'s ``dw``)."""
    conv = params["Conv_0"]
    y = F.conv2d(images, conv["kernel"], conv["bias"], padding="SAME")
    rest = nn.Sequential(model.layers[1:])  # relu, pool, flatten, dense: the cotangent reaching the conv's output
    predictions, residuals, _ = rest.forward_with_state({"Dense_0": params["Dense_0"]}, {}, y)
    dpredictions, _ = F.softmax_cross_entropy_vjp(predictions, labels, jnp.ones((), predictions.dtype))
    dy, _ = rest.backward({"Dense_0": params["Dense_0"]}, residuals, dpredictions)
    patches = jax.lax.conv_general_dilated_patches(
        images, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC")
    )  # (N, H, W, C*9), channel-major then taps
    terms = jnp.einsum("nhwp,nhwf->hwpf", patches, dy)  # one (9C, F) term per output position
    kh, kw, c, f = conv["kernel"].shape
    dw = F.conv2d_vjp(images, conv["kernel"], conv["bias"], dy, padding="SAME")[1]
    as_patches = jnp.transpose(dw, (2, 0, 1, 3)).reshape(c * kh * kw, f)
    np.testing.assert_allclose(jnp.sum(terms, axis=(0, 1)), as_patches, rtol=1e-4, atol=1e-6)
    return np.asarray(jnp.linalg.norm(terms.reshape(*terms.shape[:2], -1), axis=-1))


def train(data, steps: int, batch_size: int, eval_every: int, seed: int) -> dict:
    """Both models with Adam on the same batches; the CNN by jaxcnn's manual mode, the RNN by the hand step above."""
    x_train, y_train = data.train
    x_test, y_test = data.test
    optimizer = optax.adam(3e-3)
    cnn = small_cnn()
    cnn_state = jc.train.create_train_state(cnn, optimizer, jax.random.key(seed), data.input_shape)
    cnn_step = jc.train.make_train_step(cnn, gradients="manual")
    rnn_params = rnn_init(jax.random.key(seed))
    rnn_opt = optimizer.init(rnn_params)

    @jax.jit
    def rnn_step(params, opt_state, x, y):
        loss, _, grads = rnn_loss_and_grads(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def rnn_accuracy(params, x, y):
        return jnp.mean(jnp.argmax(rnn_loss_and_grads(params, x, y)[1], axis=-1) == y)

    rng = np.random.default_rng(seed)
    history = []
    report_every = max(eval_every, steps // 4 // eval_every * eval_every)  # about four progress lines
    started = time.perf_counter()
    for index in range(1, steps + 1):
        rows = rng.choice(len(x_train), batch_size, replace=False)
        cnn_state, _ = cnn_step(cnn_state, x_train[rows], y_train[rows])
        rnn_params, rnn_opt, _ = rnn_step(rnn_params, rnn_opt, x_train[rows], y_train[rows])
        if index % eval_every == 0 or index == steps:
            cnn_result = jc.train.evaluate(cnn, cnn_state.params, cnn_state.model_state, x_test, y_test)
            history.append(
                {"step": index, "cnn": cnn_result["accuracy"], "rnn": float(rnn_accuracy(rnn_params, x_test, y_test))}
            )
            if index % report_every == 0 or index == steps:
                print(
                    f"  step {index}/{steps}: test accuracy CNN {history[-1]['cnn']:.3f}, "
                    f"RNN {history[-1]['rnn']:.3f}, {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
    return {"history": history}


def build_parser() -> argparse.ArgumentParser:
    """The command line: every help text a sentence."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), add_help=False)
    parser.add_argument("-h", "--help", action="help", help="Show this help message and exit.")
    parser.add_argument("--quick", action="store_true", help="Train for fewer steps (under a minute on 2 CPU cores).")
    parser.add_argument(
        "--output",
        default="runs/examples/rnn_vs_cnn",
        help="Directory for the figure and results (default: runs/examples/rnn_vs_cnn).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the parameters and the batches (default: 0).")
    return parser


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    steps, eval_every = (200, 20) if args.quick else (1500, 50)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    with jax.enable_x64(False):
        data = jc.data.load("digits")
        x, y = data.train[0][:256], data.train[1][:256]
        print("gradient terms at initialisation, per position (CNN) and per time step (RNN) (1/2) ...", flush=True)
        cnn = small_cnn()
        cnn_params, _ = cnn.init(jax.random.key(args.seed), data.input_shape)
        positions = cnn_position_terms(cnn, cnn_params, jnp.asarray(x), jnp.asarray(y))
        steps_terms = rnn_step_terms(rnn_init(jax.random.key(args.seed)), jnp.asarray(x), jnp.asarray(y))
        print(f"training the CNN and the RNN on the same batches (2/2): {steps} steps ...", flush=True)
        result = train(data, steps, 64, eval_every, args.seed)
    last = result["history"][-1]
    summary = {
        "steps": steps,
        "cnn_test_accuracy": last["cnn"],
        "rnn_test_accuracy": last["rnn"],
        "cnn_dw_term_norm_by_position": positions.tolist(),
        "rnn_dw_h_term_norm_by_step": steps_terms.tolist(),
        "history": result["history"],
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = [
        "| model | gradient of the shared weight | terms | test accuracy |",
        "|---|---|---:|---:|",
        f"| CNN (conv 8 3x3) | sum over 8x8 positions (and examples) | {positions.size} | {last['cnn']:.3f} |",
        f"| Elman RNN ({HIDDEN} units) | sum over 8 time steps (and examples) | {steps_terms.size} "
        f"| {last['rnn']:.3f} |",
        "",
        "RNN `w_h` term norm by step (t = 1..8, at initialisation): "
        + ", ".join(f"{value:.3g}" for value in steps_terms),
    ]
    (output / "results.md").write_text("\n".join(table) + "\n")
    _figure(positions, steps_terms, result["history"], output / "rnn_vs_cnn.png")
    print("\n".join(table))
    print(f"written: {output / 'rnn_vs_cnn.png'}, {output / 'results.json'}, {output / 'results.md'}")
    return output


def _figure(positions, step_terms, history, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    space, time_axes, curves = figure.subplots(1, 3)
    image = space.imshow(positions, cmap="magma")
    figure.colorbar(image, ax=space, shrink=0.8)
    space.set_title("CNN: |dW| term\nper output position", fontsize=11)
    space.set_xlabel("column")
    space.set_ylabel("row")
    time_axes.bar(range(1, len(step_terms) + 1), step_terms, color="tab:orange")
    time_axes.set_title("RNN (BPTT): |dW_h| term per time step\n(t = 1 gives 0, as h_0 = 0)", fontsize=11)
    time_axes.set_xlabel("time step t (image row)")
    time_axes.set_yscale("log")
    steps = [r["step"] for r in history]
    curves.plot(steps, [r["cnn"] for r in history], "-o", markersize=3, label="CNN")
    curves.plot(steps, [r["rnn"] for r in history], "-o", markersize=3, label="Elman RNN")
    curves.set_xlabel("step")
    curves.set_ylabel("test accuracy")
    curves.set_title("training\n(Adam, hand-derived gradients)", fontsize=11)
    curves.grid(alpha=0.3)
    curves.legend()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
