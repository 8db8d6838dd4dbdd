"""Every functional op's hand VJP against jax.vjp of its forward (float64 and float32), table-driven,
with finite differences on a sample of cases (through gradcheck.check_op)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn.functional as F
from conftest import DTYPES, assert_trees_close, normal, relative_error
from jaxcnn import gradcheck
from op_cases import CONV_CASES, POOL_CASES


def _conv_inputs(case, dtype, seed=0):
    batch, h, w, c, f, kernel, stride, padding, dilation, groups, bias = case
    x = normal(seed, (batch, h, w, c), dtype)
    kern = normal(seed + 1, (*kernel, c // groups, f), dtype)
    b = normal(seed + 2, (f,), dtype) if bias else None
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, kern, b, options


@pytest.mark.sample(9)  # 7 of the 80 (test_functional_convention.py checks two more in float64)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"conv{i}" for i in range(len(CONV_CASES))])
def test_conv2d_vjp_matches_autodiff(case, dtype):
    x, w, b, options = _conv_inputs(case, dtype)
    b = b if b is not None else jnp.zeros(w.shape[-1], dtype)
    forward = lambda x, w, b: F.conv2d(x, w, b, **options)
    dy = normal(7, jax.eval_shape(forward, x, w, b).shape, dtype)

    @jax.jit
    def hand_and_autodiff(x, w, b, dy):
        hand = {method: F.conv2d_vjp(x, w, b, dy, **options, dw_method=method) for method in ("taps", "conv")}
        return hand, jax.vjp(forward, x, w, b)[1](dy)

    hand, expected = hand_and_autodiff(x, w, b, dy)
    for method, (dx, dw, db) in hand.items():  # both weight-gradient formulations, whatever the backend
        assert (dx.dtype, dw.dtype, db.dtype) == (dtype, dtype, dtype)
        assert_trees_close((dx, dw, db), expected, dtype, f"conv2d dw_method={method} {case}")


@pytest.mark.sample(2)
@pytest.mark.parametrize("method", ["taps", "conv"])
@pytest.mark.parametrize("case", CONV_CASES[2::9], ids=[f"conv{i}" for i in range(2, len(CONV_CASES), 9)])
def test_conv2d_dw_methods_against_finite_differences(case, method):
    """Each weight-gradient formulation, whichever the backend picks, against central differences (float64)."""
    x, w, _, options = _conv_inputs(case, jnp.float64)
    dy = normal(5, F.conv2d(x, w, **options).shape)
    _, dw, _ = F.conv2d_vjp(x, w, None, dy, **options, dw_method=method)
    rng = np.random.default_rng(0)
    direction = jnp.asarray(rng.standard_normal(w.shape))
    step = 1e-6
    objective = lambda kernel: jnp.sum(F.conv2d(x, kernel, **options) * dy)
    numeric = (objective(w + step * direction) - objective(w - step * direction)) / (2 * step)
    # the central difference with h = 1e-6 loses eps / h, about 1e-10 of the objective, which can be large against
    # the directional derivative; its truncation error, about h^2 = 1e-12, is smaller
    assert float(jnp.sum(dw * direction)) == pytest.approx(float(numeric), rel=1e-6, abs=1e-8)


def test_conv2d_vjp_dw_method_per_backend_and_bad_names():
    from jaxcnn import _xla_flags

    # on XLA:CPU the convolution form where XLA's own emitter runs convolutions (jaxcnn's default flags)
    assert F.conv.dw_method_for("cpu") == ("conv" if _xla_flags.ynn_convolutions_off() else "taps")
    assert F.conv.dw_method_for("gpu") == F.conv.dw_method_for("tpu") == "conv"
    x, w = normal(0, (1, 5, 5, 2)), normal(1, (3, 3, 2, 2))
    dy = normal(2, (1, 3, 3, 2))
    auto = F.conv2d_vjp(x, w, None, dy)
    chosen = F.conv2d_vjp(x, w, None, dy, dw_method=F.conv.dw_method_for())
    np.testing.assert_array_equal(auto[1], chosen[1])
    with pytest.raises(ValueError, match=r"conv2d_vjp: unknown dw_method 'im2col'; known: auto, taps, conv"):
        F.conv2d_vjp(x, w, None, dy, dw_method="im2col")


@pytest.mark.sample(2)  # 4 of the 8 (test_gradcheck.py and test_functional_convention.py check conv2d too)
@pytest.mark.parametrize("case", CONV_CASES[::5], ids=[f"conv{i}" for i in range(0, len(CONV_CASES), 5)])
def test_conv2d_finite_differences(case):
    x, w, b, options = _conv_inputs(case, jnp.float64)
    report = gradcheck.check_op(F.conv2d, x, w, b, **options)
    assert report.ok, report.table()
    assert {c.method for c in report.checks} == {"hand vs autodiff", "hand vs finite diff"}


def test_conv2d_output_shapes_follow_lax():
    x = normal(0, (2, 9, 8, 4))
    w = normal(1, (3, 2, 2, 6))
    for stride, padding, dilation in itertools.product([1, 2, 3], ["SAME", "VALID", 1, ((2, 0), (1, 3))], [1, 2]):
        y = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=2)
        pad = (
            padding if isinstance(padding, str) else ([(padding, padding)] * 2 if isinstance(padding, int) else padding)
        )
        expected = jax.lax.conv_general_dilated(
            x,
            w,
            (stride, stride),
            pad,
            rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=2,
        )
        assert y.shape == expected.shape
        assert relative_error(y, expected) < 1e-12


@pytest.mark.sample(4)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("op", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES, ids=[f"pool{i}" for i in range(len(POOL_CASES))])
def test_pool_vjp_matches_autodiff(case, op, dtype):
    batch, h, w, c, window, stride, padding = case
    forward, rule = {"max": (F.max_pool2d, F.max_pool2d_vjp), "avg": (F.avg_pool2d, F.avg_pool2d_vjp)}[op]
    x = normal(3, (batch, h, w, c), dtype)
    pool = lambda x: forward(x, window, stride, padding)
    dy = normal(4, jax.eval_shape(pool, x).shape, dtype)

    @jax.jit
    def hand_and_autodiff(x, dy):
        return rule(x, dy, window=window, stride=stride, padding=padding), jax.vjp(pool, x)[1](dy)[0]

    dx, expected = hand_and_autodiff(x, dy)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert_trees_close(dx, expected, dtype, f"{op}_pool2d {case}")


@pytest.mark.sample(2)  # 4 of the 8
@pytest.mark.parametrize("case", POOL_CASES[::3], ids=[f"pool{i}" for i in range(0, len(POOL_CASES), 3)])
@pytest.mark.parametrize("forward", [F.max_pool2d, F.avg_pool2d])
def test_pool_finite_differences(case, forward):
    batch, h, w, c, window, stride, padding = case
    report = gradcheck.check_op(forward, normal(5, (batch, h, w, c)), window=window, stride=stride, padding=padding)
    assert report.ok, report.table()


def test_avg_pool_divides_by_real_cells_only():
    x = jnp.ones((1, 3, 3, 1))
    y = F.avg_pool2d(x, 2, 1, "SAME")  # windows hanging over the bottom/right edge see fewer real cells
    np.testing.assert_allclose(np.asarray(y), 1.0)
    y = F.avg_pool2d(jnp.arange(9.0).reshape(1, 3, 3, 1), 3, 1, 1)
    assert float(y[0, 0, 0, 0]) == pytest.approx((0 + 1 + 3 + 4) / 4)


def test_max_pool_ties_go_to_the_first_maximal_cell():
    x = jnp.zeros((1, 2, 2, 1))
    dx = F.max_pool2d_vjp(x, jnp.ones((1, 1, 1, 1)), window=2)
    np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])
    x = jnp.array([[0.0, 2.0], [2.0, 1.0]]).reshape(1, 2, 2, 1)
    dx = F.max_pool2d_vjp(x, jnp.ones((1, 1, 1, 1)), window=2)
    np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])
    # and JAX's own autodiff makes the same choice
    _, pullback = jax.vjp(lambda x: F.max_pool2d(x, 2), x)
    np.testing.assert_array_equal(np.asarray(pullback(jnp.ones((1, 1, 1, 1)))[0]), np.asarray(dx))


@pytest.mark.parametrize("dtype", [jnp.float32], ids=["float32"])  # float64: test_functional_convention.py
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 2)])
def test_global_avg_pool_vjp(shape, dtype):
    x = normal(0, shape, dtype)
    y, pullback = jax.vjp(F.global_avg_pool2d, x)
    assert y.shape == (shape[0], shape[3])
    dy = normal(1, y.shape, dtype)
    assert_trees_close(F.global_avg_pool2d_vjp(x, dy), pullback(dy)[0], dtype, "global_avg_pool2d")


DENSE_CASES = [((1, 1), 1, True), ((3, 7), 5, True), ((4, 13), 2, False), ((2, 3, 6), 4, True)]


@pytest.mark.sample(2)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=[f"dense{i}" for i in range(len(DENSE_CASES))])
def test_dense_vjp(case, dtype):
    x_shape, features, bias = case
    x = normal(0, x_shape, dtype)
    w = normal(1, (x_shape[-1], features), dtype)
    b = normal(2, (features,), dtype)
    if dtype == jnp.float64:  # check_op compares with jax.vjp (at two points) and with finite differences
        report = gradcheck.check_op(F.dense, x, w, b if bias else None)
        assert report.ok, report.table()
        return
    y, pullback = jax.vjp(lambda x, w, b: F.dense(x, w, b), x, w, b)
    dy = normal(3, y.shape, dtype)
    assert_trees_close(F.dense_vjp(x, w, b, dy), pullback(dy), dtype, "dense")


ACTIVATIONS = [
    ("relu", {}),
    ("leaky_relu", {}),
    ("leaky_relu", {"negative_slope": 0.2}),
    ("elu", {}),
    ("elu", {"alpha": 0.5}),
    ("gelu", {"approximate": True}),
    ("gelu", {"approximate": False}),
    ("sigmoid", {}),
    ("tanh", {}),
    ("softplus", {}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name,options", ACTIVATIONS, ids=[f"{n}{o}" for n, o in ACTIVATIONS])
def test_activation_vjp(name, options, dtype):
    forward, rule = getattr(F, name), getattr(F, f"{name}_vjp")
    x = 3 * normal(0, (3, 5, 4, 2), dtype)
    if dtype == jnp.float64:  # check_op compares with jax.vjp (at two points) and with finite differences
        report = gradcheck.check_op(forward, x, **options)
        assert report.ok, report.table()
        return
    dy = normal(1, x.shape, dtype)

    @jax.jit
    def hand_and_autodiff(x, dy):
        return rule(x, dy, **options), jax.vjp(lambda x: forward(x, **options), x)[1](dy)[0]

    assert_trees_close(*hand_and_autodiff(x, dy), dtype, name)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "softplus", "elu", "gelu"])
def test_activations_stay_finite_at_extremes(name):
    x = jnp.array([-1e4, -50.0, 0.0, 50.0, 1e4], jnp.float32)
    y = getattr(F, name)(x)
    dx = getattr(F, f"{name}_vjp")(x, jnp.ones_like(x))
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(dx)))


def test_activation_forwards_match_jax_nn():
    x = normal(0, (50,))
    pairs = [
        (F.relu(x), jax.nn.relu(x)),
        (F.leaky_relu(x, 0.1), jax.nn.leaky_relu(x, 0.1)),
        (F.elu(x), jax.nn.elu(x)),
        (F.gelu(x, True), jax.nn.gelu(x, approximate=True)),
        (F.gelu(x, False), jax.nn.gelu(x, approximate=False)),
        (F.sigmoid(x), jax.nn.sigmoid(x)),
        (F.softplus(x), jax.nn.softplus(x)),
    ]
    for ours, theirs in pairs:
        assert relative_error(ours, theirs) < 1e-14


@pytest.mark.sample(2)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("batch,classes", [(1, 2), (5, 10), (3, 7)])
def test_softmax_cross_entropy_vjp(batch, classes, dtype):
    logits = 4 * normal(0, (batch, classes), dtype)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, classes, batch))
    loss, pullback = jax.vjp(lambda z: F.softmax_cross_entropy(z, labels), logits)
    reference = -np.mean(np.asarray(jax.nn.log_softmax(logits.astype(jnp.float64)))[np.arange(batch), labels])
    # float32: the log-sum-exp rounds at the size of the logits (up to about 12), which is large against a small loss
    assert float(loss) == pytest.approx(reference, rel=1e-12 if dtype == jnp.float64 else 1e-5)
    for dloss in (1.0, 0.37):
        expected = pullback(jnp.asarray(dloss, loss.dtype))[0]
        dlogits, dlabels = F.softmax_cross_entropy_vjp(logits, labels, dloss)
        assert dlabels is None
        assert_trees_close(dlogits, expected, dtype, "xent")
    assert gradcheck.check_op(F.softmax_cross_entropy, logits.astype(jnp.float64), labels).ok


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("shape", [(1,), (4, 3), (2, 5, 5, 1)])
def test_mean_squared_error_vjp(shape, dtype):
    p, t = normal(0, shape, dtype), normal(1, shape, dtype)
    loss, pullback = jax.vjp(F.mean_squared_error, p, t)
    # a float32 sum of up to 50 squares rounds by about 1e-6; in float64 only the summation order differs
    rel = 1e-5 if dtype == jnp.float32 else 1e-13
    assert float(loss) == pytest.approx(float(np.mean((np.asarray(p) - np.asarray(t)) ** 2)), rel=rel)
    for dloss in (1.0, 2.5):
        expected = pullback(jnp.asarray(dloss, loss.dtype))  # (dpredictions, dtargets = -dpredictions)
        assert_trees_close(F.mean_squared_error_vjp(p, t, dloss), expected, dtype, "mse")


def test_losses_are_stable_for_huge_logits():
    logits = jnp.array([[1e4, -1e4, 0.0]], jnp.float32)
    labels = jnp.array([1])
    assert np.isfinite(float(F.softmax_cross_entropy(logits, labels)))
    assert np.all(np.isfinite(np.asarray(F.softmax_cross_entropy_vjp(logits, labels)[0])))


def test_every_registered_op_has_a_rule():
    names = set(F.registered_ops())
    assert {
        "conv2d",
        "max_pool2d",
        "avg_pool2d",
        "global_avg_pool2d",
        "dense",
        "relu",
        "leaky_relu",
        "elu",
        "gelu",
        "sigmoid",
        "tanh",
        "softplus",
        "softmax_cross_entropy",
        "mean_squared_error",
    } <= names
    with pytest.raises(ValueError, match="no hand-derived VJP is registered for 'sum'"):
        F.hand_rule(jnp.sum)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_elu_derivative_at_zero_is_alpha_for_autodiff_too(alpha):
    x = jnp.array([-1.0, 0.0, 1.0])
    autodiff = jax.grad(lambda x: jnp.sum(F.elu(x, alpha)))(x)
    np.testing.assert_allclose(np.asarray(autodiff), [alpha * np.exp(-1.0), alpha, 1.0], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(F.elu_vjp(x, jnp.ones(3), alpha=alpha)), np.asarray(autodiff), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.grad(lambda x: jnp.sum(jax.nn.elu(x, alpha)))(x)), np.asarray(autodiff))


def test_integer_inputs_pool_and_convolve():
    x = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.int32).reshape(2, 5, 5, 3) % 7
    y = F.max_pool2d(x, 2, 1, "SAME")
    assert y.dtype == jnp.int32 and int(y.max()) == 6
    dx = F.max_pool2d_vjp(x, jnp.ones(y.shape, jnp.float32), window=2, stride=1, padding="SAME")
    assert dx.shape == x.shape and float(dx.sum()) == y.size
    x8 = (x % 256).astype(jnp.uint8)
    assert F.max_pool2d(x8, 2).dtype == jnp.uint8


def test_numpy_integers_are_accepted_and_non_integers_rejected():
    x, w = normal(0, (1, 6, 6, 2)), normal(1, (3, 3, 1, 4))
    y = F.conv2d(x, w, stride=np.int64(2), padding=np.int32(1), dilation=(np.int64(1), 1), groups=np.int64(2))
    assert y.shape == (1, 3, 3, 4)
    with pytest.raises(ValueError, match=r"`stride` must be an int or a pair of ints, got 1.5"):
        F.conv2d(x, w, stride=1.5, groups=2)
    with pytest.raises(ValueError, match=r"`groups` must be a positive int, got True"):
        F.conv2d(x, w, groups=True)


def test_labels_out_of_range_are_rejected_when_concrete():
    logits = jnp.zeros((3, 4))
    for bad in ([0, 4, 1], [-1, 0, 1]):
        with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\)"):
            F.softmax_cross_entropy(logits, jnp.array(bad))
        with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\)"):
            F.softmax_cross_entropy_vjp(logits, jnp.array(bad))
    # traced labels cannot be checked, but the loss still runs under jit
    assert np.isfinite(float(jax.jit(F.softmax_cross_entropy)(logits, jnp.array([0, 3, 1]))))


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "gelu", "softplus", "elu"])
def test_activation_derivatives_keep_relative_precision_in_the_tails(name):
    """Against exact derivatives (float64 formulas free of cancellation), elementwise, far into the tails."""
    x = jnp.concatenate([jnp.linspace(-30.0, -3.0, 200), jnp.linspace(3.0, 30.0, 200)])
    xs = np.asarray(x)
    with np.errstate(over="ignore"):  # cosh overflows far out, where the exact derivative is 0 anyway
        exact = {
            "tanh": 1 / np.cosh(xs) ** 2,
            "sigmoid": np.exp(-np.abs(xs)) / (1 + np.exp(-np.abs(xs))) ** 2,
            "softplus": 1 / (1 + np.exp(-xs)),
            "elu": np.where(xs > 0, 1.0, np.exp(xs)),
        }
        if name == "gelu":
            u = np.sqrt(2 / np.pi) * (xs + 0.044715 * xs**3)
            exact["gelu"] = 0.5 * (1 + np.tanh(u)) + 0.5 * xs / np.cosh(u) ** 2 * np.sqrt(2 / np.pi) * (
                1 + 3 * 0.044715 * xs**2
            )
    got = np.asarray(getattr(F, f"{name}_vjp")(x, jnp.ones_like(x)))
    nonzero = exact[name] > 1e-300
    relative = np.abs(got[nonzero] - exact[name][nonzero]) / exact[name][nonzero]
    assert relative.max() < 1e-12


# exact GELU's float64 (float32) range: both tails down to where Phi(x) leaves the normal floats, and around 0;
# not around gelu's minimum at x ~ -0.75, where gelu' = 0 and any formula loses its relative precision
_EXACT_GELU_POINTS = {
    jnp.float64: np.concatenate([np.linspace(-30, -3, 271), np.linspace(-0.5, 0.5, 101), np.linspace(3, 30, 28)]),
    jnp.float32: np.concatenate([np.linspace(-12.5, -3, 96), np.linspace(-0.5, 0.5, 101), np.linspace(3, 30, 28)]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_exact_gelu_and_its_derivative_keep_relative_precision_in_the_tails(dtype):
    """Against 50-digit values at the very same inputs, elementwise: relative error within 2 (1 + x^2) eps, the
    condition number of gelu (1 + erf(x / sqrt 2) gave gelu(-10) = -0.0 and a 1% wrong gelu'(-10))."""
    import mpmath

    mpmath.mp.dps = 50
    x = jnp.asarray(_EXACT_GELU_POINTS[dtype], dtype)
    xs = [mpmath.mpf(float(v)) for v in np.asarray(x)]
    exact_forward = np.array([float(v * mpmath.ncdf(v)) for v in xs])
    exact_slope = np.array([float(mpmath.ncdf(v) + v * mpmath.npdf(v)) for v in xs])
    forward = np.asarray(F.gelu(x, approximate=False), np.float64)
    slope = np.asarray(F.gelu_vjp(x, jnp.ones_like(x), approximate=False), np.float64)
    allowed = 2 * (1 + np.asarray(x, np.float64) ** 2) * np.finfo(dtype).eps
    for what, got, exact in [("gelu", forward, exact_forward), ("gelu'", slope, exact_slope)]:
        nonzero = exact != 0  # gelu(0) = 0 exactly
        assert np.all(got[~nonzero] == 0), what
        worst = np.max(np.abs(got[nonzero] - exact[nonzero]) / np.abs(exact[nonzero]) / allowed[nonzero])
        assert worst <= 1, f"{what}: relative error {worst:.3g} x the allowance 2 (1 + x^2) eps"


def test_softplus_autodiff_is_exact_at_zero():
    assert float(jax.grad(F.softplus)(0.0)) == 0.5
    assert float(F.softplus_vjp(jnp.zeros(()), jnp.ones(()))) == 0.5


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: F.max_pool2d_vjp(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 2, 2, 1))),
            r"`dy` must have shape \(1, 2, 2, 2\)",
        ),
        (lambda: F.avg_pool2d_vjp(jnp.zeros((1, 4, 4, 2)), jnp.zeros(())), r"`dy` must have shape \(1, 2, 2, 2\)"),
        (lambda: F.global_avg_pool2d_vjp(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4))), r"`dy` must have shape \(2, 3\)"),
        (
            lambda: F.dense_vjp(jnp.zeros((2, 3)), jnp.zeros((3, 4)), None, jnp.zeros((2, 5))),
            r"`dy` must have shape \(2, 4\)",
        ),
        (lambda: F.relu_vjp(jnp.zeros((2, 3)), jnp.zeros((3,))), r"relu_vjp: `dy` must have the shape of `x`"),
        (lambda: F.gelu_vjp(jnp.zeros((2, 3)), jnp.zeros((2, 1))), r"gelu_vjp: `dy` must have the shape of `x`"),
        (
            lambda: F.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 4)), jnp.zeros((1,))),
            r"`b` must have shape \(4,\)",
        ),
        (lambda: F.dense(jnp.zeros((2, 3)), jnp.zeros((3, 4)), jnp.zeros((2, 2))), r"`b` must have shape \(4,\)"),
    ],
)
def test_wrong_cotangent_and_bias_shapes_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
