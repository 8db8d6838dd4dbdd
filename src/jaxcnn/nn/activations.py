"""Activation layers: each wraps a functional activation and its hand-derived VJP."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax

import jaxcnn.functional as F
from jaxcnn.nn.layer import Layer, Params


class ActivationResiduals(NamedTuple):
    x: jax.Array  # the layer's input (any shape)


@dataclass(frozen=True)
class Activation(Layer):
    """An elementwise layer ``y = function(x, **options)`` whose backward is ``derivative(x, dy, **options)``.

    A subclass names a functional op and its hand-derived VJP in its class statement,
    ``class Swish(Activation, function=swish, derivative=swish_vjp)`` (or sets them as class attributes);
    its dataclass fields are passed to both as keyword options.

    The built-in activations are ``flax.linen``'s functions of the same names, with the same defaults.
    Input any shape; output the same.
    """

    function: ClassVar[Callable[..., jax.Array]]
    derivative: ClassVar[Callable[..., jax.Array]]

    def __init_subclass__(
        cls, *, function: Callable[..., jax.Array] | None = None, derivative: Callable[..., jax.Array] | None = None
    ) -> None:
        super().__init_subclass__()
        if function is not None:
            cls.function = staticmethod(function)
        if derivative is not None:
            cls.derivative = staticmethod(derivative)

    def _options(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, ActivationResiduals]:
        return type(self).function(x, **self._options()), ActivationResiduals(x)

    def backward(self, params: Params, residuals: ActivationResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        return type(self).derivative(residuals.x, dy, **self._options()), {}


@dataclass(frozen=True)
class ReLU(Activation, function=F.relu, derivative=F.relu_vjp):
    """``max(x, 0)``."""


@dataclass(frozen=True)
class Sigmoid(Activation, function=F.sigmoid, derivative=F.sigmoid_vjp):
    """``1 / (1 + exp(-x))``."""


@dataclass(frozen=True)
class Tanh(Activation, function=F.tanh, derivative=F.tanh_vjp):
    """Hyperbolic tangent."""


@dataclass(frozen=True)
class Softplus(Activation, function=F.softplus, derivative=F.softplus_vjp):
    """``log(1 + exp(x))``."""


@dataclass(frozen=True)
class LeakyReLU(Activation, function=F.leaky_relu, derivative=F.leaky_relu_vjp):
    """``x`` if ``x > 0`` else ``negative_slope * x``."""

    negative_slope: float = 0.01


@dataclass(frozen=True)
class ELU(Activation, function=F.elu, derivative=F.elu_vjp):
    """``x`` if ``x > 0`` else ``alpha * (exp(x) - 1)``."""

    alpha: float = 1.0


@dataclass(frozen=True)
class GELU(Activation, function=F.gelu, derivative=F.gelu_vjp):
    """Gaussian error linear unit; ``approximate=True`` is the tanh form (Flax's default)."""

    approximate: bool = True
