"""One functional op: its hand-derived VJP against ``jax.vjp`` and a finite difference, per argument."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxcnn.functional as F
from jaxcnn.gradcheck.checks import Progress, Settings, point_seed, points
from jaxcnn.gradcheck.numerics import all_finite, array_check, cast, fd_check, largest, normal, x64
from jaxcnn.gradcheck.report import Report


def check_op(
    forward: Callable[..., jax.Array],
    *args: Any,
    vjp: Callable[..., Any] | None = None,
    argnums: Sequence[int] | None = None,
    dtype: Any = jnp.float64,
    seed: int = 0,
    perturbations: int = 1,
    finite_differences: bool = True,
    progress: Progress | None = None,
    **options: Any,
) -> Report:
    """Check one functional op's hand-derived VJP against ``jax.vjp`` and finite differences.

    Args:
      forward: the op, called as ``forward(*args, **options)``.
      args: its positional arguments (arrays; None for an absent optional one such as a bias).
      vjp: the hand rule, as ``vjp(*args, dy, **options)`` returning the cotangent of each argument in
        ``argnums`` (a single array when there is one). Omit it for ops registered in
        :mod:`jaxcnn.functional`, whose registered rule is used.
      argnums: the differentiable arguments; default: the registered ones, or every floating-point array.
      dtype: float64 (default) or float32; floating-point arguments are cast to it.
      seed: seeds the cotangents, finite-difference directions and perturbed points.
      perturbations: how many seeded perturbed copies of the differentiable arguments to check at besides the
        given ones (default 1; the other arguments stay as given).
      finite_differences: include the finite-difference rows.
      progress: called with each :class:`Check` as soon as it is made.
      options: keyword options of the op (stride, padding, ...).

    Returns:
      A :class:`Report` with one ``hand vs autodiff`` and one ``hand vs finite diff`` row per argument and point.

    For ops that return ``(y, state...)`` (such as ``batch_norm``), only ``y`` is differentiated: the hand rule
    receives the cotangent of ``y`` alone.
    """
    settings = Settings(dtype, seed, perturbations, progress)
    op = getattr(forward, "__name__", "op")
    with x64(True):
        args = tuple(cast(list(args), dtype))
        positions, hand = _hand_rule(forward, args, vjp, argnums, options)
        call = functools.partial(_output, forward, args, positions, options)
        exact = _hand_and_autodiff(call, args, positions, hand, op)
        output64 = _output64(forward, tuple(cast(list(args), jnp.float64)), positions, options)
        diff_args = tuple(args[i] for i in positions)
        y = jax.eval_shape(call, *diff_args)
        forward_jit = jax.jit(call)
        at = points(diff_args, settings.seed, settings.count, lambda point: all_finite(forward_jit(*point)))
        for index, (point, at_args) in enumerate(at):
            draws = point_seed((settings.seed,), index)
            dy = jnp.asarray(normal((*draws, 0), y.shape), y.dtype)
            got, auto = exact(at_args, dy)
            for i, g, a in zip(positions, got, auto, strict=True):
                where = ("op", op, f"arg {i}", "hand vs autodiff")
                settings.rows.add(array_check(where, g, a, settings.tolerance, largest(auto), point))
            if finite_differences:
                _op_fd_rows(output64, op, positions, at_args, got, dy, draws, point, settings)
    return settings.report(at)


def _with(args: Sequence[Any], positions: Sequence[int], values: Sequence[Any]) -> list[Any]:
    """``args`` with ``values`` put at ``positions``."""
    full = list(args)
    for i, value in zip(positions, values, strict=True):
        full[i] = value
    return full


def _first_output(result: Any) -> Any:
    """``y`` of an op that returns ``(y, state...)``; the result itself otherwise."""
    return result[0] if isinstance(result, tuple) else result


def _output(forward, args, positions, options, *diff) -> Any:
    """The op's ``y`` with the differentiable arguments replaced by ``diff``."""
    return _first_output(forward(*_with(args, positions, diff), **options))


def _hand_rule(forward, args, vjp, argnums, options) -> tuple[tuple[int, ...], Callable[..., tuple[Any, ...]]]:
    """``(positions, hand)``: the differentiable arguments and ``hand(dy, args) -> their cotangents``, from
    ``vjp`` or else the rule registered for ``forward``."""
    if vjp is None:
        rule = F.hand_rule(forward)
        positions = tuple(argnums) if argnums is not None else rule.present(args)

        def hand(dy, at):
            cotangents = dict(zip(rule.present(at), rule.vjp(at, dy, **options), strict=True))
            return tuple(cotangents[i] for i in positions)

        return positions, hand
    floating = lambda a: isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)  # noqa: E731
    positions = tuple(argnums) if argnums is not None else tuple(i for i, a in enumerate(args) if floating(a))

    def hand(dy, at):
        result = vjp(*at, dy, **options)
        return tuple(result) if isinstance(result, (tuple, list)) else (result,)

    return positions, hand


def _hand_and_autodiff(call, args, positions, hand, op: str) -> Callable[..., tuple[Any, Any]]:
    """Jitted ``(diff_args, dy) -> (hand cotangents, jax.vjp's)``, checking the hand rule's count and shapes."""

    @jax.jit
    def run(diff_args, dy):
        _, pullback = jax.vjp(call, *diff_args)
        got = hand(dy, tuple(_with(args, positions, diff_args)))
        if len(got) != len(positions):
            raise ValueError(f"{op}: the hand VJP returned {len(got)} cotangents for arguments {positions}")
        for i, g, a in zip(positions, got, diff_args, strict=True):
            if tuple(np.shape(g)) != tuple(np.shape(a)):
                raise ValueError(
                    f"{op}: the hand VJP returned a cotangent of shape {tuple(np.shape(g))} for argument "
                    f"{i} of shape {tuple(np.shape(a))}"
                )
        return got, pullback(dy)

    return run


def _output64(forward, args64, positions, options) -> Callable[..., Any]:
    """Jitted ``(diff64, value, i) -> y`` in float64: the op at ``diff64`` with argument ``i`` set to ``value``."""

    @functools.partial(jax.jit, static_argnums=2)
    def output(diff64, value, i):
        full = _with(args64, positions, diff64)
        full[i] = value
        return _first_output(forward(*full, **options))

    return output


def _op_fd_rows(output64, op, positions, at_args, got, dy, draws, point, settings: Settings) -> None:
    """Each argument's hand cotangent against a central difference of the float64 op, projected on ``dy``."""
    diff64 = tuple(cast(list(at_args), jnp.float64))
    dy64 = np.asarray(dy, np.float64)
    scale = largest(got)
    for n, i in enumerate(positions):
        settings.rows.add(
            fd_check(
                ("op", op, f"arg {i}", "hand vs finite diff"),
                lambda value, i=i: output64(diff64, value, i),
                diff64[n],
                got[n],
                (*draws, n + 1),
                settings.tolerance,
                point,
                cotangent=dy64,
                group_scale=scale,
            )
        )
