"""Losses (scalar, mean over the batch) and their hand-derived VJPs ``NAME_vjp(predictions, targets, dy=1.0)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.functional._registry import register


def _check_labels(op: str, logits: jax.Array, labels: jax.Array) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{op}: `logits` must have rank 2 (N, classes), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"{op}: `labels` must be integer class indices of shape ({logits.shape[0]},), "
            f"got shape {tuple(labels.shape)}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{op}: `labels` must be integer class indices, got dtype {labels.dtype}")
    try:  # concrete labels are range-checked; traced ones (inside jit or vmap) cannot be
        values = np.asarray(labels)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if values.size and (values.min() < 0 or values.max() >= logits.shape[1]):
        raise ValueError(
            f"{op}: `labels` must lie in [0, {logits.shape[1]}), got values from {values.min()} to {values.max()}"
        )


def log_softmax(logits: jax.Array) -> jax.Array:
    """Log-probabilities along the last axis, shifted by the max for stability; shape of ``logits``."""
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy between ``softmax(logits)`` and integer labels.

    Args:
      logits: ``(N, classes)``.
      labels: integer class indices ``(N,)``, each in ``[0, classes)`` (checked when the labels are concrete;
        inside ``jit`` an out-of-range label gives an undefined loss).

    Returns:
      A scalar: ``-mean_n log softmax(logits_n)[labels_n]``.
    """
    _check_labels("softmax_cross_entropy", logits, labels)
    picked = jnp.take_along_axis(log_softmax(logits), labels[:, None], axis=1)
    return -jnp.mean(picked)


def softmax_cross_entropy_vjp(
    logits: jax.Array, labels: jax.Array, dy: jax.Array | float = 1.0
) -> tuple[jax.Array, None]:
    """Hand-derived VJP of :func:`softmax_cross_entropy`: ``(dlogits, None)``.

    Args:
      logits, labels: as in the forward; dy: the cotangent of the (scalar) loss, 1 by default.

    Returns:
      ``dlogits`` ``(N, classes)`` and None for the integer ``labels`` (not differentiable).
    """
    _check_labels("softmax_cross_entropy_vjp", logits, labels)
    # loss = -(1/N) sum_n (z_{n,y_n} - logsumexp(z_n)), and d logsumexp(z)/dz = softmax(z), so
    # dloss/dz_n = (softmax(z_n) - onehot(y_n)) / N.
    probs = jnp.exp(log_softmax(logits))
    onehot = (labels[:, None] == jnp.arange(logits.shape[1])[None, :]).astype(logits.dtype)
    return (probs - onehot) * (jnp.asarray(dy, logits.dtype) / logits.shape[0]), None


def _check_same_shape(op: str, predictions: jax.Array, targets: jax.Array) -> None:
    if predictions.shape != targets.shape:
        raise ValueError(
            f"{op}: `predictions` {tuple(predictions.shape)} and `targets` {tuple(targets.shape)} must have the same "
            "shape"
        )


def mean_squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over every element of ``(predictions - targets) ** 2``; both of the same shape. Returns a scalar."""
    _check_same_shape("mean_squared_error", predictions, targets)
    return jnp.mean((predictions - targets) ** 2)


def mean_squared_error_vjp(
    predictions: jax.Array, targets: jax.Array, dy: jax.Array | float = 1.0
) -> tuple[jax.Array, jax.Array | None]:
    """Hand-derived VJP of :func:`mean_squared_error`: ``(dpredictions, dtargets)``.

    Args:
      predictions, targets: as in the forward; dy: the cotangent of the (scalar) loss, 1 by default.

    Returns:
      ``dpredictions`` (shape of ``predictions``) and ``dtargets = -dpredictions`` in the dtype of ``targets``
      (the loss depends on their difference only); None for integer targets.
    """
    _check_same_shape("mean_squared_error_vjp", predictions, targets)
    # loss = (1/M) sum (p - t)^2 over all M elements, so dloss/dp = 2 (p - t) / M = -dloss/dt.
    dpredictions = (predictions - targets) * (2 * jnp.asarray(dy, predictions.dtype) / predictions.size)
    exact = jnp.issubdtype(targets.dtype, jnp.inexact)
    return dpredictions, (-dpredictions).astype(targets.dtype) if exact else None


register(softmax_cross_entropy, softmax_cross_entropy_vjp, differentiable=(0,))
register(mean_squared_error, mean_squared_error_vjp)
