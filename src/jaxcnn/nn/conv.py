"""Convolution layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

import jaxcnn.functional as F
from jaxcnn.functional._args import Padding, Pair, explicit_padding, pair, positive_int
from jaxcnn.functional.conv import conv_geometry
from jaxcnn.functional.conv_transpose import conv_transpose_geometry
from jaxcnn.nn.layer import (
    Layer,
    Params,
    Shape,
    check_input_shape,
    check_key,
    check_param_keys,
    kernel_and_bias,
    kernel_grads,
)


def freeze_padding(padding: Padding) -> Padding:
    """Validate a padding spelling early and make it hashable (lists become tuples)."""
    explicit_padding(padding, (1, 1), (1, 1), (1, 1))  # raises on a bad spelling
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return padding
    return tuple(tuple(p) if not isinstance(p, int) else p for p in padding)


class ConvResiduals(NamedTuple):
    x: jax.Array  # the layer's input, (N, H, W, C)


@dataclass(frozen=True)
class Conv2D(Layer):
    """2-D convolution over NHWC inputs with an HWIO kernel (parameters ``kernel`` and ``bias``, as Flax's Conv).

    Args:
      features: output channels.
      kernel_size: int or ``(kh, kw)``.
      stride, padding, dilation, groups: as :func:`jaxcnn.functional.conv2d`.
      use_bias: add a learned bias (zeros at init).

    The kernel starts from ``lecun_normal`` (fan-in ``kh * kw * C / groups``), as in Flax.
    Input ``(N, H, W, C)``; output ``(N, OH, OW, features)``.
    """

    features: int
    kernel_size: int | Pair = 3
    stride: int | Pair = 1
    padding: Padding = "VALID"
    dilation: int | Pair = 1
    groups: int = 1
    use_bias: bool = True

    name_prefix: ClassVar[str] = "Conv"

    def __post_init__(self):
        object.__setattr__(self, "features", positive_int(self.features, "features"))
        object.__setattr__(self, "kernel_size", pair(self.kernel_size, "kernel_size"))
        object.__setattr__(self, "stride", pair(self.stride, "stride"))
        object.__setattr__(self, "dilation", pair(self.dilation, "dilation"))
        object.__setattr__(self, "padding", freeze_padding(self.padding))
        object.__setattr__(self, "groups", positive_int(self.groups, "groups"))
        if self.features % self.groups:
            raise ValueError(f"`features` (={self.features}) must be divisible by `groups` (={self.groups})")

    @property
    def _options(self) -> dict[str, Any]:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _kernel_shape(self, channels: int) -> Shape:
        return (*self.kernel_size, channels // self.groups, self.features)

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(f"Conv2D expects inputs of shape (H, W, C) (batch excluded), got {tuple(input_shape)}")
        channels = input_shape[2]
        _, _, _, out = conv_geometry(
            (1, *input_shape),
            (*self.kernel_size, max(channels // self.groups, 1), self.features),
            op="Conv2D",
            **self._options,
        )
        return (*out, self.features)

    def init(self, key: jax.Array, input_shape: Shape, *, dtype: Any = jnp.float32) -> tuple[Params, dict]:
        check_key(key)
        input_shape = check_input_shape(input_shape)
        self.output_shape(input_shape)
        return kernel_and_bias(key, self._kernel_shape(input_shape[2]), self.use_bias, dtype), {}

    def _check_x(self, params: Params, x: jax.Array) -> None:
        check_param_keys("Conv2D", params, ["kernel", "bias"] if self.use_bias else ["kernel"])
        channels = params["kernel"].shape[2] * self.groups
        if x.ndim != 4 or x.shape[3] != channels:
            raise ValueError(f"Conv2D expects input of shape (N, H, W, {channels}), got {tuple(x.shape)}")

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, ConvResiduals]:
        self._check_x(params, x)
        y = F.conv2d(x, params["kernel"], params.get("bias"), **self._options)
        return y, ConvResiduals(x)

    def backward(self, params: Params, residuals: ConvResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        dx, dw, db = F.conv2d_vjp(residuals.x, params["kernel"], params.get("bias"), dy, **self._options)
        return dx, kernel_grads(params, dw, db, self.use_bias)


@dataclass(frozen=True)
class ConvTranspose2D(Layer):
    """Transposed 2-D convolution (Flax linen's ``ConvTranspose``): NHWC input, HWIO kernel with ``I`` the input
    channels; parameters ``kernel`` and ``bias``.

    Args:
      features: output channels.
      kernel_size: int or ``(kh, kw)``.
      stride, padding, dilation: as :func:`jaxcnn.functional.conv_transpose2d` (``dilation`` dilates the
        kernel); ``stride`` s upsamples by about s.
      use_bias: add a learned bias (zeros at init).

    The kernel starts from ``lecun_normal`` (fan-in ``kh * kw * C``), as in Flax.
    Input ``(N, H, W, C)``; output ``(N, OH, OW, features)``.
    """

    features: int
    kernel_size: int | Pair = 3
    stride: int | Pair = 1
    padding: Padding = "VALID"
    dilation: int | Pair = 1
    use_bias: bool = True

    name_prefix: ClassVar[str] = "ConvTranspose"

    def __post_init__(self):
        object.__setattr__(self, "features", positive_int(self.features, "features"))
        object.__setattr__(self, "kernel_size", pair(self.kernel_size, "kernel_size"))
        object.__setattr__(self, "stride", pair(self.stride, "stride"))
        object.__setattr__(self, "dilation", pair(self.dilation, "dilation"))
        object.__setattr__(self, "padding", freeze_padding(self.padding))

    @property
    def _options(self) -> dict[str, Any]:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(
                f"ConvTranspose2D expects inputs of shape (H, W, C) (batch excluded), got {tuple(input_shape)}"
            )
        _, _, _, out = conv_transpose_geometry(
            (1, *input_shape),
            (*self.kernel_size, input_shape[2], self.features),
            op="ConvTranspose2D",
            **self._options,
        )
        return (*out, self.features)

    def init(self, key: jax.Array, input_shape: Shape, *, dtype: Any = jnp.float32) -> tuple[Params, dict]:
        check_key(key)
        input_shape = check_input_shape(input_shape)
        self.output_shape(input_shape)
        shape = (*self.kernel_size, input_shape[2], self.features)
        return kernel_and_bias(key, shape, self.use_bias, dtype), {}

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, ConvResiduals]:
        check_param_keys("ConvTranspose2D", params, ["kernel", "bias"] if self.use_bias else ["kernel"])
        channels = params["kernel"].shape[2]
        if x.ndim != 4 or x.shape[3] != channels:
            raise ValueError(f"ConvTranspose2D expects input of shape (N, H, W, {channels}), got {tuple(x.shape)}")
        return F.conv_transpose2d(x, params["kernel"], params.get("bias"), **self._options), ConvResiduals(x)

    def backward(self, params: Params, residuals: ConvResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        dx, dw, db = F.conv_transpose2d_vjp(residuals.x, params["kernel"], params.get("bias"), dy, **self._options)
        return dx, kernel_grads(params, dw, db, self.use_bias)
