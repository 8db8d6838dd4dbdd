"""The three-way gradient check: hand-derived rules vs JAX autodiff vs finite differences.

:func:`check_model` compares, for one batch:

* **per layer** -- each leaf layer's ``backward`` against ``jax.vjp`` of its own forward, at the input the layer
  actually receives inside the model, for a random output cotangent: the input cotangent and every parameter;
  plus a central finite difference of ``<forward(p, x), dy>`` along one random direction per quantity;
* **per parameter, whole model** -- the gradient of the loss from the explicit reverse pass (``engine``,
  :func:`jaxcnn.backprop.value_and_grad`) and from ``jax.grad`` through the ``gradients="manual"`` custom_vjp
  bridge (``bridge``), each against ``jax.grad`` through the plain forward (``autodiff``); plus a central
  finite difference of the loss along a random direction in each parameter, taken (with the engine's
  gradient) at the parameters plus a little noise, off the kinks that zero biases on zero inputs sit on.

:func:`check_op` does the same for one functional op.

Tolerances (:data:`TOLERANCES`), by the dtype the gradients are computed in:

==========  ================================  =================================  ==============================
dtype       hand vs autodiff (normwise rel.)  finite differences (rel.)          absolute floor (x largest grad)
==========  ================================  =================================  ==============================
float64     1e-10                             1e-5  (step 1e-6)                  1e-13
float32     1e-4                              1e-2  (step 1e-6, in float64)      1e-5
==========  ================================  =================================  ==============================

* Two arrays: the error is ``max|a - b| / max(max|a|, max|b|)`` (normwise over the leaf, 0 when both are 0).
  A comparison also passes when ``max|a - b|`` is below the floor times the largest entry of the layer's (or
  the model's) whole gradient: a gradient that is exactly zero (a bias feeding a centring op) carries
  round-off that no relative measure can judge.
* A finite difference: ``(f(p + h v) - f(p - h v)) / 2h`` along a random unit direction ``v``, differenced
  elementwise and projected on the output cotangent, against ``<g, v>``; the error is divided by
  ``max(|fd|, |<g, v>|, |g| / sqrt(n))`` and errors below the float64 round-off of the evaluations pass.
  Finite differences are always evaluated in float64 (in float32 they resolve only about three digits);
  the float32 tolerance reflects the accuracy of a float32 gradient itself. Layer-level ones are taken at
  the recorded input plus a little noise, so that ties and kinks (exact zeros after a ReLU, equal values in
  a max-pool window) do not sit under the step.
* Check a gradient that is nonzero: one that is identically zero can only be checked against the floors.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxcnn.functional as F
from jaxcnn import backprop
from jaxcnn.nn.layer import Layer


@dataclass(frozen=True)
class Tolerance:
    """Pass thresholds for one dtype.

    Attributes:
      exact: max relative error, hand rule vs autodiff.
      finite_difference: relative error of a directional finite difference.
      floor: absolute errors below ``floor`` times the largest entry of the layer's (or model's) gradient pass
        too, so that a gradient that is exactly zero (a bias feeding a centring op) may carry round-off.
      step: the finite-difference step along a unit direction.
    """

    exact: float
    finite_difference: float
    floor: float
    step: float = 1e-6


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(exact=1e-10, finite_difference=1e-5, floor=1e-13),
    "float32": Tolerance(exact=1e-4, finite_difference=1e-2, floor=1e-5),
}


@dataclass(frozen=True)
class Check:
    """One comparison: where (``layer``, ``quantity``), how (``method``), and the measured errors."""

    scope: str  # "layer" (one layer's backward) or "model" (gradient of the loss)
    layer: str  # the layer's path in the model, or the op's name
    quantity: str  # "input", a parameter name such as "kernel", or "loss"
    method: str  # e.g. "hand vs autodiff", "engine vs autodiff", "bridge vs autodiff", "hand vs finite diff"
    max_abs: float
    max_rel: float
    cosine: float | None
    worst_index: tuple[int, ...] | None
    tolerance: float
    ok: bool


@dataclass
class Report:
    """All checks of one :func:`check_model` or :func:`check_op` call.

    Attributes:
      checks: every comparison made.
      dtype: the dtype gradients were computed in.
      ok: True when every check passed.
    """

    checks: list[Check] = field(default_factory=list)
    dtype: str = "float64"

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def failures(self) -> list[Check]:
        """The checks that did not pass."""
        return [check for check in self.checks if not check.ok]

    def table(self) -> str:
        """A plain-text table, one row per check."""
        headers = ("scope", "layer", "quantity", "check", "max abs err", "max rel err", "cosine", "worst index", "ok")
        rows = [
            (
                check.scope,
                check.layer,
                check.quantity,
                check.method,
                f"{check.max_abs:.2e}",
                f"{check.max_rel:.2e}",
                "" if check.cosine is None else f"{check.cosine:.12f}",
                "" if check.worst_index is None else str(check.worst_index),
                "ok" if check.ok else "FAIL",
            )
            for check in self.checks
        ]
        widths = [max(len(str(row[i])) for row in (headers, *rows)) for i in range(len(headers))]
        lines = [
            "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (headers, *rows)
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        verdict = "all checks passed" if self.ok else f"{len(self.failures())} of {len(self.checks)} checks FAILED"
        lines.append(f"{len(self.checks)} checks in {self.dtype}: {verdict}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# -- helpers --------------------------------------------------------------------------------------------------


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
    return int(seed)


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(f"`dtype` must be float64 or float32, got {name}")
    return name


@contextlib.contextmanager
def _x64(needed: bool) -> Iterator[None]:
    """Enable 64-bit types inside the block when needed and not already on."""
    if needed and not jax.config.jax_enable_x64:
        with jax.enable_x64(True):
            yield
    else:
        yield


def _cast(tree: Any, dtype: Any) -> Any:
    """Cast the floating-point leaves of a pytree to ``dtype``; leave integer leaves (labels, keys) alone."""

    def cast(leaf):
        leaf = jnp.asarray(leaf) if isinstance(leaf, (np.ndarray, float)) else leaf
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        return leaf

    return jax.tree.map(cast, tree)


def compare(candidate: Any, reference: Any) -> tuple[float, float, float | None, tuple[int, ...] | None]:
    """``(max_abs, max_rel, cosine, worst_index)`` between two arrays of the same shape (computed in float64)."""
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare arrays of shapes {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0, 0.0, None, None
    diff = np.abs(a - b)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.ndim else ()
    max_abs = float(diff.max())
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
    max_rel = max_abs / scale if scale > 0 else 0.0
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(np.sum(a * b) / norms) if norms > 0 else (1.0 if max_abs == 0 else 0.0)
    return max_abs, max_rel, cosine, tuple(int(i) for i in worst)


def _leaves_with_names(tree: Any) -> list[tuple[str, str, Any]]:
    """``(layer path, parameter name, leaf)`` for every leaf of a nested-dict parameter tree."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(entry, "key", getattr(entry, "idx", entry))) for entry in path]
        out.append(("/".join(keys[:-1]) or "-", keys[-1] if keys else "-", leaf))
    return out


def _replace_leaf(tree: Any, index: int, value: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    leaves[index] = value
    return jax.tree.unflatten(treedef, leaves)


_STREAM = 0x6A78C  # a tag in front of every seed path: the checker's draws never equal a user's default_rng(seed)


def _normal(seed: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float64 numbers from a seed path (numpy, so no device compile per shape).

    ``default_rng((s, 0))`` draws exactly what ``default_rng(s)`` draws, so without the tag a cotangent could
    equal (a multiple of) inputs a test made with the same seed, which makes some true gradients vanish.
    """
    return np.random.default_rng((_STREAM, *seed)).standard_normal(shape)


def _finite_difference_check(
    f: Callable[[Any], Any],
    point: Any,
    gradient: Any,
    seed: tuple[int, ...],
    tolerance: Tolerance,
    cotangent: Any = None,
) -> tuple[float, float, bool]:
    """Central difference of ``f`` at ``point`` along a random unit direction ``v``, against ``<gradient, v>``.

    ``f`` may return an array: the difference ``(f(p + h v) - f(p - h v)) / 2h`` is taken elementwise and then
    projected on ``cotangent`` (ones when None), so that large outputs which do not depend on ``p`` cannot swamp
    the change. The relative error divides by ``max(|fd|, |<g, v>|, |g| / sqrt(n))``: the last term is the
    typical size of ``<g, v>`` for a random direction, so a direction that happens to be nearly orthogonal to
    ``g`` does not turn round-off into a failure. Errors below the float64 round-off of the evaluations,
    ``1e-9 * sum |f(p)| |cotangent|`` over the output entries that changed, pass. A change smaller than the
    round-off of the very entries it sits in cannot be resolved by any finite difference (that is what the
    autodiff comparison is for). Everything is evaluated in float64.

    Returns ``(abs error, rel error, ok)``.
    """
    point = np.asarray(point, np.float64)
    v = _normal(seed, point.shape)
    v /= max(float(np.linalg.norm(v)), 1e-300)
    h = tolerance.step
    plus = np.asarray(f(point + h * v), np.float64)
    minus = np.asarray(f(point - h * v), np.float64)
    center = np.asarray(f(point), np.float64)
    weights = np.ones_like(center) if cotangent is None else np.asarray(cotangent, np.float64)
    numeric = float(np.sum((plus - minus) * weights) / (2 * h))
    g = np.asarray(gradient, np.float64)
    analytic = float(np.sum(g * v))
    error = abs(numeric - analytic)
    scale = max(abs(numeric), abs(analytic), float(np.linalg.norm(g)) / math.sqrt(max(g.size, 1)))
    relative = error / scale if scale > 0 else 0.0
    # round-off can only sit in the output entries that changed at all
    changed = plus != minus
    roundoff = 1e-9 * float(np.sum(np.abs(center) * np.abs(weights) * changed))
    ok = bool(np.isfinite(relative)) and (relative <= tolerance.finite_difference or error <= roundoff)
    return error, relative, ok


def _jitter(tree: Any, seed: tuple[int, ...]) -> Any:
    """Every float leaf plus Gaussian noise of 1e-3 times its spread (1e-4 absolute for constant leaves)."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for index, leaf in enumerate(leaves):
        values = np.asarray(leaf, np.float64)
        spread = float(np.std(values)) if values.size > 1 else 0.0
        noise = _normal((*seed, index), values.shape) * (1e-3 * spread if spread > 0 else 1e-4)
        out.append(jnp.asarray(values + noise))
    return jax.tree.unflatten(treedef, out)


def _largest(*trees: Any) -> float:
    """The largest absolute entry over every leaf of the given pytrees (0 when there is none)."""
    values = [float(np.max(np.abs(np.asarray(leaf, np.float64)), initial=0.0)) for leaf in jax.tree.leaves(trees)]
    return max(values, default=0.0)


def _array_check(
    scope: str,
    layer: str,
    quantity: str,
    method: str,
    candidate: Any,
    reference: Any,
    tolerance: Tolerance,
    group_scale: float = 0.0,
) -> Check:
    """Compare two arrays: ok when the max relative error is within ``tolerance.exact``, or when the max
    absolute error is below ``tolerance.floor * group_scale`` (round-off on a gradient that is exactly zero,
    measured against the largest entry of the layer's or model's whole gradient)."""
    max_abs, max_rel, cosine, worst = compare(candidate, reference)
    finite = bool(np.isfinite(max_rel)) and bool(np.all(np.isfinite(np.asarray(candidate, np.float64))))
    ok = finite and (max_rel <= tolerance.exact or max_abs <= tolerance.floor * group_scale)
    return Check(scope, layer, quantity, method, max_abs, max_rel, cosine, worst, tolerance.exact, ok)


def _fd_row(scope, layer, quantity, method, result, tolerance: float) -> Check:
    error, relative, ok = result
    return Check(scope, layer, quantity, method, error, relative, None, None, tolerance, ok)


# -- checks ---------------------------------------------------------------------------------------------------


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
) -> Report:
    """Layer by layer: each leaf layer's hand-derived ``backward`` vs ``jax.vjp`` of its forward (and FD).

    Args:
      model: any layer or container; ``params``/``state`` from its ``init``; ``x`` a batch ``(N, *input_shape)``.
      dtype: float64 (default) or float32.
      train, key: the mode and random key the forward runs with.
      seed: seeds the random cotangents and finite-difference directions.
    """
    name = _dtype_name(dtype)
    seed = _check_seed(seed)
    tolerance = TOLERANCES[name]
    report = Report(dtype=name)
    with _x64(True):
        params, state, x = _cast((params, state, x), dtype)
        _, _, calls = model.trace(params, state, x, train=train, key=key)
        for number, call in enumerate(calls):
            report.checks.extend(_check_call(call, train, (seed, number), tolerance, finite_differences, dtype))
    return report


def _check_call(
    call, train: bool, seed: tuple[int, ...], tolerance: Tolerance, finite_differences: bool, dtype: Any
) -> list[Check]:
    layer = call.layer

    def forward(p, state, x_in):
        return layer.forward_with_state(p, state, x_in, train=train, key=call.key)[0]

    @jax.jit
    def hand(p, state, x_in, dy):
        _, residuals, _ = layer.forward_with_state(p, state, x_in, train=train, key=call.key)
        return layer.backward(p, residuals, dy)

    @jax.jit
    def autodiff(p, state, x_in, dy):
        _, pullback = jax.vjp(lambda p, x_in: forward(p, state, x_in), p, x_in)
        dparams, dx = pullback(dy)
        return dx, dparams

    y_shape = jax.eval_shape(forward, call.params, call.state, call.x)
    dy = jnp.asarray(_normal((*seed, 0), y_shape.shape), y_shape.dtype)
    dx_hand, dparams_hand = hand(call.params, call.state, call.x, dy)
    dx_auto, dparams_auto = autodiff(call.params, call.state, call.x, dy)
    # integer inputs (uint8 images) have no cotangent to compare
    has_input = jnp.issubdtype(jnp.result_type(call.x), jnp.inexact)
    scale = _largest(dparams_auto, dx_auto if has_input else ())
    checks = []
    if has_input:
        checks.append(_array_check("layer", call.path, "input", "hand vs autodiff", dx_hand, dx_auto, tolerance, scale))
    hand_leaves = jax.tree.leaves(dparams_hand)
    auto_named = _leaves_with_names(dparams_auto)
    if len(hand_leaves) != len(auto_named):
        raise ValueError(
            f"{call.path}: backward returned {len(hand_leaves)} parameter cotangents for "
            f"{len(auto_named)} parameters; dparams must have the structure of params"
        )
    for hand_leaf, (_, quantity, auto) in zip(hand_leaves, auto_named):
        checks.append(_array_check("layer", call.path, quantity, "hand vs autodiff", hand_leaf, auto, tolerance, scale))
    if not finite_differences:
        return checks

    # Finite differences in float64, at the recorded input plus a little noise (off ties and kinks).
    params64, state64 = _cast((call.params, call.state), jnp.float64)
    if has_input:
        x64 = np.asarray(call.x, np.float64)
        spread = max(float(np.std(x64)), 1e-3)
        x64 = jnp.asarray(x64 + 1e-2 * spread * _normal((*seed, 1), x64.shape))
    else:
        x64 = call.x
    dy64 = _normal((*seed, 2), y_shape.shape)
    # the analytic side is the hand rule in the checked dtype, at the same (noisy) point
    p_d, state_d, x_d, dy_d = _cast((params64, state64, x64, jnp.asarray(dy64)), dtype)
    dx_d, dparams_d = hand(p_d, state_d, x_d, dy_d)

    output = jax.jit(lambda p, x_in: forward(p, state64, x_in))
    if has_input:
        result = _finite_difference_check(
            lambda xv: output(params64, xv), x64, dx_d, (*seed, 3), tolerance, cotangent=dy64
        )
        checks.append(_fd_row("layer", call.path, "input", "hand vs finite diff", result, tolerance.finite_difference))
    for index, ((_, quantity, leaf), grad) in enumerate(zip(_leaves_with_names(params64), jax.tree.leaves(dparams_d))):
        result = _finite_difference_check(
            lambda value, index=index: output(_replace_leaf(params64, index, value), x64),
            leaf,
            grad,
            (*seed, 4, index),
            tolerance,
            cotangent=dy64,
        )
        checks.append(_fd_row("layer", call.path, quantity, "hand vs finite diff", result, tolerance.finite_difference))
    return checks


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
) -> Report:
    """Check a model's gradients three ways, per layer and per parameter; see the module docstring.

    Args:
      model: the model (any :class:`jaxcnn.nn.Layer`); ``params``, ``state`` from its ``init``.
      x: a batch ``(N, *input_shape)``; y: its targets (integer labels ``(N,)`` for the default loss).
      loss_fn: ``loss_fn(predictions, y) -> scalar``; ``loss_vjp`` its hand-derived VJP when it is not a
        registered functional op.
      dtype: float64 (default; 64-bit types are switched on inside the check) or float32.
      train, key: the mode and random key every path runs with (the same for all, so dropout masks agree).
      seed: seeds the random cotangents and finite-difference directions.
      layers: include the layer-by-layer checks; finite_differences: include the finite-difference checks.

    Returns:
      A :class:`Report`; ``report.ok`` is True when every check passed, ``print(report.table())`` shows them.
    """
    name = _dtype_name(dtype)
    seed = _check_seed(seed)
    tolerance = TOLERANCES[name]
    report = Report(dtype=name)
    if layers:
        report.checks.extend(
            check_layers(
                model,
                params,
                state,
                x,
                dtype=dtype,
                train=train,
                key=key,
                seed=seed,
                finite_differences=finite_differences,
            ).checks
        )
    with _x64(True):
        params, state, x = _cast((params, state, x), dtype)
        y = _cast(y, dtype)
        hand_loss = backprop.manual_loss(loss_fn, loss_vjp)

        def autodiff_loss(p):
            predictions, _ = model.apply(p, state, x, train=train, key=key, gradients="autodiff")
            return loss_fn(predictions, y)

        def bridge_loss(p):
            predictions, _ = model.apply(p, state, x, train=train, key=key, gradients="manual")
            return hand_loss(predictions, y)

        loss_auto, grads_auto = jax.jit(jax.value_and_grad(autodiff_loss))(params)
        loss_bridge, grads_bridge = jax.jit(jax.value_and_grad(bridge_loss))(params)
        engine = jax.jit(backprop.value_and_grad(model, loss_fn, loss_vjp=loss_vjp, train=train))
        (loss_engine, _), grads_engine = engine(params, state, x, y, key=key)

        for method, loss in (("engine vs autodiff", loss_engine), ("bridge vs autodiff", loss_bridge)):
            report.checks.append(_array_check("model", "-", "loss", method, loss, loss_auto, tolerance))
        auto_named = _leaves_with_names(grads_auto)
        for method, grads in (("engine vs autodiff", grads_engine), ("bridge vs autodiff", grads_bridge)):
            if jax.tree.structure(grads) != jax.tree.structure(grads_auto):
                raise ValueError(
                    f"{method.split()[0]} gradients have structure {jax.tree.structure(grads)}, "
                    f"expected that of params {jax.tree.structure(grads_auto)}"
                )
            for (layer, quantity, auto), grad in zip(auto_named, jax.tree.leaves(grads)):
                report.checks.append(
                    _array_check("model", layer, quantity, method, grad, auto, tolerance, _largest(grads_auto))
                )

        if finite_differences:
            # At a nearby generic point: parameters plus a little noise, so that pre-activations that are exactly
            # zero (zero biases on zero image borders) do not sit on a ReLU kink under the step. The engine's
            # gradient is recomputed there.
            params64, state64, x64 = _cast((params, state, x), jnp.float64)
            y64 = _cast(y, jnp.float64)
            params64 = _jitter(params64, (seed, 1_000_002))
            _, grads_engine = engine(_cast(params64, dtype), state, x, y, key=key)

            @jax.jit
            def loss64(p):
                predictions, _ = model.apply(p, state64, x64, train=train, key=key, gradients="autodiff")
                return loss_fn(predictions, y64)

            for index, ((layer, quantity, leaf), grad) in enumerate(
                zip(_leaves_with_names(params64), jax.tree.leaves(grads_engine))
            ):
                result = _finite_difference_check(
                    lambda value, index=index: loss64(_replace_leaf(params64, index, value)),
                    leaf,
                    grad,
                    (seed, 1_000_003, index),
                    tolerance,
                )
                report.checks.append(
                    _fd_row("model", layer, quantity, "engine vs finite diff", result, tolerance.finite_difference)
                )
    return report


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
      options: keyword options of the op (stride, padding, ...).

    Returns:
      A :class:`Report` with one ``hand vs autodiff`` and one ``hand vs finite diff`` row per argument.

    For ops that return ``(y, state...)`` (such as ``batch_norm``), only ``y`` is differentiated: the hand rule
    receives the cotangent of ``y`` alone.
    """
    name = _dtype_name(dtype)
    seed = _check_seed(seed)
    tolerance = TOLERANCES[name]
    report = Report(dtype=name)
    op_name = getattr(forward, "__name__", "op")
    with _x64(True):
        args = tuple(_cast(list(args), dtype))
        if vjp is None:
            rule = F.hand_rule(forward)
            positions = tuple(argnums) if argnums is not None else rule.present(args)

            def hand(dy, at):
                cotangents = dict(zip(rule.present(at), rule.vjp(at, dy, **options)))
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
            for i, value in zip(positions, diff):
                full[i] = value
            return _first_output(forward(*full, **options))

        diff_args = tuple(args[i] for i in positions)
        y = jax.eval_shape(call, *diff_args)
        dy = jnp.asarray(_normal((seed, 0), y.shape), y.dtype)

        @jax.jit
        def hand_and_autodiff(diff_args, dy):
            _, pullback = jax.vjp(call, *diff_args)
            at = list(args)
            for i, value in zip(positions, diff_args):
                at[i] = value
            return hand(dy, tuple(at)), pullback(dy)

        got, auto = hand_and_autodiff(diff_args, dy)
        if len(got) != len(positions):
            raise ValueError(f"{op_name}: the hand VJP returned {len(got)} cotangents for arguments {positions}")
        for i, g, a in zip(positions, got, auto):
            report.checks.append(
                _array_check("op", op_name, f"arg {i}", "hand vs autodiff", g, a, tolerance, _largest(auto))
            )
        if finite_differences:
            args64 = tuple(_cast(list(args), jnp.float64))
            dy64 = np.asarray(dy, np.float64)

            @functools.partial(jax.jit, static_argnums=1)
            def output(value, i):
                full = list(args64)
                full[i] = value
                return _first_output(forward(*full, **options))

            for n, i in enumerate(positions):
                result = _finite_difference_check(
                    lambda value, i=i: output(value, i),
                    args64[i],
                    got[n],
                    (seed, n + 1),
                    tolerance,
                    cotangent=dy64,
                )
                report.checks.append(
                    _fd_row("op", op_name, f"arg {i}", "hand vs finite diff", result, tolerance.finite_difference)
                )
    return report
