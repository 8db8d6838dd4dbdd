"""Convolution layers, Conv2D and ConvTranspose2D, with the defaults of their flax.linen twins."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

import jaxcnn.functional as F
from jaxcnn._validate import Padding, Pair, explicit_padding, pair, positive_int
from jaxcnn.functional import ghost
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
    weighted_kernel_grads,
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
class _Conv(Layer):
    """The fields and parts :class:`Conv2D` and :class:`ConvTranspose2D` share (defaults: Flax's). Each subclass
    adds its own fields, ``use_bias`` last, as in Flax's order."""

    features: int
    kernel_size: int | Pair
    stride: int | Pair = 1
    padding: Padding = "SAME"
    dilation: int | Pair = 1
    geometry: ClassVar[Callable[..., tuple]]  # validates the arguments, gives the output size
    # the hand rule (x, w, b, dy, **options) -> (dx, dw, db) and the per-example squared norms of (x, dy)
    vjp_rule: ClassVar[Callable[..., tuple]]
    sq_norms_rule: ClassVar[Callable[..., jax.Array]]

    def per_example_sq_norms(
        self, params: Params, residuals: ConvResiduals, dy: jax.Array, *, method: str = "auto"
    ) -> jax.Array:
        # Gram matrices of the unfolded input and of dy over positions, or dw_i itself, whichever is smaller
        # (conv2d_sq_norms; conv_transpose2d_sq_norms: the same forms with input and padded cotangent swapped)
        kernel_shape = params["kernel"].shape[:2]
        options = dict(self._options, kernel_shape=kernel_shape, bias=self.use_bias, method=method)
        return self.sq_norms_rule(residuals.x, dy, **options)

    def weighted_param_grads(
        self, params: Params, residuals: ConvResiduals, dy: jax.Array, weights: jax.Array
    ) -> Params:
        vjp = functools.partial(self.vjp_rule, **self._options)
        return weighted_kernel_grads(vjp, params, residuals.x, dy, weights, self.use_bias)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", positive_int(self.features, "features"))
        for name in ("kernel_size", "stride", "dilation"):
            object.__setattr__(self, name, pair(getattr(self, name), name))
        object.__setattr__(self, "padding", freeze_padding(self.padding))

    @property
    def _options(self) -> dict[str, Any]:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def _kernel_shape(self, channels: int) -> Shape:
        """The kernel's shape for inputs of ``channels`` channels."""
        return (*self.kernel_size, channels, self.features)

    def _input_channels(self, kernel: jax.Array) -> int:
        """The input channels ``kernel`` takes."""
        return kernel.shape[2]

    def output_shape(self, input_shape: Shape) -> Shape:
        name = type(self).__name__
        if len(input_shape) != 3:
            raise ValueError(f"{name} expects inputs of shape (H, W, C) (batch excluded), got {tuple(input_shape)}")
        _, _, _, out = self.geometry((1, *input_shape), self._kernel_shape(input_shape[2]), op=name, **self._options)
        return (*out, self.features)

    def init(self, key: jax.Array, input_shape: Shape, *, dtype: Any = jnp.float32) -> tuple[Params, dict]:
        check_key(key)
        input_shape = check_input_shape(input_shape)
        self.output_shape(input_shape)
        return kernel_and_bias(key, self._kernel_shape(input_shape[2]), self.use_bias, dtype), {}

    def _check_x(self, params: Params, x: jax.Array) -> None:
        name = type(self).__name__
        check_param_keys(name, params, ["kernel", "bias"] if self.use_bias else ["kernel"])
        channels = self._input_channels(params["kernel"])
        if x.ndim != 4 or x.shape[3] != channels:
            raise ValueError(f"{name} expects input of shape (N, H, W, {channels}), got {tuple(x.shape)}")


@dataclass(frozen=True)
class Conv2D(_Conv):
    """2-D convolution over NHWC inputs with an HWIO kernel (parameters ``kernel`` and ``bias``), as
    ``flax.linen.Conv``, with its defaults: ``padding="SAME"``, stride 1, no dilation, one group, a bias.

    Args:
      features: output channels.
      kernel_size: int or ``(kh, kw)`` (required, as in Flax).
      stride, padding, dilation, groups: as :func:`jaxcnn.functional.conv2d` (Flax's ``strides``, ``padding``,
        ``kernel_dilation``, ``feature_group_count``). ``"SAME"`` keeps ``H x W`` at stride 1.
      use_bias: add a learned bias (zeros at init).

    The kernel starts from ``lecun_normal`` (fan-in ``kh * kw * C / groups``), as in Flax.
    Input ``(N, H, W, C)``; output ``(N, OH, OW, features)``.
    """

    groups: int = 1
    use_bias: bool = True

    name_prefix: ClassVar[str] = "Conv"
    geometry = staticmethod(conv_geometry)
    vjp_rule = staticmethod(F.conv2d_vjp)
    sq_norms_rule = staticmethod(ghost.conv2d_sq_norms)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "groups", positive_int(self.groups, "groups"))
        if self.features % self.groups:
            raise ValueError(f"`features` (={self.features}) must be divisible by `groups` (={self.groups})")

    @property
    def _options(self) -> dict[str, Any]:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _kernel_shape(self, channels: int) -> Shape:
        # at least one channel per group, so that too few input channels get the geometry's own error
        return (*self.kernel_size, max(channels // self.groups, 1), self.features)

    def _input_channels(self, kernel: jax.Array) -> int:
        return kernel.shape[2] * self.groups

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, ConvResiduals]:
        self._check_x(params, x)
        y = F.conv2d(x, params["kernel"], params.get("bias"), **self._options)
        return y, ConvResiduals(x)

    def backward(self, params: Params, residuals: ConvResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        dx, dw, db = F.conv2d_vjp(residuals.x, params["kernel"], params.get("bias"), dy, **self._options)
        return dx, kernel_grads(params, dw, db, self.use_bias)


@dataclass(frozen=True)
class ConvTranspose2D(_Conv):
    """Transposed 2-D convolution, as ``flax.linen.ConvTranspose`` (with ``transpose_kernel=False``) and with its
    defaults: ``padding="SAME"`` (output ``H * stride``), stride 1, no dilation, a bias. NHWC input, HWIO kernel
    with ``I`` the input channels; parameters ``kernel`` and ``bias``.

    Args:
      features: output channels.
      kernel_size: int or ``(kh, kw)`` (required, as in Flax).
      stride, padding, dilation: as :func:`jaxcnn.functional.conv_transpose2d` (Flax's ``strides``, ``padding``,
        ``kernel_dilation``; ``dilation`` dilates the kernel); ``stride`` s upsamples by about s.
      use_bias: add a learned bias (zeros at init).

    The kernel starts from ``lecun_normal`` (fan-in ``kh * kw * C``), as in Flax.
    Input ``(N, H, W, C)``; output ``(N, OH, OW, features)``.
    """

    use_bias: bool = True

    name_prefix: ClassVar[str] = "ConvTranspose"
    geometry = staticmethod(conv_transpose_geometry)
    vjp_rule = staticmethod(F.conv_transpose2d_vjp)
    sq_norms_rule = staticmethod(ghost.conv_transpose2d_sq_norms)

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, ConvResiduals]:
        self._check_x(params, x)
        return F.conv_transpose2d(x, params["kernel"], params.get("bias"), **self._options), ConvResiduals(x)

    def backward(self, params: Params, residuals: ConvResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        dx, dw, db = F.conv_transpose2d_vjp(residuals.x, params["kernel"], params.get("bias"), dy, **self._options)
        return dx, kernel_grads(params, dw, db, self.use_bias)
