"""The jit-compiled train and eval steps: forward, loss, backward, update, in one XLA program each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnn import backprop
from jaxcnn.functional import softmax_cross_entropy
from jaxcnn.functional._args import is_int
from jaxcnn.nn.layer import Layer, Params, State
from jaxcnn.train.config import GRADIENTS
from jaxcnn.train.state import TrainState

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Metrics = dict[str, jax.Array]


def _check_gradients(gradients: str) -> None:
    if gradients not in GRADIENTS:
        raise ValueError(f"unknown gradients {gradients!r}; known: {', '.join(GRADIENTS)}")


def _accuracy_of(predictions: jax.Array, y: jax.Array) -> jax.Array | None:
    """The fraction of argmax predictions equal to integer labels; None for other targets (e.g. MSE)."""
    if not jnp.issubdtype(y.dtype, jnp.integer) or predictions.ndim != y.ndim + 1:
        return None
    return jnp.mean(jnp.argmax(predictions, axis=-1) == y, dtype=jnp.float32)


def compute_dtype(dtype: Any) -> Any:
    """The compute dtype a train step runs in: None (the parameters' own dtype) or a floating dtype.

    Raises ValueError naming the value for anything else (``"bfloat16"``, ``"float16"``, ``"float32"`` and
    ``"float64"`` are accepted, as names or dtypes).
    """
    if dtype is None:
        return None
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype such as 'bfloat16' or 'float32', got {dtype!r}")
    return resolved


def cast_floating(tree: Any, dtype: Any) -> Any:
    """``tree`` with every floating-point leaf cast to ``dtype`` (integer leaves and keys are left alone)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


def _float32_loss(loss_fn: LossFn, hand_vjp: bool) -> tuple[LossFn, backprop.LossVJP | None]:
    """``loss_fn`` (and, with ``hand_vjp``, its hand VJP) evaluated on float32 predictions: the loss of a
    half-precision forward is taken in float32, and its cotangent is handed back in the predictions' dtype."""

    def loss32(predictions, targets):
        return loss_fn(predictions.astype(jnp.float32), targets)

    if not hand_vjp:
        return loss32, None
    vjp = backprop.loss_vjp_of(loss_fn)  # ValueError naming loss_fn when it has no registered rule

    def loss32_vjp(predictions, targets, dloss):
        return vjp(predictions.astype(jnp.float32), targets, dloss).astype(predictions.dtype)

    return loss32, loss32_vjp


def loss_and_grads_fn(
    model: Layer, loss_fn: LossFn, gradients: str, *, dtype: Any = None, remat: bool = False
) -> Callable[..., tuple[jax.Array, jax.Array, State, Params]]:
    """``f(params, state, x, y, key) -> (loss, predictions, new_state, grads)`` in one of the three gradient modes.

    ``"autodiff"``: ``jax.value_and_grad`` through the forward. ``"manual"``: the same, but every layer and the
    loss run through ``jax.custom_vjp`` with their hand-derived rules. ``"engine"``: the explicit reverse pass of
    :func:`jaxcnn.backprop.reverse_pass`, which uses no JAX differentiation at all.

    Mixed precision (``dtype``, e.g. ``"bfloat16"``): the parameters (the master weights, float32) and ``x`` are
    cast to ``dtype`` for the forward and backward passes; the loss is taken in float32 on the predictions cast
    up; the gradients come back cast to each parameter's own dtype. The model state (BatchNorm's running
    statistics) stays in its own dtype, and the norms compute their statistics in at least float32.

    ``remat``: run each child of the model (a :class:`jaxcnn.nn.Container`, e.g. each block of a ``Sequential``)
    under ``jax.checkpoint``, so its activations are recomputed in the backward pass instead of stored
    ("autodiff" and "manual" only: the engine's reverse pass keeps every residual by design).
    """
    _check_gradients(gradients)
    dtype = compute_dtype(dtype)
    if remat:
        from jaxcnn.nn.container import Container

        if gradients == "engine":
            raise ValueError("remat works with gradients='autodiff' or 'manual' (the engine keeps every residual)")
        if not isinstance(model, Container):
            raise ValueError(f"remat checkpoints a container's children; {type(model).__name__} has none")
    loss_vjp = None
    if dtype is not None:
        loss_fn, loss_vjp = _float32_loss(loss_fn, hand_vjp=gradients != "autodiff")
    inner = _loss_and_grads(model, loss_fn, gradients, loss_vjp, remat)
    if dtype is None:
        return inner

    def mixed(params, state, x, y, key):
        low = cast_floating(params, dtype)
        loss, predictions, new_state, grads = inner(low, state, x.astype(dtype), y, key)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return loss, predictions, new_state, grads

    return mixed


def _loss_and_grads(model, loss_fn, gradients, loss_vjp, remat):
    if gradients == "engine":
        run = backprop.reverse_pass(model, loss_fn, loss_vjp=loss_vjp, train=True)

        def engine(params, state, x, y, key):
            result = run(params, state, x, y, key=key)
            return result.loss, result.predictions, result.state, result.grads

        return engine

    mode = "manual" if gradients == "manual" else "autodiff"
    loss_of = backprop.manual_loss(loss_fn, loss_vjp) if mode == "manual" else loss_fn
    options = {"remat": True} if remat else {}

    def objective(params, state, x, y, key):
        predictions, new_state = model.apply(params, state, x, train=True, key=key, gradients=mode, **options)
        return loss_of(predictions, y), (predictions, new_state)

    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def autodiff(params, state, x, y, key):
        (loss, (predictions, new_state)), grads = value_and_grad(params, state, x, y, key)
        return loss, predictions, new_state, grads

    return autodiff


def train_step_function(
    model: Layer,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    gradients: str = "autodiff",
    dtype: Any = None,
    remat: bool = False,
    log_grad_norms: bool = False,
    augmentation: dict[str, Any] | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """The train step of :func:`make_train_step` as a plain (not jit-compiled) function, to transform further:
    ``jax.vmap`` it over an ensemble, ``jax.jit`` it with shardings over a mesh (see :mod:`jaxcnn.parallel`).

    ``step(state, x, y, scale=None)``: a scalar ``scale`` multiplies the optimizer's updates, which sets an
    ensemble member's learning rate relative to the optimizer's (exactly so for the optax optimizers whose
    learning rate multiplies their final update: sgd, momentum, nesterov, adam, adamw, rmsprop).
    """
    loss_and_grads = loss_and_grads_fn(model, loss_fn, gradients, dtype=dtype, remat=remat)
    if augmentation:
        from jaxcnn.data.augment import augment, check_augmentation

        check_augmentation(**augmentation)

    def step(state: TrainState, x: jax.Array, y: jax.Array, scale: Any = None) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(state.key, state.step)
        if augmentation:  # its own stream: the model's (dropout) key stays that of an unaugmented run
            x = augment(jax.random.fold_in(key, 1), x, **augmentation)
        loss, predictions, model_state, grads = loss_and_grads(state.params, state.model_state, x, y, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        if scale is not None:
            updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "count": jnp.asarray(x.shape[0], jnp.int32)}
        accuracy = _accuracy_of(predictions, y)
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        if log_grad_norms:
            weights = layer_norms(state.params)
            metrics["grad_norms"] = layer_norms(grads)
            metrics["update_ratios"] = {
                name: norm / jnp.maximum(weights[name], jnp.finfo(jnp.float32).tiny)
                for name, norm in layer_norms(updates).items()
            }
        new_state = state.replace(params=params, model_state=model_state, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    return step


def layer_norms(tree: Params) -> dict[str, jax.Array]:
    """The L2 norm of each layer's arrays together (kernel and bias, say): ``{"Conv_0": scalar, ...}``.

    A layer is the dict that holds array leaves; nested containers give names joined by ``/``
    (``"Residual_0/Conv_1"``). Computed in float32 at least.
    """
    squares: dict[str, list[jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(entry, "key", entry)) for entry in path[:-1]) or "params"
        squares.setdefault(name, []).append(
            jnp.sum(jnp.square(leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))))
        )
    return {name: jnp.sqrt(sum(parts)) for name, parts in squares.items()}


def layer_order(model: Layer) -> list[str]:
    """The names :func:`layer_norms` gives, in the order the forward pass runs the layers (input first)."""
    from jaxcnn.nn.container import Container

    if not isinstance(model, Container):
        return []
    names = []
    for name, child in model.named_children():
        inner = layer_order(child)
        names.extend([f"{name}/{n}" for n in inner] if inner else [name])
    return names


def make_train_step(
    model: Layer,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    gradients: str = "autodiff",
    dtype: Any = None,
    remat: bool = False,
    steps_per_call: int = 1,
    log_grad_norms: bool = False,
    augmentation: dict[str, Any] | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """A jit-compiled ``step(state, x, y) -> (new_state, metrics)``.

    The four steps of backpropagation in one XLA program: forward, loss, backward (as ``gradients`` says), and
    the optax update. The incoming state's buffers are donated (do not reuse ``state`` after the call). Step
    ``s`` draws its randomness (dropout) from ``fold_in(state.key, s)``. Calls with the same shapes never
    recompile.

    ``steps_per_call=K > 1`` compiles K consecutive steps into one program with ``lax.scan``: ``x`` is then
    ``(K, N, *input_shape)``, ``y`` ``(K, N, ...)``, and every metric has a leading axis of K. It gives the same
    parameters as K single calls. Whether it is faster depends on the backend (see benchmarks/RESULTS.md: it
    pays on GPUs for small models; on XLA:CPU a Python loop of single steps was faster).

    Args:
      model: any :class:`jaxcnn.nn.Layer`.
      optimizer: the optax transform the state was created with.
      loss_fn: ``loss_fn(predictions, targets) -> scalar``; for ``gradients="manual"`` or ``"engine"`` it needs a
        hand-derived VJP registered in :mod:`jaxcnn.functional` (the built-in losses have one).
      gradients: ``"autodiff"``, ``"manual"`` or ``"engine"``.
      dtype: the compute dtype for mixed precision (``"bfloat16"``: bf16 forward and backward, float32 master
        weights, loss and optimizer); None computes in the parameters' dtype. See :func:`loss_and_grads_fn`.
      remat: recompute each block's activations in the backward pass (``jax.checkpoint`` per child of the
        model) to save memory; "autodiff" and "manual" only.
      steps_per_call: train steps per call (>= 1), scanned (see above).
      log_grad_norms: add ``"grad_norms"`` and ``"update_ratios"`` to the metrics: per layer (a dict by name,
        see :func:`layer_norms`), the gradient's norm and the norm of the optimizer's update over the weights'.
      augmentation: options of :func:`jaxcnn.data.augment.augment` (``translate``, ``flip``, ``noise``,
        ``rotate``, ``scale``) applied to every batch on the device, from the step's key; None or ``{}`` trains
        on the batches as given.

    Returns:
      ``step(state, x, y)`` with ``x`` of shape ``(N, *input_shape)`` and ``y`` the targets (``(N,)`` integer
      labels in ``[0, C)`` for cross-entropy; the compiled step does not check them, as that would need a host
      sync per step: a label of -5 wraps around to a plausible loss, one of C or more gives NaN. :func:`fit`
      and :func:`evaluate` check them on the host, and so does :func:`jaxcnn.data.check_labels`).
      ``metrics`` stays on device: ``"loss"`` (the batch mean), ``"accuracy"`` (integer labels only) and
      ``"count"`` (N), each a scalar.
    """
    if not is_int(steps_per_call) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}")
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
    if steps_per_call == 1:
        return jax.jit(step, donate_argnums=0)

    def steps(state: TrainState, xs: jax.Array, ys: jax.Array) -> tuple[TrainState, Metrics]:
        if xs.shape[0] != steps_per_call or ys.shape[0] != steps_per_call:
            raise ValueError(
                f"a {steps_per_call}-step call takes x and y with a leading axis of {steps_per_call}, "
                f"got x {tuple(xs.shape)} and y {tuple(ys.shape)}"
            )
        return jax.lax.scan(lambda carry, batch: step(carry, *batch), state, (xs, ys))

    return jax.jit(steps, donate_argnums=0)


def make_eval_step(
    model: Layer, *, loss_fn: LossFn = softmax_cross_entropy
) -> Callable[[Params, State, jax.Array, jax.Array], Metrics]:
    """A jit-compiled ``eval_step(params, model_state, x, y) -> metrics`` in inference mode (``train=False``).

    ``metrics`` holds sums, so batches of any size add up exactly: ``"loss_sum"`` (the batch-mean loss times N),
    ``"correct"`` (integer labels only) and ``"count"`` (N).
    """
    return jax.jit(eval_step_function(model, loss_fn=loss_fn))


def eval_step_function(
    model: Layer, *, loss_fn: LossFn = softmax_cross_entropy
) -> Callable[[Params, State, jax.Array, jax.Array], Metrics]:
    """The eval step of :func:`make_eval_step` as a plain (not jit-compiled) function."""

    def eval_step(params: Params, model_state: State, x: jax.Array, y: jax.Array) -> Metrics:
        predictions, _ = model.apply(params, model_state, x, train=False)
        count = x.shape[0]
        metrics = {"loss_sum": loss_fn(predictions, y) * count, "count": jnp.asarray(count, jnp.int32)}
        accuracy = _accuracy_of(predictions, y)
        if accuracy is not None:
            metrics["correct"] = jnp.sum(jnp.argmax(predictions, axis=-1) == y, dtype=jnp.int32)
        return metrics

    return eval_step


def sum_metrics(eval_step: Callable[..., Metrics], params: Params, model_state: State, batched: Any) -> dict:
    """The sums ``eval_step(params, model_state, x, y)`` returns, added over ``batched`` ``(x, y)`` pairs on the
    device and read back once. Raises ValueError on an empty set."""
    totals: dict[str, Any] = {}
    for x_batch, y_batch in batched:
        for name, value in eval_step(params, model_state, x_batch, y_batch).items():
            totals[name] = totals[name] + value if name in totals else value
    if not totals:
        raise ValueError("cannot evaluate on an empty set")
    return jax.device_get(totals)


def evaluate(
    model: Layer,
    params: Params,
    model_state: State,
    x: Any,
    y: Any,
    *,
    batch_size: int = 256,
    loss_fn: LossFn = softmax_cross_entropy,
    eval_step: Callable[..., Metrics] | None = None,
    mesh: Any = None,
) -> dict[str, float]:
    """Mean loss (and accuracy, for integer labels) of the model over ``(x, y)`` in inference mode.

    Args:
      model, params, model_state: the model and its variables.
      x: inputs ``(N, *input_shape)``; y: targets ``(N, ...)``: for cross-entropy (and any ``(N,)`` integer
        targets), class labels in ``[0, C)`` for the model's C outputs, checked on the host before the first batch.
      batch_size: examples per compiled call (the last batch holds the remainder).
      loss_fn: the loss (the mean over a batch).
      eval_step: a step from :func:`make_eval_step` to reuse (avoids a compile per call).
      mesh: a ``jax.sharding.Mesh`` from :func:`jaxcnn.parallel.data_mesh`: every batch is sharded across its
        devices (``params`` and ``model_state`` replicated on it); None runs on the default device.

    Returns:
      ``{"loss": float, "accuracy": float, "count": int}`` (no ``"accuracy"`` for non-integer targets).

    Raises:
      ValueError: class labels that are not integers or lie outside ``[0, C)``, naming the first bad one.
    """
    from jaxcnn.data import batches

    step = eval_step or make_eval_step(model, loss_fn=loss_fn)
    x, y = np.asarray(x), np.asarray(y)
    # class labels: integer targets, or any targets of the default loss (unless a given eval_step brings its own)
    if np.issubdtype(y.dtype, np.integer) or (loss_fn is softmax_cross_entropy and eval_step is None):
        check_class_labels(model, params, model_state, x, y)
    if mesh is None:
        batched = batches(x, y, batch_size)
    else:
        from jaxcnn.parallel import sharded_batches

        batched = sharded_batches(x, y, batch_size, mesh)
    totals = sum_metrics(step, params, model_state, batched)
    count = int(totals["count"])
    result: dict[str, Any] = {"loss": float(totals["loss_sum"]) / count, "count": count}
    if "correct" in totals:
        result["accuracy"] = float(totals["correct"]) / count
    return result


def check_class_labels(model: Layer, params: Params, model_state: State, x: np.ndarray, y: np.ndarray) -> None:
    """Raise ValueError unless ``y`` ``(N,)`` holds integer labels in ``[0, C)`` for the model's C outputs,
    C found from the shape of the output for ``x[:1]`` (traced abstractly, nothing runs)."""
    from jaxcnn.data import check_labels

    logits = jax.eval_shape(lambda p, s, xb: model.apply(p, s, xb, train=False)[0], params, model_state, x[:1])
    check_labels(y, int(logits.shape[-1]))
