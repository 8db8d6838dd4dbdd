"""Skip connections: ``Residual(block, shortcut)`` computes ``block(x) + shortcut(x)``.

The backward of a sum is the simplest rule in backpropagation: ``dy`` reaches both branches unchanged, and the
input's cotangent is the sum of what the two branches send back (``dx = dx_block + dx_shortcut``). That is
all it takes to make DAG-shaped models out of chains.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcnn._validate import is_int
from jaxcnn.nn.container import Container
from jaxcnn.nn.layer import Layer, Params, Residuals, Shape, State, Static, check_input_shape, check_key, named


class Residual(Container):
    """``y = block(x) + shortcut(x)``; the shortcut is the identity by default.

    Parameters and state are dicts with entries ``"block"`` and ``"shortcut"`` (for those that have any);
    the block draws its randomness from ``fold_in(key, 0)``, the shortcut from ``fold_in(key, 1)``.

    Args:
      block: the residual branch (usually a ``Sequential``).
      shortcut: the skip branch, e.g. a 1x1 strided convolution when the block changes the shape; None for the
        identity.
    """

    name_prefix = "Residual"

    def __init__(self, block: Layer, shortcut: Layer | None = None):
        for what, layer in (("block", block), ("shortcut", shortcut)):
            if layer is not None and not isinstance(layer, Layer):
                raise ValueError(f"Residual: {what} must be a jaxcnn.nn.Layer, got {layer!r}")
        if block is None:
            raise ValueError("Residual: block must be a jaxcnn.nn.Layer, got None")
        self.block = block
        self.shortcut = shortcut

    def __repr__(self) -> str:
        return f"Residual(block={self.block!r}, shortcut={self.shortcut!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Residual) and (self.block, self.shortcut) == (other.block, other.shortcut)

    def __hash__(self) -> int:
        return hash(("Residual", self.block, self.shortcut))

    def named_children(self) -> tuple[tuple[str, Layer], ...]:
        children = [("block", self.block)]
        if self.shortcut is not None:
            children.append(("shortcut", self.shortcut))
        return tuple(children)

    def output_shape(self, input_shape: Shape) -> Shape:
        with named("block"):
            block_shape = tuple(self.block.output_shape(tuple(input_shape)))
        if self.shortcut is None:
            skip_shape = tuple(input_shape)
        else:
            with named("shortcut"):
                skip_shape = tuple(self.shortcut.output_shape(tuple(input_shape)))
        if block_shape != skip_shape:
            what = "the identity shortcut" if self.shortcut is None else "the shortcut"
            raise ValueError(
                f"Residual: the block's output {block_shape} and {what}'s {skip_shape} must have the same shape "
                f"to be added (input {tuple(input_shape)}); give a shortcut that maps the input to {block_shape}"
            )
        return block_shape

    def init(self, key: jax.Array, input_shape: Shape, *, dtype: Any = jnp.float32) -> tuple[Params, State]:
        check_key(key)
        shape = check_input_shape(input_shape)
        self.output_shape(shape)
        return self.init_children(key, {name: shape for name, _ in self.named_children()}, dtype)

    def wire(self, run, x: jax.Array) -> jax.Array:
        """Both branches see ``x``; their outputs add up."""
        skip = x if self.shortcut is None else run("shortcut", x)
        out = run("block", x)
        if out.shape != skip.shape:
            what = "the identity shortcut" if self.shortcut is None else "the shortcut"
            raise ValueError(
                f"Residual: the block's output {tuple(out.shape)} and {what}'s {tuple(skip.shape)} must have the "
                f"same shape to be added (input {tuple(x.shape)})"
            )
        return out + skip

    def backward(self, params: Params, residuals: dict[str, Residuals], dy: jax.Array) -> tuple[jax.Array, Params]:
        """``dy`` goes to both branches unchanged; ``dx`` is the sum of what they send back."""
        grads: dict[str, Params] = {}
        dx = self.child_backward("block", params, residuals, dy, grads)
        skip = dy if self.shortcut is None else self.child_backward("shortcut", params, residuals, dy, grads)
        return dx + skip, grads


class SubsampleResiduals(NamedTuple):
    input_shape: Any  # Static shape of x


@dataclasses.dataclass(frozen=True)
class SubsampleShortcut(Layer):
    """The parameter-free shortcut of the CIFAR ResNets ("option A" of He et al., 2015): keep every
    ``stride``-th pixel and zero-pad the channels to ``features`` (half the new channels before, half after).

    ``y[n, i, j, :] = pad(x[n, i * stride, j * stride, :])``; its backward picks ``dy``'s unpadded channels and
    scatters them back to the kept pixels (zeros elsewhere).
    """

    features: int
    stride: int = 2

    def __post_init__(self) -> None:
        for name in ("features", "stride"):
            value = getattr(self, name)
            if not is_int(value) or operator.index(value) < 1:
                raise ValueError(f"SubsampleShortcut: `{name}` must be a positive int, got {value!r}")

    def _pads(self, channels: int) -> tuple[int, int]:
        extra = self.features - channels
        return extra // 2, extra - extra // 2

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(f"SubsampleShortcut expects inputs (N, H, W, C), got per-example shape {input_shape}")
        height, width, channels = input_shape
        if channels > self.features:
            raise ValueError(f"SubsampleShortcut: input channels (={channels}) exceed features (={self.features})")
        return (-(-height // self.stride), -(-width // self.stride), self.features)

    def forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, SubsampleResiduals]:
        self.output_shape(tuple(x.shape[1:]))
        before, after = self._pads(x.shape[-1])
        y = jnp.pad(x[:, :: self.stride, :: self.stride, :], ((0, 0), (0, 0), (0, 0), (before, after)))
        return y, SubsampleResiduals(Static(tuple(x.shape)))

    def backward(self, params: Params, residuals: SubsampleResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        shape = residuals.input_shape.value
        before, _ = self._pads(shape[-1])
        kept = dy[..., before : before + shape[-1]]
        # put row i back at row i * stride: interior padding of stride - 1 zeros, then zeros to the full size
        pads = [(0, 0, 0)]
        for axis in (1, 2):
            pads.append((0, shape[axis] - 1 - (kept.shape[axis] - 1) * self.stride, self.stride - 1))
        pads.append((0, 0, 0))
        return jax.lax.pad(kept, jnp.zeros((), dy.dtype), pads), {}
