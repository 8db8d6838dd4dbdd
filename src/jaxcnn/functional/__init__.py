"""Pure array ops, each forward next to its hand-derived VJP.

Every ``NAME_vjp`` is written with ``jax.numpy`` / ``jax.lax`` only (never ``jax.vjp``, ``jax.grad`` or any
other differentiation transform: those are what the rules are checked against). Images are NHWC, kernels HWIO.
Forward ops keep ``jax.lax``'s conventions.

Every VJP follows one calling convention::

    NAME_vjp(*primals, dy, **options)

- ``primals`` are exactly the forward's positional array arguments, in the forward's order, optional ones
  included: pass None where the forward got none (``conv2d_vjp(x, w, None, dy, stride=2)`` for a
  ``conv2d(x, w, stride=2)`` without bias).
- ``dy``, the cotangent of the output, comes right after them, positionally. For the scalar losses it defaults
  to 1.
- Every non-array argument of the forward (``window``, ``stride``, ``padding``, ``rate``, ``negative_slope``,
  ``scale``, ``epsilon``, ...) is keyword-only, with the forward's name and default. A PRNG key is always the
  keyword ``key=`` (``dropout_vjp(x, dy, rate=0.5, key=key)``). VJP-only knobs have defaults
  (``conv2d_vjp(..., dw_method="auto")``).
- The result is one cotangent per primal, in order, each in its primal's dtype: a tuple when the forward has
  several array arguments (``conv2d_vjp -> (dx, dw, db)``), the bare array when it has one
  (``relu_vjp(x, dy) -> dx``). An optional primal that was None gets None; so does one that is not
  differentiated: integer class labels (``softmax_cross_entropy_vjp -> (dlogits, None)``) and batch norm's
  running statistics (state). ``mean_squared_error_vjp`` returns ``(dpredictions, -dpredictions)``: the loss
  depends on the difference of its two arguments only.

:func:`register` takes an op and its VJP in this convention (``register(my_op, my_op_vjp)``; it refuses, in one
line, a VJP whose signature does not fit the op's) and derives from the two signatures the uniform call that the
gradient checker and the explicit reverse pass use, :attr:`HandRule.vjp`.
"""

from jaxcnn.functional._registry import HandRule, hand_rule, register, registered_ops
from jaxcnn.functional.activations import (
    elu,
    elu_vjp,
    gelu,
    gelu_vjp,
    leaky_relu,
    leaky_relu_vjp,
    relu,
    relu_vjp,
    sigmoid,
    sigmoid_vjp,
    softplus,
    softplus_vjp,
    tanh,
    tanh_vjp,
)
from jaxcnn.functional.conv import conv2d, conv2d_vjp
from jaxcnn.functional.conv_transpose import conv_transpose2d, conv_transpose2d_vjp
from jaxcnn.functional.dense import dense, dense_vjp
from jaxcnn.functional.dropout import dropout, dropout_mask, dropout_vjp
from jaxcnn.functional.losses import (
    log_softmax,
    mean_squared_error,
    mean_squared_error_vjp,
    softmax_cross_entropy,
    softmax_cross_entropy_vjp,
)
from jaxcnn.functional.norm import (
    BatchStatistics,
    batch_norm,
    batch_norm_vjp,
    batch_norm_with_stats,
    group_norm,
    group_norm_vjp,
    layer_norm,
    layer_norm_vjp,
)
from jaxcnn.functional.pool import (
    avg_pool2d,
    avg_pool2d_vjp,
    global_avg_pool2d,
    global_avg_pool2d_vjp,
    max_pool2d,
    max_pool2d_vjp,
)
from jaxcnn.functional.resample import upsample_nearest2d, upsample_nearest2d_vjp
from jaxcnn.functional.rnn import elman_rnn, elman_rnn_vjp

__all__ = [
    "BatchStatistics",
    "HandRule",
    "avg_pool2d",
    "avg_pool2d_vjp",
    "batch_norm",
    "batch_norm_vjp",
    "batch_norm_with_stats",
    "conv2d",
    "conv2d_vjp",
    "conv_transpose2d",
    "conv_transpose2d_vjp",
    "dense",
    "dense_vjp",
    "dropout",
    "dropout_mask",
    "dropout_vjp",
    "elman_rnn",
    "elman_rnn_vjp",
    "elu",
    "elu_vjp",
    "gelu",
    "gelu_vjp",
    "global_avg_pool2d",
    "global_avg_pool2d_vjp",
    "group_norm",
    "group_norm_vjp",
    "hand_rule",
    "layer_norm",
    "layer_norm_vjp",
    "leaky_relu",
    "leaky_relu_vjp",
    "log_softmax",
    "max_pool2d",
    "max_pool2d_vjp",
    "mean_squared_error",
    "mean_squared_error_vjp",
    "register",
    "registered_ops",
    "relu",
    "relu_vjp",
    "sigmoid",
    "sigmoid_vjp",
    "softmax_cross_entropy",
    "softmax_cross_entropy_vjp",
    "softplus",
    "softplus_vjp",
    "tanh",
    "tanh_vjp",
    "upsample_nearest2d",
    "upsample_nearest2d_vjp",
]
