"""DP-SGD from the hand rules: per-example clipping by ghost norms and book-keeping, Gaussian noise, one step.

DP-SGD (Abadi et al. 2016) clips every example's gradient to an L2 norm ``C``, sums, adds Gaussian noise of
standard deviation ``sigma * C`` and divides by the batch size. Two ways to the clipped sum, one result:

* ``method="ghost"`` (the default) never forms a per-example gradient. One forward and one hand reverse pass
  (:mod:`jaxcnn.backprop`) record, for every layer with parameters, its saved input ``a`` and output cotangent
  ``g`` (:func:`jaxcnn.nn.container.recording_cotangents`). Each layer's per-example squared gradient norm comes
  from those two (its :meth:`~jaxcnn.nn.Layer.per_example_sq_norms`, :mod:`jaxcnn.functional.ghost`), and the
  clipped sum from the same saved arrays once more: a layer's weight gradient is linear in its output cotangent,
  so ``sum_i c_i dW_i = dW(a, c * g)`` with each example's rows of ``g`` scaled by its clip factor
  ``c_i = min(1, C / ||grad_i||)`` (book-keeping, Bu et al. 2023). The cost is about one forward, one backward
  and the norm terms; nothing of size N x parameters is ever held.
* ``method="vmap"``: per-example gradients by ``jax.vmap`` over batches of one
  (:func:`jaxcnn.parallel.per_example_grads`), clipped and summed: the reference, and the path for a model with a
  layer that has no per-example norm rule.

Both draw the noise alike (leaf ``j`` from ``fold_in(noise_key, j)``), so for the same state and batch they give
the same update up to rounding. The loss must be the batch mean of per-example losses (the built-in ones are);
examples must not interact, so a model with running statistics (BatchNorm) is refused.

Dropout: the ghost method runs the batch forward with the step's key, the vmap method each example with its own
key, so with dropout the two draw different masks (each a valid DP-SGD step); without dropout they agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnn import backprop
from jaxcnn._step_jit import jit_train_step
from jaxcnn.functional import softmax_cross_entropy
from jaxcnn.functional.ghost import METHODS as NORM_METHODS
from jaxcnn.nn.container import Container, Tap, recording_cotangents
from jaxcnn.nn.layer import Layer, Params, State, rows
from jaxcnn.train.state import TrainState
from jaxcnn.train.step import InputScaling, LossFn, Metrics

METHODS = ("ghost", "vmap")

__all__ = ["METHODS", "ClippedSum", "clipped_grad_sum", "dp_step_function", "make_dp_train_step", "noised_mean"]


class ClippedSum(NamedTuple):
    """One batch's clipped gradient sum and what came with it.

    Attributes:
      losses: each example's loss ``(N,)`` (``loss_fn`` on a batch of one).
      predictions: the model's output ``(N, ...)`` from the forward that gave the gradients.
      grads: ``sum_i c_i grad_i``, shaped like ``params``, with ``c_i = min(1, C / ||grad_i||)`` (0 for masked
        examples).
      norms: each example's gradient norm before clipping, ``(N,)``.
    """

    losses: jax.Array
    predictions: jax.Array
    grads: Params
    norms: jax.Array


def check_dp(l2_norm_clip: Any, noise_multiplier: Any, method: Any = "ghost") -> None:
    """ValueError in one line unless ``l2_norm_clip > 0``, ``noise_multiplier >= 0`` (finite numbers) and
    ``method`` is one of :data:`METHODS`."""

    def finite(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and bool(np.isfinite(value))

    if not finite(l2_norm_clip) or l2_norm_clip <= 0:
        raise ValueError(f"l2_norm_clip must be a finite number > 0, got {l2_norm_clip!r}")
    if not finite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if method not in METHODS:
        raise ValueError(f"unknown DP method {method!r}; known: {', '.join(METHODS)}")


def check_independent(state: State) -> None:
    """ValueError in one line when the model keeps running statistics (its examples are not independent)."""
    if jax.tree.leaves(state):
        raise ValueError(
            "DP-SGD needs independent examples; this model keeps running statistics (BatchNorm), use "
            "GroupNorm or LayerNorm instead"
        )


def _per_example_losses(loss_fn: LossFn, predictions: jax.Array, y: jax.Array) -> jax.Array:
    """``loss_fn`` on each example as a batch of one: ``(N,)``."""
    return jax.vmap(lambda p, t: loss_fn(p[None], t[None]))(predictions, y)


def _clip_factors(norms: jax.Array, l2_norm_clip: float, mask: jax.Array | None) -> jax.Array:
    """``min(1, C / ||g_i||)`` per example (a zero gradient keeps factor 1), times the mask when given."""
    factors = jnp.minimum(1.0, l2_norm_clip / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))
    return factors if mask is None else factors * mask.astype(factors.dtype)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _record(model: Layer, params: Params, residuals: Any, dpredictions: jax.Array) -> list[Tap]:
    """Run the hand backward pass and return every layer-with-parameters' :class:`Tap` (its parameter gradients
    are dropped: under ``jax.jit`` XLA removes their computation)."""
    if not isinstance(model, Container):
        return [Tap((), model, params, residuals, dpredictions)] if jax.tree.leaves(params) else []
    with recording_cotangents() as tape:
        model.backward(params, residuals, dpredictions)
    return tape


def _tap_sq_norms(tap: Tap, norm_method: str) -> jax.Array:
    name = "/".join(tap.path) or type(tap.layer).__name__
    try:
        return tap.layer.per_example_sq_norms(tap.params, tap.residuals, tap.dy, method=norm_method)
    except NotImplementedError:
        raise ValueError(
            f"DP-SGD method='ghost': layer {name} ({type(tap.layer).__name__}) has parameters but no "
            "per_example_sq_norms rule; define one next to its backward, or use method='vmap'"
        ) from None


def ghost_clipped_sum(
    model: Layer,
    loss_fn: LossFn,
    params: Params,
    state: State,
    x: jax.Array,
    y: jax.Array,
    *,
    l2_norm_clip: float,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    norm_method: str = "auto",
) -> ClippedSum:
    """The clipped gradient sum by ghost norms and book-keeping (see the module docstring); arguments as
    :func:`clipped_grad_sum`."""
    vjp = backprop.loss_vjp_of(loss_fn)
    n = x.shape[0]
    predictions, residuals, _ = model.forward_with_state(params, state, x, train=True, key=key)
    loss = loss_fn(predictions, y)
    # the loss is the mean of N per-example losses: seeding its VJP with N gives every example its own loss's
    # cotangent, so that each layer's cotangent rows are per-example gradients of per-example losses
    tape = _record(model, params, residuals, vjp(predictions, y, jnp.asarray(n, loss.dtype)))
    squares = jnp.zeros((n,), jnp.promote_types(loss.dtype, jnp.float32))
    for tap in tape:
        squares = squares + _tap_sq_norms(tap, norm_method).astype(squares.dtype)
    norms = jnp.sqrt(squares)
    factors = _clip_factors(norms, l2_norm_clip, mask)
    grads: dict = {}
    for tap in tape:  # book-keeping: each layer's weight gradient once more, on its rescaled cotangent
        layer_grads = tap.layer.weighted_param_grads(tap.params, tap.residuals, tap.dy, factors)
        layer_grads = jax.tree.map(lambda g, p: jnp.asarray(g).astype(p.dtype), layer_grads, tap.params)
        if not tap.path:
            grads = layer_grads
        else:
            _set(grads, tap.path, layer_grads)
    if jax.tree.structure(grads) != jax.tree.structure(params):
        raise ValueError(
            "DP-SGD method='ghost' reached only some of the model's parameters through its layers' backward "
            "passes (a container that runs a child outside child_backward?); use method='vmap'"
        )
    return ClippedSum(_per_example_losses(loss_fn, predictions, y), predictions, grads, norms)


def vmap_clipped_sum(
    model: Layer,
    loss_fn: LossFn,
    params: Params,
    state: State,
    x: jax.Array,
    y: jax.Array,
    *,
    l2_norm_clip: float,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    gradients: str = "autodiff",
) -> ClippedSum:
    """The clipped gradient sum from per-example gradients by ``jax.vmap`` (example ``i`` a batch of one, its
    dropout from ``split(key, N)[i]``); arguments as :func:`clipped_grad_sum`."""
    run = backprop.loss_and_grads(model, loss_fn, gradients=gradients, train=True)
    keys = None if key is None else jax.random.split(key, x.shape[0])

    def example(xi, yi, ki):
        result = run(params, state, xi[None], yi[None], key=ki)
        return result.loss, result.predictions[0], result.grads

    losses, predictions, per_example = jax.vmap(example, in_axes=(0, 0, None if keys is None else 0))(x, y, keys)
    squares = [jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in jax.tree.leaves(per_example)]
    norms = jnp.sqrt(sum(s.astype(jnp.promote_types(s.dtype, jnp.float32)) for s in squares))
    factors = _clip_factors(norms, l2_norm_clip, mask)
    grads = jax.tree.map(lambda g: jnp.sum(g * rows(factors, g), axis=0).astype(g.dtype), per_example)
    return ClippedSum(losses, predictions, grads, norms)


def clipped_grad_sum(
    model: Layer,
    loss_fn: LossFn,
    params: Params,
    state: State,
    x: jax.Array,
    y: jax.Array,
    *,
    l2_norm_clip: float,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    method: str = "ghost",
    gradients: str | None = None,
    norm_method: str = "auto",
) -> ClippedSum:
    """The sum over the batch of every example's gradient clipped to norm ``l2_norm_clip`` (no noise yet).

    Args:
      model: any :class:`jaxcnn.nn.Layer` without running statistics (its examples independent).
      loss_fn: ``loss_fn(predictions, targets) -> scalar``, the batch mean of per-example losses; the ghost method
        needs its hand VJP registered in :mod:`jaxcnn.functional` (the built-in losses have one).
      params, state: the model's variables (``state`` must hold no arrays).
      x: inputs ``(N, *input_shape)``; y: targets ``(N, ...)``.
      l2_norm_clip: ``C > 0``.
      key: the dropout key (see the module docstring for how each method uses it).
      mask: ``(N,)`` 1 for real examples, 0 for padding (they contribute nothing); None: all real.
      method: ``"ghost"`` or ``"vmap"``.
      gradients: the vmap method's gradient mode (``"autodiff"``, ``"manual"`` or ``"engine"``; default
        ``"autodiff"``); the ghost method is the hand reverse pass itself and takes ``None`` or ``"engine"``.
      norm_method: how the ghost method forms a convolution's norms: ``"auto"`` (per layer, from its shapes),
        ``"ghost"`` or ``"direct"`` (:mod:`jaxcnn.functional.ghost`).

    Returns:
      A :class:`ClippedSum`: per-example losses ``(N,)``, predictions, the clipped sum (shaped like ``params``)
      and the per-example norms ``(N,)`` before clipping.
    """
    gradients = _gradients_for(method, gradients)
    if norm_method not in NORM_METHODS:
        raise ValueError(f"unknown norm_method {norm_method!r}; known: {', '.join(NORM_METHODS)}")
    check_independent(state)
    if x.shape[0] != y.shape[0] or (mask is not None and mask.shape != (x.shape[0],)):
        raise ValueError(
            f"x, y (and mask) need one leading batch size, got x {tuple(x.shape)}, y {tuple(y.shape)}"
            + ("" if mask is None else f", mask {tuple(mask.shape)}")
        )
    options = dict(l2_norm_clip=l2_norm_clip, key=key, mask=mask)
    if method == "ghost":
        return ghost_clipped_sum(model, loss_fn, params, state, x, y, norm_method=norm_method, **options)
    return vmap_clipped_sum(model, loss_fn, params, state, x, y, gradients=gradients, **options)


def _gradients_for(method: str, gradients: str | None) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown DP method {method!r}; known: {', '.join(METHODS)}")
    if method == "ghost":
        if gradients not in (None, "engine"):
            raise ValueError(
                f"DP-SGD method='ghost' runs the hand reverse pass (gradients='engine'); got gradients={gradients!r} "
                "(use method='vmap' for another gradient mode)"
            )
        return "engine"
    return backprop.check_gradients("autodiff" if gradients is None else gradients)


def noised_mean(grad_sum: Params, key: jax.Array, *, stddev: float, denominator: Any) -> Params:
    """``(grad_sum + N(0, stddev^2)) / denominator`` leaf by leaf; leaf ``j``'s noise is drawn from
    ``fold_in(key, j)`` in the leaf's dtype, so equal sums and keys give equal results."""
    leaves, treedef = jax.tree.flatten(grad_sum)
    noised = [
        ((g + stddev * jax.random.normal(jax.random.fold_in(key, j), g.shape, g.dtype)) / denominator).astype(g.dtype)
        for j, g in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, noised)


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    weights = mask.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1)


def _dp_metrics(result: ClippedSum, y: jax.Array, l2_norm_clip: float, mask: jax.Array | None) -> Metrics:
    count = jnp.asarray(y.shape[0], jnp.int32) if mask is None else jnp.sum(mask).astype(jnp.int32)
    metrics = {
        "loss": _masked_mean(result.losses, mask),
        "count": count,
        "grad_norm": _masked_mean(result.norms, mask),
        "clipped": _masked_mean((result.norms > l2_norm_clip).astype(jnp.float32), mask),
    }
    if jnp.issubdtype(y.dtype, jnp.integer) and result.predictions.ndim == y.ndim + 1:
        hits = (jnp.argmax(result.predictions, axis=-1) == y).astype(jnp.float32)
        metrics["accuracy"] = _masked_mean(hits, mask)
    return metrics


def dp_step_function(
    model: Layer,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    method: str = "ghost",
    gradients: str | None = None,
    loss_fn: LossFn = softmax_cross_entropy,
    norm_method: str = "auto",
    batch_size: int | None = None,
    input_scaling: InputScaling | None = None,
    augmentation: dict[str, Any] | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """The DP-SGD step of :func:`make_dp_train_step` as a plain (not jit-compiled) function
    ``step(state, x, y, mask=None) -> (new_state, metrics)``; arguments as there."""
    check_dp(l2_norm_clip, noise_multiplier, method)
    _gradients_for(method, gradients)
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    augmentation = dict(augmentation or {})
    if augmentation:
        from jaxcnn.data.augment import augment, check_augmentation

        check_augmentation(**augmentation)

    def step(state: TrainState, x: jax.Array, y: jax.Array, mask: jax.Array | None = None):
        check_independent(state.model_state)
        key = jax.random.fold_in(state.key, state.step)
        if input_scaling is not None:
            x = input_scaling(x)
        if augmentation:  # the regular step's stream: fold_in(key, 1)
            x = augment(jax.random.fold_in(key, 1), x, **augmentation)
        result = clipped_grad_sum(
            model, loss_fn, state.params, state.model_state, x, y, l2_norm_clip=l2_norm_clip, key=key,
            mask=mask, method=method, gradients=gradients, norm_method=norm_method,
        )  # fmt: skip
        denominator = x.shape[0] if batch_size is None else batch_size
        grads = noised_mean(
            result.grads, jax.random.fold_in(key, 2), stddev=noise_multiplier * l2_norm_clip, denominator=denominator
        )
        return state.apply_gradients(grads=grads), _dp_metrics(result, y, l2_norm_clip, mask)

    return step


def make_dp_train_step(
    model: Layer,
    optimizer: optax.GradientTransformation | None = None,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    method: str = "ghost",
    gradients: str | None = None,
    loss_fn: LossFn = softmax_cross_entropy,
    norm_method: str = "auto",
    batch_size: int | None = None,
    input_scaling: InputScaling | None = None,
    augmentation: dict[str, Any] | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """A jit-compiled DP-SGD ``step(state, x, y, mask=None) -> (new_state, metrics)``.

    Every example's gradient is clipped to ``l2_norm_clip``, the clipped gradients summed, Gaussian noise of
    standard deviation ``noise_multiplier * l2_norm_clip`` added and the result divided by the batch size; the
    state's optimizer (``state.tx``, a plain optax optimizer, e.g. ``optax.sgd(0.1)``) makes the update. Step
    ``s`` draws from ``k = fold_in(state.key, s)``: dropout from ``k``, augmentation from ``fold_in(k, 1)``, the
    noise from ``fold_in(k, 2)``. The incoming state's buffers are donated.

    Args:
      model: any :class:`jaxcnn.nn.Layer` without running statistics (BatchNorm is refused: its examples are not
        independent, so clipping each would not bound any one's influence).
      optimizer: optional; the optimizer the state was created with (``create_train_state(model, optimizer,
        ...)``). When given, a state carrying another optimizer is refused (a state made with
        :func:`jaxcnn.parallel.dp_optimizer` would clip and noise twice).
      l2_norm_clip: ``C > 0``; noise_multiplier: ``sigma >= 0``.
      method: ``"ghost"`` (per-layer ghost norms from the hand rules, one backward pass) or ``"vmap"``
        (per-example gradients by ``jax.vmap``, the reference). See :func:`clipped_grad_sum`.
      gradients: the vmap method's gradient mode; ``None`` or ``"engine"`` for the ghost method.
      loss_fn: the batch mean of per-example losses (default softmax cross-entropy).
      norm_method: ``"auto"``, ``"ghost"`` or ``"direct"``: how the ghost method forms convolutions' norms.
      batch_size: the divisor of the noised sum: the expected batch size under Poisson sampling with padded
        batches; None divides by ``N``, the batch's size.
      input_scaling, augmentation: as :class:`jaxcnn.train.StepOptions`.

    Returns:
      ``step(state, x, y, mask=None)``: ``x`` ``(N, *input_shape)``, ``y`` ``(N, ...)``, ``mask`` ``(N,)`` 1 for
      real examples and 0 for padding. ``metrics`` (scalars, on device): ``"loss"`` and ``"accuracy"`` (integer
      labels) over the real examples, ``"count"``, ``"grad_norm"`` (the mean per-example norm before clipping)
      and ``"clipped"`` (the fraction of examples whose norm exceeded ``C``).
    """
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax GradientTransformation or None, got {optimizer!r}")
    step = dp_step_function(
        model, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier, method=method, gradients=gradients,
        loss_fn=loss_fn, norm_method=norm_method, batch_size=batch_size, input_scaling=input_scaling,
        augmentation=augmentation,
    )  # fmt: skip

    def checked(state: TrainState, x: jax.Array, y: jax.Array, mask: jax.Array | None = None):
        if optimizer is not None and state.tx != optimizer:
            raise ValueError(
                "this DP step was made for another optimizer than the state carries; create the state with "
                "create_train_state(model, optimizer, ...) using the same optimizer (a plain optax one)"
            )
        return step(state, x, y, mask)

    return jit_train_step(checked, donate_argnums=0)
