"""What every check shares: the rows as they are made, and the points they are made at.

Each check runs its comparisons at the given point and then at ``perturbations`` perturbed points (see the
package docstring). The jitted functions are built once per call and run at every point, so a perturbed point
costs run time only, no compilation. The checks themselves: :mod:`jaxcnn.gradcheck.layers` (each layer's
``backward``), :mod:`jaxcnn.gradcheck.model` (the whole model's gradient, in every gradient mode) and
:mod:`jaxcnn.gradcheck.op` (one functional op).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from jaxcnn._validate import is_int
from jaxcnn.gradcheck.numerics import check_seed, dtype_name, perturbed_point
from jaxcnn.gradcheck.report import GIVEN, TOLERANCES, Check, Report, Tolerance, perturbed_label

Progress = Callable[[Check], None]


class Rows:
    """The rows of a report as they are made; each one is handed to ``progress`` (if given) at once."""

    def __init__(self, progress: Progress | None):
        if progress is not None and not callable(progress):
            raise ValueError(f"`progress` must be a callable taking one Check, or None; got {progress!r}")
        self.checks: list[Check] = []
        self.progress = progress

    def add(self, check: Check) -> None:
        self.checks.append(check)
        if self.progress is not None:
            self.progress(check)


class Settings:
    """The validated settings every check starts from: the dtype's name and tolerance, the seed, the number
    of perturbed points, and the rows to fill."""

    def __init__(self, dtype: Any, seed: Any, perturbations: Any, progress: Progress | None):
        self.dtype = dtype
        self.name = dtype_name(dtype)
        self.tolerance: Tolerance = TOLERANCES[self.name]
        self.seed = check_seed(seed)
        self.count = check_perturbations(perturbations)
        self.rows = Rows(progress)

    def report(self, points: list[tuple[str, Any]]) -> Report:
        """The report of the rows made, at ``points``."""
        return Report(self.rows.checks, self.name, [label for label, _ in points])


def check_perturbations(count: Any) -> int:
    if isinstance(count, bool) or not is_int(count) or operator.index(count) < 0:
        raise ValueError(f"`perturbations` must be a non-negative int (0: the given point only), got {count!r}")
    return operator.index(count)


def points(tree: Any, seed: int, count: int, finite: Callable[[Any], bool]) -> list[tuple[str, Any]]:
    """``[("given", tree), ("perturbed(seed=S)", tree + noise), ...]``: ``count`` seeded perturbed copies."""
    out = [(GIVEN, tree)]
    for k in range(count):
        out.append((perturbed_label(seed, k, count), perturbed_point(tree, (seed, 2_000_000 + k), finite)))
    return out


def point_seed(seed: tuple[int, ...], index: int) -> tuple[int, ...]:
    """The seed path of the draws (cotangents, directions) at point ``index``; the given point keeps ``seed``."""
    return seed if index == 0 else (*seed, 1_000 + index)
