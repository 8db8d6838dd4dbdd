"""Pure array ops, each forward next to its hand-derived VJP.

Every ``NAME_vjp`` is written with ``jax.numpy`` / ``jax.lax`` only (never ``jax.vjp``, ``jax.grad`` or any
other differentiation transform: those are what the rules are checked against). Images are NHWC, kernels HWIO.
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
    batch_norm,
    batch_norm_vjp,
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
    "HandRule",
    "avg_pool2d",
    "avg_pool2d_vjp",
    "batch_norm",
    "batch_norm_vjp",
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
