"""Where the milliseconds of one hand-derived training step go, layer by layer.

Times each layer's forward and hand-derived backward of a model (jitted separately, at the input the layer
sees inside the model), the loss and its VJP, the optax update, and the whole jitted step, interleaved over
rounds (medians). Separately jitted pieces do not fuse, so their sum exceeds the whole step: the gap is what
XLA gains by fusing across layers.

    python benchmarks/profile_step.py [--model mnist_cnn] [--batch-size 128] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax

import jaxcnn as jc
import jaxcnn.functional as F


def _timer(fn, *args):
    fn(*args)  # compile
    jax.block_until_ready(fn(*args))

    def run():
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return (time.perf_counter() - started) * 1e3

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    model = jc.models.get(args.model)
    shape = jc.models.input_shape(args.model)
    params, state = model.init(jax.random.key(0), shape)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((args.batch_size, *shape)).astype(np.float32))
    y = jax.device_put(rng.integers(0, model.output_shape(shape)[-1], args.batch_size).astype(np.int32))

    timers: dict[str, object] = {}
    h = x
    for name, layer in model.named_layers():
        p = params.get(name, {})
        forward = jax.jit(lambda p, h, layer=layer: layer.forward(p, h))
        out, saved = forward(p, h)
        backward = jax.jit(lambda p, saved, dy, layer=layer: layer.backward(p, saved, dy))
        timers[f"{name} forward"] = _timer(forward, p, h)
        timers[f"{name} backward"] = _timer(backward, p, saved, jax.numpy.ones_like(out))
        h = out
    timers["loss + loss VJP"] = _timer(
        jax.jit(lambda h, y: (F.softmax_cross_entropy(h, y), F.softmax_cross_entropy_vjp(h, y)[0])), h, y
    )
    optimizer = optax.sgd(0.01, 0.9)
    opt_state = optimizer.init(params)
    timers["optimizer update"] = _timer(
        jax.jit(lambda g, s, p: optax.apply_updates(p, optimizer.update(g, s, p)[0])), params, opt_state, params
    )
    train_state = jc.train.create_train_state(model, optimizer, jax.random.key(0), shape)
    step = jax.jit(jc.train.make_train_step(model, gradients="engine").__wrapped__)
    timers["whole step (engine, one program)"] = _timer(step, train_state, x, y)

    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, run in timers.items():
            samples[name].append(run())
    medians = {name: statistics.median(values) for name, values in samples.items()}
    pieces = sum(value for name, value in medians.items() if not name.startswith("whole"))
    print(f"{args.model}, batch {args.batch_size}, {jax.default_backend()}, median of {args.rounds} rounds (ms)\n")
    print("| piece | ms | share of the pieces |\n|---|---:|---:|")
    for name, value in medians.items():
        share = "" if name.startswith("whole") else f"{100 * value / pieces:.0f}%"
        print(f"| {name} | {value:.2f} | {share} |")
    print(f"| sum of the pieces | {pieces:.2f} | 100% |")


if __name__ == "__main__":
    main()
