"""Inverted dropout, bit for bit as ``flax.linen.Dropout``, and its hand-derived backward rule.

``rate`` is the probability of *dropping* a cell. With ``keep = 1 - rate``, the mask is
``jax.random.bernoulli(key, keep, x.shape)`` and ``y = where(mask, x / keep, 0)``, so ``E[y] = x``. As in Flax,
``rate == 0`` returns ``x`` unchanged and ``rate == 1`` returns zeros, neither drawing random numbers (``key``
may then be None). The backward rule regenerates the same mask from the same key, so nothing but the key has
to be kept between the passes (or save :func:`dropout_mask` and apply it directly).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn._validate import is_int
from jaxcnn.functional._registry import register


def _check_rate(op: str, rate: object) -> float:
    """``rate`` as a Python float in ``[0, 1]``; ValueError naming it otherwise (it must be concrete)."""
    if isinstance(rate, (bool, np.bool_, str)):
        raise ValueError(f"{op}: `rate` must be a float in [0, 1], got {rate!r}")
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: `rate` must be a concrete float in [0, 1] (not traced), got {rate!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{op}: `rate` must be in [0, 1] (the probability of dropping), got {rate!r}")
    return value


def _check_key(op: str, key: object, rate: float) -> None:
    """A single JAX PRNG key (typed ``jax.random.key`` or raw ``jax.random.PRNGKey``); None only when unused."""
    if key is None:
        if 0.0 < rate < 1.0:
            raise ValueError(f"{op}: `key` is required for 0 < rate < 1, got None (rate={rate})")
        return
    dtype, shape = getattr(key, "dtype", None), tuple(getattr(key, "shape", ()))
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(f"{op}: `key` must be a single PRNG key, got a key array of shape {shape}")
        return
    if dtype != np.uint32 or len(shape) != 1:
        described = f"array of dtype {dtype} and shape {shape}" if dtype is not None else repr(key)
        raise ValueError(f"{op}: `key` must be a JAX PRNG key (jax.random.key or jax.random.PRNGKey), got {described}")


def dropout_mask(x_shape: Sequence[int], rate: float, key: jax.Array | None) -> jax.Array:
    """The keep mask :func:`dropout` applies: boolean, ``x_shape``, True where the cell is kept.

    Args:
      x_shape: shape of the input.
      rate: probability of dropping a cell, in ``[0, 1]``.
      key: JAX PRNG key (may be None when ``rate`` is 0 or 1: all True / all False).
    """
    rate = _check_rate("dropout_mask", rate)
    _check_key("dropout_mask", key, rate)
    if not all(is_int(n) and int(n) >= 0 for n in x_shape):
        raise ValueError(f"dropout_mask: `x_shape` must be a sequence of non-negative ints, got {x_shape!r}")
    shape = tuple(int(n) for n in x_shape)
    if rate == 0.0:
        return jnp.ones(shape, bool)
    if rate == 1.0:
        return jnp.zeros(shape, bool)
    return jax.random.bernoulli(key, p=1.0 - rate, shape=shape)


def _check_x(op: str, x: jax.Array) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        raise ValueError(f"{op}: `x` must be a floating-point array, got dtype {jnp.result_type(x)}")


def dropout(x: jax.Array, rate: float, key: jax.Array | None = None) -> jax.Array:
    """Inverted dropout (training mode), identical to ``flax.linen.Dropout(rate)(x, deterministic=False)``.

    Args:
      x: input, any shape, floating point.
      rate: probability of dropping a cell (*not* the keep rate), a concrete float in ``[0, 1]``.
      key: JAX PRNG key (Flax's ``"dropout"`` rng); may be None when ``rate`` is 0 or 1.

    Returns:
      ``where(mask, x / (1 - rate), 0)``, shape and dtype of ``x``; ``x`` itself for ``rate == 0``, zeros for
      ``rate == 1``.
    """
    rate = _check_rate("dropout", rate)
    _check_key("dropout", key, rate)
    _check_x("dropout", x)
    if rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, p=keep, shape=x.shape)
    return lax.select(mask, x / keep, jnp.zeros_like(x))


def dropout_vjp(x: jax.Array, dy: jax.Array, *, rate: float, key: jax.Array | None = None) -> jax.Array:
    """``dx`` of :func:`dropout` for the same ``rate`` and ``key``: shape and dtype of ``x``.

    Args:
      x: the forward input (its shape and dtype are used).
      dy: cotangent of the output, shape of ``x``.
      rate: as in the forward.
      key: the forward's key: the mask is regenerated from it.
    """
    rate = _check_rate("dropout_vjp", rate)
    _check_key("dropout_vjp", key, rate)
    _check_x("dropout_vjp", x)
    if jnp.shape(dy) != jnp.shape(x):
        raise ValueError(f"dropout_vjp: `dy` must have the shape of `x` {tuple(jnp.shape(x))}, got {jnp.shape(dy)}")
    # y = m * x / keep with a fixed 0/1 mask m: the Jacobian is diagonal, dy_i/dx_i = m_i / keep, so
    # dx = where(m, dy / keep, 0) -- the forward itself applied to dy, with the same key (hence the same mask).
    return dropout(dy.astype(x.dtype), rate, key)


register(dropout, dropout_vjp)
