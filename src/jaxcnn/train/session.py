"""The workdir side of a run: the writer's lock, resuming a checkpoint (after checking that it fits the run's
model and data), the files written after each epoch, and stopping on a signal at a point every process agrees on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcnn import _signals
from jaxcnn.train.checkpoint import Checkpointer, step_number
from jaxcnn.train.config import Config
from jaxcnn.train.run import Run, check_signature
from jaxcnn.train.state import TrainState
from jaxcnn.train.workdir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    WorkdirBusyError,
    WorkdirLock,
    append_line,
    metrics_text,
    read_config,
    read_metrics,
    write_atomically,
)


class Session:
    """The workdir side of a run (nothing at all when it trains in memory): the writer's lock, the
    checkpointer, resuming, and the files written after each epoch."""

    def __init__(self, directory: Path | None, config: Config, primary: bool, say: Callable[[str], None]):
        self.directory, self.config, self.primary, self.say = directory, config, primary, say
        self.checkpointer: Checkpointer | None = None
        self.lock: WorkdirLock | None = None
        self.position: dict[str, Any] | None = None  # where the resumed checkpoint left the data stream
        self.extra_meta: dict[str, Any] = {}  # saved with every checkpoint (a streamed run's manifest)

    def open(
        self, run: Run, state: TrainState, check: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[TrainState, list[dict[str, Any]], int]:
        """Lock the workdir and resume it: ``(state, history, first_epoch)``; ``check(meta)`` may refuse the
        checkpoint before anything is written. A mid-epoch checkpoint leaves :attr:`position` (its epoch is
        ``first_epoch``, its ``"batch"`` the batches of it already taken)."""
        directory, config = self.directory, self.config
        if directory is None:
            return state, [], 1
        self.lock = lock_workdir(directory, self.primary)  # held to the end: a second writer is refused from here
        resuming = check_workdir(directory, config)  # again: another run may have written it meanwhile
        best = "test_loss" if config.early_stopping is not None else None  # an early-stopped run keeps its best
        # a single process writes each checkpoint in the background while the next epoch trains (bench --loop:
        # the synchronous write took 40-90 ms of a 100-150 ms digits epoch); every read waits for it first
        background = jax.process_count() == 1
        self.checkpointer = checkpointer = Checkpointer(
            directory / CHECKPOINT_DIR, keep=config.keep, best=best, background=background
        )
        self.say(f"workdir: {directory}")
        history: list[dict[str, Any]] = []
        first_epoch = 1
        if checkpointer.latest_step() is not None:
            meta = checkpointer.read_meta(checkpointer.latest_step())
            check_meta(meta, run, checkpointer)
            if check is not None:
                check(meta)
            state, meta = checkpointer.restore(state)
            first_epoch = int(meta["epoch"]) + 1
            history = [r for r in read_metrics(directory) if r["epoch"] <= meta["epoch"]]
            self.position = meta.get("position")
            if self.position is not None and self.position["batch"] < run.steps_per_epoch:
                where = f"epoch {self.position['epoch']}, batch {self.position['batch']} of {run.steps_per_epoch}"
            else:
                where = f"epoch {meta['epoch']}"
            self.say(f"resuming {directory} from {where} (step {step_number(state)})")
        stop_if_interrupted(f"while starting, before any step; {self.kept()}", collective=True)
        barrier("jaxcnn-fit-start")  # every process has read the workdir before the first one writes to it
        if self.primary:
            write_atomically(directory / METRICS_FILE, metrics_text(history))
        if not resuming and self.primary:
            write_atomically(directory / CONFIG_FILE, config.to_json())
        # a resumed run's new config replaces the saved one only once its first epoch has gone well: a resume
        # that fails (bad flags, divergence) leaves the run's config as it was
        return state, history, first_epoch

    def kept(self) -> str:
        """What an interrupted run leaves: its last checkpoint, or nothing."""
        return kept(self.checkpointer)

    def save(
        self,
        run: Run,
        state: TrainState,
        record: dict[str, Any],
        history: list,
        first: bool,
        position: dict[str, Any] | None = None,
    ) -> None:
        """The epoch's metrics line, the config (after a run's first good epoch) and the checkpoint (with the
        data stream's ``position`` when it has one to keep)."""
        if self.directory is None:
            return
        if self.primary:
            append_line(self.directory / METRICS_FILE, json.dumps(record) + "\n", metrics_text(history))
            if first:  # the first good epoch of this invocation: its config becomes the run's
                write_atomically(self.directory / CONFIG_FILE, self.config.to_json())
        meta = dict(run.meta(record["epoch"]), **self.extra_meta, **_ledger(run, state))
        if position is not None:
            meta["position"] = position
        # every process takes part; orbax writes it once
        self.checkpointer.save(state, meta, metrics={"test_loss": record["test_loss"]})

    def save_step(self, run: Run, state: TrainState, epoch: int, position: dict[str, Any]) -> None:
        """A mid-epoch checkpoint: the state after batch ``position["batch"]`` of ``epoch``, with the stream's
        position and the epoch's metrics so far (``position["metrics"]``), so that a resume continues exactly."""
        if self.directory is None:
            return
        meta = dict(run.meta(epoch - 1), **self.extra_meta, **_ledger(run, state), position=position)
        self.checkpointer.save(state, meta)

    def finish(self) -> None:
        """Wait for the last checkpoint's background write; CheckpointError if it failed."""
        if self.checkpointer is not None:
            self.checkpointer.finish()

    def close(self) -> None:
        """Release the checkpointer and the lock; a failed background write is raised by :meth:`finish` (an
        error already on its way out of the run is not replaced by it)."""
        if self.checkpointer is not None:
            self.checkpointer.close(check=False)
        if self.lock is not None:
            self.lock.release()


def _ledger(run: Run, state: TrainState) -> dict[str, Any]:
    """A DP run's privacy ledger after the state's steps, for its checkpoint's JSON (``{}`` without DP)."""
    return {} if run.privacy is None else {"privacy": run.privacy.ledger(step_number(state)).to_json()}


def lock_workdir(directory: Path, primary: bool) -> WorkdirLock | None:
    """Create ``directory`` and take its writer's lock (the first process alone; the others learn whether it
    got it). Raises WorkdirBusyError in every process when another run holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    lock, failure = None, None
    if primary:
        lock = WorkdirLock(directory)
        try:
            lock.acquire()
        except Exception as error:
            lock, failure = None, error
    if jax.process_count() > 1:  # the others must not wait at the start barrier for a process that gave up
        from jax.experimental import multihost_utils

        code = 0 if failure is None else -1 if not isinstance(failure, WorkdirBusyError) else failure.pid or -1
        code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
        if not primary and code > 0:
            raise WorkdirBusyError(f"workdir {directory} is in use: process {code} is training into it", code)
        if not primary and code < 0:
            raise ValueError(f"the first process could not lock workdir {directory} (see its error)")
    if failure is not None:
        raise failure
    return lock


def kept(checkpointer: Checkpointer | None) -> str:
    """What an interrupted run leaves: its last checkpoint, or nothing."""
    latest = checkpointer.latest_step() if checkpointer is not None else None
    if latest is None:
        return "no checkpoint was written"
    return f"the last checkpoint (step {latest}) is kept; run the same command to resume"


def stop_if_interrupted(where: str | Callable[[], str], *, collective: bool) -> None:
    """Raise :class:`jaxcnn._signals.Interrupted` once SIGINT or SIGTERM has arrived (inside
    ``_signals.stop_on_signals``). In a multi-process run the processes agree (a signal to any one stops all,
    at the same point), so only the ``collective`` calls, which every process reaches together, look."""
    signum = _signals.received()
    if jax.process_count() > 1:
        if not collective:
            return
        from jax.experimental import multihost_utils

        signum = int(np.max(multihost_utils.process_allgather(np.int32(signum or 0)))) or None
    if signum is not None:
        raise _signals.Interrupted(signum, where() if callable(where) else where)


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_workdir(directory: Path, config: Config) -> bool:
    """Whether ``directory`` holds a run to resume; raises ValueError if ``config`` cannot resume it."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"workdir {directory} exists and is not a directory")
    if (directory / CONFIG_FILE).exists():
        saved = read_config(directory)
        conflicts = config.resume_conflicts(saved)
        if conflicts:
            raise ValueError(
                f"workdir {directory} holds a run this config cannot resume ({'; '.join(conflicts)}); use a new workdir"
            )
        return True
    if (directory / CHECKPOINT_DIR).is_dir() and any((directory / CHECKPOINT_DIR).iterdir()):
        raise ValueError(f"workdir {directory} has checkpoints but no {CONFIG_FILE}; use a new workdir")
    return False


def check_meta(meta: dict[str, Any], run: Run, checkpointer: Checkpointer) -> None:
    where = checkpointer.path(int(meta["step"]))
    if meta.get("input_shape") != list(run.input_shape) or meta.get("num_classes") != run.data.num_classes:
        raise ValueError(
            f"checkpoint {where} was trained on images {tuple(meta.get('input_shape', ()))} with "
            f"{meta.get('num_classes')} classes, but the data now has {run.input_shape} and {run.data.num_classes}"
        )
    if "data_sha256" in meta and not run.matches_data(meta["data_sha256"]):
        raise ValueError(
            f"the {run.config.dataset} data differ from those checkpoint {where} was trained on (other files, or "
            "normalisation switched); resume with the same data, or use a new workdir"
        )
    check_signature(meta.get("params"), run.model, run.input_shape, f"checkpoint {where}")
    from jaxcnn.train.dp_run import check_ledger

    check_ledger(meta.get("privacy"), run.privacy, int(meta["step"]), str(where))
