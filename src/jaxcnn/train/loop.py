"""The training loop: ``fit(config, workdir)`` trains, evaluates, checkpoints and resumes (``restore`` and
``load_model`` in :mod:`jaxcnn.train.restored` read a run back).

A workdir holds ``config.json`` (the run's :class:`Config`), ``metrics.jsonl`` (one JSON object per epoch) and
``checkpoints/<step>/`` (orbax, the last ``config.keep``; with early stopping also the best by test loss). Every
epoch ends in this order: evaluate, check that the state is finite, append the metrics line, write the checkpoint.
A resumed run truncates ``metrics.jsonl`` to the checkpoint it restores, so the file always describes the run
the checkpoints continue.

Resuming is exact: the data order of epoch ``e`` and the key of step ``s`` are functions of the seed and of
``e`` and ``s`` alone, and the checkpoint holds the whole state, so a run stopped after any epoch (or killed
at any moment) and resumed ends with the same bits as one that never stopped, on the same machine.
"""

from __future__ import annotations

import importlib
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxcnn import data as data_lib
from jaxcnn import distributed
from jaxcnn.nn.layer import Layer
from jaxcnn.train import feed
from jaxcnn.train.checkpoint import all_finite, step_number
from jaxcnn.train.config import Config
from jaxcnn.train.progress import (
    CHECK_EVERY,
    LossWatch,
    ProgressBar,
    diverged,
    early_stopping_epoch,
    json_number,
    mean_or_none,
    summary,
)
from jaxcnn.train.run import Run
from jaxcnn.train.session import Session, check_workdir, stop_if_interrupted
from jaxcnn.train.state import TrainState
from jaxcnn.train.step import layer_order
from jaxcnn.train.workdir import WorkdirLock

METRIC_FIELDS = (
    "epoch",
    "step",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "learning_rate",
    "seconds",
)


def fit(
    config: Config,
    workdir: str | os.PathLike | None = None,
    *,
    model: Layer | None = None,
    data: data_lib.Dataset | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = False,
    devices: int | None = None,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train a model on ``config.dataset`` (or ``data``) for ``config.epochs`` epochs, resuming ``workdir`` if it
    has a checkpoint.

    The model is ``model`` when given (any :class:`jaxcnn.nn.Layer`: your own ``nn.Sequential``, say), else the
    one ``config.model`` names (a registered name or ``"package.module:factory"``). Every checkpoint records the
    model's parameter structure: resuming with a model of another structure is refused, naming the first
    difference. Read a run trained with a model object back with ``restore(workdir, model=model)``.

    Each epoch shuffles the training set with the epoch's key, runs every batch (the last partial one too)
    through the jit-compiled step, evaluates on the test set, appends a line to ``metrics.jsonl`` and writes a
    checkpoint. Asking a finished run for more epochs extends it; asking for fewer returns it as it is.

    Data parallelism: with ``devices=N`` every step runs over a mesh of N devices (:mod:`jaxcnn.distributed`),
    each batch sharded across them and the state replicated; the result is the single-device run's up to the
    order of float additions. In a run over several processes (after :func:`jaxcnn.distributed.initialize`) every
    process calls ``fit`` with the same arguments: each feeds only its own rows of every batch, the first
    process alone writes ``config.json``, ``metrics.jsonl`` and the log, and each checkpoint is written once.

    Args:
      config: the run's :class:`Config`.
      workdir: where ``config.json``, ``metrics.jsonl`` and the checkpoints go; None trains in memory only.
      model: the model to train, instead of the one ``config.model`` names (``config.dropout`` still applies).
      data: a :class:`jaxcnn.data.Dataset` to use instead of loading ``config.dataset``.
      log: called with each summary line (None for silence).
      progress: show a progress bar per epoch (on stderr).
      devices: the number of devices in all to shard each batch over; None uses the default device alone (or,
        in a multi-process run, every device of every process).

    Returns:
      ``(state, history)``: the final :class:`TrainState` and one dict per epoch with the fields of
      ``metrics.jsonl`` (``epoch, step, train_loss, train_accuracy, test_loss, test_accuracy, learning_rate,
      seconds``). For an ensemble (``config.ensemble > 1``) every leaf of the state has a leading member axis;
      the test fields are the ensemble's (mean probabilities), the train fields the members' mean, and
      ``members`` lists each member's four loss and accuracy fields.

    Raises:
      ValueError: an invalid config, bad data, a workdir holding another model or data set, a corrupt checkpoint.
      NonFiniteError: the loss or the state turned NaN or Inf (nothing non-finite is checkpointed).
    """
    if not isinstance(config, Config):
        raise ValueError(f"fit expects a jaxcnn.train.Config, got {type(config).__name__}")
    with jax.enable_x64(False):  # the same bits whether or not the caller turned 64-bit types on
        mesh = None
        if devices is not None or jax.process_count() > 1:
            if config.ensemble > 1:
                raise ValueError("an ensemble trains on one device: --ensemble cannot be combined with --devices")
            if config.dp_clip is not None:
                raise ValueError("DP-SGD trains on one device: --dp-clip cannot be combined with --devices")
            mesh = distributed.data_mesh(devices)
        return _fit(config, Path(workdir) if workdir is not None else None, model, data, log, progress, mesh)


def _fit(
    config: Config,
    directory: Path | None,
    model: Layer | None,
    data: data_lib.Dataset | None,
    log: Callable[[str], None] | None,
    progress: bool,
    mesh: Any,
) -> tuple[TrainState, list[dict[str, Any]]]:
    primary = jax.process_index() == 0  # the process that writes the workdir's files and the log
    say = log if log is not None and primary else (lambda line: None)
    if directory is not None and directory.is_dir() and jax.process_count() == 1:
        WorkdirLock(directory).acquire_and_release()  # another run writing it: say so before anything else
    if directory is not None:
        check_workdir(directory, config)
    run = Run(config, data, model, log=say)
    for warning in run.warnings if primary else ():
        warnings.warn(warning, stacklevel=3)
    state = run.initial_state()
    stop_if_interrupted("while starting, before any step; nothing was written", collective=True)
    session = Session(directory, config, primary, say)
    if run.privacy is not None:
        say(run.privacy.describe())
    driver = feed.Ensemble(run) if config.ensemble > 1 else feed.Stream(run, mesh, say) if run.streamed else None
    poisson = run.privacy is not None and run.privacy.sampling == "poisson"
    driver = driver or (feed.Poisson(run) if poisson else feed.Replicas(run, mesh))
    try:
        check = None
        if isinstance(driver, feed.Stream):
            session.extra_meta["stream"] = driver.manifest()
            check = lambda meta: feed.check_manifest(meta.get("stream"), driver.manifest(), "its checkpoint")  # noqa: E731
        state, history, first_epoch = session.open(run, state, check)
        if isinstance(driver, feed.Stream):
            driver.open(session.position)
        state = _train(run, driver, state, history, first_epoch, session, progress and primary)
        session.finish()  # the last checkpoint is on disk (or its failure raised) before fit returns
    finally:
        driver.close()
        session.close()
    return state, history


def _train(
    run: Run,
    driver: feed.Replicas,
    state: TrainState,
    history: list[dict[str, Any]],
    first_epoch: int,
    session: Session,
    progress: bool,
) -> TrainState:
    config, say = run.config, session.say
    state = driver.place(state)
    bar = ProgressBar(progress)
    stopped = early_stopping_epoch([r.get("test_loss") for r in history], config.early_stopping)
    if stopped is not None and first_epoch <= config.epochs:
        say(f"early stopping: the run already stopped at epoch {stopped}; nothing more to train")
        return state
    try:
        resume = session.position if session.position and session.position["epoch"] == first_epoch else None
        for epoch in range(first_epoch, config.epochs + 1):
            started = time.perf_counter()
            state, train = _train_epoch(
                run, driver, state, epoch, bar, session, resume if epoch == first_epoch else None
            )
            if not all_finite((state.params, state.model_state, state.opt_state)):
                what = f"the parameters or optimizer state turned non-finite in epoch {epoch}"
                diverged(what, epoch, step_number(state), session.checkpointer)
            record = _record(run, epoch, step_number(state), train, driver.evaluate(state), started)
            if isinstance(driver, feed.Stream) and config.skip_bad_files:
                record["bad_files_skipped"] = {"index": len(run.data.bad_files), **driver.take_skipped()}
            history.append(record)
            position = driver.position if isinstance(driver, feed.Stream) else None
            session.save(run, state, record, history, first=epoch == first_epoch, position=position)
            say(summary(record, config.epochs))
            if _stops_early(history, config.early_stopping, epoch, session):
                break
            stop_if_interrupted(lambda epoch=epoch: f"after epoch {epoch}; {session.kept()}", collective=True)
    finally:
        bar.stop()
    return state


def _train_epoch(
    run: Run,
    driver: feed.Replicas,
    state: TrainState,
    epoch: int,
    bar: ProgressBar,
    session: Session,
    resume: dict[str, Any] | None,
) -> tuple[TrainState, dict[str, Any]]:
    """One epoch's steps, from batch ``resume["batch"]`` of a mid-epoch checkpoint (with its metrics so far):
    ``(state, train metrics)``, the loss read back every :data:`CHECK_EVERY` steps, a checkpoint every
    ``config.checkpoint_every`` steps."""
    losses = LossWatch(epoch, step_number(state), session.checkpointer)
    start = resume["batch"] if resume is not None else 0
    if resume is not None and "metrics" in resume:
        losses.resume(resume["metrics"])
    every = run.config.checkpoint_every if session.directory is not None else None
    bar.start(epoch, run.config.epochs, run.steps_per_epoch)
    for batch in driver.batches(epoch, start):  # (x, y), or (x, y, mask) for a DP run's Poisson batches
        state, metrics = driver.train_step(state, *batch)  # the first call compiles
        losses.add(metrics)
        if every is not None and (losses.step + losses.pending) % every == 0:
            if driver.position["batch"] < run.steps_per_epoch:  # the epoch's end has its own checkpoint
                _save_step(run, driver, state, epoch, losses, session)
        read = losses.pending >= CHECK_EVERY
        if read:
            bar.update(losses.check(keep=1))  # not the step just dispatched: no stall of the device's queue
        else:
            bar.advance()
        stop_if_interrupted(  # with the peers (a multi-process run) where the losses were just read
            lambda losses=losses: f"at epoch {epoch}, step {losses.step + losses.pending}; {session.kept()}",
            collective=read or losses.pending == 0,
        )
    train = losses.finish()
    bar.stop()
    stop_if_interrupted(
        lambda: f"at epoch {epoch}, step {losses.step}; {session.kept()}", collective=True
    )  # a signal from here on lets the epoch finish: it is evaluated and checkpointed, then the run stops
    return state, train


def _save_step(
    run: Run, driver: feed.Replicas, state: TrainState, epoch: int, losses: LossWatch, session: Session
) -> None:
    """A mid-epoch checkpoint (``--checkpoint-every``), once the losses so far and the state are known finite."""
    snapshot = losses.snapshot()  # reads the losses back: a non-finite one stops the run before the save
    if not all_finite((state.params, state.model_state, state.opt_state)):
        diverged(f"the parameters or optimizer state turned non-finite in epoch {epoch}", epoch, losses.step, None)
    session.save_step(run, state, epoch, dict(driver.position, metrics=snapshot))


def _record(
    run: Run, epoch: int, step: int, train: dict[str, Any], test: dict[str, Any], started: float
) -> dict[str, Any]:
    """The epoch's line of ``metrics.jsonl``."""
    record = {
        "epoch": epoch,
        "step": step,
        "train_loss": json_number(mean_or_none(train["loss"])),
        "train_accuracy": json_number(mean_or_none(train.get("accuracy"))),
        "test_loss": json_number(test["loss"]),
        "test_accuracy": json_number(test.get("accuracy")),
        "learning_rate": json_number(float(run.schedule(step - 1))),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if run.privacy is not None:  # the accountant's figure after the steps so far (privacy.PrivacyLedger)
        record.update(epsilon=json_number(run.privacy.ledger(step).epsilon()), delta=run.privacy.delta)
    order = layer_order(run.model)
    for kind in ("grad_norms", "update_ratios"):
        if kind in train:
            values = train[kind]
            names = [n for n in order if n in values] + sorted(set(values) - set(order))
            record[kind] = {name: json_number(values[name]) for name in names}
    if "members" in test:
        record["members"] = [
            {
                "train_loss": json_number(float(train["loss"][k])),
                "train_accuracy": json_number(float(train["accuracy"][k]) if "accuracy" in train else None),
                "test_loss": json_number(member["loss"]),
                "test_accuracy": json_number(member["accuracy"]),
            }
            for k, member in enumerate(test["members"])
        ]
    return record


def _stops_early(history: list[dict[str, Any]], patience: int | None, epoch: int, session: Session) -> bool:
    """Whether early stopping ends the run after ``epoch`` (and if so, say why)."""
    if early_stopping_epoch([r.get("test_loss") for r in history], patience) is None:
        return False
    best = min(history, key=lambda r: math.inf if r.get("test_loss") is None else r["test_loss"])
    session.say(
        f"early stopping at epoch {epoch}: the test loss has not improved for {patience} "
        f"epochs (best {best['test_loss']:.4f} at epoch {best['epoch']}"
        + ("; its checkpoint is kept, and eval and predict read it" if session.directory is not None else "")
        + ")"
    )
    return True


# -- names that moved, still importable from here -------------------------------------------------------------

_MOVED = {
    **dict.fromkeys(("restore", "restore_run", "evaluate_workdir", "load_model"), "jaxcnn.train.restored"),
    **dict.fromkeys(("NonFiniteError", "CHECK_EVERY"), "jaxcnn.train.progress"),
    **dict.fromkeys(
        ("CHECKPOINT_DIR", "CONFIG_FILE", "LOCK_FILE", "METRICS_FILE", "WorkdirBusyError", "append_line"),
        "jaxcnn.train.workdir",
    ),
    **dict.fromkeys(("metrics_text", "read_config", "read_metrics", "write_atomically"), "jaxcnn.train.workdir"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
