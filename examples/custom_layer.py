"""Your own layer, from definition to a passing gradient check.

A layer needs its forward and its hand-derived backward, nothing else: the Layer base class derives
``apply`` (both gradient modes), the explicit reverse pass and the gradient checks from them. The same function
as a functional op with its VJP in ``jaxcnn.functional``'s convention needs one ``F.register`` call.

Run:  python examples/custom_layer.py
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

import jaxcnn as jc
import jaxcnn.functional as F
from jaxcnn import nn


class SwishResiduals(NamedTuple):
    x: jax.Array  # the input
    s: jax.Array  # sigmoid(beta * x), saved so backward need not recompute it


class Swish(nn.Layer):
    """swish(x) = x * sigmoid(beta * x), with a learnable scalar ``beta`` (one parameter)."""

    def init(self, key, input_shape, *, dtype=jnp.float32):
        return {"beta": jnp.ones((), dtype)}, {}

    def forward(self, params, x):
        s = jax.nn.sigmoid(params["beta"] * x)
        return x * s, SwishResiduals(x, s)

    def backward(self, params, residuals, dy):
        # y = x s(bx) with s' = s (1 - s):
        #   dy/dx = s + b x s (1 - s)      dy/db = x^2 s (1 - s)
        x, s = residuals
        beta = params["beta"]
        dx = dy * (s + beta * x * s * (1 - s))
        dbeta = jnp.sum(dy * x * x * s * (1 - s))
        return dx, {"beta": dbeta}


def swish(x, beta):
    """The same function as a functional op: ``x * sigmoid(beta * x)``, any shape, ``beta`` a scalar."""
    return x * jax.nn.sigmoid(beta * x)


def swish_vjp(x, beta, dy):
    """Its VJP in the convention of jaxcnn.functional: the primals, then ``dy``; one cotangent per primal."""
    s = jax.nn.sigmoid(beta * x)
    return dy * (s + beta * x * s * (1 - s)), jnp.sum(dy * x * x * s * (1 - s))


F.register(swish, swish_vjp)  # jc.gradcheck.check_op(swish, x, beta) now finds the rule


def build_model() -> nn.Sequential:
    """A small CNN with Swish activations, for 12x12x1 inputs and 3 classes."""
    return nn.Sequential(
        [
            nn.Conv2D(4, 3, padding="SAME"),
            Swish(),
            nn.AvgPool2D(2),
            nn.Flatten(),
            nn.Dense(8),
            Swish(),
            nn.Dense(3),
        ]
    )


def main() -> jc.gradcheck.Report:
    model = build_model()
    key = jax.random.key(0)
    params, state = model.init(key, (12, 12, 1))
    x = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
    y = jnp.array([0, 1, 2, 1])
    report = jc.gradcheck.check_model(model, params, state, x, y)
    print(report.table())
    return report


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
