"""Layers: parameter init, shape inference, forward with saved residuals, and hand-derived backward.

See :class:`jaxcnn.nn.Layer` for the protocol a layer of your own implements.
"""

from jaxcnn.nn.activations import ELU, GELU, Activation, LeakyReLU, ReLU, Sigmoid, Softplus, Tanh
from jaxcnn.nn.container import Container
from jaxcnn.nn.conv import Conv2D
from jaxcnn.nn.dense import Dense, Flatten
from jaxcnn.nn.layer import Layer, LayerCall, Static, manual_apply
from jaxcnn.nn.pool import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from jaxcnn.nn.residual import Residual, SubsampleShortcut
from jaxcnn.nn.sequential import Sequential

__all__ = [
    "ELU",
    "GELU",
    "Activation",
    "AvgPool2D",
    "Container",
    "Conv2D",
    "Dense",
    "Flatten",
    "GlobalAvgPool2D",
    "Layer",
    "LayerCall",
    "LeakyReLU",
    "MaxPool2D",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "Softplus",
    "Static",
    "SubsampleShortcut",
    "Tanh",
    "manual_apply",
]
