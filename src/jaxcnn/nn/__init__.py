"""Layers: parameter init, shape inference, forward with saved residuals, and hand-derived backward.

See :class:`jaxcnn.nn.Layer` for the protocol a layer of your own implements.
"""

from jaxcnn.nn.activations import ELU, GELU, Activation, LeakyReLU, ReLU, Sigmoid, Softplus, Tanh
from jaxcnn.nn.container import Container
from jaxcnn.nn.contract import BackwardError
from jaxcnn.nn.conv import Conv2D, ConvTranspose2D
from jaxcnn.nn.dense import Dense, Flatten
from jaxcnn.nn.dropout import Dropout
from jaxcnn.nn.layer import Layer, LayerCall, Static, manual_apply
from jaxcnn.nn.norm import BatchNorm, GroupNorm, LayerNorm
from jaxcnn.nn.pool import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from jaxcnn.nn.resample import Upsample2D
from jaxcnn.nn.residual import Residual, SubsampleShortcut
from jaxcnn.nn.sequential import Sequential

__all__ = [
    "Activation",
    "AvgPool2D",
    "BackwardError",
    "BatchNorm",
    "Container",
    "Conv2D",
    "ConvTranspose2D",
    "Dense",
    "Dropout",
    "ELU",
    "Flatten",
    "GELU",
    "GlobalAvgPool2D",
    "GroupNorm",
    "Layer",
    "LayerCall",
    "LayerNorm",
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
    "Upsample2D",
    "manual_apply",
]
