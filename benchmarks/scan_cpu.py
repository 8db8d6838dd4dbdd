"""Why ``steps_per_call > 1`` (``lax.scan`` over train steps) is slower on XLA:CPU: per-step time of a single
jitted step against a scan of K steps (rolled, and unrolled), and what the compiled programs call for their
convolutions.

    python benchmarks/scan_cpu.py [--model mnist_cnn] [--batch-size 128] [--k 10] [--rounds 5] [--gradients autodiff]
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import time

import jax
import numpy as np
import optax

import jaxcnn as jc
from jaxcnn.train.step import StepOptions, train_step_function


def _per_step_ms(fn, state, x, y, steps: int, rounds: int) -> float:
    state, _ = fn(state, x, y)  # compile
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        state, metrics = fn(state, x, y)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - started) * 1e3 / steps)
    return statistics.median(times)


def _kernels(compiled_text: str) -> str:
    """The convolution and dot kernels a compiled CPU program uses: custom-call targets and plain HLO ops."""
    found = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', compiled_text))
    for op in ("convolution", "dot", "while", "copy"):
        found[op] = len(re.findall(rf"= \S+ {op}\(", compiled_text))
    return ", ".join(f"{name} x{count}" for name, count in sorted(found.items()) if count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gradients", default="autodiff")
    parser.add_argument("--dump", default=None, help="folder to write the compiled HLO texts to")
    args = parser.parse_args()

    model = jc.models.get(args.model)
    shape = jc.models.input_shape(args.model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, *shape)).astype(np.float32)
    y = rng.integers(0, model.output_shape(shape)[-1], args.batch_size).astype(np.int32)
    xs, ys = np.stack([x] * args.k), np.stack([y] * args.k)
    one = train_step_function(model, StepOptions(gradients=args.gradients))

    def scanned(unroll):
        return lambda s, xs, ys: jax.lax.scan(lambda c, b: one(c, *b), s, (xs, ys), unroll=unroll)

    variants = {
        "single step": (jax.jit(one, donate_argnums=0), x, y, 1),
        f"scan K={args.k}": (jax.jit(scanned(1), donate_argnums=0), xs, ys, args.k),
        f"scan K={args.k} unroll=True": (jax.jit(scanned(True), donate_argnums=0), xs, ys, args.k),
    }
    print(
        f"{args.model} batch {args.batch_size} float32, gradients={args.gradients}, {jax.default_backend()}, "
        f"jax {jax.__version__}, median of {args.rounds} calls\n"
    )
    print("| program | ms per step | img/s | kernels in the compiled program |\n|---|---:|---:|---|")
    for name, (fn, a, b, steps) in variants.items():
        state = jc.train.create_train_state(model, optax.sgd(0.01, 0.9), jax.random.key(0), shape)
        text = fn.lower(state, a, b).compile().as_text()
        if args.dump:
            with open(f"{args.dump}/{name.replace(' ', '_').replace('=', '')}.hlo", "w") as f:
                f.write(text)
        ms = _per_step_ms(fn, state, a, b, steps, args.rounds)
        print(f"| {name} | {ms:.2f} | {args.batch_size / ms * 1e3:,.0f} | {_kernels(text)} |")


if __name__ == "__main__":
    main()
