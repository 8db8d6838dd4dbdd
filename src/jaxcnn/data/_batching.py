"""Minibatches: the shuffled order of an epoch, and an iterator that transfers batches ahead of their use."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jaxcnn.data._dataset import DataError


def _check_count(what: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DataError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def num_batches(n: int, batch_size: int) -> int:
    """The number of batches in an epoch of ``n`` examples: ``ceil(n / batch_size)``.

    The last, partial batch counts (see :func:`batches`).

    Raises:
        DataError: ``n < 0`` or ``batch_size < 1``.
    """
    n = _check_count("n", n, 0)
    batch_size = _check_count("batch_size", batch_size, 1)
    return -(-n // batch_size)


def epoch_order(key: jax.Array, n: int) -> np.ndarray:
    """The shuffled order of one epoch: a permutation of ``0 .. n-1``, the same for the same key.

    Args:
        key: A JAX PRNG key (typed, from ``jax.random.key``, or a raw ``uint32[2]`` one).
        n: The number of examples.

    Returns:
        ``(n,)`` integer NumPy array, ``np.asarray(jax.random.permutation(key, n))``.
    """
    return np.asarray(jax.random.permutation(key, _check_count("n", n, 0)))


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    key: jax.Array | None = None,
    prefetch: int = 2,
    device: Any = None,
    skip: int = 0,
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Iterates over one epoch in minibatches placed on a device.

    The order is :func:`epoch_order` ``(key, n)``, or ``0 .. n-1`` when ``key`` is None; the last batch
    holds the remaining ``n % batch_size`` examples when that is not 0, so there are :func:`num_batches`
    batches and every example appears exactly once. Each batch is gathered on the host (NumPy fancy
    indexing) and sent with ``jax.device_put``, which is asynchronous: up to ``prefetch`` batches are sent
    ahead of the one being consumed, so that their copies overlap the work on the current one.

    The arguments are checked when this is called, not at the first ``next``.

    Args:
        x: Inputs ``(n, ...)``, e.g. images ``(n, H, W, C)``.
        y: Targets ``(n, ...)``, e.g. labels ``(n,)``.
        batch_size: Examples per batch, at least 1.
        key: PRNG key of the shuffle, or None for the natural order.
        prefetch: Batches transferred ahead (0: each is sent only when asked for).
        device: Where to put the batches (a ``jax.Device`` or ``Sharding``); None for the default device.
        skip: Leave out the epoch's first ``skip`` batches (a run resumed mid-epoch); nothing of them is gathered.

    Yields:
        ``(x_batch, y_batch)`` as ``jax.Array``: ``(b, ...)`` each, ``b = batch_size`` except perhaps last.

    Raises:
        DataError: ``batch_size < 1``, ``prefetch < 0``, ``skip < 0``, or ``x`` and ``y`` of different lengths.
    """
    batch_size = _check_count("batch_size", batch_size, 1)
    prefetch = _check_count("prefetch", prefetch, 0)
    skip = _check_count("skip", skip, 0)
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise DataError(f"batches: x has shape {x.shape} but y has shape {y.shape}; they need the same length")
    order = np.arange(len(x)) if key is None else epoch_order(key, len(x))
    return _prefetched(x, y, order[skip * batch_size :], batch_size, prefetch, device)


def _prefetched(
    x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int, prefetch: int, device: Any
) -> Iterator[tuple[jax.Array, jax.Array]]:
    indices = (order[start : start + batch_size] for start in range(0, len(order), batch_size))
    return ahead(((jax.device_put(x[i], device), jax.device_put(y[i], device)) for i in indices), prefetch)


def ahead(placed: Iterator[Any], prefetch: int) -> Iterator[Any]:
    """Consume ``placed`` (batches whose transfers start when they are produced) up to ``prefetch`` items ahead
    of the one being yielded, so that their copies overlap the work on the current one."""
    queue: deque[Any] = deque()
    for batch in placed:
        queue.append(batch)
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
