"""Deeper networks: Residual, BatchNorm, Dropout, the ResNets and the autoencoder -- their layouts, the three gradient
paths (engine, manual bridge, autodiff) and running statistics agreeing, the gradient checker, and train steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcnn as jc
import jaxcnn.functional as F
from conftest import assert_trees_close, normal, relative_error
from jaxcnn import nn, train
from models_for_tests import random_variables

# -- helpers --------------------------------------------------------------------------------------------------


def labels(seed, batch, classes):
    return jnp.asarray(np.random.default_rng(seed).integers(0, classes, batch))


def three_way(model, params, state, x, y, *, key=None, loss_fn=F.softmax_cross_entropy):
    """``{mode: (loss, new_state, grads)}`` for the engine, the manual custom_vjp bridge and autodiff (jit-compiled)."""

    def objective(mode, p, s, x, y, key):
        out, new_state = model.apply(p, s, x, train=True, key=key, gradients=mode)
        loss = jc.backprop.manual_loss(loss_fn)(out, y) if mode == "manual" else loss_fn(out, y)
        return loss, new_state

    results = {}
    for mode in ("autodiff", "manual"):
        run = jax.jit(jax.value_and_grad(lambda p, *rest, mode=mode: objective(mode, p, *rest), has_aux=True))
        (loss, new_state), grads = run(params, state, x, y, key)
        results[mode] = (loss, new_state, grads)
    engine = jax.jit(jc.backprop.value_and_grad(model, loss_fn))
    (loss, new_state), grads = engine(params, state, x, y, key=key)
    results["engine"] = (loss, new_state, grads)
    return results


# float64: the hand rules, the engine and autodiff sum in other orders in every layer, and through a deep model
# the round-off grows with the depth
def assert_three_way_agree(results, tolerance=1e-9):
    loss_a, state_a, grads_a = results["autodiff"]
    assert jax.tree.leaves(grads_a), "no gradients"
    for mode in ("engine", "manual"):
        loss, state, grads = results[mode]
        assert relative_error(loss, loss_a) <= tolerance, mode
        assert jax.tree.structure(grads) == jax.tree.structure(grads_a), mode
        for (path, g), a in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_a), strict=True):
            error = relative_error(g, a)
            assert error <= tolerance, f"{mode} {jax.tree_util.keystr(path)}: relative error {error:.2e}"
            assert float(jnp.max(jnp.abs(a))) > 0, f"{jax.tree_util.keystr(path)}: zero gradient"
        # the running statistics the three paths compute are the same numbers
        assert jax.tree.structure(state) == jax.tree.structure(state_a), mode
        for s, a in zip(jax.tree.leaves(state), jax.tree.leaves(state_a), strict=True):
            np.testing.assert_array_equal(np.asarray(s), np.asarray(a), err_msg=f"{mode} running statistics")


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def mixed_model(classes=5):
    """Every new layer type in one model (kept small: each layer costs compile time). Input (6, 6, 3)."""
    return nn.Sequential(
        [
            nn.Conv2D(4, 3, padding="SAME", use_bias=False),  # no bias in front of BatchNorm: its gradient is 0
            nn.BatchNorm(),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.MaxPool2D(2),  # (3, 3, 4)
            nn.Residual(nn.Sequential([nn.Conv2D(4, 1), nn.GroupNorm(2)])),
            nn.Upsample2D(2),  # (6, 6, 4)
            nn.ConvTranspose2D(3, 3, padding="SAME"),  # (6, 6, 3)
            nn.LayerNorm(),
            nn.Flatten(),
            nn.Dense(classes),
        ]
    )


MIXED_SHAPE = (6, 6, 3)

# -- Residual -------------------------------------------------------------------------------------------------


def test_residual_identity_output_is_block_plus_input():
    block = nn.Sequential([nn.Conv2D(3, 3, padding="SAME"), nn.Tanh()])
    model = nn.Residual(block)
    params, state = random_variables(model, (5, 5, 3))
    x = normal(0, (2, 5, 5, 3))
    y, new_state = model.apply(params, state, x)
    block_y, _ = block.apply(params["block"], {}, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(block_y + x))
    assert new_state == {} and model.output_shape((5, 5, 3)) == (5, 5, 3)


def test_residual_with_shortcut_layer_adds_both_branches():
    block = nn.Sequential([nn.Conv2D(4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2D(4, 3, padding=1)])
    shortcut = nn.Conv2D(4, 1, stride=2, use_bias=False)
    model = nn.Residual(block, shortcut)
    params, state = random_variables(model, (6, 5, 2))
    x = normal(1, (3, 6, 5, 2))
    y, _ = model.apply(params, state, x)
    expected = block.apply(params["block"], {}, x)[0] + shortcut.apply(params["shortcut"], {}, x)[0]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    assert y.shape == (3, *model.output_shape((6, 5, 2))) == (3, 3, 3, 4)
    # the parameter-free CIFAR shortcut: every second pixel, channels zero-padded on both sides
    sub = nn.Residual(nn.Conv2D(6, 3, stride=2, padding=1), nn.SubsampleShortcut(6, 2))
    params, state = random_variables(sub, (6, 5, 2))
    y, _ = sub.apply(params, state, x)
    conv = sub.block.apply(params["block"], {}, x)[0]
    skip = np.pad(np.asarray(x)[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (2, 2)))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(conv) + skip)


def test_residual_params_and_state_layout():
    conv_bn = lambda features: nn.Sequential([nn.Conv2D(features, 1, use_bias=False), nn.BatchNorm()])
    shape = (3, 3, 2)
    cases = [
        # (model, params layout, state layout) -- entries only for branches with leaves
        (nn.Residual(nn.ReLU()), {}, {}),
        (nn.Residual(nn.Conv2D(2, 1)), {"block": {"kernel": (1, 1, 2, 2), "bias": (2,)}}, {}),
        (nn.Residual(nn.ReLU(), nn.Conv2D(2, 1, use_bias=False)), {"shortcut": {"kernel": (1, 1, 2, 2)}}, {}),
        (
            nn.Residual(conv_bn(4), nn.SubsampleShortcut(4, 1)),
            {"block": {"Conv_0": {"kernel": (1, 1, 2, 4)}, "BatchNorm_0": {"scale": (4,), "bias": (4,)}}},
            {"block": {"BatchNorm_0": {"mean": (4,), "var": (4,)}}},
        ),
        (
            nn.Residual(conv_bn(4), conv_bn(4)),
            {
                "block": {"Conv_0": {"kernel": (1, 1, 2, 4)}, "BatchNorm_0": {"scale": (4,), "bias": (4,)}},
                "shortcut": {"Conv_0": {"kernel": (1, 1, 2, 4)}, "BatchNorm_0": {"scale": (4,), "bias": (4,)}},
            },
            {
                "block": {"BatchNorm_0": {"mean": (4,), "var": (4,)}},
                "shortcut": {"BatchNorm_0": {"mean": (4,), "var": (4,)}},
            },
        ),
        (
            nn.Residual(nn.Sequential([nn.BatchNorm(use_scale=False, use_bias=False), nn.ReLU()])),
            {},
            {"block": {"BatchNorm_0": {"mean": (2,), "var": (2,)}}},
        ),
    ]
    for model, params_layout, state_layout in cases:
        params, state = model.init(jax.random.key(0), shape)
        assert jax.tree.map(jnp.shape, params) == params_layout, model
        assert jax.tree.map(jnp.shape, state) == state_layout, model
        y, new_state = model.apply(params, state, jnp.ones((2, *shape), jnp.float32), train=True)
        assert jax.tree.map(jnp.shape, new_state) == state_layout, model
    # inside a Sequential, Residual layers are named Residual_k
    model = nn.Sequential([nn.Residual(nn.Conv2D(2, 1)), nn.ReLU(), nn.Residual(nn.ReLU()), nn.Residual(conv_bn(2))])
    params, state = model.init(jax.random.key(0), shape)
    assert sorted(params) == ["Residual_0", "Residual_2"] and sorted(state) == ["Residual_2"]


def test_residual_shape_mismatch_is_a_one_line_error_naming_both_shapes():
    with pytest.raises(ValueError) as error:
        nn.Residual(nn.Conv2D(4, 3, padding="VALID")).init(jax.random.key(0), (6, 6, 4))
    message = str(error.value)
    assert "\n" not in message
    assert "(4, 4, 4)" in message and "(6, 6, 4)" in message and "Residual" in message
    with pytest.raises(ValueError, match=r"\(6, 6, 5\).*\(3, 3, 4\)") as error:
        nn.Residual(nn.Conv2D(5, 1), nn.SubsampleShortcut(4, 2)).init(jax.random.key(0), (6, 6, 2))
    assert "\n" not in str(error.value)
    model = nn.Sequential([nn.ReLU(), nn.Residual(nn.Conv2D(4, 3, padding="VALID"))])
    with pytest.raises(ValueError, match=r"^Residual_0: .*\(4, 4, 4\).*\(6, 6, 4\)") as error:
        model.init(jax.random.key(0), (6, 6, 4))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"Residual_0: .*\(4, 4, 4\).*\(6, 6, 4\)"):
        model.output_shape((6, 6, 4))


def test_residual_shape_mismatch_at_apply_time_is_a_value_error():
    # stride 2 then upsample 2 keeps 4x4 (so init passes) but maps 5x5 to 6x6
    block = nn.Sequential([nn.Conv2D(3, 3, stride=2, padding="SAME"), nn.Upsample2D(2)])
    model = nn.Sequential([nn.Residual(block)])
    params, state = model.init(jax.random.key(0), (4, 4, 3))
    with pytest.raises(ValueError, match=r"Residual_0: .*\(2, 6, 6, 3\).*\(2, 5, 5, 3\)"):
        model.apply(params, state, jnp.ones((2, 5, 5, 3), jnp.float32))


def nested_residual_model():
    """Residual inside Sequential inside Residual, with BatchNorm at both depths."""
    inner = nn.Residual(nn.Sequential([nn.Conv2D(4, 3, padding="SAME", use_bias=False), nn.BatchNorm(), nn.Tanh()]))
    middle = nn.Sequential([nn.Conv2D(4, 1), inner, nn.BatchNorm(), nn.ReLU()])
    outer = nn.Residual(middle, nn.Conv2D(4, 1, use_bias=False))
    return nn.Sequential([outer, nn.GlobalAvgPool2D(), nn.Dense(3)])


def test_nested_residual_layout_output_and_hand_backward():
    model = nested_residual_model()
    shape = (4, 4, 2)
    params, state = random_variables(model, shape, seed=3)
    assert jax.tree.map(jnp.shape, state) == {
        "Residual_0": {
            "block": {
                "Residual_0": {"block": {"BatchNorm_0": {"mean": (4,), "var": (4,)}}},
                "BatchNorm_0": {"mean": (4,), "var": (4,)},
            }
        }
    }
    assert sorted(params["Residual_0"]) == ["block", "shortcut"]
    assert sorted(params["Residual_0"]["block"]) == ["BatchNorm_0", "Conv_0", "Residual_0"]
    x, y = normal(4, (3, *shape)), labels(4, 3, 3)
    # the output, composed by hand from the pieces in eval mode
    outer = model.layers[0]
    middle = outer.block
    p = params["Residual_0"]
    s = state["Residual_0"]
    h = middle.layers[0].apply(p["block"]["Conv_0"], {}, x)[0]
    h = middle.layers[1].apply(p["block"]["Residual_0"], s["block"]["Residual_0"], h)[0]
    h = jax.nn.relu(middle.layers[2].apply(p["block"]["BatchNorm_0"], s["block"]["BatchNorm_0"], h)[0])
    h = h + outer.shortcut.apply(p["shortcut"], {}, x)[0]
    expected = h.mean((1, 2)) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None]
    out, _ = model.apply(params, state, x)
    assert relative_error(out, expected) <= 1e-14
    # hand backward (the engine's explicit reverse pass) equals jax.grad, in training and in eval mode
    for mode in (True, False):
        engine = jax.jit(jc.backprop.value_and_grad(model, F.softmax_cross_entropy, train=mode))
        (loss, new_state), grads = engine(params, state, x, y)
        loss = lambda p, mode=mode: F.softmax_cross_entropy(model.apply(p, state, x, train=mode)[0], y)
        autodiff = jax.jit(jax.grad(loss))
        expected = autodiff(params)
        assert_trees_close(grads, expected, jnp.float64, f"train={mode}")
        assert jax.tree.structure(new_state) == jax.tree.structure(state)


# -- BatchNorm ------------------------------------------------------------------------------------------------


def test_batchnorm_names_shapes_and_initial_values():
    params, state = nn.BatchNorm().init(jax.random.key(0), (5, 4, 3))
    assert jax.tree.map(jnp.shape, params) == {"scale": (3,), "bias": (3,)}
    assert jax.tree.map(jnp.shape, state) == {"mean": (3,), "var": (3,)}
    np.testing.assert_array_equal(params["scale"], 1.0)
    np.testing.assert_array_equal(params["bias"], 0.0)
    np.testing.assert_array_equal(state["mean"], 0.0)
    np.testing.assert_array_equal(state["var"], 1.0)
    assert nn.BatchNorm().init(jax.random.key(0), (7,))[1]["mean"].shape == (7,)  # dense features
    assert nn.BatchNorm(use_scale=False).init(jax.random.key(0), (2, 3))[0].keys() == {"bias"}
    assert nn.BatchNorm(use_bias=False).init(jax.random.key(0), (2, 3))[0].keys() == {"scale"}
    assert nn.BatchNorm(use_scale=False, use_bias=False).init(jax.random.key(0), (2, 3))[0] == {}
    params, state = nn.BatchNorm().init(jax.random.key(0), (2, 3), dtype=jnp.float64)
    assert {leaf.dtype for leaf in jax.tree.leaves((params, state))} == {jnp.dtype(jnp.float64)}


@pytest.mark.parametrize("momentum", [0.9, 0.75])
def test_batchnorm_train_mode_uses_batch_statistics_and_updates_state(momentum):
    layer = nn.BatchNorm(momentum=momentum)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5, 6)) * 2 + 1
    params = {"scale": rng.uniform(0.5, 2, 6), "bias": rng.standard_normal(6)}
    state = {"mean": rng.standard_normal(6), "var": rng.uniform(0.5, 2, 6)}
    y, new_state = layer.apply(
        jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, state), jnp.asarray(x), train=True
    )
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))  # biased variance, as Flax
    expected = (x - mean) / np.sqrt(var + 1e-5) * params["scale"] + params["bias"]
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(new_state["mean"]), momentum * state["mean"] + (1 - momentum) * mean, rtol=1e-13
    )
    np.testing.assert_allclose(np.asarray(new_state["var"]), momentum * state["var"] + (1 - momentum) * var, rtol=1e-13)
    # the manual bridge computes the same forward and the same state
    y_manual, state_manual = layer.apply(
        jax.tree.map(jnp.asarray, params),
        jax.tree.map(jnp.asarray, state),
        jnp.asarray(x),
        train=True,
        gradients="manual",
    )
    np.testing.assert_array_equal(np.asarray(y_manual), np.asarray(y))
    assert jax.tree.map(np.asarray, state_manual).keys() == new_state.keys()
    for name in ("mean", "var"):
        np.testing.assert_array_equal(np.asarray(state_manual[name]), np.asarray(new_state[name]))


def test_batchnorm_eval_mode_uses_running_statistics_and_keeps_state():
    layer = nn.BatchNorm()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2, 2, 4)))
    params = {"scale": jnp.asarray(rng.uniform(0.5, 2, 4)), "bias": jnp.asarray(rng.standard_normal(4))}
    state = {"mean": jnp.asarray(rng.standard_normal(4)), "var": jnp.asarray(rng.uniform(0.5, 2, 4))}
    for gradients in ("autodiff", "manual"):
        y, new_state = layer.apply(params, state, x, train=False, gradients=gradients)
        p, s = jax.tree.map(np.asarray, (params, state))
        expected = (np.asarray(x) - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]
        np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-13)
        for name in ("mean", "var"):
            np.testing.assert_array_equal(np.asarray(new_state[name]), np.asarray(state[name]))
            assert new_state[name].dtype == state[name].dtype
    # eval is per example: one example's output does not depend on the rest of the batch
    single, _ = layer.apply(params, state, x[:1], train=False)
    np.testing.assert_array_equal(np.asarray(single), np.asarray(layer.apply(params, state, x, train=False)[0][:1]))


def test_batchnorm_running_statistics_get_a_zero_gradient_in_manual_mode():
    """As the docstring says: the hand rules treat the running statistics as state (zero cotangent), where
    autodiff differentiates through them in inference mode."""
    layer = nn.BatchNorm()
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 4)))
    params = {"scale": jnp.asarray(rng.uniform(0.5, 2, 4)), "bias": jnp.asarray(rng.standard_normal(4))}
    state = {"mean": jnp.asarray(rng.standard_normal(4)), "var": jnp.asarray(rng.uniform(0.5, 2, 4))}

    @jax.jit
    def state_grads(state):
        out = {}
        for gradients in ("manual", "autodiff"):
            loss = lambda s, g=gradients: jnp.sum(layer.apply(params, s, x, train=False, gradients=g)[0] ** 2)
            out[gradients] = jax.grad(loss)(state)
        return out

    grads = state_grads(state)
    for name in ("mean", "var"):
        np.testing.assert_array_equal(np.asarray(grads["manual"][name]), 0.0)
        assert np.all(np.asarray(grads["autodiff"][name]) != 0)


def test_batchnorm_single_value_per_channel_runs():
    """Batch 1 of dense features (N=1, C): the batch variance is 0, so y = bias and var decays by momentum."""
    layer = nn.BatchNorm(momentum=0.9)
    params = {"scale": jnp.array([2.0, 3.0]), "bias": jnp.array([0.5, -1.0])}
    state = {"mean": jnp.array([1.0, 2.0]), "var": jnp.array([4.0, 5.0])}
    for x in (jnp.array([[3.0, -7.0]]), jnp.array([[[[3.0, -7.0]]]])):
        for gradients in ("autodiff", "manual"):
            y, new_state = layer.apply(params, state, x, train=True, gradients=gradients)
            np.testing.assert_allclose(np.asarray(y).reshape(-1), [0.5, -1.0], atol=1e-12)
            np.testing.assert_allclose(np.asarray(new_state["mean"]), [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -7])
            np.testing.assert_allclose(np.asarray(new_state["var"]), [0.9 * 4, 0.9 * 5])
        model = nn.Sequential([layer])
        (_, _), grads = jc.backprop.value_and_grad(model, F.mean_squared_error)(
            {"BatchNorm_0": params}, {"BatchNorm_0": state}, x, jnp.zeros_like(x)
        )
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("param_dtype,x_dtype", [(jnp.float32, jnp.float64), (jnp.float64, jnp.float32)])
def test_batchnorm_state_keeps_its_dtype(param_dtype, x_dtype):
    layer = nn.BatchNorm()
    params, state = layer.init(jax.random.key(0), (3, 3, 2), dtype=param_dtype)
    x = normal(0, (2, 3, 3, 2), x_dtype)
    for train_mode in (True, False):
        y, new_state = layer.apply(params, state, x, train=train_mode)
        assert {leaf.dtype for leaf in jax.tree.leaves(new_state)} == {jnp.dtype(param_dtype)}
        assert y.dtype == jnp.float64  # the promoted dtype of x and the parameters
    state16 = jax.tree.map(lambda s: s.astype(jnp.bfloat16), state)
    _, new_state = layer.apply(params, state16, x, train=True)
    assert {leaf.dtype for leaf in jax.tree.leaves(new_state)} == {jnp.dtype(jnp.bfloat16)}


def test_batchnorm_without_scale_or_bias():
    x = normal(2, (5, 3))
    state = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    plain, _ = nn.BatchNorm(use_scale=False, use_bias=False).apply({}, state, x, train=True)
    normalized = (np.asarray(x) - np.asarray(x).mean(0)) / np.sqrt(np.asarray(x).var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(plain), normalized, rtol=1e-12, atol=1e-12)
    bias = jnp.array([1.0, 2.0, 3.0])
    shifted, _ = nn.BatchNorm(use_scale=False).apply({"bias": bias}, state, x, train=True)
    np.testing.assert_allclose(np.asarray(shifted), normalized + np.asarray(bias), rtol=1e-12, atol=1e-12)
    scaled, _ = nn.BatchNorm(use_bias=False).apply({"scale": bias}, state, x, train=True)
    np.testing.assert_allclose(np.asarray(scaled), normalized * np.asarray(bias), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"BatchNorm expects params with keys \['bias'\], got \['bias', 'scale'\]"):
        nn.BatchNorm(use_scale=False).apply({"bias": bias, "scale": bias}, state, x)
    # hand backward without scale / bias
    model = nn.Sequential([nn.Dense(3, use_bias=False), nn.BatchNorm(use_scale=False), nn.Tanh(), nn.Dense(2)])
    params, state = random_variables(model, (3,), seed=5)
    target = normal(6, (5, 2))
    (_, _), grads = jax.jit(jc.backprop.value_and_grad(model, F.mean_squared_error))(params, state, x, target)
    expected = jax.jit(jax.grad(lambda p: F.mean_squared_error(model.apply(p, state, x, train=True)[0], target)))(
        params
    )  # both jitted: eagerly, every primitive would compile on its own
    assert_trees_close(grads, expected, jnp.float64, "BatchNorm(use_scale=False)")


# -- Dropout --------------------------------------------------------------------------------------------------


def test_dropout_keys_modes_and_identity():
    layer = nn.Dropout(0.5)
    x = normal(0, (4, 5, 6))
    a, _ = layer.apply({}, {}, x, train=True, key=jax.random.key(1))
    b, _ = layer.apply({}, {}, x, train=True, key=jax.random.key(1))
    c, _ = layer.apply({}, {}, x, train=True, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    kept = np.asarray(a) != 0
    np.testing.assert_allclose(np.asarray(a)[kept], 2 * np.asarray(x)[kept], rtol=1e-15)
    # the manual bridge draws the same mask
    manual, _ = layer.apply({}, {}, x, train=True, key=jax.random.key(1), gradients="manual")
    np.testing.assert_array_equal(np.asarray(manual), np.asarray(a))
    # inference is the identity, key or not; so is rate 0 in training (no key needed)
    for y in (
        layer.apply({}, {}, x)[0],
        layer.apply({}, {}, x, train=False, key=jax.random.key(1))[0],
        nn.Dropout(0.0).apply({}, {}, x, train=True)[0],
        nn.Dropout(0.0).apply({}, {}, x, train=True, gradients="manual")[0],
    ):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert nn.Dropout(0.3).init(jax.random.key(0), (3, 4)) == ({}, {})


def test_dropout_needs_a_key_in_training():
    for gradients in ("autodiff", "manual"):
        with pytest.raises(ValueError, match=r"Dropout in training mode needs a random key.*key="):
            nn.Dropout(0.5).apply({}, {}, jnp.ones((2, 3)), train=True, gradients=gradients)
    model = nn.Sequential([nn.Dense(3), nn.Dropout(0.1)])
    params, state = model.init(jax.random.key(0), (2,))
    with pytest.raises(ValueError, match=r"^Dropout_0: .*needs a random key"):
        model.apply(params, state, jnp.ones((2, 2)), train=True)
    with pytest.raises(ValueError, match=r"needs a random key"):
        jc.backprop.value_and_grad(model, F.mean_squared_error)(params, state, jnp.ones((2, 2)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"Dropout: `rate` must be a number in \[0, 1\], got 1.5"):
        nn.Dropout(1.5)


def test_container_apply_with_a_non_key_is_a_value_error():
    model = nn.Sequential([nn.Dense(3), nn.Dropout(0.1)])
    params, state = model.init(jax.random.key(0), (2,))
    with pytest.raises(ValueError, match=r"`key` must be a JAX random key"):
        nn.Dropout(0.1).apply({}, {}, jnp.ones((2, 2)), train=True, key=3)  # a single layer says so
    with pytest.raises(ValueError, match=r"`key` must be a JAX random key"):
        model.apply(params, state, jnp.ones((2, 2)), train=True, key=3)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_drops_about_rate(rate):
    y, _ = nn.Dropout(rate).apply({}, {}, jnp.ones((200, 100), jnp.float32), train=True, key=jax.random.key(7))
    y = np.asarray(y)
    assert abs(np.mean(y == 0) - rate) < 0.01  # 20,000 draws: 3 sigma is below 0.011
    np.testing.assert_allclose(y[y != 0], 1 / (1 - rate), rtol=1e-6)


@pytest.mark.slow  # dropout is active in test_mixed_model_three_way_agreement_and_check_model too
def test_dropout_gradients_agree_in_all_three_modes():
    model = nn.Sequential([nn.Flatten(), nn.Dense(16), nn.Tanh(), nn.Dropout(0.5), nn.Dense(3)])
    params, state = random_variables(model, (2, 3), seed=1)
    x, y = normal(2, (6, 2, 3)), labels(2, 6, 3)
    key = jax.random.key(11)
    results = three_way(model, params, state, x, y, key=key)
    assert_three_way_agree(results, 1e-12)
    # the mask matters: another key, or no dropout, gives other gradients
    other = jax.jit(
        jax.grad(lambda p: F.softmax_cross_entropy(model.apply(p, state, x, train=True, key=jax.random.key(12))[0], y))
    )  # jitted: eagerly, every primitive would compile on its own
    no_dropout = jax.jit(jax.grad(lambda p: F.softmax_cross_entropy(model.apply(p, state, x)[0], y)))
    for grads in (other(params), no_dropout(params)):
        assert relative_error(grads["Dense_0"]["kernel"], results["autodiff"][2]["Dense_0"]["kernel"]) > 1e-3


# -- the three gradient paths on the deep models --------------------------------------------------------------


def new_states(model, params, state, x, *, key=None):
    """The running statistics each path computes: the forward of ``apply`` in both gradient modes and the
    engine's forward (``forward_with_state``, step 1 of :func:`jaxcnn.backprop.reverse_pass`). Run op by op, so
    that the three share their compiled primitives."""
    return {
        "autodiff": model.apply(params, state, x, train=True, key=key)[1],
        "manual": model.apply(params, state, x, train=True, key=key, gradients="manual")[1],
        "engine": model.forward_with_state(params, state, x, train=True, key=key)[2],
    }


# float64: as in assert_three_way_agree, round-off from other summation orders grows with the depth
def assert_report_three_way(report, tolerance=1e-9):
    """Every model-level row of a check_model report: engine and manual within ``tolerance`` of autodiff."""
    assert report.ok, report.table()
    rows = [c for c in report.checks if c.scope == "model" and c.method in ("engine vs autodiff", "manual vs autodiff")]
    assert rows
    for check in rows:
        assert check.max_rel <= tolerance, f"{check.method} {check.layer}/{check.quantity}: {check.max_rel:.2e}"
    return rows


@pytest.mark.slow  # ResNet-20 (about 35 s); the mixed model below has BatchNorm, residuals and both shortcut kinds too
def test_resnet20_three_way_agreement_and_check_model():
    """ResNet-20 at 8x8, batch 2, float64: check_model compares the "engine" and "manual" gradients with
    autodiff (<= 1e-9 here, besides its own tolerances) and the engine's with finite differences; the three
    paths' running statistics are the same numbers. (One check_model call instead of a second set of three
    compiles: CPU time is scarce.)"""
    model = jc.models.get("resnet20_cifar")
    params, state = random_variables(model, (8, 8, 3), seed=0)
    x, y = normal(1, (2, 8, 8, 3)), labels(1, 2, 10)
    report = jc.gradcheck.check_model(model, params, state, x, y, layers=False)
    rows = assert_report_three_way(report)
    # the loss and every parameter, engine and manual, at the given and at the perturbed point
    assert len(rows) == 2 * 2 * (1 + len(jax.tree.leaves(params)))
    names = {(c.layer, c.quantity, c.method) for c in report.checks}
    for path, quantity in [
        ("Residual_0/block/Conv_0", "kernel"),
        ("Residual_3/block/BatchNorm_1", "scale"),
        ("Residual_8/block/Conv_1", "kernel"),
    ]:
        for method in ("engine vs autodiff", "manual vs autodiff", "engine vs finite diff"):
            assert (path, quantity, method) in names, (path, method)
    states = new_states(model, params, state, x)
    assert len(jax.tree.leaves(states["engine"])) == 2 * 19
    assert_states_identical(states, state)


def assert_states_identical(states, old_state):
    reference = states["autodiff"]
    assert jax.tree.structure(reference) == jax.tree.structure(old_state)
    for mode in ("manual", "engine"):
        assert jax.tree.structure(states[mode]) == jax.tree.structure(reference), mode
        for a, b in zip(jax.tree.leaves(states[mode]), jax.tree.leaves(reference), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{mode} running statistics")
    for old, new in zip(jax.tree.leaves(old_state), jax.tree.leaves(reference), strict=True):
        assert not np.array_equal(np.asarray(old), np.asarray(new))  # train mode moved every statistic


@pytest.mark.slow  # ResNet-20 (BatchNorm, residuals, both shortcut kinds) runs the same check in the default suite
def test_resnet18_three_way_agreement_at_32x32():
    """The acceptance case: ResNet-18 on CIFAR-sized inputs, float64, batch 2, the three paths compiled whole."""
    model = jc.models.get("resnet18_cifar")
    params, state = random_variables(model, (32, 32, 3), seed=2)
    x, y = normal(3, (2, 32, 32, 3)), labels(3, 2, 10)
    results = three_way(model, params, state, x, y)
    assert_three_way_agree(results)
    assert len(jax.tree.leaves(results["manual"][1])) == 2 * 20  # 17 BatchNorms in blocks and stem, 3 in shortcuts
    assert_states_identical({mode: result[1] for mode, result in results.items()}, state)


def test_mixed_model_three_way_agreement_and_check_model():
    """Every new layer, dropout active (key given): check_model's layer-by-layer and whole-model checks pass, with
    rows for the layers inside the Residual block; engine and manual agree with autodiff to <= 1e-9; the three
    paths' running statistics are identical."""
    model = mixed_model()
    params, state = random_variables(model, MIXED_SHAPE, seed=4)
    x, y = normal(5, (2, *MIXED_SHAPE)), labels(5, 2, 5)
    key = jax.random.key(3)
    # at the given point only: perturbed points are checked in test_gradcheck_points.py (twice the cost here)
    report = jc.gradcheck.check_model(model, params, state, x, y, key=key, perturbations=0)
    assert_report_three_way(report)
    layer_rows = {(c.layer, c.quantity, c.method) for c in report.checks if c.scope == "layer"}
    for path, quantity in [
        ("Residual_0/block/Conv_0", "kernel"),
        ("Residual_0/block/GroupNorm_0", "scale"),
        ("Residual_0/block/GroupNorm_0", "input"),
        ("BatchNorm_0", "bias"),
        ("Dropout_0", "input"),
        ("ConvTranspose_0", "kernel"),
        ("LayerNorm_0", "scale"),
        ("Upsample_0", "input"),
        ("MaxPool2D_0", "input"),
    ]:
        for method in ("hand vs autodiff", "hand vs finite diff"):
            assert (path, quantity, method) in layer_rows, (path, quantity, method)
    assert {c.layer for c in report.checks if c.scope == "model"} >= {"Residual_0/block/GroupNorm_0", "BatchNorm_0"}
    states = new_states(model, params, state, x, key=key)
    assert sorted(states["engine"]) == ["BatchNorm_0"]
    assert_states_identical(states, state)
    # dropout is on: another key gives another output
    out, _ = model.apply(params, state, x, train=True, key=key)
    other, _ = model.apply(params, state, x, train=True, key=jax.random.key(4))
    assert relative_error(out, other) > 1e-3


# -- the models -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,input_shape,params,state,output",
    [
        ("resnet18_cifar", (32, 32, 3), 11_173_962, 9_600, (10,)),
        ("resnet20_cifar", (32, 32, 3), 269_722, 1_376, (10,)),
        ("resnet20_cifar", (8, 8, 3), 269_722, 1_376, (10,)),
        ("resnet50", (224, 224, 3), 25_557_032, 53_120, (1000,)),
        ("conv_autoencoder", (28, 28, 1), 9_569, 0, (28, 28, 1)),
        ("conv_autoencoder", (8, 8, 1), 9_569, 0, (8, 8, 1)),
    ],
)
def test_model_parameter_counts_and_output_shapes(name, input_shape, params, state, output):
    model = jc.models.get(name)
    shapes = jax.eval_shape(lambda key: model.init(key, input_shape), jax.random.key(0))
    assert count(shapes[0]) == params
    assert count(shapes[1]) == state
    assert model.output_shape(input_shape) == output
    y = jax.eval_shape(
        lambda p, s, x: model.apply(p, s, x)[0], *shapes, jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    )
    assert y.shape == (2, *output) and y.dtype == jnp.float32


def test_conv_autoencoder_reconstructs_the_input_shape():
    model = jc.models.get("conv_autoencoder")
    params, state = random_variables(model, (8, 8, 1), dtype=jnp.float32)
    x = normal(0, (3, 8, 8, 1), jnp.float32)
    y, _ = model.apply(params, state, x)
    assert y.shape == x.shape
    assert "conv_autoencoder" not in jc.models.classifiers()
    assert jc.models.input_shape("conv_autoencoder") == (28, 28, 1)
    for name in ("resnet18_cifar", "resnet20_cifar", "resnet50"):
        assert name in jc.models.names() and name in jc.models.classifiers()


# -- training with BatchNorm ----------------------------------------------------------------------------------


def small_bn_model():
    return nn.Sequential(
        [
            nn.Conv2D(4, 3, padding="SAME", use_bias=False),
            nn.BatchNorm(),
            nn.ReLU(),
            nn.Residual(nn.Sequential([nn.Conv2D(4, 3, padding="SAME", use_bias=False), nn.BatchNorm()])),
            nn.ReLU(),
            nn.GlobalAvgPool2D(),
            nn.Dense(3),
        ]
    )


def test_train_step_with_batchnorm_in_all_three_modes():
    model, shape = small_bn_model(), (5, 5, 2)
    x, y = normal(0, (4, *shape)), labels(0, 4, 3)
    optimizer = optax.sgd(0.1)
    finals = {}
    for gradients in train.GRADIENTS:
        state = train.create_train_state(model, optimizer, jax.random.key(0), shape, dtype=jnp.float64)
        initial = jax.tree.map(np.asarray, state.model_state)
        step = train.make_train_step(model, gradients=gradients)
        state, metrics = step(state, x, y)
        assert jax.tree.structure(state.model_state) == jax.tree.structure(initial)
        for old, new in zip(jax.tree.leaves(initial), jax.tree.leaves(state.model_state), strict=True):
            assert not np.array_equal(old, np.asarray(new)), gradients  # the running statistics moved
            assert new.dtype == jnp.float64
        state, metrics = step(state, x, y)
        assert step._cache_size() == 1
        assert int(state.step) == 2 and bool(jnp.isfinite(metrics["loss"]))
        finals[gradients] = state
    for gradients in ("manual", "engine"):
        assert_trees_close(finals[gradients].params, finals["autodiff"].params, jnp.float64, gradients)
        assert_trees_close(finals[gradients].model_state, finals["autodiff"].model_state, jnp.float64, gradients)


@pytest.mark.slow  # bfloat16 runs by default in test_speed_options.py
def test_bfloat16_batchnorm_residual_model_runs():
    model = small_bn_model()
    params, state = random_variables(model, (5, 5, 2), dtype=jnp.float32)
    params16, state16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (params, state))
    x = normal(1, (3, 5, 5, 2), jnp.bfloat16)
    for train_mode in (True, False):
        for gradients in ("autodiff", "manual"):
            out, new_state = model.apply(params16, state16, x, train=train_mode, gradients=gradients)
            assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
            assert {leaf.dtype for leaf in jax.tree.leaves(new_state)} == {jnp.dtype(jnp.bfloat16)}
    (loss, new_state), grads = jc.backprop.value_and_grad(model, F.softmax_cross_entropy)(
        params16, state16, x, labels(1, 3, 3)
    )
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # bfloat16 is close to the float32 forward
    out16, _ = model.apply(params16, state16, x, train=True)
    out32, _ = model.apply(params, state, x.astype(jnp.float32), train=True)
    # bfloat16 keeps 8 bits of mantissa (4e-3 per rounding), and the roundings add up through every layer
    assert relative_error(out16, out32) < 0.1


# (stride, input (H, W, C), features): odd and even sizes, channel padding split evenly and unevenly, stride 1-3
SUBSAMPLE_CASES = [
    (2, (6, 6, 2), 4),
    (2, (7, 5, 3), 8),
    (1, (5, 4, 2), 5),
    (3, (7, 8, 1), 4),
    (2, (1, 3, 4), 4),
]


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("stride,shape,features", SUBSAMPLE_CASES)
def test_subsample_shortcut_backward_against_jax_vjp(stride, shape, features, dtype):
    layer = nn.SubsampleShortcut(features, stride)
    x = normal(11, (3, *shape), dtype)
    y, saved = layer.forward({}, x)
    assert y.shape[1:] == layer.output_shape(shape)
    dy = normal(12, y.shape, dtype)
    dx, _ = layer.backward({}, saved, dy)
    (expected,) = jax.vjp(lambda x: layer.forward({}, x)[0], x)[1](dy)
    assert_trees_close(dx, expected, dtype, "SubsampleShortcut dx")


@pytest.mark.parametrize("stride,shape,features", SUBSAMPLE_CASES[:2])
def test_subsample_shortcut_finite_differences(stride, shape, features):
    model = nn.Sequential([nn.SubsampleShortcut(features, stride)])
    report = jc.gradcheck.check_layers(model, {}, {}, normal(13, (2, *shape)))
    assert report.ok, report.table()
    assert any(check.method == "hand vs finite diff" for check in report.checks)
