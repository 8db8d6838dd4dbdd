"""The harness of the training-step benchmark: :func:`run` builds the contenders, times them in interleaved
rounds and gathers medians and ratios (see :mod:`jaxcnn.bench`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxcnn import _xla_flags, models
from jaxcnn._step_jit import step_compiler_options
from jaxcnn.bench import flagsets
from jaxcnn.bench.contenders import CONTENDERS, LEARNING_RATE, MOMENTUM, Options, Runner, builders, torch_device
from jaxcnn.bench.flagsets import FlagSet
from jaxcnn.bench.report import machine, peak_memory

DTYPES = ("float32", "bfloat16")


def run(
    model_names: Sequence[str] = ("mnist_cnn",),
    *,
    batch_size: int = 128,
    rounds: int = 7,
    steps: int = 10,
    warmup: int = 3,
    contenders: Sequence[str] = CONTENDERS,
    dtype: str = "float32",
    steps_per_call: int = 1,
    remat: bool = False,
    xla_flag_sets: Sequence[str | FlagSet] = (),
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Benchmark the training step of each model for each contender (see :mod:`jaxcnn.bench`).

    Args:
      model_names: architectures from :mod:`jaxcnn.models`, at their design input shape.
      batch_size: images per step.
      rounds: interleaved timing rounds (the median is reported); steps: train steps per round.
      warmup: untimed steps per contender after compiling.
      contenders: a subset of :data:`CONTENDERS`; the PyTorch ones are skipped when torch is not installed.
      dtype: ``"float32"`` or ``"bfloat16"`` (mixed precision: float32 master weights and loss; PyTorch
        through ``torch.autocast``).
      steps_per_call: train steps per compiled call for the JAX contenders (``lax.scan``); ``steps`` must be a
        multiple of it. PyTorch takes one step per call.
      remat: the jaxcnn contenders recompute activations in the backward pass (``jax.checkpoint`` per block).
      xla_flag_sets: XLA flag sets (``"NAME=FLAGS"`` or :class:`~jaxcnn.bench.flagsets.FlagSet`): the JAX
        contenders run again in one worker process per set, started with those ``XLA_FLAGS``, and take their
        turns in the same rounds as ``contender@NAME`` (:mod:`jaxcnn.bench.flagsets`).
      log: called with progress lines (None for silence).

    Returns:
      ``{"machine": ..., "settings": ..., "results": [{"model", "contender", "images_per_second",
      "rounds_images_per_second", "ratio_to", "ratio", "seconds_to_compile", "memory"}, ...], "memory": ...}``.
      A contender's ``memory`` is XLA's compiled-memory analysis for the JAX ones (``temp_bytes`` and more)
      and the CUDA peak for PyTorch on a GPU; None where the backend gives none.
    """
    say = log or (lambda line: None)
    _check_settings(contenders, batch_size, rounds, steps, warmup, dtype, steps_per_call, remat)
    flag_sets = [flagsets.parse(f) if isinstance(f, str) else f for f in xla_flag_sets]
    flagsets.check_names(flag_sets)
    options = Options(dtype, steps_per_call, remat)
    has_torch = any(c.startswith("torch") for c in contenders) and _has_torch()  # importing torch takes seconds
    results = []
    skipped: dict[str, str] = {}  # contender (or *@FLAGSET: all of a flag set's) -> why it did not run
    workers = []
    try:
        for flag_set in flag_sets:
            say(f"starting the worker of XLA flag set {flag_set.spec!r}")
            workers.append(flagsets.start(flag_set))
        for name in model_names:
            model = models.get(name)
            input_shape = models.input_shape(name)
            x, y = _batch(input_shape, batch_size, model.output_shape(input_shape)[-1])
            build = builders(model, input_shape, x, y, options)
            wanted = {c: build[c] if has_torch or not c.startswith("torch") else None for c in contenders}
            ready = _ready(name, wanted, steps_per_call, warmup, say, skipped)
            request = flagsets.model_request(name) | dict(
                batch_size=batch_size, dtype=dtype, steps_per_call=steps_per_call, remat=remat,
                warmup=warmup, contenders=[c for c in contenders if c in flagsets.JAX_CONTENDERS],
            )  # fmt: skip
            for worker in workers:
                ready |= _worker_ready(name, worker, request, say, skipped)
            runners = {c: runner for c, (runner, _, _) in ready.items()}
            timings = _time_rounds(name, runners, rounds, steps, batch_size, say)
            results += _rows(name, timings, ready)
    finally:
        for worker in workers:
            worker.close()
    settings = dict(
        models=list(model_names), batch_size=batch_size, rounds=rounds, steps=steps, warmup=warmup,
        optimizer=f"sgd(lr={LEARNING_RATE}, momentum={MOMENTUM})", dtype=dtype, steps_per_call=steps_per_call,
        remat=remat, torch_device=torch_device() if has_torch else None,
        xla_flags=_xla_flags.user_flags(), jaxcnn_cpu_flags=_xla_flags.applied(),
        jaxcnn_step_options=step_compiler_options(),
        xla_flag_sets={flag_set.name: flag_set.spec.partition("=")[2] for flag_set in flag_sets},
    )  # fmt: skip
    return {
        "machine": machine(), "settings": settings, "results": results, "memory": peak_memory(), "skipped": skipped,
    }  # fmt: skip


def _check_settings(contenders, batch_size, rounds, steps, warmup, dtype, steps_per_call, remat) -> None:
    """ValueError, in one line, for the first setting of :func:`run` that is out of range."""
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; known: {', '.join(CONTENDERS)}")
    for name, value in (("batch_size", batch_size), ("rounds", rounds), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(steps_per_call, int) or steps_per_call < 1 or steps % steps_per_call:
        raise ValueError(f"steps_per_call must be an int >= 1 dividing steps (={steps}), got {steps_per_call!r}")
    if not isinstance(remat, bool):
        raise ValueError(f"remat must be a bool, got {remat!r}")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _batch(input_shape: tuple[int, ...], batch_size: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, *input_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, batch_size).astype(np.int32)
    return x, y


def _ready(
    name: str,
    build: dict[str, Callable[[], Runner] | str | None],
    steps_per_call: int,
    warmup: int,
    say: Callable,
    skipped: dict[str, str] | None = None,
) -> dict[str, tuple[Runner, float, Any]]:
    """``{contender: (runner, seconds to build and compile, memory)}``, each compiled and warmed up; a
    contender that cannot be built (None: torch is not installed; a string: the reason it cannot run; a layer
    without a counterpart) is skipped with a line saying why, and the reason put in ``skipped`` when given."""
    ready = {}
    skipped = {} if skipped is None else skipped
    for contender, builder in build.items():
        if builder is None or isinstance(builder, str):
            skipped[contender] = builder or "torch is not installed"
            say(f"{name}: {contender} skipped ({skipped[contender]})")
            continue
        per_call = 1 if contender.startswith("torch") else steps_per_call
        try:
            started = time.perf_counter()
            runner = builder()
            runner(per_call)  # compile (PyTorch: the first call compiles)
            seconds = time.perf_counter() - started
            if warmup:
                runner(max(warmup, per_call) // per_call * per_call)
            ready[contender] = (runner, seconds, runner.memory())
            say(f"{name}: {contender} ready ({seconds:.1f}s to build and compile)")
        except ValueError as error:
            skipped[contender] = str(error)
            say(f"{name}: {contender} skipped ({error})")
    return ready


def _worker_ready(
    name: str,
    worker: flagsets.Worker,
    request: dict[str, Any],
    say: Callable[[str], None],
    skipped: dict[str, str],
) -> dict[str, tuple[Runner, float, Any]]:
    """The ``contender@FLAGSET`` entries of :func:`_ready` for one flag set's worker."""
    suffix = f"@{worker.flag_set.name}"
    worker.greet()  # XLA refused the flags: a one-line ValueError for the whole run (a typo, not a skip)
    try:
        reply = worker.build(request)
    except ValueError as error:  # the worker died compiling or warming up (XLA:CPU aborts, illegal instructions)
        say(f"{name}: every contender of XLA flag set {worker.flag_set.name!r} skipped ({error})")
        skipped[f"*{suffix}"] = str(error)
        return {}
    for contender, reason in reply["skipped"].items():
        say(f"{name}: {contender}{suffix} skipped ({reason})")
        skipped[contender + suffix] = reason
    ready = {}
    for contender, info in reply["ready"].items():
        ready[contender + suffix] = (worker.runner(contender), info["seconds"], info["memory"])
        say(f"{name}: {contender}{suffix} ready ({info['seconds']:.1f}s to build and compile)")
    return ready


def _time_rounds(
    name: str, runners: dict[str, Runner], rounds: int, steps: int, batch_size: int, say: Callable[[str], None]
) -> dict[str, list[float]]:
    """Images per second of every runner, round after round, the contenders taking turns."""
    timings: dict[str, list[float]] = {contender: [] for contender in runners}
    order = list(runners)
    for round_index in range(rounds):
        # each round starts one contender later: whatever the first (or last) place costs is shared out
        shift = round_index % max(len(order), 1)
        for contender in order[shift:] + order[:shift]:
            runner = runners[contender]
            started = time.perf_counter()
            seconds = runner(steps)  # a flag set's worker times its own steps and returns the seconds
            seconds = seconds if isinstance(seconds, float) else time.perf_counter() - started
            timings[contender].append(batch_size * steps / seconds)
        say(f"{name}: round {round_index + 1}/{rounds} done")
    return timings


def _rows(
    name: str,
    timings: dict[str, list[float]],
    ready: dict[str, tuple[Runner, float, Any]],
    reference: str | None = None,
) -> list[dict]:
    """One result row per contender: the median, the rounds, the ratio to the reference (default: PyTorch eager
    when it ran, else jaxcnn autodiff), compile time, memory."""
    reference = reference or ("torch-eager" if "torch-eager" in timings else "jaxcnn-autodiff")
    medians = {contender: statistics.median(values) for contender, values in timings.items()}
    return [
        {
            "model": name,
            "contender": contender,
            "images_per_second": medians[contender],
            "rounds_images_per_second": values,
            "ratio_to": reference if reference in medians else None,
            "ratio": medians[contender] / medians[reference] if reference in medians else None,
            "seconds_to_compile": ready[contender][1],
            "memory": ready[contender][2],
        }
        for contender, values in timings.items()
    ]
