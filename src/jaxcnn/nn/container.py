"""Containers: layers made of named child layers, wired once and run three ways.

A container says how its children connect in one method, ``wire``: which child sees which input, and how their
outputs combine. :class:`Sequential` chains them; :class:`Residual` adds a block's output to a shortcut's.
From that one wiring, :class:`Container` derives the three ways a model runs:

* ``forward_with_state`` -- saving every child's residuals for the container's ``backward``;
* ``apply`` -- with ``gradients="manual"`` every leaf layer goes through its own custom_vjp bridge;
* ``trace`` -- recording every leaf layer's call, for the gradient checker.

Parameters and state are dicts keyed by child name, with entries only for children that have leaves; child
``i`` draws its randomness from ``fold_in(key, i)``. Backward passes are written per container: they are the
chain rule of the wiring (a chain runs its children in reverse; a sum sends ``dy`` to both branches).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcnn.nn.contract import check_backward_result
from jaxcnn.nn.layer import (
    Key,
    Layer,
    LayerCall,
    Params,
    Shape,
    State,
    Static,
    check_gradients_mode,
    check_key,
    layer_key,
    layer_path,
    named,
    path_parts,
)


class Tap(NamedTuple):
    """One leaf layer's backward as :func:`recording_cotangents` saw it: where the layer sits (``path``, the keys
    of its parameters in the model's parameter tree), the layer, its parameters, its saved residuals and the
    cotangent ``dy`` of its output."""

    path: tuple[str, ...]
    layer: Layer
    params: Params
    residuals: Any
    dy: jax.Array


_TAPE: contextvars.ContextVar[tuple[list[Tap], int] | None] = contextvars.ContextVar("jaxcnn_tape", default=None)


@contextlib.contextmanager
def recording_cotangents() -> Iterator[list[Tap]]:
    """Record, while active, every leaf layer with parameters whose backward a container runs: a list of
    :class:`Tap`, in the order the backward pass reaches them (last layer first).

    Each leaf's saved input and output cotangent is what DP-SGD's ghost clipping needs (per-example gradient
    norms, then the clipped sum with the cotangents rescaled). Paths are relative to where recording started.
    """
    tape: list[Tap] = []
    token = _TAPE.set((tape, len(path_parts())))
    try:
        yield tape
    finally:
        _TAPE.reset(token)


class ChildResiduals(NamedTuple):
    """What a container saves per child: the child's own residuals, and its input's shape (Static; None for an
    integer input) against which the child's ``dx`` is checked."""

    residuals: Any
    input_shape: Static


def _input_shape(x: jax.Array) -> tuple[int, ...] | None:
    return tuple(jnp.shape(x)) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else None


# visit(name, layer, params, state, x, key) -> (y, extra, new_state): what running one child means
Visit = Callable[[str, Layer, Params, State, jax.Array, "jax.Array | None"], tuple[jax.Array, Any, State]]


class Container(Layer):
    """Base class of layers built from named children (see the module docstring)."""

    def named_children(self) -> tuple[tuple[str, Layer], ...]:
        """``(name, layer)`` pairs, in the order their keys are drawn (``fold_in(key, index)``)."""
        raise NotImplementedError

    def wire(self, run: Callable[[str, jax.Array], jax.Array], x: jax.Array) -> jax.Array:
        """The container's output for input ``x``, where ``run(name, input)`` runs the child called ``name``."""
        raise NotImplementedError

    # -- derived -----------------------------------------------------------------------------------------------

    def check_names(self, params: Params, state: State) -> None:
        names = [name for name, _ in self.named_children()]
        for what, tree in (("params", params), ("state", state)):
            if not isinstance(tree, dict):
                kind = type(self).__name__
                raise ValueError(f"{kind} expects {what} as a dict keyed by layer name, got {type(tree).__name__}")
            unknown = sorted(set(tree) - set(names))
            if unknown:
                raise ValueError(f"{what} has entries {unknown} for no layer of this model; its layers: {names}")

    def _run(
        self, params: Params, state: State, x: jax.Array, key: jax.Array | None, visit: Visit
    ) -> tuple[jax.Array, dict[str, Any], State]:
        """Run the wiring with ``visit`` for each child: ``(y, extras by child name, new_state)``."""
        self.check_names(params, state)
        if key is not None:
            check_key(key)
        children = {name: (index, layer) for index, (name, layer) in enumerate(self.named_children())}
        extras: dict[str, Any] = {}
        new_state: dict[str, State] = {}

        def run(name: str, inputs: jax.Array) -> jax.Array:
            index, layer = children[name]
            with named(name):
                y, extras[name], child_state = visit(
                    name, layer, params.get(name, {}), state.get(name, {}), inputs, layer_key(key, index)
                )
            if name in state or jax.tree.leaves(child_state):
                new_state[name] = child_state
            return y

        return self.wire(run, x), extras, new_state

    def init_children(self, key: jax.Array, shapes: dict[str, Shape], dtype: Any) -> tuple[Params, State]:
        """Initialise every child on its input shape; dicts with entries only for children with leaves."""
        params, state = {}, {}
        for index, (name, layer) in enumerate(self.named_children()):
            with named(name):
                child_params, child_state = layer.init(jax.random.fold_in(key, index), shapes[name], dtype=dtype)
            if jax.tree.leaves(child_params):
                params[name] = child_params
            if jax.tree.leaves(child_state):
                state[name] = child_state
        return params, state

    def forward_with_state(
        self, params: Params, state: State, x: jax.Array, *, train: bool = False, key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, Any], State]:
        """Forward through the wiring, saving each child's residuals (by name) for :meth:`backward`."""

        def visit(name, layer, p, s, inputs, k):
            y, residuals, new_state = layer.forward_with_state(p, s, inputs, train=train, key=k)
            return y, ChildResiduals(residuals, Static(_input_shape(inputs))), new_state

        return self._run(params, state, x, key, visit)

    def apply(
        self,
        params: dict[str, Params],
        state: dict[str, State],
        x: jax.Array,
        *,
        train: bool = False,
        key: jax.Array | None = None,
        gradients: str = "autodiff",
        remat: bool = False,
    ) -> tuple[jax.Array, State]:
        """``(y, new_state)``; with ``gradients="manual"`` every leaf layer runs through its own custom_vjp bridge.

        ``remat=True`` runs each child under ``jax.checkpoint``: a differentiated call keeps only the children's
        inputs and recomputes their insides in the backward pass (less memory, one more forward per child).
        """
        check_gradients_mode(gradients)
        if not isinstance(remat, bool):
            raise ValueError(f"remat must be a bool, got {remat!r}")

        def run_child(layer, p, s, inputs, k):
            return layer.apply(p, s, inputs, train=train, key=k, gradients=gradients)

        def visit(name, layer, p, s, inputs, k):
            if remat:
                y, new_state = jax.checkpoint(run_child, static_argnums=0)(layer, p, s, inputs, k)
            else:
                y, new_state = run_child(layer, p, s, inputs, k)
            return y, None, new_state

        y, _, new_state = self._run(params, state, x, key, visit)
        return y, new_state

    def trace(
        self, params: Params, state: State, x: jax.Array, *, train: bool = False, key: Key = None, path: str = ""
    ) -> tuple[jax.Array, State, list[LayerCall]]:
        def visit(name, layer, p, s, inputs, k):
            y, new_state, calls = layer.trace(p, s, inputs, train=train, key=k, path=f"{path}/{name}" if path else name)
            return y, calls, new_state

        y, calls, new_state = self._run(params, state, x, key, visit)
        return y, new_state, [call for name, _ in self.named_children() for call in calls.get(name, [])]

    def child_backward(
        self, name: str, params: Params, residuals: dict[str, Any], dy: jax.Array, grads: dict[str, Params]
    ) -> jax.Array:
        """Run child ``name``'s backward on ``dy``; store its parameter gradients in ``grads``; return its ``dx``."""
        layer = dict(self.named_children())[name]
        saved = residuals[name]
        child_params = params.get(name, {})
        with named(name):
            result = layer.backward(child_params, saved.residuals, dy)
        dx, child_grads = check_backward_result(layer_path(name), result, child_params, saved.input_shape.value)
        if name in params:
            grads[name] = child_grads
            recording = _TAPE.get()
            if recording is not None and not isinstance(layer, Container):
                tape, depth = recording
                tape.append(Tap((*path_parts()[depth:], name), layer, child_params, saved.residuals, dy))
        return dx
