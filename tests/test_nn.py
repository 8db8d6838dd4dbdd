"""Layers: shape inference agrees with apply, Flax-compatible parameters, clear errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen

import jaxcnn as jc
from conftest import normal, relative_error
from jaxcnn import nn

LAYER_CASES = [
    (nn.Conv2D(4, 3, padding="VALID"), (7, 9, 2)),
    (nn.Conv2D(4, (2, 5), stride=2, padding="SAME"), (7, 9, 2)),
    (nn.Conv2D(6, 3, stride=(1, 3), padding=((2, 0), (1, 1)), dilation=2, groups=3), (11, 10, 3)),
    (nn.Conv2D(3, 1, padding=2, groups=3, use_bias=False), (5, 5, 3)),
    (nn.Dense(5), (7,)),
    (nn.Dense(2, use_bias=False), (3, 4)),
    (nn.MaxPool2D(2), (7, 9, 2)),
    (nn.MaxPool2D((3, 2), stride=1, padding="SAME"), (5, 6, 1)),
    (nn.AvgPool2D(3, 2, padding=1), (8, 7, 2)),
    (nn.AvgPool2D(2, padding=((1, 0), (0, 1))), (5, 5, 1)),
    (nn.GlobalAvgPool2D(), (4, 3, 5)),
    (nn.Flatten(), (4, 3, 5)),
    (nn.ReLU(), (3, 4)),
    (nn.LeakyReLU(0.2), (3, 4, 2)),
    (nn.ELU(), (3,)),
    (nn.GELU(approximate=False), (2, 2)),
    (nn.Sigmoid(), (2, 2)),
    (nn.Tanh(), (2, 2)),
    (nn.Softplus(), (2, 2)),
]


@pytest.mark.parametrize("gradients", ["autodiff", "manual"])
@pytest.mark.parametrize("layer,input_shape", LAYER_CASES, ids=[repr(c[0]) for c in LAYER_CASES])
def test_output_shape_matches_apply(layer, input_shape, gradients):
    params, state = layer.init(jax.random.key(0), input_shape)
    x = normal(0, (2, *input_shape), jnp.float32)
    y, new_state = layer.apply(params, state, x, gradients=gradients)
    assert y.shape == (2, *layer.output_shape(input_shape))
    assert y.dtype == jnp.float32
    assert new_state == state


def init_shapes(model, input_shape):
    """``model.init(key, input_shape)`` as shapes: traced, not run (shapes and counts need no values)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), input_shape))


def test_sequential_shapes_and_names():
    model = jc.models.get("mnist_cnn")
    params, state = init_shapes(model, (28, 28, 1))
    assert state == {}
    assert sorted(params) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    assert model.output_shape((28, 28, 1)) == (10,)
    x = jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32)
    y, _ = jax.eval_shape(lambda params, x: model.apply(params, state, x), params, x)
    assert y.shape == (3, 10)


def count(params) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def test_mnist_cnn_parameter_count():
    model = jc.models.get("mnist_cnn")
    assert count(init_shapes(model, (28, 28, 1))[0]) == 824_458
    # the figure Flax's own MNIST test pins is for 3-channel inputs
    assert count(init_shapes(model, (28, 28, 3))[0]) == 825_034
    assert count(init_shapes(jc.models.get("lenet5"), (28, 28, 1))[0]) == 61_706


def test_digits_cnn_layers_and_parameter_count():
    """digits_cnn (issue 13, defect 11): the layers and 330,154 parameters its docstring gives, on 8x8x1 inputs."""
    model = jc.models.get("digits_cnn")
    params, state = init_shapes(model, jc.models.input_shape("digits_cnn"))
    assert count(params) == 330_154 and count(state) == 2 * (32 + 32 + 64 + 64)  # BatchNorm's running statistics
    assert [name.rsplit("_", 1)[0] for name in model.names if not name.startswith(("ReLU", "BatchNorm"))] == [
        *["Upsample", "Conv", "Conv", "AvgPool2D", "Conv", "Conv", "AvgPool2D", "Flatten", "Dense", "Dense"]
    ]
    assert model.output_shape((8, 8, 1)) == (10,)


class FlaxMnistCNN(linen.Module):
    """The Flax MNIST example's CNN, written independently in flax.linen."""

    @linen.compact
    def __call__(self, x):
        x = linen.relu(linen.Conv(32, (3, 3))(x))
        x = linen.avg_pool(x, (2, 2), strides=(2, 2))
        x = linen.relu(linen.Conv(64, (3, 3))(x))
        x = linen.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = linen.relu(linen.Dense(256)(x))
        return linen.Dense(10)(x)


def test_mnist_cnn_shares_parameters_with_flax():
    model = jc.models.get("mnist_cnn")
    params, state = model.init(jax.random.key(0), (28, 28, 1))
    flax_params = FlaxMnistCNN().init(jax.random.key(1), jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_params)
    x = normal(3, (4, 28, 28, 1), jnp.float32)
    ours, _ = model.apply(params, state, x)
    theirs = FlaxMnistCNN().apply({"params": params}, x)
    # float32, and Flax's Conv, avg_pool and Dense are another code path, summing in other orders
    assert relative_error(ours, theirs) < 1e-5
    # and Flax's parameters run in jaxcnn
    ours, _ = model.apply(flax_params, {}, x)
    assert relative_error(ours, FlaxMnistCNN().apply({"params": flax_params}, x)) < 1e-5


def test_default_initialisers_are_flax_lecun_normal_and_zero_bias():
    layer = nn.Conv2D(64, 3, groups=2)
    params, _ = layer.init(jax.random.key(0), (8, 8, 32))
    expected = jax.nn.initializers.lecun_normal()(jax.random.key(0), (3, 3, 16, 64), jnp.float32)
    np.testing.assert_array_equal(np.asarray(params["kernel"]), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(params["bias"]), 0.0)
    dense, _ = nn.Dense(300).init(jax.random.key(1), (500,))
    # 150,000 draws: the sample standard deviation is good to about 1/sqrt(2n) = 0.2%
    assert abs(float(jnp.std(dense["kernel"])) * np.sqrt(500) - 1.0) < 0.05
    assert nn.Conv2D(4, 3, use_bias=False).init(jax.random.key(0), (5, 5, 1))[0].keys() == {"kernel"}


@pytest.mark.slow  # bfloat16 through every gradient mode runs by default in test_speed_options.py
def test_init_dtype_and_bfloat16_runs():
    model = jc.models.get("mnist_cnn")
    params, state = model.init(jax.random.key(0), (8, 8, 1), dtype=jnp.float64)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    x = normal(0, (2, 8, 8, 1), jnp.bfloat16)
    y = jnp.arange(2)
    for gradients in ("autodiff", "manual"):
        logits, _ = model.apply(params16, state, x, gradients=gradients)
        assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))
    (loss, _), grads = jc.backprop.value_and_grad(model, jc.functional.softmax_cross_entropy)(params16, state, x, y)
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}


def test_same_key_same_bits():
    model = jc.models.get("lenet5")
    a, _ = model.init(jax.random.key(7), (28, 28, 1))
    b, _ = model.init(jax.random.key(7), (28, 28, 1))
    c, _ = model.init(jax.random.key(8), (28, 28, 1))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    assert not np.array_equal(a["Conv_0"]["kernel"], c["Conv_0"]["kernel"])


@pytest.mark.parametrize(
    "build,input_shape,message",
    [
        (lambda: nn.Conv2D(4, 3, groups=2), (5, 5, 3), r"input channels \(=3\) must be divisible by `groups` \(=2\)"),
        (
            lambda: nn.Conv2D(4, 7, padding="VALID"),
            (5, 5, 1),
            r"kernel height \(=7.*larger than the padded input height \(=5",
        ),
        (lambda: nn.Conv2D(4, 3, dilation=3, padding="VALID"), (6, 9, 1), r"kernel height \(=3, 7 with dilation 3\)"),
        (lambda: nn.Conv2D(4, 3), (28, 28), r"Conv2D expects inputs of shape \(H, W, C\).*got \(28, 28\)"),
        (lambda: nn.MaxPool2D(3), (2, 5, 1), r"window height \(=3.*larger than the padded input"),
        (lambda: nn.AvgPool2D(2, padding=2), (5, 5, 1), r"padding .* must be smaller than the window"),
        (lambda: nn.Dense(3), (), r"input_shape|Dense expects"),
    ],
)
def test_init_errors_name_the_problem(build, input_shape, message):
    with pytest.raises(ValueError, match=message):
        build().init(jax.random.key(0), input_shape)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: nn.Conv2D(0, 3), r"`features` must be a positive int, got 0"),
        (lambda: nn.Conv2D(4, 3, stride=0), r"`stride` \(=0\) must be >= 1"),
        (lambda: nn.Conv2D(4, (3, 3, 3)), r"`kernel_size` must be an int or a pair of ints, got \(3, 3, 3\)"),
        (lambda: nn.Conv2D(4, 3, padding="FULL"), r"`padding` must be 'SAME', 'VALID'.*got 'FULL'"),
        (lambda: nn.Conv2D(4, 3, padding=-1), r"`padding` \(=-1\) must not be negative"),
        (lambda: nn.Conv2D(3, 3, groups=2), r"`features` \(=3\) must be divisible by `groups` \(=2\)"),
        (lambda: nn.Dense(-2), r"`features` must be a positive int, got -2"),
        (lambda: nn.MaxPool2D(0), r"`window` \(=0\) must be >= 1"),
        (lambda: nn.MaxPool2D(2, padding=2), r"padding 2 must be smaller than the window \(2, 2\)"),
        (lambda: nn.Sequential([nn.ReLU(), "relu"]), r"layer 1 must be a jaxcnn.nn.Layer"),
        (lambda: nn.BatchNorm(momentum=1.5), r"BatchNorm: `momentum` must be a number in \[0.0, 1.0\], got 1.5"),
        (lambda: nn.BatchNorm(epsilon=-1e-3), r"BatchNorm: `epsilon` must be a number >= 0.0, got -0.001"),
        (lambda: nn.GroupNorm(4, epsilon="small"), r"GroupNorm: `epsilon` must be a number >= 0.0, got 'small'"),
        (lambda: nn.GroupNorm(0), r"`groups` must be a positive int, got 0"),
    ],
)
def test_constructor_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_apply_errors_name_layer_expected_and_received():
    model = jc.models.get("mnist_cnn")
    params, state = model.init(jax.random.key(0), (28, 28, 1))
    with pytest.raises(ValueError, match=r"Conv_0: Conv2D expects input of shape \(N, H, W, 1\), got \(2, 28, 28, 3\)"):
        model.apply(params, state, jnp.zeros((2, 28, 28, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"Conv_0: Conv2D expects input of shape \(N, H, W, 1\), got \(28, 28, 1\)"):
        model.apply(params, state, jnp.zeros((28, 28, 1), jnp.float32))
    with pytest.raises(ValueError, match=r"Dense_0: Dense expects input of shape \(N, \.\.\., 3136\), got \(2, 4096\)"):
        model.apply(params, state, jnp.zeros((2, 32, 32, 1), jnp.float32))
    with pytest.raises(ValueError, match=r"`gradients` must be 'autodiff' or 'manual', got 'auto'"):
        model.apply(params, state, jnp.zeros((2, 28, 28, 1), jnp.float32), gradients="auto")
    with pytest.raises(ValueError, match=r"`input_shape` must hold positive ints"):
        model.init(jax.random.key(0), (0, 28, 1))


def test_functional_errors():
    F = jc.functional
    x = jnp.zeros((1, 5, 5, 3))
    with pytest.raises(ValueError, match=r"conv2d: `x` must have rank 4 \(N, H, W, C\), got shape \(5, 5, 3\)"):
        F.conv2d(x[0], jnp.zeros((3, 3, 3, 2)))
    with pytest.raises(ValueError, match=r"kernel shape \(3, 3, 2, 4\) expects 2 input channels \(2 per group x 1 gr"):
        F.conv2d(x, jnp.zeros((3, 3, 2, 4)))
    with pytest.raises(ValueError, match=r"conv2d_vjp: `dy` must have shape \(1, 3, 3, 2\), got \(1, 5, 5, 2\)"):
        F.conv2d_vjp(x, jnp.zeros((3, 3, 3, 2)), None, jnp.zeros((1, 5, 5, 2)))
    with pytest.raises(ValueError, match=r"`labels` must be integer class indices of shape \(2,\)"):
        F.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"dense: `x` must have shape \(\.\.\., 4\)"):
        F.dense(jnp.zeros((2, 3)), jnp.zeros((4, 5)))


def test_models_get_unknown_lists_known():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9000'; known models: conv_autoencoder, digits_cnn, "):
        jc.models.get("resnet9000")


def test_parameter_trees_are_validated():
    model = jc.models.get("mnist_cnn")
    params, state = model.init(jax.random.key(0), (28, 28, 1))
    x = jnp.zeros((2, 28, 28, 1), jnp.float32)
    broken = {**params, "Conv_0": {"kernal": params["Conv_0"]["kernel"], "bias": params["Conv_0"]["bias"]}}
    with pytest.raises(ValueError, match=r"Conv_0: Conv2D expects params with keys \['bias', 'kernel'\]"):
        model.apply(broken, state, x)
    with pytest.raises(ValueError, match=r"params has entries \['Dense_7'\] for no layer of this model"):
        model.apply({**params, "Dense_7": {}}, state, x)
    no_bias = nn.Sequential([nn.Flatten(), nn.Dense(3, use_bias=False)])
    p, s = no_bias.init(jax.random.key(0), (2, 2, 1))
    with pytest.raises(ValueError, match=r"Dense_0: Dense expects params with keys \['kernel'\], got \['bias', 'ke"):
        no_bias.apply({"Dense_0": {**p["Dense_0"], "bias": jnp.zeros(3)}}, s, x[:, :2, :2])


@pytest.mark.parametrize(
    "key,input_shape,message",
    [
        (0, (28, 28, 1), r"`key` must be a JAX random key"),
        (jax.random.key(0), (28.0, 28, 1), r"`input_shape` must hold positive ints"),
        (jax.random.key(0), "28x28", r"`input_shape` must be a tuple of ints"),
    ],
)
def test_init_validates_key_and_shape(key, input_shape, message):
    with pytest.raises(ValueError, match=message):
        jc.models.get("mnist_cnn").init(key, input_shape)


def test_legacy_keys_and_numpy_integers_work():
    model = nn.Sequential(
        [nn.Conv2D(np.int64(4), np.int32(3), stride=np.int64(2), padding="VALID"), nn.Flatten(), nn.Dense(2)]
    )
    params, state = model.init(jax.random.PRNGKey(0), (np.int64(7), 7, 1))
    y, _ = model.apply(params, state, jnp.ones((1, 7, 7, 1)), gradients="manual", key=jax.random.PRNGKey(1))
    assert y.shape == (1, 2)


def test_empty_batch_runs():
    model = jc.models.get("lenet5")
    params, state = model.init(jax.random.key(0), (28, 28, 1))
    y, _ = model.apply(params, state, jnp.zeros((0, 28, 28, 1), jnp.float32))
    assert y.shape == (0, 10)


def test_models_compare_by_value():
    assert jc.models.get("mnist_cnn") == jc.models.get("mnist_cnn")
    assert hash(jc.models.get("lenet5")) == hash(jc.models.get("lenet5"))
    assert jc.models.get("mnist_cnn") != jc.models.get("lenet5")
