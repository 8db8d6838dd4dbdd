"""Fully connected (dense) layer and its hand-derived backward rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn.functional._registry import register


def _check(op: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], b: jax.Array | None) -> None:
    if len(w_shape) != 2:
        raise ValueError(f"{op}: `w` must have rank 2 (D_in, D_out), got shape {tuple(w_shape)}")
    if len(x_shape) < 1 or x_shape[-1] != w_shape[0]:
        raise ValueError(
            f"{op}: `x` must have shape (..., {w_shape[0]}) to match `w` {tuple(w_shape)}, got {tuple(x_shape)}"
        )
    if b is not None and tuple(b.shape) != (w_shape[1],):
        raise ValueError(f"{op}: `b` must have shape ({w_shape[1]},), got {tuple(b.shape)}")


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """Affine map ``y = x @ w + b``.

    Args:
      x: ``(..., D_in)``, usually ``(N, D_in)``.
      w: ``(D_in, D_out)``.
      b: optional ``(D_out,)``.

    Returns:
      ``(..., D_out)``.
    """
    _check("dense", x.shape, w.shape, b)
    dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
    y = jnp.matmul(x.astype(dtype), w.astype(dtype))
    if b is not None:
        y = y + b.reshape((1,) * (y.ndim - 1) + (-1,))
    return y


def dense_vjp(
    x: jax.Array, w: jax.Array, b: jax.Array | None, dy: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Hand-derived VJP of :func:`dense`: ``(dx, dw, db)``.

    Args:
      x: ``(..., D_in)``; w: ``(D_in, D_out)``; b: the forward's bias ``(D_out,)`` or None; dy: ``(..., D_out)``.

    Returns:
      ``dx`` ``(..., D_in)``, ``dw`` ``(D_in, D_out)``, ``db`` ``(D_out,)`` (None when ``b`` is None), each in
      the dtype of its primal.
    """
    _check("dense_vjp", x.shape, w.shape, b)
    if tuple(dy.shape) != (*x.shape[:-1], w.shape[1]):
        raise ValueError(f"dense_vjp: `dy` must have shape {(*x.shape[:-1], w.shape[1])}, got {tuple(dy.shape)}")
    x_dtype, w_dtype = x.dtype, w.dtype
    dtype = jnp.result_type(x, w, dy)
    x, w, dy = x.astype(dtype), w.astype(dtype), dy.astype(dtype)
    # y_nk = sum_i x_ni w_ik + b_k, so dx_ni = sum_k dy_nk w_ik (dx = dy w^T), dw_ik = sum_n x_ni dy_nk
    # (dw = x^T dy, summed over every leading axis) and db_k = sum_n dy_nk.
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = jnp.matmul(dy, w.T)
    dw = jnp.matmul(x2.T, dy2)
    db = None if b is None else jnp.sum(dy2, axis=0).astype(b.dtype)
    return dx.astype(x_dtype), dw.astype(w_dtype), db


register(dense, dense_vjp)
