"""Sequential: layers applied one after another, with the reverse pass written out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcnn.nn.layer import (
    Layer,
    LayerCall,
    Params,
    Residuals,
    Shape,
    State,
    check_gradients_mode,
    check_input_shape,
    check_key,
    layer_key,
    named,
)


class SequentialResiduals(NamedTuple):
    layers: tuple[Residuals, ...]  # one entry per layer, in forward order


class Sequential(Layer):
    """Apply ``layers`` in order.

    Parameters and state are dicts keyed by each layer's automatic name, ``{prefix}_{k}`` counting per prefix
    (``Conv_0``, ``Conv_1``, ``Dense_0``, ...) as Flax linen names submodules; layers without parameters (or
    without state) have no entry. ``key`` is split per layer with ``fold_in(key, index)``.

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

    def _check_names(self, params: Params, state: State) -> None:
        for what, tree in (("params", params), ("state", state)):
            if not isinstance(tree, dict):
                raise ValueError(f"Sequential expects {what} as a dict keyed by layer name, got {type(tree).__name__}")
            unknown = sorted(set(tree) - set(self.names))
            if unknown:
                raise ValueError(
                    f"{what} has entries {unknown} for no layer of this model; its layers: {list(self.names)}"
                )

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def named_layers(self) -> tuple[tuple[str, Layer], ...]:
        """``(name, layer)`` pairs in order."""
        return tuple(zip(self.names, self.layers))

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
        params, state = {}, {}
        for index, (name, layer) in enumerate(self.named_layers()):
            with named(name):
                layer_params, layer_state = layer.init(jax.random.fold_in(key, index), shape, dtype=dtype)
                shape = layer.output_shape(shape)
            if jax.tree.leaves(layer_params):
                params[name] = layer_params
            if jax.tree.leaves(layer_state):
                state[name] = layer_state
        return params, state

    def forward_with_state(
        self, params: Params, state: State, x: jax.Array, *, train: bool = False, key: jax.Array | None = None
    ) -> tuple[jax.Array, SequentialResiduals, State]:
        """Forward through every layer, saving each one's residuals for :meth:`backward`."""
        self._check_names(params, state)
        residuals, new_state = [], {}
        for index, (name, layer) in enumerate(self.named_layers()):
            with named(name):
                x, saved, layer_state = layer.forward_with_state(
                    params.get(name, {}), state.get(name, {}), x, train=train, key=layer_key(key, index)
                )
            residuals.append(saved)
            if name in state or jax.tree.leaves(layer_state):
                new_state[name] = layer_state
        return x, SequentialResiduals(tuple(residuals)), new_state

    def backward(self, params: Params, residuals: SequentialResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        """The reverse pass: each layer's backward, last layer first, passing ``dx`` down as the next ``dy``."""
        grads = {}
        for (name, layer), saved in zip(reversed(self.named_layers()), reversed(residuals.layers)):
            with named(name):
                dy, layer_grads = layer.backward(params.get(name, {}), saved, dy)
            if name in params:
                grads[name] = layer_grads
        return dy, grads

    def apply(
        self,
        params: Params,
        state: State,
        x: jax.Array,
        *,
        train: bool = False,
        key: jax.Array | None = None,
        gradients: str = "autodiff",
    ) -> tuple[jax.Array, State]:
        """``(y, new_state)``; with ``gradients="manual"`` every layer runs through its own custom_vjp bridge."""
        check_gradients_mode(gradients)
        self._check_names(params, state)
        new_state = {}
        for index, (name, layer) in enumerate(self.named_layers()):
            with named(name):
                x, layer_state = layer.apply(
                    params.get(name, {}),
                    state.get(name, {}),
                    x,
                    train=train,
                    key=layer_key(key, index),
                    gradients=gradients,
                )
            if name in state or jax.tree.leaves(layer_state):
                new_state[name] = layer_state
        return x, new_state

    def trace(
        self,
        params: Params,
        state: State,
        x: jax.Array,
        *,
        train: bool = False,
        key: jax.Array | None = None,
        path: str = "",
    ) -> tuple[jax.Array, State, list[LayerCall]]:
        calls, new_state = [], {}
        for index, (name, layer) in enumerate(self.named_layers()):
            with named(name):
                x, layer_state, inner = layer.trace(
                    params.get(name, {}),
                    state.get(name, {}),
                    x,
                    train=train,
                    key=layer_key(key, index),
                    path=f"{path}/{name}" if path else name,
                )
            calls.extend(inner)
            if name in state or jax.tree.leaves(layer_state):
                new_state[name] = layer_state
        return x, new_state, calls
