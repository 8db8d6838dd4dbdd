"""Backpropagation written out: forward, loss, backward, as four readable steps.

:func:`reverse_pass` (and :func:`value_and_grad`, shaped like ``jax.value_and_grad``) is the explicit reverse
pass. It calls no JAX differentiation transform: the forward saves each layer's residuals, the loss's
hand-derived VJP gives the cotangent of the model output, and each layer's ``backward`` runs in reverse order
(see :meth:`jaxcnn.nn.Sequential.backward`). The result is an ordinary traceable function, so ``jax.jit``
compiles it like any other.

:func:`manual_loss` is the loss-side half of the ``gradients="manual"`` bridge: the loss wrapped in
``jax.custom_vjp`` with its hand-derived VJP, so ``jax.grad`` of ``manual_loss(model.apply(...))`` uses hand
rules from the loss down to the first layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcnn.functional import hand_rule
from jaxcnn.nn.contract import check_backward_result
from jaxcnn.nn.layer import Layer, Params, State

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
LossVJP = Callable[[jax.Array, jax.Array, Any], jax.Array]


def loss_vjp_of(loss_fn: LossFn, loss_vjp: LossVJP | None = None) -> LossVJP:
    """The hand-derived VJP ``loss_vjp(predictions, targets, dloss) -> dpredictions`` of ``loss_fn``.

    Uses ``loss_vjp`` when given, else the rule registered for ``loss_fn`` in :mod:`jaxcnn.functional`
    (``softmax_cross_entropy``, ``mean_squared_error``, or any op registered with ``F.register``).
    """
    if loss_vjp is not None:
        return loss_vjp
    rule = hand_rule(loss_fn)
    return lambda predictions, targets, dloss: rule.vjp((predictions, targets), dloss)[0]


def manual_loss(loss_fn: LossFn, loss_vjp: LossVJP | None = None) -> LossFn:
    """``loss_fn`` routed through ``jax.custom_vjp`` with its hand-derived VJP (targets get no cotangent)."""
    vjp = loss_vjp_of(loss_fn, loss_vjp)

    @jax.custom_vjp
    def loss(predictions, targets):
        return loss_fn(predictions, targets)

    def loss_forward(predictions, targets):
        return loss_fn(predictions, targets), (predictions, targets)

    def loss_backward(saved, dloss):
        predictions, targets = saved
        return vjp(predictions, targets, dloss), None

    loss.defvjp(loss_forward, loss_backward)
    return loss


class ReversePass(NamedTuple):
    """What one explicit reverse pass computes: the loss, the model's output, its new state and the gradients."""

    loss: jax.Array
    predictions: jax.Array
    state: State
    grads: Params


def reverse_pass(
    model: Layer,
    loss_fn: LossFn,
    *,
    loss_vjp: LossVJP | None = None,
    train: bool = True,
) -> Callable[..., ReversePass]:
    """The explicit reverse pass of ``loss_fn(model(x), y)``, keeping the predictions (for metrics).

    Args:
      model: any :class:`jaxcnn.nn.Layer` (usually a ``Sequential``).
      loss_fn: ``loss_fn(predictions, targets) -> scalar``.
      loss_vjp: its hand-derived VJP ``(predictions, targets, dloss) -> dpredictions``; looked up among the
        registered functional ops when omitted.
      train: the mode the forward runs in (training by default).

    Returns:
      ``f(params, state, x, y, *, key=None) -> ReversePass(loss, predictions, state, grads)``; ``x`` is
      ``(N, *input_shape)``, ``predictions`` the model's output ``(N, ...)`` and ``grads`` shaped like ``params``.
    """
    vjp = loss_vjp_of(loss_fn, loss_vjp)

    def run(params: Params, state: State, x: jax.Array, y: jax.Array, *, key: jax.Array | None = None) -> ReversePass:
        # 1. forward pass, saving every layer's residuals
        predictions, residuals, new_state = model.forward_with_state(params, state, x, train=train, key=key)
        # 2. loss
        loss = loss_fn(predictions, y)
        # 3. backward pass: the loss's cotangent, then every layer's backward in reverse order
        dpredictions = vjp(predictions, y, jnp.ones((), loss.dtype))
        result = model.backward(params, residuals, dpredictions)
        input_shape = tuple(jnp.shape(x)) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else None
        _, grads = check_backward_result(type(model).__name__, result, params, input_shape)
        # 4. the weight update is the optimizer's: apply `grads` with optax (or plain SGD: p - lr * g)
        return ReversePass(loss, predictions, new_state, grads)

    return run


def value_and_grad(
    model: Layer,
    loss_fn: LossFn,
    *,
    loss_vjp: LossVJP | None = None,
    train: bool = True,
) -> Callable[..., tuple[tuple[jax.Array, State], Params]]:
    """The explicit reverse pass of ``loss_fn(model(x), y)``, shaped like ``jax.value_and_grad(..., has_aux=True)``.

    Takes the arguments of :func:`reverse_pass`, which does the work and also keeps the predictions.

    Returns:
      ``f(params, state, x, y, *, key=None) -> ((loss, new_state), grads)`` with ``grads`` shaped like
      ``params``; ``x`` is ``(N, *input_shape)``. See :func:`reverse_pass` for the steps.
    """
    run = reverse_pass(model, loss_fn, loss_vjp=loss_vjp, train=train)

    def loss_and_grads(
        params: Params, state: State, x: jax.Array, y: jax.Array, *, key: jax.Array | None = None
    ) -> tuple[tuple[jax.Array, State], Params]:
        result = run(params, state, x, y, key=key)
        return (result.loss, result.state), result.grads

    return loss_and_grads
