"""Ensembles: K models trained at once in one vmapped, jit-compiled step, and evaluated by their mean probabilities.

:func:`create_ensemble_state` stacks K train states (K seeds) along a leading axis;
:func:`make_ensemble_train_step` trains all K in one step (optionally with a learning rate per member);
:func:`ensemble_predictions` averages the members' probabilities and :func:`evaluate_ensemble` scores them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnn._step_jit import jit_train_step
from jaxcnn._validate import is_int
from jaxcnn.data import ahead, batches, epoch_order, num_batches
from jaxcnn.functional import softmax_cross_entropy
from jaxcnn.nn.layer import Layer, Params, Shape, State
from jaxcnn.train.evaluate import check_class_labels, sum_metrics
from jaxcnn.train.state import TrainState, create_train_state
from jaxcnn.train.step import InputScaling, LossFn, Metrics, StepOptions, train_step_function

__all__ = [
    "create_ensemble_state",
    "ensemble_batches",
    "ensemble_predictions",
    "evaluate_ensemble",
    "make_ensemble_eval_step",
    "make_ensemble_train_step",
]


def _ensemble_keys(keys: Any) -> jax.Array:
    if isinstance(keys, int) and not isinstance(keys, bool):
        raise ValueError("create_ensemble_state takes K keys or K seeds (a list), not a single int")
    if isinstance(keys, (list, tuple)) and keys and all(is_int(k) for k in keys):
        if any(not 0 <= int(k) < 2**32 for k in keys):
            raise ValueError(f"ensemble seeds must be ints in [0, 2**32), got {list(keys)}")
        return jnp.stack([jax.random.key(int(k)) for k in keys])
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        if keys.ndim != 2 or keys.dtype != jnp.uint32:
            raise ValueError(f"ensemble keys must be K typed keys, K raw uint32[2] keys or K seeds, got {keys.shape}")
        keys = jax.random.wrap_key_data(keys)
    if keys.ndim != 1 or keys.shape[0] < 1:
        raise ValueError(f"ensemble keys need shape (K,) with K >= 1, got {tuple(keys.shape)}")
    return keys


def create_ensemble_state(
    model: Layer,
    optimizer: optax.GradientTransformation,
    keys: Any,
    input_shape: Shape,
    *,
    dtype: Any = jnp.float32,
) -> TrainState:
    """K train states stacked along a leading axis, member ``k`` exactly ``create_train_state(..., keys[k], ...)``.

    Args:
      model, optimizer, input_shape, dtype: as for :func:`jaxcnn.train.create_train_state`.
      keys: K random keys (typed ``(K,)`` or raw ``(K, 2)``), or a list of K integer seeds (member ``k`` then
        equals a single run with ``jax.random.key(seeds[k])``).

    Returns:
      A :class:`TrainState` whose every leaf has a leading axis of K (``step`` is ``(K,)``).
    """
    keys = _ensemble_keys(keys)
    return jax.vmap(lambda k: create_train_state(model, optimizer, k, input_shape, dtype=dtype))(keys)


def make_ensemble_train_step(
    model: Layer,
    options: StepOptions | None = None,
    *,
    lr_scales: Sequence[float] | jax.Array | None = None,
    shared_batch: bool = False,
    **fields: Any,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """A jit-compiled ``step(states, x, y) -> (new_states, metrics)`` training K models at once (``jax.vmap`` of
    the ordinary train step over the members; buffers donated; each member's optimizer is ``states.tx``).

    Args:
      model: any :class:`jaxcnn.nn.Layer`.
      options: a :class:`jaxcnn.train.StepOptions`, its fields also as keywords (``gradients="manual"``), as for
        :func:`jaxcnn.train.make_train_step`.
      lr_scales: K factors; member ``k``'s updates are multiplied by ``lr_scales[k]``, i.e. it trains with the
        optimizer's learning rate (schedule included) times ``lr_scales[k]``. Build the optimizer with learning
        rate 1.0 to give the K rates directly. None: every member uses the optimizer's rate.
      shared_batch: every member trains on the same batch, ``x (N, ...)``; otherwise each has its own,
        ``x (K, N, ...)`` and ``y (K, N, ...)`` (member ``k`` then equals a separate run fed ``x[k]``).

    Returns:
      The step; ``states`` come from :func:`create_ensemble_state`; every metric has a leading axis of K.
    """
    step = train_step_function(model, StepOptions.of(options, **fields))
    batch_axis = None if shared_batch else 0
    if lr_scales is None:
        members = jax.vmap(step, in_axes=(0, batch_axis, batch_axis))
        return jit_train_step(members, donate_argnums=0)
    scales = np.asarray(lr_scales, dtype=np.float64)
    if scales.ndim != 1 or scales.size < 1 or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise ValueError(f"lr_scales must be K finite positive numbers, got {lr_scales!r}")
    scales = jnp.asarray(scales, jnp.float32)
    members = jax.vmap(step, in_axes=(0, batch_axis, batch_axis, 0))

    def scaled(states, x, y):
        if states.step.shape != scales.shape:
            raise ValueError(f"the ensemble has {states.step.shape[0]} members but lr_scales has {scales.shape[0]}")
        return members(states, x, y, scales)

    return jit_train_step(scaled, donate_argnums=0)


def ensemble_predictions(model: Layer, params: Params, state: State, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The members' class probabilities and the ensemble's: ``(member_probs (K, N, C), mean_probs (N, C))``.

    ``params`` and ``state`` carry a leading member axis (from :func:`create_ensemble_state`); the members run in
    inference mode and their softmax probabilities are averaged.
    """
    apply = lambda p, s: model.apply(p, s, x, train=False)[0]  # noqa: E731
    logits = jax.vmap(apply)(params, state)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs, jnp.mean(probs, axis=0)


def make_ensemble_eval_step(
    model: Layer, *, loss_fn: LossFn = softmax_cross_entropy, input_scaling: InputScaling | None = None
) -> Callable[..., Metrics]:
    """A jit-compiled ``eval_step(params, state, x, y) -> sums`` for an ensemble (leading member axis) and a
    shared batch, in inference mode (``input_scaling`` turns uint8 batches into the model's input).

    ``sums``: ``"member_loss_sum"`` and ``"member_correct"`` (each ``(K,)``: every member on its own),
    ``"loss_sum"`` (the ensemble's negative log-likelihood of the mean probabilities, summed), ``"correct"``
    (the ensemble's argmax hits) and ``"count"``. Integer labels only.
    """

    def eval_step(params: Params, state: State, x: jax.Array, y: jax.Array) -> Metrics:
        if input_scaling is not None:
            x = input_scaling(x)
        logits = jax.vmap(lambda p, s: model.apply(p, s, x, train=False)[0])(params, state)
        count = x.shape[0]
        member_loss = jax.vmap(lambda out: loss_fn(out, y))(logits) * count
        probs = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=0)
        picked = jnp.take_along_axis(probs, y[:, None].astype(jnp.int32), axis=-1)[:, 0]
        tiny = jnp.finfo(probs.dtype).tiny
        return {
            "member_loss_sum": member_loss,
            "member_correct": jnp.sum(jnp.argmax(logits, axis=-1) == y[None], axis=-1, dtype=jnp.int32),
            "loss_sum": -jnp.sum(jnp.log(jnp.maximum(picked, tiny))),
            "correct": jnp.sum(jnp.argmax(probs, axis=-1) == y, dtype=jnp.int32),
            "count": jnp.asarray(count, jnp.int32),
        }

    return jax.jit(eval_step)


def evaluate_ensemble(
    model: Layer,
    params: Params,
    state: State,
    x: Any,
    y: Any,
    *,
    batch_size: int = 256,
    eval_step: Callable[..., Metrics] | None = None,
) -> dict[str, Any]:
    """The ensemble's and each member's test loss and accuracy over ``(x, y)`` (integer labels).

    Returns:
      ``{"loss", "accuracy", "count", "members": [{"loss", "accuracy"}, ...]}``: the ensemble predicts with the
      mean of its members' softmax probabilities (its loss is the negative log-likelihood of that mean).
    """
    step = eval_step or make_ensemble_eval_step(model)
    x, y = np.asarray(x), np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"an ensemble is evaluated on integer class labels, got {y.dtype}")
    check_class_labels(model, jax.tree.map(lambda a: a[0], params), jax.tree.map(lambda a: a[0], state), x, y)
    totals = sum_metrics(step, params, state, batches(x, y, batch_size))
    count = int(totals["count"])
    members = [
        {"loss": float(loss) / count, "accuracy": float(correct) / count}
        for loss, correct in zip(totals["member_loss_sum"], totals["member_correct"], strict=True)
    ]
    return {
        "loss": float(totals["loss_sum"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "count": count,
        "members": members,
    }


def ensemble_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, keys: Sequence[jax.Array], *, prefetch: int = 2
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """One epoch for K members, each in its own order: batches ``(K, b, ...)`` where member ``k``'s rows are
    those :func:`jaxcnn.data.batches` gives a single run with ``key=keys[k]`` (so member ``k`` sees exactly
    the batches of that run)."""
    num_batches(len(x), batch_size)
    orders = np.stack([epoch_order(key, len(x)) for key in keys])
    starts = range(0, orders.shape[1], batch_size)
    placed = ((jax.device_put(x[i]), jax.device_put(y[i])) for i in (orders[:, s : s + batch_size] for s in starts))
    return ahead(placed, prefetch)
