"""Flax interop: the same model as a ``flax.linen`` module, with the same variables (``jaxcnn.interop.flax``).

jaxcnn names parameters as Flax linen does (``Conv_0/kernel``, ``BatchNorm_1/scale``, BatchNorm's running
``mean`` and ``var``), so moving between the two is a renaming of collections, not of arrays:

* ``to_flax(model, params, state) -> (module, variables)``: a ``flax.linen`` module built layer for layer
  (``nn.Conv``, ``nn.BatchNorm``, ``nn.avg_pool``...) with ``variables = {"params": params, "batch_stats": state}``;
  ``module.apply(variables, x, train=False)`` equals ``model.apply(params, state, x, train=False)``, and in
  training mode ``module.apply(variables, x, train=True, mutable=["batch_stats"])`` returns the same output and
  running statistics.
* ``from_flax(module, variables, model) -> (params, state)``: the way back, checked against the model's layout.

One difference to know: in training mode a ``Dropout`` layer draws its mask from Flax's ``"dropout"`` RNG
stream in Flax and from the key passed to ``apply`` in jaxcnn, so the two masks differ (each is a valid draw).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as fnn
import jax
import jax.numpy as jnp

from jaxcnn import nn


def _padding(padding: Any) -> Any:
    """A jaxcnn padding spelling as Flax takes it (strings unchanged, an int p as ((p, p), (p, p)))."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple(tuple(p) for p in padding)


def _subsample(layer: nn.SubsampleShortcut, x: jax.Array) -> jax.Array:
    extra = layer.features - x.shape[-1]
    kept = x[:, :: layer.stride, :: layer.stride, :]
    return jnp.pad(kept, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


def _functional(layer: nn.Layer):
    """The Flax-side function of a parameter-free layer, or None if it has none."""
    pool_options = lambda layer: dict(
        window_shape=layer.window, strides=layer.stride or layer.window, padding=_padding(layer.padding)
    )
    table = {
        nn.ReLU: lambda layer: fnn.relu,
        nn.LeakyReLU: lambda layer: lambda x: fnn.leaky_relu(x, layer.negative_slope),
        nn.ELU: lambda layer: lambda x: fnn.elu(x, layer.alpha),
        nn.GELU: lambda layer: lambda x: fnn.gelu(x, approximate=layer.approximate),
        nn.Sigmoid: lambda layer: fnn.sigmoid,
        nn.Tanh: lambda layer: jnp.tanh,
        nn.Softplus: lambda layer: fnn.softplus,
        nn.MaxPool2D: lambda layer: lambda x: fnn.max_pool(x, **pool_options(layer)),
        # Flax divides by counts built in the default dtype (float64 under jax_enable_x64): keep x's dtype
        nn.AvgPool2D: lambda layer: (
            lambda x: fnn.avg_pool(x, **pool_options(layer), count_include_pad=False).astype(x.dtype)
        ),
        nn.GlobalAvgPool2D: lambda layer: lambda x: jnp.mean(x, axis=(1, 2)),
        nn.Flatten: lambda layer: lambda x: x.reshape(x.shape[0], -1),
        nn.Upsample2D: lambda layer: lambda x: jnp.repeat(jnp.repeat(x, layer.scale[0], 1), layer.scale[1], 2),
        nn.SubsampleShortcut: lambda layer: lambda x: _subsample(layer, x),
    }
    build = table.get(type(layer))
    return None if build is None else build(layer)


def _submodule(layer: nn.Layer, name: str, train: bool) -> Any:
    """The Flax module (or function) computing ``layer``, named ``name``."""
    if isinstance(layer, nn.Sequential):
        return FlaxSequential(layers=tuple(layer.named_layers()), name=name)
    if isinstance(layer, nn.Residual):
        return FlaxResidual(block=layer.block, shortcut=layer.shortcut, name=name)
    if type(layer) in (nn.Conv2D, nn.ConvTranspose2D):
        conv = dict(strides=layer.stride, padding=_padding(layer.padding), kernel_dilation=layer.dilation)
        conv.update(use_bias=layer.use_bias, name=name)
        if type(layer) is nn.Conv2D:
            return fnn.Conv(layer.features, layer.kernel_size, feature_group_count=layer.groups, **conv)
        return fnn.ConvTranspose(layer.features, layer.kernel_size, **conv)
    if type(layer) is nn.Dense:
        return fnn.Dense(layer.features, use_bias=layer.use_bias, name=name)
    if type(layer) is nn.BatchNorm:
        return fnn.BatchNorm(
            use_running_average=not train,
            momentum=layer.momentum,
            epsilon=layer.epsilon,
            use_scale=layer.use_scale,
            use_bias=layer.use_bias,
            name=name,
        )
    if type(layer) is nn.LayerNorm:
        return fnn.LayerNorm(epsilon=layer.epsilon, use_scale=layer.use_scale, use_bias=layer.use_bias, name=name)
    if type(layer) is nn.GroupNorm:
        options = dict(epsilon=layer.epsilon, use_scale=layer.use_scale, use_bias=layer.use_bias, name=name)
        return fnn.GroupNorm(num_groups=layer.groups, **options)
    if type(layer) is nn.Dropout:
        return fnn.Dropout(layer.rate, deterministic=not train, name=name)
    function = _functional(layer)
    if function is None:
        raise ValueError(f"to_flax: no Flax equivalent for {name} ({type(layer).__name__})")
    return function


class FlaxSequential(fnn.Module):
    """``jaxcnn.nn.Sequential`` as a Flax module: submodules named as jaxcnn names its layers."""

    layers: tuple[tuple[str, nn.Layer], ...]

    @fnn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for name, layer in self.layers:
            x = _call(_submodule(layer, name, train), x, train)
        return x


class FlaxResidual(fnn.Module):
    """``jaxcnn.nn.Residual`` as a Flax module: ``block(x) + shortcut(x)`` with submodules ``block``, ``shortcut``."""

    block: nn.Layer
    shortcut: nn.Layer | None = None

    @fnn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        skip = x if self.shortcut is None else _call(_submodule(self.shortcut, "shortcut", train), x, train)
        return _call(_submodule(self.block, "block", train), x, train) + skip


def _call(module: Any, x: jax.Array, train: bool) -> jax.Array:
    if isinstance(module, (FlaxSequential, FlaxResidual)):
        return module(x, train)
    return module(x)


def _as_root(model: nn.Layer) -> fnn.Module:
    if isinstance(model, nn.Sequential):
        return FlaxSequential(layers=tuple(model.named_layers()))
    if isinstance(model, nn.Residual):
        return FlaxResidual(block=model.block, shortcut=model.shortcut)
    return FlaxSequential(layers=((model.prefix() + "_0", model),))


def to_flax(model: nn.Layer, params: Any, state: Any) -> tuple[fnn.Module, dict[str, Any]]:
    """The ``flax.linen`` module equivalent to ``model``, and its variables.

    Args:
      model: a jaxcnn model (``Sequential``, ``Residual`` or a single layer) made of layers that have a Flax
        equivalent (every built-in layer does).
      params, state: the model's parameters and state, as ``model.init`` returns them.

    Returns:
      ``(module, variables)`` with ``variables = {"params": params}`` plus ``"batch_stats": state`` when the model
      has BatchNorm statistics. Call ``module.apply(variables, x, train=False)`` for inference and
      ``module.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})`` for training.
      A single layer is wrapped as the only layer of a ``Sequential`` (its variables too).
    """
    module = _as_root(model)
    _check_convertible(model, "model")
    if not isinstance(model, nn.Container):
        name = model.prefix() + "_0"
        params = {name: params} if jax.tree.leaves(params) else {}
        state = {name: state} if jax.tree.leaves(state) else {}
    variables = {"params": params}
    if jax.tree.leaves(state):
        variables["batch_stats"] = state
    return module, variables


def _check_convertible(layer: nn.Layer, path: str) -> None:
    if isinstance(layer, nn.Container):
        for name, child in layer.named_children():
            _check_convertible(child, f"{path}/{name}")
        return
    _submodule(layer, path, train=False)  # raises for a layer without a Flax equivalent


def from_flax(
    module: fnn.Module, variables: Any, model: nn.Layer, *, input_shape: tuple[int, ...] | None = None
) -> tuple[Any, Any]:
    """``(params, state)`` for ``model`` from the variables of the equivalent Flax module.

    Args:
      module: the ``flax.linen`` module the variables belong to (one from :func:`to_flax`, or a Flax model whose
        submodules carry the same auto-names, such as Flax's MNIST-example CNN for ``mnist_cnn``).
      variables: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` only for models with BatchNorm).
      model: the jaxcnn model to receive them.
      input_shape: one example's shape; when given, every array's shape is checked against ``model.init``
        (otherwise the names are: every layer's parameters and statistics present, nothing else).

    Raises:
      ValueError: names (or, with ``input_shape``, shapes) that do not match the model's layout.
    """
    if not isinstance(module, fnn.Module):
        raise ValueError(f"from_flax: module must be a flax.linen Module, got {type(module).__name__}")
    if not hasattr(variables, "get") or "params" not in variables:
        raise ValueError("from_flax: variables must hold a 'params' collection")
    unknown = sorted(set(variables) - {"params", "batch_stats"})
    if unknown:
        raise ValueError(f"from_flax: collections {unknown} have no place in a jaxcnn model (params, batch_stats)")
    plain = lambda tree: jax.tree.map(lambda leaf: leaf, dict(tree), is_leaf=lambda node: node is None)
    params = _to_dicts(plain(variables["params"]))
    state = _to_dicts(plain(variables.get("batch_stats", {})))
    if not isinstance(model, nn.Container):
        name = model.prefix() + "_0"
        params, state = params.get(name, {}), state.get(name, {})
    if input_shape is not None:
        expected_params, expected_state = jax.eval_shape(lambda key: model.init(key, input_shape), jax.random.key(0))
        for what, got, want in (("params", params, expected_params), ("batch_stats", state, expected_state)):
            _compare(what, got, want)
    else:
        _check_names(model, params, state, "")
    return params, state


def _to_dicts(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {key: _to_dicts(value) for key, value in tree.items()}
    return tree


def _compare(what: str, got: Any, want: Any) -> None:
    got_paths = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(got)[0]}
    want_paths = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(want)[0]}
    missing, extra = sorted(set(want_paths) - set(got_paths)), sorted(set(got_paths) - set(want_paths))
    if missing or extra:
        raise ValueError(f"from_flax: {what} do not match the model: missing {missing}, unexpected {extra}")
    for path, leaf in got_paths.items():
        if tuple(jnp.shape(leaf)) != tuple(want_paths[path].shape):
            raise ValueError(
                f"from_flax: {what}{path} has shape {tuple(jnp.shape(leaf))}, the model expects "
                f"{tuple(want_paths[path].shape)}"
            )


def _expected_keys(layer: nn.Layer) -> tuple[list[str], list[str]] | None:
    """The parameter and state names a built-in leaf layer has (None for layers this module cannot tell)."""
    if isinstance(layer, (nn.Conv2D, nn.ConvTranspose2D, nn.Dense)):
        return (["kernel", "bias"] if layer.use_bias else ["kernel"]), []
    if isinstance(layer, (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm)):
        names = [name for name, used in (("scale", layer.use_scale), ("bias", layer.use_bias)) if used]
        return names, (["mean", "var"] if isinstance(layer, nn.BatchNorm) else [])
    if _functional(layer) is not None or isinstance(layer, nn.Dropout):
        return [], []
    return None


def _check_names(layer: nn.Layer, params: Any, state: Any, path: str) -> None:
    """Every layer's parameters and statistics present under its name, and nothing else."""
    where = path or "the model"
    if isinstance(layer, nn.Container):
        layer.check_names(params, state)
        for name, child in layer.named_children():
            _check_names(child, params.get(name, {}), state.get(name, {}), f"{path}/{name}" if path else name)
        return
    expected = _expected_keys(layer)
    if expected is None:
        return
    for what, tree, names in (("params", params, expected[0]), ("batch_stats", state, expected[1])):
        got = sorted(tree) if isinstance(tree, dict) else tree
        if got != sorted(names):
            kind = type(layer).__name__
            raise ValueError(f"from_flax: {what} of {where} ({kind}) are {got}, expected {sorted(names)}")


def parameter_count(params: Any) -> int:
    """The number of scalars in a parameter tree."""
    return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(params))


__all__ = ["FlaxResidual", "FlaxSequential", "from_flax", "parameter_count", "to_flax"]
