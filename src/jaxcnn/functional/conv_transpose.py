"""2-D transposed convolution (NHWC input, HWIO kernel), as ``jax.lax.conv_transpose`` / ``flax.linen.ConvTranspose``
compute it, and its hand-derived backward rule.

Forward, one spatial axis. Spread ``x`` onto a grid ``stride`` times finer (``stride - 1`` zeros between
neighbours), pad that grid with ``(lo, hi)`` zeros and correlate it with the (dilated) kernel at stride 1::

    z[i * stride + lo] = x[i]                  (z zero elsewhere; len z = (H - 1) * stride + 1 + lo + hi)
    y[n, o, f] = b[f] + sum_{j, c} z[n, o + j * dilation, c] * w[j, c, f]

so ``OH = (H - 1) * stride + 1 + lo + hi - (KH - 1) * dilation``. As in ``lax.conv_transpose`` (with
``transpose_kernel=False``), the kernel is neither flipped nor has its in/out axes swapped: ``w`` is
``(KH, KW, C, F)`` with ``C`` the input features. ``(lo, hi)``, per axis, come from ``padding``:

* explicit ``((top, bottom), (left, right))`` (or an int ``p`` for ``((p, p), (p, p))``, or ``(ph, pw)``):
  the zeros added around the stride-dilated input, exactly as ``conv_general_dilated(..., lhs_dilation=stride)``
  reads its ``padding`` (this is *not* PyTorch's ``padding``, which crops the output);
* ``"VALID"``: ``lo = K' - 1``, ``hi = stride - 1 + max(K' - stride, 0)`` with ``K' = (K - 1) * dilation + 1``,
  giving ``OH = H * stride + max(K' - stride, 0)``;
* ``"SAME"``: total ``K' + stride - 2``, ``lo = K' - 1`` if ``stride > K' - 1`` else ``ceil(total / 2)``,
  giving ``OH = H * stride``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn._validate import ExplicitPadding, Padding, Pair, check_rank, explicit_padding, pair
from jaxcnn.functional._registry import register
from jaxcnn.functional._windows import pad_spatial, tap_products
from jaxcnn.functional.conv import add_bias, bias_cotangent, lhs_dilated_conv, promote_with_bias

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _string_pads(mode: str, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """``(lo, hi)`` of one axis for ``"SAME"`` / ``"VALID"``, as ``jax.lax`` ``_conv_transpose_padding`` does."""
    k = (kernel - 1) * dilation + 1
    if mode == "SAME":
        total = k + stride - 2
        lo = k - 1 if stride > k - 1 else -(-total // 2)
    else:
        total = k + stride - 2 + max(k - stride, 0)
        lo = k - 1
    return lo, total - lo


def conv_transpose_geometry(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    *,
    stride: int | Pair,
    padding: Padding,
    dilation: int | Pair,
    op: str = "conv_transpose2d",
) -> tuple[Pair, Pair, ExplicitPadding, Pair]:
    """Validate a transposed convolution's arguments; return ``(stride, dilation, explicit padding, output (H, W))``.

    The explicit padding is the one applied to the stride-dilated input (see the module docstring).

    Args:
      x_shape: ``(N, H, W, C)``.
      w_shape: ``(KH, KW, C, F)``.

    Raises ValueError naming the argument and its value when the call cannot work.
    """
    check_rank(op, "x", x_shape, 4, "N, H, W, C")
    check_rank(op, "w", w_shape, 4, "KH, KW, C_in, C_out")
    kh, kw, in_features, _ = w_shape
    if in_features != x_shape[3]:
        raise ValueError(
            f"{op}: kernel shape {tuple(w_shape)} expects {in_features} input channels, "
            f"but x has {x_shape[3]} (x shape {tuple(x_shape)})"
        )
    if min(x_shape[1], x_shape[2], kh, kw) < 1:
        raise ValueError(f"{op}: spatial sizes must be >= 1, got x shape {tuple(x_shape)} and w shape {tuple(w_shape)}")
    try:
        stride = pair(stride, "stride")
        dilation = pair(dilation, "dilation")
        if isinstance(padding, str):
            mode = padding.upper()
            if mode not in ("SAME", "VALID"):
                raise ValueError(f"`padding` must be 'SAME', 'VALID', an int or explicit pairs, got {padding!r}")
            pads = tuple(_string_pads(mode, k, s, d) for k, s, d in zip((kh, kw), stride, dilation, strict=True))
        else:
            pads = explicit_padding(padding, (x_shape[1], x_shape[2]), (kh, kw), stride, dilation)
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None
    out = []
    for axis, n, k, s, d, p in zip(("height", "width"), x_shape[1:3], (kh, kw), stride, dilation, pads, strict=True):
        size = (n - 1) * s + 1 + p[0] + p[1] - (k - 1) * d
        if size < 1:
            raise ValueError(
                f"{op}: output {axis} would be {size} < 1: (input {n} - 1) * stride {s} + 1 + padding {p[0]}+{p[1]} "
                f"is smaller than the kernel {k} with dilation {d} ({(k - 1) * d + 1})"
            )
        out.append(size)
    return stride, dilation, (pads[0], pads[1]), (out[0], out[1])


def conv_transpose2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    stride: int | Pair = 1,
    padding: Padding = "VALID",
    dilation: int | Pair = 1,
) -> jax.Array:
    """2-D transposed ("fractionally strided") convolution, identical to ``lax.conv_transpose`` plus a bias.

    Equals ``jax.lax.conv_transpose(x, w, stride, padding, rhs_dilation=dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=False) + b`` and ``flax.linen.ConvTranspose``.

    Args:
      x: input, ``(N, H, W, C)``.
      w: kernel, ``(KH, KW, C, F)`` (HWIO, ``I`` = input features ``C``, not flipped).
      b: optional bias, ``(F,)``.
      stride: the upsampling factor, int or ``(sh, sw)``.
      padding: ``"SAME"`` (output ``H * stride``), ``"VALID"``, an int, ``(ph, pw)`` or
        ``((top, bottom), (left, right))``: zeros around the stride-dilated input (see the module docstring).
      dilation: kernel dilation, int or ``(dh, dw)``.

    Returns:
      ``(N, OH, OW, F)`` with ``OH = (H - 1) * sh + 1 + top + bottom - (KH - 1) * dh``, in the promoted dtype.
    """
    stride, dilation, pads, _ = conv_transpose_geometry(
        x.shape, w.shape, stride=stride, padding=padding, dilation=dilation
    )
    x, w = promote_with_bias("conv_transpose2d", x, w, b)
    # lhs_dilated_conv: lax.conv_general_dilated(x, w, (1, 1), pads, lhs_dilation=stride, rhs_dilation=dilation),
    # except on the geometries where XLA:CPU would abort (kernel 2, stride 2, no padding on one axis, roughly a kernel
    # longer than the input on the other; see functional/conv.py), which it computes one output row longer.
    return add_bias(lhs_dilated_conv(x, w, pads, stride, dilation), b)


def conv_transpose2d_vjp(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    dy: jax.Array,
    *,
    stride: int | Pair = 1,
    padding: Padding = "VALID",
    dilation: int | Pair = 1,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Hand-derived VJP of :func:`conv_transpose2d`: cotangents ``(dx, dw, db)`` of ``x``, ``w`` and ``b``.

    Args:
      x: the forward input, ``(N, H, W, C)``.
      w: the kernel, ``(KH, KW, C, F)``.
      b: the forward's bias ``(F,)`` or None (only its presence and dtype are used).
      dy: cotangent of the output, ``(N, OH, OW, F)``.
      stride, padding, dilation: as in the forward.

    Returns:
      ``dx`` ``(N, H, W, C)``, ``dw`` ``(KH, KW, C, F)``, ``db`` ``(F,)`` (``dy`` summed; None when ``b`` is
      None), each in the dtype of its primal.
    """
    stride, dilation, pads, out = conv_transpose_geometry(
        x.shape, w.shape, stride=stride, padding=padding, dilation=dilation, op="conv_transpose2d_vjp"
    )
    n, (kh, kw, _, features) = x.shape[0], w.shape
    if dy.shape != (n, out[0], out[1], features):
        raise ValueError(f"conv_transpose2d_vjp: `dy` must have shape {(n, *out, features)}, got {tuple(dy.shape)}")
    promote_with_bias("conv_transpose2d_vjp", x, w, b)
    x_dtype, w_dtype = x.dtype, w.dtype
    dtype = jnp.result_type(x, w, dy)
    x, w, dy = x.astype(dtype), w.astype(dtype), dy.astype(dtype)

    # Per axis, x[i] reaches y[o] through tap j exactly when o = i * s + lo - j * d (0 <= o < OH). Substituting
    # the flipped tap j' = K - 1 - j: o = i * s + j' * d - ((K - 1) * d - lo). So with dy_pad = dy padded by
    # ((K - 1) * d - lo, (K - 1) * d - hi) (negative = cropped; its length is (H - 1) * s + 1 + (K - 1) * d):
    #   dx[i]         = sum_j' dy_pad[i * s + j' * d] . w[K - 1 - j']^T  (a plain strided, dilated correlation
    #                   of dy with the flipped, in/out-swapped kernel: window stride s, exactly H outputs)
    #   dw[K - 1 - j'] = sum_i x[i] (x) dy_pad[i * s + j' * d]          (one GEMM per tap over (n, h, w))
    # Neither is lhs-dilated, so the XLA:CPU abort the forward avoids (see functional/conv.py) cannot occur here.
    dy_pads = [((k - 1) * d - p[0], (k - 1) * d - p[1]) for k, d, p in zip((kh, kw), dilation, pads, strict=True)]
    w_flipped = w[::-1, ::-1].transpose(0, 1, 3, 2)
    dx = lax.conv_general_dilated(dy, w_flipped, stride, dy_pads, rhs_dilation=dilation, dimension_numbers=_DIMENSIONS)
    dy_pad = pad_spatial(dy, jnp.zeros((), dtype), dy_pads)
    dw = tap_products(dy_pad, x, (kh, kw), dilation, stride).transpose(0, 1, 3, 2)[::-1, ::-1]
    return dx.astype(x_dtype), dw.astype(w_dtype), bias_cotangent(dy, b)


register(conv_transpose2d, conv_transpose2d_vjp)
