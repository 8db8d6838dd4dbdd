"""Batch, layer and group normalisation (features on the last axis) and their hand-derived backward rules.

All three standardise ``x`` over some axes and then apply a per-channel affine map::

    xhat = (x - mean) * inv,   inv = rsqrt(var + epsilon),   y = xhat * scale + bias

with ``mean`` and the *biased* ``var`` (mean of squared deviations) taken over the op's axes: every axis but the
last for batch norm, the last axis for layer norm, every non-batch axis and the group's channels for group norm.
The semantics (and the order of the floating-point operations, ``(x - mean) * (inv * scale) + bias``) are those
of ``flax.linen.BatchNorm``, ``LayerNorm`` and ``GroupNorm``. Statistics are computed in at least float32 (inputs
in bfloat16 or float16 are promoted, the result is cast back), as Flax does.

All three run one forward and one backward (``_forward``, ``_backward``) on a ``_View`` of ``x`` whose trailing
axes index the parameters: ``x`` itself for batch and layer norm, ``(N, ..., groups, C // groups)`` for groups.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.functional._norm_checks import check_batch_norm, check_common, check_dy, check_groups, check_saved
from jaxcnn.functional._registry import register

# -- shared math ----------------------------------------------------------------------------------------------


def _dtypes(x: jax.Array, scale: Any, bias: Any, *others: Any) -> tuple[Any, Any]:
    """``(compute dtype, output dtype)``. The output dtype promotes ``x``, ``scale`` and ``bias`` (as Flax); the
    compute dtype promotes every array given (None skipped) to at least float32, so that the statistics of
    half-precision inputs are not accumulated in half precision."""
    output = jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
    compute = jnp.result_type(output, *(a for a in others if a is not None))
    return jnp.promote_types(compute, jnp.float32), output


def _cast(value: Any, dtype: Any) -> Any:
    return None if value is None else jnp.asarray(value).astype(dtype)


def _per_channel(param: jax.Array | None, ndim: int, param_shape: tuple[int, ...]) -> jax.Array | None:
    """A ``(C,)`` parameter reshaped to broadcast against a view of rank ``ndim`` ending in ``param_shape``."""
    return None if param is None else param.reshape((1,) * (ndim - len(param_shape)) + param_shape)


def _moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over ``axes`` (kept as size-1 axes), in two passes: free of the cancellation
    of Flax's default one-pass ``E[x^2] - E[x]^2``, with which it agrees to that formula's round-off."""
    mean = jnp.mean(x, axis=axes, keepdims=True)
    centred = x - mean
    return mean, jnp.mean(centred * centred, axis=axes, keepdims=True)


def _normalize(x, scale, bias, *, axes, param_shape, epsilon, stats=None):
    """``y = (x - mean) * (inv * scale) + bias`` with ``inv = rsqrt(var + epsilon)`` on a view; returns
    ``(y, mean, var, inv)``.

    ``x``, ``scale``, ``bias`` are in the compute dtype; ``scale``/``bias`` are ``(C,)`` or None and act on the
    trailing ``param_shape`` axes of ``x``. ``stats``: fixed ``(mean, var)`` broadcastable to ``x``; when None
    they are the batch statistics over ``axes``.
    """
    mean, var = _moments(x, axes) if stats is None else stats
    inv = lax.rsqrt(var + epsilon)
    multiplier = inv if scale is None else inv * _per_channel(scale, x.ndim, param_shape)
    y = (x - mean) * multiplier
    if bias is not None:
        y = y + _per_channel(bias, x.ndim, param_shape)
    return y, mean, var, inv


def _normalize_vjp(x, scale, dy, *, axes, param_shape, epsilon, stats=None, saved=None):
    """Cotangents ``(dx, dscale, dbias)`` of :func:`_normalize` (same view and arguments); ``dscale`` and
    ``dbias`` are ``(C,)`` and returned whether or not the forward had them. ``saved``: the batch ``(mean, inv)``
    the forward normalised with (broadcastable to ``x``), so that they are not recomputed from ``x``."""
    if saved is not None:
        mean, inv = saved
    else:
        mean, var = _moments(x, axes) if stats is None else stats
        inv = lax.rsqrt(var + epsilon)
    xhat = (x - mean) * inv
    # y = xhat * scale + bias per channel: the parameters collect dy (times xhat) from every non-channel cell.
    leading = tuple(range(x.ndim - len(param_shape)))
    dbias = jnp.sum(dy, axis=leading).reshape(-1)
    dscale = jnp.sum(dy * xhat, axis=leading).reshape(-1)
    dxhat = dy if scale is None else dy * _per_channel(scale, x.ndim, param_shape)
    if stats is not None:
        # fixed statistics: xhat is affine in x, dxhat/dx = inv
        return dxhat * inv, dscale, dbias
    # Batch statistics over M cells: d mean/dx_i = 1/M, d var/dx_i = 2 (x_i - mean)/M (the mean's own term
    # vanishes since sum (x - mean) = 0) and d inv/d var = -inv^3/2, so
    # d xhat_j/d x_i = inv (delta_ij - 1/M - xhat_i xhat_j / M). Contracting with dxhat_j:
    # dx = inv/M (M dxhat - sum dxhat - xhat sum(dxhat xhat)) = inv (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
    if axes != leading:
        centre = jnp.mean(dxhat, axis=axes, keepdims=True)
        along = jnp.mean(dxhat * xhat, axis=axes, keepdims=True)
        return inv * (dxhat - centre - xhat * along), dscale, dbias
    # batch norm: the statistics' axes are the parameters' reduction axes and scale is constant along them, so
    # mean(dxhat) = scale dbias / M and mean(dxhat xhat) = scale dscale / M: two reductions in all, not four,
    # and dx = inv scale (dy - (dbias + xhat dscale) / M)
    cells = math.prod(x.shape[i] for i in axes)
    multiplier = inv if scale is None else inv * _per_channel(scale, x.ndim, param_shape)
    centre, along = (_per_channel(d / cells, x.ndim, param_shape) for d in (dbias, dscale))
    return multiplier * (dy - centre - xhat * along), dscale, dbias


def _cotangents(x, scale, bias, dx, dscale, dbias):
    """Cast to the primal dtypes; None for a parameter the forward did not have."""
    params = [None if p is None else d.astype(jnp.asarray(p).dtype) for d, p in ((dscale, scale), (dbias, bias))]
    return (dx.astype(x.dtype), *params)


class _View(NamedTuple):
    """How an op sees ``x``: reshaped to ``shape``, whose trailing ``param_shape`` axes index the parameters,
    with the statistics taken over ``axes``."""

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    param_shape: tuple[int, ...]


def _channels_view(x: jax.Array, axes: tuple[int, ...]) -> _View:
    return _View(tuple(x.shape), axes, (x.shape[-1],))


def _group_view(x: jax.Array, groups: int) -> _View:
    """``x`` split into ``(N, ..., groups, C // groups)``, reduced over every non-batch axis and the group."""
    shape = (*x.shape[:-1], groups, x.shape[-1] // groups)
    return _View(shape, (*range(1, x.ndim - 1), x.ndim), shape[-2:])


def _fixed_stats(running: tuple[Any, Any] | None, dtype: Any, view: _View) -> tuple[jax.Array, jax.Array] | None:
    """A pair of ``(C,)`` statistics (the running ``(mean, var)``, or the saved batch ``(mean, inv)``) in
    ``dtype``, shaped to broadcast against the view; None stays None."""
    if running is None:
        return None
    return tuple(_per_channel(_cast(s, dtype), len(view.shape), view.param_shape) for s in running)


def _forward(x, scale, bias, epsilon, view: _View, *, running=None, others=()):
    """``(y, mean, var, inv)`` of the op that ``view`` describes, ``y`` in the output dtype, the statistics in
    the compute dtype (``others``: arrays that take part in the compute dtype; ``running``: fixed statistics)."""
    dtype, out_dtype = _dtypes(x, scale, bias, *others)
    y, mean, var, inv = _normalize(
        x.astype(dtype).reshape(view.shape),
        _cast(scale, dtype),
        _cast(bias, dtype),
        axes=view.axes,
        param_shape=view.param_shape,
        epsilon=epsilon,
        stats=_fixed_stats(running, dtype, view),
    )
    return y.reshape(x.shape).astype(out_dtype), mean, var, inv


def _backward(x, scale, bias, dy, epsilon, view: _View, *, running=None, others=(), saved=None):
    """``(dx, dscale, dbias)`` of :func:`_forward` (the view's reshape is a relabelling: its VJP reshapes back);
    ``saved``: the forward's batch ``(mean, inv)``, ``(C,)`` each, or None to recompute them."""
    dtype, _ = _dtypes(x, scale, bias, *others, dy)
    dx, dscale, dbias = _normalize_vjp(
        x.astype(dtype).reshape(view.shape),
        _cast(scale, dtype),
        _cast(dy, dtype).reshape(view.shape),
        axes=view.axes,
        param_shape=view.param_shape,
        epsilon=epsilon,
        stats=_fixed_stats(running, dtype, view),
        saved=_fixed_stats(saved, dtype, view),
    )
    return _cotangents(x, scale, bias, dx.reshape(x.shape), dscale, dbias)


# -- batch norm -----------------------------------------------------------------------------------------------


class BatchStatistics(NamedTuple):
    """What a training-mode :func:`batch_norm_with_stats` normalised with, ``(C,)`` each, in the compute dtype
    (at least float32): the backward's residuals (``batch_norm_vjp(..., stats=)``), so that it does not
    recompute them from ``x``."""

    mean: jax.Array  # the batch mean
    inv_std: jax.Array  # rsqrt(biased batch variance + epsilon)


def batch_norm_with_stats(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running_mean: jax.Array,
    running_var: jax.Array,
    *,
    train: bool = True,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array, jax.Array, BatchStatistics | None]:
    """:func:`batch_norm`, also returning the batch statistics it normalised with (for the backward).

    Args and the first three results: as :func:`batch_norm`. The fourth: :class:`BatchStatistics` ``(C,)`` in
    training mode, None in inference mode (the backward then reads the running statistics).
    """
    x = jnp.asarray(x)
    epsilon = check_batch_norm("batch_norm", x, scale, bias, running_mean, running_var, train, momentum, epsilon)
    running = (running_mean, running_var)
    view = _channels_view(x, tuple(range(x.ndim - 1)))
    y, mean, var, inv = _forward(x, scale, bias, epsilon, view, running=None if train else running, others=running)
    if not train:
        return y, running_mean, running_var, None
    new_stats = tuple(
        (momentum * _cast(old, mean.dtype) + (1 - momentum) * batch.reshape(-1)).astype(jnp.asarray(old).dtype)
        for old, batch in ((running_mean, mean), (running_var, var))
    )
    return (y, *new_stats, BatchStatistics(mean.reshape(-1), inv.reshape(-1)))


def batch_norm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running_mean: jax.Array,
    running_var: jax.Array,
    *,
    train: bool = True,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch normalisation over every axis but the last (``flax.linen.BatchNorm``).

    Args:
      x: ``(..., C)``: ``(N, H, W, C)`` conv features or ``(N, C)`` dense features (rank >= 2).
      scale, bias: ``(C,)`` or None (no scale / no bias).
      running_mean, running_var: ``(C,)`` running statistics (state, not differentiated).
      train: True: normalise with the batch mean and biased batch variance and update the running statistics;
        False: normalise with the running statistics and return them unchanged.
      momentum: in ``[0, 1]``; ``new = momentum * running + (1 - momentum) * batch`` (biased ``var``, as Flax).
      epsilon: ``>= 0``, added to the variance.

    Returns:
      ``(y, new_running_mean, new_running_var)``: ``y`` of the shape of ``x`` in the promoted dtype of ``x``,
      ``scale`` and ``bias``; the running statistics ``(C,)`` in their own dtypes.
    """
    options = dict(train=train, momentum=momentum, epsilon=epsilon)
    return batch_norm_with_stats(x, scale, bias, running_mean, running_var, **options)[:3]


def batch_norm_vjp(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running_mean: jax.Array,
    running_var: jax.Array,
    dy: jax.Array,
    *,
    train: bool = True,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    stats: BatchStatistics | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, None, None]:
    """Hand-derived VJP of :func:`batch_norm` with respect to ``y`` only (the running statistics are state).

    Args:
      x, scale, bias, running_mean, running_var: as in the forward; dy: cotangent of ``y``, shape of ``x``.
      train, momentum, epsilon: as in the forward.
      stats: in training mode, the :class:`BatchStatistics` that :func:`batch_norm_with_stats` returned for this
        ``x``: the backward reuses them instead of recomputing the batch mean and variance (two reductions of
        ``x`` fewer). None: recomputed from ``x`` (the same values).

    Returns:
      ``(dx, dscale, dbias, None, None)``: ``dx`` shape of ``x``, ``dscale``/``dbias`` ``(C,)`` (None where the
      forward had no scale / bias), each in its primal's dtype; None for the running statistics (state, not
      differentiated).
    """
    x = jnp.asarray(x)
    epsilon = check_batch_norm("batch_norm_vjp", x, scale, bias, running_mean, running_var, train, momentum, epsilon)
    check_dy("batch_norm_vjp", x, dy)
    check_saved("batch_norm_vjp", stats, x.shape[-1], train)
    running = (running_mean, running_var)
    view = _channels_view(x, tuple(range(x.ndim - 1)))
    options = dict(running=None if train else running, others=running, saved=stats)
    return (*_backward(x, scale, bias, dy, epsilon, view, **options), None, None)


# -- layer norm -----------------------------------------------------------------------------------------------


def layer_norm(
    x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, *, epsilon: float = 1e-6
) -> jax.Array:
    """Layer normalisation over the last axis of each example (``flax.linen.LayerNorm`` defaults).

    Args:
      x: ``(N, ..., C)`` (rank >= 2); every ``(..., :)`` row is normalised on its own.
      scale, bias: ``(C,)`` or None.
      epsilon: ``>= 0``, added to the (biased) variance.

    Returns:
      ``y``, shape of ``x``, in the promoted dtype of ``x``, ``scale`` and ``bias``.
    """
    x = jnp.asarray(x)
    epsilon = check_common("layer_norm", x, scale, bias, epsilon)
    return _forward(x, scale, bias, epsilon, _channels_view(x, (x.ndim - 1,)))[0]


def layer_norm_vjp(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, dy: jax.Array, *, epsilon: float = 1e-6
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Hand-derived VJP of :func:`layer_norm`.

    Args:
      x, scale, bias, epsilon: as in the forward; dy: cotangent of ``y``, shape of ``x``.

    Returns:
      ``(dx, dscale, dbias)``: shape of ``x``, ``(C,)``, ``(C,)`` (None where the forward had no scale / bias),
      each in its primal's dtype.
    """
    x = jnp.asarray(x)
    epsilon = check_common("layer_norm_vjp", x, scale, bias, epsilon)
    check_dy("layer_norm_vjp", x, dy)
    return _backward(x, scale, bias, dy, epsilon, _channels_view(x, (x.ndim - 1,)))


# -- group norm -----------------------------------------------------------------------------------------------


def group_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    groups: int,
    epsilon: float = 1e-6,
) -> jax.Array:
    """Group normalisation (``flax.linen.GroupNorm(num_groups=groups)``).

    The ``C`` channels are split into ``groups`` consecutive groups; each example's group is normalised over all
    of its non-batch axes and the group's channels. ``groups=1`` normalises each example over ``(H, W, C)``;
    ``groups=C`` is instance normalisation.

    Args:
      x: ``(N, ..., C)`` (rank >= 2), ``C`` divisible by ``groups``.
      scale, bias: ``(C,)`` or None.
      groups: number of groups, a positive divisor of ``C``.
      epsilon: ``>= 0``, added to the (biased) variance.

    Returns:
      ``y``, shape of ``x``, in the promoted dtype of ``x``, ``scale`` and ``bias``.
    """
    x = jnp.asarray(x)
    epsilon = check_common("group_norm", x, scale, bias, epsilon)
    groups = check_groups("group_norm", x.shape[-1], groups)
    return _forward(x, scale, bias, epsilon, _group_view(x, groups))[0]


def group_norm_vjp(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    dy: jax.Array,
    *,
    groups: int,
    epsilon: float = 1e-6,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Hand-derived VJP of :func:`group_norm`.

    Args:
      x, scale, bias, groups, epsilon: as in the forward; dy: cotangent of ``y``, shape of ``x``.

    Returns:
      ``(dx, dscale, dbias)``: shape of ``x``, ``(C,)``, ``(C,)`` (None where the forward had no scale / bias),
      each in its primal's dtype.
    """
    x = jnp.asarray(x)
    epsilon = check_common("group_norm_vjp", x, scale, bias, epsilon)
    groups = check_groups("group_norm_vjp", x.shape[-1], groups)
    check_dy("group_norm_vjp", x, dy)
    return _backward(x, scale, bias, dy, epsilon, _group_view(x, groups))


register(batch_norm, batch_norm_vjp, differentiable=(0, 1, 2))
register(layer_norm, layer_norm_vjp)
register(group_norm, group_norm_vjp)
