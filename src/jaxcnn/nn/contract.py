"""What a layer's ``backward`` must return, checked where its result is used.

``backward(params, residuals, dy)`` returns ``(dx, dparams)``: ``dx`` shaped like the layer's input, ``dparams``
with the structure and shapes of ``params`` (``{}`` for a layer without parameters). A user's layer that gets
this wrong would otherwise fail far away, in a pytree or broadcasting error that names no layer; the explicit
reverse pass, the ``gradients="manual"`` bridge and the gradient checker call :func:`check_backward_result`
on every result instead, which raises a :class:`BackwardError` naming the layer and what was expected.
The checks look only at shapes and structure, so they cost nothing at run time (they run while tracing).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


class BackwardError(ValueError):
    """A layer's ``backward`` returned something of the wrong form; the message names the layer."""


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"an array of shape {tuple(shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _keys_mismatch(where: str, path: str, got: dict, expected: dict) -> BackwardError:
    missing = sorted(set(expected) - set(got), key=str)
    unknown = sorted(set(got) - set(expected), key=str)
    parts = []
    if unknown:
        parts.append(f"unknown {unknown}")
    if missing:
        parts.append(f"missing {missing}")
    inside = f" under {path!r}" if path else ""
    return BackwardError(
        f"{where} returned parameter gradients with keys {sorted(got, key=str)}{inside}, expected the keys of "
        f"params {sorted(expected, key=str)} ({', '.join(parts)})"
    )


def _check_tree(where: str, path: str, got: Any, expected: Any) -> None:
    """Raise BackwardError unless ``got`` has the structure and leaf shapes of ``expected``."""
    if not jax.tree.leaves(expected):  # None or an empty container: no gradient expected ({}, (), None alike)
        if jax.tree.leaves(got):
            where_in = f" for {path!r}, which holds" if path else ", but the layer has"
            raise BackwardError(f"{where} returned parameter gradients{where_in} no parameters; return {{}}")
        return
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            inside = f" for {path!r}" if path else ""
            raise BackwardError(
                f"{where} returned parameter gradients{inside} as {_describe(got)}, expected a dict with keys "
                f"{sorted(expected, key=str)} (shaped like params)"
            )
        if set(got) != set(expected):
            raise _keys_mismatch(where, path, got, expected)
        for key in expected:
            _check_tree(where, f"{path}/{key}" if path else str(key), got[key], expected[key])
        return
    if isinstance(expected, (tuple, list)) and not hasattr(expected, "shape"):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            raise BackwardError(
                f"{where} returned parameter gradients {_describe(got)} for {path or 'params'}, expected "
                f"{_describe(expected)} (shaped like params)"
            )
        for index, (g, e) in enumerate(zip(got, expected, strict=True)):
            _check_tree(where, f"{path}/{index}" if path else str(index), g, e)
        return
    if got is None or (not hasattr(got, "shape") and not isinstance(got, (int, float, complex, np.number))):
        raise BackwardError(
            f"{where} returned {_describe(got) if got is not None else 'None'} as the gradient of parameter "
            f"{path or 'params'}, expected an array of shape {tuple(np.shape(expected))}"
        )
    if tuple(np.shape(got)) != tuple(np.shape(expected)):
        raise BackwardError(
            f"{where} returned a gradient of shape {tuple(np.shape(got))} for parameter {path or 'params'} of "
            f"shape {tuple(np.shape(expected))}"
        )


def check_backward_result(layer: str, result: Any, params: Any, input_shape: tuple[int, ...] | None) -> tuple[Any, Any]:
    """Validate what ``backward`` returned and split it into ``(dx, dparams)``.

    Args:
      layer: the layer's name in the model (``"Swish_0"``, ``"block/Conv_1"``), used in the error.
      result: what ``layer.backward(params, residuals, dy)`` returned.
      params: the parameters the backward was given (``{}`` for none).
      input_shape: the full shape of the layer's input ``(N, ...)``; None to skip the ``dx`` check (integer
        inputs, whose cotangent is not used).

    Returns:
      ``(dx, dparams)``.

    Raises:
      BackwardError: naming the layer and what was expected, e.g. "Swish_0.backward returned dx of shape
        (2, 4) for an input of shape (2, 8)".
    """
    where = f"{layer}.backward"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        hint = " (dx alone?)" if hasattr(result, "shape") else ""
        raise BackwardError(
            f"{where} returned {_describe(result)}{hint}; it must return (dx, dparams): the input's cotangent and "
            "the parameter gradients shaped like params ({} for a layer without parameters)"
        )
    dx, dparams = result
    if input_shape is not None:
        shape = getattr(dx, "shape", None)
        if shape is None:
            raise BackwardError(
                f"{where} returned dx as {_describe(dx) if dx is not None else 'None'}, expected an array of shape "
                f"{tuple(input_shape)} (the input's)"
            )
        if tuple(shape) != tuple(input_shape):
            raise BackwardError(
                f"{where} returned dx of shape {tuple(shape)} for an input of shape {tuple(input_shape)}"
            )
    _check_tree(where, "", dparams, params)
    return dx, dparams
