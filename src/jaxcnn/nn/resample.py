"""Nearest-neighbour upsampling layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax

import jaxcnn.functional as F
from jaxcnn._validate import Pair, pair
from jaxcnn.nn.layer import Layer, Params, Shape


class UpsampleResiduals(NamedTuple):
    x: jax.Array  # the layer's input (its shape sizes dx)


@dataclass(frozen=True)
class Upsample2D(Layer):
    """Nearest-neighbour upsampling by an integer factor per spatial axis: each pixel becomes a
    ``scale[0] x scale[1]`` block. Its backward sums ``dy`` over each block.

    Input ``(N, H, W, C)``; output ``(N, H * sh, W * sw, C)``.
    """

    scale: int | Pair = 2

    name_prefix: ClassVar[str] = "Upsample"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", pair(self.scale, "scale"))

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(f"Upsample2D expects inputs of shape (H, W, C) (batch excluded), got {input_shape}")
        height, width, channels = input_shape
        return (height * self.scale[0], width * self.scale[1], channels)

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, UpsampleResiduals]:
        return F.upsample_nearest2d(x, self.scale), UpsampleResiduals(x)

    def backward(self, params: Params, residuals: UpsampleResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        return F.upsample_nearest2d_vjp(residuals.x, dy, scale=self.scale), {}
