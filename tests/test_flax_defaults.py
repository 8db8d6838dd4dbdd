"""Layers that mirror a flax.linen module take its defaults; the built-in models keep their architectures.

``builtin_model_layers.json`` records every leaf layer of every built-in model (its path, type, options and
output shape) as they were before the layers took Flax's defaults (issue 14, item 6); the models pass what
changed explicitly, so the record must still hold.
"""

import dataclasses
import json
from pathlib import Path

import pytest

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
