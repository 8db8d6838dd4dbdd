"""The train and eval steps compiled for a device mesh (data parallelism, one program over many devices).

The state is replicated and the batch sharded along the mesh's ``"data"`` axis (:mod:`jaxcnn.distributed`);
XLA partitions the ordinary step and all-reduces the gradients. BatchNorm's batch statistics need nothing
special: the step computes the mean over the global batch, which XLA turns into an all-reduce across devices, so
the statistics are those of the whole batch, as on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from jaxcnn._step_jit import jit_train_step
from jaxcnn.distributed import replicated
from jaxcnn.functional import softmax_cross_entropy
from jaxcnn.nn.layer import Layer
from jaxcnn.train.evaluate import eval_step_function
from jaxcnn.train.state import TrainState
from jaxcnn.train.step import InputScaling, LossFn, Metrics, StepOptions, train_step_function

__all__ = ["make_data_parallel_eval_step", "make_data_parallel_train_step"]


def make_data_parallel_train_step(
    model: Layer, mesh: Mesh, options: StepOptions | None = None, **fields: Any
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """The train step of :func:`jaxcnn.train.make_train_step`, compiled for ``mesh``: ``step(state, x, y)`` with
    ``state`` replicated (:func:`jaxcnn.distributed.replicate`) and ``x``, ``y`` sharded along the batch
    (:func:`jaxcnn.distributed.shard_batch`). ``options`` and ``fields``: as for ``make_train_step``.

    The code is the single-device step's: XLA partitions it, all-reducing the gradients (and BatchNorm's batch
    moments) across devices, so the result is that of the whole batch on one device, up to the order of float
    additions. The new state and the metrics come back replicated.
    """
    step = train_step_function(model, StepOptions.of(options, **fields))
    placed = replicated(mesh)
    return jit_train_step(lambda state, x, y: step(state, x, y), donate_argnums=0, out_shardings=(placed, placed))


def make_data_parallel_eval_step(
    model: Layer,
    mesh: Mesh,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    input_scaling: InputScaling | None = None,
    masked: bool = False,
) -> Callable:
    """:func:`jaxcnn.train.make_eval_step` compiled for ``mesh``: sharded batches in, replicated sums out
    (``input_scaling`` and ``masked`` as there)."""
    step = eval_step_function(model, loss_fn=loss_fn, input_scaling=input_scaling, masked=masked)
    return jax.jit(step, out_shardings=replicated(mesh))
