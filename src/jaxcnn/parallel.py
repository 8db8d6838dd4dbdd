"""Scale by transformation: per-example gradients and ensembles with ``jax.vmap``, data parallelism over devices
and hosts with ``jax.sharding`` and ``jax.distributed``.

Per example (vmap over the batch):
  :func:`per_example_grads` gives every example's gradient (a leading batch axis), in the "autodiff", "manual" or
  "engine" gradient mode; :func:`per_example_norms`, :func:`gradient_variance` and :func:`gradient_noise_scale`
  summarise them; :func:`clip_per_example`, :func:`dp_optimizer` and :func:`make_dp_train_step` make DP-SGD
  (per-example clipping and Gaussian noise through optax's ``differentially_private_aggregate``).

Ensembles (vmap over models):
  :func:`create_ensemble_state` stacks K train states (K seeds) along a leading axis;
  :func:`make_ensemble_train_step` trains all K in one jit-compiled, vmapped step (optionally with a learning
  rate per member); :func:`ensemble_predictions` averages the members' probabilities.

Data parallelism (one program over many devices):
  :func:`data_mesh` builds a one-axis ``Mesh`` (``"data"``) over the devices of every process; the batch is
  sharded along it and the train state replicated (:func:`replicate`, :func:`shard_batch`,
  :func:`sharded_batches`); :func:`make_data_parallel_train_step` compiles the ordinary train step for that
  layout, and XLA all-reduces the gradients. BatchNorm's batch statistics need nothing special: the step computes
  the mean over the global batch, which XLA turns into an all-reduce across devices, so the statistics are those
  of the whole batch, as on one device. :func:`initialize` starts ``jax.distributed`` for runs over several
  processes (hosts); each process then feeds only its own rows of every batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcnn import _gloo, backprop
from jaxcnn.data import batches, epoch_order, num_batches
from jaxcnn.data._batching import ahead
from jaxcnn.functional import softmax_cross_entropy
from jaxcnn.functional._args import is_int
from jaxcnn.nn.layer import Layer, Params, Shape, State
from jaxcnn.train.state import TrainState, as_typed_key, create_train_state
from jaxcnn.train.step import (
    GRADIENTS,
    LossFn,
    Metrics,
    _accuracy_of,
    check_class_labels,
    eval_step_function,
    sum_metrics,
    train_step_function,
)

AXIS = "data"  # the name of the mesh axis the batch is sharded along

__all__ = [
    "AXIS",
    "clip_per_example",
    "create_ensemble_state",
    "data_mesh",
    "dp_optimizer",
    "ensemble_batches",
    "ensemble_predictions",
    "evaluate_ensemble",
    "gradient_noise_scale",
    "gradient_variance",
    "initialize",
    "make_data_parallel_eval_step",
    "make_data_parallel_train_step",
    "make_dp_train_step",
    "make_ensemble_eval_step",
    "make_ensemble_train_step",
    "per_example_grads",
    "per_example_loss_and_grads",
    "per_example_norms",
    "replicate",
    "shard_batch",
    "sharded_batches",
]


# -- per-example gradients -------------------------------------------------------------------------------------


def _check_batch(x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same leading batch size, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("per-example gradients need at least one example, got an empty batch")
    return x, y


def _one_example_fn(model: Layer, loss_fn: LossFn, gradients: str, train: bool) -> Callable:
    """``f(params, state, x1, y1, key) -> ((loss, predictions), grads)`` for a batch of one, in the given
    gradient mode."""
    if gradients not in GRADIENTS:
        raise ValueError(f"unknown gradients {gradients!r}; known: {', '.join(GRADIENTS)}")
    if gradients == "engine":
        run = backprop.reverse_pass(model, loss_fn, train=train)

        def engine(params, state, x, y, key):
            result = run(params, state, x, y, key=key)
            return (result.loss, result.predictions), result.grads

        return engine
    loss_of = backprop.manual_loss(loss_fn) if gradients == "manual" else loss_fn

    def objective(params, state, x, y, key):
        predictions, _ = model.apply(params, state, x, train=train, key=key, gradients=gradients)
        return loss_of(predictions, y), predictions

    return jax.value_and_grad(objective, has_aux=True)


def per_example_loss_and_grads(
    model: Layer,
    loss_fn: LossFn,
    params: Params,
    state: State,
    x: jax.Array,
    y: jax.Array,
    *,
    gradients: str = "autodiff",
    key: jax.Array | None = None,
    train: bool = True,
) -> tuple[jax.Array, Params]:
    """Every example's loss and gradient: ``(losses (N,), grads)``, each grads leaf ``(N, *param.shape)``.

    Example ``i`` is run as a batch of one, ``loss_fn(model(x[i:i+1]), y[i:i+1])``, with ``jax.vmap`` over the
    batch; see :func:`per_example_grads` for the arguments.
    """
    x, y = _check_batch(x, y)
    one = _one_example_fn(model, loss_fn, gradients, train)
    keys = None if key is None else jax.random.split(as_typed_key(key), x.shape[0])

    def example(xi, yi, ki):
        (loss, _), grads = one(params, state, xi[None], yi[None], ki)
        return loss, grads

    return jax.vmap(example, in_axes=(0, 0, None if keys is None else 0))(x, y, keys)


def per_example_grads(
    model: Layer,
    loss_fn: LossFn,
    params: Params,
    state: State,
    x: jax.Array,
    y: jax.Array,
    *,
    gradients: str = "autodiff",
    key: jax.Array | None = None,
    train: bool = True,
) -> Params:
    """The gradient of the loss of every example separately, by ``jax.vmap``: a pytree shaped like ``params``
    with a leading batch axis (leaf ``(N, *param.shape)``).

    ``grads[i]`` is the gradient of ``loss_fn(model(x[i:i+1]), y[i:i+1])``: example ``i`` run as a batch of one.
    For a loss that averages over the batch (the built-in ones do) and a model whose examples do not interact,
    the mean over the batch axis is the batch gradient.

    Args:
      model: any :class:`jaxcnn.nn.Layer`.
      loss_fn: ``loss_fn(predictions, targets) -> scalar`` (for "manual" and "engine" it needs a hand-derived VJP
        registered in :mod:`jaxcnn.functional`; the built-in losses have one).
      params, state: the model's variables.
      x: inputs ``(N, *input_shape)``; y: targets ``(N, ...)`` (``(N,)`` integer labels for cross-entropy).
      gradients: ``"autodiff"`` (``jax.grad``), ``"manual"`` (the hand-derived rules through ``jax.custom_vjp``)
        or ``"engine"`` (the explicit reverse pass).
      key: the random key of dropout; example ``i`` draws from ``jax.random.split(key, N)[i]``.
      train: the mode the forward runs in. In training mode BatchNorm normalises each example with its own
        statistics (a batch of one), so for a model with BatchNorm the mean of the per-example gradients is not
        the batch gradient; ``train=False`` uses the running statistics instead.

    Returns:
      The gradients, each leaf ``(N, *param.shape)`` in the parameter's dtype.
    """
    return per_example_loss_and_grads(model, loss_fn, params, state, x, y, gradients=gradients, key=key, train=train)[1]


def per_example_norms(grads: Params) -> jax.Array:
    """The global L2 norm of each example's gradient: ``(N,)`` from per-example grads (leaves ``(N, ...)``)."""
    leaves = jax.tree.leaves(grads)
    if not leaves:
        raise ValueError("per_example_norms needs a non-empty gradient tree")
    squares = [jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves]
    return jnp.sqrt(sum(squares))


def gradient_variance(grads: Params, *, ddof: int = 0) -> Params:
    """The variance of every gradient entry across the batch: a tree shaped like ``params``.

    Args:
      grads: per-example gradients, leaves ``(N, *param.shape)`` (from :func:`per_example_grads`).
      ddof: 0 for the population variance, 1 for the unbiased estimate (needs N >= 2).
    """
    count = jax.tree.leaves(grads)[0].shape[0]
    if ddof not in (0, 1) or count - ddof < 1:
        raise ValueError(
            f"gradient_variance needs ddof 0 or 1 and more than ddof examples, got ddof {ddof!r}, N {count}"
        )
    return jax.tree.map(lambda g: jnp.var(g, axis=0, ddof=ddof), grads)


def gradient_noise_scale(grads: Params) -> dict[str, jax.Array]:
    """How noisy a batch's gradient is, from its per-example gradients (leaves ``(N, ...)``, N >= 2).

    Returns scalars: ``"mean_norm"`` (the norm of the batch gradient), ``"total_variance"`` (the trace of the
    per-example covariance, unbiased: the summed :func:`gradient_variance` with ``ddof=1``) and
    ``"noise_scale"``, their ratio ``total_variance / mean_norm**2``: McCandlish et al.'s simple noise scale, the
    batch size around which larger batches stop paying off.
    """
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
    mean_norm = jnp.sqrt(sum(jnp.sum(jnp.square(m)) for m in jax.tree.leaves(mean)))
    total = sum(jnp.sum(v) for v in jax.tree.leaves(gradient_variance(grads, ddof=1)))
    return {"mean_norm": mean_norm, "total_variance": total, "noise_scale": total / jnp.square(mean_norm)}


# -- DP-SGD ----------------------------------------------------------------------------------------------------


def _check_clip(l2_norm_clip: Any, noise_multiplier: Any = 0.0) -> None:
    def finite(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and bool(np.isfinite(value))

    if not finite(l2_norm_clip) or l2_norm_clip <= 0:
        raise ValueError(f"l2_norm_clip must be a finite number > 0, got {l2_norm_clip!r}")
    if not finite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


def clip_per_example(grads: Params, l2_norm_clip: float) -> Params:
    """Per-example gradients each scaled to a global L2 norm of at most ``l2_norm_clip``.

    Example ``i`` is multiplied by ``min(1, l2_norm_clip / ||g_i||)`` (a zero gradient stays zero); leaves keep
    their ``(N, *param.shape)`` shape. The same clipping as optax's ``differentially_private_aggregate``.
    """
    _check_clip(l2_norm_clip)
    norms = per_example_norms(grads)
    factors = jnp.minimum(1.0, l2_norm_clip / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))

    def scale(g):
        return (g * factors.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)).astype(g.dtype)

    return jax.tree.map(scale, grads)


def dp_optimizer(
    optimizer: optax.GradientTransformation, *, l2_norm_clip: float, noise_multiplier: float, key: jax.Array
) -> optax.GradientTransformation:
    """``optimizer`` behind optax's DP-SGD aggregation: it takes per-example gradients (leading batch axis),
    clips each to ``l2_norm_clip``, sums them, adds Gaussian noise of standard deviation ``l2_norm_clip *
    noise_multiplier`` and divides by the batch size, then hands the result to ``optimizer``.

    ``key`` seeds the noise (kept, and advanced every step, in the optimizer state).
    """
    _check_clip(l2_norm_clip, noise_multiplier)
    aggregate = optax.contrib.differentially_private_aggregate(l2_norm_clip, noise_multiplier, as_typed_key(key))
    return optax.chain(aggregate, optimizer)


def make_dp_train_step(
    model: Layer,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    gradients: str = "autodiff",
    l2_norm_clip: float | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """A jit-compiled DP-SGD ``step(state, x, y) -> (new_state, metrics)``.

    The per-example gradients (:func:`per_example_grads`) go to ``optimizer``, which must aggregate them: build it
    with :func:`dp_optimizer` (clipping and noise) and create the state with that same optimizer. Example ``i`` of
    step ``s`` draws its dropout from ``split(fold_in(state.key, s), N)[i]``. A model with running statistics
    (BatchNorm) is refused: its examples are not independent, so per-example clipping would not bound them.

    ``metrics``: ``"loss"`` (the batch mean) and ``"accuracy"`` (integer labels) of the training-mode forward
    passes that gave the gradients (as in :func:`jaxcnn.train.make_train_step`), ``"count"``, ``"grad_norm"`` (the
    mean per-example norm before clipping) and, with ``l2_norm_clip`` given, ``"clipped"`` (the fraction of
    examples whose norm exceeded it).
    """
    one = _one_example_fn(model, loss_fn, gradients, train=True)

    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, Metrics]:
        if jax.tree.leaves(state.model_state):
            raise ValueError(
                "DP-SGD needs independent examples; this model keeps running statistics (BatchNorm), use "
                "GroupNorm or LayerNorm instead"
            )
        key = jax.random.fold_in(state.key, state.step)
        keys = jax.random.split(key, x.shape[0])
        example = lambda xi, yi, ki: one(state.params, state.model_state, xi[None], yi[None], ki)  # noqa: E731
        (losses, predictions), grads = jax.vmap(example)(x, y, keys)
        predictions = predictions[:, 0]  # each example's own output, from the same forward passes
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        norms = per_example_norms(grads)
        metrics = {"loss": jnp.mean(losses), "count": jnp.asarray(x.shape[0], jnp.int32), "grad_norm": jnp.mean(norms)}
        if l2_norm_clip is not None:
            metrics["clipped"] = jnp.mean(norms > l2_norm_clip, dtype=jnp.float32)
        accuracy = _accuracy_of(predictions, y)
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(step, donate_argnums=0)


# -- ensembles -------------------------------------------------------------------------------------------------


def _ensemble_keys(keys: Any) -> jax.Array:
    if isinstance(keys, int) and not isinstance(keys, bool):
        raise ValueError("create_ensemble_state takes K keys or K seeds (a list), not a single int")
    if isinstance(keys, (list, tuple)) and keys and all(is_int(k) for k in keys):
        if any(not 0 <= int(k) < 2**32 for k in keys):
            raise ValueError(f"ensemble seeds must be ints in [0, 2**32), got {list(keys)}")
        return jnp.stack([jax.random.key(int(k)) for k in keys])
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        if keys.ndim != 2 or keys.dtype != jnp.uint32:
            raise ValueError(f"ensemble keys must be K typed keys, K raw uint32[2] keys or K seeds, got {keys.shape}")
        keys = jax.random.wrap_key_data(keys)
    if keys.ndim != 1 or keys.shape[0] < 1:
        raise ValueError(f"ensemble keys need shape (K,) with K >= 1, got {tuple(keys.shape)}")
    return keys


def create_ensemble_state(
    model: Layer,
    optimizer: optax.GradientTransformation,
    keys: Any,
    input_shape: Shape,
    *,
    dtype: Any = jnp.float32,
) -> TrainState:
    """K train states stacked along a leading axis, member ``k`` exactly ``create_train_state(..., keys[k], ...)``.

    Args:
      model, optimizer, input_shape, dtype: as for :func:`jaxcnn.train.create_train_state`.
      keys: K random keys (typed ``(K,)`` or raw ``(K, 2)``), or a list of K integer seeds (member ``k`` then
        equals a single run with ``jax.random.key(seeds[k])``).

    Returns:
      A :class:`TrainState` whose every leaf has a leading axis of K (``step`` is ``(K,)``).
    """
    keys = _ensemble_keys(keys)
    return jax.vmap(lambda k: create_train_state(model, optimizer, k, input_shape, dtype=dtype))(keys)


def make_ensemble_train_step(
    model: Layer,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    gradients: str = "autodiff",
    dtype: Any = None,
    remat: bool = False,
    lr_scales: Sequence[float] | jax.Array | None = None,
    shared_batch: bool = False,
    log_grad_norms: bool = False,
    augmentation: dict[str, Any] | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """A jit-compiled ``step(states, x, y) -> (new_states, metrics)`` training K models at once (``jax.vmap`` of
    the ordinary train step over the members; buffers donated).

    Args:
      model, optimizer, loss_fn, gradients, dtype, remat, log_grad_norms, augmentation: as for
        :func:`jaxcnn.train.make_train_step`.
      lr_scales: K factors; member ``k``'s updates are multiplied by ``lr_scales[k]``, i.e. it trains with the
        optimizer's learning rate (schedule included) times ``lr_scales[k]``. Build the optimizer with learning
        rate 1.0 to give the K rates directly. None: every member uses the optimizer's rate.
      shared_batch: every member trains on the same batch, ``x (N, ...)``; otherwise each has its own,
        ``x (K, N, ...)`` and ``y (K, N, ...)`` (member ``k`` then equals a separate run fed ``x[k]``).

    Returns:
      The step; ``states`` come from :func:`create_ensemble_state`; every metric has a leading axis of K.
    """
    step = train_step_function(
        model,
        optimizer,
        loss_fn=loss_fn,
        gradients=gradients,
        dtype=dtype,
        remat=remat,
        log_grad_norms=log_grad_norms,
        augmentation=augmentation,
    )
    batch_axis = None if shared_batch else 0
    if lr_scales is None:
        members = jax.vmap(step, in_axes=(0, batch_axis, batch_axis))
        return jax.jit(members, donate_argnums=0)
    scales = np.asarray(lr_scales, dtype=np.float64)
    if scales.ndim != 1 or scales.size < 1 or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise ValueError(f"lr_scales must be K finite positive numbers, got {lr_scales!r}")
    scales = jnp.asarray(scales, jnp.float32)
    members = jax.vmap(step, in_axes=(0, batch_axis, batch_axis, 0))

    def scaled(states, x, y):
        if states.step.shape != scales.shape:
            raise ValueError(f"the ensemble has {states.step.shape[0]} members but lr_scales has {scales.shape[0]}")
        return members(states, x, y, scales)

    return jax.jit(scaled, donate_argnums=0)


def ensemble_predictions(model: Layer, params: Params, state: State, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The members' class probabilities and the ensemble's: ``(member_probs (K, N, C), mean_probs (N, C))``.

    ``params`` and ``state`` carry a leading member axis (from :func:`create_ensemble_state`); the members run in
    inference mode and their softmax probabilities are averaged.
    """
    apply = lambda p, s: model.apply(p, s, x, train=False)[0]  # noqa: E731
    logits = jax.vmap(apply)(params, state)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs, jnp.mean(probs, axis=0)


def make_ensemble_eval_step(model: Layer, *, loss_fn: LossFn = softmax_cross_entropy) -> Callable[..., Metrics]:
    """A jit-compiled ``eval_step(params, state, x, y) -> sums`` for an ensemble (leading member axis) and a
    shared batch, in inference mode.

    ``sums``: ``"member_loss_sum"`` and ``"member_correct"`` (each ``(K,)``: every member on its own),
    ``"loss_sum"`` (the ensemble's negative log-likelihood of the mean probabilities, summed), ``"correct"``
    (the ensemble's argmax hits) and ``"count"``. Integer labels only.
    """

    def eval_step(params: Params, state: State, x: jax.Array, y: jax.Array) -> Metrics:
        logits = jax.vmap(lambda p, s: model.apply(p, s, x, train=False)[0])(params, state)
        count = x.shape[0]
        member_loss = jax.vmap(lambda out: loss_fn(out, y))(logits) * count
        probs = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=0)
        picked = jnp.take_along_axis(probs, y[:, None].astype(jnp.int32), axis=-1)[:, 0]
        tiny = jnp.finfo(probs.dtype).tiny
        return {
            "member_loss_sum": member_loss,
            "member_correct": jnp.sum(jnp.argmax(logits, axis=-1) == y[None], axis=-1, dtype=jnp.int32),
            "loss_sum": -jnp.sum(jnp.log(jnp.maximum(picked, tiny))),
            "correct": jnp.sum(jnp.argmax(probs, axis=-1) == y, dtype=jnp.int32),
            "count": jnp.asarray(count, jnp.int32),
        }

    return jax.jit(eval_step)


def evaluate_ensemble(
    model: Layer,
    params: Params,
    state: State,
    x: Any,
    y: Any,
    *,
    batch_size: int = 256,
    eval_step: Callable[..., Metrics] | None = None,
) -> dict[str, Any]:
    """The ensemble's and each member's test loss and accuracy over ``(x, y)`` (integer labels).

    Returns:
      ``{"loss", "accuracy", "count", "members": [{"loss", "accuracy"}, ...]}``: the ensemble predicts with the
      mean of its members' softmax probabilities (its loss is the negative log-likelihood of that mean).
    """
    step = eval_step or make_ensemble_eval_step(model)
    x, y = np.asarray(x), np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"an ensemble is evaluated on integer class labels, got {y.dtype}")
    check_class_labels(model, jax.tree.map(lambda a: a[0], params), jax.tree.map(lambda a: a[0], state), x, y)
    totals = sum_metrics(step, params, state, batches(x, y, batch_size))
    count = int(totals["count"])
    members = [
        {"loss": float(loss) / count, "accuracy": float(correct) / count}
        for loss, correct in zip(totals["member_loss_sum"], totals["member_correct"], strict=True)
    ]
    return {
        "loss": float(totals["loss_sum"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "count": count,
        "members": members,
    }


def ensemble_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, keys: Sequence[jax.Array], *, prefetch: int = 2
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """One epoch for K members, each in its own order: batches ``(K, b, ...)`` where member ``k``'s rows are
    those :func:`jaxcnn.data.batches` gives a single run with ``key=keys[k]`` (so member ``k`` sees exactly
    the batches of that run)."""
    num_batches(len(x), batch_size)
    orders = np.stack([epoch_order(key, len(x)) for key in keys])
    starts = range(0, orders.shape[1], batch_size)
    placed = ((jax.device_put(x[i]), jax.device_put(y[i])) for i in (orders[:, s : s + batch_size] for s in starts))
    return ahead(placed, prefetch)


# -- data parallelism ------------------------------------------------------------------------------------------


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` for a run over several processes (hosts); call it before any JAX computation.

    Arguments not given are read from the environment: ``JAX_COORDINATOR_ADDRESS`` (``HOST:PORT``),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. With none of the three anywhere it does nothing (a single
    process) and returns False. On CPU it selects the gloo collectives, so processes on one machine (or on
    hosts that reach each other over TCP) can all-reduce, and opens their connections at once (without gloo's
    "[Gloo] Rank R is connected" lines on stdout).

    Raises:
      ValueError: a partial or malformed set of arguments, naming what is wrong.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    given = {"coordinator": coordinator, "num-processes": num_processes, "process-id": process_id}
    if all(value is None for value in given.values()):
        return False
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(
            "a multi-process run needs --coordinator, --num-processes and --process-id; missing "
            + ", ".join("--" + name for name in missing)
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if not is_int(num_processes) or num_processes < 1:
        raise ValueError(f"--num-processes must be an int >= 1, got {num_processes!r}")
    if not is_int(process_id) or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id!r}")
    # the CPU backend's collectives across processes (a GPU backend uses NCCL and ignores this setting)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    _gloo.connect_processes()  # now, without gloo's "[Gloo] Rank 0 is connected" lines
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def data_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh (axis ``"data"``) over ``devices`` devices in all, the same number from every process.

    Args:
      devices: the total device count (a multiple of ``jax.process_count()``, at most ``len(jax.devices())``);
        None takes every device of every process.

    Raises:
      ValueError: a count that is not a positive int, exceeds the devices there are, or does not split evenly
        over the processes.
    """
    processes = jax.process_count()
    available = jax.devices()
    if devices is None:
        devices = len(available)
    if not is_int(devices) or devices < 1:
        raise ValueError(f"devices must be an int >= 1, got {devices!r}")
    if devices > len(available):
        hint = (
            ""
            if jax.default_backend() != "cpu"
            else " (simulate more CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
        raise ValueError(f"asked for {devices} devices but only {len(available)} are available{hint}")
    if devices % processes:
        raise ValueError(f"devices ({devices}) must be a multiple of the number of processes ({processes})")
    per_process = devices // processes
    chosen = []
    for process in range(processes):
        local = [d for d in available if d.process_index == process]
        if len(local) < per_process:
            raise ValueError(f"process {process} has {len(local)} devices, {per_process} are needed")
        chosen.extend(local[:per_process])
    mesh = Mesh(np.array(chosen), (AXIS,))
    _gloo.connect(mesh)  # a subset of the devices is a new set of gloo connections: opened quietly
    return mesh


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _global_array(value: Any, sharding: NamedSharding) -> jax.Array:
    # a copy: on CPU np.asarray may view the buffer of a jax array that a donating step will later reuse
    host = np.array(value, copy=True)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every array leaf placed whole on every device of ``mesh`` (random keys included).

    Every process must pass the same values (a state built from the same seed, or restored from the same
    checkpoint); each process places only its own devices' copies.
    """
    sharding = _replicated(mesh)

    def place(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = _global_array(jax.random.key_data(leaf), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return _global_array(leaf, sharding)

    return jax.tree.map(place, tree)


def shard_batch(x: Any, mesh: Mesh, index: np.ndarray | None = None) -> jax.Array:
    """Rows ``x[index]`` (all rows when ``index`` is None) as one global array sharded along ``mesh``'s axis.

    Each process gathers only the rows its own devices hold. A batch whose size does not divide by the device
    count (the last partial batch of an epoch) is replicated instead: every device computes it whole, which
    gives the same result.
    """
    rows = np.arange(len(x)) if index is None else np.asarray(index)
    shape = (len(rows), *np.shape(x)[1:])
    spec = PartitionSpec(AXIS) if len(rows) % mesh.size == 0 else PartitionSpec()
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(
        shape, sharding, lambda where: np.asarray(x[rows[where[0]]])[(slice(None),) + where[1:]]
    )


def sharded_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, mesh: Mesh, *, key: jax.Array | None = None, prefetch: int = 2
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """:func:`jaxcnn.data.batches` for a mesh: the same batches in the same order, each sharded along the
    mesh's ``"data"`` axis by :func:`shard_batch`, ``prefetch`` of them placed ahead of use."""
    num_batches(len(x), batch_size)  # checks batch_size
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    order = np.arange(len(x)) if key is None else epoch_order(key, len(x))
    indices = (order[start : start + batch_size] for start in range(0, len(order), batch_size))
    return ahead(((shard_batch(x, mesh, i), shard_batch(y, mesh, i)) for i in indices), prefetch)


def make_data_parallel_train_step(
    model: Layer,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    gradients: str = "autodiff",
    dtype: Any = None,
    remat: bool = False,
    log_grad_norms: bool = False,
    augmentation: dict[str, Any] | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """The train step of :func:`jaxcnn.train.make_train_step`, compiled for ``mesh``: ``step(state, x, y)`` with
    ``state`` replicated (:func:`replicate`) and ``x``, ``y`` sharded along the batch (:func:`shard_batch`).

    The code is the single-device step's: XLA partitions it, all-reducing the gradients (and BatchNorm's batch
    moments) across devices, so the result is that of the whole batch on one device, up to the order of float
    additions. The new state and the metrics come back replicated.
    """
    step = train_step_function(
        model,
        optimizer,
        loss_fn=loss_fn,
        gradients=gradients,
        dtype=dtype,
        remat=remat,
        log_grad_norms=log_grad_norms,
        augmentation=augmentation,
    )
    replicated = _replicated(mesh)
    return jax.jit(lambda state, x, y: step(state, x, y), donate_argnums=0, out_shardings=(replicated, replicated))


def make_data_parallel_eval_step(model: Layer, mesh: Mesh, *, loss_fn: LossFn = softmax_cross_entropy) -> Callable:
    """:func:`jaxcnn.train.make_eval_step` compiled for ``mesh``: sharded batches in, replicated sums out."""
    return jax.jit(eval_step_function(model, loss_fn=loss_fn), out_shardings=_replicated(mesh))
