"""Argument checks of the norms in :mod:`jaxcnn.functional.norm`: each raises a one-line ValueError naming the op
and the problem."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn._validate import positive_int


def check_x(op: str, x: jax.Array) -> None:
    if x.ndim < 2:
        raise ValueError(f"{op}: `x` must have rank >= 2 (N, ..., C), got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{op}: `x` must be a floating-point array, got dtype {x.dtype}")


def check_channels(op: str, name: str, value: Any, channels: int, *, optional: bool = True) -> None:
    """``value`` must be a ``(channels,)`` array (or None when ``optional``)."""
    if value is None and optional:
        return
    shape = None if value is None else tuple(jnp.shape(value))
    if shape != (channels,):
        raise ValueError(f"{op}: `{name}` must have shape ({channels},), got {shape}")


def check_number(op: str, name: str, value: Any, low: float, high: float = math.inf) -> float:
    """``value`` as a float if it is a finite real number in ``[low, high]``; ValueError otherwise."""
    try:
        number = None if isinstance(value, (bool, np.bool_)) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or not low <= number <= high:
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{op}: `{name}` must be a finite number {bounds}, got {value!r}")
    return number


def check_dy(op: str, x: jax.Array, dy: jax.Array) -> None:
    if tuple(jnp.shape(dy)) != tuple(x.shape):
        raise ValueError(f"{op}: `dy` must have the shape of `x` {tuple(x.shape)}, got {tuple(jnp.shape(dy))}")


def check_common(op: str, x: jax.Array, scale: Any, bias: Any, epsilon: Any) -> float:
    check_x(op, x)
    check_channels(op, "scale", scale, x.shape[-1])
    check_channels(op, "bias", bias, x.shape[-1])
    return check_number(op, "epsilon", epsilon, 0.0)


def check_batch_norm(op, x, scale, bias, running_mean, running_var, train, momentum, epsilon) -> float:
    epsilon = check_common(op, x, scale, bias, epsilon)
    check_channels(op, "running_mean", running_mean, x.shape[-1], optional=False)
    check_channels(op, "running_var", running_var, x.shape[-1], optional=False)
    if not isinstance(train, (bool, np.bool_)):
        raise ValueError(f"{op}: `train` must be a bool, got {train!r}")
    check_number(op, "momentum", momentum, 0.0, 1.0)
    return epsilon


def check_groups(op: str, channels: int, groups: Any) -> int:
    try:
        groups = positive_int(groups, "groups")
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None
    if channels % groups:
        raise ValueError(f"{op}: channels (={channels}) must be divisible by `groups` (={groups})")
    return groups


def check_saved(op: str, stats: Any, channels: int, train: Any) -> None:
    if stats is None:
        return
    if train is not True or not isinstance(stats, tuple) or len(stats) != 2:
        raise ValueError(f"{op}: `stats` must be the BatchStatistics of a train=True forward, got {stats!r:.80}")
    for name, value in zip(("mean", "inv_std"), stats, strict=True):
        check_channels(op, f"stats.{name}", value, channels, optional=False)
