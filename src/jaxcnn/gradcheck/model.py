"""The whole model: the gradient of the loss in each hand-derived gradient mode (``"engine"`` and
``"manual"``) against ``"autodiff"``, all three from :func:`jaxcnn.backprop.loss_and_grads`, plus a central
finite difference of the loss along a random direction in each parameter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxcnn.functional as F
from jaxcnn import backprop
from jaxcnn.gradcheck.checks import Progress, Settings, point_seed, points
from jaxcnn.gradcheck.layers import layer_rows
from jaxcnn.gradcheck.numerics import (
    all_finite,
    array_check,
    cast,
    fd_check,
    jitter,
    largest,
    leaves_with_names,
    replace_leaf,
    x64,
)
from jaxcnn.gradcheck.report import Report
from jaxcnn.nn.layer import Layer

HAND_MODES = ("engine", "manual")  # the gradient modes checked against "autodiff", in the order of the rows


def check_model(
    model: Layer,
    params: Any,
    state: Any,
    x: jax.Array,
    y: jax.Array,
    *,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = F.softmax_cross_entropy,
    loss_vjp: Callable[..., jax.Array] | None = None,
    dtype: Any = jnp.float64,
    train: bool = True,
    key: jax.Array | None = None,
    seed: int = 0,
    layers: bool = True,
    finite_differences: bool = True,
    perturbations: int = 1,
    progress: Progress | None = None,
) -> Report:
    """Check a model's gradients three ways, per layer and per parameter, at the given and at perturbed points.

    Args:
      model: the model (any :class:`jaxcnn.nn.Layer`); ``params``, ``state`` from its ``init``.
      x: a batch ``(N, *input_shape)``; y: its targets (integer labels ``(N,)`` for the default loss).
      loss_fn: ``loss_fn(predictions, y) -> scalar``; ``loss_vjp`` its hand-derived VJP when it is not a
        registered functional op.
      dtype: float64 (default; 64-bit types are switched on inside the check) or float32.
      train, key: the mode and random key every path runs with (the same for all, so dropout masks agree).
      seed: seeds the random cotangents, finite-difference directions and perturbed points.
      layers: include the layer-by-layer checks; finite_differences: include the finite-difference checks.
      perturbations: how many seeded perturbed copies of ``(params, x)`` to check at besides the given one
        (default 1; 0 checks only the given point, which a rule that is right only at initial values can pass).
      progress: called with each :class:`Check` as soon as it is made (to print rows as they come).

    Returns:
      A :class:`Report`; ``report.ok`` is True when every check passed, ``print(report.table())`` shows them.
      Its model rows are ``"engine vs autodiff"`` and ``"manual vs autodiff"`` (the loss and every parameter,
      each gradient mode of :func:`jaxcnn.backprop.loss_and_grads` against ``"autodiff"``) and
      ``"engine vs finite diff"``.

    Raises:
      BackwardError: a layer's ``backward`` returned the wrong form (``dx`` of the wrong shape, misnamed
        parameter gradients, ``dx`` alone); the message names the layer.
    """
    settings = Settings(dtype, seed, perturbations, progress)
    with x64(True):
        params, state, x = cast((params, state, x), dtype)
        modes = _Modes(model, loss_fn, loss_vjp, train, state, cast(y, dtype), key)
        at = points((params, x), settings.seed, settings.count, modes.finite)
        if layers:
            layer_rows(model, state, at, train, key, settings, finite_differences)
        for index, (point, (p, x_at)) in enumerate(at):
            _exact_rows(modes, p, x_at, point, settings)
            if finite_differences:
                _finite_difference_rows(modes, p, x_at, index, point, settings)
    return settings.report(at)


class _Modes:
    """:func:`jaxcnn.backprop.loss_and_grads` of every gradient mode, jitted, at the check's state, targets and
    key; and the loss alone in float64 for the finite differences."""

    def __init__(self, model: Layer, loss_fn, loss_vjp, train: bool, state: Any, y: jax.Array, key: Any):
        functions = {
            mode: backprop.loss_and_grads(model, loss_fn, gradients=mode, loss_vjp=loss_vjp, train=train)
            for mode in ("autodiff", *HAND_MODES)
        }
        # every mode in one program: one compile for the check (a point runs them all, which costs little)
        self.all_modes = jax.jit(
            lambda p, state, x, y, key: {mode: run(p, state, x, y, key=key) for mode, run in functions.items()}
        )
        self.state, self.y, self.key = state, y, key
        state64, y64 = cast((state, y), jnp.float64)

        @jax.jit
        def loss64(p, x_in):
            predictions, _ = model.apply(p, state64, x_in, train=train, key=key, gradients="autodiff")
            return loss_fn(predictions, y64)

        self.loss64 = loss64

    def __call__(self, mode: str, params: Any, x: jax.Array) -> backprop.ReversePass:
        return self.every(params, x)[mode]

    def every(self, params: Any, x: jax.Array) -> dict[str, backprop.ReversePass]:
        """Every mode's result at ``(params, x)``, from one run of the one program."""
        return self.all_modes(params, self.state, x, self.y, self.key)

    def finite(self, point: tuple[Any, jax.Array]) -> bool:
        """Whether autodiff's loss and gradients are finite at ``point = (params, x)``."""
        result = self("autodiff", *point)
        return all_finite((result.loss, result.grads))


def _exact_rows(modes: _Modes, params: Any, x: jax.Array, point: str, settings: Settings) -> None:
    """The loss and every parameter's gradient of each hand mode (:data:`HAND_MODES`) against autodiff's."""
    tolerance, rows = settings.tolerance, settings.rows
    every = modes.every(params, x)  # one run gives all three modes
    reference = every["autodiff"]
    results = {mode: every[mode] for mode in HAND_MODES}
    for mode, result in results.items():
        where = ("model", "-", "loss", f"{mode} vs autodiff")
        rows.add(array_check(where, result.loss, reference.loss, tolerance, point=point))
    auto_named = leaves_with_names(reference.grads)
    scale = largest(reference.grads)
    for mode, result in results.items():
        if jax.tree.structure(result.grads) != jax.tree.structure(reference.grads):
            raise ValueError(
                f"{mode} gradients have structure {jax.tree.structure(result.grads)}, "
                f"expected that of params {jax.tree.structure(reference.grads)}"
            )
        method = f"{mode} vs autodiff"
        for (layer, quantity, auto), grad in zip(auto_named, jax.tree.leaves(result.grads), strict=True):
            rows.add(array_check(("model", layer, quantity, method), grad, auto, tolerance, scale, point))


def _finite_difference_rows(
    modes: _Modes, params: Any, x: jax.Array, index: int, point: str, settings: Settings
) -> None:
    """The engine's gradient against a central difference of the float64 loss, per parameter.

    At a nearby generic point: parameters plus a little noise, so that pre-activations that are exactly zero
    (zero biases on zero image borders) do not sit on a ReLU kink under the step. The engine's gradient is
    recomputed there.
    """
    tolerance, seed = settings.tolerance, settings.seed
    params64, x64_ = cast((params, x), jnp.float64)
    params64 = jitter(params64, point_seed((seed, 1_000_002), index))
    grads = modes("engine", cast(params64, settings.dtype), x).grads
    scale = largest(grads)
    for leaf_index, ((layer, quantity, leaf), grad) in enumerate(
        zip(leaves_with_names(params64), jax.tree.leaves(grads), strict=True)
    ):
        settings.rows.add(
            fd_check(
                ("model", layer, quantity, "engine vs finite diff"),
                lambda value, i=leaf_index: modes.loss64(replace_leaf(params64, i, value), x64_),
                leaf,
                grad,
                point_seed((seed, 1_000_003, leaf_index), index),
                tolerance,
                point,
                group_scale=scale,
            )
        )
