"""Flax interop: to_flax gives a flax.linen module computing the same function on the same variables (eval and
train mode, running statistics included); from_flax takes Flax variables back, checked against the model.
PyTorch interop: torch_module builds the same architecture (as many parameters), and needs torch only when called.
"""

import importlib
import math
import sys

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from conftest import normal, relative_error
from jaxcnn import nn
from jaxcnn.interop import from_flax, to_flax
from jaxcnn.interop.torch import torch_module
from models_for_tests import random_variables as shared_random_variables

# Flax's modules are another code path: their convolutions, pools and BatchNorm round in other orders
TOLERANCE = 1e-5  # float32


def random_variables(model, input_shape, seed=0, dtype=jnp.float32):
    """The shared helper, float32 by default (interop parity is checked in float32)."""
    return shared_random_variables(model, input_shape, seed=seed, dtype=dtype)


def assert_close(actual, expected, what=""):
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True):
        error = relative_error(a, b)
        assert error <= TOLERANCE, f"{what}{jax.tree_util.keystr(path)}: relative error {error:.2e}"


def assert_identical(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def mixed_model():
    """Every layer with a Flax equivalent. Input (8, 8, 4); 3 outputs."""
    return nn.Sequential(
        [
            nn.Conv2D(8, 3, padding="SAME", groups=2),
            nn.GELU(approximate=False),
            nn.BatchNorm(momentum=0.8, epsilon=1e-3, use_scale=False),
            nn.MaxPool2D(3, 2, padding=1),  # (4, 4, 8)
            nn.Residual(
                nn.Sequential([nn.Conv2D(16, 3, stride=2, padding=1), nn.GroupNorm(4), nn.ELU(alpha=0.5)]),
                nn.SubsampleShortcut(16, 2),
            ),  # (2, 2, 16)
            nn.ConvTranspose2D(8, 3, stride=2, padding="SAME"),  # (4, 4, 8)
            nn.LayerNorm(use_bias=False),
            nn.LeakyReLU(0.2),
            nn.Residual(nn.Sequential([nn.Conv2D(8, 1, use_bias=False), nn.BatchNorm(), nn.Softplus()])),
            nn.Upsample2D((2, 1)),  # (8, 4, 8)
            nn.AvgPool2D(3, 1, padding="SAME"),
            nn.Conv2D(6, (2, 3), stride=2, padding=((1, 0), (0, 1)), dilation=(1, 2)),  # (5, 1, 6)
            nn.Sigmoid(),
            nn.Dropout(0.5),  # the identity in eval mode
            nn.Flatten(),
            nn.Dense(7),
            nn.Tanh(),
            nn.GELU(),
            nn.Dense(5, use_bias=False),
            nn.ReLU(),
            nn.Dense(3),
        ]
    )


MIXED_SHAPE = (8, 8, 4)

# -- to_flax parity -------------------------------------------------------------------------------------------

EVAL_CASES = [
    ("mnist_cnn", (28, 28, 1)),
    ("lenet5", (28, 28, 1)),
    ("resnet20_cifar", (8, 8, 3)),
    ("resnet18_cifar", (32, 32, 3)),
]


@pytest.mark.sample(2)
@pytest.mark.parametrize("name,input_shape", EVAL_CASES, ids=[case[0] for case in EVAL_CASES])
def test_to_flax_matches_in_eval_mode(name, input_shape):
    model = jc.models.get(name)
    params, state = random_variables(model, input_shape, seed=1)
    module, variables = to_flax(model, params, state)
    assert isinstance(module, linen.Module)
    assert sorted(variables) == (["batch_stats", "params"] if state else ["params"])
    assert variables["params"] is params
    x = normal(2, (2, *input_shape), jnp.float32)
    ours, new_state = model.apply(params, state, x, train=False)
    theirs = module.apply(variables, x, train=False)
    assert ours.dtype == jnp.float32  # Flax's may be float64 here: see test_to_flax_keeps_float32_with_avg_pool
    assert_close(ours, theirs, name)
    if state:
        # the (perturbed) running statistics are what eval mode reads: the defaults give another output
        defaults = jax.tree_util.tree_map_with_path(
            lambda path, s: jnp.full_like(s, float(path[-1].key == "var")), state
        )
        assert relative_error(model.apply(params, defaults, x)[0], ours) > 1e-3
        assert relative_error(module.apply({**variables, "batch_stats": defaults}, x), ours) > 1e-3


def test_to_flax_keeps_float32_with_avg_pool():
    model = nn.AvgPool2D(2)
    module, variables = to_flax(model, {}, {})
    x = normal(0, (2, 4, 4, 1), jnp.float32)
    assert model.apply({}, {}, x)[0].dtype == jnp.float32
    assert module.apply(variables, x).dtype == jnp.float32


# two ResNets (about 8 s); train mode runs by default on the mixed model below
@pytest.mark.slow
@pytest.mark.parametrize("name,input_shape", [("resnet20_cifar", (8, 8, 3)), ("resnet18_cifar", (32, 32, 3))])
def test_to_flax_matches_in_train_mode(name, input_shape):
    model = jc.models.get(name)
    params, state = random_variables(model, input_shape, seed=3)
    module, variables = to_flax(model, params, state)
    x = normal(4, (2, *input_shape), jnp.float32)
    ours, new_state = model.apply(params, state, x, train=True)
    theirs, mutated = module.apply(variables, x, train=True, mutable=["batch_stats"])
    assert sorted(mutated) == ["batch_stats"]
    assert_close(ours, theirs, f"{name} output")
    assert_close(new_state, mutated["batch_stats"], f"{name} batch_stats")
    # the statistics moved
    assert relative_error(new_state["BatchNorm_0"]["mean"], state["BatchNorm_0"]["mean"]) > 1e-3


def test_to_flax_mixed_model_matches_in_eval_and_train_mode():
    model = mixed_model()
    params, state = random_variables(model, MIXED_SHAPE, seed=5)
    module, variables = to_flax(model, params, state)
    x = normal(6, (3, *MIXED_SHAPE), jnp.float32)
    # each side jitted: eagerly, every primitive of the two forwards would compile on its own
    ours, _ = jax.jit(lambda p, s, x: model.apply(p, s, x))(params, state, x)
    assert ours.shape == (3, 3)
    assert_close(ours, jax.jit(module.apply)(variables, x), "mixed eval")
    # train mode without the dropout (its masks come from different keys)
    no_dropout = nn.Sequential([layer for layer in model.layers if not isinstance(layer, nn.Dropout)])
    module, variables = to_flax(no_dropout, params, state)
    ours, new_state = jax.jit(lambda p, s, x: no_dropout.apply(p, s, x, train=True))(params, state, x)
    theirs, mutated = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert_close(ours, theirs, "mixed train")
    assert_close(new_state, mutated["batch_stats"], "mixed train batch_stats")


def test_flax_initialises_the_same_layout():
    """The module to_flax builds, initialised by Flax, has jaxcnn's layout (names, shapes, dtypes), and from_flax
    accepts it. (Shapes only, via eval_shape: running Flax's initialisers would compile each one.)"""
    model = mixed_model()
    params, state = random_variables(model, MIXED_SHAPE)
    module, _ = to_flax(model, params, state)
    x = jax.ShapeDtypeStruct((2, *MIXED_SHAPE), jnp.float32)
    flax_variables = jax.eval_shape(module.init, jax.random.key(8), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), dict(flax_variables)) == jax.tree.map(
        lambda a: (a.shape, a.dtype), {"params": params, "batch_stats": state}
    )
    from_flax(module, flax_variables, model, input_shape=MIXED_SHAPE)


def test_to_flax_single_layer():
    for layer, shape in [
        (nn.Conv2D(3, 2, stride=2, padding="VALID"), (5, 5, 2)),
        (nn.BatchNorm(), (4, 3)),
        (nn.ReLU(), (3,)),
    ]:
        params, state = random_variables(layer, shape, seed=9)
        module, variables = to_flax(layer, params, state)
        name = layer.prefix() + "_0"
        assert list(variables["params"]) == ([name] if params else [])
        assert list(variables.get("batch_stats", {})) == ([name] if state else [])
        x = normal(10, (2, *shape), jnp.float32)
        assert_close(layer.apply(params, state, x)[0], module.apply(variables, x), repr(layer))
        back_params, back_state = from_flax(module, variables, layer, input_shape=shape)
        assert_identical((back_params, back_state), (params, state))


# -- from_flax ------------------------------------------------------------------------------------------------


class FlaxMnistCNN(linen.Module):
    """The CNN of Flax's MNIST example, written independently in flax.linen."""

    @linen.compact
    def __call__(self, x):
        x = linen.relu(linen.Conv(32, (3, 3))(x))
        x = linen.avg_pool(x, (2, 2), strides=(2, 2))
        x = linen.relu(linen.Conv(64, (3, 3))(x))
        x = linen.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = linen.relu(linen.Dense(256)(x))
        return linen.Dense(10)(x)


def test_from_flax_takes_flax_mnist_example_variables():
    module = FlaxMnistCNN()
    x = normal(0, (3, 28, 28, 1), jnp.float32)
    variables = module.init(jax.random.key(1), x)
    model = jc.models.get("mnist_cnn")
    params, state = from_flax(module, variables, model, input_shape=(28, 28, 1))
    assert state == {} and sorted(params) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    assert type(params) is dict and all(type(p) is dict for p in params.values())
    assert_close(model.apply(params, state, x)[0], module.apply(variables, x), "Flax MNIST CNN")


@pytest.mark.parametrize("name,input_shape", [("resnet20_cifar", (8, 8, 3)), ("mixed", MIXED_SHAPE)])
def test_round_trip_is_bitwise_identical(name, input_shape):
    model = mixed_model() if name == "mixed" else jc.models.get(name)
    params, state = random_variables(model, input_shape, seed=11)
    module, variables = to_flax(model, params, state)
    for shape in (None, input_shape):
        back_params, back_state = from_flax(module, variables, model, input_shape=shape)
        assert_identical(back_params, params)
        assert_identical(back_state, state)
    # float64 variables go through unchanged too (names are checked, not dtypes)
    params64, state64 = jax.tree.map(lambda a: a.astype(jnp.float64), (params, state))
    module, variables = to_flax(model, params64, state64)
    assert_identical(from_flax(module, variables, model), (params64, state64))


def test_from_flax_errors():
    model = jc.models.get("mnist_cnn")
    params, state = random_variables(model, (28, 28, 1))
    module, variables = to_flax(model, params, state)
    shape = (28, 28, 1)
    missing = {"params": {k: v for k, v in params.items() if k != "Dense_1"}}
    with pytest.raises(ValueError, match=r"from_flax: params do not match the model: missing \[.*Dense_1.*\]"):
        from_flax(module, missing, model, input_shape=shape)
    extra = {"params": {**params, "Dense_7": {"kernel": jnp.zeros((3, 3))}}}
    for input_shape in (None, shape):
        with pytest.raises(ValueError, match=r"Dense_7"):
            from_flax(module, extra, model, input_shape=input_shape)
    wrong = {"params": {**params, "Conv_1": {**params["Conv_1"], "kernel": jnp.zeros((3, 3, 32, 16))}}}
    with pytest.raises(
        ValueError,
        match=r"from_flax: params\['Conv_1'\]\['kernel'\] has shape \(3, 3, 32, 16\), the model expects "
        r"\(3, 3, 32, 64\)",
    ):
        from_flax(module, wrong, model, input_shape=shape)
    with pytest.raises(ValueError, match=r"from_flax: module must be a flax.linen Module, got Sequential"):
        from_flax(model, variables, model)
    with pytest.raises(ValueError, match=r"from_flax: module must be a flax.linen Module, got dict"):
        from_flax(variables, variables, model)
    with pytest.raises(ValueError, match=r"from_flax: collections \['intermediates'\] have no place"):
        from_flax(module, {**variables, "intermediates": {}}, model)
    with pytest.raises(ValueError, match=r"from_flax: variables must hold a 'params' collection"):
        from_flax(module, {"batch_stats": {}}, model)
    with pytest.raises(ValueError, match=r"BatchNorm_0"):
        from_flax(module, {**variables, "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(3)}}}, model)


def test_from_flax_missing_names_without_input_shape():
    model = jc.models.get("mnist_cnn")
    params, state = random_variables(model, (28, 28, 1))
    module, _ = to_flax(model, params, state)
    with pytest.raises(ValueError, match=r"Dense_1"):
        from_flax(module, {"params": {k: v for k, v in params.items() if k != "Dense_1"}}, model)
    with pytest.raises(ValueError, match=r"bias"):
        from_flax(module, {"params": {**params, "Conv_0": {"kernel": params["Conv_0"]["kernel"]}}}, model)


class Double(nn.Layer):
    """A custom layer with no Flax equivalent."""

    def forward(self, params, x):
        return 2 * x, None

    def backward(self, params, residuals, dy):
        return 2 * dy, {}


def test_to_flax_names_a_layer_without_flax_equivalent():
    model = nn.Sequential([nn.Flatten(), nn.Residual(nn.Sequential([nn.Dense(3), Double()])), nn.Dense(2)])
    params, state = model.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match=r"to_flax: no Flax equivalent for .*Residual_0/block/Double_0 \(Double\)"):
        to_flax(model, params, state)
    with pytest.raises(ValueError, match=r"to_flax: no Flax equivalent for .*\(Double\)"):
        to_flax(Double(), {}, {})


# -- PyTorch: jaxcnn.interop.torch --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist_cnn", "lenet5", "resnet18_cifar"])
def test_the_torch_model_has_the_same_parameter_count(name):
    pytest.importorskip("torch")
    model = jc.models.get(name)
    shape = jc.models.input_shape(name)
    params, _ = jax.eval_shape(lambda key: model.init(key, shape), jax.random.key(0))
    ours = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    theirs = sum(p.numel() for p in torch_module(model, shape).parameters())
    assert ours == theirs


def test_layers_without_a_torch_counterpart_are_skipped_by_name():
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="no PyTorch counterpart for SubsampleShortcut"):
        torch_module(jc.models.get("resnet20_cifar"), (32, 32, 3))


def test_the_torch_converter_and_the_benchmark_import_without_torch(monkeypatch):
    """torch is not a dependency: jaxcnn.interop.torch (and jaxcnn.bench, which uses it) import without it, and
    torch_module says ImportError only when called."""
    import jaxcnn.bench

    monkeypatch.setitem(sys.modules, "torch", None)  # now `import torch` raises ImportError
    fresh = ("jaxcnn.bench", "jaxcnn.interop.torch")
    for name in [name for name in sys.modules if name in fresh or name.startswith("jaxcnn.bench.")]:
        monkeypatch.delitem(sys.modules, name)
    # the fresh imports rebind these attributes of the parent packages: put the originals back afterwards
    monkeypatch.setattr(jc.interop, "torch", jc.interop.torch)
    monkeypatch.setattr(jc, "bench", jaxcnn.bench)
    importlib.import_module("jaxcnn.bench")
    converter = importlib.import_module("jaxcnn.interop.torch")
    with pytest.raises(ImportError):
        converter.torch_module(jc.models.get("lenet5"), (28, 28, 1))
