"""Poisson sampling for DP-SGD: each step takes every example independently with probability ``q``, padded to a
fixed batch size with a mask, so that the step compiles once and the accountant's Poisson figure is exact.

The loop ``fit`` runs by default shuffles and cuts fixed batches; the privacy accountant's ``"poisson"`` figure is
a proven bound only for Poisson-sampled batches (see :mod:`jaxcnn.train.privacy`). :func:`poisson_batch` draws
one such batch: a boolean inclusion per example from the step's key, the included indices first, then padding
(index 0, mask 0) up to ``max_batch_size``. A DP step given the mask drops the padding from the clipped sum and
divides the noisy sum by the *expected* batch size ``q N``, never by the drawn one (which depends on the data).

The padded size must hold every draw: :func:`padded_batch_size` picks one that a whole run overflows with
probability below ``1e-9`` (the binomial's upper quantile, by a union bound over the steps), and a draw that
still overflows is an error, never a silent truncation (dropping included examples would change the sampling the
accountant assumes).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from scipy.stats import binom

from jaxcnn._validate import is_int

__all__ = ["PoissonBatch", "check_fits", "padded_batch_size", "poisson_batch"]


class PoissonBatch(NamedTuple):
    """One Poisson-sampled batch, padded: ``indices`` ``(B_max,)`` int32 into the training set (the included
    examples in increasing order, then zeros), ``mask`` ``(B_max,)`` bool (True for included examples) and
    ``count``, the number included (a scalar)."""

    indices: jax.Array
    mask: jax.Array
    count: jax.Array


def _check(n: object, sampling_rate: object) -> None:
    if not is_int(n) or n < 1:
        raise ValueError(f"the training set size must be an int >= 1, got {n!r}")
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float)) or not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be a number in (0, 1], got {sampling_rate!r}")


def padded_batch_size(n: int, sampling_rate: float, steps: int, *, failure: float = 1e-9) -> int:
    """The smallest padded batch size ``B`` (a multiple of 8, at most ``n``) such that ``steps`` Poisson draws
    of rate ``q`` from ``n`` examples all fit with probability at least ``1 - failure``.

    The union bound asks every draw to overflow with probability at most ``failure / steps``: ``B`` is the
    binomial ``(n, q)``'s upper quantile there (``scipy.stats.binom.isf``). Digits (n 1437, q 32/1437), 1800
    steps: 80, for batches of mean 32.
    """
    _check(n, sampling_rate)
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0 < failure < 1:
        raise ValueError(f"failure must be a probability in (0, 1), got {failure!r}")
    size = int(binom.isf(failure / steps, n, sampling_rate)) + 1  # P(count >= size) <= failure / steps
    return min(n, 8 * math.ceil(size / 8))


def poisson_batch(key: jax.Array, n: int, *, sampling_rate: float, max_batch_size: int) -> PoissonBatch:
    """Draw one Poisson-sampled batch of the ``n`` training examples, padded to ``max_batch_size``.

    Args:
      key: the step's key (a JAX random key); the same key gives the same batch.
      n: the training set's size.
      sampling_rate: ``q`` in (0, 1], each example's inclusion probability.
      max_batch_size: the padded size ``B_max`` (see :func:`padded_batch_size`).

    Returns:
      A :class:`PoissonBatch`. Traceable (``jax.jit`` it with ``n``, ``sampling_rate`` and ``max_batch_size``
      static); whether ``count`` exceeds ``max_batch_size`` is for the caller to check on the host
      (:func:`check_fits`).
    """
    _check(n, sampling_rate)
    if not is_int(max_batch_size) or not 1 <= max_batch_size <= n:
        raise ValueError(f"max_batch_size must be an int in [1, {n}], got {max_batch_size!r}")
    include = jax.random.bernoulli(key, sampling_rate, (n,))
    (indices,) = jnp.nonzero(include, size=max_batch_size, fill_value=0)
    count = jnp.sum(include, dtype=jnp.int32)
    mask = jnp.arange(max_batch_size) < count
    return PoissonBatch(indices.astype(jnp.int32), mask, count)


def check_fits(batch: PoissonBatch, max_batch_size: int) -> None:
    """ValueError in one line when the draw included more examples than the padded batch holds."""
    count = int(batch.count)
    if count > max_batch_size:
        raise ValueError(
            f"a Poisson batch drew {count} examples, more than the padded batch size {max_batch_size}; "
            "raise the padded size (padded_batch_size with a smaller failure probability)"
        )
