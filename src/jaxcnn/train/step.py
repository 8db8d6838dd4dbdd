"""The jit-compiled train step: forward, loss, backward, update, in one XLA program; its options as one value."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxcnn import backprop
from jaxcnn._step_jit import jit_train_step
from jaxcnn._validate import is_int
from jaxcnn.functional import softmax_cross_entropy
from jaxcnn.nn.layer import Layer, Params
from jaxcnn.train.state import TrainState

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Metrics = dict[str, jax.Array]

SCAN_ON_CPU = (
    "steps_per_call > 1 with autodiff gradients is ~30x slower per step on XLA:CPU (mnist_cnn b128: 44 img/s "
    "scanned against 1,282 single-step): XLA:CPU rewrites only top-level convolutions into the form its fast "
    "kernels take, so autodiff's transposed convolutions inside the scan's loop body fall back to a naive loop "
    "(hand-derived gradients are not affected). Use steps_per_call=1 on CPU, or gradients='manual'; "
    "see benchmarks/RESULTS.md, 'Scanned steps on XLA:CPU'"
)


class ScanOnCPUWarning(UserWarning):
    """``steps_per_call > 1`` on XLA:CPU with autodiff gradients: see :data:`SCAN_ON_CPU`."""


def scan_is_slow(gradients: str, backend: str | None = None) -> bool:
    """Whether scanned steps (``steps_per_call > 1``) hit XLA:CPU's slow convolution path: autodiff gradients
    (and any ``jax.grad`` step, Flax's too) on a CPU backend (default: JAX's default backend)."""
    return gradients == "autodiff" and (backend or jax.default_backend()) == "cpu"


def accuracy_of(predictions: jax.Array, y: jax.Array) -> jax.Array | None:
    """The fraction of argmax predictions ``(N, C)`` equal to integer labels ``(N,)``; None for other targets
    (e.g. an autoencoder's images under MSE)."""
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


@dataclasses.dataclass(frozen=True)
class InputScaling:
    """How a step turns integer batches (uint8 pixels from the host) into the model's input, on the device:
    ``x / scale``, then ``(x - mean) / std`` per channel when ``mean`` and ``std`` are given, in float32 (a
    mixed-precision step casts the result to its compute dtype next). Floating-point batches pass unchanged.

    Attributes:
      scale: the raw value of full intensity (255 for 8-bit pixels).
      mean, std: per-channel ``(C,)`` statistics in the scaled units, or None.
    """

    scale: float = 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("InputScaling needs both mean and std, or neither")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"InputScaling std must be positive, got {self.std}")

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` ``(N, H, W, C)`` as the model's float32 input (unchanged when already floating point)."""
        if not jnp.issubdtype(x.dtype, jnp.integer):
            return x
        x = x.astype(jnp.float32) / jnp.float32(self.scale)
        if self.mean is None:
            return x
        shape = (1,) * (x.ndim - 1) + (-1,)
        mean = jnp.asarray(self.mean, jnp.float32).reshape(shape)
        return (x - mean) / jnp.asarray(self.std, jnp.float32).reshape(shape)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How a train step computes its update, as one value (validated on creation).

    Every train step (:func:`make_train_step`, the ensemble and data-parallel steps, ``jaxcnn train``) takes
    one of these; the keyword arguments of :func:`make_train_step` are its fields.

    Attributes:
      loss_fn: ``loss_fn(predictions, targets) -> scalar``; ``"manual"`` and ``"engine"`` need its hand-derived
        VJP registered in :mod:`jaxcnn.functional` (the built-in losses have one).
      gradients: ``"autodiff"``, ``"manual"`` or ``"engine"`` (see :mod:`jaxcnn.backprop`).
      dtype: the compute dtype for mixed precision (``"bfloat16"``: bf16 forward and backward, float32 master
        weights, loss and optimizer); None computes in the parameters' dtype. See :func:`loss_and_grads_fn`.
      remat: recompute each block's activations in the backward pass (``jax.checkpoint`` per child of the
        model) to save memory; "autodiff" and "manual" only.
      log_grad_norms: add ``"grad_norms"`` and ``"update_ratios"`` to the metrics: per layer (a dict by name,
        see :func:`layer_norms`), the gradient's norm and the norm of the optimizer's update over the weights'.
      augmentation: options of :func:`jaxcnn.data.augment.augment` (``translate``, ``flip``, ``noise``,
        ``rotate``, ``scale``) applied to every batch on the device, from the step's key; ``{}`` trains on the
        batches as given.
      input_scaling: an :class:`InputScaling` applied first to integer (uint8) batches, on the device; None
        leaves batches as given.
    """

    loss_fn: LossFn = softmax_cross_entropy
    gradients: str = "autodiff"
    dtype: Any = None
    remat: bool = False
    log_grad_norms: bool = False
    augmentation: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    input_scaling: InputScaling | None = None

    def __post_init__(self) -> None:
        if not callable(self.loss_fn):
            raise ValueError(f"loss_fn must be callable, got {self.loss_fn!r}")
        backprop.check_gradients(self.gradients)
        object.__setattr__(self, "dtype", compute_dtype(self.dtype))
        for name in ("remat", "log_grad_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.remat and self.gradients == "engine":
            raise ValueError("remat works with gradients='autodiff' or 'manual' (the engine keeps every residual)")
        augmentation = dict(self.augmentation or {})
        if augmentation:
            from jaxcnn.data.augment import check_augmentation

            check_augmentation(**augmentation)
        object.__setattr__(self, "augmentation", augmentation)
        if not isinstance(self.input_scaling, InputScaling | None):
            raise ValueError(f"input_scaling must be an InputScaling or None, got {self.input_scaling!r}")

    @classmethod
    def of(cls, options: StepOptions | None = None, **fields: Any) -> StepOptions:
        """``options`` (default: all defaults) with ``fields`` replaced: the one place where keyword arguments
        of a step factory become a :class:`StepOptions`."""
        options = cls() if options is None else options
        if not isinstance(options, StepOptions):
            raise TypeError(f"options must be a StepOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **fields) if fields else options


def loss_and_grads_fn(
    model: Layer, loss_fn: LossFn, gradients: str, *, dtype: Any = None, remat: bool = False
) -> Callable[..., backprop.ReversePass]:
    """``f(params, state, x, y, key) -> ReversePass(loss, predictions, new_state, grads)``: the training-mode
    :func:`jaxcnn.backprop.loss_and_grads` in the given gradient mode, in the compute ``dtype``.

    Mixed precision (``dtype``, e.g. ``"bfloat16"``): the parameters (the master weights, float32) and ``x`` are
    cast to ``dtype`` for the forward and backward passes; the loss is taken in float32 on the predictions cast
    up; the gradients come back cast to each parameter's own dtype. The model state (BatchNorm's running
    statistics) stays in its own dtype, and the norms compute their statistics in at least float32.
    """
    backprop.check_gradients(gradients)
    dtype = compute_dtype(dtype)
    loss_vjp = None
    if dtype is not None:
        loss_fn, loss_vjp = _float32_loss(loss_fn, hand_vjp=gradients != "autodiff")
    inner = backprop.loss_and_grads(model, loss_fn, gradients=gradients, loss_vjp=loss_vjp, remat=remat)
    if dtype is None:
        return lambda params, state, x, y, key: inner(params, state, x, y, key=key)

    def mixed(params, state, x, y, key):
        result = inner(cast_floating(params, dtype), state, x.astype(dtype), y, key=key)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), result.grads, params)
        return result._replace(grads=grads)

    return mixed


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


def train_step_function(model: Layer, options: StepOptions | None = None) -> Callable[..., tuple[TrainState, Metrics]]:
    """The train step of :func:`make_train_step` as a plain (not jit-compiled) function, to transform further:
    ``jax.vmap`` it over an ensemble, ``jax.jit`` it with shardings over a mesh (see :mod:`jaxcnn.distributed`).

    ``step(state, x, y, scale=None)``: a scalar ``scale`` multiplies the optimizer's updates, which sets an
    ensemble member's learning rate relative to the optimizer's (exactly so for the optax optimizers whose
    learning rate multiplies their final update: sgd, momentum, nesterov, adam, adamw, rmsprop).
    """
    options = StepOptions.of(options)
    loss_and_grads = loss_and_grads_fn(
        model, options.loss_fn, options.gradients, dtype=options.dtype, remat=options.remat
    )
    augmentation, scaling = options.augmentation, options.input_scaling
    if augmentation:
        from jaxcnn.data.augment import augment

    def step(state: TrainState, x: jax.Array, y: jax.Array, scale: Any = None) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(state.key, state.step)
        if scaling is not None:
            x = scaling(x)
        if augmentation:  # its own stream: the model's (dropout) key stays that of an unaugmented run
            x = augment(jax.random.fold_in(key, 1), x, **augmentation)
        result = loss_and_grads(state.params, state.model_state, x, y, key)
        updates, opt_state = state.optimizer_update(result.grads)
        if scale is not None:
            updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
        metrics = {"loss": result.loss, "count": jnp.asarray(x.shape[0], jnp.int32)}
        accuracy = accuracy_of(result.predictions, y)
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        if options.log_grad_norms:
            metrics.update(_norm_metrics(state.params, result.grads, updates))
        return state.apply_updates(updates, opt_state, model_state=result.state), metrics

    return step


def _norm_metrics(params: Params, grads: Params, updates: Params) -> Metrics:
    """Per layer: the gradient's norm, and the update's norm over the weights' (see :func:`layer_norms`)."""
    weights = layer_norms(params)
    ratios = {
        name: norm / jnp.maximum(weights[name], jnp.finfo(jnp.float32).tiny)
        for name, norm in layer_norms(updates).items()
    }
    return {"grad_norms": layer_norms(grads), "update_ratios": ratios}


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
    options: StepOptions | None = None,
    *,
    steps_per_call: int = 1,
    **fields: Any,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """A jit-compiled ``step(state, x, y) -> (new_state, metrics)``.

    The four steps of backpropagation in one XLA program: forward, loss, backward (as ``gradients`` says), and
    the update by the optimizer the state carries (``state.tx``, see :func:`create_train_state`). The incoming
    state's buffers are donated (do not reuse ``state`` after the call). Step ``s`` draws its randomness
    (dropout) from ``fold_in(state.key, s)``. Calls with the same shapes never recompile.

    ``steps_per_call=K > 1`` compiles K consecutive steps into one program with ``lax.scan``: ``x`` is then
    ``(K, N, *input_shape)``, ``y`` ``(K, N, ...)``, and every metric has a leading axis of K. It gives the same
    parameters as K single calls. Whether it is faster depends on the backend (see benchmarks/RESULTS.md: it
    pays on GPUs for small models; on XLA:CPU it is ~30x slower with autodiff gradients, as XLA:CPU leaves the
    transposed convolutions inside the loop on a naive kernel, so it warns there (:class:`ScanOnCPUWarning`);
    hand-derived gradients scan fine on CPU).

    Args:
      model: any :class:`jaxcnn.nn.Layer`.
      options: a :class:`StepOptions`; its fields may also be given (or overridden) as keywords:
        ``make_train_step(model, gradients="manual", dtype="bfloat16")``. ``loss_fn`` (default
        softmax cross-entropy), ``gradients`` (``"autodiff"``, ``"manual"`` or ``"engine"``), ``dtype``,
        ``remat``, ``log_grad_norms`` and ``augmentation``: see :class:`StepOptions`.
      steps_per_call: train steps per call (>= 1), scanned (see above).

    Returns:
      ``step(state, x, y)`` with ``x`` of shape ``(N, *input_shape)`` and ``y`` the targets (``(N,)`` integer
      labels in ``[0, C)`` for cross-entropy; the compiled step does not check them, as that would need a host
      sync per step: a label of -5 wraps around to a plausible loss, one of C or more gives NaN. :func:`fit`
      and :func:`evaluate` check them on the host, and so does :func:`jaxcnn.data.check_labels`).
      ``metrics`` stays on device: ``"loss"`` (the batch mean), ``"accuracy"`` (integer labels only) and
      ``"count"`` (N), each a scalar.
    """
    if not isinstance(options, (StepOptions, type(None))):
        raise TypeError(
            f"make_train_step takes the model and StepOptions; got {type(options).__name__} (the optimizer now "
            "lives in the state: create_train_state(model, optimizer, key, input_shape))"
        )
    if not is_int(steps_per_call) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}")
    options = StepOptions.of(options, **fields)
    step = train_step_function(model, options)
    if steps_per_call > 1 and scan_is_slow(options.gradients):
        warnings.warn(SCAN_ON_CPU, ScanOnCPUWarning, stacklevel=2)
    if steps_per_call == 1:
        return jit_train_step(step, donate_argnums=0)

    def steps(state: TrainState, xs: jax.Array, ys: jax.Array) -> tuple[TrainState, Metrics]:
        if xs.shape[0] != steps_per_call or ys.shape[0] != steps_per_call:
            raise ValueError(
                f"a {steps_per_call}-step call takes x and y with a leading axis of {steps_per_call}, "
                f"got x {tuple(xs.shape)} and y {tuple(ys.shape)}"
            )
        return jax.lax.scan(lambda carry, batch: step(carry, *batch), state, (xs, ys))

    return jit_train_step(steps, donate_argnums=0)
