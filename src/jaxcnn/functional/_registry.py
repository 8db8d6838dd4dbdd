"""Which forward op has which hand-derived VJP, in one uniform calling convention.

The public VJPs keep the signatures people read in papers (``conv2d_vjp(x, w, dy)``, ``relu_vjp(x, dy)``).
Tools that treat every op alike (the gradient checker, the explicit reverse pass for losses) need one
convention, so each op also registers an adapter here::

    rule.vjp(args, dy, **options) -> one cotangent per differentiable argument that was passed (not None)

``args`` are the forward's positional array arguments and ``options`` its keyword options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HandRule:
    """A forward op and its hand-derived VJP in the uniform convention.

    Attributes:
      forward: the op, ``forward(*args, **options) -> y``.
      vjp: ``vjp(args, dy, **options) -> tuple`` of cotangents, one per differentiable argument present.
      differentiable: positions in ``args`` that receive cotangents (labels, for instance, do not).
    """

    forward: Callable[..., Any]
    vjp: Callable[..., tuple[Any, ...]]
    differentiable: tuple[int, ...]

    @property
    def name(self) -> str:
        return getattr(self.forward, "__name__", repr(self.forward))

    def present(self, args: tuple[Any, ...]) -> tuple[int, ...]:
        """The differentiable positions actually passed (not beyond ``args`` and not None)."""
        return tuple(i for i in self.differentiable if i < len(args) and args[i] is not None)


_RULES: dict[Callable[..., Any], HandRule] = {}


def register(
    forward: Callable[..., Any], vjp: Callable[..., tuple[Any, ...]], *, differentiable: tuple[int, ...] = (0,)
) -> None:
    """Record ``vjp`` (uniform convention) as the hand-derived rule of ``forward``."""
    _RULES[forward] = HandRule(forward, vjp, tuple(differentiable))


def hand_rule(forward: Callable[..., Any]) -> HandRule:
    """The registered :class:`HandRule` of a functional op; ValueError listing the known ops otherwise."""
    try:
        return _RULES[forward]
    except (KeyError, TypeError):
        known = ", ".join(sorted(rule.name for rule in _RULES.values()))
        raise ValueError(
            f"no hand-derived VJP is registered for {getattr(forward, '__name__', forward)!r}; "
            f"known ops: {known}. Register one with jaxcnn.functional.register(forward, vjp)."
        ) from None


def registered_ops() -> dict[str, HandRule]:
    """All registered rules by op name."""
    return {rule.name: rule for rule in _RULES.values()}
