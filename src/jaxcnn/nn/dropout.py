"""Dropout: in training, zero each activation with probability ``rate`` and scale the rest by ``1 / (1 - rate)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax

import jaxcnn.functional as F
from jaxcnn.nn.layer import Layer, Params, State, check_key


class DropoutResiduals(NamedTuple):
    key: jax.Array | None  # the key that drew the mask (None: the layer was the identity)
    x: jax.Array  # the layer's input (its shape and dtype rebuild the mask)


@dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout: training mode keeps each element with probability ``1 - rate`` (scaled by
    ``1 / (1 - rate)``), inference mode is the identity. The mask is the one ``flax.linen.Dropout`` draws from
    the same key; the backward applies the same mask to ``dy`` (redrawn from the saved key, not stored).

    Args:
      rate: the probability of dropping an element, in [0, 1] (required, as in ``flax.linen.Dropout``).

    Input any shape; output the same. Training mode needs ``key`` (``model.apply(..., train=True, key=k)``).
    """

    rate: float

    name_prefix: ClassVar[str] = "Dropout"

    def __post_init__(self) -> None:
        rate = self.rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"Dropout: `rate` must be a number in [0, 1], got {rate!r}")
        object.__setattr__(self, "rate", float(rate))

    def forward_with_state(
        self, params: Params, state: State, x: jax.Array, *, train: bool = False, key: jax.Array | None = None
    ) -> tuple[jax.Array, DropoutResiduals, State]:
        if not train or self.rate == 0:
            return x, DropoutResiduals(None, x), state
        if key is None:
            raise ValueError(
                "Dropout in training mode needs a random key: pass key=jax.random.key(seed) to apply "
                "(or train=False for inference, where dropout is the identity)"
            )
        check_key(key)
        return F.dropout(x, self.rate, key), DropoutResiduals(key, x), state

    def backward(self, params: Params, residuals: DropoutResiduals, dy: jax.Array) -> tuple[jax.Array, Params]:
        if residuals.key is None:
            return dy, {}
        return F.dropout_vjp(residuals.x, dy, rate=self.rate, key=residuals.key), {}
