"""Backpropagation written out: forward, loss, backward, as four readable steps.

:func:`reverse_pass` (and :func:`value_and_grad`, shaped like ``jax.value_and_grad``) is the explicit reverse
pass. It calls no JAX differentiation transform: the forward saves each layer's residuals, the loss's
hand-derived VJP gives the cotangent of the model output, and each layer's ``backward`` runs in reverse order
(see :meth:`jaxcnn.nn.Sequential.backward`). The result is an ordinary traceable function, so ``jax.jit``
compiles it like any other.

:func:`manual_loss` is the loss-side half of the ``gradients="manual"`` bridge: the loss wrapped in
``jax.custom_vjp`` with its hand-derived VJP, so ``jax.grad`` of ``manual_loss(model.apply(...))`` uses hand
rules from the loss down to the first layer.

:func:`loss_and_grads` is the one place that turns a gradient mode into a loss and gradients: the train steps,
per-example gradients, DP-SGD and the gradient checker all call it. The modes, one vocabulary everywhere
(:data:`GRADIENTS`):

* ``"autodiff"``: ``jax.value_and_grad`` through the plain forward;
* ``"manual"``: the same call, but every layer and the loss run through ``jax.custom_vjp`` with their
  hand-derived rules (the *bridge*: jit, vmap, grad and sharding still compose);
* ``"engine"``: :func:`reverse_pass`, the explicit reverse pass, with no JAX differentiation at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcnn._autodiff import value_and_grad_of  # the modes JAX differentiates, kept outside the hand rules
from jaxcnn.functional import hand_rule
from jaxcnn.nn.contract import check_backward_result
from jaxcnn.nn.layer import Layer, Params, State

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
LossVJP = Callable[[jax.Array, jax.Array, Any], jax.Array]

GRADIENTS = ("autodiff", "manual", "engine")  # the gradient modes, see the module docstring


def check_gradients(gradients: Any) -> str:
    """``gradients`` if it names a gradient mode (:data:`GRADIENTS`); ValueError listing the modes otherwise."""
    if not isinstance(gradients, str) or gradients not in GRADIENTS:
        raise ValueError(f"unknown gradients {gradients!r}; known: {', '.join(GRADIENTS)}")
    return gradients


def loss_vjp_of(loss_fn: LossFn, loss_vjp: LossVJP | None = None) -> LossVJP:
    """The hand-derived VJP ``loss_vjp(predictions, targets, dloss) -> dpredictions`` of ``loss_fn``.

    Uses ``loss_vjp`` when given, else the rule registered for ``loss_fn`` in :mod:`jaxcnn.functional`
    (``softmax_cross_entropy``, ``mean_squared_error``, or any op registered with ``F.register``), also when
    ``loss_fn`` binds options of such an op by keyword: ``functools.partial(F.softmax_cross_entropy,
    label_smoothing=0.1)``.
    """
    if loss_vjp is not None:
        return loss_vjp
    options: dict[str, Any] = {}
    if isinstance(loss_fn, functools.partial) and not loss_fn.args:
        loss_fn, options = loss_fn.func, dict(loss_fn.keywords)
    rule = hand_rule(loss_fn)
    return lambda predictions, targets, dloss: rule.vjp((predictions, targets), dloss, **options)[0]


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


def loss_and_grads(
    model: Layer,
    loss_fn: LossFn,
    *,
    gradients: str = "autodiff",
    loss_vjp: LossVJP | None = None,
    train: bool = True,
    remat: bool = False,
) -> Callable[..., ReversePass]:
    """The loss of ``loss_fn(model(x), y)`` and its gradients in one of the three gradient modes.

    Args:
      model: any :class:`jaxcnn.nn.Layer`.
      loss_fn: ``loss_fn(predictions, targets) -> scalar``; ``"manual"`` and ``"engine"`` need its hand-derived
        VJP: ``loss_vjp``, or the rule registered for it in :mod:`jaxcnn.functional`.
      gradients: ``"autodiff"``, ``"manual"`` or ``"engine"`` (see the module docstring).
      loss_vjp: ``(predictions, targets, dloss) -> dpredictions``, the hand rule of ``loss_fn`` (``"manual"``
        and ``"engine"``; ``"autodiff"`` differentiates ``loss_fn`` itself).
      train: the mode the forward runs in.
      remat: run each child of the model (a :class:`jaxcnn.nn.Container`) under ``jax.checkpoint``, recomputing
        its activations in the backward pass; ``"autodiff"`` and ``"manual"`` only (the engine keeps every
        residual by design).

    Returns:
      ``f(params, state, x, y, *, key=None) -> ReversePass(loss, predictions, state, grads)``: ``x`` is
      ``(N, *input_shape)``, ``predictions`` the model's output ``(N, ...)``, ``state`` the model's new state and
      ``grads`` shaped like ``params``. The same function in every mode, so callers never branch on it.
    """
    check_gradients(gradients)
    if remat:
        from jaxcnn.nn.container import Container

        if gradients == "engine":
            raise ValueError("remat works with gradients='autodiff' or 'manual' (the engine keeps every residual)")
        if not isinstance(model, Container):
            raise ValueError(f"remat checkpoints a container's children; {type(model).__name__} has none")
    if gradients == "engine":
        return reverse_pass(model, loss_fn, loss_vjp=loss_vjp, train=train)
    loss_of = manual_loss(loss_fn, loss_vjp) if gradients == "manual" else loss_fn
    value_and_grad_fn = value_and_grad_of(model, loss_of, gradients=gradients, train=train, remat=remat)

    def run(params: Params, state: State, x: jax.Array, y: jax.Array, *, key: jax.Array | None = None) -> ReversePass:
        (loss, (predictions, new_state)), grads = value_and_grad_fn(params, state, x, y, key)
        return ReversePass(loss, predictions, new_state, grads)

    return run
