"""Pooling layers (no parameters)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax

import jaxcnn.functional as F
from jaxcnn._validate import Padding, Pair, explicit_padding, pair
from jaxcnn.functional.pool import pool_geometry
from jaxcnn.nn.conv import freeze_padding
from jaxcnn.nn.layer import Layer, Params, Shape


class PoolResiduals(NamedTuple):
    x: jax.Array  # the layer's input, (N, H, W, C)


@dataclass(frozen=True)
class _Pool2D(Layer):
    """Shared parts of :class:`MaxPool2D` and :class:`AvgPool2D`.

    The arguments mirror ``flax.linen.max_pool`` / ``avg_pool``'s ``window_shape`` (required), ``strides`` and
    ``padding`` (``"VALID"``), with one deliberate difference: ``stride=None`` means ``stride = window``
    (non-overlapping windows, as :func:`jaxcnn.functional.max_pool2d`, PyTorch's and Keras's pooling layers),
    where Flax's functions take stride 1.
    """

    window: int | Pair
    stride: int | Pair | None = None
    padding: Padding = "VALID"
    function: ClassVar[Callable[..., jax.Array]]  # the functional op

    def __post_init__(self):
        object.__setattr__(self, "window", pair(self.window, "window"))
        if self.stride is not None:
            object.__setattr__(self, "stride", pair(self.stride, "stride"))
        object.__setattr__(self, "padding", freeze_padding(self.padding))
        if not isinstance(self.padding, str):
            pads = explicit_padding(self.padding, (1, 1), self.window, (1, 1))
            if any(max(p) >= k for p, k in zip(pads, self.window, strict=True)):
                raise ValueError(
                    f"padding {self.padding!r} must be smaller than the window {self.window} on every side"
                )

    def output_shape(self, input_shape: Shape) -> Shape:
        name = type(self).__name__
        if len(input_shape) != 3:
            raise ValueError(f"{name} expects inputs of shape (H, W, C) (batch excluded), got {tuple(input_shape)}")
        _, _, _, out = pool_geometry((1, *input_shape), self.window, self.stride, self.padding, op=name)
        return (*out, input_shape[2])

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, PoolResiduals]:
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects input of shape (N, H, W, C), got {tuple(x.shape)}")
        return type(self).function(x, self.window, self.stride, self.padding), PoolResiduals(x)


@dataclass(frozen=True)
class MaxPool2D(_Pool2D):
    """Max pooling; ``stride=None`` means ``stride = window``. Ties: see :func:`jaxcnn.functional.max_pool2d_vjp`.

    Input ``(N, H, W, C)``; output ``(N, OH, OW, C)``.
    """

    function = staticmethod(F.max_pool2d)

    def backward(self, params: Params, residuals: PoolResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        return F.max_pool2d_vjp(residuals.x, dy, window=self.window, stride=self.stride, padding=self.padding), {}


@dataclass(frozen=True)
class AvgPool2D(_Pool2D):
    """Average pooling over the real (unpadded) cells of each window; ``stride=None`` means ``stride = window``.

    With padding this differs from ``flax.linen.avg_pool``, whose default ``count_include_pad=True`` counts the
    padded zeros (to_flax passes ``count_include_pad=False``). Input ``(N, H, W, C)``; output ``(N, OH, OW, C)``.
    """

    function = staticmethod(F.avg_pool2d)

    def backward(self, params: Params, residuals: PoolResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        return F.avg_pool2d_vjp(residuals.x, dy, window=self.window, stride=self.stride, padding=self.padding), {}


@dataclass(frozen=True)
class GlobalAvgPool2D(Layer):
    """Mean over height and width: ``(N, H, W, C) -> (N, C)``."""

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(
                f"GlobalAvgPool2D expects inputs of shape (H, W, C) (batch excluded), got {tuple(input_shape)}"
            )
        return (input_shape[2],)

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, PoolResiduals]:
        if x.ndim != 4:
            raise ValueError(f"GlobalAvgPool2D expects input of shape (N, H, W, C), got {tuple(x.shape)}")
        return F.global_avg_pool2d(x), PoolResiduals(x)

    def backward(self, params: Params, residuals: PoolResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        return F.global_avg_pool2d_vjp(residuals.x, dy), {}
