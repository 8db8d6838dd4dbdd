"""The one set of argument checkers and normalisers, shared by every part of the package (functional ops,
layers, training, meshes).

Every op accepts the same spellings as ``jax.lax``: an ``int`` or a pair for strides, dilations and windows,
and ``"SAME"``, ``"VALID"``, an ``int``, a pair of ints or explicit ``((top, bottom), (left, right))`` for
padding. These helpers turn them into plain tuples early and raise ``ValueError`` naming the argument and the
bad value, so a mistake is reported where it was made rather than deep inside XLA.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

Pair = tuple[int, int]
Padding = str | int | Sequence[int] | Sequence[Sequence[int]]
ExplicitPadding = tuple[tuple[int, int], tuple[int, int]]


def is_int(value: object) -> bool:
    """True for Python and NumPy integers (``operator.index`` works), False for bools, floats and strings."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def positive_int(value: object, name: str) -> int:
    """``value`` as a Python int if it is a positive integer; ValueError naming ``name`` otherwise."""
    if not is_int(value) or operator.index(value) < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return operator.index(value)


def pair(value: int | Sequence[int], name: str, *, minimum: int = 1) -> Pair:
    """Normalise an int or a pair of ints to ``(h, w)``; each must be ``>= minimum``."""
    if is_int(value):
        result = (operator.index(value), operator.index(value))
    elif isinstance(value, Sequence) and len(value) == 2 and all(is_int(v) for v in value):
        result = (operator.index(value[0]), operator.index(value[1]))
    else:
        raise ValueError(f"`{name}` must be an int or a pair of ints, got {value!r}")
    if min(result) < minimum:
        raise ValueError(f"`{name}` (={value!r}) must be >= {minimum}")
    return result


def explicit_padding(
    padding: Padding,
    in_size: Pair,
    window: Pair,
    stride: Pair,
    dilation: Pair = (1, 1),
) -> ExplicitPadding:
    """Resolve any padding spelling to ``((top, bottom), (left, right))`` for a 2-D window.

    ``"SAME"`` follows ``jax.lax``: the output has ``ceil(in / stride)`` cells and the extra padding goes to the
    bottom/right when the total is odd. ``window`` is the undilated window (kernel) size.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            pads = []
            for n, k, s, d in zip(in_size, window, stride, dilation, strict=True):
                effective = (k - 1) * d + 1
                out = -(-n // s)
                total = max((out - 1) * s + effective - n, 0)
                pads.append((total // 2, total - total // 2))
            return (pads[0], pads[1])
        raise ValueError(f"`padding` must be 'SAME', 'VALID', an int or explicit pairs, got {padding!r}")
    if is_int(padding):
        p = operator.index(padding)
        result = ((p, p), (p, p))
    elif isinstance(padding, Sequence) and len(padding) == 2 and all(is_int(p) for p in padding):
        ph, pw = operator.index(padding[0]), operator.index(padding[1])
        result = ((ph, ph), (pw, pw))
    elif (
        isinstance(padding, Sequence)
        and len(padding) == 2
        and all(isinstance(p, Sequence) and len(p) == 2 and all(is_int(v) for v in p) for p in padding)
    ):
        result = ((int(padding[0][0]), int(padding[0][1])), (int(padding[1][0]), int(padding[1][1])))
    else:
        raise ValueError(
            "`padding` must be 'SAME', 'VALID', an int, a pair of ints or ((top, bottom), (left, right)), "
            f"got {padding!r}"
        )
    if min(min(p) for p in result) < 0:
        raise ValueError(f"`padding` (={padding!r}) must not be negative")
    return result


def output_size(in_size: int, window: int, stride: int, dilation: int, pads: tuple[int, int]) -> int:
    """Number of output cells along one axis of a strided, dilated, padded window."""
    effective = (window - 1) * dilation + 1
    return (in_size + pads[0] + pads[1] - effective) // stride + 1


def check_window_fits(
    op: str, in_size: Pair, window: Pair, dilation: Pair, pads: ExplicitPadding, *, what: str = "kernel"
) -> None:
    """Raise ``ValueError`` if the (dilated) window is larger than the padded input."""
    for axis, n, k, d, p in zip(("height", "width"), in_size, window, dilation, pads, strict=True):
        effective = (k - 1) * d + 1
        padded = n + p[0] + p[1]
        if effective > padded:
            raise ValueError(
                f"{op}: {what} {axis} (={k}, {effective} with dilation {d}) is larger than the padded input "
                f"{axis} (={n} + padding {p[0]}+{p[1]} = {padded})"
            )


def window_geometry(
    op: str, in_size: Pair, window: Pair, stride: Pair, dilation: Pair, padding: Padding, *, what: str = "kernel"
) -> tuple[ExplicitPadding, Pair]:
    """``(explicit padding, output (H, W))`` of a 2-D window op; ValueError when the window does not fit."""
    pads = explicit_padding(padding, in_size, window, stride, dilation)
    check_window_fits(op, in_size, window, dilation, pads, what=what)
    out = [output_size(n, k, s, d, p) for n, k, s, d, p in zip(in_size, window, stride, dilation, pads, strict=True)]
    return pads, (out[0], out[1])


def check_rank(op: str, name: str, array_shape: Sequence[int], rank: int, layout: str) -> None:
    """Raise ``ValueError`` if an array does not have the expected rank (``layout`` spells its axes)."""
    if len(array_shape) != rank:
        raise ValueError(f"{op}: `{name}` must have rank {rank} ({layout}), got shape {tuple(array_shape)}")
