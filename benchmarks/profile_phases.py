"""Where a train step's time goes, by phase, for each gradient mode and Flax, on any model and backend.

For each contender it jits three programs on the same batch: the forward and loss alone, the forward and
backward (loss and gradients), and the whole train step (with the optax SGD-momentum update). The rounds are
interleaved and each figure is a median (ms per call). The backward costs ``fwd+bwd - fwd``, the update
``step - fwd+bwd``. It also counts the kernels XLA launches per step (fusions, library calls and other
top-level instructions of the optimised program's entry computation), which bounds a small model's speed
on a GPU, and with ``--kernels`` lists them by name (XLA names a fusion after its ops, ``add_rsqrt_fusion``;
numbers stripped, "full" when the result has the rank of a feature map) for a side-by-side reading of the
programs. ``--rounds 0`` compiles and counts without timing; ``--dw-method conv`` makes the hand conv VJPs
form the weight gradient as on a GPU (on CPU ``auto`` picks the per-tap GEMMs).

    PYTHONPATH=src python benchmarks/profile_phases.py --model resnet18_cifar --batch-size 256 --dtype bfloat16
    PYTHONPATH=src python benchmarks/profile_phases.py --model resnet20_cifar --batch-size 8 --rounds 0 \
        --kernels --dw-method conv
"""

from __future__ import annotations

import argparse
import collections
import os
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
from jaxcnn.functional import conv as conv_module
from jaxcnn.train.step import cast_floating, loss_and_grads_fn

_NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "copy-start", "copy-done"}


def kernels(compiled: Any) -> collections.Counter | None:
    """The top-level instructions of the optimised entry computation that run work (an estimate of launches),
    counted by name: ``"add_rsqrt_fusion (small)"``, ``"convolution (full)"`` ("full": a rank-4 result)."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001
        return None
    entry = text[text.find("ENTRY") :]
    entry = entry[: entry.find("\n}")]
    counts: collections.Counter = collections.Counter()
    for line in entry.splitlines()[1:]:
        match = re.search(r"%([\w.-]+)\s*=\s*(\S+)\s+([\w-]+)\(", line)
        if match and match.group(3) not in _NOT_KERNELS:
            name = re.sub(r"\.\d+$", "", match.group(1))
            full = re.search(r"\[\d+,\d+,\d+,\d+\]", match.group(2))
            counts[f"{name} ({'full' if full else 'small'})"] += 1
    return counts


def kernel_count(compiled: Any) -> int | None:
    """Top-level instructions of the optimised entry computation that run work (an estimate of launches)."""
    counts = kernels(compiled)
    return None if counts is None else sum(counts.values())


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
    """Median ms per call of every program (interleaved rounds of ``calls`` calls; None for ``rounds=0``), its
    kernel count and its kernels by name."""
    compiled = programs(model_name, batch_size, dtype)
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for fn, args in compiled.values() if rounds else ():
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
    rows = []
    for name, (fn, _) in compiled.items():
        by_name = kernels(fn)
        count = None if by_name is None else sum(by_name.values())
        ms = statistics.median(times[name]) if times[name] else None
        rows.append({"program": name, "ms": ms, "kernels": count, "by_name": by_name})
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [title, "", "| program | ms per call | kernels |", "|---|---:|---:|"]
    for r in rows:
        ms = "" if r["ms"] is None else f"{r['ms']:.3f}"
        lines.append(f"| {r['program']} | {ms} | {r['kernels'] if r['kernels'] is not None else ''} |")
    return "\n".join(lines) + "\n"


def kernel_table(rows: list[dict], phase: str) -> str:
    """Kernels by name, one column per contender, for the programs of one ``phase`` ("fwd", "fwd+bwd", "step")."""
    chosen = [r for r in rows if r["program"].endswith(f" {phase}") and r["by_name"] is not None]
    names = sorted(set().union(*(r["by_name"] for r in chosen)))
    header = [r["program"].rsplit(" ", 1)[0] for r in chosen]
    lines = [f"| {phase} kernel | " + " | ".join(header) + " |", "|---|" + "---:|" * len(chosen)]
    lines += [f"| {n} | " + " | ".join(str(r["by_name"][n]) for r in chosen) + " |" for n in names]
    lines.append("| total | " + " | ".join(str(r["kernels"]) for r in chosen) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds; 0: compile and count only")
    parser.add_argument("--kernels", action="store_true", help="also list each phase's kernels by name")
    parser.add_argument("--dw-method", choices=conv_module.DW_METHODS, default="auto", help="the hand conv dw")
    args = parser.parse_args()
    if args.dw_method != "auto":
        os.environ["JAXCNN_DW_METHOD"] = args.dw_method  # read when the steps are traced
    rows = profile(args.model, args.batch_size, args.dtype, args.rounds)
    device = jax.devices()[0].device_kind
    title = f"{args.model}, batch {args.batch_size}, {args.dtype}, {device}, dw {args.dw_method}"
    print(markdown(rows, f"{title}, median of {args.rounds}"))
    for phase in ("fwd", "fwd+bwd") if args.kernels else ():
        print(kernel_table(rows, phase))


if __name__ == "__main__":
    main()
