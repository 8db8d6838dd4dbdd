"""The jit-compiled train and eval steps: forward, loss, backward, update, in one XLA program each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnn import backprop
from jaxcnn.functional import softmax_cross_entropy
from jaxcnn.nn.layer import Layer, Params, State
from jaxcnn.train.config import GRADIENTS
from jaxcnn.train.state import TrainState

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Metrics = dict[str, jax.Array]


def _check_gradients(gradients: str) -> None:
    if gradients not in GRADIENTS:
        raise ValueError(f"unknown gradients {gradients!r}; known: {', '.join(GRADIENTS)}")


def _accuracy_of(predictions: jax.Array, y: jax.Array) -> jax.Array | None:
    """The fraction of argmax predictions equal to integer labels; None for other targets (e.g. MSE)."""
    if not jnp.issubdtype(y.dtype, jnp.integer) or predictions.ndim != y.ndim + 1:
        return None
    return jnp.mean(jnp.argmax(predictions, axis=-1) == y, dtype=jnp.float32)


def loss_and_grads_fn(
    model: Layer, loss_fn: LossFn, gradients: str
) -> Callable[..., tuple[jax.Array, jax.Array, State, Params]]:
    """``f(params, state, x, y, key) -> (loss, predictions, new_state, grads)`` in one of the three gradient modes.

    ``"autodiff"``: ``jax.value_and_grad`` through the forward. ``"manual"``: the same, but every layer and the
    loss run through ``jax.custom_vjp`` with their hand-derived rules. ``"engine"``: the explicit reverse pass of
    :func:`jaxcnn.backprop.reverse_pass`, which uses no JAX differentiation at all.
    """
    _check_gradients(gradients)
    if gradients == "engine":
        run = backprop.reverse_pass(model, loss_fn, train=True)

        def engine(params, state, x, y, key):
            result = run(params, state, x, y, key=key)
            return result.loss, result.predictions, result.state, result.grads

        return engine

    mode = "manual" if gradients == "manual" else "autodiff"
    loss_of = backprop.manual_loss(loss_fn) if mode == "manual" else loss_fn

    def objective(params, state, x, y, key):
        predictions, new_state = model.apply(params, state, x, train=True, key=key, gradients=mode)
        return loss_of(predictions, y), (predictions, new_state)

    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def autodiff(params, state, x, y, key):
        (loss, (predictions, new_state)), grads = value_and_grad(params, state, x, y, key)
        return loss, predictions, new_state, grads

    return autodiff


def make_train_step(
    model: Layer,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    gradients: str = "autodiff",
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """A jit-compiled ``step(state, x, y) -> (new_state, metrics)``.

    The four steps of backpropagation in one XLA program: forward, loss, backward (as ``gradients`` says), and
    the optax update. The incoming state's buffers are donated (do not reuse ``state`` after the call). Step
    ``s`` draws its randomness (dropout) from ``fold_in(state.key, s)``. Calls with the same shapes never
    recompile.

    Args:
      model: any :class:`jaxcnn.nn.Layer`.
      optimizer: the optax transform the state was created with.
      loss_fn: ``loss_fn(predictions, targets) -> scalar``; for ``gradients="manual"`` or ``"engine"`` it needs a
        hand-derived VJP registered in :mod:`jaxcnn.functional` (the built-in losses have one).
      gradients: ``"autodiff"``, ``"manual"`` or ``"engine"``.

    Returns:
      ``step(state, x, y)`` with ``x`` of shape ``(N, *input_shape)`` and ``y`` the targets (``(N,)`` integer
      labels for cross-entropy). ``metrics`` stays on device: ``"loss"`` (the batch mean), ``"accuracy"``
      (integer labels only) and ``"count"`` (N), each a scalar.
    """
    loss_and_grads = loss_and_grads_fn(model, loss_fn, gradients)

    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(state.key, state.step)
        loss, predictions, model_state, grads = loss_and_grads(state.params, state.model_state, x, y, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "count": jnp.asarray(x.shape[0], jnp.int32)}
        accuracy = _accuracy_of(predictions, y)
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        new_state = state.replace(params=params, model_state=model_state, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_step(
    model: Layer, *, loss_fn: LossFn = softmax_cross_entropy
) -> Callable[[Params, State, jax.Array, jax.Array], Metrics]:
    """A jit-compiled ``eval_step(params, model_state, x, y) -> metrics`` in inference mode (``train=False``).

    ``metrics`` holds sums, so batches of any size add up exactly: ``"loss_sum"`` (the batch-mean loss times N),
    ``"correct"`` (integer labels only) and ``"count"`` (N).
    """

    def eval_step(params: Params, model_state: State, x: jax.Array, y: jax.Array) -> Metrics:
        predictions, _ = model.apply(params, model_state, x, train=False)
        count = x.shape[0]
        metrics = {"loss_sum": loss_fn(predictions, y) * count, "count": jnp.asarray(count, jnp.int32)}
        accuracy = _accuracy_of(predictions, y)
        if accuracy is not None:
            metrics["correct"] = jnp.sum(jnp.argmax(predictions, axis=-1) == y, dtype=jnp.int32)
        return metrics

    return jax.jit(eval_step)


def evaluate(
    model: Layer,
    params: Params,
    model_state: State,
    x: Any,
    y: Any,
    *,
    batch_size: int = 256,
    loss_fn: LossFn = softmax_cross_entropy,
    eval_step: Callable[..., Metrics] | None = None,
) -> dict[str, float]:
    """Mean loss (and accuracy, for integer labels) of the model over ``(x, y)`` in inference mode.

    Args:
      model, params, model_state: the model and its variables.
      x: inputs ``(N, *input_shape)``; y: targets ``(N, ...)``.
      batch_size: examples per compiled call (the last batch holds the remainder).
      loss_fn: the loss (the mean over a batch).
      eval_step: a step from :func:`make_eval_step` to reuse (avoids a compile per call).

    Returns:
      ``{"loss": float, "accuracy": float, "count": int}`` (no ``"accuracy"`` for non-integer targets).
    """
    from jaxcnn.data import batches

    step = eval_step or make_eval_step(model, loss_fn=loss_fn)
    totals: dict[str, Any] = {}
    for x_batch, y_batch in batches(np.asarray(x), np.asarray(y), batch_size):
        for name, value in step(params, model_state, x_batch, y_batch).items():
            totals[name] = totals[name] + value if name in totals else value
    if not totals:
        raise ValueError("cannot evaluate on an empty set")
    totals = jax.device_get(totals)
    count = int(totals["count"])
    result: dict[str, Any] = {"loss": float(totals["loss_sum"]) / count, "count": count}
    if "correct" in totals:
        result["accuracy"] = float(totals["correct"]) / count
    return result
