"""Layers that mirror a flax.linen module take its defaults; the built-in models keep their architectures.

``builtin_model_layers.json`` records every leaf layer of every built-in model (its path, type, options and
output shape) as they were before the layers took Flax's defaults (issue 14, item 6); the models pass what
changed explicitly, so the record must still hold.
"""

import dataclasses
import inspect
import json
from pathlib import Path

import flax.linen as linen
import jax
import jax.numpy as jnp
import pytest

from conftest import normal, relative_error
from jaxcnn import models, nn

RECORD = Path(__file__).with_name("builtin_model_layers.json")
BUILTIN_INPUTS = {
    "mnist_cnn": (28, 28, 1),
    "lenet5": (28, 28, 1),
    "digits_cnn": (8, 8, 1),
    "resnet18_cifar": (32, 32, 3),
    "resnet20_cifar": (32, 32, 3),
    "resnet50": (224, 224, 3),
    "conv_autoencoder": (28, 28, 1),
}


def leaf_layers(layer: nn.Layer, shape: tuple[int, ...], path: str, out: list) -> tuple[int, ...]:
    """Append ``[path, type, options, output shape]`` for every leaf layer (by shape inference, no data)."""
    if isinstance(layer, nn.Container):
        for name, child in layer.named_children():
            child_shape = leaf_layers(child, shape, f"{path}/{name}" if path else name, out)
            if isinstance(layer, nn.Sequential):  # a chain feeds each output on; other containers fan out
                shape = child_shape
        return shape if isinstance(layer, nn.Sequential) else layer.output_shape(shape)
    output = layer.output_shape(shape)
    options = {field.name: getattr(layer, field.name) for field in dataclasses.fields(layer)}
    out.append([path, type(layer).__name__, options, list(output)])
    return output


@pytest.mark.parametrize("name", list(BUILTIN_INPUTS))
def test_builtin_models_keep_their_layers(name):
    layers: list = []
    leaf_layers(getattr(models, name)(), BUILTIN_INPUTS[name], "", layers)
    recorded = json.loads(RECORD.read_text())[name]
    assert [entry[0] for entry in layers] == [entry[0] for entry in recorded]
    for (path, kind, options, output), (_, recorded_kind, recorded_options, recorded_output) in zip(
        json.loads(json.dumps(layers)), recorded, strict=True
    ):
        assert (kind, output) == (recorded_kind, recorded_output), path
        # every recorded option still holds (an option added since is not in the record)
        assert {key: options.get(key) for key in recorded_options} == recorded_options, path


# -- the defaults of the layers that mirror flax.linen ----------------------------------------------------------

CONV = {name: name for name in ("features", "kernel_size", "padding", "use_bias")} | {
    "stride": "strides",
    "dilation": "kernel_dilation",
}
NORM = {name: name for name in ("epsilon", "use_scale", "use_bias")}
POOL = {"window": "window_shape", "padding": "padding"}
# (our layer, its flax.linen twin, {our argument: Flax's argument of the same meaning}, what our defaults build from)
MIRRORS = [
    # kernel_size as a pair: an int k means k x k here, but a 1-D kernel (k,) in Flax
    (nn.Conv2D, linen.Conv, CONV | {"groups": "feature_group_count"}, dict(features=4, kernel_size=(3, 3))),
    (nn.ConvTranspose2D, linen.ConvTranspose, CONV, dict(features=4, kernel_size=(3, 3))),
    (nn.Dense, linen.Dense, {"features": "features", "use_bias": "use_bias"}, dict(features=4)),
    (nn.BatchNorm, linen.BatchNorm, NORM | {"momentum": "momentum"}, {}),
    (nn.LayerNorm, linen.LayerNorm, NORM, {}),
    (nn.GroupNorm, linen.GroupNorm, NORM | {"groups": "num_groups"}, {}),
    (nn.Dropout, linen.Dropout, {"rate": "rate"}, dict(rate=0.5)),
    (nn.MaxPool2D, linen.max_pool, POOL, dict(window=2)),
    (nn.AvgPool2D, linen.avg_pool, POOL, dict(window=2)),
    (nn.ReLU, linen.relu, {}, {}),
    (nn.Sigmoid, linen.sigmoid, {}, {}),
    (nn.Tanh, linen.tanh, {}, {}),
    (nn.Softplus, linen.softplus, {}, {}),
    (nn.LeakyReLU, linen.leaky_relu, {"negative_slope": "negative_slope"}, {}),
    (nn.ELU, linen.elu, {"alpha": "alpha"}, {}),
    (nn.GELU, linen.gelu, {"approximate": "approximate"}, {}),
]
# arguments whose default differs on purpose (README, "Flax interop"): our pools' stride=None means stride = window
# (non-overlapping, as F.max_pool2d and the pooling layers of PyTorch and Keras); Flax's functions take stride 1
DELIBERATE = {(nn.MaxPool2D, "stride"), (nn.AvgPool2D, "stride")}
# Flax arguments whose default None means 1
FLAX_NONE_IS_ONE = {(linen.ConvTranspose, "strides"), (linen.ConvTranspose, "kernel_dilation")}


def flax_default(twin, name):
    default = inspect.signature(twin).parameters[name].default
    return 1 if default is None and (twin, name) in FLAX_NONE_IS_ONE else default


@pytest.mark.parametrize("layer,twin,names,_", MIRRORS, ids=[m[0].__name__ for m in MIRRORS])
def test_mirrored_layers_take_flax_defaults(layer, twin, names, _):
    ours = inspect.signature(layer).parameters
    # every argument of ours is either Flax's under a name of the same meaning or a stated deliberate difference
    assert set(ours) == set(names) | {name for kind, name in DELIBERATE if kind is layer}
    for name, flax_name in names.items():
        assert ours[name].default == flax_default(twin, flax_name), f"{layer.__name__}({name}=) vs {flax_name}="


def flax_output(layer, twin, names, required, params, state, x):
    """Flax's twin, built from its own defaults (and the same required arguments), on our variables."""
    options = {names[name]: value for name, value in required.items()}
    if isinstance(twin, type) and issubclass(twin, linen.BatchNorm):  # training mode: batch statistics
        y, updated = twin(use_running_average=False).apply(
            {"params": params, "batch_stats": state}, x, mutable=["batch_stats"]
        )
        return y, updated["batch_stats"]
    if isinstance(twin, type):
        return twin(**options).apply({"params": params}, x), {}
    if layer in (nn.MaxPool2D, nn.AvgPool2D):  # the deliberate difference: our stride defaults to the window
        window = (options["window_shape"],) * 2
        return twin(x, window, strides=window), {}
    return twin(x), {}


# the layers whose defaults decide their values (the others' signatures are checked above): a pair of compiles each
WITH_OPTIONS = [mirror for mirror in MIRRORS if mirror[2] and mirror[0] not in (nn.Dense, nn.Dropout)]


@pytest.mark.parametrize("layer,twin,names,required", WITH_OPTIONS, ids=[m[0].__name__ for m in WITH_OPTIONS])
def test_mirrored_layers_with_defaults_compute_as_flax(layer, twin, names, required):
    ours = layer(**required)
    x = normal(0, (2, 5, 5, 32))  # float64; 32 channels for GroupNorm's default of 32 groups
    params, state = ours.init(jax.random.key(0), x.shape[1:], dtype=jnp.float64)
    # each side compiled whole: one compile each, cheaper than running op by op
    y, new_state = jax.jit(lambda p, s, x: ours.apply(p, s, x, train=layer is nn.BatchNorm))(params, state, x)
    flax_side = jax.jit(lambda p, s, x: flax_output(layer, twin, names, required, p, s, x))
    expected, expected_state = flax_side(params, state, x)
    assert y.shape == expected.shape
    # float64; Flax's modules are another code path, summing in other orders
    assert relative_error(y, expected) < 1e-12
    assert jax.tree.structure(new_state) == jax.tree.structure(expected_state)
    for ours_leaf, flax_leaf in zip(jax.tree.leaves(new_state), jax.tree.leaves(expected_state), strict=True):
        assert relative_error(ours_leaf, flax_leaf) < 1e-12  # BatchNorm's running statistics: the same momentum
