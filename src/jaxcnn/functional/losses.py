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


def _check_smoothing(op: str, label_smoothing: float) -> float:
    good = isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, bool)
    if not good or not 0 <= label_smoothing < 1:
        raise ValueError(f"{op}: `label_smoothing` must be a number in [0, 1), got {label_smoothing!r}")
    return float(label_smoothing)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy between ``softmax(logits)`` and integer labels, optionally smoothed.

    Args:
      logits: ``(N, classes)``.
      labels: integer class indices ``(N,)``, each in ``[0, classes)`` (checked when the labels are concrete;
        inside ``jit`` an out-of-range label gives an undefined loss).
      label_smoothing: ``e`` in [0, 1), a Python number: the target of example ``n`` is
        ``(1 - e) onehot(labels_n) + e / classes`` instead of the one-hot vector (Szegedy et al. 2016); 0 is plain
        cross-entropy.

    Returns:
      A scalar: ``-mean_n sum_k target_{n,k} log softmax(logits_n)_k``, which for ``e = 0`` is
      ``-mean_n log softmax(logits_n)[labels_n]``.
    """
    _check_labels("softmax_cross_entropy", logits, labels)
    e = _check_smoothing("softmax_cross_entropy", label_smoothing)
    log_probs = log_softmax(logits)
    picked = jnp.take_along_axis(log_probs, labels[:, None], axis=1)
    if e == 0:
        return -jnp.mean(picked)
    # sum_k target_k log p_k = (1 - e) log p_y + (e / K) sum_k log p_k
    uniform = jnp.mean(log_probs, axis=1, keepdims=True)
    return -jnp.mean((1 - e) * picked + e * uniform)


def softmax_cross_entropy_vjp(
    logits: jax.Array, labels: jax.Array, dy: jax.Array | float = 1.0, *, label_smoothing: float = 0.0
) -> tuple[jax.Array, None]:
    """Hand-derived VJP of :func:`softmax_cross_entropy`: ``(dlogits, None)``.

    Args:
      logits, labels, label_smoothing: as in the forward; dy: the cotangent of the (scalar) loss, 1 by default.

    Returns:
      ``dlogits`` ``(N, classes)`` and None for the integer ``labels`` (not differentiable).
    """
    _check_labels("softmax_cross_entropy_vjp", logits, labels)
    e = _check_smoothing("softmax_cross_entropy_vjp", label_smoothing)
    # loss = -(1/N) sum_n sum_k t_{n,k} (z_{n,k} - logsumexp(z_n)) with targets t summing to 1 per example, and
    # d logsumexp(z)/dz = softmax(z), so dloss/dz_n = (softmax(z_n) - t_n) / N; t_n = (1 - e) onehot(y_n) + e / K.
    probs = jnp.exp(log_softmax(logits))
    targets = (labels[:, None] == jnp.arange(logits.shape[1])[None, :]).astype(logits.dtype)
    if e != 0:
        targets = (1 - e) * targets + e / logits.shape[1]
    return (probs - targets) * (jnp.asarray(dy, logits.dtype) / logits.shape[0]), None


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
