"""Fully connected (dense) layer and its hand-derived backward rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn.functional._registry import register


def _check(op: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> None:
    if len(w_shape) != 2:
        raise ValueError(f"{op}: `w` must have rank 2 (D_in, D_out), got shape {tuple(w_shape)}")
    if len(x_shape) < 1 or x_shape[-1] != w_shape[0]:
        raise ValueError(
            f"{op}: `x` must have shape (..., {w_shape[0]}) to match `w` {tuple(w_shape)}, got {tuple(x_shape)}"
        )


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """Affine map ``y = x @ w + b``.

    Args:
      x: ``(..., D_in)``, usually ``(N, D_in)``.
      w: ``(D_in, D_out)``.
      b: optional ``(D_out,)``.

    Returns:
      ``(..., D_out)``.
    """
    _check("dense", x.shape, w.shape)
    if b is not None and tuple(b.shape) != (w.shape[1],):
        raise ValueError(f"dense: `b` must have shape ({w.shape[1]},), got {tuple(b.shape)}")
    dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
    y = jnp.matmul(x.astype(dtype), w.astype(dtype))
    if b is not None:
        y = y + b.reshape((1,) * (y.ndim - 1) + (-1,))
    return y


def dense_vjp(x: jax.Array, w: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Hand-derived VJP of :func:`dense`: ``(dx, dw, db)``.

    Args:
      x: ``(..., D_in)``; w: ``(D_in, D_out)``; dy: ``(..., D_out)``.

    Returns:
      ``dx`` ``(..., D_in)``, ``dw`` ``(D_in, D_out)``, ``db`` ``(D_out,)``; ``dx`` and ``dw`` in the dtypes
      of ``x`` and ``w``.
    """
    _check("dense_vjp", x.shape, w.shape)
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
    db = jnp.sum(dy2, axis=0)
    return dx.astype(x_dtype), dw.astype(w_dtype), db


def _dense_vjp(args, dy, **options):
    x, w, b = (list(args) + [None])[:3]
    dx, dw, db = dense_vjp(x, w, dy)
    return (dx, dw) if b is None else (dx, dw, db)


register(dense, _dense_vjp, differentiable=(0, 1, 2))
