"""Batch, layer and group norm: hand VJPs against jax.vjp (float64 and float32), forward parity with
flax.linen, finite differences through gradcheck.check_op, running statistics, validation and bfloat16.
Table-driven: module-level tables of configurations crossed with DTYPES (and epsilons / modes)."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DTYPES, assert_trees_close, normal, relative_error
from jaxcnn import gradcheck
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

DTYPE_IDS = ["float64", "float32"]
EPSILONS = [0.0, 1e-5, 1.0]

# (x shape, scale?, bias?): NHWC with odd sizes, channels 1 and 3+, dense (N, C), a rank-3 input, batch 1 x 1x1
BN_CASES = [
    ((3, 5, 7, 4), True, True),
    ((2, 3, 5, 1), True, False),
    ((6, 3), False, True),
    ((5, 9), True, True),
    ((4, 7, 2), False, False),
    ((1, 1, 1, 3), True, True),  # batch of 1, 1x1 spatial: in train mode var = 0 and y = bias
]
# (x shape, scale?, bias?)
LN_CASES = [
    ((3, 5, 7, 4), True, True),
    ((6, 3), True, False),
    ((2, 3, 5, 9), False, True),
    ((4, 7, 5), False, False),
    ((3, 1), True, True),  # one feature: var = 0, y = bias
]
# (x shape, groups, scale?, bias?): groups 1 (layer norm over H, W, C), 2, and C (instance norm)
GN_CASES = [
    ((3, 5, 7, 6), 1, True, True),
    ((3, 5, 7, 6), 2, True, False),
    ((3, 5, 7, 6), 6, False, True),
    ((2, 3, 5, 4), 4, True, True),
    ((4, 9), 3, True, True),  # dense features, 3 channels per group
    ((4, 9), 1, False, False),
    ((2, 3, 5, 1), 1, True, True),  # one channel
    ((1, 1, 1, 3), 3, True, True),  # one cell per group: var = 0, y = bias
]


def _reduced(shape, op, groups=1):
    """Number of cells each statistic averages over."""
    if op == "batch":
        return int(np.prod(shape[:-1]))
    if op == "layer":
        return shape[-1]
    return int(np.prod(shape[1:-1])) * (shape[-1] // groups)


def _epsilons(shape, op, groups=1, train=True):
    """EPSILONS, without 0 where a statistic sees a single cell (var = 0, so y would be 0/0)."""
    single = train and _reduced(shape, op, groups) == 1
    return [epsilon for epsilon in EPSILONS if not (epsilon == 0 and single)]


def _params(shape, scale, bias, dtype, seed=10):
    c = shape[-1]
    s = 1 + 0.5 * normal(seed, (c,), dtype) if scale else None
    b = normal(seed + 1, (c,), dtype) if bias else None
    return s, b


def _running(c, dtype, seed=20):
    mean = normal(seed, (c,), dtype)
    var = jnp.asarray(0.5 + np.random.default_rng(seed + 1).random(c), dtype)
    return mean, var


def _x(shape, dtype, seed=0):
    return 1.5 * normal(seed, shape, dtype) + 0.5


# -- hand VJP vs jax.vjp ------------------------------------------------------------------------------------


def _compare(forward, rule, shape, has_scale, has_bias, epsilons, dtype, what):
    """The hand rule against jax.vjp of the forward at every epsilon (one compiled program for all of them):
    dtypes, None for absent parameters, and every cotangent within the dtype's tolerance."""
    x, dy = _x(shape, dtype), normal(7, shape, dtype)
    scale, bias = _params(shape, has_scale, has_bias, dtype)

    @jax.jit
    def hand_and_autodiff(x, scale, bias, dy):
        return [
            (
                rule(x, scale, bias, dy, epsilon=epsilon),
                jax.vjp(lambda x, s, b, epsilon=epsilon: forward(x, s, b, epsilon=epsilon), x, scale, bias)[1](dy),
            )
            for epsilon in epsilons
        ]

    for epsilon, (got, expected) in zip(epsilons, hand_and_autodiff(x, scale, bias, dy), strict=True):
        label = f"{what} eps={epsilon}"
        dx, dscale, dbias = got
        assert (dscale is None) == (scale is None) and (dbias is None) == (bias is None), label
        assert all(c.dtype == dtype for c in got if c is not None), label
        present = tuple(c for c in got if c is not None)
        assert_trees_close(present, tuple(e for e in expected if e is not None), dtype, label)


@pytest.mark.sample(3)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", BN_CASES, ids=[f"bn{i}" for i in range(len(BN_CASES))])
def test_batch_norm_vjp_matches_autodiff(case, train, dtype):
    """The cotangent flows through y only (the running statistics are state). In training mode the rule gets
    the forward's saved batch statistics, as the BatchNorm layer passes them."""
    shape, has_scale, has_bias = case
    running = _running(shape[-1], dtype)
    options = dict(train=train, momentum=0.9)

    def rule(x, s, b, dy, epsilon):
        stats = batch_norm_with_stats(x, s, b, *running, epsilon=epsilon, **options)[3]
        return batch_norm_vjp(x, s, b, *running, dy, epsilon=epsilon, stats=stats, **options)[:3]

    _compare(
        lambda x, s, b, epsilon: batch_norm(x, s, b, *running, epsilon=epsilon, **options)[0],
        rule,
        shape,
        has_scale,
        has_bias,
        _epsilons(shape, "batch", train=train),
        dtype,
        f"batch_norm {case} train={train}",
    )


@pytest.mark.sample(2)  # 4 of the 10 (test_functional_convention.py checks two more in float64)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", LN_CASES, ids=[f"ln{i}" for i in range(len(LN_CASES))])
def test_layer_norm_vjp_matches_autodiff(case, dtype):
    shape, has_scale, has_bias = case
    epsilons = _epsilons(shape, "layer")
    _compare(layer_norm, layer_norm_vjp, shape, has_scale, has_bias, epsilons, dtype, f"layer_norm {case}")


@pytest.mark.sample(3)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", GN_CASES, ids=[f"gn{i}" for i in range(len(GN_CASES))])
def test_group_norm_vjp_matches_autodiff(case, dtype):
    shape, groups, has_scale, has_bias = case
    _compare(
        lambda x, s, b, epsilon: group_norm(x, s, b, groups=groups, epsilon=epsilon),
        lambda x, s, b, dy, epsilon: group_norm_vjp(x, s, b, dy, groups=groups, epsilon=epsilon),
        shape,
        has_scale,
        has_bias,
        _epsilons(shape, "group", groups),
        dtype,
        f"group_norm {case}",
    )


def _reductions(jaxpr, size) -> int:
    """Reductions of arrays of ``size`` elements in a jaxpr (its sub-jaxprs included)."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("reduce_") and eqn.invars[0].aval.size == size:
            count += 1
        count += sum(_reductions(sub.jaxpr, size) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    return count


def test_saved_batch_statistics_spare_the_backward_two_reductions():
    """With the forward's (mean, inv_std) the backward reduces x-sized arrays twice (dbias, dscale), not four
    times (the mean and variance again), and gives the same cotangents; in eval mode there are none to save."""
    x, dy = _x((3, 5, 7, 4), jnp.float64), normal(7, (3, 5, 7, 4))
    scale, bias = _params(x.shape, True, True, jnp.float64)
    running = _running(4, jnp.float64)
    y, new_mean, new_var, stats = batch_norm_with_stats(x, scale, bias, *running)
    for got, expected in zip((y, new_mean, new_var), batch_norm(x, scale, bias, *running), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert isinstance(stats, BatchStatistics) and stats.mean.shape == stats.inv_std.shape == (4,)
    flat = np.asarray(x).reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(stats.inv_std), 1 / np.sqrt(flat.var(axis=0) + 1e-5), rtol=1e-14)
    assert batch_norm_with_stats(x, scale, bias, *running, train=False)[3] is None

    def backward(stats):
        return jax.make_jaxpr(lambda x, dy: batch_norm_vjp(x, scale, bias, *running, dy, stats=stats)[:3])(x, dy)

    assert _reductions(backward(stats).jaxpr, x.size) == 2
    assert _reductions(backward(None).jaxpr, x.size) == 4
    saved = batch_norm_vjp(x, scale, bias, *running, dy, stats=stats)[:3]
    recomputed = batch_norm_vjp(x, scale, bias, *running, dy)[:3]
    for a, b in zip(saved, recomputed, strict=True):
        assert relative_error(a, b) <= 1e-14


def test_single_cell_statistics_give_y_equal_bias_and_zero_dx():
    """Batch of 1 with 1x1 spatial in train mode: var = 0, so y = bias and dx = 0 (jax.vjp agrees exactly)."""
    x, dy = normal(0, (1, 1, 1, 3)), normal(1, (1, 1, 1, 3))
    scale, bias = normal(2, (3,)), normal(3, (3,))
    running_mean, running_var = _running(3, jnp.float64)
    y, mean, var = batch_norm(x, scale, bias, running_mean, running_var)
    np.testing.assert_array_equal(np.asarray(y).reshape(3), np.asarray(bias))
    dx, dscale, dbias, drunning_mean, drunning_var = batch_norm_vjp(x, scale, bias, running_mean, running_var, dy)
    assert drunning_mean is None and drunning_var is None  # state, not differentiated
    forward = lambda x, s, b: batch_norm(x, s, b, running_mean, running_var)[0]
    auto = jax.vjp(forward, x, scale, bias)[1](dy)
    np.testing.assert_array_equal(np.asarray(dx), 0.0)
    np.testing.assert_array_equal(np.asarray(dscale), 0.0)
    np.testing.assert_array_equal(np.asarray(dbias), np.asarray(dy).reshape(3))
    for got, expected in zip((dx, dscale, dbias), auto, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    np.testing.assert_allclose(np.asarray(var), 0.9 * np.asarray(running_var), rtol=1e-15)


@pytest.mark.parametrize("epsilon", [1e-5, 1.0])
def test_constant_channels(epsilon):
    """A constant channel normalises to 0 (y = bias); its gradients still match autodiff."""
    x = np.array(normal(0, (3, 5, 7, 4)))
    x[..., 1] = 0.3
    x = jnp.asarray(x)
    scale, bias = normal(1, (4,)), normal(2, (4,))
    running_mean, running_var = _running(4, jnp.float64)
    dy = normal(3, x.shape)

    @jax.jit
    def outputs_and_cotangents(x, scale, bias, dy):
        bn = lambda x, s, b: batch_norm(x, s, b, running_mean, running_var, epsilon=epsilon)[0]
        gn = lambda x, s, b: group_norm(x, s, b, groups=4, epsilon=epsilon)
        return {
            "y": (bn(x, scale, bias), gn(x, scale, bias)),
            "batch_norm": (
                batch_norm_vjp(x, scale, bias, running_mean, running_var, dy, epsilon=epsilon)[:3],
                jax.vjp(bn, x, scale, bias)[1](dy),
            ),
            "group_norm": (
                group_norm_vjp(x, scale, bias, dy, groups=4, epsilon=epsilon),
                jax.vjp(gn, x, scale, bias)[1](dy),
            ),
        }

    results = outputs_and_cotangents(x, scale, bias, dy)
    for y in results.pop("y"):
        np.testing.assert_allclose(np.asarray(y[..., 1]), float(bias[1]), atol=1e-12)
    for name, (got, expected) in results.items():
        assert_trees_close(got, expected, jnp.float64, name)


# -- forward parity with flax.linen ----------------------------------------------------------------------------


def _flax_variables(scale, bias, **collections):
    params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
    return {"params": params, **collections} if params else dict(collections)


FLAX_TOLERANCE = 1e-12  # float64; Flax's one-pass variance E[x^2] - E[x]^2 differs from ours by round-off only

# (x shape, scale?, bias?, momentum, epsilon)
BN_FLAX_CASES = [
    ((3, 5, 7, 4), True, True, 0.9, 1e-5),
    ((6, 3), False, True, 0.99, 1.0),
    ((2, 3, 5, 1), True, False, 0.0, 0.0),
    ((1, 1, 1, 3), True, True, 1.0, 1e-3),
    ((4, 7, 2), False, False, 0.5, 1e-5),
]
# (x shape, scale?, bias?, epsilon)
LN_FLAX_CASES = [((3, 5, 7, 4), True, True, 1e-6), ((6, 3), True, False, 1.0), ((2, 3, 5, 9), False, True, 0.0)]
# (x shape, groups, scale?, bias?, epsilon)
GN_FLAX_CASES = [
    ((3, 5, 7, 6), 1, True, True, 1e-6),
    ((3, 5, 7, 6), 2, True, False, 1.0),
    ((3, 5, 7, 6), 6, False, True, 0.0),
    ((4, 9), 3, True, True, 1e-3),
    ((2, 3, 5, 1), 1, False, False, 1e-6),
    ((1, 1, 1, 3), 3, True, True, 1e-6),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", BN_FLAX_CASES, ids=[f"bn{i}" for i in range(len(BN_FLAX_CASES))])
def test_batch_norm_matches_flax(case, train):
    shape, has_scale, has_bias, momentum, epsilon = case
    x = _x(shape, jnp.float64)
    scale, bias = _params(shape, has_scale, has_bias, jnp.float64)
    running_mean, running_var = _running(shape[-1], jnp.float64)
    module = nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        use_scale=has_scale,
        use_bias=has_bias,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
    )
    variables = _flax_variables(scale, bias, batch_stats={"mean": running_mean, "var": running_var})

    @jax.jit
    def ours_and_flax(x, variables):
        ours = batch_norm(x, scale, bias, running_mean, running_var, train=train, momentum=momentum, epsilon=epsilon)
        if train:
            y, updates = module.apply(variables, x, mutable=["batch_stats"])
            return ours, (y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"])
        return ours, (module.apply(variables, x), running_mean, running_var)

    ours, theirs = ours_and_flax(x, variables)
    # the comparison really is in float64 (a float32 path would miss the tolerance by 5 orders of magnitude)
    assert all(a.dtype == jnp.float64 for a in (*ours, *theirs))
    for what, a, b in zip(("y", "running mean", "running var"), ours, theirs, strict=True):
        assert relative_error(a, b) <= FLAX_TOLERANCE, what


@pytest.mark.parametrize("case", LN_FLAX_CASES, ids=[f"ln{i}" for i in range(len(LN_FLAX_CASES))])
def test_layer_norm_matches_flax(case):
    shape, has_scale, has_bias, epsilon = case
    x = _x(shape, jnp.float64)
    scale, bias = _params(shape, has_scale, has_bias, jnp.float64)
    module = nn.LayerNorm(epsilon=epsilon, use_scale=has_scale, use_bias=has_bias, param_dtype=jnp.float64)
    expected = jax.jit(module.apply)(_flax_variables(scale, bias), x)
    y = layer_norm(x, scale, bias, epsilon=epsilon)
    assert expected.dtype == y.dtype == jnp.float64
    assert relative_error(y, expected) <= FLAX_TOLERANCE


@pytest.mark.parametrize("case", GN_FLAX_CASES, ids=[f"gn{i}" for i in range(len(GN_FLAX_CASES))])
def test_group_norm_matches_flax(case):
    shape, groups, has_scale, has_bias, epsilon = case
    x = _x(shape, jnp.float64)
    scale, bias = _params(shape, has_scale, has_bias, jnp.float64)
    module = nn.GroupNorm(
        num_groups=groups, epsilon=epsilon, use_scale=has_scale, use_bias=has_bias, param_dtype=jnp.float64
    )
    expected = jax.jit(module.apply)(_flax_variables(scale, bias), x)
    y = group_norm(x, scale, bias, groups=groups, epsilon=epsilon)
    assert expected.dtype == y.dtype == jnp.float64
    assert relative_error(y, expected) <= FLAX_TOLERANCE


def test_flax_defaults_match_ours():
    assert nn.LayerNorm().epsilon == 1e-6 and nn.GroupNorm().epsilon == 1e-6
    assert nn.BatchNorm().epsilon == 1e-5 and nn.BatchNorm().momentum == 0.99  # ours: 0.9, set explicitly above


# -- finite differences (gradcheck.check_op) --------------------------------------------------------------------

FD_CASES = [
    (batch_norm, "bn-train", dict(train=True, momentum=0.9, epsilon=1e-5), (3, 5, 7, 4)),
    (batch_norm, "bn-eval", dict(train=False, epsilon=1e-5), (5, 3)),
    (batch_norm, "bn-no-affine", dict(train=True, epsilon=0.0), (4, 3, 3, 2)),
    (layer_norm, "ln", dict(epsilon=1e-6), (3, 5, 7, 4)),
    (group_norm, "gn", dict(groups=2, epsilon=1e-6), (2, 5, 7, 6)),
    (group_norm, "gn-no-affine", dict(groups=3, epsilon=1.0), (3, 9)),
]


@pytest.mark.sample(3)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("forward,name,options,shape", FD_CASES, ids=[c[1] for c in FD_CASES])
def test_finite_differences_through_check_op(forward, name, options, shape, dtype):
    affine = "no-affine" not in name
    scale, bias = _params(shape, affine, affine, jnp.float64)
    # x's seed must differ from check_op's cotangent seed: np.random.default_rng((0, 0)) draws what
    # default_rng(0) does, and a dy proportional to x is orthogonal to every direction that changes y
    args = (_x(shape, jnp.float64, seed=3), scale, bias)
    if forward is batch_norm:
        args = (*args, *_running(shape[-1], jnp.float64))
    report = gradcheck.check_op(forward, *args, dtype=dtype, **options)
    assert report.ok, report.table()
    assert {c.quantity for c in report.checks} == ({"arg 0", "arg 1", "arg 2"} if affine else {"arg 0"})
    assert {c.method for c in report.checks} == {"hand vs autodiff", "hand vs finite diff"}


def test_check_op_catches_a_wrong_batch_norm_rule():
    x = _x((4, 3), jnp.float64)
    (scale, bias), (mean, var) = _params(x.shape, True, True, jnp.float64), _running(3, jnp.float64)

    def eval_rule_in_train_mode(x, scale, bias, mean, var, dy, **options):
        return batch_norm_vjp(x, scale, bias, mean, var, dy, **{**options, "train": False})[0]

    report = gradcheck.check_op(batch_norm, x, scale, bias, mean, var, vjp=eval_rule_in_train_mode, argnums=(0,))
    assert not report.ok and {c.quantity for c in report.failures()} == {"arg 0"}


# -- running statistics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(3, 5, 7, 4), (6, 2), (1, 1, 1, 3)])
def test_running_statistics_update(shape, momentum):
    x = _x(shape, jnp.float64)
    running_mean, running_var = _running(shape[-1], jnp.float64)
    _, new_mean, new_var = batch_norm(x, None, None, running_mean, running_var, momentum=momentum)
    flat = np.asarray(x).reshape(-1, shape[-1])
    mean = flat.mean(axis=0)
    biased_var = ((flat - mean) ** 2).mean(axis=0)
    np.testing.assert_allclose(
        np.asarray(new_mean), momentum * np.asarray(running_mean) + (1 - momentum) * mean, rtol=1e-13, atol=1e-15
    )
    np.testing.assert_allclose(
        np.asarray(new_var), momentum * np.asarray(running_var) + (1 - momentum) * biased_var, rtol=1e-13, atol=1e-15
    )


def test_eval_mode_uses_and_returns_the_running_statistics():
    x = _x((3, 5, 7, 4), jnp.float64)
    scale, bias = _params(x.shape, True, True, jnp.float64)
    running_mean, running_var = _running(4, jnp.float64)
    y, new_mean, new_var = batch_norm(x, scale, bias, running_mean, running_var, train=False, epsilon=1e-3)
    assert new_mean is running_mean and new_var is running_var
    expected = (np.asarray(x) - np.asarray(running_mean)) / np.sqrt(np.asarray(running_var) + 1e-3)
    expected = expected * np.asarray(scale) + np.asarray(bias)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-13, atol=1e-13)


def test_running_statistics_keep_their_dtype():
    x = _x((4, 3, 3, 2), jnp.float32)
    running_mean, running_var = _running(2, jnp.float64)
    y, new_mean, new_var = batch_norm(x, None, None, running_mean, running_var)
    assert new_mean.dtype == new_var.dtype == jnp.float64
    assert y.dtype == jnp.float32


def test_batch_norm_under_jit():
    x = _x((3, 5, 7, 4), jnp.float64)
    running = _running(4, jnp.float64)
    jitted = jax.jit(batch_norm, static_argnames=("train", "momentum", "epsilon"))
    for got, expected in zip(jitted(x, None, None, *running), batch_norm(x, None, None, *running), strict=True):
        assert relative_error(got, expected) <= 1e-14


# -- validation ------------------------------------------------------------------------------------------------

_X = jnp.zeros((2, 3, 3, 6))
_C = jnp.ones((6,))


def _bn(**kw):
    args = dict(x=_X, scale=_C, bias=_C, running_mean=_C, running_var=_C)
    options = {k: kw.pop(k) for k in ("train", "momentum", "epsilon") if k in kw}
    args.update(kw)
    return batch_norm(*args.values(), **options)


def _bn_vjp(**kw):
    dy = kw.pop("dy", _X)
    options = {k: kw.pop(k) for k in ("train", "momentum", "epsilon", "stats") if k in kw}
    args = dict(x=_X, scale=_C, bias=_C, running_mean=_C, running_var=_C)
    args.update(kw)
    return batch_norm_vjp(*args.values(), dy, **options)


VALIDATION = [
    (lambda: _bn(x=jnp.zeros((6,))), r"batch_norm: `x` must have rank >= 2 \(N, \.\.\., C\), got shape \(6,\)"),
    (lambda: _bn(x=jnp.zeros((2, 6), jnp.int32)), r"batch_norm: `x` must be a floating-point array, got dtype int32"),
    (lambda: _bn(scale=jnp.ones((5,))), r"batch_norm: `scale` must have shape \(6,\), got \(5,\)"),
    (lambda: _bn(bias=jnp.ones((1, 6))), r"batch_norm: `bias` must have shape \(6,\), got \(1, 6\)"),
    (lambda: _bn(running_mean=jnp.ones((3,))), r"batch_norm: `running_mean` must have shape \(6,\), got \(3,\)"),
    (lambda: _bn(running_var=None), r"batch_norm: `running_var` must have shape \(6,\), got None"),
    (lambda: _bn(epsilon=-1e-5), r"batch_norm: `epsilon` must be a finite number >= 0, got -1e-05"),
    (lambda: _bn(epsilon=float("nan")), r"batch_norm: `epsilon` must be a finite number >= 0, got nan"),
    (lambda: _bn(epsilon=float("inf")), r"batch_norm: `epsilon` must be a finite number >= 0, got inf"),
    (lambda: _bn(epsilon="small"), r"batch_norm: `epsilon` must be a finite number >= 0, got 'small'"),
    (lambda: _bn(momentum=1.5), r"batch_norm: `momentum` must be a finite number in \[0, 1\], got 1.5"),
    (lambda: _bn(momentum=-0.1), r"batch_norm: `momentum` must be a finite number in \[0, 1\], got -0.1"),
    (lambda: _bn(momentum=True), r"batch_norm: `momentum` must be a finite number in \[0, 1\], got True"),
    (lambda: _bn(train="yes"), r"batch_norm: `train` must be a bool, got 'yes'"),
    (lambda: _bn_vjp(dy=jnp.zeros((2, 6))), r"batch_norm_vjp: `dy` must have the shape of `x` \(2, 3, 3, 6\)"),
    (lambda: _bn_vjp(scale=jnp.ones((4,))), r"batch_norm_vjp: `scale` must have shape \(6,\), got \(4,\)"),
    (lambda: _bn_vjp(momentum=2.0), r"batch_norm_vjp: `momentum` must be a finite number in \[0, 1\]"),
    (lambda: _bn_vjp(stats=(_C, _C), train=False), r"batch_norm_vjp: `stats` must be the BatchStatistics of a train"),
    (lambda: _bn_vjp(stats=_C), r"batch_norm_vjp: `stats` must be the BatchStatistics of a train=True forward"),
    (lambda: _bn_vjp(stats=(_C, _C[:2])), r"batch_norm_vjp: `stats.inv_std` must have shape \(6,\), got \(2,\)"),
    (lambda: layer_norm(jnp.zeros((6,))), r"layer_norm: `x` must have rank >= 2"),
    (lambda: layer_norm(_X, jnp.ones((3,))), r"layer_norm: `scale` must have shape \(6,\), got \(3,\)"),
    (lambda: layer_norm(_X, None, jnp.ones((7,))), r"layer_norm: `bias` must have shape \(6,\), got \(7,\)"),
    (lambda: layer_norm(_X, epsilon=-1.0), r"layer_norm: `epsilon` must be a finite number >= 0, got -1.0"),
    (lambda: layer_norm_vjp(_X, None, None, jnp.zeros((2, 3))), r"layer_norm_vjp: `dy` must have the shape of `x`"),
    (lambda: layer_norm_vjp(_X, _C, None, _X, epsilon=None), r"layer_norm_vjp: `epsilon` must be a finite number"),
    (lambda: group_norm(_X, groups=4), r"group_norm: channels \(=6\) must be divisible by `groups` \(=4\)"),
    (lambda: group_norm(_X, groups=0), r"group_norm: `groups` must be a positive int, got 0"),
    (lambda: group_norm(_X, groups=1.5), r"group_norm: `groups` must be a positive int, got 1.5"),
    (lambda: group_norm(jnp.zeros((6,)), groups=1), r"group_norm: `x` must have rank >= 2"),
    (lambda: group_norm(_X, jnp.ones((2,)), groups=2), r"group_norm: `scale` must have shape \(6,\), got \(2,\)"),
    (lambda: group_norm(_X, groups=2, epsilon=-0.5), r"group_norm: `epsilon` must be a finite number >= 0"),
    (lambda: group_norm_vjp(_X, None, None, _X, groups=5), r"group_norm_vjp: channels \(=6\) must be divisible"),
    (lambda: group_norm_vjp(_X, None, None, _X[:1], groups=2), r"group_norm_vjp: `dy` must have the shape of `x`"),
]


@pytest.mark.parametrize("call,message", VALIDATION, ids=[f"error{i}" for i in range(len(VALIDATION))])
def test_validation_errors_are_one_line_and_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


# -- bfloat16 --------------------------------------------------------------------------------------------------

BF16_CALLS = [
    ("batch_norm", lambda x, s, b: batch_norm(x, s, b, *_running(4, jnp.float32))[0]),
    ("batch_norm-eval", lambda x, s, b: batch_norm(x, s, b, *_running(4, jnp.float32), train=False)[0]),
    ("layer_norm", lambda x, s, b: layer_norm(x, s, b)),
    ("group_norm", lambda x, s, b: group_norm(x, s, b, groups=2)),
]


@pytest.mark.parametrize("name,call", BF16_CALLS, ids=[c[0] for c in BF16_CALLS])
def test_bfloat16_forward(name, call):
    # a large offset and many cells: statistics accumulated in bfloat16 would be far off
    x64 = 100 + normal(0, (8, 16, 16, 4))
    x = x64.astype(jnp.bfloat16)
    scale, bias = _params(x.shape, True, True, jnp.float64)
    y = call(x, scale.astype(jnp.bfloat16), bias.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    reference = call(x.astype(jnp.float64), scale.astype(jnp.bfloat16).astype(jnp.float64), bias.astype(jnp.bfloat16))
    assert np.all(np.isfinite(np.asarray(y, np.float64)))
    # bfloat16 keeps 8 bits of mantissa: the output rounds by up to 4e-3, and the scale and bias by as much again
    assert relative_error(y, reference) < 2e-2, name


def test_bfloat16_vjps_return_bfloat16():
    x = normal(0, (2, 5, 5, 4)).astype(jnp.bfloat16)
    scale, bias = jnp.ones((4,), jnp.bfloat16), jnp.zeros((4,), jnp.bfloat16)
    dy = normal(1, x.shape).astype(jnp.bfloat16)
    running_mean, running_var = jnp.zeros((4,), jnp.float32), jnp.ones((4,), jnp.float32)
    _, new_mean, new_var = batch_norm(x, scale, bias, running_mean, running_var)
    assert new_mean.dtype == new_var.dtype == jnp.float32
    for got in (
        batch_norm_vjp(x, scale, bias, running_mean, running_var, dy)[:3],
        layer_norm_vjp(x, scale, bias, dy),
        group_norm_vjp(x, scale, bias, dy, groups=2),
    ):
        assert [c.dtype for c in got] == [jnp.bfloat16] * 3
        assert all(np.all(np.isfinite(np.asarray(c, np.float32))) for c in got)
