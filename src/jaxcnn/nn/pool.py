"""Pooling layers (no parameters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax

import jaxcnn.functional as F
from jaxcnn.functional._args import Padding, Pair, explicit_padding, pair
from jaxcnn.functional.pool import pool_geometry
from jaxcnn.nn.conv import freeze_padding
from jaxcnn.nn.layer import Layer, Params, Shape


class PoolResiduals(NamedTuple):
    x: jax.Array  # the layer's input, (N, H, W, C)


@dataclass(frozen=True)
class _Pool2D(Layer):
    window: int | Pair = 2
    stride: int | Pair | None = None
    padding: Padding = "VALID"

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

    def _check_x(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects input of shape (N, H, W, C), got {tuple(x.shape)}")


@dataclass(frozen=True)
class MaxPool2D(_Pool2D):
    """Max pooling; ``stride=None`` means ``stride = window``. Ties: see :func:`jaxcnn.functional.max_pool2d_vjp`."""

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, PoolResiduals]:
        self._check_x(x)
        return F.max_pool2d(x, self.window, self.stride, self.padding), PoolResiduals(x)

    def backward(self, params: Params, residuals: PoolResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        return F.max_pool2d_vjp(residuals.x, dy, window=self.window, stride=self.stride, padding=self.padding), {}


@dataclass(frozen=True)
class AvgPool2D(_Pool2D):
    """Average pooling over the real (unpadded) cells of each window; ``stride=None`` means ``stride = window``."""

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, PoolResiduals]:
        self._check_x(x)
        return F.avg_pool2d(x, self.window, self.stride, self.padding), PoolResiduals(x)

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
