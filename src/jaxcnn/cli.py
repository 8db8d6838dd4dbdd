"""The ``jaxcnn`` command: thin argument parsing over the library.

``jaxcnn train`` trains (and resumes) a run into a workdir; ``jaxcnn eval`` evaluates a workdir's checkpoint
(the best of an early-stopped run, else the latest; ``--step``) on its data or on other data; ``jaxcnn predict``
classifies image and array files with it; ``jaxcnn plot`` draws its curves; ``jaxcnn gradcheck`` prints the
three-way gradient check of a named model and exits 1 on a mismatch. Bad input gives a one-line error and exit
code 2, never a traceback; a run whose loss turns non-finite stops with exit code 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from jaxcnn._cli_use import _number, _plural, add_eval_predict_and_plot

EXIT_ERROR = 2  # bad input: arguments, data, workdir, checkpoint
EXIT_DIVERGED = 3  # the loss turned NaN or Inf


def _gradcheck(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    import jaxcnn.functional as F
    from jaxcnn import gradcheck, models

    model = models.get(args.model)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    dtype = {"float64": jnp.float64, "float32": jnp.float32}[args.dtype]
    input_shape = models.input_shape(args.model)
    if args.perturbations < 0:
        raise ValueError(f"--perturbations must be >= 0, got {args.perturbations}")
    # the header at once, then each row as it is made (or only the failing ones): a check takes a minute or more
    print(f"gradcheck: model {args.model}, input {input_shape}, batch {args.batch_size}, seed {args.seed}", flush=True)
    print(gradcheck.header_lines(), flush=True)
    key = jax.random.key(args.seed)
    params, state = model.init(jax.random.fold_in(key, 0), input_shape)
    # explicit dtypes: the same seed gives the same data whether or not 64-bit types are on
    x = jax.random.normal(jax.random.fold_in(key, 1), (args.batch_size, *input_shape), jnp.float32)
    if models.spec(args.model).task == "reconstruction":  # an autoencoder: mean squared error against its own input
        loss_fn, y = F.mean_squared_error, x
    else:
        num_classes = model.output_shape(input_shape)[-1]
        loss_fn = F.softmax_cross_entropy
        y = jax.random.randint(jax.random.fold_in(key, 2), (args.batch_size,), 0, num_classes, jnp.int32)
    live = sys.stderr.isatty()
    where = {"layer": None}

    def progress(check) -> None:
        stage = (check.scope, check.layer if check.scope == "layer" else "gradients", check.point)
        if args.failures_only and stage != where["layer"]:
            # a progress line per layer and point on stderr (rewritten in place on a terminal), failures on stdout
            where["layer"] = stage
            line = "checking {} {} at {} ...".format(*stage)
            print(f"\r\033[K{line}" if live else line, end="" if live else "\n", file=sys.stderr, flush=True)
        if not (args.failures_only and check.ok):
            if live and args.failures_only:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            print(gradcheck.format_row(check), flush=True)

    report = gradcheck.check_model(
        model,
        params,
        state,
        x,
        y,
        loss_fn=loss_fn,
        dtype=dtype,
        seed=args.seed,
        key=jax.random.fold_in(key, 3),
        layers=not args.no_layers,
        finite_differences=not args.no_finite_differences,
        perturbations=args.perturbations,
        progress=progress,
    )
    if live and args.failures_only:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    print(f"{len(report.checks)} rows checked, {len(report.failures())} failed")
    print(report.summary())
    return 0 if report.ok else 1


# -- train / eval / plot -----------------------------------------------------------------------------------

# flag -> Config field; each flag's default is None ("not given"), so a resumed run keeps its saved values
_TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "model": (str, "architecture"),
    "dataset": (str, "data set"),
    "data_dir": (str, "directory of the MNIST / Fashion-MNIST IDX files or the CIFAR-10 .bin batches"),
    "data_path": (str, "the .npz file of --dataset npz (x_train, y_train, x_test, y_test)"),
    "optimizer": (str, "optax optimizer"),
    "learning_rate": (float, "peak learning rate"),
    "momentum": (float, "momentum of momentum, nesterov and rmsprop"),
    "weight_decay": (float, "weight decay (decoupled for adamw, L2 otherwise)"),
    "schedule": (str, "learning-rate schedule"),
    "warmup_epochs": (int, "warm-up epochs of warmup_cosine"),
    "schedule_epochs": (int, "horizon of the cosine schedules in epochs"),
    "decay_rate": (float, "per-epoch factor of the exponential schedule"),
    "batch_size": (int, "examples per step"),
    "epochs": (int, "epochs in all (more than a finished run has extends it)"),
    "seed": (int, "seeds initialisation, data order and every random draw"),
    "gradients": (str, "autodiff (jax.grad), manual (hand rules via custom_vjp) or engine (explicit reverse pass)"),
    "dtype": (str, "compute dtype of the train step (bfloat16: mixed precision, float32 master weights)"),
    "ensemble": (int, "train K models at once in one vmapped step (seeds SEED..SEED+K-1); reports each and the mean"),
    "early_stopping": (int, "stop once the test loss has not improved for this many epochs"),
    "dropout": (float, "dropout rate before the model's last layer (0: none)"),
    "augment_translate": (int, "shift training images by up to this many pixels (pad and random crop)"),
    "augment_noise": (float, "standard deviation of Gaussian noise added to training images"),
    "augment_rotate": (float, "rotate training images by a random angle within +- this many degrees"),
    "augment_scale": (float, "zoom training images by a random factor within 1 +- this (in [0, 1))"),
    "keep": (int, "checkpoints to keep"),
}

# on/off Config fields: --name / --no-name
_SWITCHES = {
    "normalize": "standardise images per channel with the training set's statistics",
    "remat": "recompute each block's activations in the backward pass to save memory (autodiff, manual)",
    "augment_flip": "mirror training images left-right with probability 1/2",
    "log_grad_norms": "record each layer's gradient norm and update/weight ratio per epoch in metrics.jsonl",
}

_DEFAULT_TEXT = {"data_dir": "none", "data_path": "none", "schedule_epochs": "--epochs", "early_stopping": "off"}


def _default_workdir() -> Path:
    stem = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    path, suffix = stem, 1
    while path.exists():
        path, suffix = Path(f"{stem}-{suffix}"), suffix + 1
    return path


def _train(args: argparse.Namespace) -> int:
    from jaxcnn.train.config import ConfigError

    try:
        return _train_run(args)
    except ConfigError as error:  # a Config field's message, told in terms of its flag (--augment-translate)
        raise ValueError(error.with_flags()) from None


def _train_run(args: argparse.Namespace) -> int:
    from jaxcnn import _train_flags

    # before anything touches a JAX backend: a multi-process run must join its peers first
    from jaxcnn.distributed import initialize

    distributed = initialize(args.coordinator, args.num_processes, args.process_id)
    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")
    import jax

    from jaxcnn import _signals, train

    _signals.check("while starting; nothing was written")  # joining the peers and importing JAX take a while
    primary = jax.process_index() == 0
    say = (lambda line: print(line, flush=True)) if primary else (lambda line: None)

    overrides = {name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name) is not None}
    for name in ("data_dir", "data_path"):  # absolute, so that eval and resume work from any directory
        if overrides.get(name):
            overrides[name] = os.path.abspath(overrides[name])
    for name in _SWITCHES:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    workdir = Path(args.workdir) if args.workdir else _default_workdir()
    saved = train.read_config(workdir) if (workdir / train.loop.CONFIG_FILE).exists() else None
    note = (lambda line: print(line, file=sys.stderr, flush=True)) if primary else (lambda line: None)
    config = _train_flags.resolve(overrides, saved, note)  # inferred, refused or dropped with a warning
    if distributed and not args.workdir:
        raise ValueError("a multi-process run needs --workdir (the same directory for every process)")
    placement = ""
    if args.devices is not None or distributed:
        count = args.devices if args.devices is not None else jax.device_count()
        placement = f", data parallel over {_plural(count, 'device')}"
        if distributed:
            placement += f" in {jax.process_count()} processes"
    say(
        f"training {config.model} on {config.dataset}: {_plural(config.epochs, 'epoch')}, batch {config.batch_size}, "
        f"{config.optimizer} lr {config.learning_rate:g} ({config.schedule}), gradients {config.gradients}"
        + (f", {config.dtype}" if config.dtype != "float32" else "")
        + (", remat" if config.remat else "")
        + (f", ensemble of {config.ensemble}" if config.ensemble > 1 else "")
        + placement
    )
    with warnings.catch_warnings():
        warnings.showwarning = _warn_on_stderr  # a warning of fit's: one line naming the flag, not the field
        state, history = train.fit(config, workdir, log=say, progress=not args.no_progress, devices=args.devices)
    steps = _plural(train.checkpoint.step_number(state), "step")
    if not history:  # a finished run whose metrics.jsonl was removed: nothing trained, nothing to report
        say(f"done: nothing to train ({steps} already taken); workdir {workdir}")
        return 0
    last = history[-1]
    for k, member in enumerate(last.get("members", [])):
        say(
            f"member {k} (seed {config.seed + k}): test accuracy {_number(member['test_accuracy'])}, "
            f"test loss {_number(member['test_loss'])}"
        )
    which = "ensemble " if "members" in last else ""
    say(
        f"done: {which}test accuracy {_number(last.get('test_accuracy'))}, test loss {_number(last.get('test_loss'))} "
        f"after {_plural(last['epoch'], 'epoch')} ({steps}); workdir {workdir}"
    )
    return 0


def _warn_on_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    text = message.with_flags() if hasattr(message, "with_flags") else str(message)
    print(f"jaxcnn train: warning: {text}".splitlines()[0], file=sys.stderr, flush=True)


def _add_train(commands) -> None:
    from jaxcnn import models
    from jaxcnn.train import config

    choices = {
        "model": models.classifiers(),
        "dataset": config.DATASETS,
        "optimizer": config.OPTIMIZERS,
        "schedule": config.SCHEDULES,
        "gradients": config.GRADIENTS,
        "dtype": config.DTYPES,
    }
    defaults = config.Config()
    parser = commands.add_parser(
        "train",
        help="train a model (with no arguments: mnist_cnn on the digits that ship with scikit-learn)",
        description="Train a model into a workdir (config.json, metrics.jsonl, checkpoints). A workdir that "
        "holds a run is resumed: flags not given keep the run's saved values. One run at a time per workdir "
        "(a lock; eval and plot still read it). SIGINT (Ctrl-C) and SIGTERM stop it cleanly, keeping the last "
        "checkpoint. Exit codes: 0 done, 2 bad input or a workdir in use, 3 the loss turned non-finite, 130 / "
        "143 interrupted.",
    )
    for name, (kind, text) in _TRAIN_FLAGS.items():
        known = choices.get(name)
        suffix = f"; one of {', '.join(known)}" if known else ""
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            metavar=name.upper(),
            help=f"{text} (default: {_DEFAULT_TEXT.get(name, getattr(defaults, name))}{suffix})",
        )
    for name, text in _SWITCHES.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"{text} (default: {'on' if getattr(defaults, name) else 'off'})",
        )
    parser.add_argument("--workdir", default=None, help="run directory (default: a new runs/<timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale = parser.add_argument_group(
        "data parallelism",
        "Shard every batch over devices (parameters replicated, gradients all-reduced); over several processes "
        "too. The process flags default to the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES "
        "and JAX_PROCESS_ID.",
    )
    scale.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="devices in all (default: one; every device in a "
        "multi-process run); simulate CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N",
    )
    scale.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0 (multi-process)")
    scale.add_argument("--num-processes", type=int, default=None, metavar="P", help="number of processes")
    scale.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0..P-1")
    parser.set_defaults(run=_train)
    assert {f.name for f in dataclasses.fields(config.Config)} == set(_TRAIN_FLAGS) | set(_SWITCHES)


def _bench(args: argparse.Namespace) -> int:
    import json

    from jaxcnn import bench, models

    names = [name.strip() for name in args.models.split(",") if name.strip()]
    for name in names:
        models.get(name)  # unknown names: the one-line error listing the known ones
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()] if args.contenders else bench.CONTENDERS
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if not args.quiet else None
    result = bench.run(
        names,
        batch_size=args.batch_size,
        rounds=args.rounds,
        steps=args.steps,
        warmup=args.warmup,
        contenders=contenders,
        dtype=args.dtype,
        steps_per_call=args.steps_per_call,
        remat=args.remat,
        log=log,
    )
    table = bench.markdown(result)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (output / "bench.md").write_text(table)
    print(table, end="")
    print(f"written: {output / 'bench.json'}, {output / 'bench.md'}")
    return 0


def _add_bench(commands) -> None:
    from jaxcnn import bench

    parser = commands.add_parser(
        "bench",
        help="time the training step against Flax and PyTorch (eager and compiled), interleaved, medians",
        description="Time one training step (SGD momentum, synthetic batch on the device) of each model "
        "for jaxcnn's three gradient modes, the same model in Flax linen, and in PyTorch eager and torch.compile "
        "when torch is installed. Contenders take turns for several rounds; the median img/s and ratios to "
        "PyTorch eager are printed as a Markdown table and written with the raw rounds as JSON.",
    )
    parser.add_argument("--models", default="mnist_cnn", help="comma-separated model names (default: mnist_cnn)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: 7)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling (default: 3)")
    parser.add_argument(
        "--contenders", default=None, help=f"comma-separated subset of: {', '.join(bench.CONTENDERS)} (default: all)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=bench.DTYPES, help="compute dtype (bfloat16: mixed precision)"
    )
    parser.add_argument(
        "--steps-per-call", type=int, default=1, help="train steps per JAX call, by lax.scan (default: 1)"
    )
    parser.add_argument("--remat", action="store_true", help="jaxcnn contenders recompute activations per block")
    parser.add_argument("--output", default="benchmarks/latest", help="directory for bench.json and bench.md")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(run=_bench)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to read the usage, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jaxcnn`` command, one subcommand per job."""
    from jaxcnn import __version__, models

    parser = _Parser(prog="jaxcnn", description="CNNs as pure JAX functions, gradients checked.")
    parser.add_argument("--version", action="version", version=f"jaxcnn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    _add_train(commands)
    add_eval_predict_and_plot(commands)
    _add_bench(commands)
    check = commands.add_parser(
        "gradcheck",
        help="check a model's hand-derived gradients against autodiff and finite differences",
        description="Compare the hand-derived gradients (engine and custom_vjp bridge) of a model with JAX "
        "autodiff and central finite differences, per layer and per parameter. Exits 1 on a mismatch.",
    )
    check.add_argument("--model", default="mnist_cnn", choices=models.names(), help="architecture (default: mnist_cnn)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxcnn`` command; returns the exit code.

    SIGINT and SIGTERM stop ``jaxcnn train`` cleanly (exit 130 / 143, one line): from the very start, before
    JAX is imported, they only set a flag that the run checks after each start-up phase and between steps.
    The other commands get Python's default handlers back once their arguments are parsed.
    """
    from jaxcnn import _signals

    with _signals.stop_on_signals():
        parser = build_parser()  # imports JAX
        args = parser.parse_args(argv)
        if args.command == "train":
            return _run(args)
        try:
            _signals.check("while starting")
        except _signals.Interrupted as error:
            print(f"jaxcnn {args.command}: {error}", file=sys.stderr)
            return error.exit_code
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the command; every error becomes one line on stderr and an exit code."""
    from jaxcnn import _signals
    from jaxcnn.train import NonFiniteError

    try:
        _signals.check("while starting; nothing was written")
        return args.run(args)
    except _signals.Interrupted as error:
        print(f"jaxcnn {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    except NonFiniteError as error:
        print(f"jaxcnn {args.command}: error: {error}".splitlines()[0], file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, OSError) as error:
        print(f"jaxcnn {args.command}: error: {error}".splitlines()[0], file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"jaxcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # never a traceback: one line, and an exit code distinct from "mismatch" (1)
        print(f"jaxcnn {args.command}: error: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
