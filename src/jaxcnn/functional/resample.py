"""Nearest-neighbour upsampling of NHWC images by integer factors, with its hand-derived backward rule.

``y[n, i, j, c] = x[n, i // sh, j // sw, c]``: every input cell is copied into an ``sh x sw`` block. This is
``jnp.repeat`` along H and W, and ``jax.image.resize(x, (N, H * sh, W * sw, C), "nearest")``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn._validate import Pair, check_rank, pair
from jaxcnn.functional._registry import register


def _scale(op: str, x_shape: tuple[int, ...], scale: int | Pair) -> Pair:
    check_rank(op, "x", x_shape, 4, "N, H, W, C")
    try:
        return pair(scale, "scale")
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None


def upsample_nearest2d(x: jax.Array, scale: int | Pair = 2) -> jax.Array:
    """Nearest-neighbour upsampling by integer factors.

    Args:
      x: input, ``(N, H, W, C)``.
      scale: int or ``(sh, sw)``, each ``>= 1``.

    Returns:
      ``(N, H * sh, W * sw, C)`` with ``y[n, i, j, c] = x[n, i // sh, j // sw, c]``, dtype of ``x``.
    """
    sh, sw = _scale("upsample_nearest2d", x.shape, scale)
    n, h, w, c = x.shape
    blocks = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, sh, w, sw, c))
    return blocks.reshape(n, h * sh, w * sw, c)


def upsample_nearest2d_vjp(x: jax.Array, dy: jax.Array, *, scale: int | Pair = 2) -> jax.Array:
    """``dx`` of :func:`upsample_nearest2d`, ``(N, H, W, C)`` in the dtype of ``x``.

    Args:
      x: the forward input, ``(N, H, W, C)`` (only its shape and dtype are used).
      dy: cotangent of the output, ``(N, H * sh, W * sw, C)``.
      scale: as in the forward.
    """
    sh, sw = _scale("upsample_nearest2d_vjp", x.shape, scale)
    n, h, w, c = x.shape
    if dy.shape != (n, h * sh, w * sw, c):
        raise ValueError(f"upsample_nearest2d_vjp: `dy` must have shape {(n, h * sh, w * sw, c)}, got {dy.shape}")
    # x[n, i, j, c] was copied to the sh x sw block y[n, i*sh : (i+1)*sh, j*sw : (j+1)*sw, c] and nowhere else,
    # so its cotangent is the sum of dy over that block: split H and W into (block, offset) and sum the offsets.
    return dy.reshape(n, h, sh, w, sw, c).sum(axis=(2, 4)).astype(x.dtype)


register(upsample_nearest2d, upsample_nearest2d_vjp)
