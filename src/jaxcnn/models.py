"""Named architectures: ``jaxcnn.models.get(name)``."""

from __future__ import annotations

from collections.abc import Callable

from jaxcnn import nn


def mnist_cnn(num_classes: int = 10) -> nn.Sequential:
    """The CNN of Flax's MNIST example: 824,458 parameters on 28x28x1 inputs with 10 classes
    (825,034 on 28x28x3, the figure Flax's own test pins).

    conv32 3x3 SAME, relu, avgpool 2, conv64 3x3 SAME, relu, avgpool 2, flatten, dense256, relu, dense10.
    """
    return nn.Sequential(
        [
            nn.Conv2D(32, 3, padding="SAME"),
            nn.ReLU(),
            nn.AvgPool2D(2),
            nn.Conv2D(64, 3, padding="SAME"),
            nn.ReLU(),
            nn.AvgPool2D(2),
            nn.Flatten(),
            nn.Dense(256),
            nn.ReLU(),
            nn.Dense(num_classes),
        ]
    )


def lenet5(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 (LeCun et al., 1998) for 28x28 inputs: the first conv pads SAME to stand in for the 32x32 input.

    conv6 5x5 SAME, tanh, avgpool 2, conv16 5x5, tanh, avgpool 2, flatten, dense120, tanh, dense84, tanh,
    dense10: 61,706 parameters on 28x28x1 inputs with 10 classes.
    """
    return nn.Sequential(
        [
            nn.Conv2D(6, 5, padding="SAME"),
            nn.Tanh(),
            nn.AvgPool2D(2),
            nn.Conv2D(16, 5),
            nn.Tanh(),
            nn.AvgPool2D(2),
            nn.Flatten(),
            nn.Dense(120),
            nn.Tanh(),
            nn.Dense(84),
            nn.Tanh(),
            nn.Dense(num_classes),
        ]
    )


MODELS: dict[str, Callable[..., nn.Sequential]] = {"mnist_cnn": mnist_cnn, "lenet5": lenet5}
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"mnist_cnn": (28, 28, 1), "lenet5": (28, 28, 1)}


def get(name: str, **kwargs) -> nn.Sequential:
    """Build the named architecture (keyword arguments such as ``num_classes`` go to its builder).

    Raises ValueError listing the known names for an unknown one.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def input_shape(name: str) -> tuple[int, ...]:
    """The input shape (batch axis excluded) an architecture is designed for, e.g. ``(28, 28, 1)``."""
    get(name)  # validates the name
    return INPUT_SHAPES[name]


def names() -> list[str]:
    """The known architecture names."""
    return sorted(MODELS)
