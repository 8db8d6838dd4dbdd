"""Sequential: layers applied one after another, with the reverse pass written out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcnn.nn.container import Container
from jaxcnn.nn.layer import Layer, Params, Residuals, Shape, State, check_input_shape, check_key, named


class Sequential(Container):
    """Apply ``layers`` in order.

    Parameters and state are dicts keyed by each layer's automatic name, ``{prefix}_{k}`` counting per prefix
    (``Conv_0``, ``Conv_1``, ``Dense_0``, ...) as Flax linen names submodules; layers without parameters (or
    without state) have no entry. ``key`` is split per layer with ``fold_in(key, index)``. Residuals, for
    :meth:`backward`, are a dict of each layer's residuals by name.

    Args:
      layers: the layers (any :class:`Layer`, containers included).
    """

    def __init__(self, layers: Iterable[Layer]):
        layers = tuple(layers)
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise ValueError(f"Sequential: layer {index} must be a jaxcnn.nn.Layer, got {layer!r}")
        counts: dict[str, int] = {}
        names = []
        for layer in layers:
            prefix = layer.prefix()
            names.append(f"{prefix}_{counts.get(prefix, 0)}")
            counts[prefix] = counts.get(prefix, 0) + 1
        self.layers = layers
        self.names = tuple(names)

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {layer!r}" for layer in self.layers)
        return f"Sequential([\n{inner}\n])"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequential) and self.layers == other.layers

    def __hash__(self) -> int:
        return hash(("Sequential", self.layers))

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def named_layers(self) -> tuple[tuple[str, Layer], ...]:
        """``(name, layer)`` pairs in order."""
        return tuple(zip(self.names, self.layers, strict=True))

    def named_children(self) -> tuple[tuple[str, Layer], ...]:
        return self.named_layers()

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = tuple(input_shape)
        for name, layer in self.named_layers():
            with named(name):
                shape = layer.output_shape(shape)
        return shape

    def init(self, key: jax.Array, input_shape: Shape, *, dtype: Any = jnp.float32) -> tuple[Params, State]:
        """``(params, state)`` dicts keyed by layer name, for inputs ``(N, *input_shape)``."""
        check_key(key)
        shape = check_input_shape(input_shape)
        shapes = {}
        for name, layer in self.named_layers():
            shapes[name] = shape
            with named(name):
                shape = layer.output_shape(shape)
        return self.init_children(key, shapes, dtype)

    def wire(self, run, x: jax.Array) -> jax.Array:
        """Each layer's output is the next one's input."""
        for name in self.names:
            x = run(name, x)
        return x

    def backward(self, params: Params, residuals: dict[str, Residuals], dy: jax.Array) -> tuple[jax.Array, Params]:
        """The reverse pass: each layer's backward, last layer first, passing ``dx`` down as the next ``dy``."""
        grads: dict[str, Params] = {}
        for name in reversed(self.names):
            dy = self.child_backward(name, params, residuals, dy, grads)
        return dy, grads
