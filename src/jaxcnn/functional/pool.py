"""Max, average and global average pooling over NHWC images, with hand-derived backward rules.

Pooling has no parameters; its backward rule routes each output's cotangent back to the input cells of its
window. Both rules below walk the window's taps explicitly: for each tap ``(i, j)`` the input cells it saw form
a strided slice of the padded input, and the transpose of a strided slice is ``lax.pad`` with interior padding
(the cotangent placed back on the strided grid).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn._validate import ExplicitPadding, Padding, Pair, check_rank, explicit_padding, pair, window_geometry
from jaxcnn.functional._registry import register
from jaxcnn.functional._windows import pad_spatial, tap, untap


def pool_geometry(
    x_shape: tuple[int, ...],
    window: int | Pair,
    stride: int | Pair | None,
    padding: Padding,
    *,
    op: str,
) -> tuple[Pair, Pair, ExplicitPadding, Pair]:
    """Validate pooling arguments; return ``(window, stride, explicit padding, output (H, W))``.

    Padding on each side must be smaller than the window, so every window holds at least one real cell.
    """
    check_rank(op, "x", x_shape, 4, "N, H, W, C")
    window = pair(window, "window")
    stride = window if stride is None else pair(stride, "stride")
    in_size = (x_shape[1], x_shape[2])
    pads = explicit_padding(padding, in_size, window, stride)
    for p, k in zip(pads, window, strict=True):
        if max(p) >= k:
            raise ValueError(f"{op}: padding {pads} must be smaller than the window {window} on every side")
    _, out = window_geometry(op, in_size, window, stride, (1, 1), pads, what="window")
    return window, stride, pads, out


def _lowest(dtype) -> np.ndarray:
    """The identity of max for ``dtype``: -inf for floats, the smallest value for integers (a concrete array)."""
    if jnp.issubdtype(dtype, jnp.integer):
        return np.array(jnp.iinfo(dtype).min, dtype)
    return np.array(-np.inf, dtype)


def _check_dy(op: str, dy: jax.Array, expected: tuple[int, ...]) -> None:
    if tuple(dy.shape) != tuple(expected):
        raise ValueError(f"{op}: `dy` must have shape {tuple(expected)}, got {tuple(dy.shape)}")


def _vjp_geometry(
    op: str, x: jax.Array, dy: jax.Array, window, stride, padding
) -> tuple[Pair, Pair, ExplicitPadding, Pair]:
    """:func:`pool_geometry` of a pooling VJP, with ``dy`` checked against the output shape."""
    window, stride, pads, out = pool_geometry(x.shape, window, stride, padding, op=op)
    _check_dy(op, dy, (x.shape[0], *out, x.shape[3]))
    return window, stride, pads, out


def _crop(x_pad: jax.Array, pads: ExplicitPadding, size: Pair) -> jax.Array:
    n, _, _, c = x_pad.shape
    top, left = pads[0][0], pads[1][0]
    return lax.slice(x_pad, (0, top, left, 0), (n, top + size[0], left + size[1], c))


def max_pool2d(
    x: jax.Array, window: int | Pair = 2, stride: int | Pair | None = None, padding: Padding = "VALID"
) -> jax.Array:
    """Max pooling.

    Args:
      x: ``(N, H, W, C)``.
      window: int or ``(wh, ww)``.
      stride: int or pair; None means ``stride = window``.
      padding: as for :func:`conv2d`; padded cells never win (they hold ``-inf``).

    Returns:
      ``(N, OH, OW, C)``.
    """
    window, stride, pads, _ = pool_geometry(x.shape, window, stride, padding, op="max_pool2d")
    # a concrete (numpy) init value lets JAX recognise the max monoid, so autodiff can check this op too
    lowest = _lowest(x.dtype)
    return lax.reduce_window(x, lowest, lax.max, (1, *window, 1), (1, *stride, 1), ((0, 0), *pads, (0, 0)))


def max_pool2d_vjp(
    x: jax.Array, dy: jax.Array, *, window: int | Pair = 2, stride: int | Pair | None = None, padding: Padding = "VALID"
) -> jax.Array:
    """Hand-derived VJP of :func:`max_pool2d`: ``dx`` with the shape of ``x`` ``(N, H, W, C)``.

    ``dy`` is ``(N, OH, OW, C)``. Ties: each window sends its whole cotangent to one maximal cell, the first in
    row-major window order (top row first, then left to right), as JAX's and PyTorch's CPU kernels do.
    """
    window, stride, pads, out = _vjp_geometry("max_pool2d_vjp", x, dy, window, stride, padding)
    # y[o] = max_k x_pad[o * s + k], so dy[o] flows to the single winning tap k*(o) and nowhere else:
    # dx_pad = sum_k untap(dy * [k is the first tap with x_pad[o * s + k] == y[o]]).
    lowest = _lowest(x.dtype)
    x_pad = pad_spatial(x, lowest, pads)
    padded = (x_pad.shape[1], x_pad.shape[2])
    taps = [(i, j) for i in range(window[0]) for j in range(window[1])]
    seen = [tap(x_pad, i, j, stride, out) for i, j in taps]
    y = seen[0]
    for values in seen[1:]:
        y = jnp.maximum(y, values)
    zero = jnp.zeros((), dy.dtype)
    taken = jnp.zeros(y.shape, bool)
    dx_pad = jnp.zeros(x_pad.shape, dy.dtype)
    for (i, j), values in zip(taps, seen, strict=True):
        wins = (values == y) & ~taken
        taken = taken | wins
        dx_pad = dx_pad + untap(jnp.where(wins, dy, zero), i, j, stride, padded)
    return _crop(dx_pad, pads, (x.shape[1], x.shape[2]))


def _real_cells(in_size: Pair, window: Pair, stride: Pair, pads: ExplicitPadding, out: Pair) -> np.ndarray:
    """How many real (unpadded) input cells each output window covers: ``(1, OH, OW, 1)``, a constant."""
    counts = []
    for n, k, s, p, o in zip(in_size, window, stride, pads, out, strict=True):
        start = np.arange(o) * s - p[0]
        counts.append(np.minimum(start + k, n) - np.maximum(start, 0))
    return (counts[0][:, None] * counts[1][None, :])[None, :, :, None]


def avg_pool2d(
    x: jax.Array, window: int | Pair = 2, stride: int | Pair | None = None, padding: Padding = "VALID"
) -> jax.Array:
    """Average pooling; with padding, each window averages over its real cells only (padding is not counted).

    Args:
      x: ``(N, H, W, C)``.
      window, stride, padding: as for :func:`max_pool2d`.

    Returns:
      ``(N, OH, OW, C)``.
    """
    window, stride, pads, out = pool_geometry(x.shape, window, stride, padding, op="avg_pool2d")
    zero = np.array(0, x.dtype)  # concrete, so JAX recognises the sum monoid (and can differentiate it)
    total = lax.reduce_window(x, zero, lax.add, (1, *window, 1), (1, *stride, 1), ((0, 0), *pads, (0, 0)))
    count = _real_cells((x.shape[1], x.shape[2]), window, stride, pads, out)
    return total / jnp.asarray(count, x.dtype)


def avg_pool2d_vjp(
    x: jax.Array, dy: jax.Array, *, window: int | Pair = 2, stride: int | Pair | None = None, padding: Padding = "VALID"
) -> jax.Array:
    """Hand-derived VJP of :func:`avg_pool2d`: ``dx`` ``(N, H, W, C)`` from ``dy`` ``(N, OH, OW, C)``."""
    window, stride, pads, out = _vjp_geometry("avg_pool2d_vjp", x, dy, window, stride, padding)
    # y[o] = sum_k x_pad[o * s + k] / count[o]: every tap of window o receives dy[o] / count[o], and padded
    # cells are cropped away: dx = crop(sum_k untap(dy / count)).
    count = _real_cells((x.shape[1], x.shape[2]), window, stride, pads, out)
    share = dy / jnp.asarray(count, dy.dtype)
    padded = (x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1]))
    dx_pad = jnp.zeros((x.shape[0], *padded, x.shape[3]), dy.dtype)
    for i in range(window[0]):
        for j in range(window[1]):
            dx_pad = dx_pad + untap(share, i, j, stride, padded)
    return _crop(dx_pad, pads, (x.shape[1], x.shape[2]))


def global_avg_pool2d(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes: ``(N, H, W, C) -> (N, C)``."""
    check_rank("global_avg_pool2d", "x", x.shape, 4, "N, H, W, C")
    return jnp.mean(x, axis=(1, 2))


def global_avg_pool2d_vjp(x: jax.Array, dy: jax.Array) -> jax.Array:
    """Hand-derived VJP of :func:`global_avg_pool2d`: ``dx`` ``(N, H, W, C)`` from ``dy`` ``(N, C)``."""
    check_rank("global_avg_pool2d_vjp", "x", x.shape, 4, "N, H, W, C")
    _check_dy("global_avg_pool2d_vjp", dy, (x.shape[0], x.shape[3]))
    # y[n, c] = sum_{h, w} x[n, h, w, c] / (H W): every cell gets dy[n, c] / (H W).
    n, h, w, c = x.shape
    return jnp.broadcast_to((dy / (h * w)).reshape(n, 1, 1, c), x.shape)


for _forward, _vjp in [
    (max_pool2d, max_pool2d_vjp),
    (avg_pool2d, avg_pool2d_vjp),
    (global_avg_pool2d, global_avg_pool2d_vjp),
]:
    register(_forward, _vjp)
