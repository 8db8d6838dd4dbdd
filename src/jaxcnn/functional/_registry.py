"""Which forward op has which hand-derived VJP, and the one adapter through which tools call every VJP alike.

Every public ``NAME_vjp`` follows the convention stated in :mod:`jaxcnn.functional`
(``NAME_vjp(*primals, dy, **keyword-only options)``). :func:`register` reads the forward's and the VJP's
signatures once, refuses a pair that does not fit the convention, and derives from them the uniform call that
the tools treating every op alike use (the gradient checker, the explicit reverse pass for losses)::

    rule.vjp(args, dy, **options) -> one cotangent per differentiable argument that was passed (not None)

``args`` and ``options`` are the forward's arguments exactly as a caller passes them (an option may come
positionally, ``max_pool2d(x, 3, 2)``); they are bound to the forward's signature, the primals go to the VJP
positionally and everything else by keyword.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class HandRule:
    """A forward op and its hand-derived VJP, callable in the uniform convention.

    Attributes:
      forward: the op, ``forward(*args, **options) -> y``.
      vjp: ``vjp(args, dy, **options) -> tuple`` of cotangents, one per differentiable argument present.
      differentiable: positions in ``args`` that receive cotangents (labels, for instance, do not).
      hand_vjp: the op's own VJP as registered, ``hand_vjp(*primals, dy, **options)``.
      primals: the names of the forward's array arguments, the positional arguments of ``hand_vjp`` before ``dy``.
    """

    forward: Callable[..., Any]
    vjp: Callable[..., tuple[Any, ...]]
    differentiable: tuple[int, ...]
    hand_vjp: Callable[..., Any] | None = None
    primals: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return _name(self.forward)

    def present(self, args: tuple[Any, ...]) -> tuple[int, ...]:
        """The differentiable positions actually passed (not beyond ``args`` and not None)."""
        return tuple(i for i in self.differentiable if i < len(args) and args[i] is not None)


_RULES: dict[Callable[..., Any], HandRule] = {}


def _name(function: Any) -> str:
    return getattr(function, "__name__", repr(function))


def _same_default(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an array default, say: compare by identity only
        return False


def _fit(forward: Callable[..., Any], vjp: Callable[..., Any]) -> tuple[inspect.Signature, tuple[str, ...]]:
    """``(forward's signature, primal names)``; ValueError in one line where ``vjp`` does not fit ``forward``."""
    where = f"register({_name(forward)}, {_name(vjp)})"
    try:
        forward_signature, vjp_signature = inspect.signature(forward), inspect.signature(vjp)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: cannot read the signatures ({error})") from None
    params = list(vjp_signature.parameters.values())
    positional = [p.name for p in params if p.kind in _POSITIONAL]
    if "dy" not in positional or any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        raise ValueError(
            f"{where}: the VJP must be vjp(*primals, dy, *, **options), with `dy` positional; got {vjp_signature}"
        )
    primals = tuple(positional[: positional.index("dy")])
    if positional[-1] != "dy":
        after = ", ".join(positional[positional.index("dy") + 1 :])
        raise ValueError(f"{where}: the VJP's arguments after `dy` must be keyword-only, got positional {after}")
    forward_params = list(forward_signature.parameters.values())
    leading = tuple(p.name for p in forward_params[: len(primals)] if p.kind in _POSITIONAL)
    if not primals or leading != primals:
        raise ValueError(
            f"{where}: the VJP's arguments before `dy` ({', '.join(primals) or 'none'}) must be the forward's "
            f"leading positional arguments (the forward is {_name(forward)}{forward_signature})"
        )
    keywords = {p.name: p for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY}
    open_keywords = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
    for p in forward_params[len(primals) :]:
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            raise ValueError(f"{where}: the forward's *{p.name} after its array arguments cannot be passed to a VJP")
        if p.kind == inspect.Parameter.VAR_KEYWORD and not open_keywords:
            raise ValueError(f"{where}: the forward takes **{p.name}, so the VJP must take **options too")
        if p.kind == inspect.Parameter.VAR_KEYWORD or (p.name not in keywords and open_keywords):
            continue
        if p.name not in keywords:
            raise ValueError(f"{where}: the forward's option `{p.name}` must be a keyword-only argument of the VJP")
        if not _same_default(p.default, keywords[p.name].default):
            shown = [("no default" if d is _EMPTY else f"default {d!r}") for d in (p.default, keywords[p.name].default)]
            raise ValueError(f"{where}: option `{p.name}` has {shown[0]} in the forward but {shown[1]} in the VJP")
    for name, p in keywords.items():
        if name not in forward_signature.parameters and p.default is _EMPTY:
            raise ValueError(f"{where}: the VJP's keyword `{name}` is no option of the forward, so it needs a default")
    return forward_signature, primals


def _uniform(
    forward_signature: inspect.Signature,
    vjp: Callable[..., Any],
    primals: tuple[str, ...],
    differentiable: tuple[int, ...],
    rule_name: str,
) -> Callable[..., tuple[Any, ...]]:
    """The uniform call ``(args, dy, **options) -> cotangents of the differentiable arguments present``."""
    open_keywords = [p.name for p in forward_signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]

    def uniform(args: Sequence[Any], dy: Any, **options: Any) -> tuple[Any, ...]:
        try:
            bound = forward_signature.bind(*args, **options).arguments
        except TypeError as error:
            raise ValueError(f"{rule_name}: {error}") from None
        arrays = [bound.pop(name, None) for name in primals]
        for name in open_keywords:
            bound.update(bound.pop(name, {}))
        result = vjp(*arrays, dy, **bound)
        if len(primals) == 1 and isinstance(result, (tuple, list)):
            raise ValueError(
                f"{_name(vjp)} returned a {type(result).__name__}; with one primal it returns the bare array"
            )
        cotangents = (result,) if len(primals) == 1 else result
        if not isinstance(cotangents, (tuple, list)) or len(cotangents) != len(primals):
            got = f"{len(cotangents)} cotangents" if isinstance(cotangents, (tuple, list)) else "a single array"
            raise ValueError(f"{_name(vjp)} returned {got}; the convention wants one per primal ({', '.join(primals)})")
        return tuple(cotangents[i] for i in differentiable if i < len(args) and args[i] is not None)

    return uniform


def register(
    forward: Callable[..., Any], vjp: Callable[..., Any], *, differentiable: Sequence[int] | None = None
) -> None:
    """Record ``vjp`` as the hand-derived rule of ``forward``.

    Args:
      forward: the op, ``forward(*arrays, *options)`` (options may also be keyword-only).
      vjp: its VJP in the convention of :mod:`jaxcnn.functional`: ``vjp(*primals, dy, **options)`` whose
        positional arguments before ``dy`` are the forward's leading (array) arguments, by the same names, and
        whose keyword-only arguments are the forward's other arguments with the same defaults (further
        VJP-only keywords need a default); it returns one cotangent per primal (a tuple when there are several).
      differentiable: the positions of the primals that receive cotangents; default every primal. Leave out
        integer inputs such as class labels.

    Raises:
      ValueError: in one line, where ``vjp``'s signature does not fit ``forward``'s.
    """
    forward_signature, primals = _fit(forward, vjp)
    positions = tuple(range(len(primals))) if differentiable is None else tuple(differentiable)
    if not all(isinstance(i, int) and 0 <= i < len(primals) for i in positions):
        raise ValueError(
            f"register({_name(forward)}, {_name(vjp)}): `differentiable` {positions} must index the primals "
            f"({', '.join(primals)})"
        )
    uniform = _uniform(forward_signature, vjp, primals, positions, _name(forward))
    _RULES[forward] = HandRule(forward, uniform, positions, vjp, primals)


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
