"""The accelerator comparison in one command (issue 5/6): jaxcnn against Flax and PyTorch on one GPU.

    PYTHONPATH=src python benchmarks/accelerator.py --output OUT_DIR      # about 5 minutes on one H100/H200

Sections, most important first, each written to OUT_DIR as soon as it is done (``NAME.json``, and its table
appended to ``tables.md``),
so a run cut short still leaves what it measured:

0. ``gradients``: the hand-derived conv VJP (both weight-gradient formulations) against ``jax.vjp`` on this
   device, float32, and which formulation ``dw_method="auto"`` picks here.
1. ``resnet18_bf16``: resnet18_cifar, batch 256, bfloat16 mixed precision: jaxcnn manual and autodiff, Flax,
   PyTorch eager and torch.compile (autocast bf16, channels_last).
2. ``mnist_f32``: mnist_cnn, batch 128, float32, one step per call, every contender.
3. ``mnist_f32_scan``: the same with 100 steps per call (``lax.scan``) for the JAX contenders.
4. ``resnet18_f32``: resnet18_cifar, batch 256, float32: jaxcnn manual and autodiff, Flax, torch.compile.
5. ``dw_methods``: resnet18_cifar bf16 manual step with the weight gradient as per-tap GEMMs vs one conv.
6. ``profile_mnist`` / ``profile_resnet18``: ``benchmarks/profile_phases.py`` (forward, forward+backward and
   whole step per contender, and kernels per program) for mnist_cnn f32 b128 and resnet18_cifar bf16 b256.

``--sections a,b`` runs only those (in the order above).

Sections that would start after ``--budget`` seconds are skipped (and say so). ``--quick`` shrinks everything
to a CPU smoke test (tiny batches, two rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import profile_phases  # noqa: E402
from jaxcnn import bench  # noqa: E402
from jaxcnn import functional as F  # noqa: E402
from jaxcnn.functional import conv as conv_module  # noqa: E402


def gradients_section() -> dict:
    """Hand conv VJP vs jax.vjp on this device (float32), both dw formulations, a few geometries."""
    rng = np.random.default_rng(0)
    rows = []
    cases = [((8, 16, 16, 32), (3, 3, 32, 64), 1, "SAME", 1), ((8, 15, 15, 16), (3, 3, 8, 32), 2, "SAME", 2)]
    for x_shape, w_shape, stride, padding, groups in cases:
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        options = dict(stride=stride, padding=padding, groups=groups)
        y, vjp = jax.vjp(lambda x, w, options=options: F.conv2d(x, w, **options), x, w)
        dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        expected = vjp(dy)
        for method in ("taps", "conv"):
            hand = lambda x, w, dy, m=method, options=options: F.conv2d_vjp(x, w, None, dy, **options, dw_method=m)
            dx, dw, _ = jax.jit(hand)(x, w, dy)
            errors = [
                float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip((dx, dw), expected, strict=True)
            ]
            rows.append({"x": x_shape, "w": w_shape, "options": options, "dw_method": method, "rel_err": errors})
    return {"backend": jax.default_backend(), "auto_dw_method": conv_module.dw_method_for(), "checks": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.environ.get("OUT", "benchmarks/accelerator-latest"))
    parser.add_argument("--budget", type=float, default=270.0, help="start no section after this many seconds")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    parser.add_argument("--sections", default=None, help="comma-separated section names (default: all)")
    args = parser.parse_args()
    chosen = None if args.sections is None else set(args.sections.split(","))
    wanted = lambda name: chosen is None or name in chosen
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    quick = args.quick
    small = dict(rounds=2, steps=4, warmup=1) if quick else dict(rounds=6, steps=20, warmup=3)
    big_batch, mnist_batch = (8, 16) if quick else (256, 128)
    scan = 2 if quick else 100  # quick: steps=4 is a multiple of 2
    everyone = bench.CONTENDERS
    no_engine = tuple(c for c in everyone if c != "jaxcnn-engine")
    sections = [
        ("resnet18_bf16", dict(model_names=["resnet18_cifar"], batch_size=big_batch, dtype="bfloat16",
                               contenders=no_engine, **small)),
        ("mnist_f32", dict(model_names=["mnist_cnn"], batch_size=mnist_batch, contenders=everyone,
                           **(small if quick else dict(rounds=8, steps=100, warmup=10)))),
        ("mnist_f32_scan", dict(model_names=["mnist_cnn"], batch_size=mnist_batch, steps_per_call=scan,
                                contenders=("jaxcnn-manual", "jaxcnn-autodiff", "flax"),
                                **(small if quick else dict(rounds=6, steps=400, warmup=100)))),
        ("resnet18_f32", dict(model_names=["resnet18_cifar"], batch_size=big_batch,
                              contenders=("jaxcnn-manual", "jaxcnn-autodiff", "flax", "torch-compile"), **small)),
    ]  # fmt: skip

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", flush=True)

    def write(name: str, result: dict, table: str | None = None) -> None:
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        if table is not None:  # every table in one file (the device run returns a few files only)
            with open(out / "tables.md", "a") as tables:
                tables.write(f"## {name}\n\n{table}\n")
            print(table, flush=True)

    log(f"devices: {jax.devices()}")
    grads = gradients_section()
    write("gradients", grads)
    worst = max(max(row["rel_err"]) for row in grads["checks"])
    log(f"gradients: auto dw_method {grads['auto_dw_method']}, worst relative error {worst:.2e}")
    for name, settings in sections:
        if not wanted(name):
            continue
        if time.perf_counter() - started > args.budget:
            log(f"{name}: skipped (past the {args.budget:.0f}s budget)")
            continue
        result = bench.run(log=log, **settings)
        write(name, result, bench.markdown(result))
    if wanted("dw_methods") and time.perf_counter() - started <= args.budget:
        rows = {}
        original = os.environ.get("JAXCNN_DW_METHOD")
        for method in ("taps", "conv"):
            os.environ["JAXCNN_DW_METHOD"] = method  # read when the step is traced
            result = bench.run(
                ["resnet18_cifar"], batch_size=big_batch, dtype="bfloat16", contenders=("jaxcnn-manual",),
                log=log, **small,
            )  # fmt: skip
            rows[method] = result["results"][0]
        if original is None:
            os.environ.pop("JAXCNN_DW_METHOD", None)
        else:
            os.environ["JAXCNN_DW_METHOD"] = original
        write("dw_methods", rows)
        log("dw_methods: " + ", ".join(f"{m} {r['images_per_second']:,.0f} img/s" for m, r in rows.items()))
    profiles = [
        ("profile_mnist", "mnist_cnn", mnist_batch, "float32"),
        ("profile_resnet18", "resnet18_cifar", big_batch, "bfloat16"),
    ]
    for name, model_name, batch, dtype in profiles:
        if not wanted(name) or time.perf_counter() - started > args.budget:
            continue
        rows = profile_phases.profile(model_name, batch, dtype, rounds=small["rounds"])
        title = f"{model_name}, batch {batch}, {dtype}, {jax.devices()[0].device_kind} (ms per call, medians)"
        write(name, {"rows": rows}, profile_phases.markdown(rows, title))
    log(f"done in {time.perf_counter() - started:.0f}s; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
