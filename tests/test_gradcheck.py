"""The checker: passes correct rules, catches wrong ones and names the layer and parameter."""

import pathlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
import jaxcnn.functional as F
from conftest import load_file, normal
from jaxcnn import nn
from models_for_tests import MODELS, WrongDense

ROOT = pathlib.Path(__file__).resolve().parents[1]


def data(name, batch=3, seed=0):
    build, input_shape, classes = MODELS[name]
    model = build()
    params, state = model.init(jax.random.key(seed), input_shape)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, *input_shape))
    y = jnp.asarray(np.random.default_rng(seed).integers(0, classes, batch))
    return model, params, state, x, y


def leaf_layer_paths(model, prefix=""):
    paths = []
    for name, layer in model.named_layers():
        path = f"{prefix}/{name}" if prefix else name
        paths += leaf_layer_paths(layer, path) if isinstance(layer, nn.Sequential) else [path]
    return paths


# one model in the default suite; the others (and the perturbed-point tests' models) with the slow cases
@pytest.mark.parametrize(
    "name", ["unseen", *(pytest.param(n, marks=pytest.mark.slow) for n in ("mnist_cnn", "every_layer", "nested"))]
)
def test_check_model_passes_on_correct_rules(name):
    model, params, state, x, y = data(name, batch=2 if name == "mnist_cnn" else 3)
    report = jc.gradcheck.check_model(model, params, state, x, y)
    assert report.ok, report.table()
    methods = {c.method for c in report.checks}
    assert methods == {
        "hand vs autodiff",
        "hand vs finite diff",
        "engine vs autodiff",
        "manual vs autodiff",
        "engine vs finite diff",
    }
    exact = [c for c in report.checks if "autodiff" in c.method]
    assert max(c.max_rel for c in exact) <= 1e-10
    # every layer is checked, and every parameter of the model
    layers = {c.layer for c in report.checks if c.scope == "layer"}
    assert layers == set(leaf_layer_paths(model))
    params_checked = {
        (c.layer, c.quantity) for c in report.checks if c.method == "engine vs autodiff" and c.quantity != "loss"
    }
    expected = {
        tuple(jax.tree_util.keystr(path, simple=True, separator="/").rsplit("/", 1))
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert expected == params_checked


@pytest.mark.slow  # float32 check_model at perturbed points runs by default in test_gradcheck_points.py
def test_check_model_float32():
    model, params, state, x, y = data("unseen")
    report = jc.gradcheck.check_model(model, params, state, x, y, dtype=jnp.float32)
    assert report.ok, report.table()
    assert report.dtype == "float32"
    assert "float32" in report.table().splitlines()[-1]


@dataclass(frozen=True)
class WrongTanh(nn.Tanh):
    """tanh with the classic mistake: derivative 1 - x^2 instead of 1 - tanh(x)^2."""

    def backward(self, params, residuals, dy):
        return dy * (1 - residuals.x**2), {}


def test_planted_wrong_weight_gradient_is_caught_and_named():
    model = nn.Sequential([nn.Conv2D(3, 3, padding="VALID"), nn.ReLU(), nn.Flatten(), WrongDense(4), nn.Dense(2)])
    params, state = model.init(jax.random.key(0), (6, 6, 1))
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 1))
    report = jc.gradcheck.check_model(model, params, state, x, jnp.array([0, 1]))
    assert not report.ok
    failed = {(c.layer, c.quantity, c.method) for c in report.failures()}
    assert ("Dense_0", "kernel", "hand vs autodiff") in failed
    assert ("Dense_0", "kernel", "engine vs autodiff") in failed
    assert ("Dense_0", "kernel", "manual vs autodiff") in failed
    # the gradient flowing into the layer below is untouched, so the blame stays with Dense_0/kernel
    assert {layer for layer, _, method in failed if method == "hand vs autodiff"} == {"Dense_0"}
    assert "FAIL" in report.table()


def test_model_rows_are_the_gradient_modes_of_loss_and_grads(monkeypatch):
    """Each model row compares the mode it names, as jc.backprop.loss_and_grads computes it (the path training
    takes), with autodiff's: spoil only the "manual" mode there and only the "manual vs autodiff" rows fail."""
    loss_and_grads = jc.backprop.loss_and_grads
    modes = []

    def spoiled(*args, gradients, **kwargs):
        modes.append(gradients)
        run = loss_and_grads(*args, gradients=gradients, **kwargs)
        if gradients != "manual":
            return run

        def doubled(*call_args, **call_kwargs):
            result = run(*call_args, **call_kwargs)
            return result._replace(grads=jax.tree.map(lambda g: 2 * g, result.grads))

        return doubled

    monkeypatch.setattr(jc.backprop, "loss_and_grads", spoiled)
    model = nn.Sequential([nn.Flatten(), nn.Dense(3), nn.Tanh(), nn.Dense(2)])
    params, state = model.init(jax.random.key(0), (2, 2, 1))
    x = jax.random.normal(jax.random.key(1), (2, 2, 2, 1))
    report = jc.gradcheck.check_model(
        model, params, state, x, jnp.array([0, 1]), layers=False, finite_differences=False, perturbations=0
    )
    assert sorted(modes) == ["autodiff", "engine", "manual"]
    rows = {(c.layer, c.quantity, c.method): c.ok for c in report.checks}
    assert {method for _, _, method in rows} == {"engine vs autodiff", "manual vs autodiff"}
    assert len(rows) == 2 * (1 + len(jax.tree.leaves(params)))  # the loss and every parameter, per mode
    for (layer, quantity, method), ok in rows.items():
        assert ok == (method == "engine vs autodiff" or quantity == "loss"), (layer, quantity, method)


def test_planted_wrong_activation_is_caught_upstream_too():
    model = nn.Sequential([nn.Conv2D(3, 3, padding="VALID"), WrongTanh(), nn.Flatten(), nn.Dense(2)])
    params, state = model.init(jax.random.key(0), (6, 6, 1))
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 1))
    report = jc.gradcheck.check_model(model, params, state, x, jnp.array([0, 1]))
    failed = {(c.layer, c.quantity, c.method) for c in report.failures()}
    assert ("WrongTanh_0", "input", "hand vs autodiff") in failed
    assert ("WrongTanh_0", "input", "hand vs finite diff") in failed
    # the wrong cotangent then spoils the conv's parameter gradients in the whole-model check
    assert ("Conv_0", "kernel", "engine vs autodiff") in failed


def test_custom_layer_example_passes():
    example = load_file("examples/custom_layer.py")
    report = example.main()
    assert report.ok
    assert {"Swish_0", "Swish_1"} <= {c.layer for c in report.checks}
    assert ("Swish_0", "beta") in {(c.layer, c.quantity) for c in report.checks if c.method == "engine vs autodiff"}


def test_custom_layer_with_wrong_backward_fails():
    example = load_file("examples/custom_layer.py")

    class BadSwish(example.Swish):
        def backward(self, params, residuals, dy):
            dx, grads = super().backward(params, residuals, dy)
            return dx, {"beta": 2 * grads["beta"]}

    model = nn.Sequential([nn.Flatten(), nn.Dense(5), BadSwish(), nn.Dense(2)])
    params, state = model.init(jax.random.key(0), (3, 3, 1))
    report = jc.gradcheck.check_model(model, params, state, jnp.ones((2, 3, 3, 1)), jnp.array([0, 1]))
    assert not report.ok
    assert {(c.layer, c.quantity) for c in report.failures()} >= {("BadSwish_0", "beta")}


def test_check_op_on_a_user_op():
    """The example's swish, registered with F.register(swish, swish_vjp): check_op finds its rule; a wrong rule
    given as vjp= fails on the argument it gets wrong."""
    example = load_file("examples/custom_layer.py")
    x, beta = normal(0, (4, 5)), jnp.asarray(1.3)
    report = jc.gradcheck.check_op(example.swish, x, beta)
    assert report.ok, report.table()
    assert len(report.checks) == 8  # two rows per argument, at the given and at the perturbed point
    wrong = lambda x, beta, dy: (example.swish_vjp(x, beta, dy)[0], -example.swish_vjp(x, beta, dy)[1])
    report = jc.gradcheck.check_op(example.swish, x, beta, vjp=wrong)
    assert {c.quantity for c in report.failures()} == {"arg 1"}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_check_op_on_registered_ops(dtype):
    x = normal(0, (2, 7, 6, 4))
    for forward, args, options in [
        (F.conv2d, (x, normal(1, (3, 3, 2, 4)), normal(2, (4,))), dict(stride=2, padding="SAME", groups=2)),
        (F.max_pool2d, (x,), dict(window=3, stride=2, padding=1)),
        (F.gelu, (x,), dict(approximate=False)),
        (F.softmax_cross_entropy, (normal(3, (5, 3)), jnp.array([0, 2, 1, 1, 0])), {}),
    ]:
        report = jc.gradcheck.check_op(forward, *args, dtype=dtype, **options)
        assert report.ok, report.table()


def test_bad_dtype_is_a_clear_error():
    model, params, state, x, y = data("unseen")
    with pytest.raises(ValueError, match="`dtype` must be float64 or float32, got int32"):
        jc.gradcheck.check_model(model, params, state, x, y, dtype=jnp.int32)


def test_check_model_works_without_global_x64(monkeypatch):
    """float64 checks switch 64-bit types on locally when the program runs with the float32 default."""
    model, params, state, x, y = data("unseen")
    jax.config.update("jax_enable_x64", False)
    try:
        report = jc.gradcheck.check_model(model, params, state, x, y, layers=False)
    finally:
        jax.config.update("jax_enable_x64", True)
    assert report.ok and report.dtype == "float64"
    assert max(c.max_rel for c in report.checks if "autodiff" in c.method) <= 1e-10


@dataclass(frozen=True)
class ConstantStatisticsBatchNorm(nn.BatchNorm):
    """BatchNorm with the classic mistake: dx treats the batch mean and variance as constants,
    ``dx = dy * scale / sqrt(var + eps)``, which gives the bias before it a gradient that is not zero."""

    def backward(self, params, residuals, dy):
        _, grads = super().backward(params, residuals, dy)
        scale = params["scale"] / jnp.sqrt(jnp.var(residuals.x, axis=0) + self.epsilon)
        return dy * scale[None], grads


def batch_norm_after_bias(norm=nn.BatchNorm, seed=0):
    """Dense -> BatchNorm: Dense_0's bias has a gradient of exactly zero (issue 18's false alarm, seeds 0, 1, 3)."""
    model = nn.Sequential([nn.Dense(5), norm(), nn.ReLU(), nn.Dense(3)])
    params, state = model.init(jax.random.key(seed), (4,))
    return model, params, state, normal(seed + 10, (8, 4)), jnp.arange(8) % 3


def test_structurally_zero_gradients_are_zero_gradient_rows_not_false_alarms():
    """Issue 18: the loss did not change by a bit under the step, the round-off allowance was 0 and the engine's
    1e-17 failed (at most points, for every seed tried). At 10 points (one compile, the points rerun it) the
    zero-gradient rows pass, named "zero gradient"; every other parameter passes as an ordinary "ok"."""
    model, params, state, x, y = batch_norm_after_bias()
    report = jc.gradcheck.check_model(model, params, state, x, y, perturbations=9, layers=False)
    assert report.ok, report.table()
    zero = [c for c in report.checks if c.note == "zero gradient"]
    assert {(c.layer, c.quantity, c.method) for c in zero} == {("Dense_0", "bias", "engine vs finite diff")}
    assert len({c.point for c in zero}) == 10
    assert "zero gradient" in report.table() and report.summary().endswith("all checks passed (10 on a zero gradient)")


def test_a_wrong_rule_on_a_zero_gradient_still_fails():
    """The floor is round-off: a hand rule that gives the bias before a BatchNorm a real gradient fails there."""
    model, params, state, x, y = batch_norm_after_bias(ConstantStatisticsBatchNorm)
    report = jc.gradcheck.check_model(model, params, state, x, y, layers=False, perturbations=0)
    failed = {(c.layer, c.quantity, c.method): c for c in report.failures()}
    assert failed[("Dense_0", "bias", "engine vs finite diff")].note == ""
    assert ("Dense_0", "bias", "engine vs autodiff") in failed
    assert ("Dense_0", "kernel", "engine vs finite diff") in failed


def test_integer_inputs_are_checked_without_an_input_row():
    model, params, state, _, y = data("unseen")
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 9, 10, 2)), jnp.uint8)
    report = jc.gradcheck.check_model(model, params, state, x, y)
    assert report.ok, report.table()
    assert ("Conv_0", "input") not in {(c.layer, c.quantity) for c in report.checks}


def test_finite_differences_are_not_swamped_by_large_outputs():
    """Large outputs that do not depend on `a` must not hide a wrong (zero) gradient for `a`."""
    op = lambda x, a: jnp.concatenate([1e6 * x, 1e-3 * jnp.sin(a)])
    wrong = lambda x, a, dy: (1e6 * dy[:4], jnp.zeros_like(a))
    report = jc.gradcheck.check_op(op, normal(0, (4, 3)), normal(1, (4, 3)), vjp=wrong)
    failed = {(c.quantity, c.method) for c in report.failures()}
    assert ("arg 1", "hand vs finite diff") in failed and ("arg 1", "hand vs autodiff") in failed


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_float32_finite_differences_are_not_flaky_on_big_batches(seed):
    model, params, state, x, y = data("mnist_cnn", batch=64, seed=seed)
    report = jc.gradcheck.check_model(model, params, state, x, y, dtype=jnp.float32, layers=False)
    assert report.ok, report.table()


def test_seed_must_be_non_negative():
    model, params, state, x, y = data("unseen")
    with pytest.raises(ValueError, match=r"`seed` must be a non-negative int, got -1"):
        jc.gradcheck.check_model(model, params, state, x, y, seed=-1)


@pytest.mark.slow  # mnist_cnn at 28x28 (about 15 s)
@pytest.mark.parametrize("name", ["mnist_cnn", pytest.param("every_layer", marks=pytest.mark.slow)])
def test_zero_background_images_at_initialisation_pass(name):
    """Zero biases on zero pixels put pre-activations exactly on ReLU kinks; the checks must not trip on them."""
    model, params, state, x, y = data(name, batch=2)
    x = x.at[:, : x.shape[1] // 2].set(0.0)
    report = jc.gradcheck.check_model(model, params, state, x, y)
    assert report.ok, report.table()


def test_check_op_cotangents_are_not_the_callers_own_draws():
    """numpy's default_rng((s, 0)) draws what default_rng(s) draws: the checker tags its seed paths, so the
    cotangent of check_op(seed=s) is never the input a test drew with default_rng(s) (which would make, e.g.,
    batch_norm's true dx vanish and leave only round-off to compare)."""
    from jaxcnn.gradcheck.numerics import normal as _normal

    shape = (4, 3, 3, 2)
    for seed in (0, 1, 7):
        users = np.random.default_rng(seed).standard_normal(shape)
        assert not np.allclose(_normal((seed, 0), shape), users)
        assert not np.allclose(_normal((seed,), shape), users)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape))
    ones, zeros = jnp.ones((2,)), jnp.zeros((2,))
    report = jc.gradcheck.check_op(F.batch_norm, x, 1.5 * ones, zeros, zeros, ones, seed=0)
    assert report.ok, report.table()
