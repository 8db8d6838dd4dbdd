"""Per-example squared gradient norms (functional/ghost.py) against the reference: jax.vmap of jax.grad, one
gradient per example, its squared norm. Float64 to 1e-10 and float32 to 1e-4; ghost and direct forms both."""

import functools

import jax
import jax.numpy as jnp
import pytest

from conftest import TOLERANCE, normal, relative_error
from jaxcnn.functional import conv2d, conv_transpose2d, dense, group_norm, layer_norm
from jaxcnn.functional.ghost import (
    conv2d_sq_norms,
    conv_transpose2d_sq_norms,
    dense_sq_norms,
    group_norm_sq_norms,
    layer_norm_sq_norms,
    norm_method,
)


def _reference(forward, params, x, g):
    """Per-example ``sum over params of ||d/dparams <forward(params, x_i), g_i>||^2`` by vmap of grad."""

    def loss(p, xi, gi):
        return jnp.sum(forward(p, xi[None]) * gi[None])

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, g)
    return sum(jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1) for leaf in jax.tree.leaves(grads))


def _params(shapes, dtype):
    return [normal(10 + i, shape, dtype) for i, shape in enumerate(shapes)]


def _assert_close(actual, expected, dtype, what=""):
    assert actual.shape == expected.shape == (expected.shape[0],), what
    assert actual.dtype == expected.dtype, what
    error = relative_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3e} > {TOLERANCE[dtype]:.0e}"


# -- dense -----------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="bias")
def _dense_check(x, g, w, b, *, bias):
    forward = lambda p, xi: dense(xi, *p)  # noqa: E731
    reference = _reference(forward, (w, b) if bias else (w,), x, g)
    return reference, [dense_sq_norms(x, g, bias=bias, method=m) for m in ("ghost", "direct", "auto")]


@pytest.mark.sample(4)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(), (5,), (2, 3)], ids=["2d", "3d", "4d"])
def test_dense(leading, bias, dtype):
    n, d_in, d_out = 4, 6, 3
    x, g = normal(0, (n, *leading, d_in), dtype), normal(1, (n, *leading, d_out), dtype)
    w, b = _params([(d_in, d_out), (d_out,)], dtype)
    reference, results = _dense_check(x, g, w, b, bias=bias)
    for method, result in zip(("ghost", "direct", "auto"), results, strict=True):
        _assert_close(result, reference, dtype, method)


def test_dense_2d_is_the_product_of_norms():
    x, g = normal(0, (3, 5)), normal(1, (3, 2))
    expected = jnp.sum(x * x, axis=1) * jnp.sum(g * g, axis=1)
    assert relative_error(dense_sq_norms(x, g, bias=False), expected) <= 1e-14


# -- conv2d ----------------------------------------------------------------------------------------------------

_CONV_CASES = [
    # (N, H, W, C, F, kernel, stride, padding, dilation, groups)
    (3, 6, 6, 2, 3, 3, 1, "VALID", 1, 1),
    (3, 7, 6, 2, 4, 3, 2, "SAME", 1, 1),
    (2, 8, 7, 4, 4, (3, 2), (2, 1), "SAME", 1, 2),
    (2, 7, 7, 2, 2, 3, 1, 2, 2, 2),  # int padding, dilation 2, depthwise
    (2, 9, 8, 3, 2, (2, 3), (3, 2), ((1, 0), (2, 1)), (2, 1), 1),  # explicit asymmetric pairs
    (3, 5, 5, 4, 6, 1, 1, "VALID", 1, 2),  # 1x1 kernel, grouped
    (2, 5, 6, 3, 2, 1, 2, (1, 0), 1, 1),  # 1x1 kernel, strided, (ph, pw) pair
    (2, 6, 6, 4, 2, (3, 3), 2, "VALID", (1, 2), 2),
    (1, 4, 4, 1, 1, 4, 1, "VALID", 1, 1),  # a single output position
]


def _conv_options(case):
    kernel, stride, padding, dilation, groups = case[5:]
    return dict(kernel_shape=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)


@functools.partial(jax.jit, static_argnames=("options", "bias"))
def _conv_check(x, g, w, b, *, options, bias):
    opts = dict(options)
    geometry = {k: v for k, v in opts.items() if k != "kernel_shape"}
    forward = lambda p, xi: conv2d(xi, *p, **geometry)  # noqa: E731
    reference = _reference(forward, (w, b) if bias else (w,), x, g)
    return reference, [conv2d_sq_norms(x, g, **opts, bias=bias, method=m) for m in ("ghost", "direct", "auto")]


def _frozen(options):
    return tuple(sorted(options.items()))


@pytest.mark.sample(8)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", _CONV_CASES, ids=[f"conv{i}" for i in range(len(_CONV_CASES))])
def test_conv2d(case, bias, dtype):
    n, h, w_, c, f, kernel = case[:6]
    options = _conv_options(case)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    groups = options["groups"]
    x = normal(0, (n, h, w_, c), dtype)
    w, b = _params([(kh, kw, c // groups, f), (f,)], dtype)
    geometry = {k: v for k, v in options.items() if k != "kernel_shape"}
    g = normal(1, conv2d(x, w, **geometry).shape, dtype)
    reference, results = _conv_check(x, g, w, b, options=_frozen(options), bias=bias)
    for method, result in zip(("ghost", "direct", "auto"), results, strict=True):
        _assert_close(result, reference, dtype, method)


# -- conv_transpose2d ------------------------------------------------------------------------------------------

_TRANSPOSE_CASES = [
    # (N, H, W, C, F, kernel, stride, padding, dilation)
    (2, 4, 3, 2, 3, 3, 2, "SAME", 1),
    (2, 3, 4, 3, 2, (2, 3), (2, 1), "VALID", (1, 2)),
    (3, 4, 4, 2, 2, 3, 1, ((0, 2), (1, 3)), 1),
    (2, 3, 3, 1, 2, (3, 2), 3, 1, 2),
]


@functools.partial(jax.jit, static_argnames=("options", "bias"))
def _transpose_check(x, g, w, b, *, options, bias):
    opts = dict(options)
    geometry = {k: v for k, v in opts.items() if k != "kernel_shape"}
    forward = lambda p, xi: conv_transpose2d(xi, *p, **geometry)  # noqa: E731
    reference = _reference(forward, (w, b) if bias else (w,), x, g)
    methods = ("ghost", "direct", "auto")
    return reference, [conv_transpose2d_sq_norms(x, g, **opts, bias=bias, method=m) for m in methods]


@pytest.mark.sample(4)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("case", _TRANSPOSE_CASES, ids=[f"transpose{i}" for i in range(len(_TRANSPOSE_CASES))])
def test_conv_transpose2d(case, dtype):
    n, h, w_, c, f, kernel, stride, padding, dilation = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    x = normal(0, (n, h, w_, c), dtype)
    w, b = _params([(kh, kw, c, f), (f,)], dtype)
    g = normal(1, conv_transpose2d(x, w, **geometry).shape, dtype)
    bias = bool(h % 2)
    options = _frozen(dict(kernel_shape=kernel, **geometry))
    reference, results = _transpose_check(x, g, w, b, options=options, bias=bias)
    for method, result in zip(("ghost", "direct", "auto"), results, strict=True):
        _assert_close(result, reference, dtype, method)


# -- the "auto" choice -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("positions", "k", "features", "expected"),
    [
        (28 * 28, 9, 32, "direct"),  # a first conv layer on MNIST: P^2 = 614656 >> K F = 288
        (7 * 7, 3 * 3 * 64, 64, "ghost"),  # a late conv layer: 2 P^2 = 4802 < K F = 36864
        (1, 784, 10, "ghost"),  # a dense layer on (N, D): one position
        (16, 16, 32, "direct"),  # 2 P^2 = 512 == K F: the per-example gradient is no larger
    ],
)
def test_norm_method(positions, k, features, expected):
    assert norm_method(positions, k, features) == expected


def test_auto_follows_norm_method(monkeypatch):
    """conv2d_sq_norms(method="auto") asks norm_method with (positions, K per group, F per group)."""
    from jaxcnn.functional import ghost

    seen = []
    monkeypatch.setattr(ghost, "norm_method", lambda *args: seen.append(args) or "direct")
    x, g = normal(0, (1, 5, 6, 4)), normal(1, (1, 4, 2, 6))
    conv2d_sq_norms(x, g, kernel_shape=(2, 3), stride=(1, 2), padding="VALID", groups=2, bias=False)
    assert seen == [(4 * 2, 2 * 3 * 2, 3)]


# -- layer norm, group norm ------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("kind", "scale", "bias"))
def _norm_check(x, g, s, b, *, kind, scale, bias):
    groups = {"group": 2, "instance": x.shape[-1], "layer": None}[kind]

    def forward(p, xi):
        p = dict(p)
        if groups is None:
            return layer_norm(xi, p.get("scale"), p.get("bias"), epsilon=1e-3)
        return group_norm(xi, p.get("scale"), p.get("bias"), groups=groups, epsilon=1e-3)

    params = {name: value for name, value, keep in (("scale", s, scale), ("bias", b, bias)) if keep}
    reference = _reference(forward, params, x, g)
    if groups is None:
        return reference, layer_norm_sq_norms(x, g, scale=scale, bias=bias, epsilon=1e-3)
    return reference, group_norm_sq_norms(x, g, groups=groups, scale=scale, bias=bias, epsilon=1e-3)


@pytest.mark.sample(6)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize(("scale", "bias"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize(("kind", "shape"), [("layer", (3, 4, 6)), ("group", (3, 3, 2, 4)), ("instance", (2, 5, 4))])
def test_norms(kind, shape, scale, bias, dtype):
    x, g = normal(0, shape, dtype), normal(1, shape, dtype)
    s, b = _params([(shape[-1],), (shape[-1],)], dtype)
    reference, result = _norm_check(x, g, s, b, kind=kind, scale=scale, bias=bias)
    _assert_close(result, reference, dtype, kind)


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: dense_sq_norms(jnp.ones((2, 3)), jnp.ones((3, 2)), bias=True), "share their leading axes"),
        (lambda: dense_sq_norms(jnp.ones((2, 3)), jnp.ones((2, 2)), bias=True, method="fast"), "unknown method"),
        (
            lambda: conv2d_sq_norms(
                jnp.ones((1, 5, 5, 3)), jnp.ones((1, 3, 3, 2)), kernel_shape=3, groups=2, bias=True
            ),
            "divisible by `groups`",
        ),  # fmt: skip
        (
            lambda: conv2d_sq_norms(jnp.ones((1, 5, 5, 2)), jnp.ones((1, 4, 4, 2)), kernel_shape=3, bias=True),
            "`g` must have shape",
        ),  # fmt: skip
        (
            lambda: conv2d_sq_norms(jnp.ones((1, 5, 5, 2)), jnp.ones((1, 3, 3, 2)), kernel_shape=0, bias=True),
            "conv2d_sq_norms: `kernel_shape`",
        ),  # fmt: skip
        (
            lambda: conv_transpose2d_sq_norms(
                jnp.ones((1, 2, 2, 2)), jnp.ones((1, 3, 3, 2)), kernel_shape=3, stride=2, padding="SAME", bias=True
            ),
            "`g` must have shape",
        ),  # fmt: skip
        (
            lambda: group_norm_sq_norms(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)), groups=3, scale=True, bias=True),
            "divisible by `groups`",
        ),  # fmt: skip
        (lambda: layer_norm_sq_norms(jnp.ones((2, 3)), jnp.ones((2, 4)), scale=True, bias=True), "shape of `x`"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_no_differentiation_transforms():
    """The norms are hand rules: ghost.py never calls a JAX differentiation transform."""
    import inspect

    from jaxcnn.functional import ghost

    source = inspect.getsource(ghost)
    for name in ("jax.vjp", "jax.grad", "jax.jvp", "linearize", "linear_transpose"):
        assert name not in source, name
