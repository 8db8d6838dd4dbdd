"""The contenders of the training-step benchmark: jaxcnn in each gradient mode, the same model in Flax linen
(:func:`jaxcnn.interop.to_flax`) and in PyTorch (:func:`jaxcnn.interop.torch_module`), eager and compiled.

Each contender is built as a runner: ``runner(steps)`` takes that many train steps and waits for the device;
``runner.memory()`` says what the compiled step holds (None where the backend does not tell).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jaxcnn import nn
from jaxcnn.interop.torch import torch_module

CONTENDERS = ("jaxcnn-manual", "jaxcnn-autodiff", "jaxcnn-engine", "flax", "torch-eager", "torch-compile")
LEARNING_RATE, MOMENTUM = 0.01, 0.9

Runner = Callable[[int], None]  # runner(steps): take that many train steps and wait for the device


class Options(NamedTuple):
    """How every contender trains: the compute dtype, steps per compiled call (JAX contenders: ``lax.scan``),
    and remat (jaxcnn contenders)."""

    dtype: str = "float32"
    steps_per_call: int = 1
    remat: bool = False


def builders(model: nn.Layer, input_shape, x, y, options: Options) -> dict[str, Callable[[], Runner]]:
    """Every contender's runner, built when called (so each is compiled only when it is timed)."""
    case = (model, input_shape, x, y)
    return {
        "jaxcnn-manual": functools.partial(_jaxcnn_runner, *case, "manual", options),
        "jaxcnn-autodiff": functools.partial(_jaxcnn_runner, *case, "autodiff", options),
        "jaxcnn-engine": functools.partial(_jaxcnn_runner, *case, "engine", options._replace(remat=False)),
        "flax": functools.partial(_flax_runner, *case, options),
        "torch-eager": functools.partial(_torch_runner, *case, False, options),
        "torch-compile": functools.partial(_torch_runner, *case, True, options),
    }


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


def torch_device() -> str:
    """PyTorch's device for the comparison: CUDA when JAX itself runs on a GPU and torch sees one, else CPU."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_runner(model: nn.Layer, input_shape, x, y, compiled: bool, options: Options) -> Runner:
    """The PyTorch twin (:func:`torch_module`), eager or ``torch.compile``-d; on CUDA in channels_last (the
    faster layout for cuDNN), with ``torch.autocast`` for a bfloat16 compute dtype."""
    import torch

    device = torch_device()
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

    return torch_timed(torch.compile(step) if compiled else step, device)


def torch_timed(step: Callable[[], Any], device: str) -> Runner:
    """The runner of a PyTorch ``step() -> loss``: ``runner(steps)`` takes that many steps and syncs on the last
    loss; ``runner.memory()`` is the CUDA peak since the last reset (None on CPU: PyTorch keeps no peak there)."""
    import torch

    def run(steps: int) -> None:
        for _ in range(steps):
            loss = step()
        loss.item()  # the device sync

    def memory() -> dict[str, int] | None:  # read after the warm-up steps
        if device != "cuda":
            return None
        return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated())}

    run.memory = memory  # type: ignore[attr-defined]
    return run
