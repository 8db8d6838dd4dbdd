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

    Subclasses set ``function`` and ``derivative`` (a functional op and its hand-derived VJP); their dataclass
    fields are passed to both as keyword options.
    """

    function: ClassVar[Callable[..., jax.Array]]
    derivative: ClassVar[Callable[..., jax.Array]]

    def _options(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, ActivationResiduals]:
        return type(self).function(x, **self._options()), ActivationResiduals(x)

    def backward(self, params: Params, residuals: ActivationResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        return type(self).derivative(residuals.x, dy, **self._options()), {}


@dataclass(frozen=True)
class ReLU(Activation):
    """``max(x, 0)``."""

    function = staticmethod(F.relu)
    derivative = staticmethod(F.relu_vjp)


@dataclass(frozen=True)
class LeakyReLU(Activation):
    """``x`` if ``x > 0`` else ``negative_slope * x``."""

    negative_slope: float = 0.01
    function = staticmethod(F.leaky_relu)
    derivative = staticmethod(F.leaky_relu_vjp)


@dataclass(frozen=True)
class ELU(Activation):
    """``x`` if ``x > 0`` else ``alpha * (exp(x) - 1)``."""

    alpha: float = 1.0
    function = staticmethod(F.elu)
    derivative = staticmethod(F.elu_vjp)


@dataclass(frozen=True)
class GELU(Activation):
    """Gaussian error linear unit; ``approximate=True`` is the tanh form (Flax's default)."""

    approximate: bool = True
    function = staticmethod(F.gelu)
    derivative = staticmethod(F.gelu_vjp)


@dataclass(frozen=True)
class Sigmoid(Activation):
    """``1 / (1 + exp(-x))``."""

    function = staticmethod(F.sigmoid)
    derivative = staticmethod(F.sigmoid_vjp)


@dataclass(frozen=True)
class Tanh(Activation):
    """Hyperbolic tangent."""

    function = staticmethod(F.tanh)
    derivative = staticmethod(F.tanh_vjp)


@dataclass(frozen=True)
class Softplus(Activation):
    """``log(1 + exp(x))``."""

    function = staticmethod(F.softplus)
    derivative = staticmethod(F.softplus_vjp)
