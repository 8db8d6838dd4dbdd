"""What a :class:`~jaxcnn.train.config.Config` makes of its optimizer fields: the optax transform, its
learning-rate schedule, the leaves weight decay applies to, and the loss of the train and eval steps."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from jaxcnn.functional import softmax_cross_entropy

if TYPE_CHECKING:
    from jaxcnn.train.config import Config


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the step count (always a function, so optimizer state has one shape).

    ``"exponential"`` multiplies the rate by ``decay_rate`` after every epoch; ``"cosine"`` and
    ``"warmup_cosine"`` decay to 0 over ``(schedule_epochs or epochs) * steps_per_epoch`` steps, the warm-up
    capped below that. The rate comes out as float32 in every mode, so 64-bit mode cannot change the update.
    """
    total = (config.schedule_epochs or config.epochs) * steps_per_epoch
    if config.schedule == "constant":
        schedule = optax.constant_schedule(config.learning_rate)
    elif config.schedule == "exponential":
        schedule = optax.exponential_decay(
            config.learning_rate, transition_steps=steps_per_epoch, decay_rate=config.decay_rate, staircase=True
        )
    elif config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(config.learning_rate, decay_steps=total)
    else:
        warmup = min(config.warmup_epochs * steps_per_epoch, total - 1)
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup, decay_steps=total, end_value=0.0
        )
    return lambda count: jnp.asarray(schedule(count), jnp.float32)


def decayed_leaves(params: Any) -> Any:
    """The parameters that weight decay applies to without ``decay_norms_and_biases``: a tree of bools shaped
    like ``params``, True for arrays of 2 or more dimensions (conv and dense kernels), False for vectors and
    scalars (biases; the scales and offsets of BatchNorm, GroupNorm and LayerNorm)."""
    return jax.tree.map(lambda leaf: jnp.ndim(leaf) >= 2, params)


def _decay_everything(params: Any) -> Any:
    return jax.tree.map(lambda leaf: True, params)


def make_optimizer(config: Config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transform named by ``config.optimizer`` with its schedule: ``(optimizer, schedule)``.

    Weight decay is decoupled for ``"adamw"`` and an L2 term added to the gradient (``add_decayed_weights``)
    for the others, on the leaves :func:`decayed_leaves` picks unless ``decay_norms_and_biases``; it is always
    part of the chain, and always masked (by a mask of all True when every leaf is decayed), so the optimizer
    state keeps one structure whatever the values of the two fields (the mask's state holds no arrays, so
    checkpoints of runs before the field existed restore too).
    """
    schedule = make_schedule(config, steps_per_epoch)
    rate, momentum, decay = schedule, config.momentum, config.weight_decay
    mask = _decay_everything if config.decay_norms_and_biases else decayed_leaves
    if config.optimizer == "adamw":
        return optax.adamw(rate, weight_decay=decay, mask=mask), schedule
    base = {
        "sgd": lambda: optax.sgd(rate),
        "momentum": lambda: optax.sgd(rate, momentum=momentum),
        "nesterov": lambda: optax.sgd(rate, momentum=momentum, nesterov=True),
        "adam": lambda: optax.adam(rate),
        "rmsprop": lambda: optax.rmsprop(rate, momentum=momentum or None),
    }[config.optimizer]()
    return optax.chain(optax.add_decayed_weights(decay, mask=mask), base), schedule


def make_loss(config: Config) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The loss ``loss(logits, labels)`` of ``config``'s train and eval steps: the softmax cross-entropy, with
    ``label_smoothing`` bound when it is not 0 (a ``functools.partial``, whose hand-derived VJP
    :func:`jaxcnn.backprop.loss_vjp_of` finds)."""
    if config.label_smoothing == 0:
        return softmax_cross_entropy
    return functools.partial(softmax_cross_entropy, label_smoothing=config.label_smoothing)
