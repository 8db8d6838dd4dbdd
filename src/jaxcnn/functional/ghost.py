"""Per-example squared norms of a layer's parameter gradients, from its saved input and output cotangent.

Differentially private SGD clips each example's gradient to a norm ``C``; it needs ``||grad_i||^2`` for every
example ``i`` but not ``grad_i`` itself. A layer with parameters whose weight gradient is a sum over positions of
outer products (dense, convolutions) gives that norm from two Gram matrices, the "ghost norm" (Goodfellow 2015;
Li et al. 2022; Bu et al. 2022). With example ``i``'s unfolded inputs ``A_i`` ``(P, K)`` (one row per position
``p`` the weight is applied at) and output cotangents ``G_i`` ``(P, F)``, the example's weight gradient is::

    W_i = A_i^T G_i = sum_p a_p (x) g_p                                   (K, F)
    ||W_i||^2 = sum_{k,f} (sum_p a_pk g_pf)(sum_q a_qk g_qf)
              = sum_{p,q} (sum_k a_pk a_qk)(sum_f g_pf g_qf)
              = sum_{p,q} (A_i A_i^T)_{pq} (G_i G_i^T)_{pq}              (the ghost norm)

The ghost form costs about ``P^2 (K + F)`` per example and holds a ``(P, P)`` Gram matrix; the direct form
(``W_i`` by one GEMM, then its squared sum) costs ``P K F`` and holds ``(K, F)``. :func:`norm_method` picks per
layer, as mixed ghost clipping does (Bu et al. 2022, "Scalable and Efficient Training of Large Convolutional
Neural Networks with Differential Privacy"): the ghost form when ``2 P^2 < K F`` (the Gram matrices are smaller
than the per-example gradient), the direct one otherwise. A bias added at every position has gradient
``sum_p g_p``, whose squared norm is added when ``bias=True``.

Nothing here differentiates: the functions read saved arrays (as the hand rules do) and use ``jax.numpy`` /
``jax.lax`` only. Every function returns ``(N,)``: one squared norm per example, summed over the layer's
parameters (weight and bias; scale and bias for the normalisations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn._validate import Padding, Pair, check_rank, pair, positive_int
from jaxcnn.functional._norm_checks import check_groups as _check_groups
from jaxcnn.functional._norm_checks import check_number as _check_number
from jaxcnn.functional._norm_checks import check_x as _check_x
from jaxcnn.functional._windows import pad_spatial, tap
from jaxcnn.functional.conv import conv_geometry
from jaxcnn.functional.conv_transpose import conv_transpose_geometry
from jaxcnn.functional.norm import _channels_view, _group_view, _moments

METHODS = ("auto", "ghost", "direct")
_HIGHEST = lax.Precision.HIGHEST  # a norm sums many products: no reduced-precision (TF32) passes on GPUs


def norm_method(positions: int, k: int, features: int) -> str:
    """The form ``method="auto"`` uses for a layer: ``"ghost"`` when ``2 * positions^2 < k * features``.

    Args:
      positions: ``P``, the positions the weight is applied at per example (output cells of a convolution, the
        sequence length of a dense layer).
      k: ``K``, the unfolded input's size per group (``KH * KW * C / groups`` for a convolution).
      features: ``F``, the output features per group.

    Returns:
      ``"ghost"`` or ``"direct"``: the ghost form's two ``(P, P)`` Gram matrices against the direct form's
      ``(K, F)`` per-example gradient (Bu et al. 2022's mixed ghost clipping rule).
    """
    return "ghost" if 2 * positions * positions < k * features else "direct"


def _check_method(op: str, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{op}: unknown method {method!r}; known: {', '.join(METHODS)}")


def _kernel(op: str, kernel_shape: int | Pair) -> Pair:
    try:
        return pair(kernel_shape, "kernel_shape")
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None


class _Taps(NamedTuple):
    """The unfolded input ``A_i`` ``(P, K)`` of every example as column blocks, one per kernel tap, never
    concatenated: ``padded`` ``(N, HP, WP, C)`` read at ``offsets`` (one ``(top, left)`` per tap) with ``stride``
    over ``out`` cells, split into ``groups``. A dense layer is one tap (``offsets`` None, ``padded`` the
    ``(N, groups, P, C)`` block itself)."""

    padded: jax.Array
    offsets: tuple[tuple[int, int], ...] | None = None
    stride: Pair = (1, 1)
    out: Pair = (1, 1)
    groups: int = 1

    @property
    def count(self) -> int:
        return 1 if self.offsets is None else len(self.offsets)

    def at(self, offset: tuple[int, int]) -> jax.Array:
        """The tap at ``offset`` (static): ``(N, groups, P, C / groups)``."""
        return _by_group(tap(self.padded, *offset, self.stride, self.out), self.groups)

    def sum(self, term: Callable[[jax.Array], jax.Array], *, scan: bool) -> jax.Array:
        """``sum_j term(T_j)`` over the taps ``T_j`` ``(N, groups, P, C / groups)``. With ``scan``, one tap at a
        time (a ``lax.scan`` over the offsets: memory stays at one tap's size whatever the kernel's); without,
        unrolled (XLA may hold every tap at once, but schedules the terms freely)."""
        if self.offsets is None:
            return term(self.padded)
        if not scan or len(self.offsets) == 1:
            return sum(term(self.at(offset)) for offset in self.offsets)
        n, _, _, channels = self.padded.shape
        window = (n, (self.out[0] - 1) * self.stride[0] + 1, (self.out[1] - 1) * self.stride[1] + 1, channels)

        def one(total, offset):
            zero = jnp.zeros((), offset.dtype)
            cells = lax.dynamic_slice(self.padded, (zero, offset[0], offset[1], zero), window)
            cells = cells[:, :: self.stride[0], :: self.stride[1], :]
            return total + term(_by_group(cells, self.groups)), None

        first = term(self.at(self.offsets[0]))
        total, _ = lax.scan(one, first, jnp.asarray(self.offsets[1:], jnp.int32))
        return total


def _outer_sums_sq_norms(taps: _Taps, g: jax.Array, method: str) -> jax.Array:
    """``sum_groups ||A_ig^T G_ig||^2`` per example, for the unfolded input ``A_i`` as kernel taps (``(N, groups,
    P, C)`` each, see :class:`_Taps`) and ``g`` ``(N, groups, P, F)``.

    ``method`` is ``"auto"``, ``"ghost"`` or ``"direct"`` (see the module docstring for both forms). Neither
    concatenates the taps into the ``(P, K)`` unfolded input: the Gram matrix of ``A_i`` is the sum of the taps'
    Gram matrices, ``A_i A_i^T = sum_j T_j T_j^T``, and ``W_i = A_i^T G_i`` stacks the taps' blocks
    ``T_j^T G_i``, so ``||W_i||^2 = sum_j ||T_j^T G_i||^2``. Memory stays at one tap's size.
    """
    _, _, positions, features = g.shape
    channels = taps.padded.shape[-1] // taps.groups if taps.offsets is not None else taps.padded.shape[-1]
    if method == "auto":
        method = norm_method(positions, channels * taps.count, features)
    if method == "ghost":
        # sum_{p,q} (A A^T)_{pq} (G G^T)_{pq}; with one position this is ||a||^2 ||g||^2
        # unrolled: the ghost form is chosen where P is small, so the taps are, and the (P, P) sum is carried once
        gram_a = taps.sum(lambda t: jnp.einsum("ngpc,ngqc->ngpq", t, t, precision=_HIGHEST), scan=False)
        gram_g = jnp.einsum("ngpf,ngqf->ngpq", g, g, precision=_HIGHEST)
        return jnp.sum(gram_a * gram_g, axis=(1, 2, 3))

    def block_squares(t: jax.Array) -> jax.Array:  # ||T_j^T G_i||^2 per example: block j of W_i, per group
        block = jnp.einsum("ngpc,ngpf->ngcf", t, g, precision=_HIGHEST)
        return jnp.sum(block * block, axis=(1, 2, 3))

    return taps.sum(block_squares, scan=True)


def _bias_sq_norms(g: jax.Array) -> jax.Array:
    """``||sum_p g_p||^2`` per example for ``g`` ``(N, ..., F)``: a bias added at every position collects the
    cotangent of each, so its per-example gradient is ``g`` summed over the positions."""
    summed = jnp.sum(g.reshape(g.shape[0], -1, g.shape[-1]), axis=1)
    return jnp.sum(summed * summed, axis=1)


def dense_sq_norms(a: jax.Array, g: jax.Array, *, bias: bool, method: str = "ghost") -> jax.Array:
    """Per-example ``||dW_i||^2 (+ ||db_i||^2)`` of a dense layer ``y = a @ w + b``.

    For ``(N, D_in)`` inputs ``dW_i = a_i (x) g_i`` and ``||dW_i||^2 = ||a_i||^2 ||g_i||^2``. With extra axes
    (a sequence, an image's cells) ``dW_i = sum_s a_s (x) g_s``, whose squared norm is the ghost form
    ``sum_{s,t} (a_s . a_t)(g_s . g_t)`` (module docstring).

    Args:
      a: the layer's input, ``(N, D_in)`` or ``(N, ..., D_in)``.
      g: the cotangent of its output, ``(N, D_out)`` or ``(N, ..., D_out)`` (the same leading axes as ``a``).
      bias: whether the layer has a bias (adds ``||sum_s g_s||^2``).
      method: ``"ghost"`` (the default), ``"direct"`` (``dW_i`` by one GEMM) or ``"auto"`` (:func:`norm_method`).
        With ``(N, D)`` inputs all three compute the same products.

    Returns:
      ``(N,)``, in the promoted dtype of ``a`` and ``g``.
    """
    _check_method("dense_sq_norms", method)
    if a.ndim < 2 or g.ndim != a.ndim or a.shape[:-1] != g.shape[:-1]:
        raise ValueError(
            f"dense_sq_norms: `a` (N, ..., D_in) and `g` (N, ..., D_out) must share their leading axes, "
            f"got {tuple(a.shape)} and {tuple(g.shape)}"
        )
    dtype = jnp.result_type(a, g)
    a, g = a.astype(dtype), g.astype(dtype)
    n = a.shape[0]
    norms = _outer_sums_sq_norms(_Taps(a.reshape(n, 1, -1, a.shape[-1])), g.reshape(n, 1, -1, g.shape[-1]), method)
    return norms + _bias_sq_norms(g) if bias else norms


def _taps(padded: jax.Array, kernel: Pair, dilation: Pair, stride: Pair, out: Pair, groups: int) -> _Taps:
    """The unfolded input as its kernel taps: tap ``(i, j)`` reads ``padded`` at ``(i * dh, j * dw)`` for every
    output cell (its columns of the rows of ``A_i``)."""
    offsets = tuple((i * dilation[0], j * dilation[1]) for i in range(kernel[0]) for j in range(kernel[1]))
    return _Taps(padded, offsets, stride, out, groups)


def _by_group(g: jax.Array, groups: int) -> jax.Array:
    """``(N, OH, OW, F)`` as ``(N, groups, OH * OW, F / groups)``."""
    n, oh, ow, features = g.shape
    return g.reshape(n, oh * ow, groups, features // groups).transpose(0, 2, 1, 3)


def conv2d_sq_norms(
    x: jax.Array,
    g: jax.Array,
    *,
    kernel_shape: int | Pair,
    stride: int | Pair = 1,
    padding: Padding = "VALID",
    dilation: int | Pair = 1,
    groups: int = 1,
    bias: bool,
    method: str = "auto",
) -> jax.Array:
    """Per-example ``||dw_i||^2 (+ ||db_i||^2)`` of :func:`~jaxcnn.functional.conv2d`.

    The forward reads, for output cell ``o`` and tap ``j``, ``x_pad[o * stride + j * dilation]``, so (as in
    ``conv2d_vjp``'s ``dw``) ``dw_i[j, c, f] = sum_o x_pad_i[o * stride + j * dilation, c] g_i[o, f]``: per group,
    ``A_i^T G_i`` with ``A_i`` the unfolded input (one row of ``KH * KW * C / groups`` cells per output cell) and
    ``G_i`` the group's cotangents. The groups' weights are disjoint, so their squared norms add.

    Args:
      x: the forward input, ``(N, H, W, C)``.
      g: the cotangent of the output, ``(N, OH, OW, F)``.
      kernel_shape: the kernel's spatial size, int or ``(KH, KW)``.
      stride, padding, dilation, groups: as in ``conv2d``.
      bias: whether the convolution has a bias.
      method: ``"ghost"`` (Gram matrices over the ``OH * OW`` positions), ``"direct"`` (the per-example
        ``(KH * KW * C / groups, F / groups)`` gradient per group) or ``"auto"`` (:func:`norm_method`).

    Returns:
      ``(N,)``, in the promoted dtype of ``x`` and ``g``.
    """
    _check_method("conv2d_sq_norms", method)
    kernel = _kernel("conv2d_sq_norms", kernel_shape)
    check_rank("conv2d_sq_norms", "g", g.shape, 4, "N, OH, OW, F")
    try:
        groups = positive_int(groups, "groups")
    except ValueError as error:
        raise ValueError(f"conv2d_sq_norms: {error}") from None
    w_shape = (*kernel, x.shape[-1] // groups, g.shape[-1])
    stride, dilation, pads, out = conv_geometry(
        x.shape, w_shape, stride=stride, padding=padding, dilation=dilation, groups=groups, op="conv2d_sq_norms"
    )
    if g.shape != (x.shape[0], *out, w_shape[3]):
        raise ValueError(f"conv2d_sq_norms: `g` must have shape {(x.shape[0], *out, w_shape[3])}, got {g.shape}")
    dtype = jnp.result_type(x, g)
    x, g = x.astype(dtype), g.astype(dtype)
    taps = _taps(pad_spatial(x, jnp.zeros((), dtype), pads), kernel, dilation, stride, out, groups)
    norms = _outer_sums_sq_norms(taps, _by_group(g, groups), method)
    return norms + _bias_sq_norms(g) if bias else norms


def conv_transpose2d_sq_norms(
    x: jax.Array,
    g: jax.Array,
    *,
    kernel_shape: int | Pair,
    stride: int | Pair = 1,
    padding: Padding = "VALID",
    dilation: int | Pair = 1,
    bias: bool,
    method: str = "auto",
) -> jax.Array:
    """Per-example ``||dw_i||^2 (+ ||db_i||^2)`` of :func:`~jaxcnn.functional.conv_transpose2d`.

    ``conv_transpose2d_vjp`` forms ``dw[K - 1 - j'] = sum_i x[i] (x) g_pad[i * s + j' * d]`` with ``g_pad`` the
    cotangent padded by ``((K - 1) * d - lo, (K - 1) * d - hi)``: the roles of a convolution's weight gradient
    with input and cotangent swapped. Here the unfolded ``g_pad`` (one row of ``KH * KW * F`` cells per input
    cell, ``H * W`` positions) plays ``A_i`` and ``x`` plays ``G_i``; the tap flip and the transpose of the
    kernel's in/out axes permute the gradient's entries and leave its norm unchanged.

    Args:
      x: the forward input, ``(N, H, W, C)``.
      g: the cotangent of the output, ``(N, OH, OW, F)``.
      kernel_shape: the kernel's spatial size, int or ``(KH, KW)``.
      stride, padding, dilation: as in ``conv_transpose2d``.
      bias: whether the transposed convolution has a bias.
      method: as in :func:`conv2d_sq_norms`, with ``P = H * W`` positions, ``K = KH * KW * F`` and ``C``
        features.

    Returns:
      ``(N,)``, in the promoted dtype of ``x`` and ``g``.
    """
    _check_method("conv_transpose2d_sq_norms", method)
    kernel = _kernel("conv_transpose2d_sq_norms", kernel_shape)
    check_rank("conv_transpose2d_sq_norms", "g", g.shape, 4, "N, OH, OW, F")
    stride, dilation, pads, out = conv_transpose_geometry(
        x.shape, (*kernel, x.shape[-1], g.shape[-1]), stride=stride, padding=padding, dilation=dilation,
        op="conv_transpose2d_sq_norms",
    )  # fmt: skip
    if g.shape != (x.shape[0], *out, g.shape[-1]):
        raise ValueError(f"conv_transpose2d_sq_norms: `g` must have shape {(x.shape[0], *out, 'F')}, got {g.shape}")
    dtype = jnp.result_type(x, g)
    x, g = x.astype(dtype), g.astype(dtype)
    g_pads = [((k - 1) * d - p[0], (k - 1) * d - p[1]) for k, d, p in zip(kernel, dilation, pads, strict=True)]
    taps = _taps(pad_spatial(g, jnp.zeros((), dtype), g_pads), kernel, dilation, stride, x.shape[1:3], 1)
    norms = _outer_sums_sq_norms(taps, _by_group(x, 1), method)
    return norms + _bias_sq_norms(g) if bias else norms


def affine_sq_norms(xhat: jax.Array, g: jax.Array, *, scale: bool, bias: bool) -> jax.Array:
    """Per-example ``||dscale_i||^2 + ||dbias_i||^2`` of a per-channel affine map ``y = xhat * scale + bias``.

    Each example's ``xhat`` depends on that example only (layer and group norm; not batch norm with batch
    statistics), so its parameter gradients are exact per-example sums over its positions:
    ``dscale_i[c] = sum_s g_i[s, c] xhat_i[s, c]`` and ``dbias_i[c] = sum_s g_i[s, c]``.

    Args:
      xhat: the normalised input, ``(N, ..., C)``.
      g: the cotangent of ``y``, the shape of ``xhat``.
      scale, bias: which parameters the layer has.

    Returns:
      ``(N,)``, in the promoted dtype of ``xhat`` and ``g``.
    """
    if xhat.ndim < 2 or xhat.shape != g.shape:
        raise ValueError(
            f"affine_sq_norms: `xhat` (N, ..., C) and `g` must have one shape, got {xhat.shape}, {g.shape}"
        )
    g = g.astype(jnp.result_type(xhat, g))
    norms = jnp.zeros(g.shape[:1], g.dtype)
    if scale:
        dscale = jnp.sum((g * xhat).reshape(g.shape[0], -1, g.shape[-1]), axis=1)
        norms = norms + jnp.sum(dscale * dscale, axis=1)
    return norms + _bias_sq_norms(g) if bias else norms


def _check_norm_args(op: str, x: jax.Array, g: jax.Array, epsilon: float) -> float:
    """ValueError unless ``x`` is a floating ``(N, ..., C)`` array and ``g`` has its shape; ``epsilon`` as a float."""
    _check_x(op, x)
    if tuple(g.shape) != tuple(x.shape):
        raise ValueError(f"{op}: `g` must have the shape of `x` {tuple(x.shape)}, got {tuple(g.shape)}")
    return _check_number(op, "epsilon", epsilon, 0.0)


def _normalized(x: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...], epsilon: float) -> jax.Array:
    """``xhat = (x - mean) * rsqrt(var + epsilon)`` on the view ``shape`` (statistics over ``axes``, as the norm
    forwards take them), reshaped back to ``x``'s shape, in at least float32."""
    view = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(shape)
    mean, var = _moments(view, axes)
    return ((view - mean) * lax.rsqrt(var + epsilon)).reshape(x.shape)


def layer_norm_sq_norms(x: jax.Array, g: jax.Array, *, scale: bool, bias: bool, epsilon: float = 1e-6) -> jax.Array:
    """Per-example squared norms of :func:`~jaxcnn.functional.layer_norm`'s scale and bias gradients.

    Args:
      x: the forward input, ``(N, ..., C)``; ``xhat`` is recomputed from it.
      g: the cotangent of the output, the shape of ``x``.
      scale, bias: which parameters the layer has.
      epsilon: as in the forward.

    Returns:
      ``(N,)``, in the promoted dtype of ``x`` and ``g`` (at least float32): see :func:`affine_sq_norms`.
    """
    epsilon = _check_norm_args("layer_norm_sq_norms", x, g, epsilon)
    view = _channels_view(x, (x.ndim - 1,))
    return affine_sq_norms(_normalized(x, view.shape, view.axes, epsilon), g, scale=scale, bias=bias)


def group_norm_sq_norms(
    x: jax.Array, g: jax.Array, *, groups: int, scale: bool, bias: bool, epsilon: float = 1e-6
) -> jax.Array:
    """Per-example squared norms of :func:`~jaxcnn.functional.group_norm`'s scale and bias gradients.

    Args:
      x: the forward input, ``(N, ..., C)``; ``xhat`` is recomputed from it.
      g: the cotangent of the output, the shape of ``x``.
      groups: as in the forward.
      scale, bias: which parameters the layer has.
      epsilon: as in the forward.

    Returns:
      ``(N,)``, in the promoted dtype of ``x`` and ``g`` (at least float32): see :func:`affine_sq_norms`.
    """
    epsilon = _check_norm_args("group_norm_sq_norms", x, g, epsilon)
    view = _group_view(x, _check_groups("group_norm_sq_norms", x.shape[-1], groups))
    return affine_sq_norms(_normalized(x, view.shape, view.axes, epsilon), g, scale=scale, bias=bias)
