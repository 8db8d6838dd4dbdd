"""Where a train step's time goes, by phase, for each gradient mode and Flax, on any model and backend.

For each contender it jits three programs on the same batch: the forward and loss alone, the forward and
backward (loss and gradients), and the whole train step (with the optax SGD-momentum update). The rounds are
interleaved and each figure is a median (ms per call). The backward costs ``fwd+bwd - fwd``, the update
``step - fwd+bwd``. It also counts the kernels XLA launches per step (fusions, library calls and other
top-level instructions of the optimised program's entry computation), which bounds a small model's speed
on a GPU.

    PYTHONPATH=src python benchmarks/profile_phases.py --model resnet18_cifar --batch-size 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcnn as jc
import jaxcnn.functional as F
from jaxcnn import bench
from jaxcnn.train.step import cast_floating, loss_and_grads_fn

_NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "copy-start", "copy-done"}


def kernel_count(compiled: Any) -> int | None:
    """Top-level instructions of the optimised entry computation that run work (an estimate of launches)."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001
        return None
    entry = text[text.find("ENTRY") :]
    entry = entry[: entry.find("\n}")]
    count = 0
    for line in entry.splitlines()[1:]:
        match = re.search(r"=\s*\S+\s+([\w-]+)\(", line)
        if match and match.group(1) not in _NOT_KERNELS:
            count += 1
    return count


def programs(model_name: str, batch_size: int, dtype: str | None) -> dict[str, tuple[Any, tuple]]:
    """``{"contender phase": (compiled, args)}`` for jaxcnn manual/autodiff/engine and Flax."""
    model = jc.models.get(model_name)
    shape = jc.models.input_shape(model_name)
    params, state = model.init(jax.random.key(0), shape)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((batch_size, *shape)).astype(np.float32))
    y = jax.device_put(rng.integers(0, model.output_shape(shape)[-1], batch_size).astype(np.int32))
    low = None if dtype in (None, "float32") else jnp.dtype(dtype)
    optimizer = optax.sgd(0.01, 0.9)
    opt_state = optimizer.init(params)
    key = jax.random.key(1)
    out: dict[str, tuple[Any, tuple]] = {}

    def add(name, fn, *args):
        out[name] = (jax.jit(fn).lower(*args).compile(), args)

    for mode in ("manual", "autodiff", "engine"):
        grads_of = loss_and_grads_fn(model, F.softmax_cross_entropy, mode, dtype=low)

        def forward(p, s, x, y, k):
            if low is not None:
                p, x = cast_floating(p, low), x.astype(low)
            predictions, _ = model.apply(p, s, x, train=True, key=k)
            return F.softmax_cross_entropy(predictions.astype(jnp.float32), y)

        def backward(p, s, x, y, k, grads_of=grads_of):
            return grads_of(p, s, x, y, k).grads

        def step(p, o, s, x, y, k, grads_of=grads_of):
            result = grads_of(p, s, x, y, k)
            updates, o = optimizer.update(result.grads, o, p)
            return optax.apply_updates(p, updates), o, result.state

        add(f"jaxcnn-{mode} fwd", forward, params, state, x, y, key)
        add(f"jaxcnn-{mode} fwd+bwd", backward, params, state, x, y, key)
        add(f"jaxcnn-{mode} step", step, params, opt_state, state, x, y, key)

    flax_params, stats, with_stats = bench.flax_loss(model, params, state, dtype or "float32")
    flax_loss = lambda p, s, x, y: with_stats(p, s, x, y)[0]
    flax_opt = optimizer.init(flax_params)

    def flax_step(p, o, s, x, y):
        grads = jax.grad(flax_loss)(p, s, x, y)
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    add("flax fwd", flax_loss, flax_params, stats, x, y)
    add("flax fwd+bwd", jax.grad(flax_loss), flax_params, stats, x, y)
    add("flax step", flax_step, flax_params, flax_opt, stats, x, y)
    return out


def profile(model_name: str, batch_size: int, dtype: str | None, rounds: int = 7, calls: int = 10) -> list[dict]:
    """Median ms per call of every program (interleaved rounds of ``calls`` calls) and its kernel count."""
    compiled = programs(model_name, batch_size, dtype)
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for fn, args in compiled.values():
        jax.block_until_ready(fn(*args))
    names = list(compiled)
    for round_index in range(rounds):
        shift = round_index % len(names)  # rotate the order: no program always runs first
        for name in names[shift:] + names[:shift]:
            fn, args = compiled[name]
            started = time.perf_counter()
            for _ in range(calls):
                result = fn(*args)
            jax.block_until_ready(result)
            times[name].append((time.perf_counter() - started) * 1e3 / calls)
    return [
        {"program": name, "ms": statistics.median(times[name]), "kernels": kernel_count(compiled[name][0])}
        for name in compiled
    ]


def markdown(rows: list[dict], title: str) -> str:
    lines = [title, "", "| program | ms per call | kernels |", "|---|---:|---:|"]
    lines += [f"| {r['program']} | {r['ms']:.3f} | {r['kernels'] if r['kernels'] is not None else ''} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rows = profile(args.model, args.batch_size, args.dtype, args.rounds)
    device = jax.devices()[0].device_kind
    print(markdown(rows, f"{args.model}, batch {args.batch_size}, {args.dtype}, {device}, median of {args.rounds}"))


if __name__ == "__main__":
    main()
