"""Forwards and hand VJPs against an independent framework's autograd: PyTorch, float64.

Skipped when PyTorch is not installed (it is an optional test oracle, never a dependency of jaxcnn).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn.functional as F
from conftest import normal, relative_error
from op_cases import CONV_CASES, POOL_CASES

torch = pytest.importorskip("torch")
TF = torch.nn.functional
# float64, but PyTorch is another library: its convolutions and pools sum the taps in another order
TOLERANCE = 1e-9


def t(array):
    return torch.tensor(np.asarray(array, np.float64), requires_grad=True)


def nchw(x):
    return x.permute(0, 3, 1, 2)


def nhwc(x):
    return x.permute(0, 2, 3, 1)


def explicit(padding, size, kernel, stride, dilation):
    """Padding ((top, bottom), (left, right)) computed independently of jaxcnn (SAME as TensorFlow/XLA define it)."""
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":
        pads = []
        for n, k, s, d in zip(size, kernel, stride, dilation, strict=True):
            out = math.ceil(n / s)
            total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return padding


def two(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.sample(4)
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"conv{i}" for i in range(len(CONV_CASES))])
def test_conv2d_against_torch(case):
    batch, h, w, c, f, kernel, stride, padding, dilation, groups, bias = case
    x, k, b = normal(0, (batch, h, w, c)), normal(1, (*kernel, c // groups, f)), normal(2, (f,))
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    forward = jax.jit(lambda x, k, b: F.conv2d(x, k, b, **options))
    y = forward(x, k, b if bias else None)
    dy = normal(3, y.shape)
    dx, dk, db = jax.jit(lambda x, k, b, dy: F.conv2d_vjp(x, k, b, dy, **options))(x, k, b, dy)

    (top, bottom), (left, right) = explicit(padding, (h, w), kernel, two(stride), two(dilation))
    xt, kt, bt = t(x), t(k), t(b)
    padded = TF.pad(nchw(xt), (left, right, top, bottom))
    yt = nhwc(
        TF.conv2d(
            padded,
            kt.permute(3, 2, 0, 1).contiguous(),
            bt if bias else None,
            stride=two(stride),
            dilation=two(dilation),
            groups=groups,
        )
    )
    yt.backward(torch.tensor(np.asarray(dy)))
    assert relative_error(y, yt.detach().numpy()) <= TOLERANCE
    assert relative_error(dx, xt.grad.numpy()) <= TOLERANCE
    assert relative_error(dk, kt.grad.numpy()) <= TOLERANCE
    if bias:
        assert relative_error(db, bt.grad.numpy()) <= TOLERANCE


@pytest.mark.parametrize("case", POOL_CASES, ids=[f"pool{i}" for i in range(len(POOL_CASES))])
def test_pools_against_torch(case):
    batch, h, w, c, window, stride, padding = case
    window = two(window)
    stride = window if stride is None else two(stride)
    x = normal(0, (batch, h, w, c))
    (top, bottom), (left, right) = explicit(padding, (h, w), window, stride, (1, 1))

    def ours(forward, rule):
        return (
            jax.jit(lambda x: forward(x, window, stride, padding)),
            jax.jit(lambda x, dy: rule(x, dy, window=window, stride=stride, padding=padding)),
        )

    # max: pad with -inf, then torch's max pool
    forward, rule = ours(F.max_pool2d, F.max_pool2d_vjp)
    y = forward(x)
    dy = normal(1, y.shape)
    xt = t(x)
    yt = nhwc(TF.max_pool2d(TF.pad(nchw(xt), (left, right, top, bottom), value=-math.inf), window, stride))
    yt.backward(torch.tensor(np.asarray(dy)))
    assert relative_error(y, yt.detach().numpy()) <= TOLERANCE
    assert relative_error(rule(x, dy), xt.grad.numpy()) <= TOLERANCE

    # average over real cells: window sums of the zero-padded input over window sums of a padded ones mask
    forward, rule = ours(F.avg_pool2d, F.avg_pool2d_vjp)
    y = forward(x)
    xt = t(x)
    pads = (left, right, top, bottom)
    sums = TF.avg_pool2d(TF.pad(nchw(xt), pads), window, stride) * (window[0] * window[1])
    counts = TF.avg_pool2d(TF.pad(torch.ones_like(nchw(xt)), pads), window, stride) * (window[0] * window[1])
    yt = nhwc(sums / counts)
    yt.backward(torch.tensor(np.asarray(dy)))
    assert relative_error(y, yt.detach().numpy()) <= TOLERANCE
    assert relative_error(rule(x, dy), xt.grad.numpy()) <= TOLERANCE


def test_global_avg_pool_and_dense_against_torch():
    x = normal(0, (3, 4, 5, 6))
    xt = t(x)
    yt = nchw(xt).mean(dim=(2, 3))
    dy = normal(1, (3, 6))
    yt.backward(torch.tensor(np.asarray(dy)))
    assert relative_error(F.global_avg_pool2d(x), yt.detach().numpy()) <= TOLERANCE
    assert relative_error(F.global_avg_pool2d_vjp(x, dy), xt.grad.numpy()) <= TOLERANCE

    x, w, b = normal(2, (4, 7)), normal(3, (7, 5)), normal(4, (5,))
    xt, wt, bt = t(x), t(w), t(b)
    yt = TF.linear(xt, wt.T, bt)
    dy = normal(5, (4, 5))
    yt.backward(torch.tensor(np.asarray(dy)))
    assert relative_error(F.dense(x, w, b), yt.detach().numpy()) <= TOLERANCE
    for ours, theirs in zip(F.dense_vjp(x, w, b, dy), (xt.grad, wt.grad, bt.grad), strict=True):
        assert relative_error(ours, theirs.numpy()) <= TOLERANCE


ACTIVATIONS = [
    ("relu", {}, lambda v: torch.relu(v)),
    ("leaky_relu", {"negative_slope": 0.1}, lambda v: TF.leaky_relu(v, 0.1)),
    ("elu", {"alpha": 0.7}, lambda v: TF.elu(v, 0.7)),
    ("gelu", {"approximate": True}, lambda v: TF.gelu(v, approximate="tanh")),
    ("gelu", {"approximate": False}, lambda v: TF.gelu(v, approximate="none")),
    ("sigmoid", {}, torch.sigmoid),
    ("tanh", {}, torch.tanh),
    ("softplus", {}, TF.softplus),
]


@pytest.mark.parametrize("name,options,reference", ACTIVATIONS, ids=[f"{a[0]}{a[1]}" for a in ACTIVATIONS])
def test_activations_against_torch(name, options, reference):
    x = 4 * normal(0, (3, 4, 5))
    dy = normal(1, x.shape)
    xt = t(x)
    yt = reference(xt)
    yt.backward(torch.tensor(np.asarray(dy)))
    assert relative_error(getattr(F, name)(x, **options), yt.detach().numpy()) <= TOLERANCE
    assert relative_error(getattr(F, f"{name}_vjp")(x, dy, **options), xt.grad.numpy()) <= TOLERANCE


def test_losses_against_torch():
    logits = 3 * normal(0, (6, 5))
    labels = jnp.array([0, 4, 2, 2, 1, 3])
    zt = t(logits)
    loss = TF.cross_entropy(zt, torch.tensor(np.asarray(labels)))
    loss.backward(torch.tensor(0.7, dtype=torch.float64))
    assert relative_error(F.softmax_cross_entropy(logits, labels), loss.detach().numpy()) <= TOLERANCE
    assert relative_error(F.softmax_cross_entropy_vjp(logits, labels, 0.7)[0], zt.grad.numpy()) <= TOLERANCE

    p, target = normal(1, (4, 3, 2)), normal(2, (4, 3, 2))
    pt = t(p)
    loss = TF.mse_loss(pt, torch.tensor(np.asarray(target)))
    loss.backward()
    assert relative_error(F.mean_squared_error(p, target), loss.detach().numpy()) <= TOLERANCE
    assert relative_error(F.mean_squared_error_vjp(p, target)[0], pt.grad.numpy()) <= TOLERANCE
