"""Alternatives to backpropagation: gradient estimates from forward evaluations only.

Each estimator takes a scalar function of a parameter pytree, ``f(params) -> loss``, and returns an estimate of
``grad f(params)`` shaped like ``params``, with no reverse pass:

- :func:`evolution_strategies_grad` (ES, antithetic Gaussian perturbations, the population evaluated with
  ``jax.vmap``): ``(1 / (P sigma)) sum_i (f(p + sigma e_i) - f(p - sigma e_i)) / 2 * e_i``; 2P evaluations.
- :func:`forward_grad` (forward gradients, Baydin et al. 2022): ``(grad f . v) v`` for Gaussian directions
  ``v``, the directional derivative from one ``jax.jvp`` each; K forward-mode evaluations.
- :func:`spsa_grad` (simultaneous perturbation stochastic approximation, Spall 1992): Rademacher directions
  ``d``, ``(f(p + c d) - f(p - c d)) / (2c) * d``; 2 evaluations per sample.

All three are unbiased for the gradient of a quadratic (ES and SPSA exactly so, because the central difference
of a quadratic is exact), with known variances: for one Gaussian direction (ES pair, forward gradient) the
covariance is ``g g^T + |g|^2 I``; for one Rademacher direction (SPSA) the variance of component ``j`` is
``|g|^2 - g_j^2``. Averaging over P samples divides them by P. :func:`make_estimator_train_step` trains any
model with an estimator and an optax optimizer; :data:`ESTIMATORS` names them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxcnn._validate import is_int
from jaxcnn.functional import softmax_cross_entropy
from jaxcnn.nn.layer import Layer, Params
from jaxcnn.train.state import TrainState, as_typed_key
from jaxcnn.train.step import LossFn, Metrics, accuracy_of

Objective = Callable[[Params], jax.Array]


def _count(name: str, value: Any) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _scale(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def evolution_strategies_grad(
    f: Objective, params: Params, key: jax.Array, *, population: int = 16, sigma: float = 0.01
) -> Params:
    """The antithetic evolution-strategies estimate of ``grad f(params)``.

    Args:
      f: the loss as a function of the parameters (a scalar).
      params: the parameter pytree.
      key: the random key of the perturbations.
      population: P, the number of antithetic pairs (2P evaluations of ``f``, vmapped).
      sigma: the perturbation scale.

    Returns:
      The estimate, shaped like ``params``: ``(1 / (P sigma)) sum_i (f(p + sigma e_i) - f(p - sigma e_i)) / 2
      e_i`` with ``e_i ~ N(0, I)``.
    """
    population, sigma = _count("population", population), _scale("sigma", sigma)
    flat, unravel = ravel_pytree(params)
    noise = jax.random.normal(as_typed_key(key), (population, flat.size), flat.dtype)

    def difference(e):
        return (f(unravel(flat + sigma * e)) - f(unravel(flat - sigma * e))) / 2

    differences = jax.vmap(difference)(noise)
    return unravel(differences.astype(flat.dtype) @ noise / (population * sigma))


def forward_grad(f: Objective, params: Params, key: jax.Array, *, directions: int = 1) -> Params:
    """The forward-gradient estimate of ``grad f(params)``: the mean of ``(grad f . v) v`` over ``directions``
    Gaussian directions ``v``, each directional derivative from one ``jax.jvp`` (no reverse pass).

    Returns:
      The estimate, shaped like ``params``.
    """
    directions = _count("directions", directions)
    flat, unravel = ravel_pytree(params)
    tangents = jax.random.normal(as_typed_key(key), (directions, flat.size), flat.dtype)

    def directional(v):
        return jax.jvp(lambda p: f(unravel(p)), (flat,), (v,))[1]

    slopes = jax.vmap(directional)(tangents)
    return unravel(slopes.astype(flat.dtype) @ tangents / directions)


def spsa_grad(f: Objective, params: Params, key: jax.Array, *, samples: int = 1, c: float = 0.01) -> Params:
    """The SPSA estimate of ``grad f(params)``: the mean over ``samples`` Rademacher directions ``d`` (entries
    +-1) of ``(f(p + c d) - f(p - c d)) / (2c) * d`` (2 evaluations each, vmapped).

    Returns:
      The estimate, shaped like ``params``.
    """
    samples, c = _count("samples", samples), _scale("c", c)
    flat, unravel = ravel_pytree(params)
    signs = jax.random.rademacher(as_typed_key(key), (samples, flat.size), flat.dtype)

    def difference(d):
        return (f(unravel(flat + c * d)) - f(unravel(flat - c * d))) / (2 * c)

    differences = jax.vmap(difference)(signs)
    return unravel(differences.astype(flat.dtype) @ signs / samples)


def backprop_grad(f: Objective, params: Params, key: jax.Array | None = None) -> Params:
    """The exact gradient by reverse mode (``jax.grad``), in the estimators' calling convention."""
    del key
    return jax.grad(f)(params)


# name -> (estimator, its sample-count option, forward evaluations per sample)
ESTIMATORS: dict[str, tuple[Callable[..., Params], str | None, int]] = {
    "backprop": (backprop_grad, None, 1),
    "es": (evolution_strategies_grad, "population", 2),
    "forward": (forward_grad, "directions", 1),
    "spsa": (spsa_grad, "samples", 2),
}


def evaluations_per_step(method: str, **options: Any) -> int:
    """Forward evaluations of the model one step of ``method`` costs: 2P for ES, K for forward gradients (one
    jvp each: a forward pass carrying a tangent), 2S for SPSA, 1 for backprop (plus its backward pass)."""
    if method not in ESTIMATORS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(ESTIMATORS)}")
    _, option, per_sample = ESTIMATORS[method]
    if option is None:
        return per_sample
    defaults = {"population": 16, "directions": 1, "samples": 1}
    return per_sample * int(options.get(option, defaults[option]))


def make_estimator_train_step(
    model: Layer,
    method: str,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    **options: Any,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """A jit-compiled ``step(state, x, y) -> (state, metrics)`` that updates the parameters with the state's
    optimizer (``state.tx``) from the gradient estimate of ``method`` (``"es"``, ``"forward"``, ``"spsa"`` or
    ``"backprop"``).

    ``options`` go to the estimator (``population``/``sigma``, ``directions``, ``samples``/``c``). Step ``s``
    draws its perturbations from ``fold_in(state.key, s)``; every evaluation of one step shares the batch and
    the dropout key (common random numbers). Models with running statistics (BatchNorm) are refused.

    ``metrics``: ``"loss"`` and ``"accuracy"`` of the unperturbed parameters on the batch, ``"count"``, and
    ``"evaluations"``: the forward evaluations the step cost (see :func:`evaluations_per_step`).
    """
    if method not in ESTIMATORS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(ESTIMATORS)}")
    estimator, option, _ = ESTIMATORS[method]
    known = {"es": {"population", "sigma"}, "forward": {"directions"}, "spsa": {"samples", "c"}, "backprop": set()}
    unknown = sorted(set(options) - known[method])
    if unknown:
        raise ValueError(f"method {method!r} takes options {sorted(known[method]) or 'none'}, got {unknown}")
    evaluations = evaluations_per_step(method, **options)

    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, Metrics]:
        if jax.tree.leaves(state.model_state):
            raise ValueError("the gradient estimators need a model without running statistics (BatchNorm)")
        key = jax.random.fold_in(state.key, state.step)
        noise_key, dropout_key = jax.random.split(key)

        def f(params):
            predictions, _ = model.apply(params, state.model_state, x, train=True, key=dropout_key)
            return loss_fn(predictions, y)

        grads = estimator(f, state.params, noise_key, **options)
        predictions, _ = model.apply(state.params, state.model_state, x, train=False)
        metrics = {
            "loss": loss_fn(predictions, y),
            "count": jnp.asarray(x.shape[0], jnp.int32),
            "evaluations": jnp.asarray(evaluations, jnp.int32),
        }
        accuracy = accuracy_of(predictions, y)
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        return state.apply_gradients(grads=grads), metrics

    return jax.jit(step, donate_argnums=0)
