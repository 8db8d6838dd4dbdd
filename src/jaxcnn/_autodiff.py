"""The gradient modes that differentiate with JAX: ``"autodiff"``, and ``"manual"`` (the hand rules reached
through ``jax.custom_vjp``). Kept apart from the hand-rule modules (:mod:`jaxcnn.functional`, :mod:`jaxcnn.nn`,
:mod:`jaxcnn.backprop`), which never name a differentiation transform; :func:`jaxcnn.backprop.loss_and_grads`
is the public entry point."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxcnn.nn.layer import Layer


def value_and_grad_of(
    model: Layer, loss_fn: Callable[[jax.Array, jax.Array], jax.Array], *, gradients: str, train: bool, remat: bool
) -> Callable[..., Any]:
    """``f(params, state, x, y, key) -> ((loss, (predictions, new_state)), grads)``: ``jax.value_and_grad`` of
    ``loss_fn(model.apply(params, state, x, ...), y)`` with respect to ``params``, the forward run in the given
    gradient mode (``"autodiff"`` or ``"manual"``; ``loss_fn`` already wrapped for ``"manual"``)."""
    options = {"remat": True} if remat else {}

    def objective(params, state, x, y, key):
        predictions, new_state = model.apply(params, state, x, train=train, key=key, gradients=gradients, **options)
        return loss_fn(predictions, y), (predictions, new_state)

    return jax.value_and_grad(objective, has_aux=True)
