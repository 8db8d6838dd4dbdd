"""What a gradient check reports: tolerances per dtype, one :class:`Check` per comparison, the :class:`Report`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tolerance:
    """Pass thresholds for one dtype.

    Attributes:
      exact: max relative error, hand rule vs autodiff.
      finite_difference: relative error of a directional finite difference.
      floor: absolute errors below ``floor`` times the largest entry of the layer's (or model's) gradient pass
        too, so that a gradient that is exactly zero (a bias feeding a centring op) may carry round-off.
      step: the finite-difference step along a unit direction.
    """

    exact: float
    finite_difference: float
    floor: float
    step: float = 1e-6


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(exact=1e-10, finite_difference=1e-5, floor=1e-13),
    "float32": Tolerance(exact=1e-4, finite_difference=1e-2, floor=1e-5),
}

GIVEN = "given"


def perturbed_label(seed: int, index: int, count: int) -> str:
    """The ``point`` of rows at the ``index``-th of ``count`` perturbed points: ``perturbed(seed=0)``, or
    ``perturbed(seed=0, 2/3)`` when there are several."""
    return f"perturbed(seed={seed})" if count == 1 else f"perturbed(seed={seed}, {index + 1}/{count})"


@dataclass(frozen=True)
class Check:
    """One comparison: where (``layer``, ``quantity``, ``point``), how (``method``), and the measured errors.

    ``point`` says where the gradients were taken: ``"given"`` (the parameters and inputs passed in) or
    ``"perturbed(seed=S)"`` (those plus seeded noise of each leaf's own scale; see :mod:`jaxcnn.gradcheck`).
    """

    scope: str  # "layer" (one layer's backward), "model" (gradient of the loss) or "op" (check_op)
    layer: str  # the layer's path in the model, or the op's name
    quantity: str  # "input", a parameter name such as "kernel", "loss", or "arg i" for an op
    method: str  # e.g. "hand vs autodiff", "engine vs autodiff", "manual vs autodiff", "hand vs finite diff"
    max_abs: float
    max_rel: float
    cosine: float | None
    worst_index: tuple[int, ...] | None
    tolerance: float
    ok: bool
    point: str = GIVEN
    note: str = ""  # "zero gradient": a passing finite-difference row where neither side resolves any change


HEADERS = ("scope", "layer", "quantity", "point", "check", "max abs err", "max rel err", "cosine", "worst index", "ok")
# column widths for rows printed one at a time, before the widest entry is known (wider entries just push on)
STREAM_WIDTHS = (5, 12, 8, 17, 21, 11, 11, 14, 14, 4)


def _cells(check: Check) -> tuple[str, ...]:
    return (
        check.scope,
        check.layer,
        check.quantity,
        check.point,
        check.method,
        f"{check.max_abs:.2e}",
        f"{check.max_rel:.2e}",
        "" if check.cosine is None else f"{check.cosine:.12f}",
        "" if check.worst_index is None else str(check.worst_index),
        check.note or ("ok" if check.ok else "FAIL"),
    )


def _line(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def header_lines(widths: tuple[int, ...] = STREAM_WIDTHS) -> str:
    """The table's header and rule, for rows printed one at a time with :func:`format_row`."""
    return _line(HEADERS, widths) + "\n" + "  ".join("-" * width for width in widths)


def format_row(check: Check, widths: tuple[int, ...] = STREAM_WIDTHS) -> str:
    """One table row (fixed column widths by default, to line up under :func:`header_lines`)."""
    return _line(_cells(check), widths)


@dataclass
class Report:
    """All checks of one :func:`check_model` or :func:`check_op` call.

    Attributes:
      checks: every comparison made.
      dtype: the dtype gradients were computed in.
      points: the points checked, in order (``"given"``, then ``"perturbed(seed=S)"`` ...).
      ok: True when every check passed.
    """

    checks: list[Check] = field(default_factory=list)
    dtype: str = "float64"
    points: list[str] = field(default_factory=lambda: [GIVEN])

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def failures(self) -> list[Check]:
        """The checks that did not pass."""
        return [check for check in self.checks if not check.ok]

    def summary(self) -> str:
        """One line: how many checks, in which dtype, and the verdict."""
        verdict = "all checks passed" if self.ok else f"{len(self.failures())} of {len(self.checks)} checks FAILED"
        zero = sum(check.note == "zero gradient" for check in self.checks)
        zero_note = f" ({zero} on a zero gradient)" if zero else ""
        return f"{len(self.checks)} checks in {self.dtype}: {verdict}{zero_note}"

    def table(self, *, failures_only: bool = False) -> str:
        """A plain-text table, one row per check (only the failed ones with ``failures_only``), and the summary."""
        rows = [_cells(check) for check in (self.failures() if failures_only else self.checks)]
        widths = tuple(max(len(str(row[i])) for row in (HEADERS, *rows)) for i in range(len(HEADERS)))
        lines = [header_lines(widths), *(_line(row, widths) for row in rows), self.summary()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
