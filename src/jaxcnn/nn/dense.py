"""Dense (fully connected) layer and Flatten."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

import jaxcnn.functional as F
from jaxcnn._validate import positive_int
from jaxcnn.functional import ghost
from jaxcnn.nn.layer import (
    Layer,
    Params,
    Shape,
    Static,
    check_input_shape,
    check_key,
    check_param_keys,
    kernel_and_bias,
    kernel_grads,
    weighted_kernel_grads,
)


class DenseResiduals(NamedTuple):
    x: jax.Array  # the layer's input, (N, ..., D_in)


@dataclass(frozen=True)
class Dense(Layer):
    """Affine layer over the last axis (parameters ``kernel`` ``(D_in, features)`` and ``bias``, as Flax's Dense).

    Input ``(N, ..., D_in)``; output ``(N, ..., features)``. The kernel starts from ``lecun_normal``; the defaults
    are ``flax.linen.Dense``'s.
    """

    features: int
    use_bias: bool = True

    name_prefix: ClassVar[str] = "Dense"

    def __post_init__(self):
        object.__setattr__(self, "features", positive_int(self.features, "features"))

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) < 1:
            raise ValueError("Dense expects inputs with at least one axis besides the batch, got ()")
        return (*input_shape[:-1], self.features)

    def init(self, key: jax.Array, input_shape: Shape, *, dtype: Any = jnp.float32) -> tuple[Params, dict]:
        check_key(key)
        input_shape = check_input_shape(input_shape)
        self.output_shape(input_shape)
        return kernel_and_bias(key, (input_shape[-1], self.features), self.use_bias, dtype), {}

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, DenseResiduals]:
        check_param_keys("Dense", params, ["kernel", "bias"] if self.use_bias else ["kernel"])
        d_in = params["kernel"].shape[0]
        if x.ndim < 2 or x.shape[-1] != d_in:
            raise ValueError(f"Dense expects input of shape (N, ..., {d_in}), got {tuple(x.shape)}")
        return F.dense(x, params["kernel"], params.get("bias")), DenseResiduals(x)

    def backward(self, params: Params, residuals: DenseResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        dx, dw, db = F.dense_vjp(residuals.x, params["kernel"], params.get("bias"), dy)
        return dx, kernel_grads(params, dw, db, self.use_bias)

    def per_example_sq_norms(
        self, params: Params, residuals: DenseResiduals, dy: jax.Array, *, method: str = "auto"
    ) -> jax.Array:
        # dW_i = sum_s a_s (x) g_s over example i's positions s: ||a_i||^2 ||g_i||^2 for (N, D) inputs
        return ghost.dense_sq_norms(residuals.x, dy, bias=self.use_bias, method=method)

    def weighted_param_grads(
        self, params: Params, residuals: DenseResiduals, dy: jax.Array, weights: jax.Array
    ) -> Params:
        return weighted_kernel_grads(F.dense_vjp, params, residuals.x, dy, weights, self.use_bias)


class FlattenResiduals(NamedTuple):
    input_shape: Static  # the input's shape, batch axis included


@dataclass(frozen=True)
class Flatten(Layer):
    """``(N, d1, d2, ...) -> (N, d1 * d2 * ...)`` (row-major, as ``x.reshape(N, -1)`` and Flax's MNIST example)."""

    def output_shape(self, input_shape: Shape) -> Shape:
        return (math.prod(input_shape),)

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, FlattenResiduals]:
        if x.ndim < 1:
            raise ValueError(f"Flatten expects a batch (N, ...), got a scalar of shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], math.prod(x.shape[1:])), FlattenResiduals(Static(tuple(x.shape)))

    def backward(self, params: Params, residuals: FlattenResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        # a reshape only moves values, so its VJP is the inverse reshape
        return dy.reshape(residuals.input_shape.value), {}
