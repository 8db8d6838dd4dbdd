"""Layer by layer: each leaf layer's hand-derived ``backward`` against ``jax.vjp`` of its own forward, and a
finite difference, at the input the layer actually receives inside the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.gradcheck.checks import Progress, Settings, point_seed, points
from jaxcnn.gradcheck.numerics import (
    all_finite,
    array_check,
    cast,
    fd_check,
    largest,
    leaves_with_names,
    normal,
    replace_leaf,
    x64,
)
from jaxcnn.gradcheck.report import Report, Tolerance
from jaxcnn.nn.contract import check_backward_result
from jaxcnn.nn.layer import Layer


def check_layers(
    model: Layer,
    params: Any,
    state: Any,
    x: jax.Array,
    *,
    dtype: Any = jnp.float64,
    train: bool = True,
    key: jax.Array | None = None,
    seed: int = 0,
    finite_differences: bool = True,
    perturbations: int = 1,
    progress: Progress | None = None,
) -> Report:
    """Layer by layer: each leaf layer's hand-derived ``backward`` vs ``jax.vjp`` of its forward (and FD).

    Args:
      model: any layer or container; ``params``/``state`` from its ``init``; ``x`` a batch ``(N, *input_shape)``.
      dtype: float64 (default) or float32.
      train, key: the mode and random key the forward runs with.
      seed: seeds the random cotangents, finite-difference directions and perturbed points.
      finite_differences: include the finite-difference rows.
      perturbations: how many seeded perturbed copies of ``(params, x)`` to check at besides the given one.
      progress: called with each :class:`Check` as soon as it is made (to print rows as they come).

    Returns:
      A :class:`Report`; each row says its ``point``.
    """
    settings = Settings(dtype, seed, perturbations, progress)
    with x64(True):
        params, state, x = cast((params, state, x), dtype)
        forward = jax.jit(lambda p, x_in: model.apply(p, state, x_in, train=train, key=key)[0])
        at = points((params, x), settings.seed, settings.count, lambda point: all_finite(forward(*point)))
        layer_rows(model, state, at, train, key, settings, finite_differences)
    return settings.report(at)


def layer_rows(
    model: Layer, state: Any, at: Sequence[tuple[str, Any]], train: bool, key: Any, settings: Settings, fd: bool
) -> None:
    """The rows of every leaf layer of ``model`` at the points ``at`` (``(label, (params, x))`` each)."""
    traces = [model.trace(p, state, x, train=train, key=key)[2] for _, (p, x) in at]
    labels = [label for label, _ in at]
    for number, calls in enumerate(zip(*traces, strict=True)):
        _check_call(calls, labels, train, (settings.seed, number), settings, fd)


def _check_call(
    calls: Sequence[Any], labels: Sequence[str], train: bool, seed: tuple[int, ...], settings: Settings, fd: bool
) -> None:
    """The rows of one leaf layer, at each point: ``calls[i]`` is its call at point ``labels[i]``."""
    first = calls[0]
    layer, path, layer_key = first.layer, first.path, first.key
    # integer inputs (uint8 images) have no cotangent to compare
    has_input = jnp.issubdtype(jnp.result_type(first.x), jnp.inexact)

    def forward(p, state, x_in):
        return layer.forward_with_state(p, state, x_in, train=train, key=layer_key)[0]

    def hand_vjp(p, state, x_in, dy):
        _, residuals, _ = layer.forward_with_state(p, state, x_in, train=train, key=layer_key)
        result = layer.backward(p, residuals, dy)
        return check_backward_result(path, result, p, tuple(x_in.shape) if has_input else None)

    def autodiff_vjp(p, state, x_in, dy):
        _, pullback = jax.vjp(lambda p, x_in: forward(p, state, x_in), p, x_in)
        dparams, dx = pullback(dy)
        return dx, dparams

    # one program for both sides: one compile per layer (the finite differences reuse it for the hand side)
    both = jax.jit(lambda p, state, x_in, dy: (hand_vjp(p, state, x_in, dy), autodiff_vjp(p, state, x_in, dy)))

    def hand(p, state, x_in, dy):
        return both(p, state, x_in, dy)[0]

    y_shape = jax.eval_shape(forward, first.params, first.state, first.x)
    # the finite differences' forward, in float64, compiled once for every point
    output = jax.jit(lambda p, state, x_in: forward(p, state, x_in))
    tolerance, rows = settings.tolerance, settings.rows
    for index, (call, point) in enumerate(zip(calls, labels, strict=True)):
        at = point_seed(seed, index)
        dy = jnp.asarray(normal((*at, 0), y_shape.shape), y_shape.dtype)
        (dx_hand, dparams_hand), (dx_auto, dparams_auto) = both(call.params, call.state, call.x, dy)
        scale = largest(dparams_auto, dx_auto if has_input else ())
        method = "hand vs autodiff"
        if has_input:
            rows.add(array_check(("layer", path, "input", method), dx_hand, dx_auto, tolerance, scale, point))
        for hand_leaf, (_, quantity, auto) in zip(
            jax.tree.leaves(dparams_hand), leaves_with_names(dparams_auto), strict=True
        ):
            rows.add(array_check(("layer", path, quantity, method), hand_leaf, auto, tolerance, scale, point))
        if fd:
            _layer_fd_rows(call, point, at, hand, output, y_shape, has_input, settings)


def _layer_fd_rows(call, point, seed, hand, output, y_shape, has_input, settings: Settings) -> None:
    """Finite differences in float64, at the recorded input plus a little noise (off ties and kinks)."""
    tolerance: Tolerance = settings.tolerance
    params64, state64 = cast((call.params, call.state), jnp.float64)
    if has_input:
        x64_ = np.asarray(call.x, np.float64)
        spread = max(float(np.std(x64_)), 1e-3)
        x64_ = jnp.asarray(x64_ + 1e-2 * spread * normal((*seed, 1), x64_.shape))
    else:
        x64_ = call.x
    dy64 = normal((*seed, 2), y_shape.shape)
    # the analytic side is the hand rule in the checked dtype, at the same (noisy) point
    p_d, state_d, x_d, dy_d = cast((params64, state64, x64_, jnp.asarray(dy64)), settings.dtype)
    dx_d, dparams_d = hand(p_d, state_d, x_d, dy_d)
    scale = largest(dparams_d, dx_d if has_input else ())
    method = "hand vs finite diff"
    if has_input:
        settings.rows.add(
            fd_check(
                ("layer", call.path, "input", method),
                lambda xv: output(params64, state64, xv),
                x64_,
                dx_d,
                (*seed, 3),
                tolerance,
                point,
                cotangent=dy64,
                group_scale=scale,
            )
        )
    for index, ((_, quantity, leaf), grad) in enumerate(
        zip(leaves_with_names(params64), jax.tree.leaves(dparams_d), strict=True)
    ):
        settings.rows.add(
            fd_check(
                ("layer", call.path, quantity, method),
                lambda value, index=index: output(replace_leaf(params64, index, value), state64, x64_),
                leaf,
                grad,
                (*seed, 4, index),
                tolerance,
                point,
                cotangent=dy64,
                group_scale=scale,
            )
        )
