"""Named architectures: ``jaxcnn.models.get(name)``, and the registry behind it.

Every model has one :class:`ModelSpec` (builder, input shape, task). :func:`register` adds your own, so
``jaxcnn train --model NAME`` and ``jaxcnn gradcheck --model NAME`` find it; ``--model package.module:factory``
imports a factory without registering it (:func:`build`). ``jaxcnn.train.fit(config, workdir, model=...)``
trains any :class:`jaxcnn.nn.Layer` object directly.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

from jaxcnn import nn


def _batch_norm() -> nn.BatchNorm:
    """The built-in models' BatchNorm: momentum 0.9 (PyTorch's 0.1), not Flax's default 0.99."""
    return nn.BatchNorm(momentum=0.9)


def mnist_cnn(num_classes: int = 10) -> nn.Sequential:
    """The CNN of Flax's MNIST example: 824,458 parameters on 28x28x1 inputs with 10 classes
    (825,034 on 28x28x3, the figure Flax's own test pins).

    conv32 3x3 SAME, relu, avgpool 2, conv64 3x3 SAME, relu, avgpool 2, flatten, dense256, relu, dense10; the
    convolutions pad SAME by default, as Flax's ``nn.Conv`` in the example.
    """
    return nn.Sequential(
        [
            nn.Conv2D(32, 3),
            nn.ReLU(),
            nn.AvgPool2D(2),
            nn.Conv2D(64, 3),
            nn.ReLU(),
            nn.AvgPool2D(2),
            nn.Flatten(),
            nn.Dense(256),
            nn.ReLU(),
            nn.Dense(num_classes),
        ]
    )


def lenet5(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 (LeCun et al., 1998) for 28x28 inputs: the first conv pads SAME to stand in for the 32x32 input.

    conv6 5x5 SAME, tanh, avgpool 2, conv16 5x5, tanh, avgpool 2, flatten, dense120, tanh, dense84, tanh,
    dense10: 61,706 parameters on 28x28x1 inputs with 10 classes.
    """
    return nn.Sequential(
        [
            nn.Conv2D(6, 5, padding="SAME"),
            nn.Tanh(),
            nn.AvgPool2D(2),
            nn.Conv2D(16, 5, padding="VALID"),
            nn.Tanh(),
            nn.AvgPool2D(2),
            nn.Flatten(),
            nn.Dense(120),
            nn.Tanh(),
            nn.Dense(84),
            nn.Tanh(),
            nn.Dense(num_classes),
        ]
    )


def digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """A CNN for 8x8 images such as scikit-learn's digits: 330,154 parameters on 8x8x1 inputs with 10 classes,
    plus BatchNorm's running statistics in the state.

    upsample 2 (nearest), then two blocks of [conv 3x3 SAME without bias, BatchNorm, relu] x2 and avgpool 2
    (32, then 64 channels), flatten, dense256, relu, dense10. ``mnist_cnn`` pools an 8x8 image to 4x4 after one
    convolution; here four convolutions (two at 16x16, two at 8x8) come before the same 4x4x64 dense head.
    """

    def conv(features: int) -> list[nn.Layer]:
        return [nn.Conv2D(features, 3, padding="SAME", use_bias=False), _batch_norm(), nn.ReLU()]

    return nn.Sequential(
        [
            nn.Upsample2D(2),
            *conv(32),
            *conv(32),
            nn.AvgPool2D(2),
            *conv(64),
            *conv(64),
            nn.AvgPool2D(2),
            nn.Flatten(),
            nn.Dense(256),
            nn.ReLU(),
            nn.Dense(num_classes),
        ]
    )


def _norm(kind: str, features: int) -> nn.Layer:
    """``"batch"``: the built-in BatchNorm; ``"group"``: GroupNorm with ``min(32, features)`` groups (what Opacus's
    ``ModuleValidator.fix`` puts in BatchNorm's place), for models whose examples must stay independent (DP-SGD)."""
    if kind == "batch":
        return _batch_norm()
    if kind == "group":
        return nn.GroupNorm(groups=min(32, features))
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


def _basic_block(features: int, stride: int, in_features: int, shortcut: str, norm: str = "batch") -> list[nn.Layer]:
    """Two 3x3 convolutions with BatchNorm (or ``norm="group"``: GroupNorm), added to a shortcut, then ReLU
    (He et al., 2015, figure 2).

    ``shortcut`` says what maps the input when the shape changes: ``"projection"`` (1x1 conv + BatchNorm) or
    ``"subsample"`` (the parameter-free "option A" of the CIFAR ResNets).
    """
    block = nn.Sequential(
        [
            nn.Conv2D(features, 3, stride=stride, padding=1, use_bias=False),
            _norm(norm, features),
            nn.ReLU(),
            nn.Conv2D(features, 3, padding=1, use_bias=False),
            _norm(norm, features),
        ]
    )
    skip = None
    if stride != 1 or in_features != features:
        if shortcut == "projection":
            skip = nn.Sequential(
                [nn.Conv2D(features, 1, stride=stride, padding="VALID", use_bias=False), _batch_norm()]
            )
        else:
            skip = nn.SubsampleShortcut(features, stride)
    return [nn.Residual(block, skip), nn.ReLU()]


def _bottleneck_block(width: int, stride: int, in_features: int) -> list[nn.Layer]:
    """1x1 reduce, 3x3 (strided, as torchvision's ResNet v1.5), 1x1 expand to ``4 * width``, each with
    BatchNorm; a projection shortcut when the shape changes; ReLU after the sum."""
    features = 4 * width
    block = nn.Sequential(
        [
            nn.Conv2D(width, 1, padding="VALID", use_bias=False),
            _batch_norm(),
            nn.ReLU(),
            nn.Conv2D(width, 3, stride=stride, padding=1, use_bias=False),
            _batch_norm(),
            nn.ReLU(),
            nn.Conv2D(features, 1, padding="VALID", use_bias=False),
            _batch_norm(),
        ]
    )
    skip = None
    if stride != 1 or in_features != features:
        skip = nn.Sequential([nn.Conv2D(features, 1, stride=stride, padding="VALID", use_bias=False), _batch_norm()])
    return [nn.Residual(block, skip), nn.ReLU()]


def _stages(widths, depths, in_features: int, make_block, expansion: int = 1) -> list[nn.Layer]:
    """Stages of ``depths[i]`` blocks of ``widths[i]``; every stage but the first halves the resolution in its
    first block. A block outputs ``expansion * width`` channels."""
    layers: list[nn.Layer] = []
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        for index in range(depth):
            stride = 2 if stage > 0 and index == 0 else 1
            layers.extend(make_block(width, stride, in_features))
            in_features = expansion * width
    return layers


def resnet18_cifar(num_classes: int = 10) -> nn.Sequential:
    """ResNet-18 for 32x32 images: a 3x3 stem without max-pooling, four stages of two basic blocks
    (64, 128, 256, 512 channels, projection shortcuts), global average pooling, dense.

    11,173,962 parameters for 10 classes (the CIFAR ResNet-18 of kuangliu/pytorch-cifar), plus BatchNorm's
    running statistics in the state.
    """
    stem = [nn.Conv2D(64, 3, padding=1, use_bias=False), _batch_norm(), nn.ReLU()]
    block = lambda width, stride, in_features: _basic_block(width, stride, in_features, "projection")
    body = _stages((64, 128, 256, 512), (2, 2, 2, 2), 64, block)
    return nn.Sequential([*stem, *body, nn.GlobalAvgPool2D(), nn.Dense(num_classes)])


def resnet20_cifar(num_classes: int = 10, norm: str = "batch") -> nn.Sequential:
    """ResNet-20 of the original ResNet paper's CIFAR-10 section (He et al., 2015, section 4.2): a 3x3 stem, three
    stages of three basic blocks (16, 32, 64 channels) with parameter-free shortcuts (stride-2 subsampling and
    zero channels, "option A"), global average pooling, dense.

    269,722 parameters for 10 classes (the paper's "0.27M"). ``norm="group"`` puts GroupNorm (``min(32, C)``
    groups, the same parameters, no running statistics) in place of every BatchNorm: the variant DP-SGD can train
    (registered as ``resnet20_cifar_groupnorm``).
    """
    stem = [nn.Conv2D(16, 3, padding=1, use_bias=False), _norm(norm, 16), nn.ReLU()]
    block = lambda width, stride, in_features: _basic_block(width, stride, in_features, "subsample", norm)
    body = _stages((16, 32, 64), (3, 3, 3), 16, block)
    return nn.Sequential([*stem, *body, nn.GlobalAvgPool2D(), nn.Dense(num_classes)])


def resnet50(num_classes: int = 1000) -> nn.Sequential:
    """ResNet-50 in the ImageNet layout (torchvision's v1.5: the stride on the 3x3 convolution): a 7x7 stride-2
    stem and 3x3 stride-2 max-pooling, bottleneck stages of 3, 4, 6, 3 blocks (widths 64, 128, 256, 512, outputs
    4x wider), global average pooling, dense.

    25,557,032 parameters for 1,000 classes on 224x224x3 inputs, as torchvision's.
    """
    stem = [
        nn.Conv2D(64, 7, stride=2, padding=3, use_bias=False),
        _batch_norm(),
        nn.ReLU(),
        nn.MaxPool2D(3, 2, padding=1),
    ]
    body = _stages((64, 128, 256, 512), (3, 4, 6, 3), 64, _bottleneck_block, expansion=4)
    return nn.Sequential([*stem, *body, nn.GlobalAvgPool2D(), nn.Dense(num_classes)])


def conv_autoencoder(channels: int = 1) -> nn.Sequential:
    """A convolutional autoencoder for reconstruction (MSE against its input): two stride-2 convolutions down
    (16, 32 channels), two stride-2 transposed convolutions back up to ``channels``; ReLU between, linear output.

    9,569 parameters for one channel. On 28x28x1 inputs the code is 7x7x32; the output has the input's shape for
    any size divisible by 4.
    """
    return nn.Sequential(
        [
            nn.Conv2D(16, 3, stride=2, padding="SAME"),
            nn.ReLU(),
            nn.Conv2D(32, 3, stride=2, padding="SAME"),
            nn.ReLU(),
            nn.ConvTranspose2D(16, 3, stride=2, padding="SAME"),
            nn.ReLU(),
            nn.ConvTranspose2D(channels, 3, stride=2, padding="SAME"),
        ]
    )


# -- the registry: one spec per model ----------------------------------------------------------------------

TASKS = ("classification", "reconstruction")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the library knows of a named model.

    Attributes:
      name: the name :func:`get` and ``jaxcnn train --model`` take.
      builder: ``builder(**kwargs) -> jaxcnn.nn.Layer``; a classifier's builder takes ``num_classes``.
      input_shape: the input shape (batch axis excluded) it is designed for, e.g. ``(28, 28, 1)``; None if any.
      task: ``"classification"`` (logits, cross-entropy; what ``jaxcnn train`` trains) or ``"reconstruction"``
        (outputs shaped like the input, mean squared error).
    """

    name: str
    builder: Callable[..., nn.Layer]
    input_shape: tuple[int, ...] | None = None
    task: str = "classification"


_SPECS: dict[str, ModelSpec] = {}


def register(
    name: str,
    builder: Callable[..., nn.Layer],
    *,
    input_shape: Sequence[int] | None = None,
    task: str = "classification",
    replace: bool = False,
) -> ModelSpec:
    """Make ``builder`` known as ``name`` to :func:`get`, ``jaxcnn train --model NAME`` and ``jaxcnn gradcheck``.

    Args:
      name: a new name (letters, digits, ``_``, ``-`` and ``.``).
      builder: ``builder(**kwargs) -> jaxcnn.nn.Layer``; classifiers take ``num_classes``.
      input_shape: the input shape it is designed for (batch axis excluded), or None.
      task: ``"classification"`` or ``"reconstruction"``.
      replace: allow replacing a registered name (otherwise a ValueError).

    Returns:
      The :class:`ModelSpec` registered.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"a model name is letters, digits, '_', '-' and '.', got {name!r}")
    if not callable(builder):
        raise ValueError(f"builder of model {name!r} must be callable, got {builder!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if input_shape is not None:
        input_shape = tuple(input_shape)
        if not input_shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape):
            raise ValueError(f"input_shape of model {name!r} must be positive ints, got {input_shape!r}")
    if name in _SPECS and not replace:
        raise ValueError(f"model {name!r} is already registered (pass replace=True to replace it)")
    _SPECS[name] = ModelSpec(name, builder, input_shape, task)
    return _SPECS[name]


def unregister(name: str) -> None:
    """Forget a registered model (KeyError-free: an unknown name is a ValueError listing the known ones)."""
    spec(name)
    del _SPECS[name]


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered name; ValueError listing the known names otherwise."""
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    return _SPECS[name]


def get(name: str, **kwargs: Any) -> nn.Layer:
    """Build the named architecture (keyword arguments such as ``num_classes`` go to its builder).

    Raises ValueError listing the known names for an unknown one.
    """
    return spec(name).builder(**kwargs)


def input_shape(name: str) -> tuple[int, ...] | None:
    """The input shape (batch axis excluded) an architecture is designed for, e.g. ``(28, 28, 1)``."""
    return spec(name).input_shape


def names() -> list[str]:
    """The registered architecture names."""
    return sorted(_SPECS)


def classifiers() -> list[str]:
    """The names of the architectures that classify (the ones ``jaxcnn train`` trains)."""
    return sorted(name for name, s in _SPECS.items() if s.task == "classification")


# -- a user's model factory: "package.module:factory" ----------------------------------------------------------

FACTORY_PATTERN = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def is_factory_path(model: str) -> bool:
    """Whether ``model`` has the form ``package.module:factory`` (a user's model factory, not a registered name)."""
    return isinstance(model, str) and FACTORY_PATTERN.fullmatch(model) is not None


def import_factory(path: str) -> Callable[..., nn.Layer]:
    """The callable ``path`` (``"package.module:factory"``) names, imported; ValueError (one line) naming what
    is missing: the module, the attribute, or a callable."""
    if not is_factory_path(path):
        raise ValueError(f"a model factory is given as package.module:factory, got {path!r}")
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"model factory {path!r}: cannot import module {module_name!r} ({error})") from None
    except Exception as error:  # the user's module failed while importing
        raise ValueError(f"model factory {path!r}: importing {module_name!r} failed: {error!r}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"model factory {path!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model factory {path!r} is not callable (it is a {type(target).__name__})")
    return target


def build(model: str, num_classes: int | None = None) -> nn.Layer:
    """The model a ``--model`` value names: a registered name, or ``package.module:factory``.

    A factory is called with ``num_classes=`` when its signature takes it (or ``**kwargs``), else with no
    arguments; it must return a :class:`jaxcnn.nn.Layer`.
    """
    builder = import_factory(model) if is_factory_path(model) else spec(model).builder
    kwargs = {} if num_classes is None or not _takes(builder, "num_classes") else {"num_classes": num_classes}
    built = builder(**kwargs)
    if not isinstance(built, nn.Layer):
        raise ValueError(f"model {model!r} gave a {type(built).__name__}, not a jaxcnn.nn.Layer")
    return built


def _takes(builder: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it plainly
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


for _name, _builder, _shape in (
    ("mnist_cnn", mnist_cnn, (28, 28, 1)),
    ("lenet5", lenet5, (28, 28, 1)),
    ("digits_cnn", digits_cnn, (8, 8, 1)),
    ("resnet18_cifar", resnet18_cifar, (32, 32, 3)),
    ("resnet20_cifar", resnet20_cifar, (32, 32, 3)),
    ("resnet50", resnet50, (224, 224, 3)),
):
    register(_name, _builder, input_shape=_shape)
register(
    "resnet20_cifar_groupnorm",
    lambda num_classes=10: resnet20_cifar(num_classes, norm="group"),
    input_shape=(32, 32, 3),
)
register("conv_autoencoder", conv_autoencoder, input_shape=(28, 28, 1), task="reconstruction")
del _name, _builder, _shape
