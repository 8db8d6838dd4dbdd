"""Per-example gradients (``jax.vmap`` over the batch) and DP-SGD.

:func:`per_example_grads` gives every example's gradient (a leading batch axis), in the "autodiff", "manual" or
"engine" gradient mode (:func:`jaxcnn.backprop.loss_and_grads`); :func:`per_example_norms`,
:func:`gradient_variance` and :func:`gradient_noise_scale` summarise them; :func:`clip_per_example`,
:func:`dp_optimizer` and :func:`make_dp_train_step` make DP-SGD (per-example clipping and Gaussian noise
through optax's ``differentially_private_aggregate``).

This module depends on :mod:`jaxcnn.train` one way only. Ensembles moved to :mod:`jaxcnn.train.ensemble`,
meshes and ``jax.distributed`` to :mod:`jaxcnn.distributed` and the mesh-compiled steps to
:mod:`jaxcnn.train.data_parallel`; their names are still importable from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxcnn import backprop
from jaxcnn._step_jit import jit_train_step
from jaxcnn.functional import softmax_cross_entropy
from jaxcnn.nn.layer import Layer, Params, State
from jaxcnn.train.dp import check_dp, check_independent
from jaxcnn.train.dp import make_dp_train_step as dp_step
from jaxcnn.train.state import TrainState, as_typed_key
from jaxcnn.train.step import LossFn, Metrics, accuracy_of

# modules whose public names (their __all__) moved out of here and are still importable from here
_MOVED_TO = ("jaxcnn.distributed", "jaxcnn.train.ensemble", "jaxcnn.train.data_parallel")

__all__ = [
    "clip_per_example",
    "dp_optimizer",
    "gradient_noise_scale",
    "gradient_variance",
    "make_dp_train_step",
    "per_example_grads",
    "per_example_loss_and_grads",
    "per_example_norms",
]


# -- per-example gradients -------------------------------------------------------------------------------------


def _check_batch(x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same leading batch size, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("per-example gradients need at least one example, got an empty batch")
    return x, y


def _one_example_fn(model: Layer, loss_fn: LossFn, gradients: str, train: bool) -> Callable:
    """``f(params, state, x1, y1, key) -> ReversePass`` for a batch of one, in the given gradient mode."""
    run = backprop.loss_and_grads(model, loss_fn, gradients=gradients, train=train)
    return lambda params, state, x, y, key: run(params, state, x, y, key=key)


def per_example_loss_and_grads(
    model: Layer, loss_fn: LossFn, params: Params, state: State, x: jax.Array, y: jax.Array, **options: Any
) -> tuple[jax.Array, Params]:
    """Every example's loss and gradient: ``(losses (N,), grads)``, each grads leaf ``(N, *param.shape)``.

    Example ``i`` is run as a batch of one, ``loss_fn(model(x[i:i+1]), y[i:i+1])``, with ``jax.vmap`` over the
    batch; the arguments and keyword ``options`` (``gradients``, ``key``, ``train``) are those of
    :func:`per_example_grads`.
    """
    return _per_example(model, loss_fn, params, state, x, y, **options)


def _per_example(
    model, loss_fn, params, state, x, y, *, gradients: str = "autodiff", key: Any = None, train: bool = True
) -> tuple[jax.Array, Params]:
    x, y = _check_batch(x, y)
    one = _one_example_fn(model, loss_fn, gradients, train)
    keys = None if key is None else jax.random.split(as_typed_key(key), x.shape[0])

    def example(xi, yi, ki):
        result = one(params, state, xi[None], yi[None], ki)
        return result.loss, result.grads

    return jax.vmap(example, in_axes=(0, 0, None if keys is None else 0))(x, y, keys)


def per_example_grads(
    model: Layer,
    loss_fn: LossFn,
    params: Params,
    state: State,
    x: jax.Array,
    y: jax.Array,
    *,
    gradients: str = "autodiff",
    key: jax.Array | None = None,
    train: bool = True,
) -> Params:
    """The gradient of the loss of every example separately, by ``jax.vmap``: a pytree shaped like ``params``
    with a leading batch axis (leaf ``(N, *param.shape)``).

    ``grads[i]`` is the gradient of ``loss_fn(model(x[i:i+1]), y[i:i+1])``: example ``i`` run as a batch of one.
    For a loss that averages over the batch (the built-in ones do) and a model whose examples do not interact,
    the mean over the batch axis is the batch gradient.

    Args:
      model: any :class:`jaxcnn.nn.Layer`.
      loss_fn: ``loss_fn(predictions, targets) -> scalar`` (for "manual" and "engine" it needs a hand-derived VJP
        registered in :mod:`jaxcnn.functional`; the built-in losses have one).
      params, state: the model's variables.
      x: inputs ``(N, *input_shape)``; y: targets ``(N, ...)`` (``(N,)`` integer labels for cross-entropy).
      gradients: ``"autodiff"`` (``jax.grad``), ``"manual"`` (the hand-derived rules through ``jax.custom_vjp``)
        or ``"engine"`` (the explicit reverse pass).
      key: the random key of dropout; example ``i`` draws from ``jax.random.split(key, N)[i]``.
      train: the mode the forward runs in. In training mode BatchNorm normalises each example with its own
        statistics (a batch of one), so for a model with BatchNorm the mean of the per-example gradients is not
        the batch gradient; ``train=False`` uses the running statistics instead.

    Returns:
      The gradients, each leaf ``(N, *param.shape)`` in the parameter's dtype.
    """
    return _per_example(model, loss_fn, params, state, x, y, gradients=gradients, key=key, train=train)[1]


def per_example_norms(grads: Params) -> jax.Array:
    """The global L2 norm of each example's gradient: ``(N,)`` from per-example grads (leaves ``(N, ...)``)."""
    leaves = jax.tree.leaves(grads)
    if not leaves:
        raise ValueError("per_example_norms needs a non-empty gradient tree")
    squares = [jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves]
    return jnp.sqrt(sum(squares))


def gradient_variance(grads: Params, *, ddof: int = 0) -> Params:
    """The variance of every gradient entry across the batch: a tree shaped like ``params``.

    Args:
      grads: per-example gradients, leaves ``(N, *param.shape)`` (from :func:`per_example_grads`).
      ddof: 0 for the population variance, 1 for the unbiased estimate (needs N >= 2).
    """
    count = jax.tree.leaves(grads)[0].shape[0]
    if ddof not in (0, 1) or count - ddof < 1:
        raise ValueError(
            f"gradient_variance needs ddof 0 or 1 and more than ddof examples, got ddof {ddof!r}, N {count}"
        )
    return jax.tree.map(lambda g: jnp.var(g, axis=0, ddof=ddof), grads)


def gradient_noise_scale(grads: Params) -> dict[str, jax.Array]:
    """How noisy a batch's gradient is, from its per-example gradients (leaves ``(N, ...)``, N >= 2).

    Returns scalars: ``"mean_norm"`` (the norm of the batch gradient), ``"total_variance"`` (the trace of the
    per-example covariance, unbiased: the summed :func:`gradient_variance` with ``ddof=1``) and
    ``"noise_scale"``, their ratio ``total_variance / mean_norm**2``: McCandlish et al.'s simple noise scale, the
    batch size around which larger batches stop paying off.
    """
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
    mean_norm = jnp.sqrt(sum(jnp.sum(jnp.square(m)) for m in jax.tree.leaves(mean)))
    total = sum(jnp.sum(v) for v in jax.tree.leaves(gradient_variance(grads, ddof=1)))
    return {"mean_norm": mean_norm, "total_variance": total, "noise_scale": total / jnp.square(mean_norm)}


# -- DP-SGD ----------------------------------------------------------------------------------------------------


def _check_clip(l2_norm_clip: Any, noise_multiplier: Any = 0.0) -> None:
    check_dp(l2_norm_clip, noise_multiplier)


def clip_per_example(grads: Params, l2_norm_clip: float) -> Params:
    """Per-example gradients each scaled to a global L2 norm of at most ``l2_norm_clip``.

    Example ``i`` is multiplied by ``min(1, l2_norm_clip / ||g_i||)`` (a zero gradient stays zero); leaves keep
    their ``(N, *param.shape)`` shape. The same clipping as optax's ``differentially_private_aggregate``.
    """
    _check_clip(l2_norm_clip)
    norms = per_example_norms(grads)
    factors = jnp.minimum(1.0, l2_norm_clip / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))

    def scale(g):
        return (g * factors.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)).astype(g.dtype)

    return jax.tree.map(scale, grads)


def dp_optimizer(
    optimizer: optax.GradientTransformation, *, l2_norm_clip: float, noise_multiplier: float, key: jax.Array
) -> optax.GradientTransformation:
    """``optimizer`` behind optax's DP-SGD aggregation: it takes per-example gradients (leading batch axis),
    clips each to ``l2_norm_clip``, sums them, adds Gaussian noise of standard deviation ``l2_norm_clip *
    noise_multiplier`` and divides by the batch size, then hands the result to ``optimizer``.

    ``key`` seeds the noise (kept, and advanced every step, in the optimizer state).
    """
    _check_clip(l2_norm_clip, noise_multiplier)
    aggregate = optax.contrib.differentially_private_aggregate(l2_norm_clip, noise_multiplier, as_typed_key(key))
    return optax.chain(aggregate, optimizer)


def make_dp_train_step(
    model: Layer,
    optimizer: optax.GradientTransformation | None = None,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    gradients: str | None = None,
    l2_norm_clip: float | None = None,
    noise_multiplier: float | None = None,
    method: str = "ghost",
    **options: Any,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """A jit-compiled DP-SGD ``step(state, x, y) -> (new_state, metrics)``.

    With ``noise_multiplier`` given, this is :func:`jaxcnn.train.dp.make_dp_train_step`: the step clips every
    example's gradient to ``l2_norm_clip`` (by per-layer ghost norms from the hand rules, ``method="ghost"``,
    or from ``jax.vmap``-ed per-example gradients, ``method="vmap"``), adds the noise and hands the mean to the
    state's plain optax optimizer; ``options`` go there (``norm_method``, ``batch_size``, ``input_scaling``,
    ``augmentation``), and its ``step`` also takes a ``mask``.

    Without ``noise_multiplier`` (v0.1's form): the per-example gradients (:func:`per_example_grads`, in mode
    ``gradients``, default ``"autodiff"``) go to the state's optimizer, which must aggregate them: create the
    state with one from :func:`dp_optimizer`. Example ``i`` of step ``s`` draws its dropout from
    ``split(fold_in(state.key, s), N)[i]``; ``metrics`` as in the form above, ``"clipped"`` only with
    ``l2_norm_clip`` given.

    A model with running statistics (BatchNorm) is refused by both: its examples are not independent, so
    per-example clipping would not bound them.
    """
    if noise_multiplier is not None or optimizer is not None:
        if l2_norm_clip is None or noise_multiplier is None:
            raise ValueError("make_dp_train_step needs both l2_norm_clip and noise_multiplier")
        return dp_step(
            model, optimizer, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier, method=method,
            gradients=gradients, loss_fn=loss_fn, **options,
        )  # fmt: skip
    if options:
        raise ValueError(f"{sorted(options)} need noise_multiplier (the DP step that clips and noises itself)")
    one = _one_example_fn(model, loss_fn, gradients or "autodiff", train=True)

    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, Metrics]:
        check_independent(state.model_state)
        key = jax.random.fold_in(state.key, state.step)
        keys = jax.random.split(key, x.shape[0])
        example = lambda xi, yi, ki: one(state.params, state.model_state, xi[None], yi[None], ki)  # noqa: E731
        result = jax.vmap(example)(x, y, keys)
        losses, grads = result.loss, result.grads
        predictions = result.predictions[:, 0]  # each example's own output, from the same forward passes
        norms = per_example_norms(grads)
        metrics = {"loss": jnp.mean(losses), "count": jnp.asarray(x.shape[0], jnp.int32), "grad_norm": jnp.mean(norms)}
        if l2_norm_clip is not None:
            metrics["clipped"] = jnp.mean(norms > l2_norm_clip, dtype=jnp.float32)
        accuracy = accuracy_of(predictions, y)
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        return state.apply_gradients(grads=grads), metrics

    return jit_train_step(step, donate_argnums=0)


def __getattr__(name: str) -> Any:
    for module in map(importlib.import_module, _MOVED_TO):
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module 'jaxcnn.parallel' has no attribute {name!r}")
