"""Normalisation layers: BatchNorm (running statistics in the model state), LayerNorm and GroupNorm.

Parameter and state names follow Flax linen (``scale``, ``bias``; BatchNorm's ``mean`` and ``var`` in the
state, which Flax calls the ``batch_stats`` collection), so the same variables run in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

import jaxcnn.functional as F
from jaxcnn._validate import positive_int
from jaxcnn.functional import ghost
from jaxcnn.nn.layer import Layer, Params, Shape, State, Static, check_input_shape, check_key, check_param_keys


def _check_number(layer: str, name: str, value: Any, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        bounds = f"in [{low}, {high}]" if high != math.inf else f">= {low}"
        raise ValueError(f"{layer}: `{name}` must be a number {bounds}, got {value!r}")
    return float(value)


class _Normalization(Layer):
    """Shared parts: optional ``scale`` (ones) and ``bias`` (zeros) over the last (feature) axis. Subclasses are
    frozen dataclasses with the fields ``epsilon``, ``use_scale`` and ``use_bias``; ``bounds`` gives the range of
    each number field, checked at construction."""

    epsilon: float
    use_scale: bool
    use_bias: bool
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"epsilon": (0.0, math.inf)}

    def __post_init__(self) -> None:
        for name, (low, high) in self.bounds.items():
            object.__setattr__(self, name, _check_number(type(self).__name__, name, getattr(self, name), low, high))

    def _param_names(self) -> list[str]:
        return [name for name, used in (("scale", self.use_scale), ("bias", self.use_bias)) if used]

    def _init_params(self, features: int, dtype: Any) -> Params:
        params = {}
        if self.use_scale:
            params["scale"] = jnp.ones((features,), dtype)
        if self.use_bias:
            params["bias"] = jnp.zeros((features,), dtype)
        return params

    def _check(self, params: Params, x: jax.Array) -> None:
        name = type(self).__name__
        check_param_keys(name, params, self._param_names())
        for value in params.values():
            if x.ndim < 2 or value.shape != (x.shape[-1],):
                raise ValueError(
                    f"{name} expects input (N, ..., {value.shape[0] if value.ndim == 1 else '?'}), got {tuple(x.shape)}"
                )

    def _grads(self, params: Params, dscale: jax.Array | None, dbias: jax.Array | None) -> Params:
        grads = {}
        if self.use_scale:
            grads["scale"] = dscale.astype(params["scale"].dtype)
        if self.use_bias:
            grads["bias"] = dbias.astype(params["bias"].dtype)
        return grads


class BatchNormResiduals(NamedTuple):
    x: jax.Array  # the layer's input
    mean: jax.Array  # the running statistics the forward read (used in inference mode)
    var: jax.Array
    train: Static  # whether the forward used batch statistics
    stats: F.BatchStatistics | None = None  # training mode: the batch (mean, inv_std) it normalised with


@dataclass(frozen=True)
class BatchNorm(_Normalization):
    """Batch normalisation over every axis but the last, with running statistics in the model state.

    Training mode normalises with the batch's mean and biased variance and updates the state
    (``mean <- momentum * mean + (1 - momentum) * batch_mean``, likewise ``var``); inference mode normalises
    with the running statistics. Parameters ``scale``, ``bias``; state ``mean`` (zeros), ``var`` (ones).

    The running variance blends the *biased* batch variance (divided by ``N``, the count of values per
    channel), as Flax does; PyTorch blends the unbiased one (divided by ``N - 1``), so the two drift apart by
    a factor ``N / (N - 1)`` on small batches. The running statistics are state, not parameters: in
    ``gradients="manual"`` mode (and in the engine) they get a zero gradient, where ``"autodiff"`` would
    differentiate through them if a loss depended on them (in inference mode).

    Args:
      momentum: the running statistics' decay, in [0, 1]; Flax's default 0.99 (PyTorch's ``momentum=0.1`` is
        ``momentum=0.9`` here, the value the built-in models use).
      epsilon: added to the variance (>= 0).
      use_scale, use_bias: learn a per-channel scale and bias.

    The defaults are ``flax.linen.BatchNorm``'s. Input ``(N, ..., C)``; output the same shape.
    """

    momentum: float = 0.99
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True

    bounds: ClassVar[dict[str, tuple[float, float]]] = {"momentum": (0.0, 1.0), "epsilon": (0.0, math.inf)}

    def init(self, key: jax.Array, input_shape: Shape, *, dtype: Any = jnp.float32) -> tuple[Params, State]:
        check_key(key)
        features = check_input_shape(input_shape)[-1]
        state = {"mean": jnp.zeros((features,), dtype), "var": jnp.ones((features,), dtype)}
        return self._init_params(features, dtype), state

    def forward_with_state(
        self, params: Params, state: State, x: jax.Array, *, train: bool = False, key: jax.Array | None = None
    ) -> tuple[jax.Array, BatchNormResiduals, State]:
        self._check(params, x)
        check_param_keys("BatchNorm state", state, ["mean", "var"])
        y, mean, var, stats = F.batch_norm_with_stats(
            x,
            params.get("scale"),
            params.get("bias"),
            state["mean"],
            state["var"],
            train=train,
            momentum=self.momentum,
            epsilon=self.epsilon,
        )
        new_state = {"mean": mean.astype(state["mean"].dtype), "var": var.astype(state["var"].dtype)}
        return y, BatchNormResiduals(x, state["mean"], state["var"], Static(bool(train)), stats), new_state

    def backward(self, params: Params, residuals: BatchNormResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        dx, dscale, dbias, _, _ = F.batch_norm_vjp(
            residuals.x,
            params.get("scale"),
            params.get("bias"),
            residuals.mean,
            residuals.var,
            dy,
            train=residuals.train.value,
            momentum=self.momentum,
            epsilon=self.epsilon,
            stats=residuals.stats,
        )
        return dx, self._grads(params, dscale, dbias)


class NormResiduals(NamedTuple):
    x: jax.Array  # the layer's input


@dataclass(frozen=True)
class LayerNorm(_Normalization):
    """Layer normalisation over the last axis of each example (Flax linen's ``LayerNorm`` defaults).

    Parameters ``scale`` (ones) and ``bias`` (zeros) of shape ``(C,)``. Input ``(N, ..., C)``; output the same.
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True

    def init(self, key: jax.Array, input_shape: Shape, *, dtype: Any = jnp.float32) -> tuple[Params, State]:
        check_key(key)
        return self._init_params(check_input_shape(input_shape)[-1], dtype), {}

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, NormResiduals]:
        self._check(params, x)
        return F.layer_norm(x, params.get("scale"), params.get("bias"), epsilon=self.epsilon), NormResiduals(x)

    def backward(self, params: Params, residuals: NormResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        dx, dscale, dbias = F.layer_norm_vjp(
            residuals.x, params.get("scale"), params.get("bias"), dy, epsilon=self.epsilon
        )
        return dx, self._grads(params, dscale, dbias)

    def per_example_sq_norms(
        self, params: Params, residuals: NormResiduals, dy: jax.Array, *, method: str = "auto"
    ) -> jax.Array:
        # each example's statistics are its own: exact per-example sums of dy * xhat and dy over its positions
        options = dict(scale=self.use_scale, bias=self.use_bias, epsilon=self.epsilon)
        return ghost.layer_norm_sq_norms(residuals.x, dy, **options)


@dataclass(frozen=True)
class GroupNorm(_Normalization):
    """Group normalisation (Flax linen's ``GroupNorm(num_groups=groups)``): each example's channels split into
    ``groups`` groups, each normalised over its channels and all spatial positions.

    Parameters ``scale`` (ones) and ``bias`` (zeros) of shape ``(C,)``; ``C`` must be divisible by ``groups``.
    Input ``(N, ..., C)``; output the same shape.
    """

    groups: int = 32
    epsilon: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "groups", positive_int(self.groups, "groups"))

    def output_shape(self, input_shape: Shape) -> Shape:
        if not input_shape or input_shape[-1] % self.groups:
            raise ValueError(
                f"GroupNorm: channels (={input_shape[-1] if input_shape else None}) must be divisible by "
                f"`groups` (={self.groups})"
            )
        return tuple(input_shape)

    def init(self, key: jax.Array, input_shape: Shape, *, dtype: Any = jnp.float32) -> tuple[Params, State]:
        check_key(key)
        shape = self.output_shape(check_input_shape(input_shape))
        return self._init_params(shape[-1], dtype), {}

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, NormResiduals]:
        self._check(params, x)
        y = F.group_norm(x, params.get("scale"), params.get("bias"), groups=self.groups, epsilon=self.epsilon)
        return y, NormResiduals(x)

    def backward(self, params: Params, residuals: NormResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        dx, dscale, dbias = F.group_norm_vjp(
            residuals.x, params.get("scale"), params.get("bias"), dy, groups=self.groups, epsilon=self.epsilon
        )
        return dx, self._grads(params, dscale, dbias)

    def per_example_sq_norms(
        self, params: Params, residuals: NormResiduals, dy: jax.Array, *, method: str = "auto"
    ) -> jax.Array:
        # each example's group statistics are its own: exact per-example sums, as for LayerNorm
        options = dict(groups=self.groups, scale=self.use_scale, bias=self.use_bias, epsilon=self.epsilon)
        return ghost.group_norm_sq_norms(residuals.x, dy, **options)
