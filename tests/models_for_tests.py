"""Small models shared by the tests."""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jaxcnn as jc
from jaxcnn import nn


def random_variables(model, input_shape, seed=0, dtype=jnp.float64):
    """``(params, state)`` with the layout of ``model.init`` but random values from numpy: kernels ~ N(0, 1/fan_in),
    scales and running variances in [0.5, 1.5], biases and running means ~ N(0, 0.2^2), so that every parameter
    and running statistic matters. Built from ``jax.eval_shape`` of ``init``, so nothing is compiled."""
    shapes = jax.eval_shape(lambda key: model.init(key, input_shape, dtype=dtype), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            values = rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        elif name in ("scale", "var"):
            values = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # bias, mean
            values = 0.2 * rng.standard_normal(leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def every_layer_model() -> nn.Sequential:
    """A model that uses every layer type of jaxcnn.nn, with strides, dilation, groups and every padding kind.

    Input (12, 11, 3); 4 classes.
    """
    return nn.Sequential(
        [
            nn.Conv2D(6, (3, 2), padding="SAME"),
            nn.ReLU(),
            nn.MaxPool2D(2),  # (6, 5, 6)
            nn.Conv2D(6, 3, padding=((1, 0), (0, 1)), groups=3),  # (4, 3, 6)
            nn.LeakyReLU(0.1),
            nn.AvgPool2D(3, 1, "SAME"),
            nn.Conv2D(8, 2, stride=(1, 2), dilation=(2, 1), padding=1),
            nn.ELU(),
            nn.GELU(approximate=False),
            nn.Conv2D(8, 1, use_bias=False),
            nn.Sigmoid(),
            nn.MaxPool2D((2, 1), 1, "SAME"),
            nn.GlobalAvgPool2D(),
            nn.Flatten(),
            nn.Dense(7),
            nn.Tanh(),
            nn.Dense(5, use_bias=False),
            nn.Softplus(),
            nn.GELU(),
            nn.Dense(4),
        ]
    )


def unseen_model() -> nn.Sequential:
    """Another architecture built from the same layers: strided convs, max pooling, flatten."""
    return nn.Sequential(
        [
            nn.Conv2D(5, 3, stride=2, padding=2),
            nn.Tanh(),
            nn.Conv2D(4, (2, 3), dilation=2, padding="SAME"),
            nn.ReLU(),
            nn.MaxPool2D(2, padding="SAME"),
            nn.Flatten(),
            nn.Dense(6),
            nn.Sigmoid(),
            nn.Dense(3),
        ]
    )


def nested_model() -> nn.Sequential:
    """Sequential inside Sequential: parameters nest as {"Sequential_0": {"Conv_0": ...}}."""
    block = nn.Sequential([nn.Conv2D(4, 3, padding="SAME"), nn.ReLU(), nn.Conv2D(4, 1), nn.Tanh()])
    return nn.Sequential([block, nn.MaxPool2D(2), nn.Sequential([nn.Flatten(), nn.Dense(5)]), nn.ELU(), nn.Dense(3)])


MODELS = {
    "nested": (nested_model, (6, 7, 2), 3),
    "mnist_cnn": (lambda: jc.models.get("mnist_cnn"), (28, 28, 1), 10),
    "lenet5": (lambda: jc.models.get("lenet5"), (28, 28, 1), 10),
    "digits_cnn": (lambda: jc.models.get("digits_cnn"), (8, 8, 1), 10),
    "every_layer": (every_layer_model, (12, 11, 3), 4),
    "unseen": (unseen_model, (9, 10, 2), 3),
}


@dataclass(frozen=True)
class WrongDense(nn.Dense):
    """A Dense whose weight gradient is planted wrong (transposed roles of the bias and kernel scale)."""

    def backward(self, params, residuals, dy):
        dx, grads = super().backward(params, residuals, dy)
        return dx, {**grads, "kernel": grads["kernel"] * 1.001}


def bench_tiny(num_classes: int = 3) -> nn.Sequential:
    """The bench harness's tiny CNN (every benchmark contender has its layers), at module level so that a flag
    set's worker process can import it (tests/conftest.py's ``tiny`` fixture registers it)."""
    return nn.Sequential([nn.Conv2D(2, 3), nn.ReLU(), nn.Flatten(), nn.Dense(num_classes)])


def small_digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """A user's model factory, as ``jaxcnn train --model models_for_tests:small_digits_cnn`` imports it."""
    return nn.Sequential(
        [nn.Conv2D(4, 3, padding="SAME"), nn.ReLU(), nn.AvgPool2D(2), nn.Flatten(), nn.Dense(num_classes)]
    )
