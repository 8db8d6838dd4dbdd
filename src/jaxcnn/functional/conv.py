"""2-D convolution (NHWC input, HWIO kernel) and its hand-derived backward rule.

Forward, one spatial axis, written as the correlation XLA computes (``x_pad`` is ``x`` with the padding)::

    y[n, o, c_out] = b[c_out] + sum_{j, c_in} x_pad[n, o * stride + j * dilation, c_in] * w[j, c_in, c_out]

Everything below follows from reading that sum backwards: each ``x_pad`` cell and each kernel tap collects the
``dy`` of every output it fed.
"""

from __future__ import annotations

import operator
import os

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn import _xla_flags
from jaxcnn._validate import ExplicitPadding, Padding, Pair, check_rank, pair, positive_int, window_geometry
from jaxcnn.functional._registry import register
from jaxcnn.functional._windows import pad_spatial, tap_products

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")

# How conv2d_vjp forms the weight gradient (see its docstring). "auto" picks per backend: on GPUs and TPUs the
# convolution maps onto the library's (cuDNN's) weight-gradient kernels, which a chain of per-tap GEMMs cannot
# match. On XLA:CPU it depends on who runs convolutions (benchmarks/RESULTS.md, "XLA:CPU flag study"): with
# YNNPACK's single-convolution fusion on (XLA's default list) a convolution of that shape runs slowly, and the
# per-tap GEMMs win; with YNNPACK for dots and reductions only (jaxcnn's float32 train steps by default, see
# jaxcnn._step_jit, or XLA_FLAGS saying so) XLA's own convolution emitter runs them, and the convolution form is
# fastest.
DW_METHODS = ("auto", "taps", "conv")


def dw_method_for(backend: str | None = None) -> str:
    """The weight-gradient formulation ``dw_method="auto"`` uses on ``backend`` (default: JAX's default).

    ``JAXCNN_DW_METHOD=taps`` or ``=conv`` in the environment overrides the choice on every backend (for
    benchmarks: ``jaxcnn bench --xla-flags NAME=--jaxcnn_dw_method=conv``); it is read at trace time. On CPU,
    "auto" is "conv" where XLA's YNNPACK fusions leave convolutions alone (inside jaxcnn's float32 train steps,
    or under such ``XLA_FLAGS``: :func:`jaxcnn._xla_flags.ynn_convolutions_off`), else "taps".
    """
    forced = os.environ.get("JAXCNN_DW_METHOD", "auto")
    if forced not in DW_METHODS:
        raise ValueError(f"JAXCNN_DW_METHOD must be one of {', '.join(DW_METHODS)}, got {forced!r}")
    if forced != "auto":
        return forced
    if (backend or jax.default_backend()) == "cpu":
        return "conv" if _xla_flags.ynn_convolutions_off() else "taps"
    return "conv"


# XLA:CPU bug (seen with jaxlib 0.10.2; tests/conv_xla_sweep.py finds the condition and checks it case by case).
# Before lowering, XLA may swap a convolution's operands (conv_operand_swapper.cc, run inside the algebraic
# simplifier) when the kernel's spatial product exceeds the input's. It copies a "group" axis (window stride
# K - 1, lhs (base) dilation K, no padding, rhs dilation 1) into the swapped window unchanged, although the
# window there must be the size of the former input: unless that axis's input size is K, the verifier's check
# "Window dimensions do not match RHS shape" fails and the process aborts (SIGABRT, no Python error). Minimal:
#     x, w = jnp.ones((1, 5, 1, 1)), jnp.ones((2, 5, 1, 1))   # H: group axis (K 2, lhs dilation 2, stride 1)
#     lax.conv_general_dilated(x, w, (1, 1), ((0, 0), (2, 4)), lhs_dilation=(2, 2),
#                              dimension_numbers=("NHWC", "HWIO", "NHWC"))   # W: kernel 5 > input 1 -> swap
# A transposed convolution meets it with kernel 2, stride 2, padding (0, 0), dilation 1 on one axis and a kernel
# longer than the input on the other (conv2d_vjp's dx with kernel 2, stride 2, low padding 1, an even input).
# lhs_dilated_conv avoids it by padding such an axis one more cell at the high end and cropping that output;
# conv2d pads x itself on such an axis, so that jax.vjp's dx (the same convolution) avoids it too. Only these
# geometries are rerouted: the padded form cost about 10% more on a 64x14x14x32 transposed convolution.


def xla_swap_aborts(
    lhs: Pair, rhs: Pair, strides: Pair, pads: ExplicitPadding, lhs_dilation: Pair, rhs_dilation: Pair, groups: int = 1
) -> tuple[int, ...]:
    """The spatial axes (0, 1) that make XLA:CPU abort on this ``conv_general_dilated`` (empty: it compiles).

    ``lhs`` and ``rhs`` are the spatial sizes of the input and the kernel; the rest as ``lax`` takes them. The
    logic follows XLA's operand swap (see the comment above): the swap happens when, over the axes that are
    neither "group" nor "pure contraction" axes, the kernel's product exceeds the input's (an input of 1 padded
    by K - 1 on both sides counts as K), and then each group axis whose input is not K sizes the window wrong.
    """
    if groups != 1:
        return ()
    bad, kernel_product, swapped_product = [], 1, 1
    for axis, n, k, s, (lo, hi), base, dilation in zip(
        (0, 1), lhs, rhs, strides, pads, lhs_dilation, rhs_dilation, strict=True
    ):
        plain = lo == 0 and hi == 0 and dilation == 1
        if plain and base == k and s == k - 1:  # a "group" axis: kept as it is
            if n != k:
                bad.append(axis)
            continue
        if plain and n == k and base == 1 and s == 1:  # a "pure contraction" axis: kept as it is
            continue
        kernel_product *= k
        swapped_product *= k if n == 1 and s == 1 and dilation == 1 and lo == hi == k - 1 else n
    return tuple(bad) if kernel_product > swapped_product else ()


def lhs_dilated_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    pads: ExplicitPadding | list[tuple[int, int]],
    lhs_dilation: Pair,
    rhs_dilation: Pair,
    groups: int = 1,
) -> jax.Array:
    """``lax.conv_general_dilated`` at window stride 1 (NHWC, HWIO), safe from the XLA:CPU abort above.

    On the axes :func:`xla_swap_aborts` names, the input gets one more zero at the high end, which makes the axis
    an ordinary one, and the one extra output cell that adds is cropped: the same values, one more output row.
    """
    pads = [tuple(p) for p in pads]
    bad = xla_swap_aborts(lhs.shape[1:3], rhs.shape[:2], (1, 1), pads, lhs_dilation, rhs_dilation, groups)
    padded = [(lo, hi + (axis in bad)) for axis, (lo, hi) in enumerate(pads)]
    y = lax.conv_general_dilated(
        lhs,
        rhs,
        (1, 1),
        padded,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_DIMENSIONS,
        feature_group_count=groups,
    )
    if not bad:
        return y
    n, oh, ow, features = y.shape
    return lax.slice(y, (0, 0, 0, 0), (n, oh - (0 in bad), ow - (1 in bad), features))


def conv_geometry(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    *,
    stride: int | Pair,
    padding: Padding,
    dilation: int | Pair,
    groups: int,
    op: str = "conv2d",
) -> tuple[Pair, Pair, ExplicitPadding, Pair]:
    """Validate a convolution's arguments; return ``(stride, dilation, explicit padding, output (H, W))``.

    Args:
      x_shape: ``(N, H, W, C)``.
      w_shape: ``(KH, KW, C // groups, F)``.

    Raises ValueError naming the argument and its value when the call cannot work.
    """
    check_rank(op, "x", x_shape, 4, "N, H, W, C")
    check_rank(op, "w", w_shape, 4, "KH, KW, C_in / groups, C_out")
    try:
        groups = positive_int(groups, "groups")
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None
    channels = x_shape[3]
    kh, kw, in_per_group, features = w_shape
    if channels % groups:
        raise ValueError(f"{op}: input channels (={channels}) must be divisible by `groups` (={groups})")
    if features % groups:
        raise ValueError(f"{op}: output features (={features}) must be divisible by `groups` (={groups})")
    if in_per_group * groups != channels:
        raise ValueError(
            f"{op}: kernel shape {tuple(w_shape)} expects {in_per_group * groups} input channels "
            f"({in_per_group} per group x {groups} groups), but x has {channels} (x shape {tuple(x_shape)})"
        )
    stride = pair(stride, "stride")
    dilation = pair(dilation, "dilation")
    pads, out = window_geometry(op, (x_shape[1], x_shape[2]), (kh, kw), stride, dilation, padding)
    return stride, dilation, pads, out


def promote_with_bias(op: str, x: jax.Array, w: jax.Array, b: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``x`` and ``w`` in the promoted dtype of ``x``, ``w`` and ``b``; ValueError unless ``b`` is None or ``(F,)``."""
    if b is not None and tuple(b.shape) != (w.shape[3],):
        raise ValueError(f"{op}: `b` must have shape ({w.shape[3]},), got {tuple(b.shape)}")
    dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
    return x.astype(dtype), w.astype(dtype)


def add_bias(y: jax.Array, b: jax.Array | None) -> jax.Array:
    """``y`` ``(N, OH, OW, F)`` plus the bias ``(F,)`` at every cell (``y`` itself without one)."""
    return y if b is None else y + b.reshape(1, 1, 1, -1)


def bias_cotangent(dy: jax.Array, b: jax.Array | None) -> jax.Array | None:
    """``db``: the bias is added to every output cell, so it collects ``dy`` from all of them (None without one)."""
    return None if b is None else jnp.sum(dy, axis=(0, 1, 2)).astype(b.dtype)


def dx_padding(
    x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: Pair, dilation: Pair, pads: ExplicitPadding, out: Pair
) -> list[Pair]:
    """Padding of the lhs-dilated ``dy`` in the dx convolution: ``lo = (K - 1) * d - pad_lo``,
    ``hi = in - 1 - (out - 1) * s + pad_lo`` per axis (either may be < 0)."""
    return [
        ((k - 1) * d - p[0], size - 1 - (o - 1) * s + p[0])
        for k, d, p, size, o, s in zip(w_shape[:2], dilation, pads, x_shape[1:3], out, stride, strict=True)
    ]


def conv2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    stride: int | Pair = 1,
    padding: Padding = "VALID",
    dilation: int | Pair = 1,
    groups: int = 1,
) -> jax.Array:
    """2-D convolution (cross-correlation, as in every deep-learning framework).

    Args:
      x: input, ``(N, H, W, C)``.
      w: kernel, ``(KH, KW, C // groups, F)`` (HWIO).
      b: optional bias, ``(F,)``.
      stride: int or ``(sh, sw)``.
      padding: ``"SAME"``, ``"VALID"``, an int, ``(ph, pw)`` or ``((top, bottom), (left, right))``.
      dilation: kernel dilation, int or ``(dh, dw)``.
      groups: feature groups; ``groups == C`` gives a depthwise convolution.

    Returns:
      ``(N, OH, OW, F)``, in the promoted dtype of the arguments (mixed dtypes are promoted as ``jnp`` does).
    """
    stride, dilation, pads, out = conv_geometry(
        x.shape, w.shape, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    x, w = promote_with_bias("conv2d", x, w, b)
    # jax.vjp's dx of this convolution is the lhs-dilated one conv2d_vjp builds; where XLA:CPU would abort on it
    # (see xla_swap_aborts), pad x here instead: the transpose then starts from zero padding on that axis (and
    # crops the padding off dx), which XLA compiles
    bad = xla_swap_aborts(out, w.shape[:2], (1, 1), dx_padding(x.shape, w.shape, stride, dilation, pads, out),
                          stride, dilation, groups)  # fmt: skip
    if bad:
        x = pad_spatial(x, jnp.zeros((), x.dtype), [p if axis in bad else (0, 0) for axis, p in enumerate(pads)])
        pads = tuple((0, 0) if axis in bad else p for axis, p in enumerate(pads))
    y = lax.conv_general_dilated(
        x,
        w,
        stride,
        pads,
        rhs_dilation=dilation,
        dimension_numbers=_DIMENSIONS,
        feature_group_count=operator.index(groups),
    )
    return add_bias(y, b)


def conv2d_vjp(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    dy: jax.Array,
    *,
    stride: int | Pair = 1,
    padding: Padding = "VALID",
    dilation: int | Pair = 1,
    groups: int = 1,
    dw_method: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Hand-derived VJP of :func:`conv2d`: cotangents ``(dx, dw, db)`` of ``x``, ``w`` and ``b``.

    Args:
      x: the forward input, ``(N, H, W, C)``.
      w: the kernel, ``(KH, KW, C // groups, F)``.
      b: the forward's bias ``(F,)`` or None (only its presence and dtype are used).
      dy: cotangent of the output, ``(N, OH, OW, F)``.
      stride, padding, dilation, groups: as in the forward.
      dw_method: how ``dw`` is formed (the same sum, two formulations): ``"taps"``, one GEMM per kernel tap
        over the strided slice of ``x`` that tap saw; ``"conv"``, one convolution of ``x`` with ``dy`` in which
        the batch is the contracted axis and the forward's stride becomes the kernel dilation; ``"auto"`` (the
        default), whichever :func:`dw_method_for` names for the current backend.

    Returns:
      ``dx`` ``(N, H, W, C)``, ``dw`` ``(KH, KW, C // groups, F)``, ``db`` ``(F,)`` (``dy`` summed; None when
      ``b`` is None), each in the dtype of its primal.
    """
    stride, dilation, pads, out = conv_geometry(
        x.shape, w.shape, stride=stride, padding=padding, dilation=dilation, groups=groups, op="conv2d_vjp"
    )
    groups = operator.index(groups)
    n, height, width, channels = x.shape
    kh, kw, in_per_group, features = w.shape
    if dy.shape != (n, out[0], out[1], features):
        raise ValueError(f"conv2d_vjp: `dy` must have shape {(n, *out, features)}, got {tuple(dy.shape)}")
    if dw_method not in DW_METHODS:
        raise ValueError(f"conv2d_vjp: unknown dw_method {dw_method!r}; known: {', '.join(DW_METHODS)}")
    if dw_method == "auto":
        dw_method = dw_method_for()
    promote_with_bias("conv2d_vjp", x, w, b)
    x_dtype, w_dtype = x.dtype, w.dtype
    dtype = jnp.result_type(x, w, dy)
    x, w, dy = x.astype(dtype), w.astype(dtype), dy.astype(dtype)

    # dx: x[i] fed y[o] through tap j exactly when i + pad_lo = o * stride + j * dilation. Spread dy back onto
    # a stride-dilated grid (lhs_dilation) and correlate it with the spatially flipped kernel whose in/out
    # roles are swapped (per group): a "full" correlation, i.e. the transposed convolution (padding: dx_padding).
    per_group = features // groups
    w_flipped = (
        w.reshape(kh, kw, in_per_group, groups, per_group)
        .transpose(0, 1, 4, 3, 2)
        .reshape(kh, kw, per_group, groups * in_per_group)[::-1, ::-1]
    )
    dx_pads = dx_padding(x.shape, w.shape, stride, dilation, pads, out)
    dx = lhs_dilated_conv(dy, w_flipped, dx_pads, stride, dilation, groups)  # safe from the XLA:CPU abort above

    if dw_method == "conv":
        dw = _dw_as_conv(x, dy, (kh, kw), stride, dilation, pads, groups)
    else:
        # dw[j] = sum over batch and outputs of x_pad[o * stride + j * dilation] (x) dy[o]: per kernel tap, the
        # strided slice of x_pad that tap saw, contracted with dy over (n, oh, ow)
        dw = tap_products(pad_spatial(x, jnp.zeros((), dtype), pads), dy, (kh, kw), dilation, stride, groups)
    return dx.astype(x_dtype), dw.astype(w_dtype), bias_cotangent(dy, b)


def _dw_as_conv(x, dy, kernel, stride, dilation, pads, groups) -> jax.Array:
    """The same sum read as one convolution: dw[j, c, f] = sum_{n, o} x_pad[n, o * stride + j * dilation, c]
    dy[n, o, f] is a correlation of x (channels as the batch, the batch as the contracted feature axis) with dy
    (outputs as the kernel's window, dilated by the forward's stride), stepping by the forward's dilation. The
    high padding is trimmed so the output is exactly the kernel's size (a window step past it saw no input);
    groups split the channels (the lhs batch) and the features alike, which is ``batch_group_count``."""
    _, height, width, _ = x.shape
    _, oh, ow, _ = dy.shape
    trimmed = [
        (p[0], (o - 1) * s + (k - 1) * d + 1 - size - p[0])
        for p, o, s, k, d, size in zip(pads, (oh, ow), stride, kernel, dilation, (height, width), strict=True)
    ]
    return lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0),  # (C, H, W, N): channels as the batch, the batch as the features
        dy.transpose(1, 2, 0, 3),  # (OH, OW, N, F): the outputs as the window, N in, F out
        dilation,
        trimmed,
        rhs_dilation=stride,
        dimension_numbers=("NHWC", "HWIO", "HWNC"),  # output (KH, KW, C // groups, F), HWIO
        batch_group_count=groups,
    )


register(conv2d, conv2d_vjp)
