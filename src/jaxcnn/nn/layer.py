"""The layer protocol, the custom_vjp bridge behind ``gradients="manual"``, and small shared helpers.

A layer is an immutable description (its hyperparameters); parameters and state live outside it, in plain
pytrees, so every model is a pure function. A layer provides four things:

* ``init(key, input_shape, *, dtype) -> (params, state)`` -- ``input_shape`` excludes the batch axis;
* ``output_shape(input_shape) -> shape`` -- shape inference without running data, validating the input;
* ``forward(params, x) -> (y, residuals)`` -- the forward pass, returning what its backward needs;
* ``backward(params, residuals, dy) -> (dx, dparams)`` -- the hand-derived backward pass.

Layers that keep state (running statistics) or need ``train`` / a random key override
``forward_with_state(params, state, x, *, train, key) -> (y, residuals, new_state)`` instead of ``forward``.
Everything else -- ``apply`` with both gradient modes, the explicit reverse pass in :mod:`jaxcnn.backprop` and
the checks in :mod:`jaxcnn.gradcheck` -- is derived from these methods, so a new layer needs nothing more.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxcnn._validate import is_int
from jaxcnn.nn.contract import BackwardError, check_backward_result

Params = Any  # a pytree of arrays; {} for a layer without parameters
State = Any  # a pytree of arrays; {} for a layer without state
Residuals = Any  # a pytree of arrays (and Static leaves) saved by forward for backward
Shape = tuple[int, ...]
Key = jax.Array | None  # a jax.random key, or None where a call draws no random numbers

GRADIENT_MODES = ("autodiff", "manual")


@jax.tree_util.register_static
class Static:
    """A hashable Python value carried through pytrees as static data (not an array), e.g. a saved shape."""

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Static) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"Static({self.value!r})"


class LayerCall(NamedTuple):
    """One leaf layer's call inside a model, as recorded by :meth:`Layer.trace` (used by the gradient checker).

    ``path`` names the layer inside the model (``"Conv_0"``, ``"block/Dense_1"``), and ``params``, ``state``,
    ``x`` and ``key`` are exactly what it received.
    """

    path: str
    layer: Layer
    params: Params
    state: State
    x: jax.Array
    key: jax.Array | None


def check_gradients_mode(gradients: str) -> None:
    """Raise ValueError unless ``gradients`` is ``"autodiff"`` or ``"manual"``."""
    if gradients not in GRADIENT_MODES:
        raise ValueError(f"`gradients` must be 'autodiff' or 'manual', got {gradients!r}")


def check_input_shape(input_shape: Any) -> Shape:
    """Normalise ``input_shape`` (batch axis excluded) to a tuple of positive ints."""
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise ValueError(f"`input_shape` must be a tuple of ints (batch axis excluded), got {input_shape!r}")
    if not all(is_int(n) and operator.index(n) >= 1 for n in input_shape):
        raise ValueError(f"`input_shape` must hold positive ints (batch axis excluded), got {input_shape!r}")
    return tuple(operator.index(n) for n in input_shape)


def check_key(key: Any, name: str = "key") -> None:
    """Raise ValueError unless ``key`` is a JAX random key (``jax.random.key(0)`` or ``jax.random.PRNGKey(0)``)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype == jnp.uint32 and getattr(key, "shape", None) == (2,):
        return
    raise ValueError(
        f"`{name}` must be a JAX random key such as jax.random.key(0) or jax.random.PRNGKey(0), got {key!r}"
    )


def check_param_keys(layer: str, params: Any, expected: Sequence[str]) -> None:
    """Raise ValueError unless ``params`` is a dict with exactly the keys ``expected``."""
    keys = sorted(params) if isinstance(params, dict) else None
    if keys != sorted(expected):
        raise ValueError(
            f"{layer} expects params with keys {sorted(expected)}, got {keys if keys is not None else params!r}"
        )


def kernel_and_bias(key: jax.Array, kernel_shape: Shape, use_bias: bool, dtype: Any) -> Params:
    """Flax's initial ``kernel`` (lecun-normal, fan-in = product of all but the last axis) and ``bias`` (zeros)."""
    params = {"kernel": jax.nn.initializers.lecun_normal()(key, tuple(kernel_shape), dtype)}
    if use_bias:
        params["bias"] = jnp.zeros((kernel_shape[-1],), dtype)
    return params


def rows(weights: jax.Array, like: jax.Array) -> jax.Array:
    """``weights`` ``(N,)`` shaped to scale the rows (examples) of ``like`` ``(N, ...)``, in its dtype."""
    return jnp.reshape(weights, (-1,) + (1,) * (jnp.ndim(like) - 1)).astype(jnp.result_type(like))


def weighted_kernel_grads(
    vjp: Any, params: Params, x: jax.Array, dy: jax.Array, weights: jax.Array, use_bias: bool
) -> Params:
    """``sum_i weights[i] * {"kernel": dw_i, "bias": db_i}`` for a layer whose kernel gradient is bilinear in its
    input ``x`` ``(N, ...)`` and output cotangent ``dy`` ``(N, ..., F)`` (dense, convolutions).

    ``dw(x, w * dy) = dw(w * x, dy)``, so the smaller of the two is scaled (a first convolution's input is far
    smaller than its output); the bias gradient is ``sum_i w_i sum_p dy_ip``. ``vjp(x, kernel, None, dy)`` is
    the layer's hand rule, returning ``(dx, dw, None)``; its ``dx`` goes unused (dropped under ``jax.jit``).
    """
    if jnp.size(x) < jnp.size(dy):
        _, dw, _ = vjp(x * rows(weights, x), params["kernel"], None, dy)
    else:
        _, dw, _ = vjp(x, params["kernel"], None, dy * rows(weights, dy))
    db = None
    if use_bias:
        db = jnp.einsum("npf,n->f", dy.reshape(dy.shape[0], -1, dy.shape[-1]), weights.astype(dy.dtype))
    return kernel_grads(params, dw, db, use_bias)


def kernel_grads(params: Params, dw: jax.Array, db: jax.Array, use_bias: bool) -> Params:
    """``{"kernel": dw, "bias": db}`` shaped like ``params`` (the bias gradient in the bias's dtype)."""
    grads = {"kernel": dw}
    if use_bias:
        grads["bias"] = db.astype(params["bias"].dtype)
    return grads


_PATH: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("jaxcnn_layer_path", default=())


@contextlib.contextmanager
def named(name: str) -> Iterator[None]:
    """Prefix a ValueError raised inside with the layer's name, so errors say where in a model they happened.

    Inside the block, :func:`layer_path` includes ``name``. A :class:`BackwardError` already names its layer's
    whole path and passes through unchanged.
    """
    token = _PATH.set((*_PATH.get(), name))
    try:
        yield
    except BackwardError:
        raise
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    finally:
        _PATH.reset(token)


def path_parts() -> tuple[str, ...]:
    """The names of the enclosing :func:`named` blocks, outermost first (``("block", "Conv_0")``)."""
    return _PATH.get()


def layer_path(name: str | None = None) -> str:
    """The path of the layer being run (``"block/Conv_0"``): the names of the enclosing :func:`named` blocks,
    then ``name`` when given."""
    parts = (*_PATH.get(), name) if name is not None else _PATH.get()
    return "/".join(parts)


class Layer:
    """Base class of every layer; see the module docstring for the protocol.

    ``name_prefix`` is the stem of the layer's automatic name inside a container (``Conv_0``, ``Dense_1``);
    it defaults to the class name and matches Flax linen's auto-names for layers with parameters, so that
    parameter trees line up with the equivalent Flax module's.
    """

    name_prefix: ClassVar[str | None] = None

    @classmethod
    def prefix(cls) -> str:
        return cls.name_prefix or cls.__name__

    # -- what a layer defines ------------------------------------------------------------------------------

    def init(self, key: jax.Array, input_shape: Shape, *, dtype: Any = jnp.float32) -> tuple[Params, State]:
        """Initial ``(params, state)`` for inputs of ``input_shape`` (batch axis excluded). Default: none."""
        check_key(key)
        self.output_shape(check_input_shape(input_shape))
        return {}, {}

    def output_shape(self, input_shape: Shape) -> Shape:
        """The output shape for ``input_shape`` (batch axis excluded). Default: unchanged (elementwise)."""
        return tuple(input_shape)

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, Residuals]:
        """``(y, residuals)`` for a batch ``x``; residuals are whatever :meth:`backward` needs."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(params, x) or forward_with_state")

    def backward(self, params: Params, residuals: Residuals, dy: jax.Array) -> tuple[jax.Array, Params]:
        """Hand-derived backward pass: ``(dx, dparams)`` from the output cotangent ``dy``.

        ``dparams`` has the structure of ``params`` (``{}`` for a layer without parameters).
        """
        raise NotImplementedError(f"{type(self).__name__} must define backward(params, residuals, dy)")

    def forward_with_state(
        self, params: Params, state: State, x: jax.Array, *, train: bool = False, key: jax.Array | None = None
    ) -> tuple[jax.Array, Residuals, State]:
        """``(y, residuals, new_state)``; the default calls :meth:`forward` and passes ``state`` through."""
        y, residuals = self.forward(params, x)
        return y, residuals, state

    def per_example_sq_norms(
        self, params: Params, residuals: Residuals, dy: jax.Array, *, method: str = "auto"
    ) -> jax.Array:
        """The squared norm of each example's parameter gradient, ``(N,)``, from the saved ``residuals`` and the
        output cotangent ``dy`` ``(N, ...)``, without forming the per-example gradients where that is cheaper
        (:mod:`jaxcnn.functional.ghost`; ``method`` is ``"auto"``, ``"ghost"`` or ``"direct"`` there).

        DP-SGD's ghost clipping (:func:`jaxcnn.train.dp.clipped_grad_sum`) calls it for every layer with
        parameters. The default serves layers without parameters (zeros); a layer with parameters defines it
        next to its ``backward``, or DP-SGD with ``method="ghost"`` refuses the model naming the layer.
        """
        if not jax.tree.leaves(params):
            return jnp.zeros(jnp.shape(dy)[:1], jnp.result_type(dy))
        raise NotImplementedError(f"{type(self).__name__} has parameters but no per_example_sq_norms rule")

    def weighted_param_grads(self, params: Params, residuals: Residuals, dy: jax.Array, weights: jax.Array) -> Params:
        """``sum_i weights[i] * dparams_i``: the parameter gradient with example ``i``'s contribution scaled by
        ``weights`` ``(N,)`` (DP-SGD's clipped sum, by book-keeping). ``dy`` is ``(N, ...)``.

        The default runs :meth:`backward` on ``dy`` with each example's rows scaled, exact for every layer (each
        example's parameter gradient is linear in its own cotangent rows); its ``dx`` goes unused, and under
        ``jax.jit`` XLA drops it. Layers whose weight gradient is also linear in their input scale whichever of
        the two is smaller (:func:`weighted_kernel_grads`).
        """
        return self.backward(params, residuals, dy * rows(weights, dy))[1]

    # -- what every layer gets -----------------------------------------------------------------------------

    def apply(
        self,
        params: Params,
        state: State,
        x: jax.Array,
        *,
        train: bool = False,
        key: jax.Array | None = None,
        gradients: str = "autodiff",
    ) -> tuple[jax.Array, State]:
        """Run the layer on a batch: ``(y, new_state)``.

        Args:
          params, state: as returned by :meth:`init`.
          x: a batch, ``(N, *input_shape)``.
          train: training mode (dropout active, batch statistics used); False for evaluation.
          key: a ``jax.random`` key, needed only by layers that draw random numbers in training.
          gradients: ``"autodiff"`` differentiates the forward with JAX; ``"manual"`` routes the layer through
            ``jax.custom_vjp`` so that ``jax.grad`` (and jit, vmap, sharding) use the hand-derived backward.
        """
        check_gradients_mode(gradients)
        if gradients == "manual":
            return manual_apply(self, params, state, x, train=train, key=key)
        y, _, new_state = self.forward_with_state(params, state, x, train=train, key=key)
        return y, new_state

    def trace(
        self, params: Params, state: State, x: jax.Array, *, train: bool = False, key: Key = None, path: str = ""
    ) -> tuple[jax.Array, State, list[LayerCall]]:
        """Run forward and record every leaf layer's call: ``(y, new_state, calls)``. Containers recurse."""
        y, _, new_state = self.forward_with_state(params, state, x, train=train, key=key)
        return y, new_state, [LayerCall(path or self.prefix(), self, params, state, x, key)]


def manual_apply(
    layer: Layer,
    params: Params,
    state: State,
    x: jax.Array,
    *,
    train: bool = False,
    key: jax.Array | None = None,
) -> tuple[jax.Array, State]:
    """Apply ``layer`` through ``jax.custom_vjp`` whose backward is the layer's hand-derived ``backward``.

    ``state`` and ``key`` pass through as non-differentiable inputs (zero cotangents); the cotangent of the new
    state is ignored, as running statistics are not differentiated.
    """
    x_dtype = jnp.result_type(x)
    x_shape = tuple(jnp.shape(x))
    path = layer_path() or layer.prefix()  # while tracing the forward, inside the container's named() blocks

    @jax.custom_vjp
    def run(params, state, x, key):
        y, _, new_state = layer.forward_with_state(params, state, x, train=train, key=key)
        return y, new_state

    def run_forward(params, state, x, key):
        y, residuals, new_state = layer.forward_with_state(params, state, x, train=train, key=key)
        return (y, new_state), (params, residuals)

    def run_backward(saved, cotangents):
        params, residuals = saved
        dy, _ = cotangents
        # shape mistakes in a user's backward name the layer here, not in a pytree error below
        checked_shape = x_shape if jnp.issubdtype(x_dtype, jnp.inexact) else None
        dx, dparams = check_backward_result(path, layer.backward(params, residuals, dy), params, checked_shape)
        # cotangents come back in the dtypes of their primals (a rule may compute in a promoted dtype)
        dparams = jax.tree.map(lambda g, p: jnp.asarray(g).astype(jnp.result_type(p)), dparams, params)
        if jnp.issubdtype(x_dtype, jnp.inexact):
            dx = dx.astype(x_dtype)
        return dparams, None, dx, None

    run.defvjp(run_forward, run_backward)
    return run(params, state, x, key)


def layer_key(key: jax.Array | None, index: int) -> jax.Array | None:
    """The key of a container's ``index``-th child: ``fold_in(key, index)``, or None without a key."""
    return None if key is None else jax.random.fold_in(key, index)
