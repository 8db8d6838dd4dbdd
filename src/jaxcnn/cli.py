"""The ``jaxcnn`` command: thin argument parsing over the library.

``jaxcnn train`` trains (and resumes) a run into a workdir; ``jaxcnn eval`` evaluates a workdir's checkpoint
(the best of an early-stopped run, else the latest; ``--step``) on its data or on other data; ``jaxcnn predict``
classifies image and array files with it; ``jaxcnn plot`` draws its curves (those three in
:mod:`jaxcnn._cli_use`); ``jaxcnn gradcheck`` prints the three-way gradient check of a named model and exits 1
on a mismatch, ``jaxcnn bench`` times the training step (those two in :mod:`jaxcnn._cli_tools`). Bad input
gives a one-line error and exit code 2, never a traceback; a run whose loss turns non-finite stops with exit
code 3.
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

from jaxcnn._cli_tools import add_bench_and_gradcheck
from jaxcnn._cli_use import _number, _plural, add_eval_predict_and_plot

EXIT_ERROR = 2  # bad input: arguments, data, workdir, checkpoint
EXIT_DIVERGED = 3  # the loss turned NaN or Inf


# flag -> Config field; each flag's default is None ("not given"), so a resumed run keeps its saved values
_TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "model": (str, "architecture: a registered name, or package.module:factory for your own"),
    "dataset": (str, "data set"),
    "data_dir": (str, "directory of the MNIST / Fashion-MNIST IDX files or the CIFAR-10 .bin batches"),
    "data_path": (str, "the .npz file of --dataset npz (x_train, y_train, x_test, y_test)"),
    "optimizer": (str, "optax optimizer"),
    "learning_rate": (float, "peak learning rate"),
    "momentum": (float, "momentum of momentum, nesterov and rmsprop"),
    "weight_decay": (float, "weight decay (decoupled for adamw, L2 otherwise)"),
    "label_smoothing": (float, "smooth the one-hot targets: (1 - E) onehot + E / classes, E in [0, 1)"),
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
    "image_size": (int, "side of the square images an image folder is cropped and resized to"),
    "data_workers": (int, "processes decoding an image folder (0: in the training process)"),
    "checkpoint_every": (int, "also checkpoint every this many steps within an epoch (exact mid-epoch resume)"),
    "dp_clip": (float, "DP-SGD: clip each example's gradient to this L2 norm (with --dp-noise or --dp-target-epsilon)"),
    "dp_noise": (float, "DP-SGD noise multiplier sigma: N(0, (sigma C)^2) on the clipped sum"),
    "dp_delta": (float, "DP-SGD delta of the (epsilon, delta) guarantee"),
    "dp_target_epsilon": (float, "DP-SGD: choose the noise multiplier that spends this epsilon over --epochs"),
    "dp_method": (str, "DP-SGD per-example clipping: ghost (norms from the hand rules) or vmap (per-example grads)"),
    "dp_sampling": (str, "DP-SGD batches: shuffle (fixed batches, proven bound) or poisson (padded, exact figure)"),
    "dp_accountant": (str, "DP-SGD privacy accountant (dp_accounting): rdp or pld (tighter, slower)"),
}

# on/off Config fields: --name / --no-name
_SWITCHES = {
    "normalize": "standardise images per channel with the training set's statistics",
    "remat": "recompute each block's activations in the backward pass to save memory (autodiff, manual)",
    "augment_flip": "mirror training images left-right with probability 1/2",
    "log_grad_norms": "record each layer's gradient norm and update/weight ratio per epoch in metrics.jsonl",
    "skip_bad_files": "leave out image files that fail the header check or do not decode (counted in the log)",
    "decay_norms_and_biases": "weight decay on every parameter (--no-...: on kernels only, not on biases and norms)",
}

_DEFAULT_TEXT = {
    "data_dir": "none",
    "data_path": "none",
    "schedule_epochs": "--epochs",
    "early_stopping": "off",
    "data_workers": "one per CPU but one",
    "checkpoint_every": "off",
    "dp_clip": "off",
    "dp_noise": "none",
    "dp_delta": "1/N rounded down to a power of ten",
    "dp_target_epsilon": "none",
}


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
    from jaxcnn.train import dp_run

    _signals.check("while starting; nothing was written")  # joining the peers and importing JAX take a while
    primary = jax.process_index() == 0
    say = (lambda line: print(line, flush=True)) if primary else (lambda line: None)

    workdir = Path(args.workdir) if args.workdir else _default_workdir()
    saved = train.read_config(workdir) if (workdir / train.loop.CONFIG_FILE).exists() else None
    note = (lambda line: print(line, file=sys.stderr, flush=True)) if primary else (lambda line: None)
    # inferred, refused or dropped with a warning; a preset's values go under the flags given
    given = _overrides(args)
    config = _train_flags.resolve(given, saved, note, preset=args.preset)
    dp_run.check_given(config, given)
    if distributed and not args.workdir:
        raise ValueError("a multi-process run needs --workdir (the same directory for every process)")
    placement = ""
    if args.devices is not None or distributed:
        count = args.devices if args.devices is not None else jax.device_count()
        placement = f", data parallel over {_plural(count, 'device')}"
        if distributed:
            placement += f" in {jax.process_count()} processes"
    gradients = config.gradients if config.dp_clip is None or config.dp_method == "vmap" else "engine"
    say(
        f"training {config.model} on {config.dataset}: {_plural(config.epochs, 'epoch')}, batch {config.batch_size}, "
        f"{config.optimizer} lr {config.learning_rate:g} ({config.schedule}), gradients {gradients}"
        + (f", {config.dtype}" if config.dtype != "float32" else "")
        + (", remat" if config.remat else "")
        + (f", ensemble of {config.ensemble}" if config.ensemble > 1 else "")
        + placement
    )
    with warnings.catch_warnings():
        warnings.showwarning = _warn_on_stderr  # a warning of fit's: one line naming the flag, not the field
        state, history = train.fit(config, workdir, log=say, progress=not args.no_progress, devices=args.devices)
    _say_done(say, config, train.checkpoint.step_number(state), history, workdir)
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """The Config fields the flags set (a flag not given sets nothing: a resumed run keeps its saved value)."""
    overrides = {name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name) is not None}
    for name in ("data_dir", "data_path"):  # absolute, so that eval and resume work from any directory
        if overrides.get(name):
            overrides[name] = os.path.abspath(overrides[name])
    for name in _SWITCHES:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return overrides


def _say_done(say, config, step: int, history: list[dict], workdir: Path) -> None:
    """The last lines of a run: each ensemble member's test figures, then the run's."""
    steps = _plural(step, "step")
    if not history:  # a finished run whose metrics.jsonl was removed: nothing trained, nothing to report
        say(f"done: nothing to train ({steps} already taken); workdir {workdir}")
        return
    last = history[-1]
    for k, member in enumerate(last.get("members", [])):
        say(
            f"member {k} (seed {config.seed + k}): test accuracy {_number(member['test_accuracy'])}, "
            f"test loss {_number(member['test_loss'])}"
        )
    which = "ensemble " if "members" in last else ""
    private = ""
    if "epsilon" in last:
        from jaxcnn.train.progress import epsilon_text

        private = f", epsilon {epsilon_text(last)} (delta {last['delta']:g})"
    say(
        f"done: {which}test accuracy {_number(last.get('test_accuracy'))}, test loss {_number(last.get('test_loss'))} "
        f"after {_plural(last['epoch'], 'epoch')} ({steps}){private}; workdir {workdir}"
    )


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
        "dp_method": config.DP_METHODS,
        "dp_sampling": config.DP_SAMPLINGS,
        "dp_accountant": config.DP_ACCOUNTANTS,
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
        suffix += ", or package.module:factory" if name == "model" else ""
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
    _add_preset_flag(parser)
    _add_data_parallel_flags(parser)
    parser.set_defaults(run=_train)
    assert {f.name for f in dataclasses.fields(config.Config)} == set(_TRAIN_FLAGS) | set(_SWITCHES)


def _add_preset_flag(parser: argparse.ArgumentParser) -> None:
    from jaxcnn.train.presets import PRESETS

    listed = "; ".join(f"{name}: {preset.summary}" for name, preset in PRESETS.items())
    parser.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="start a run from a named recipe; every flag given overrides its value, and with --batch-size but no "
        f"--learning-rate the rate follows the recipe's scaling rule; new runs only. Presets: {listed}",
    )


def _add_data_parallel_flags(parser: argparse.ArgumentParser) -> None:
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
    add_bench_and_gradcheck(commands, models.names())
    for command in commands.choices.values():
        command.add_argument(
            "--no-xla-cpu-flags",
            action="store_true",
            help="XLA's defaults everywhere: jaxcnn's float32 train steps on CPU compile without their YNNPACK "
            "option, and XLA_FLAGS get nothing added (as JAXCNN_XLA_CPU_FLAGS=off)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxcnn`` command; returns the exit code.

    SIGINT and SIGTERM stop ``jaxcnn train`` cleanly (exit 130 / 143, one line): from the very start, before
    JAX is imported, they only set a flag that the run checks after each start-up phase and between steps.
    The other commands get Python's default handlers back once their arguments are parsed.
    """
    from jaxcnn import _signals

    with _signals.stop_on_signals():
        parser = build_parser()  # imports JAX (no backend starts)
        args = parser.parse_args(argv)
        if getattr(args, "no_xla_cpu_flags", False):
            from jaxcnn import _xla_flags

            _xla_flags.revert()  # before any backend starts: XLA reads XLA_FLAGS then
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
