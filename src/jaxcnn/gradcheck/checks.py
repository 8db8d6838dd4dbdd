"""The checks themselves: :func:`check_layers`, :func:`check_model` and :func:`check_op`.

Each runs its comparisons at the given point and then at ``perturbations`` perturbed points (see the package
docstring). The jitted functions are built once per call and run at every point, so a perturbed point costs
run time only, no compilation.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxcnn.functional as F
from jaxcnn import backprop
from jaxcnn.functional._args import is_int
from jaxcnn.gradcheck.numerics import (
    all_finite,
    array_check,
    cast,
    check_seed,
    dtype_name,
    fd_row,
    finite_difference_check,
    jitter,
    largest,
    leaves_with_names,
    normal,
    perturbed_point,
    replace_leaf,
    x64,
)
from jaxcnn.gradcheck.report import GIVEN, TOLERANCES, Check, Report, Tolerance, perturbed_label
from jaxcnn.nn.contract import check_backward_result
from jaxcnn.nn.layer import Layer

Progress = Callable[[Check], None]


class _Rows:
    """The rows of a report as they are made; each one is handed to ``progress`` (if given) at once."""

    def __init__(self, progress: Progress | None):
        if progress is not None and not callable(progress):
            raise ValueError(f"`progress` must be a callable taking one Check, or None; got {progress!r}")
        self.checks: list[Check] = []
        self.progress = progress

    def add(self, check: Check) -> None:
        self.checks.append(check)
        if self.progress is not None:
            self.progress(check)


def _check_perturbations(count: Any) -> int:
    if isinstance(count, bool) or not is_int(count) or operator.index(count) < 0:
        raise ValueError(f"`perturbations` must be a non-negative int (0: the given point only), got {count!r}")
    return operator.index(count)


def _points(tree: Any, seed: int, count: int, finite: Callable[[Any], bool]) -> list[tuple[str, Any]]:
    """``[("given", tree), ("perturbed(seed=S)", tree + noise), ...]``: ``count`` seeded perturbed copies."""
    points = [(GIVEN, tree)]
    for k in range(count):
        points.append((perturbed_label(seed, k, count), perturbed_point(tree, (seed, 2_000_000 + k), finite)))
    return points


def _point_seed(seed: tuple[int, ...], index: int) -> tuple[int, ...]:
    """The seed path of the draws (cotangents, directions) at point ``index``; the given point keeps ``seed``."""
    return seed if index == 0 else (*seed, 1_000 + index)


# -- layer by layer -------------------------------------------------------------------------------------------


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
    name = dtype_name(dtype)
    seed = check_seed(seed)
    count = _check_perturbations(perturbations)
    rows = _Rows(progress)
    with x64(True):
        params, state, x = cast((params, state, x), dtype)
        forward = jax.jit(lambda p, x_in: model.apply(p, state, x_in, train=train, key=key)[0])
        points = _points((params, x), seed, count, lambda point: all_finite(forward(*point)))
        _layer_rows(model, state, points, train, key, seed, TOLERANCES[name], finite_differences, dtype, rows)
    return Report(rows.checks, name, [label for label, _ in points])


def _layer_rows(model, state, points, train, key, seed, tolerance, finite_differences, dtype, rows: _Rows) -> None:
    traces = [model.trace(p, state, x, train=train, key=key)[2] for _, (p, x) in points]
    labels = [label for label, _ in points]
    for number, calls in enumerate(zip(*traces, strict=True)):
        _check_call(calls, labels, train, (seed, number), tolerance, finite_differences, dtype, rows)


def _check_call(
    calls: Sequence[Any],
    labels: Sequence[str],
    train: bool,
    seed: tuple[int, ...],
    tolerance: Tolerance,
    finite_differences: bool,
    dtype: Any,
    rows: _Rows,
) -> None:
    """The rows of one leaf layer, at each point: ``calls[i]`` is its call at point ``labels[i]``."""
    first = calls[0]
    layer, path, layer_key = first.layer, first.path, first.key
    # integer inputs (uint8 images) have no cotangent to compare
    has_input = jnp.issubdtype(jnp.result_type(first.x), jnp.inexact)

    def forward(p, state, x_in):
        return layer.forward_with_state(p, state, x_in, train=train, key=layer_key)[0]

    @jax.jit
    def hand(p, state, x_in, dy):
        _, residuals, _ = layer.forward_with_state(p, state, x_in, train=train, key=layer_key)
        result = layer.backward(p, residuals, dy)
        return check_backward_result(path, result, p, tuple(x_in.shape) if has_input else None)

    @jax.jit
    def autodiff(p, state, x_in, dy):
        _, pullback = jax.vjp(lambda p, x_in: forward(p, state, x_in), p, x_in)
        dparams, dx = pullback(dy)
        return dx, dparams

    y_shape = jax.eval_shape(forward, first.params, first.state, first.x)
    # the finite differences' forward, in float64, compiled once for every point
    output = jax.jit(lambda p, state, x_in: forward(p, state, x_in))
    for index, (call, point) in enumerate(zip(calls, labels, strict=True)):
        at = _point_seed(seed, index)
        dy = jnp.asarray(normal((*at, 0), y_shape.shape), y_shape.dtype)
        dx_hand, dparams_hand = hand(call.params, call.state, call.x, dy)
        dx_auto, dparams_auto = autodiff(call.params, call.state, call.x, dy)
        scale = largest(dparams_auto, dx_auto if has_input else ())
        if has_input:
            rows.add(array_check("layer", path, "input", "hand vs autodiff", dx_hand, dx_auto, tolerance, scale, point))
        for hand_leaf, (_, quantity, auto) in zip(
            jax.tree.leaves(dparams_hand), leaves_with_names(dparams_auto), strict=True
        ):
            rows.add(array_check("layer", path, quantity, "hand vs autodiff", hand_leaf, auto, tolerance, scale, point))
        if finite_differences:
            _layer_fd_rows(call, point, at, hand, output, y_shape, has_input, tolerance, dtype, rows)


def _layer_fd_rows(call, point, seed, hand, output, y_shape, has_input, tolerance, dtype, rows: _Rows) -> None:
    """Finite differences in float64, at the recorded input plus a little noise (off ties and kinks)."""
    params64, state64 = cast((call.params, call.state), jnp.float64)
    if has_input:
        x64_ = np.asarray(call.x, np.float64)
        spread = max(float(np.std(x64_)), 1e-3)
        x64_ = jnp.asarray(x64_ + 1e-2 * spread * normal((*seed, 1), x64_.shape))
    else:
        x64_ = call.x
    dy64 = normal((*seed, 2), y_shape.shape)
    # the analytic side is the hand rule in the checked dtype, at the same (noisy) point
    p_d, state_d, x_d, dy_d = cast((params64, state64, x64_, jnp.asarray(dy64)), dtype)
    dx_d, dparams_d = hand(p_d, state_d, x_d, dy_d)
    method, bound = "hand vs finite diff", tolerance.finite_difference
    if has_input:
        result = finite_difference_check(
            lambda xv: output(params64, state64, xv), x64_, dx_d, (*seed, 3), tolerance, cotangent=dy64
        )
        rows.add(fd_row("layer", call.path, "input", method, result, bound, point))
    for index, ((_, quantity, leaf), grad) in enumerate(
        zip(leaves_with_names(params64), jax.tree.leaves(dparams_d), strict=True)
    ):
        result = finite_difference_check(
            lambda value, index=index: output(replace_leaf(params64, index, value), state64, x64_),
            leaf,
            grad,
            (*seed, 4, index),
            tolerance,
            cotangent=dy64,
        )
        rows.add(fd_row("layer", call.path, quantity, method, result, bound, point))


# -- the whole model ------------------------------------------------------------------------------------------


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

    Raises:
      BackwardError: a layer's ``backward`` returned the wrong form (``dx`` of the wrong shape, misnamed
        parameter gradients, ``dx`` alone); the message names the layer.
    """
    name = dtype_name(dtype)
    seed = check_seed(seed)
    count = _check_perturbations(perturbations)
    tolerance = TOLERANCES[name]
    rows = _Rows(progress)
    with x64(True):
        params, state, x = cast((params, state, x), dtype)
        y = cast(y, dtype)
        hand_loss = backprop.manual_loss(loss_fn, loss_vjp)

        def autodiff_loss(p, x_in):
            predictions, _ = model.apply(p, state, x_in, train=train, key=key, gradients="autodiff")
            return loss_fn(predictions, y)

        def bridge_loss(p, x_in):
            predictions, _ = model.apply(p, state, x_in, train=train, key=key, gradients="manual")
            return hand_loss(predictions, y)

        autodiff = jax.jit(jax.value_and_grad(autodiff_loss))
        bridge = jax.jit(jax.value_and_grad(bridge_loss))
        engine = jax.jit(backprop.value_and_grad(model, loss_fn, loss_vjp=loss_vjp, train=train))
        points = _points((params, x), seed, count, lambda point: all_finite(autodiff(*point)))
        if layers:
            _layer_rows(model, state, points, train, key, seed, tolerance, finite_differences, dtype, rows)

        state64 = cast(state, jnp.float64)
        y64 = cast(y, jnp.float64)

        @jax.jit
        def loss64(p, x_in):
            predictions, _ = model.apply(p, state64, x_in, train=train, key=key, gradients="autodiff")
            return loss_fn(predictions, y64)

        for index, (point, (p, x_at)) in enumerate(points):
            loss_auto, grads_auto = autodiff(p, x_at)
            loss_bridge, grads_bridge = bridge(p, x_at)
            (loss_engine, _), grads_engine = engine(p, state, x_at, y, key=key)
            for method, loss in (("engine vs autodiff", loss_engine), ("bridge vs autodiff", loss_bridge)):
                rows.add(array_check("model", "-", "loss", method, loss, loss_auto, tolerance, point=point))
            auto_named = leaves_with_names(grads_auto)
            for method, grads in (("engine vs autodiff", grads_engine), ("bridge vs autodiff", grads_bridge)):
                if jax.tree.structure(grads) != jax.tree.structure(grads_auto):
                    raise ValueError(
                        f"{method.split()[0]} gradients have structure {jax.tree.structure(grads)}, "
                        f"expected that of params {jax.tree.structure(grads_auto)}"
                    )
                for (layer, quantity, auto), grad in zip(auto_named, jax.tree.leaves(grads), strict=True):
                    rows.add(
                        array_check("model", layer, quantity, method, grad, auto, tolerance, largest(grads_auto), point)
                    )
            if finite_differences:
                # At a nearby generic point: parameters plus a little noise, so that pre-activations that are
                # exactly zero (zero biases on zero image borders) do not sit on a ReLU kink under the step. The
                # engine's gradient is recomputed there.
                params64, x64_ = cast((p, x_at), jnp.float64)
                params64 = jitter(params64, _point_seed((seed, 1_000_002), index))
                _, grads_engine = engine(cast(params64, dtype), state, x_at, y, key=key)
                for leaf_index, ((layer, quantity, leaf), grad) in enumerate(
                    zip(leaves_with_names(params64), jax.tree.leaves(grads_engine), strict=True)
                ):
                    result = finite_difference_check(
                        lambda value, i=leaf_index, at=params64, x_in=x64_: loss64(replace_leaf(at, i, value), x_in),
                        leaf,
                        grad,
                        _point_seed((seed, 1_000_003, leaf_index), index),
                        tolerance,
                    )
                    method = "engine vs finite diff"
                    rows.add(fd_row("model", layer, quantity, method, result, tolerance.finite_difference, point))
    return Report(rows.checks, name, [label for label, _ in points])


# -- one functional op ----------------------------------------------------------------------------------------


def _first_output(result: Any) -> Any:
    """``y`` of an op that returns ``(y, state...)``; the result itself otherwise."""
    return result[0] if isinstance(result, tuple) else result


def check_op(
    forward: Callable[..., jax.Array],
    *args: Any,
    vjp: Callable[..., Any] | None = None,
    argnums: Sequence[int] | None = None,
    dtype: Any = jnp.float64,
    seed: int = 0,
    finite_differences: bool = True,
    perturbations: int = 1,
    progress: Progress | None = None,
    **options: Any,
) -> Report:
    """Check one functional op's hand-derived VJP against ``jax.vjp`` and finite differences.

    Args:
      forward: the op, called as ``forward(*args, **options)``.
      args: its positional arguments (arrays; None for an absent optional one such as a bias).
      vjp: the hand rule, as ``vjp(*args, dy, **options)`` returning the cotangent of each argument in
        ``argnums`` (a single array when there is one). Omit it for ops registered in
        :mod:`jaxcnn.functional`, whose registered rule is used.
      argnums: the differentiable arguments; default: the registered ones, or every floating-point array.
      dtype: float64 (default) or float32; floating-point arguments are cast to it.
      seed: seeds the cotangents, finite-difference directions and perturbed points.
      perturbations: how many seeded perturbed copies of the differentiable arguments to check at besides the
        given ones (default 1; the other arguments stay as given).
      progress: called with each :class:`Check` as soon as it is made.
      options: keyword options of the op (stride, padding, ...).

    Returns:
      A :class:`Report` with one ``hand vs autodiff`` and one ``hand vs finite diff`` row per argument and point.

    For ops that return ``(y, state...)`` (such as ``batch_norm``), only ``y`` is differentiated: the hand rule
    receives the cotangent of ``y`` alone.
    """
    name = dtype_name(dtype)
    seed = check_seed(seed)
    count = _check_perturbations(perturbations)
    tolerance = TOLERANCES[name]
    rows = _Rows(progress)
    op_name = getattr(forward, "__name__", "op")
    with x64(True):
        args = tuple(cast(list(args), dtype))
        if vjp is None:
            rule = F.hand_rule(forward)
            positions = tuple(argnums) if argnums is not None else rule.present(args)

            def hand(dy, at):
                cotangents = dict(zip(rule.present(at), rule.vjp(at, dy, **options), strict=True))
                return tuple(cotangents[i] for i in positions)
        else:
            positions = (
                tuple(argnums)
                if argnums is not None
                else tuple(
                    i for i, a in enumerate(args) if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)
                )
            )

            def hand(dy, at):
                result = vjp(*at, dy, **options)
                return tuple(result) if isinstance(result, (tuple, list)) else (result,)

        def call(*diff, at=args):
            full = list(at)
            for i, value in zip(positions, diff, strict=True):
                full[i] = value
            return _first_output(forward(*full, **options))

        @jax.jit
        def hand_and_autodiff(diff_args, dy):
            _, pullback = jax.vjp(call, *diff_args)
            at = list(args)
            for i, value in zip(positions, diff_args, strict=True):
                at[i] = value
            got = hand(dy, tuple(at))
            if len(got) != len(positions):
                raise ValueError(f"{op_name}: the hand VJP returned {len(got)} cotangents for arguments {positions}")
            for i, g, a in zip(positions, got, diff_args, strict=True):
                if tuple(np.shape(g)) != tuple(np.shape(a)):
                    raise ValueError(
                        f"{op_name}: the hand VJP returned a cotangent of shape {tuple(np.shape(g))} for argument "
                        f"{i} of shape {tuple(np.shape(a))}"
                    )
            return got, pullback(dy)

        args64 = tuple(cast(list(args), jnp.float64))

        @functools.partial(jax.jit, static_argnums=2)
        def output(diff64, value, i):
            full = list(args64)
            for j, other in zip(positions, diff64, strict=True):
                full[j] = other
            full[i] = value
            return _first_output(forward(*full, **options))

        diff_args = tuple(args[i] for i in positions)
        y = jax.eval_shape(call, *diff_args)
        forward_jit = jax.jit(call)
        points = _points(diff_args, seed, count, lambda point: all_finite(forward_jit(*point)))
        for index, (point, at_args) in enumerate(points):
            at = _point_seed((seed,), index)
            dy = jnp.asarray(normal((*at, 0), y.shape), y.dtype)
            got, auto = hand_and_autodiff(at_args, dy)
            for i, g, a in zip(positions, got, auto, strict=True):
                check = array_check(
                    "op", op_name, f"arg {i}", "hand vs autodiff", g, a, tolerance, largest(auto), point
                )
                rows.add(check)
            if finite_differences:
                diff64 = tuple(cast(list(at_args), jnp.float64))
                dy64 = np.asarray(dy, np.float64)
                for n, i in enumerate(positions):
                    result = finite_difference_check(
                        lambda value, i=i, at=diff64: output(at, value, i),
                        diff64[n],
                        got[n],
                        (*at, n + 1),
                        tolerance,
                        cotangent=dy64,
                    )
                    bound = tolerance.finite_difference
                    rows.add(fd_row("op", op_name, f"arg {i}", "hand vs finite diff", result, bound, point))
    return Report(rows.checks, name, [label for label, _ in points])
