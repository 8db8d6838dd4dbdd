"""The ``jaxcnn`` commands that check and measure the library itself: ``gradcheck`` (the three-way gradient
check of a named model on a random batch) and ``bench`` (the training-step benchmark). :mod:`jaxcnn.cli` adds
their parsers; errors propagate to its one-line handler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _gradcheck(args: argparse.Namespace) -> int:
    """Compare the hand-derived gradients of a model (gradients "engine" and "manual") with JAX autodiff and
    central finite differences, per layer and per parameter. Exits 1 on a mismatch."""
    from jaxcnn import gradcheck, models

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.perturbations < 0:
        raise ValueError(f"--perturbations must be >= 0, got {args.perturbations}")
    model, input_shape = models.get(args.model), models.input_shape(args.model)
    if input_shape is None:
        raise ValueError(
            f"model {args.model!r} was registered without an input shape; register it with input_shape=(H, W, C)"
        )
    # the header at once, then each row as it is made (or only the failing ones): a check takes a minute or more
    print(f"gradcheck: model {args.model}, input {input_shape}, batch {args.batch_size}, seed {args.seed}", flush=True)
    print(gradcheck.header_lines(), flush=True)
    progress = _Progress(args.failures_only, sys.stderr.isatty())
    report = gradcheck.check_model(
        **_gradcheck_case(args, model, input_shape),
        seed=args.seed,
        layers=not args.no_layers,
        finite_differences=not args.no_finite_differences,
        perturbations=args.perturbations,
        progress=progress,
    )
    progress.clear()
    print(f"{len(report.checks)} rows checked, {len(report.failures())} failed")
    print(report.summary())
    return 0 if report.ok else 1


def _gradcheck_case(args: argparse.Namespace, model: Any, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """The arguments of ``check_model`` but the flags': the model, its variables and a random batch from
    ``--seed`` (random labels; an autoencoder: mean squared error against its own input), the key, the dtype."""
    import jax
    import jax.numpy as jnp

    import jaxcnn.functional as F
    from jaxcnn import models

    key = jax.random.key(args.seed)
    params, state = model.init(jax.random.fold_in(key, 0), input_shape)
    # explicit dtypes: the same seed gives the same data whether or not 64-bit types are on
    x = jax.random.normal(jax.random.fold_in(key, 1), (args.batch_size, *input_shape), jnp.float32)
    if models.spec(args.model).task == "reconstruction":
        loss_fn, y = F.mean_squared_error, x
    else:
        num_classes = model.output_shape(input_shape)[-1]
        loss_fn = F.softmax_cross_entropy
        y = jax.random.randint(jax.random.fold_in(key, 2), (args.batch_size,), 0, num_classes, jnp.int32)
    dtype = {"float64": jnp.float64, "float32": jnp.float32}[args.dtype]
    case = dict(model=model, params=params, state=state, x=x, y=y, loss_fn=loss_fn)
    return case | dict(dtype=dtype, key=jax.random.fold_in(key, 3))


class _Progress:
    """Prints each row as it comes; with ``failures_only``, only the failing rows on stdout and a progress line
    per layer and point on stderr (rewritten in place on a terminal)."""

    def __init__(self, failures_only: bool, live: bool):
        self.failures_only, self.live, self.stage = failures_only, live, None

    def __call__(self, check: Any) -> None:
        from jaxcnn import gradcheck

        stage = (check.scope, check.layer if check.scope == "layer" else "gradients", check.point)
        if self.failures_only and stage != self.stage:
            self.stage = stage
            line = "checking {} {} at {} ...".format(*stage)
            print(f"\r\033[K{line}" if self.live else line, end="" if self.live else "\n", file=sys.stderr, flush=True)
        if not (self.failures_only and check.ok):
            self.clear()
            print(gradcheck.format_row(check), flush=True)

    def clear(self) -> None:
        """Wipe the progress line on a terminal."""
        if self.live and self.failures_only:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def _add_gradcheck(commands, names: list[str]) -> None:
    check = commands.add_parser(
        "gradcheck",
        help="check a model's hand-derived gradients against autodiff and finite differences",
        description=_gradcheck.__doc__,
    )
    check.add_argument("--model", default="mnist_cnn", choices=names, help="architecture (default: mnist_cnn)")
    check.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="default: float64")
    check.add_argument("--seed", type=int, default=0, help="seeds parameters, data and directions (default: 0)")
    check.add_argument("--batch-size", type=int, default=4, help="examples in the checked batch (default: 4)")
    check.add_argument("--no-layers", action="store_true", help="skip the layer-by-layer checks")
    check.add_argument("--no-finite-differences", action="store_true", help="skip finite differences")
    check.add_argument(
        "--perturbations",
        type=int,
        default=1,
        help="seeded random points near the initial parameters and inputs to check at as well (default: 1)",
    )
    check.add_argument(
        "--failures-only", action="store_true", help="print only the failing rows (and the header and a summary)"
    )
    check.set_defaults(run=_gradcheck)


def _bench(args: argparse.Namespace) -> int:
    """Time one training step (SGD momentum, synthetic batch on the device) of each model for jaxcnn's three gradient
    modes, the same model in Flax linen, and in PyTorch eager and torch.compile when torch is installed. Contenders
    take turns for several rounds; the median img/s and ratios to PyTorch eager are printed as a Markdown table and
    written with the raw rounds as JSON (bench.json, bench.md). With --dp: one DP-SGD step instead, jaxcnn's ghost
    and vmap methods, Opacus's ghost clipping and jax_privacy's clipped_grad (when installed) against jaxcnn's
    non-private step, with XLA temp sizes (bench-dp.json, bench-dp.md); models with BatchNorm are refused."""

    from jaxcnn import bench, models

    names = [name.strip() for name in args.models.split(",") if name.strip()]
    if args.loop:  # fit's model: a registered name or a package.module:factory, as for jaxcnn train
        return _bench_loop(args, names)
    for name in names:
        models.get(name)  # unknown names: the one-line error listing the known ones
    known = bench.DP_CONTENDERS if args.dp else bench.CONTENDERS
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()] if args.contenders else known
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if not args.quiet else None
    args.batch_size = 128 if args.batch_size is None else args.batch_size
    settings = ("batch_size", "rounds", "steps", "warmup")
    options = {name: getattr(args, name) for name in settings}
    if args.dp:
        _check_dp_flags(args)
        result = bench.run_dp(names, contenders=contenders, log=log, **options)
        table, stem = bench.dp_markdown(result), "bench-dp"
    else:
        options |= {name: getattr(args, name) for name in ("dtype", "steps_per_call", "remat")}
        options["xla_flag_sets"] = args.xla_flags
        _note_scan_on_cpu(args.steps_per_call)
        result = bench.run(names, contenders=contenders, log=log, **options)
        table, stem = bench.markdown(result), "bench"
    return _write_bench(args.output, stem, result, table)


def _write_bench(directory: str, stem: str, result: dict, table: str) -> int:
    """Write ``STEM.json`` and ``STEM.md`` into ``directory``, print the table and where they went."""
    import json

    output = Path(directory)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (output / f"{stem}.md").write_text(table)
    print(table, end="")
    print(f"written: {output / f'{stem}.json'}, {output / f'{stem}.md'}")
    return 0


def _bench_loop(args: argparse.Namespace, names: list[str]) -> int:
    """``bench --loop``: fit end to end against the bench step, for one model (:mod:`jaxcnn.bench.loop`)."""
    from jaxcnn.bench.loop import loop_markdown, run_loop

    if len(names) != 1:
        raise ValueError(f"bench --loop times one model; got --models {','.join(names)}")
    if args.dp or args.xla_flags or args.contenders or args.steps_per_call != 1 or args.remat:
        raise ValueError("bench --loop takes --models, --dataset, --batch-size, --epochs, --gradients, --no-workdir")
    if args.dtype != "float32":
        raise ValueError(f"bench --loop times float32 steps; got --dtype {args.dtype}")
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if not args.quiet else None
    result = run_loop(
        names[0],
        dataset=args.dataset,
        batch_size=32 if args.batch_size is None else args.batch_size,
        epochs=args.epochs,
        workdir=not args.no_workdir,
        gradients=args.gradients,
        log=log,
    )
    return _write_bench(args.output, "bench-loop", result, loop_markdown(result))


def _note_scan_on_cpu(steps_per_call: int) -> None:
    """Say on stderr that scanned autodiff steps (jaxcnn-autodiff's and Flax's) are slow on XLA:CPU."""
    from jaxcnn.train.step import SCAN_ON_CPU, scan_is_slow

    if steps_per_call > 1 and scan_is_slow("autodiff"):
        print(f"note: {SCAN_ON_CPU}; the Flax contender is affected too", file=sys.stderr, flush=True)


def _check_dp_flags(args: argparse.Namespace) -> None:
    """ValueError, in one line, for a flag ``bench --dp`` does not take (it times float32 single steps)."""
    if args.dtype != "float32":
        raise ValueError(f"bench --dp times float32 steps; got --dtype {args.dtype}")
    if args.xla_flags:
        raise ValueError("bench --dp does not take --xla-flags (flag sets time the non-private step)")
    if args.steps_per_call != 1 or args.remat:
        raise ValueError("bench --dp takes one step per call without remat; drop --steps-per-call and --remat")


def _add_bench(commands) -> None:
    from jaxcnn import bench

    text = "time the training step against Flax and PyTorch (eager and compiled), interleaved, medians"
    parser = commands.add_parser("bench", help=text, description=_bench.__doc__)
    parser.add_argument("--models", default="mnist_cnn", help="comma-separated model names (default: mnist_cnn)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per step (default: 128; with --loop: 32, as train)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: 7)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling (default: 3)")
    parser.add_argument(
        "--contenders",
        default=None,
        help=f"comma-separated subset of: {', '.join(bench.CONTENDERS)}; with --dp: "
        f"{', '.join(bench.DP_CONTENDERS)} (default: all)",
    )
    parser.add_argument(
        "--dp", action="store_true", help="time a DP-SGD step (clip 1, noise 1) against the non-private one instead"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=bench.DTYPES, help="compute dtype (bfloat16: mixed precision)"
    )
    parser.add_argument(
        "--steps-per-call",
        type=int,
        default=1,
        help="train steps per JAX call, by lax.scan (default: 1; for GPUs: on CPU it slows autodiff and Flax "
        "~30x, see benchmarks/RESULTS.md)",
    )
    parser.add_argument("--remat", action="store_true", help="jaxcnn contenders recompute activations per block")
    loop = parser.add_argument_group("--loop: jaxcnn.train.fit end to end against the bench step")
    loop.add_argument(
        "--loop",
        action="store_true",
        help="time fit (as jaxcnn train runs it: a workdir, a checkpoint and an evaluation per epoch) epoch by "
        "epoch against the bench step on one batch on the device, in turns (bench-loop.json, bench-loop.md)",
    )
    loop.add_argument("--dataset", default="digits", help="with --loop: an in-memory data set (default: digits)")
    loop.add_argument("--epochs", type=int, default=8, help="with --loop: epochs of fit, >= 3 (default: 8)")
    loop.add_argument("--gradients", default=None, help="with --loop: the gradient mode (default: train's)")
    loop.add_argument("--no-workdir", action="store_true", help="with --loop: train in memory (no checkpoints)")
    parser.add_argument(
        "--xla-flags",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="also run the JAX contenders in a worker process started with XLA_FLAGS=FLAGS, as CONTENDER@NAME, "
        "in the same rounds (repeatable; pseudo-flags --jaxcnn_dw_method=taps|conv and --jaxcnn_cpu_flags=... "
        "set jaxcnn's own switches there); not with --dp",
    )
    parser.add_argument("--output", default="benchmarks/latest", help="directory for bench.json and bench.md")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(run=_bench)


def _data_bench(args: argparse.Namespace) -> int:
    """Time the input pipeline alone on an image folder: the training stream of jaxcnn train (Grain; decode,
    RandomResizedCrop and flip in --data-workers processes; uint8 batches). Prints images/s and CPU milliseconds
    per image (this process and its workers), and with --model the share of the loop's time spent waiting for
    data while that model trains. --json prints one JSON object instead."""
    import json

    from jaxcnn.bench.data import data_bench

    if args.dataset != "folder":
        raise ValueError(f"data-bench reads image folders: --dataset folder, not {args.dataset!r}")
    if args.data_dir is None:
        raise ValueError("data-bench needs --data-dir (an image folder: ROOT/train/<class>/*, ROOT/val/<class>/*)")
    for name in ("image_size", "batch_size", "batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.data_workers is not None and args.data_workers < 0:
        raise ValueError(f"--data-workers must be >= 0, got {args.data_workers}")
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    result = data_bench(
        args.data_dir,
        image_size=args.image_size,
        workers=args.data_workers,
        batch_size=args.batch_size,
        batches=args.batches,
        model=args.model,
        seed=args.seed,
        skip_bad_files=args.skip_bad_files,
        log=log,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    cpu = "" if result["cpu_counts_workers"] else " (this process only: worker CPU time not readable here)"
    print(
        f"{result['images_per_second']:.1f} images/s, {result['cpu_ms_per_image']:.2f} CPU ms per image{cpu} "
        f"({result['workers']} workers, {result['images']} images of {result['image_size']}px)"
    )
    if "data_wait_share" in result:
        print(f"with {result['model']}: the step waits for data {100 * result['data_wait_share']:.1f}% of the time")
    return 0


def _add_data_bench(commands) -> None:
    parser = commands.add_parser(
        "data-bench", help="time the image-folder input pipeline alone", description=_data_bench.__doc__
    )
    parser.add_argument("--dataset", default="folder", help="the data set kind (folder)")
    parser.add_argument("--data-dir", default=None, help="the image folder")
    parser.add_argument("--image-size", type=int, default=224, help="side of the images made (default: 224)")
    parser.add_argument("--data-workers", type=int, default=None, help="decode processes (default: CPUs but one)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--batches", type=int, default=20, help="batches timed after 2 warm-up ones (default: 20)")
    parser.add_argument("--model", default=None, help="also train this model on each batch and time the data waits")
    parser.add_argument("--seed", type=int, default=0, help="the stream's seed (default: 0)")
    parser.add_argument("--skip-bad-files", action="store_true", help="leave out files that fail to decode")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=_data_bench)


def add_bench_and_gradcheck(commands, model_names: list[str]) -> None:
    """Add the ``bench``, ``data-bench`` and ``gradcheck`` subcommands (``gradcheck --model`` takes one of
    ``model_names``)."""
    _add_bench(commands)
    _add_data_bench(commands)
    _add_gradcheck(commands, model_names)
