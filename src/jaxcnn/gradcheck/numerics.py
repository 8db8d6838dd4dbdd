"""The numerics of the gradient check: seeded draws, casts, array comparisons, finite differences, and the
perturbed points at which every check is repeated."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.gradcheck.report import GIVEN, TOLERANCES, Check, Tolerance

# -- helpers ----------------------------------------------------------------------------------------------------


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
    return int(seed)


def dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(f"`dtype` must be float64 or float32, got {name}")
    return name


@contextlib.contextmanager
def x64(needed: bool) -> Iterator[None]:
    """Enable 64-bit types inside the block when needed and not already on."""
    if needed and not jax.config.jax_enable_x64:
        with jax.enable_x64(True):
            yield
    else:
        yield


def cast(tree: Any, dtype: Any) -> Any:
    """Cast the floating-point leaves of a pytree to ``dtype``; leave integer leaves (labels, keys) alone."""

    def cast(leaf):
        leaf = jnp.asarray(leaf) if isinstance(leaf, (np.ndarray, float)) else leaf
        if not isinstance(leaf, jax.Array) or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        if isinstance(leaf, jax.core.Tracer):
            return leaf.astype(dtype)
        # a concrete array: cast on the host (the same rounding), not by a device op compiled per shape and dtype
        return jnp.asarray(np.asarray(leaf).astype(dtype))

    return jax.tree.map(cast, tree)


def compare(candidate: Any, reference: Any) -> tuple[float, float, float | None, tuple[int, ...] | None]:
    """``(max_abs, max_rel, cosine, worst_index)`` between two arrays of the same shape (computed in float64)."""
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare arrays of shapes {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0, 0.0, None, None
    diff = np.abs(a - b)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.ndim else ()
    max_abs = float(diff.max())
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
    max_rel = max_abs / scale if scale > 0 else 0.0
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(np.sum(a * b) / norms) if norms > 0 else (1.0 if max_abs == 0 else 0.0)
    return max_abs, max_rel, cosine, tuple(int(i) for i in worst)


def leaves_with_names(tree: Any) -> list[tuple[str, str, Any]]:
    """``(layer path, parameter name, leaf)`` for every leaf of a nested-dict parameter tree."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(entry, "key", getattr(entry, "idx", entry))) for entry in path]
        out.append(("/".join(keys[:-1]) or "-", keys[-1] if keys else "-", leaf))
    return out


def replace_leaf(tree: Any, index: int, value: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    leaves[index] = value
    return jax.tree.unflatten(treedef, leaves)


_STREAM = 0x6A78C  # a tag in front of every seed path: the checker's draws never equal a user's default_rng(seed)


def normal(seed: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float64 numbers from a seed path (numpy, so no device compile per shape).

    ``default_rng((s, 0))`` draws exactly what ``default_rng(s)`` draws, so without the tag a cotangent could
    equal (a multiple of) inputs a test made with the same seed, which makes some true gradients vanish.
    """
    return np.random.default_rng((_STREAM, *seed)).standard_normal(shape)


# The relative round-off of one float64 evaluation of a checked function, a few eps: a loss or a layer output is
# a short chain of sums, products, exps and logs of values of about its own size.
EVALUATION_ROUNDOFF = 5 * float(np.finfo(np.float64).eps)

OK, ZERO_GRADIENT, FAIL = "ok", "zero gradient", "FAIL"


def finite_difference_check(
    f: Callable[[Any], Any],
    point: Any,
    gradient: Any,
    seed: tuple[int, ...],
    tolerance: Tolerance,
    cotangent: Any = None,
    group_scale: float = 0.0,
) -> tuple[float, float, str]:
    """Central difference of ``f`` at ``point`` along a random unit direction ``v``, against ``<gradient, v>``.

    ``f`` may return an array: the difference ``(f(p + h v) - f(p - h v)) / 2h`` is taken elementwise and then
    projected on ``cotangent`` (ones when None), so that large outputs which do not depend on ``p`` cannot swamp
    the change. The relative error divides by ``max(|fd|, |<g, v>|, |g| / sqrt(n))``: the last term is the
    typical size of ``<g, v>`` for a random direction, so a direction that happens to be nearly orthogonal to
    ``g`` does not turn round-off into a failure. Everything is evaluated in float64.

    Round-off. Each evaluation carries a relative error of about ``e = EVALUATION_ROUNDOFF`` (a few eps), so the
    central difference of one output entry carries ``2 e |f| / 2h = e |f| / h``: the finite difference cannot
    resolve a directional derivative below ``R = e / h * sum |f(p)| |cotangent|``, summed over the entries that
    changed (the others are taken not to depend on ``p``), or over all entries when none changed at all.

    * ``"zero gradient"`` (a pass): the finite difference is below ``R`` (often exactly 0: the loss did not
      change by a single bit) and so is ``|<g, v>|``, or it is below the round-off ``tolerance.floor *
      group_scale`` of a gradient computed in the checked dtype (as for the exact rows): a gradient that is zero,
      such as that of a bias feeding a BatchNorm, within what either side can resolve;
    * ``"ok"``: the relative error is within ``tolerance.finite_difference``, or the error is below ``R``;
    * ``"FAIL"`` otherwise, or when anything is not finite.

    Returns ``(abs error, rel error, verdict)``.
    """
    point = np.asarray(point, np.float64)
    v = normal(seed, point.shape)
    v /= max(float(np.linalg.norm(v)), 1e-300)
    h = tolerance.step
    plus = np.asarray(f(point + h * v), np.float64)
    minus = np.asarray(f(point - h * v), np.float64)
    center = np.asarray(f(point), np.float64)
    weights = np.ones_like(center) if cotangent is None else np.asarray(cotangent, np.float64)
    numeric = float(np.sum((plus - minus) * weights) / (2 * h))
    g = np.asarray(gradient, np.float64)
    analytic = float(np.sum(g * v))
    error = abs(numeric - analytic)
    scale = max(abs(numeric), abs(analytic), float(np.linalg.norm(g)) / math.sqrt(max(g.size, 1)))
    relative = error / scale if scale > 0 else 0.0
    changed = plus != minus
    sizes = np.abs(center) * np.abs(weights)
    resolution = EVALUATION_ROUNDOFF / h * float(np.sum(sizes * changed if np.any(changed) else sizes))
    if not (np.isfinite(relative) and np.isfinite(analytic)):
        return error, relative, FAIL
    if abs(numeric) <= resolution and abs(analytic) <= max(resolution, tolerance.floor * group_scale):
        return error, relative, ZERO_GRADIENT
    if relative <= tolerance.finite_difference or error <= resolution:
        return error, relative, OK
    return error, relative, FAIL


def jitter(tree: Any, seed: tuple[int, ...]) -> Any:
    """Every float leaf plus Gaussian noise of 1e-3 times its spread (1e-4 absolute for constant leaves)."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for index, leaf in enumerate(leaves):
        values = np.asarray(leaf, np.float64)
        spread = float(np.std(values)) if values.size > 1 else 0.0
        noise = normal((*seed, index), values.shape) * (1e-3 * spread if spread > 0 else 1e-4)
        out.append(jnp.asarray(values + noise))
    return jax.tree.unflatten(treedef, out)


def largest(*trees: Any) -> float:
    """The largest absolute entry over every leaf of the given pytrees (0 when there is none)."""
    values = [float(np.max(np.abs(np.asarray(leaf, np.float64)), initial=0.0)) for leaf in jax.tree.leaves(trees)]
    return max(values, default=0.0)


Where = tuple[str, str, str, str]  # a row's scope, layer, quantity and method, as in :class:`Check`


def array_check(
    where: Where, candidate: Any, reference: Any, tolerance: Tolerance, group_scale: float = 0.0, point: str = GIVEN
) -> Check:
    """Compare two arrays: ok when the max relative error is within ``tolerance.exact``, or when the max
    absolute error is below ``tolerance.floor * group_scale`` (round-off on a gradient that is exactly zero,
    measured against the largest entry of the layer's or model's whole gradient)."""
    max_abs, max_rel, cosine, worst = compare(candidate, reference)
    finite = bool(np.isfinite(max_rel)) and bool(np.all(np.isfinite(np.asarray(candidate, np.float64))))
    ok = finite and (max_rel <= tolerance.exact or max_abs <= tolerance.floor * group_scale)
    return Check(*where, max_abs, max_rel, cosine, worst, tolerance.exact, ok, point)


def fd_check(
    where: Where,
    f: Callable[[Any], Any],
    point: Any,
    gradient: Any,
    seed: tuple[int, ...],
    tolerance: Tolerance,
    at: str,
    cotangent: Any = None,
    group_scale: float = 0.0,
) -> Check:
    """The finite-difference row :func:`finite_difference_check` makes of ``f`` at ``point`` (the row's ``point``
    is ``at``), held to ``tolerance.finite_difference``; ``group_scale`` is the largest entry of the layer's or
    model's whole gradient (the round-off of an exactly-zero gradient scales with it)."""
    error, relative, verdict = finite_difference_check(f, point, gradient, seed, tolerance, cotangent, group_scale)
    ok = verdict != FAIL
    note = verdict if verdict == ZERO_GRADIENT else ""
    return Check(*where, error, relative, None, None, tolerance.finite_difference, ok, at, note)


# -- perturbed points -------------------------------------------------------------------------------------------

PERTURBATION = 0.5  # noise, in units of each leaf's own scale
_SHRINK_TRIES = 12  # halvings of the noise before giving up on a point where the function is not finite


def _noise_scale(values: np.ndarray) -> float:
    """A leaf's own scale: its standard deviation, or, for a scalar or a (nearly) constant leaf such as a scale
    initialised to 1 or a bias to 0, the size of its values (at least 1)."""
    rms = float(np.sqrt(np.mean(values**2))) if values.size else 0.0
    spread = float(np.std(values)) if values.size > 1 else 0.0
    if spread > 1e-3 * max(rms, 1e-300):
        return spread
    return max(rms, 1.0)


def perturbation(tree: Any, seed: tuple[int, ...]) -> Any:
    """Seeded noise for every floating-point leaf of ``tree`` (None for the others), ``PERTURBATION`` times the
    leaf's own scale times N(0, 1) elementwise, in float64: biases at 0 and scales at 1 move off those values,
    kernels by half their spread."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for index, leaf in enumerate(leaves):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            out.append(None)
            continue
        values = np.asarray(leaf, np.float64)
        out.append(PERTURBATION * _noise_scale(values) * normal((*seed, index), values.shape))
    return treedef, out


def add_noise(tree: Any, noise: tuple[Any, list[Any]], factor: float = 1.0) -> Any:
    """``tree`` plus ``factor`` times the noise from :func:`perturbation`, each leaf in its own dtype."""
    treedef, parts = noise
    leaves = jax.tree.leaves(tree)
    out = [
        leaf if part is None else jnp.asarray(np.asarray(leaf, np.float64) + factor * part, jnp.result_type(leaf))
        for leaf, part in zip(leaves, parts, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def perturbed_point(tree: Any, seed: tuple[int, ...], finite: Callable[[Any], bool]) -> Any:
    """``tree`` plus :func:`perturbation` noise, halved until ``finite(point)`` holds (a user's op may have a
    domain, such as a logarithm, that the full noise leaves); the given tree itself if no halving helps."""
    noise = perturbation(tree, seed)
    factor = 1.0
    for _ in range(_SHRINK_TRIES):
        point = add_noise(tree, noise, factor)
        if finite(point):
            return point
        factor /= 2
    return tree


def all_finite(tree: Any) -> bool:
    """True when every floating-point leaf of ``tree`` is finite."""
    return all(
        bool(np.all(np.isfinite(np.asarray(leaf, np.float64))))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    )
