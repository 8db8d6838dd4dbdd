"""Window taps over padded NHWC arrays, shared by the convolutions and pooling.

A window op (a convolution's kernel, a pooling window) reads, through each of its taps ``(i, j)``, a strided
slice of the padded input: one cell per output cell. Reading the op backwards means placing values back on
those slices (:func:`untap`, the transpose of :func:`tap`) or contracting the slices with a cotangent
(:func:`tap_products`, a convolution's weight gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn._validate import ExplicitPadding, Pair


def pad_spatial(x: jax.Array, value: jax.Array, pads: ExplicitPadding | Sequence[Sequence[int]]) -> jax.Array:
    """``x`` ``(N, H, W, C)`` padded with ``value`` by ``((top, bottom), (left, right))`` (negative crops)."""
    return lax.pad(x, value, [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])


def tap(padded: jax.Array, top: int, left: int, stride: Pair, out: Pair) -> jax.Array:
    """The cells a window tap at offset ``(top, left)`` sees, one per output cell: ``(N, OH, OW, C)``."""
    n, _, _, c = padded.shape
    return lax.slice(
        padded,
        (0, top, left, 0),
        (n, top + (out[0] - 1) * stride[0] + 1, left + (out[1] - 1) * stride[1] + 1, c),
        (1, stride[0], stride[1], 1),
    )


def untap(values: jax.Array, top: int, left: int, stride: Pair, padded: Pair) -> jax.Array:
    """Transpose of :func:`tap`: ``(N, OH, OW, C)`` values placed back on a zero grid of spatial size ``padded``."""
    _, oh, ow, _ = values.shape
    high = (padded[0] - top - (oh - 1) * stride[0] - 1, padded[1] - left - (ow - 1) * stride[1] - 1)
    zero = jnp.zeros((), values.dtype)
    return lax.pad(values, zero, [(0, 0, 0), (top, high[0], stride[0] - 1), (left, high[1], stride[1] - 1), (0, 0, 0)])


def tap_products(
    padded: jax.Array, other: jax.Array, kernel: Pair, dilation: Pair, stride: Pair, groups: int = 1
) -> jax.Array:
    """``out[i, j] = sum over (n, oh, ow) of tap(padded, i * dh, j * dw) (x) other``, per group.

    Args:
      padded: ``(N, HP, WP, C)``, read through each kernel tap.
      other: ``(N, OH, OW, F)``, one row per cell a tap sees.

    Returns:
      ``(KH, KW, C // groups, F)``: one GEMM per tap (and group), contracting the batch and the output cells.
    """
    n, oh, ow, features = other.shape
    in_per_group, per_group = padded.shape[3] // groups, features // groups
    other_groups = other.reshape(n, oh, ow, groups, per_group)
    taps = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            seen = tap(padded, i * dilation[0], j * dilation[1], stride, (oh, ow))
            seen = seen.reshape(n, oh, ow, groups, in_per_group)
            taps.append(jnp.einsum("nhwgi,nhwgo->igo", seen, other_groups).reshape(in_per_group, features))
    return jnp.stack(taps).reshape(*kernel, in_per_group, features)
