"""Elementwise activations, each followed by its hand-derived VJP ``NAME_vjp(x, dy, **options) -> dx``.

For an elementwise ``y = f(x)`` the Jacobian is diagonal, so every rule is ``dx = dy * f'(x)``; the comment
under each forward states ``f'``. At kinks (ReLU and leaky ReLU at 0) the derivative of the ``x > 0`` branch
test is used: ``relu'(0) = 0`` and ``leaky_relu'(0) = negative_slope``, as in JAX and PyTorch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import erfc

from jaxcnn.functional._registry import register


def _check_dy(op: str, x: jax.Array, dy: jax.Array) -> None:
    if jnp.shape(dy) != jnp.shape(x):
        raise ValueError(f"{op}: `dy` must have the shape of `x` {tuple(jnp.shape(x))}, got {tuple(jnp.shape(dy))}")


def relu(x: jax.Array) -> jax.Array:
    """``max(x, 0)``, any shape."""
    return jnp.where(x > 0, x, jnp.zeros((), x.dtype))


def relu_vjp(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``dx`` of :func:`relu`, shape of ``x``."""
    _check_dy("relu_vjp", x, dy)
    # relu'(x) = 1 if x > 0 else 0
    return jnp.where(x > 0, dy, jnp.zeros((), dy.dtype))


def leaky_relu(x: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    """``x`` if ``x > 0`` else ``negative_slope * x``, any shape."""
    return jnp.where(x > 0, x, negative_slope * x)


def leaky_relu_vjp(x: jax.Array, dy: jax.Array, *, negative_slope: float = 0.01) -> jax.Array:
    """``dx`` of :func:`leaky_relu`, shape of ``x``."""
    _check_dy("leaky_relu_vjp", x, dy)
    # leaky_relu'(x) = 1 if x > 0 else negative_slope
    return jnp.where(x > 0, dy, negative_slope * dy)


def elu(x: jax.Array, alpha: float = 1.0) -> jax.Array:
    """``x`` if ``x > 0`` else ``alpha * (exp(x) - 1)``, any shape."""
    # the inner where (not minimum, whose autodiff splits the tie at 0) keeps elu'(0) = alpha for autodiff too
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.where(x > 0, jnp.zeros((), x.dtype), x)))


def elu_vjp(x: jax.Array, dy: jax.Array, *, alpha: float = 1.0) -> jax.Array:
    """``dx`` of :func:`elu`, shape of ``x``."""
    _check_dy("elu_vjp", x, dy)
    # elu'(x) = 1 if x > 0 else alpha * exp(x)
    return jnp.where(x > 0, dy, dy * alpha * jnp.exp(jnp.where(x > 0, jnp.zeros((), x.dtype), x)))


def _sech_squared(u: jax.Array) -> jax.Array:
    """``1 - tanh(u)^2 = sech(u)^2`` without cancellation: ``4 s / (1 + s)^2`` with ``s = exp(-2 |u|)``.

    ``1 - tanh(u)^2`` loses all relative precision once ``tanh(u)`` rounds near 1 (``|u| > ~5``); this form
    keeps full precision for every ``u`` and goes smoothly to 0.
    """
    s = jnp.exp(-2 * jnp.abs(u))
    return 4 * s / ((1 + s) * (1 + s))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2.0 * math.pi)


def gelu(x: jax.Array, approximate: bool = True) -> jax.Array:
    """Gaussian error linear unit, any shape.

    ``approximate=True`` (the default, as in ``jax.nn`` and Flax): ``x/2 (1 + tanh(c (x + 0.044715 x^3)))`` with
    ``c = sqrt(2/pi)``; ``approximate=False``: the exact ``x Phi(x) = x/2 erfc(-x / sqrt 2)``.

    The exact form uses ``erfc`` (as ``jax.nn.gelu`` does): ``1 + erf(x / sqrt 2)`` cancels for negative ``x``
    and is 0 below ``x ~ -8.4`` in float64 (``-5.4`` in float32), where ``gelu`` is still far from 0. The
    relative error is then about ``(1 + x^2) eps``: the condition number of ``gelu`` itself, met because
    ``x / sqrt 2`` is rounded (about 1e-13 at ``x = -30`` in float64).
    """
    if approximate:
        inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3)
        return 0.5 * x * (1 + jnp.tanh(inner))
    return 0.5 * x * _erfc_of_minus(x)


def _erfc_of_minus(x: jax.Array) -> jax.Array:
    """``erfc(-x / sqrt 2) = 2 Phi(x)``, with full relative precision in the left tail (no ``1 + erf``)."""
    return erfc(-x * _SQRT_HALF)


def gelu_vjp(x: jax.Array, dy: jax.Array, *, approximate: bool = True) -> jax.Array:
    """``dx`` of :func:`gelu`, shape of ``x``."""
    _check_dy("gelu_vjp", x, dy)
    if approximate:
        # with t = tanh(u), u = c (x + 0.044715 x^3): gelu' = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 * 0.044715 x^2)
        inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3)
        t = jnp.tanh(inner)
        slope = 0.5 * (1 + t) + 0.5 * x * _sech_squared(inner) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x)
        return dy * slope
    # gelu = x Phi(x), so gelu' = Phi(x) + x phi(x) with phi(x) = exp(-x^2/2) / sqrt(2 pi) and
    # Phi(x) = erfc(-x / sqrt 2) / 2; in the left tail both terms are tiny and x phi dominates (Phi ~ phi / |x|),
    # so the sum keeps its relative precision; it cancels only near gelu's minimum (x ~ -0.75), where gelu' = 0
    cdf = 0.5 * _erfc_of_minus(x)
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return dy * (cdf + x * pdf)


def sigmoid(x: jax.Array) -> jax.Array:
    """``1 / (1 + exp(-x))``, any shape (``lax.logistic``, stable for large ``|x|``)."""
    return lax.logistic(x)


def sigmoid_vjp(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``dx`` of :func:`sigmoid`, shape of ``x``."""
    _check_dy("sigmoid_vjp", x, dy)
    # sigmoid' = s (1 - s) = sigmoid(x) sigmoid(-x): the second form keeps full precision for large x,
    # where 1 - s would cancel
    return dy * lax.logistic(x) * lax.logistic(-x)


def tanh(x: jax.Array) -> jax.Array:
    """Hyperbolic tangent, any shape."""
    return jnp.tanh(x)


def tanh_vjp(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``dx`` of :func:`tanh`, shape of ``x``."""
    _check_dy("tanh_vjp", x, dy)
    # tanh' = 1 - tanh^2 = sech^2, computed without the cancellation of 1 - tanh^2 for large |x|
    return dy * _sech_squared(x)


def softplus(x: jax.Array) -> jax.Array:
    """``log(1 + exp(x))``, any shape, computed as ``logaddexp(x, 0)`` (no overflow; its autodiff is exact at 0,
    unlike ``max(x, 0) + log1p(exp(-|x|))`` whose kinks JAX differentiates to 0 there)."""
    return jnp.logaddexp(x, jnp.zeros((), x.dtype))


def softplus_vjp(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``dx`` of :func:`softplus`, shape of ``x``."""
    _check_dy("softplus_vjp", x, dy)
    # softplus' = exp(x) / (1 + exp(x)) = sigmoid(x)
    return dy * lax.logistic(x)


for _forward, _vjp in [
    (relu, relu_vjp),
    (leaky_relu, leaky_relu_vjp),
    (elu, elu_vjp),
    (gelu, gelu_vjp),
    (sigmoid, sigmoid_vjp),
    (tanh, tanh_vjp),
    (softplus, softplus_vjp),
]:
    register(_forward, _vjp)
