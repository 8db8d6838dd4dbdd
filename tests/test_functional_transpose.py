"""Transposed convolution, nearest upsampling and dropout: forwards against lax / Flax / PyTorch, hand VJPs
against jax.vjp (float64 and float32), table-driven, with finite differences on a sample (gradcheck.check_op)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DTYPES, assert_trees_close, normal, relative_error
from jaxcnn import gradcheck
from jaxcnn.functional._registry import hand_rule
from jaxcnn.functional.conv_transpose import conv_transpose2d, conv_transpose2d_vjp, conv_transpose_geometry
from jaxcnn.functional.dropout import dropout, dropout_mask, dropout_vjp
from jaxcnn.functional.resample import upsample_nearest2d, upsample_nearest2d_vjp

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _conv_transpose_cases():
    """Odd sizes, non-square kernels 1-5, stride 1-3 (pairs too), dilation 1-3, every padding spelling including
    zero and larger-than-kernel pads, channels 1 and 3, batch 1 and 3, with and without bias: hand-picked edge
    cases plus a seeded random sample of the product."""
    cases = [
        # (batch, H, W, C, F, (kh, kw), stride, padding, dilation, bias)
        (1, 5, 5, 1, 1, (1, 1), 1, "VALID", 1, True),
        (3, 5, 7, 3, 2, (3, 2), 2, "VALID", 1, True),
        (1, 3, 5, 3, 3, (3, 3), 2, "SAME", 1, False),
        (3, 4, 3, 1, 3, (2, 5), (3, 2), "SAME", (2, 1), True),
        (1, 5, 5, 3, 1, (3, 3), 1, 0, 1, True),  # int 0: no padding of the stride-dilated input at all
        (3, 3, 3, 1, 2, (2, 2), 2, 4, 1, True),  # int padding larger than the kernel
        (1, 4, 5, 3, 3, (3, 4), (2, 3), ((0, 3), (5, 1)), 1, True),  # asymmetric, one side larger than the kernel
        (1, 6, 4, 1, 1, (5, 3), 3, ((2, 0), (0, 2)), (1, 3), False),  # output cropped below the full extent
        (3, 5, 3, 3, 2, (4, 2), 1, (1, 2), (1, 3), True),  # (ph, pw) pair
        (1, 1, 1, 1, 3, (3, 3), 3, "VALID", 1, True),  # a single input pixel: the kernel stamped once
        (1, 2, 3, 3, 1, (1, 2), 3, "VALID", 2, False),  # kernel smaller than the stride: gaps in the output
        (3, 3, 5, 1, 1, (5, 5), 1, "SAME", 2, True),
    ]
    rng = np.random.default_rng(2024)
    paddings = ["SAME", "VALID", 0, 1, 3, (2, 0), ((0, 1), (2, 0)), ((1, 2), (1, 1)), ((4, 0), (0, 6))]
    while len(cases) < 40:
        kernel = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
        stride = int(rng.integers(1, 4)) if rng.integers(2) else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        dilation = int(rng.integers(1, 4)) if rng.integers(2) else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        padding = paddings[int(rng.integers(len(paddings)))]
        height, width = int(rng.integers(1, 7)) | 1, int(rng.integers(1, 8))
        channels, features = int(rng.choice([1, 3])), int(rng.choice([1, 3]))
        case = (int(rng.choice([1, 3])), height, width, channels, features, kernel, stride, padding, dilation)
        try:  # keep only cases whose output is not empty
            conv_transpose_geometry((1, height, width, channels), (*kernel, channels, features), **_options(case))
        except ValueError:
            continue
        cases.append((*case, bool(rng.integers(2))))
    return cases


def _options(case):
    stride, padding, dilation = case[6:9]
    return dict(stride=stride, padding=padding, dilation=dilation)


CT_CASES = _conv_transpose_cases()
CT_IDS = [f"ct{i}" for i in range(len(CT_CASES))]


def _inputs(case, dtype, seed=0):
    batch, h, w, c, f, kernel = case[:6]
    x = normal(seed, (batch, h, w, c), dtype)
    kern = normal(seed + 1, (*kernel, c, f), dtype)
    b = normal(seed + 2, (f,), dtype) if case[9] else None
    return x, kern, b, _options(case)


def _lax_padding(padding):
    """The same padding in the spelling ``lax.conv_transpose`` and Flax take."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)


def _as_pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def test_cases_cover_the_table():
    assert len(CT_CASES) == 40
    assert {type(c[7]) for c in CT_CASES} >= {str, int, tuple}
    explicit = [c for c in CT_CASES if not isinstance(c[7], str)]
    assert any(max(max(p) for p in _lax_padding(c[7])) > max(c[5]) for c in explicit)
    assert any(min(min(p) for p in _lax_padding(c[7])) == 0 for c in explicit)
    assert {c[6] for c in CT_CASES} >= {1, 2, 3} and any(isinstance(c[6], tuple) for c in CT_CASES)


@pytest.mark.sample(3)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case", CT_CASES, ids=CT_IDS)
def test_conv_transpose2d_forward_matches_lax(case, dtype):
    x, w, b, options = _inputs(case, dtype)
    y = conv_transpose2d(x, w, b, **options)
    expected = jax.lax.conv_transpose(
        x,
        w,
        _as_pair(options["stride"]),
        _lax_padding(options["padding"]),
        rhs_dilation=_as_pair(options["dilation"]),
        dimension_numbers=_DIMENSIONS,
        transpose_kernel=False,
    )
    if b is not None:
        expected = expected + b.reshape(1, 1, 1, -1)
    assert y.shape == expected.shape and y.dtype == dtype
    assert_trees_close(y, expected, dtype, f"conv_transpose2d {case}")


@pytest.mark.sample(2)  # about half by default, the rest under -m slow (room for test_conv_transpose_xla.py)
@pytest.mark.parametrize("case", CT_CASES, ids=CT_IDS)
def test_conv_transpose2d_forward_matches_flax(case):
    x, w, b, options = _inputs(case, jnp.float64)
    layer = nn.ConvTranspose(
        features=w.shape[3],
        kernel_size=w.shape[:2],
        strides=_as_pair(options["stride"]),
        padding=_lax_padding(options["padding"]),
        kernel_dilation=_as_pair(options["dilation"]),
        use_bias=b is not None,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
    )
    params = {"kernel": w} if b is None else {"kernel": w, "bias": b}
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)
    expected = layer.apply({"params": params}, x)
    y = conv_transpose2d(x, w, b, **options)
    assert y.shape == expected.shape
    assert relative_error(y, expected) < 1e-12


def _torch_arguments(case):
    """PyTorch's (padding, output_padding) for the case, or None when its padding has no PyTorch spelling.

    Per axis, our y[i * s + lo - j * d] += x[i] w[j]; PyTorch's y[i * s - p + j' * d] += x[i] w'[j'] with the
    flipped kernel w'[j'] = w[K - 1 - j'] is the same sum when p = (K - 1) * d - lo, and its output
    (H - 1) * s - 2 p + (K - 1) * d + 1 + output_padding matches ours when output_padding = hi - lo.
    """
    _, h, w, c, f, kernel = case[:6]
    stride, dilation, pads, _ = conv_transpose_geometry((1, h, w, c), (*kernel, c, f), **_options(case))
    padding, output_padding = [], []
    for k, s, d, (lo, hi) in zip(kernel, stride, dilation, pads, strict=True):
        p, extra = (k - 1) * d - lo, hi - lo
        if p < 0 or not 0 <= extra < max(s, d):
            return None
        padding.append(p)
        output_padding.append(extra)
    return tuple(padding), tuple(output_padding)


TORCH_CASES = [case for case in CT_CASES if _torch_arguments(case) is not None]


def test_torch_comparison_covers_valid_stride_and_dilation_cases():
    assert all(_torch_arguments(case) is not None for case in CT_CASES if case[7] == "VALID")
    assert len(TORCH_CASES) >= 15
    assert any(max(_as_pair(c[6])) > 1 and max(_as_pair(c[8])) > 1 for c in TORCH_CASES)


@pytest.mark.parametrize("case", TORCH_CASES, ids=[f"ct{CT_CASES.index(c)}" for c in TORCH_CASES])
def test_conv_transpose2d_forward_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, w, b, options = _inputs(case, jnp.float64)
    padding, output_padding = _torch_arguments(case)
    expected = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(np.asarray(w)[::-1, ::-1].transpose(2, 3, 0, 1).copy()),  # (C, F, KH, KW), flipped
        None if b is None else torch.from_numpy(np.array(b)),
        stride=_as_pair(options["stride"]),
        padding=padding,
        output_padding=output_padding,
        dilation=_as_pair(options["dilation"]),
    )
    y = conv_transpose2d(x, w, b, **options)
    assert relative_error(y, expected.numpy().transpose(0, 2, 3, 1)) < 1e-12


@pytest.mark.sample(6)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case", CT_CASES, ids=CT_IDS)
def test_conv_transpose2d_vjp_matches_autodiff(case, dtype):
    x, w, b, options = _inputs(case, dtype)
    b = b if b is not None else jnp.zeros(w.shape[-1], dtype)
    forward = lambda x, w, b: conv_transpose2d(x, w, b, **options)
    dy = normal(7, jax.eval_shape(forward, x, w, b).shape, dtype)

    @jax.jit
    def hand_and_autodiff(x, w, b, dy):
        return conv_transpose2d_vjp(x, w, b, dy, **options), jax.vjp(forward, x, w, b)[1](dy)

    (dx, dw, db), expected = hand_and_autodiff(x, w, b, dy)
    assert (dx.dtype, dw.dtype, db.dtype) == (dtype, dtype, dtype)
    assert (dx.shape, dw.shape, db.shape) == (x.shape, w.shape, b.shape)
    assert_trees_close((dx, dw, db), expected, dtype, f"conv_transpose2d {case}")


@pytest.mark.sample(2)  # 4 of the 8
@pytest.mark.parametrize("case", CT_CASES[::5], ids=CT_IDS[::5])
def test_conv_transpose2d_finite_differences(case):
    x, w, b, options = _inputs(case, jnp.float64)
    report = gradcheck.check_op(conv_transpose2d, x, w, b, **options)
    assert report.ok, report.table()
    assert {c.method for c in report.checks} == {"hand vs autodiff", "hand vs finite diff"}
    assert {c.quantity for c in report.checks} == ({"arg 0", "arg 1"} | ({"arg 2"} if b is not None else set()))


@pytest.mark.parametrize("stride", [1, 2, 3, (2, 3)])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 2), (4, 5)])
def test_conv_transpose2d_string_padding_output_sizes(stride, dilation, kernel):
    x, w = normal(0, (1, 5, 4, 2)), normal(1, (*kernel, 2, 3))
    strides = _as_pair(stride)
    effective = [(k - 1) * dilation + 1 for k in kernel]
    same = conv_transpose2d(x, w, stride=stride, padding="SAME", dilation=dilation)
    assert same.shape == (1, 5 * strides[0], 4 * strides[1], 3)
    valid = conv_transpose2d(x, w, stride=stride, padding="valid", dilation=dilation)
    assert valid.shape == (1, *(n * s + max(k - s, 0) for n, s, k in zip((5, 4), strides, effective, strict=True)), 3)


def test_conv_transpose2d_is_the_adjoint_of_conv2d():
    """With transpose_kernel semantics spelled out (flipped, in/out swapped kernel) and the padding
    (K - 1) * d - p, conv_transpose2d is the transpose of a strided conv2d: <conv(x), u> = <x, convT(u)>."""
    from jaxcnn.functional.conv import conv2d

    x, w = normal(0, (2, 9, 8, 3)), normal(1, (3, 2, 3, 4))
    stride, dilation, pad = (2, 3), (1, 2), ((1, 0), (2, 1))
    y = conv2d(x, w, stride=stride, padding=pad, dilation=dilation)
    u = normal(2, y.shape)
    # conv2d_vjp's dx is a correlation of dy spread with lhs_dilation = s and padded by
    # ((K - 1) * d - p_lo, H - 1 - (OH - 1) * s + p_lo): exactly conv_transpose2d with that explicit padding
    t_pad = [
        ((k - 1) * d - p[0], n - 1 - (o - 1) * s + p[0])
        for k, d, p, n, o, s in zip(w.shape[:2], dilation, pad, x.shape[1:3], y.shape[1:3], stride, strict=True)
    ]
    xt = conv_transpose2d(u, w[::-1, ::-1].transpose(0, 1, 3, 2), stride=stride, padding=t_pad, dilation=dilation)
    assert xt.shape == x.shape
    np.testing.assert_allclose(float(jnp.vdot(y, u)), float(jnp.vdot(x, xt)), rtol=1e-12)


def test_conv_transpose2d_registered_and_promotes_dtypes():
    assert hand_rule(conv_transpose2d).differentiable == (0, 1, 2)
    x, w = normal(0, (1, 3, 3, 2), jnp.float32), normal(1, (2, 2, 2, 1))
    assert conv_transpose2d(x, w, stride=2).dtype == jnp.float64
    dx, dw, db = conv_transpose2d_vjp(x, w, None, normal(2, (1, 6, 6, 1)), stride=2)
    assert (dx.dtype, dw.dtype, db) == (jnp.float32, jnp.float64, None)


UPSAMPLE_SCALES = [1, 2, 3, (2, 3), (3, 1)]


@pytest.mark.sample(3)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("scale", UPSAMPLE_SCALES, ids=[str(s) for s in UPSAMPLE_SCALES])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 2)], ids=["1x1", "5x7"])
def test_upsample_nearest2d(shape, scale, dtype):
    x = normal(0, shape, dtype)
    sh, sw = _as_pair(scale)
    y = upsample_nearest2d(x, scale)
    assert y.shape == (shape[0], shape[1] * sh, shape[2] * sw, shape[3]) and y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.repeat(jnp.repeat(x, sh, axis=1), sw, axis=2)))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.image.resize(x, y.shape, "nearest")))
    if dtype == jnp.float64:  # check_op compares with jax.vjp (at two points) and with finite differences
        report = gradcheck.check_op(upsample_nearest2d, x, scale=scale)
        assert report.ok, report.table()
        return
    dy = normal(1, y.shape, dtype)
    expected = jax.vjp(lambda x: upsample_nearest2d(x, scale), x)[1](dy)[0]
    dx = upsample_nearest2d_vjp(x, dy, scale=scale)
    assert dx.dtype == dtype
    assert_trees_close(dx, expected, dtype, f"upsample_nearest2d {scale}")


def test_upsample_nearest2d_index_rule():
    x = jnp.arange(6.0).reshape(1, 2, 3, 1)
    y = np.asarray(upsample_nearest2d(x, (2, 3)))[0, :, :, 0]
    rows, cols = np.indices(y.shape)
    np.testing.assert_array_equal(y, np.asarray(x)[0, rows // 2, cols // 3, 0])


def test_dropout_same_key_same_mask_different_keys_different_masks():
    x = jnp.ones((4, 8, 8, 3))
    a, b, c = (dropout(x, 0.5, jax.random.key(k)) for k in (0, 0, 1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(a) != 0, np.asarray(dropout_mask(x.shape, 0.5, jax.random.key(0))))
    # the legacy raw uint32 key works and gives the same mask as the typed key it wraps
    legacy = dropout(x, 0.5, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(legacy), np.asarray(a))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16], ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_dropout_matches_flax_bit_for_bit(rate, dtype):
    x = normal(0, (3, 5, 7, 4), dtype)
    key = jax.random.key(42)
    layer = nn.Dropout(rate)
    # with the key passed directly, Flax draws the mask from that very key
    expected = layer.apply({}, x, deterministic=False, rng=key)
    y = dropout(x, rate, key)
    assert y.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(expected, np.float64))
    # through rngs={"dropout": key} Flax first derives a per-module key with make_rng: the same mask from it
    expected = layer.apply({}, x, deterministic=False, rngs={"dropout": key})
    derived = layer.apply({}, rngs={"dropout": key}, method=lambda module: module.make_rng("dropout"))
    np.testing.assert_array_equal(np.asarray(dropout(x, rate, derived), np.float64), np.asarray(expected, np.float64))


def test_dropout_rate_zero_and_one():
    x = normal(0, (2, 3, 4))
    assert dropout(x, 0.0, None) is x
    np.testing.assert_array_equal(np.asarray(dropout(x, 1, None)), 0.0)
    dy = normal(1, x.shape)
    np.testing.assert_array_equal(np.asarray(dropout_vjp(x, dy, rate=0.0)), np.asarray(dy))
    np.testing.assert_array_equal(np.asarray(dropout_vjp(x, dy, rate=1.0, key=jax.random.key(0))), 0.0)
    assert bool(jnp.all(dropout_mask(x.shape, 0.0, None))) and not bool(jnp.any(dropout_mask(x.shape, 1.0, None)))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_keep_fraction_and_scaling(rate):
    x = jnp.ones((1000, 1000), jnp.float32)
    y = np.asarray(dropout(x, rate, jax.random.key(7)))
    kept = y != 0
    # 1e6 Bernoulli draws: the standard deviation of the kept fraction is below 5e-4
    assert abs(kept.mean() - (1 - rate)) < 3e-3
    np.testing.assert_allclose(y[kept], 1 / np.float32(1 - rate), rtol=1e-7)
    assert abs(y.mean() - 1.0) < 1e-2


@pytest.mark.sample(2)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.75, 1.0])
def test_dropout_vjp_matches_autodiff(rate, dtype):
    x = normal(0, (3, 6, 5, 2), dtype)
    dy = normal(1, x.shape, dtype)
    key = jax.random.key(5)

    @jax.jit
    def hand_and_autodiff(x, dy, key):
        return dropout_vjp(x, dy, rate=rate, key=key), jax.vjp(lambda x: dropout(x, rate, key), x)[1](dy)[0]

    dx, expected = hand_and_autodiff(x, dy, key)
    assert dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(expected))  # a mask and a division: exact
    assert hand_rule(dropout).differentiable == (0,)
    if dtype == jnp.float64 and 0 < rate < 1:  # rate and key as keyword options, then positionally
        args, options = ((x,), dict(rate=rate, key=key)) if rate < 0.5 else ((x, rate, key), {})
        report = gradcheck.check_op(dropout, *args, **options)
        assert report.ok, report.table()


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: conv_transpose2d(jnp.zeros((4, 4, 1)), jnp.zeros((3, 3, 1, 2))), r"`x` must have rank 4"),
        (lambda: conv_transpose2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 1, 2))), r"`w` must have rank 4"),
        (
            lambda: conv_transpose2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 2, 2))),
            r"conv_transpose2d: kernel shape \(3, 3, 2, 2\) expects 2 input channels, but x has 3",
        ),
        (
            lambda: conv_transpose2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)), stride=0),
            r"conv_transpose2d: `stride` \(=0\) must be >= 1",
        ),
        (
            lambda: conv_transpose2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)), dilation=(1, -2)),
            r"conv_transpose2d: `dilation` \(=\(1, -2\)\) must be >= 1",
        ),
        (
            lambda: conv_transpose2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)), padding="FULL"),
            r"conv_transpose2d: `padding` must be 'SAME', 'VALID', an int or explicit pairs, got 'FULL'",
        ),
        (
            lambda: conv_transpose2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)), padding=-1),
            r"conv_transpose2d: `padding` \(=-1\) must not be negative",
        ),
        (
            lambda: conv_transpose2d(jnp.zeros((1, 1, 4, 1)), jnp.zeros((3, 3, 1, 2)), padding=((0, 0), (0, 0))),
            r"conv_transpose2d: output height would be -1 < 1",
        ),
        (
            lambda: conv_transpose2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)), jnp.zeros((1,))),
            r"conv_transpose2d: `b` must have shape \(2,\), got \(1,\)",
        ),
        (
            lambda: conv_transpose2d_vjp(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 2)), None, jnp.ones((1, 4, 4, 2))),
            r"conv_transpose2d_vjp: `dy` must have shape \(1, 6, 6, 2\), got \(1, 4, 4, 2\)",
        ),
        (lambda: upsample_nearest2d(jnp.zeros((4, 4, 1))), r"upsample_nearest2d: `x` must have rank 4"),
        (lambda: upsample_nearest2d(jnp.zeros((1, 4, 4, 1)), 0), r"upsample_nearest2d: `scale` \(=0\) must be >= 1"),
        (
            lambda: upsample_nearest2d(jnp.zeros((1, 4, 4, 1)), 1.5),
            r"upsample_nearest2d: `scale` must be an int or a pair of ints, got 1.5",
        ),
        (
            lambda: upsample_nearest2d_vjp(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 4, 2, 1))),
            r"upsample_nearest2d_vjp: `dy` must have shape \(1, 4, 4, 1\)",
        ),
        (lambda: dropout(jnp.zeros(3), 1.5, jax.random.key(0)), r"dropout: `rate` must be in \[0, 1\].*got 1.5"),
        (lambda: dropout(jnp.zeros(3), -0.1, jax.random.key(0)), r"dropout: `rate` must be in \[0, 1\]"),
        (lambda: dropout(jnp.zeros(3), float("nan"), jax.random.key(0)), r"dropout: `rate` must be in \[0, 1\]"),
        (lambda: dropout(jnp.zeros(3), True, jax.random.key(0)), r"dropout: `rate` must be a float in \[0, 1\]"),
        (lambda: dropout(jnp.zeros(3), "0.5", jax.random.key(0)), r"dropout: `rate` must be a float in \[0, 1\]"),
        (lambda: dropout(jnp.zeros(3), 0.5), r"dropout: `key` is required for 0 < rate < 1, got None"),
        (lambda: dropout(jnp.zeros(3), 0.5, 0), r"dropout: `key` must be a JAX PRNG key .*got 0"),
        (
            lambda: dropout(jnp.zeros(3), 0.5, jnp.zeros(2, jnp.float32)),
            r"dropout: `key` must be a JAX PRNG key .*got array of dtype float32 and shape \(2,\)",
        ),
        (
            lambda: dropout(jnp.zeros(3), 0.5, jax.random.split(jax.random.key(0), 3)),
            r"dropout: `key` must be a single PRNG key, got a key array of shape \(3,\)",
        ),
        (
            lambda: dropout(jnp.arange(3), 0.5, jax.random.key(0)),
            r"dropout: `x` must be a floating-point array, got dtype int",
        ),
        (
            lambda: dropout_vjp(jnp.zeros(3), jnp.zeros(4), rate=0.5, key=jax.random.key(0)),
            r"dropout_vjp: `dy` must have the shape of `x` \(3,\), got \(4,\)",
        ),
        (lambda: dropout_mask((2, -1), 0.5, jax.random.key(0)), r"dropout_mask: `x_shape` must be a sequence"),
        (
            lambda: jax.jit(lambda r: dropout(jnp.zeros(3), r, jax.random.key(0)))(0.5),
            r"dropout: `rate` must be a concrete float in \[0, 1\] \(not traced\)",
        ),
    ],
)
def test_errors_are_one_line_and_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)
