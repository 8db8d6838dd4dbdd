"""What a run reports while it trains: the loss watch (a non-finite loss stops the run at its step), the epoch
summary line, early stopping's rule, and the progress bar."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jaxcnn.train.checkpoint import Checkpointer

CHECK_EVERY = 10  # steps between host reads of the (on-device) losses: the non-finite check and the progress bar


class NonFiniteError(ArithmeticError):
    """The loss (or the state) turned NaN or Inf; ``epoch`` and ``step`` say where (``jaxcnn train`` exits 3)."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


def json_number(value: float | None) -> float | None:
    """``value`` as a float for ``metrics.jsonl``; None for None, NaN and Inf (JSON has no such numbers)."""
    return None if value is None or not math.isfinite(value) else float(value)


def early_stopping_epoch(losses: list[float | None], patience: int | None) -> int | None:
    """The epoch (1-based) at which early stopping ends a run whose per-epoch monitored losses are ``losses``:
    the first epoch that comes ``patience`` epochs after the last improvement of the best loss so far, or None
    if no epoch of ``losses`` does (and always None when ``patience`` is None). A None or NaN loss is never an
    improvement.
    """
    if patience is None:
        return None
    best, best_epoch = math.inf, 0
    for epoch, loss in enumerate(losses, start=1):
        if _loss_or_inf(loss) < best:
            best, best_epoch = _loss_or_inf(loss), epoch
        if epoch - best_epoch >= patience:
            return epoch
    return None


def _loss_or_inf(loss: float | None) -> float:
    return math.inf if loss is None or not math.isfinite(loss) else float(loss)


def mean_or_none(value: Any) -> float | None:
    """The mean of ``value`` (a scalar, or one per ensemble member) as a float; None stays None."""
    return None if value is None else float(np.mean(value))


def summary(record: dict[str, Any], epochs: int) -> str:
    def number(name: str, digits: int = 4) -> str:
        value = record.get(name)
        return "n/a" if value is None else f"{value:.{digits}f}"

    members = ""
    if "members" in record:
        accuracies = ["n/a" if m["test_accuracy"] is None else f"{m['test_accuracy']:.4f}" for m in record["members"]]
        members = f" (ensemble; members {' '.join(accuracies)})"
    private = f"  epsilon {epsilon_text(record)} (delta {record['delta']:g})" if "epsilon" in record else ""
    return (
        f"epoch {record['epoch']}/{epochs}  step {record['step']}  train loss {number('train_loss')} "
        f"acc {number('train_accuracy')}  test loss {number('test_loss')} acc {number('test_accuracy')}{members}  "
        f"lr {record['learning_rate']:.3g}{private}  {record['seconds']:.1f}s"
    )


def epsilon_text(record: dict[str, Any]) -> str:
    """A DP run's epsilon as the log shows it (4 significant digits; ``metrics.jsonl``'s None is ``inf``)."""
    return "inf" if record["epsilon"] is None else f"{record['epsilon']:.4g}"


class LossWatch:
    """Collects an epoch's on-device step metrics; reads them back every few steps to catch a non-finite loss
    at the step it happens, and averages them (weighted by batch size) at the end of the epoch."""

    def __init__(self, epoch: int, step: int, checkpointer: Checkpointer | None):
        self.epoch = epoch
        self.step = step  # the global step count before the next unchecked metric
        self.checkpointer = checkpointer
        self._pending: list[dict[str, jax.Array]] = []
        self.totals = {"loss": 0.0, "accuracy": 0.0, "count": 0}
        self.has_accuracy = False
        self.layers: dict[str, dict[str, float]] = {}  # per-layer sums over steps (--log-grad-norms)
        self.steps = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self._pending.append(metrics)

    def check(self, keep: int = 0) -> float | None:
        """Read the pending metrics back, all but the newest ``keep``; raise NonFiniteError at the first
        non-finite loss. Returns the last loss read.

        ``keep=1`` (the loop's periodic reads) leaves the step just dispatched alone, so the read waits only for
        the one before it while that step runs: the host never stalls the device's queue.
        """
        cut = len(self._pending) - keep if keep else len(self._pending)
        values = jax.device_get(self._pending[:cut])
        self._pending = self._pending[cut:]
        last = None
        for metrics in values:
            self.step += 1
            loss = np.asarray(metrics["loss"], np.float64)  # a scalar, or one per ensemble member
            if not np.all(np.isfinite(loss)):
                bad = float(loss.reshape(-1)[~np.isfinite(loss.reshape(-1))][0])
                self.fail(f"the loss is {bad} at epoch {self.epoch}, step {self.step}", self.step)
            count = int(np.asarray(metrics["count"]).reshape(-1)[0])
            self.totals["loss"] = self.totals["loss"] + loss * count
            self.totals["count"] += count
            if "accuracy" in metrics:
                self.has_accuracy = True
                accuracy = np.asarray(metrics["accuracy"], np.float64)
                self.totals["accuracy"] = self.totals["accuracy"] + accuracy * count
            last = float(np.mean(loss))
            self.steps += 1
            for kind in ("grad_norms", "update_ratios"):
                for name, value in metrics.get(kind, {}).items():
                    sums = self.layers.setdefault(kind, {})
                    sums[name] = sums.get(name, 0.0) + float(np.mean(value))  # an ensemble: the members' mean
        return last

    def snapshot(self) -> dict[str, Any]:
        """The epoch's sums so far, JSON-able (after :meth:`check`): a mid-epoch checkpoint keeps them, so that
        the resumed epoch's metrics line is the uninterrupted one's. One model only (scalar losses)."""
        self.check()
        totals = {name: float(value) if name != "count" else int(value) for name, value in self.totals.items()}
        return {"totals": totals, "has_accuracy": self.has_accuracy, "layers": self.layers, "steps": self.steps}

    def resume(self, snapshot: dict[str, Any]) -> None:
        """Continue from a :meth:`snapshot`."""
        self.totals = dict(snapshot["totals"])
        self.has_accuracy = bool(snapshot["has_accuracy"])
        self.layers = {kind: dict(sums) for kind, sums in snapshot["layers"].items()}
        self.steps = int(snapshot["steps"])

    def finish(self) -> dict[str, Any]:
        """The epoch's mean loss (and accuracy): floats, or arrays of one per ensemble member."""
        self.check()
        count = max(self.totals["count"], 1)
        result = {"loss": self.totals["loss"] / count}
        if self.has_accuracy:
            result["accuracy"] = self.totals["accuracy"] / count
        for kind, sums in self.layers.items():
            result[kind] = {name: total / max(self.steps, 1) for name, total in sums.items()}
        return result

    def fail(self, what: str, step: int) -> None:
        diverged(what, self.epoch, step, self.checkpointer)


def diverged(what: str, epoch: int, step: int, checkpointer: Checkpointer | None) -> None:
    """Raise :class:`NonFiniteError`: ``what`` went non-finite, and which checkpoint is kept."""
    kept = "no checkpoint was written"
    if checkpointer is not None and checkpointer.latest_step() is not None:
        kept = f"the last good checkpoint (step {checkpointer.latest_step()}) is kept"
    raise NonFiniteError(f"training diverged: {what}; stopped, {kept}", epoch, step)


class ProgressBar:
    """A rich progress bar per epoch on stderr (drawn only on a terminal), or nothing."""

    def __init__(self, enabled: bool):
        if enabled:
            from rich.console import Console

            enabled = Console(stderr=True).is_terminal  # a log file gets the summary lines only
        self.enabled = enabled
        self._progress = None
        self._task = None

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, loss="...")

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def update(self, loss: float | None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss="..." if loss is None else f"{loss:.4f}")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
