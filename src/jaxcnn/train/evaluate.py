"""Evaluation: the jit-compiled eval step (inference mode, sums that add up over batches) and ``evaluate``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.functional import softmax_cross_entropy
from jaxcnn.nn.layer import Layer, Params, State
from jaxcnn.train.step import InputScaling, LossFn, Metrics, accuracy_of


def make_eval_step(
    model: Layer,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    input_scaling: InputScaling | None = None,
    masked: bool = False,
) -> Callable[[Params, State, jax.Array, jax.Array], Metrics]:
    """A jit-compiled ``eval_step(params, model_state, x, y) -> metrics`` in inference mode (``train=False``).

    ``metrics`` holds sums, so batches of any size add up exactly: ``"loss_sum"`` (the batch-mean loss times N),
    ``"correct"`` (integer labels only) and ``"count"`` (N).

    ``input_scaling`` turns integer (uint8) batches into the model's input on the device (see
    :class:`jaxcnn.train.step.InputScaling`). With ``masked``, integer labels ``< 0`` mark padding examples: they
    count nowhere (the loss is then taken example by example, ``loss_fn`` on batches of one).
    """
    return jax.jit(eval_step_function(model, loss_fn=loss_fn, input_scaling=input_scaling, masked=masked))


def eval_step_function(
    model: Layer,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    input_scaling: InputScaling | None = None,
    masked: bool = False,
) -> Callable[[Params, State, jax.Array, jax.Array], Metrics]:
    """The eval step of :func:`make_eval_step` as a plain (not jit-compiled) function."""

    def eval_step(params: Params, model_state: State, x: jax.Array, y: jax.Array) -> Metrics:
        if input_scaling is not None:
            x = input_scaling(x)
        predictions, _ = model.apply(params, model_state, x, train=False)
        if masked:
            return _masked_sums(loss_fn, predictions, y)
        count = x.shape[0]
        metrics = {"loss_sum": loss_fn(predictions, y) * count, "count": jnp.asarray(count, jnp.int32)}
        accuracy = accuracy_of(predictions, y)
        if accuracy is not None:
            metrics["correct"] = jnp.sum(jnp.argmax(predictions, axis=-1) == y, dtype=jnp.int32)
        return metrics

    return eval_step


def _masked_sums(loss_fn: LossFn, predictions: jax.Array, y: jax.Array) -> Metrics:
    """The eval sums over the examples whose integer label is >= 0."""
    keep = y >= 0
    labels = jnp.where(keep, y, 0)
    losses = jax.vmap(lambda p, t: loss_fn(p[None], t[None]))(predictions, labels)
    hits = (jnp.argmax(predictions, axis=-1) == labels) & keep
    return {
        "loss_sum": jnp.sum(jnp.where(keep, losses, 0.0)),
        "count": jnp.sum(keep, dtype=jnp.int32),
        "correct": jnp.sum(hits, dtype=jnp.int32),
    }


def sum_metrics(eval_step: Callable[..., Metrics], params: Params, model_state: State, batched: Any) -> dict:
    """The sums ``eval_step(params, model_state, x, y)`` returns, added over ``batched`` ``(x, y)`` pairs on the
    device and read back once. Raises ValueError on an empty set."""
    totals: dict[str, Any] = {}
    for x_batch, y_batch in batched:
        for name, value in eval_step(params, model_state, x_batch, y_batch).items():
            totals[name] = totals[name] + value if name in totals else value
    if not totals:
        raise ValueError("cannot evaluate on an empty set")
    return jax.device_get(totals)


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
    mesh: Any = None,
    labels_checked: bool = False,
) -> dict[str, float]:
    """Mean loss (and accuracy, for integer labels) of the model over ``(x, y)`` in inference mode.

    Args:
      model, params, model_state: the model and its variables.
      x: inputs ``(N, *input_shape)``; y: targets ``(N, ...)``: for cross-entropy (and any ``(N,)`` integer
        targets), class labels in ``[0, C)`` for the model's C outputs, checked on the host before the first batch.
      batch_size: examples per compiled call (the last batch holds the remainder).
      loss_fn: the loss (the mean over a batch).
      eval_step: a step from :func:`make_eval_step` to reuse (avoids a compile per call).
      mesh: a ``jax.sharding.Mesh`` from :func:`jaxcnn.distributed.data_mesh`: every batch is sharded across its
        devices (``params`` and ``model_state`` replicated on it); None runs on the default device.
      labels_checked: skip the class-label check (a caller that evaluates the same ``y`` again, every epoch).

    Returns:
      ``{"loss": float, "accuracy": float, "count": int}`` (no ``"accuracy"`` for non-integer targets).

    Raises:
      ValueError: class labels that are not integers or lie outside ``[0, C)``, naming the first bad one.
    """
    from jaxcnn.data import batches

    step = eval_step or make_eval_step(model, loss_fn=loss_fn)
    x, y = np.asarray(x), np.asarray(y)
    # class labels: integer targets, or any targets of the default loss (unless a given eval_step brings its own)
    integer_or_default = np.issubdtype(y.dtype, np.integer) or (loss_fn is softmax_cross_entropy and eval_step is None)
    if integer_or_default and not labels_checked:
        check_class_labels(model, params, model_state, x, y)
    if mesh is None:
        batched = batches(x, y, batch_size)
    else:
        from jaxcnn.distributed import sharded_batches

        batched = sharded_batches(x, y, batch_size, mesh)
    totals = sum_metrics(step, params, model_state, batched)
    count = int(totals["count"])
    result: dict[str, Any] = {"loss": float(totals["loss_sum"]) / count, "count": count}
    if "correct" in totals:
        result["accuracy"] = float(totals["correct"]) / count
    return result


def check_class_labels(model: Layer, params: Params, model_state: State, x: np.ndarray, y: np.ndarray) -> None:
    """Raise ValueError unless ``y`` ``(N,)`` holds integer labels in ``[0, C)`` for the model's C outputs,
    C found from the shape of the output for ``x[:1]`` (traced abstractly, nothing runs)."""
    from jaxcnn.data import check_labels

    probe = x[:1].astype(np.float32) if np.issubdtype(x.dtype, np.integer) else x[:1]  # uint8 pixels: scaled in a step
    logits = jax.eval_shape(lambda p, s, xb: model.apply(p, s, xb, train=False)[0], params, model_state, probe)
    check_labels(y, int(logits.shape[-1]))
