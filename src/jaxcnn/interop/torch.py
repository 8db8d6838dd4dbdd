"""PyTorch interop: the same architecture as a ``torch.nn.Module`` (``jaxcnn.interop.torch``).

``torch_module(model, input_shape)`` builds, layer for layer, the PyTorch module computing ``model`` on NCHW
inputs, with PyTorch's own initialisation: the benchmarks (:mod:`jaxcnn.bench`) time it against jaxcnn. PyTorch
is optional: it is imported when :func:`torch_module` is called, never when this module is.
"""

from __future__ import annotations

import functools
from typing import Any

from jaxcnn import nn


def torch_module(model: nn.Layer, input_shape: tuple[int, ...]) -> Any:
    """The same architecture as a ``torch.nn.Module`` on NCHW inputs (PyTorch's own initialisation).

    Args:
      model: a jaxcnn model of ``Sequential`` and ``Residual`` containers and the layers with a direct PyTorch
        counterpart (convolutions, dense, batch norm, pooling, flatten, dropout, the common activations).
      input_shape: one example's shape ``(H, W, C)`` (NHWC, as jaxcnn takes it; the module takes ``(N, C, H, W)``).

    Returns:
      A ``torch.nn.Module`` with as many parameters as ``model``.

    Raises:
      ValueError: a layer without a PyTorch counterpart here, named; a padding PyTorch cannot express.
      ImportError: PyTorch is not installed.
    """
    import torch

    return _convert(model, tuple(input_shape), torch.nn)


def _convert(layer: nn.Layer, shape: tuple[int, ...], tnn: Any) -> Any:
    """The PyTorch module computing ``layer`` on an input of (NHWC, batch excluded) ``shape``."""
    if isinstance(layer, nn.Sequential):
        modules, current = [], shape
        for child in layer.layers:
            modules.append(_convert(child, current, tnn))
            current = child.output_shape(current)
        return tnn.Sequential(*modules)
    if isinstance(layer, nn.Residual):
        shortcut = None if layer.shortcut is None else _convert(layer.shortcut, shape, tnn)
        return _residual_class(tnn)(_convert(layer.block, shape, tnn), shortcut)
    if isinstance(layer, nn.Conv2D):
        return _conv(layer, shape, tnn)
    if isinstance(layer, nn.Dense):
        return tnn.Linear(shape[-1], layer.features, bias=layer.use_bias)
    if isinstance(layer, nn.BatchNorm):
        return tnn.BatchNorm2d(shape[-1], eps=layer.epsilon, momentum=1 - layer.momentum)
    if isinstance(layer, (nn.AvgPool2D, nn.MaxPool2D)):
        return _pool(layer, tnn)
    if isinstance(layer, nn.GlobalAvgPool2D):
        return tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Flatten())
    if isinstance(layer, nn.Flatten):
        return tnn.Flatten()
    if isinstance(layer, nn.Dropout):
        return tnn.Dropout(layer.rate)
    simple = {nn.ReLU: tnn.ReLU, nn.Sigmoid: tnn.Sigmoid, nn.Tanh: tnn.Tanh, nn.Softplus: tnn.Softplus}
    if type(layer) in simple:
        return simple[type(layer)]()
    raise ValueError(f"torch_module: no PyTorch counterpart for {type(layer).__name__}")


@functools.cache
def _residual_class(tnn: Any) -> type:
    """``block(x) + shortcut(x)`` (``x`` itself when there is no shortcut) as a ``torch.nn.Module`` class."""

    class Residual(tnn.Module):
        def __init__(self, block, shortcut):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    return Residual


def _padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> Any:
    """A jaxcnn padding as PyTorch takes it: an int or a pair of symmetric paddings, or ``"same"`` where the
    SAME padding would be asymmetric. ValueError for explicit asymmetric padding."""
    if padding == "VALID":
        return 0
    if padding == "SAME":
        if all(((k - 1) * d) % 2 == 0 for k, d in zip(kernel, dilation, strict=True)):
            return tuple((k - 1) * d // 2 for k, d in zip(kernel, dilation, strict=True))
        return "same"
    if isinstance(padding, int):
        return padding
    if all(low == high for low, high in padding):
        return tuple(low for low, _ in padding)
    raise ValueError(f"torch_module: asymmetric padding {padding} has no direct PyTorch equivalent")


def _conv(layer: nn.Conv2D, shape: tuple[int, ...], tnn: Any) -> Any:
    if layer.stride != (1, 1) and layer.padding == "SAME":
        raise ValueError("torch_module: strided SAME convolutions have no direct PyTorch equivalent")
    return tnn.Conv2d(
        shape[-1],
        layer.features,
        layer.kernel_size,
        stride=layer.stride,
        padding=_padding(layer.padding, layer.kernel_size, layer.dilation),
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.use_bias,
    )


def _pool(layer: nn.AvgPool2D | nn.MaxPool2D, tnn: Any) -> Any:
    kind = tnn.AvgPool2d if isinstance(layer, nn.AvgPool2D) else tnn.MaxPool2d
    stride = layer.stride or layer.window
    if layer.padding in ("VALID", 0):
        return kind(layer.window, stride)
    padding = _padding(layer.padding, layer.window, (1, 1))
    if padding == "same":
        raise ValueError("torch_module: this pooling padding has no direct PyTorch equivalent")
    if kind is tnn.AvgPool2d:
        return kind(layer.window, stride, padding, count_include_pad=False)
    return kind(layer.window, stride, padding)


__all__ = ["torch_module"]
