"""The train state: everything a step reads and writes, as one pytree, with the optimizer that updates it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxcnn.nn.layer import Layer, Params, Shape, State, check_input_shape, check_key


@struct.dataclass
class TrainState:
    """One training run's state, a pytree (``jax.jit`` takes and returns it whole), shaped like Flax's.

    Like ``flax.training.train_state.TrainState``, it carries its optimizer (``tx``, a static field: part of
    the tree's structure, not a leaf) and updates itself with :meth:`apply_gradients`, so a train step never
    needs the optimizer passed separately. It adds what a CNN run needs besides: the model's state and the
    run's random key.

    Attributes:
      params: the model parameters (a pytree of arrays, as ``model.init`` returns them).
      model_state: the model's non-trained state (running statistics), ``{}`` when it has none.
      opt_state: the optax optimizer state (``tx.init(params)``).
      step: the number of steps taken, an int32 scalar.
      key: the run's base random key; step ``s`` draws from ``fold_in(key, s)`` and the data order of epoch ``e``
        from ``fold_in(data_key(key), e)``, so a resumed run repeats an uninterrupted one bit for bit.
    """

    params: Params
    model_state: State
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def optimizer_update(self, grads: Params) -> tuple[Params, optax.OptState]:
        """The optimizer's ``(updates, new_opt_state)`` for ``grads`` (shaped like ``params``), not yet applied."""
        return self.tx.update(grads, self.opt_state, self.params)

    def apply_gradients(self, *, grads: Params, **changes: Any) -> TrainState:
        """The state after one optimizer step on ``grads`` (shaped like ``params``): new ``params`` and
        ``opt_state``, ``step + 1``, and any other field given in ``changes`` (``model_state=...``)."""
        updates, opt_state = self.optimizer_update(grads)
        return self.apply_updates(updates, opt_state, **changes)

    def apply_updates(self, updates: Params, opt_state: optax.OptState, **changes: Any) -> TrainState:
        """The state with ``updates`` (from :meth:`optimizer_update`) added to ``params``, ``opt_state`` set
        and ``step + 1``, plus the fields in ``changes``."""
        params = optax.apply_updates(self.params, updates)
        return self.replace(params=params, opt_state=opt_state, step=self.step + 1, **changes)


def as_typed_key(key: Any) -> jax.Array:
    """``key`` as a typed key array (``jax.random.key``), accepting legacy ``PRNGKey`` uint32 pairs too."""
    check_key(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def create_train_state(
    model: Layer,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    input_shape: Shape,
    *,
    dtype: Any = jnp.float32,
) -> TrainState:
    """Initialise parameters, model state and optimizer state.

    Args:
      model: any :class:`jaxcnn.nn.Layer`.
      optimizer: any optax ``GradientTransformation``; the state keeps it as ``tx``.
      key: a JAX random key; split into the initialisation key and the run's base key.
      input_shape: one example's shape, batch axis excluded, e.g. ``(28, 28, 1)``.
      dtype: the parameters' dtype.

    Returns:
      A :class:`TrainState` at step 0.
    """
    init_key, run_key = jax.random.split(as_typed_key(key))
    params, model_state = model.init(init_key, check_input_shape(input_shape), dtype=dtype)
    return TrainState(
        params=params,
        model_state=model_state,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=run_key,
        tx=optimizer,
    )


def data_key(key: jax.Array) -> jax.Array:
    """The base key of the data order, derived from a run's base key (independent of the step keys)."""
    return jax.random.split(key)[1]
