"""Training-step benchmarks: jaxcnn's three gradient modes against the same model in Flax and PyTorch.

Every contender trains the same architecture with the same optimizer (SGD with momentum 0.9, float32) on the
same synthetic batch, already on the device. Each is compiled and warmed up first; then the contenders take
turns, round after round (interleaved, so a noisy machine slows them alike), each round timing ``steps``
consecutive steps ended by a device sync; each round starts one contender later than the last, so no contender
always runs first. The figure per contender is the median images per second over the
rounds; ratios are to PyTorch eager when it ran (else to jaxcnn autodiff). PyTorch is optional: it is used
when installed, never a dependency of jaxcnn.

``run(...)`` returns the result as a dict (JSON-able); :func:`markdown` renders its table. ``jaxcnn bench``
writes both to a directory.
"""

from __future__ import annotations

import functools
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jaxcnn import models, nn

CONTENDERS = ("jaxcnn-manual", "jaxcnn-autodiff", "jaxcnn-engine", "flax", "torch-eager", "torch-compile")
LEARNING_RATE, MOMENTUM = 0.01, 0.9
DTYPES = ("float32", "bfloat16")

Runner = Callable[[int], None]  # runner(steps): take that many train steps and wait for the device


def _batch(input_shape: tuple[int, ...], batch_size: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, *input_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, batch_size).astype(np.int32)
    return x, y


class Options(NamedTuple):
    """How every contender trains: the compute dtype, steps per compiled call (JAX contenders: ``lax.scan``),
    and remat (jaxcnn contenders)."""

    dtype: str = "float32"
    steps_per_call: int = 1
    remat: bool = False


def _compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's own account of a compiled step's memory (bytes): temporaries, arguments, outputs; None if the
    backend gives none."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- a backend without memory analysis reports nothing
        return None
    if analysis is None:
        return None
    return {
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
    }


def _jax_runner(step: Callable, carry: Any, x: np.ndarray, y: np.ndarray, steps_per_call: int) -> Runner:
    """``runner(steps)`` for a jitted ``step(carry, x, y) -> (carry, aux)`` that donates its carry; with
    ``steps_per_call`` K > 1 the step takes K stacked batches (the same batch K times) per call."""
    if steps_per_call > 1:
        x, y = np.stack([x] * steps_per_call), np.stack([y] * steps_per_call)
    x, y = jax.device_put(x), jax.device_put(y)
    compiled = step.lower(carry, x, y).compile()  # ahead of time, so its memory analysis comes for free
    holder = {"carry": carry}

    def run(steps: int) -> None:
        carry = holder["carry"]
        for _ in range(steps // steps_per_call):
            carry, aux = compiled(carry, x, y)
        jax.block_until_ready((carry, aux))
        holder["carry"] = carry

    memory = _compiled_memory(compiled)
    run.memory = lambda: memory  # type: ignore[attr-defined]
    return run


def _jaxcnn_runner(model: nn.Layer, input_shape, x, y, gradients: str, options: Options) -> Runner:
    from jaxcnn import train

    optimizer = optax.sgd(LEARNING_RATE, MOMENTUM)
    state = train.create_train_state(model, optimizer, jax.random.key(0), input_shape)
    step = train.make_train_step(
        model,
        gradients=gradients,
        dtype=None if options.dtype == "float32" else options.dtype,
        remat=options.remat,
        steps_per_call=options.steps_per_call,
    )
    return _jax_runner(step, state, x, y, options.steps_per_call)


def flax_loss(model: nn.Layer, params: Any, state: Any, dtype: str = "float32"):
    """The model as a Flax linen module (interop.to_flax) with jaxcnn's mixed precision policy (parameters and
    input cast to ``dtype``, loss in float32): ``(flax_params, batch_stats, loss)`` with
    ``loss(params, batch_stats, x, y) -> (value, new_batch_stats)``."""
    from jaxcnn import functional as F
    from jaxcnn import interop
    from jaxcnn.train.step import cast_floating

    module, variables = interop.to_flax(model, params, state)
    has_stats = "batch_stats" in variables
    low = None if dtype == "float32" else jax.numpy.dtype(dtype)

    def loss(params, stats, x, y):
        if low is not None:
            params, x = cast_floating(params, low), x.astype(low)
        if has_stats:
            logits, updates = module.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return F.softmax_cross_entropy(logits.astype(np.float32), y), updates["batch_stats"]
        logits = module.apply({"params": params}, x, train=True)
        return F.softmax_cross_entropy(logits.astype(np.float32), y), stats

    return variables["params"], variables.get("batch_stats", {}), loss


def _flax_runner(model: nn.Layer, input_shape, x, y, options: Options) -> Runner:
    """The Flax twin (:func:`flax_loss`) trained by ``jax.value_and_grad`` with the same optimizer."""
    flax_params, stats, loss = flax_loss(model, *model.init(jax.random.key(0), input_shape), options.dtype)
    optimizer = optax.sgd(LEARNING_RATE, MOMENTUM)

    def train_step(carry, x, y):
        params, stats, opt_state = carry
        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), value

    step = train_step
    if options.steps_per_call > 1:
        step = lambda carry, xs, ys: jax.lax.scan(lambda c, batch: train_step(c, *batch), carry, (xs, ys))
    carry = (flax_params, stats, optimizer.init(flax_params))
    return _jax_runner(jax.jit(step, donate_argnums=0), carry, x, y, options.steps_per_call)


def torch_module(model: nn.Layer, input_shape: tuple[int, ...]):
    """The same architecture as a ``torch.nn.Module`` on NCHW inputs (for speed comparisons; the weights are
    PyTorch's own initialisation). Raises ValueError for a layer without a PyTorch counterpart here."""
    import torch

    tnn = torch.nn

    class Residual(tnn.Module):
        def __init__(self, block, shortcut):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    def padding_of(padding, kernel, dilation) -> Any:
        if padding == "VALID":
            return 0
        if padding == "SAME":
            if all(((k - 1) * d) % 2 == 0 for k, d in zip(kernel, dilation, strict=True)):
                return tuple((k - 1) * d // 2 for k, d in zip(kernel, dilation, strict=True))
            return "same"
        if isinstance(padding, int):
            return padding
        if all(low == high for low, high in padding):
            return tuple(low for low, _ in padding)
        raise ValueError(f"torch_module: asymmetric padding {padding} has no direct PyTorch equivalent")

    def convert(layer: nn.Layer, shape: tuple[int, ...]):
        if isinstance(layer, nn.Sequential):
            modules, current = [], shape
            for child in layer.layers:
                modules.append(convert(child, current))
                current = child.output_shape(current)
            return tnn.Sequential(*modules)
        if isinstance(layer, nn.Residual):
            shortcut = None if layer.shortcut is None else convert(layer.shortcut, shape)
            return Residual(convert(layer.block, shape), shortcut)
        if isinstance(layer, nn.Conv2D):
            if layer.stride != (1, 1) and layer.padding == "SAME":
                raise ValueError("torch_module: strided SAME convolutions have no direct PyTorch equivalent")
            return tnn.Conv2d(
                shape[-1],
                layer.features,
                layer.kernel_size,
                stride=layer.stride,
                padding=padding_of(layer.padding, layer.kernel_size, layer.dilation),
                dilation=layer.dilation,
                groups=layer.groups,
                bias=layer.use_bias,
            )
        if isinstance(layer, nn.Dense):
            return tnn.Linear(shape[-1], layer.features, bias=layer.use_bias)
        if isinstance(layer, nn.BatchNorm):
            return tnn.BatchNorm2d(shape[-1], eps=layer.epsilon, momentum=1 - layer.momentum)
        if isinstance(layer, (nn.AvgPool2D, nn.MaxPool2D)):
            kind = tnn.AvgPool2d if isinstance(layer, nn.AvgPool2D) else tnn.MaxPool2d
            if layer.padding not in ("VALID", 0):
                padding = padding_of(layer.padding, layer.window, (1, 1))
                if padding == "same":
                    raise ValueError("torch_module: this pooling padding has no direct PyTorch equivalent")
                if kind is tnn.AvgPool2d:
                    return kind(layer.window, layer.stride or layer.window, padding, count_include_pad=False)
                return kind(layer.window, layer.stride or layer.window, padding)
            return kind(layer.window, layer.stride or layer.window)
        if isinstance(layer, nn.GlobalAvgPool2D):
            return tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Flatten())
        if isinstance(layer, nn.Flatten):
            return tnn.Flatten()
        if isinstance(layer, nn.Dropout):
            return tnn.Dropout(layer.rate)
        simple = {nn.ReLU: tnn.ReLU, nn.Sigmoid: tnn.Sigmoid, nn.Tanh: tnn.Tanh, nn.Softplus: tnn.Softplus}
        if type(layer) in simple:
            return simple[type(layer)]()
        raise ValueError(f"torch_module: no PyTorch counterpart for {type(layer).__name__}")

    return convert(model, tuple(input_shape))


def _torch_device() -> str:
    """PyTorch's device for the comparison: CUDA when JAX itself runs on a GPU and torch sees one, else CPU."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_runner(model: nn.Layer, input_shape, x, y, compiled: bool, options: Options) -> Runner:
    """The PyTorch twin (:func:`torch_module`), eager or ``torch.compile``-d; on CUDA in channels_last (the
    faster layout for cuDNN), with ``torch.autocast`` for a bfloat16 compute dtype."""
    import torch

    device = _torch_device()
    module = torch_module(model, input_shape).to(device)
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    if device == "cuda":
        module = module.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    labels = torch.from_numpy(y.astype(np.int64)).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast = options.dtype != "float32"
    low = getattr(torch, options.dtype)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=low, enabled=autocast):
            logits = module(images)
        loss = loss_fn(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return loss

    step_fn = torch.compile(step) if compiled else step

    def run(steps: int) -> None:
        for _ in range(steps):
            loss = step_fn()
        loss.item()  # the device sync

    def memory() -> dict[str, int] | None:  # read after the warm-up steps
        if device != "cuda":
            return None
        return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated())}

    run.memory = memory  # type: ignore[attr-defined]
    return run


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(device.device_kind) for device in jax.devices()],
    }
    for package in ("flax", "optax"):
        info[package] = __import__(package).__version__
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def _peak_memory() -> dict[str, Any]:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    return {
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


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
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Benchmark the training step of each model for each contender (see the module docstring).

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
      log: called with progress lines (None for silence).

    Returns:
      ``{"machine": ..., "settings": ..., "results": [{"model", "contender", "images_per_second",
      "rounds_images_per_second", "ratio_to", "ratio", "seconds_to_compile", "memory"}, ...], "memory": ...}``.
      A contender's ``memory`` is XLA's compiled-memory analysis for the JAX ones (``temp_bytes`` and more)
      and the CUDA peak for PyTorch on a GPU; None where the backend gives none.
    """
    say = log or (lambda line: None)
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
    options = Options(dtype, steps_per_call, remat)
    try:
        import torch  # noqa: F401

        has_torch = True
    except ImportError:
        has_torch = False
    results = []
    for name in model_names:
        model = models.get(name)
        input_shape = models.input_shape(name)
        x, y = _batch(input_shape, batch_size, model.output_shape(input_shape)[-1])
        case = (model, input_shape, x, y)  # bound now: the builders run within this iteration
        builders: dict[str, Callable[[], Runner]] = {
            "jaxcnn-manual": functools.partial(_jaxcnn_runner, *case, "manual", options),
            "jaxcnn-autodiff": functools.partial(_jaxcnn_runner, *case, "autodiff", options),
            "jaxcnn-engine": functools.partial(_jaxcnn_runner, *case, "engine", options._replace(remat=False)),
            "flax": functools.partial(_flax_runner, *case, options),
            "torch-eager": functools.partial(_torch_runner, *case, False, options),
            "torch-compile": functools.partial(_torch_runner, *case, True, options),
        }
        runners: dict[str, Runner] = {}
        compile_seconds: dict[str, float] = {}
        memory: dict[str, Any] = {}
        for contender in contenders:
            if contender.startswith("torch") and not has_torch:
                say(f"{name}: {contender} skipped (torch is not installed)")
                continue
            per_call = 1 if contender.startswith("torch") else steps_per_call
            try:
                started = time.perf_counter()
                runner = builders[contender]()
                runner(per_call)  # compile (PyTorch: the first call compiles)
                compile_seconds[contender] = time.perf_counter() - started
                if warmup:
                    runner(max(warmup, per_call) // per_call * per_call)
                memory[contender] = runner.memory()
                runners[contender] = runner
                say(f"{name}: {contender} ready ({compile_seconds[contender]:.1f}s to build and compile)")
            except ValueError as error:
                say(f"{name}: {contender} skipped ({error})")
        timings: dict[str, list[float]] = {contender: [] for contender in runners}
        order = list(runners)
        for round_index in range(rounds):
            # each round starts one contender later: whatever the first (or last) place costs is shared out
            shift = round_index % max(len(order), 1)
            for contender in order[shift:] + order[:shift]:
                runner = runners[contender]
                started = time.perf_counter()
                runner(steps)
                timings[contender].append(batch_size * steps / (time.perf_counter() - started))
            say(f"{name}: round {round_index + 1}/{rounds} done")
        reference = "torch-eager" if "torch-eager" in timings else "jaxcnn-autodiff"
        medians = {contender: statistics.median(values) for contender, values in timings.items()}
        for contender, values in timings.items():
            results.append(
                {
                    "model": name,
                    "contender": contender,
                    "images_per_second": medians[contender],
                    "rounds_images_per_second": values,
                    "ratio_to": reference if reference in medians else None,
                    "ratio": medians[contender] / medians[reference] if reference in medians else None,
                    "seconds_to_compile": compile_seconds[contender],
                    "memory": memory[contender],
                }
            )
    settings = dict(
        models=list(model_names), batch_size=batch_size, rounds=rounds, steps=steps, warmup=warmup,
        optimizer=f"sgd(lr={LEARNING_RATE}, momentum={MOMENTUM})", dtype=dtype, steps_per_call=steps_per_call,
        remat=remat, torch_device=_torch_device() if has_torch else None,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )  # fmt: skip
    return {"machine": _machine(), "settings": settings, "results": results, "memory": _peak_memory()}


def _memory_text(memory: dict[str, int] | None) -> str:
    """A contender's memory in MiB: XLA's temporaries (plus arguments) for JAX, the CUDA peak for PyTorch."""
    if not memory:
        return ""
    if "temp_bytes" in memory:
        return f"{memory['temp_bytes'] / 2**20:,.1f} temp + {memory['argument_bytes'] / 2**20:,.1f} args"
    return f"{memory['peak_allocated_bytes'] / 2**20:,.1f} peak"


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table (median img/s, ratio, compile time) with the machine and settings."""
    machine, settings = result["machine"], result["settings"]
    lines = [
        f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs, backend {machine['backend']} "
        f"({', '.join(sorted(set(machine['devices'])))}); {machine['platform']}",
        f"Versions: python {machine['python']}, jax {machine['jax']}, flax {machine['flax']}, "
        f"optax {machine['optax']}, torch {machine['torch']}",
        f"Settings: batch {settings['batch_size']}, {settings['rounds']} interleaved rounds of "
        f"{settings['steps']} steps (median), {settings['optimizer']}, {settings['dtype']}"
        + (
            f", {settings.get('steps_per_call')} steps per JAX call (lax.scan)"
            if settings.get("steps_per_call", 1) > 1
            else ""
        )
        + (", remat" if settings.get("remat") else "")
        + (f", XLA_FLAGS={settings['xla_flags']}" if settings.get("xla_flags") else ""),
        "",
        "| model | contender | median img/s | ratio | compile s | memory MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x {row['ratio_to']}"
        lines.append(
            f"| {row['model']} | {row['contender']} | {row['images_per_second']:,.0f} | {ratio} | "
            f"{row['seconds_to_compile']:.1f} | {_memory_text(row.get('memory'))} |"
        )
    memory = result["memory"]
    if memory.get("device_peak_bytes"):
        lines.append(f"\nDevice peak memory: {memory['device_peak_bytes'] / 2**20:,.0f} MiB")
    lines.append(f"\nProcess max RSS: {memory['process_max_rss_bytes'] / 2**20:,.0f} MiB")
    return "\n".join(lines) + "\n"
