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

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcnn import _signals, models, parallel
from jaxcnn import data as data_lib
from jaxcnn.train import limits
from jaxcnn.train.checkpoint import Checkpointer, all_finite, step_number
from jaxcnn.train.config import Config, make_optimizer
from jaxcnn.train.preprocess import Preprocess
from jaxcnn.train.state import TrainState, create_train_state, data_key
from jaxcnn.train.step import evaluate, layer_order, make_eval_step, make_train_step
from jaxcnn.train.workdir import (  # noqa: F401  (the workdir's names, importable from here as before)
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    WorkdirBusyError,
    WorkdirLock,
    append_line,
    metrics_text,
    read_config,
    read_metrics,
    write_atomically,
)

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
CHECK_EVERY = 10  # steps between host reads of the (on-device) losses: the non-finite check and the progress bar


class NonFiniteError(ArithmeticError):
    """The loss (or the state) turned NaN or Inf; ``epoch`` and ``step`` say where (``jaxcnn train`` exits 3)."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# -- building a run --------------------------------------------------------------------------------------------


def load_data(config: Config) -> data_lib.Dataset:
    """The data set ``config`` names (synthetic data is seeded by ``config.seed``)."""
    return data_lib.load(
        config.dataset,
        data_dir=config.data_dir,
        data_path=config.data_path,
        normalize=config.normalize,
        seed=config.seed,
    )


def build_model(config: Config, input_shape: tuple[int, ...], num_classes: int):
    """The model ``config`` names, with ``num_classes`` outputs, checked against ``input_shape``."""
    model = models.get(config.model, num_classes=num_classes)
    if config.dropout > 0:
        from jaxcnn import nn

        if not isinstance(model, nn.Sequential):
            raise ValueError(f"dropout goes before the last layer of a Sequential model; {config.model} is not one")
        model = nn.Sequential([*model.layers[:-1], nn.Dropout(config.dropout), model.layers[-1]])
    try:
        model.output_shape(tuple(input_shape))
    except ValueError as error:
        raise ValueError(
            f"model {config.model} cannot take {config.dataset} images of shape {tuple(input_shape)}: {error}"
        ) from None
    return model


def _check_labels(dataset: data_lib.Dataset, num_outputs: int) -> None:
    """Both splits' labels: integers in ``[0, num_outputs)`` (the jitted steps cannot check them)."""
    for split, labels in (("train", dataset.y_train), ("test", dataset.y_test)):
        data_lib.check_labels(labels, num_outputs, what=f"{split} labels")


class Run:
    """A run's parts, built from its config: data, model, optimizer, schedule and the initial state."""

    def __init__(self, config: Config, dataset: data_lib.Dataset | None = None):
        self.config = config
        self.data = dataset if dataset is not None else load_data(config)
        self.input_shape = tuple(self.data.input_shape)
        self.model = build_model(config, self.input_shape, self.data.num_classes)
        _check_labels(self.data, self.model.output_shape(self.input_shape)[-1])
        self.warnings = limits.check_augmentation(config, self.input_shape)  # refuses, or warnings for fit
        self.steps_per_epoch = data_lib.num_batches(len(self.data.y_train), config.batch_size)
        if config.epochs * self.steps_per_epoch >= 2**31:
            raise ValueError(
                f"epochs ({config.epochs}) x steps per epoch ({self.steps_per_epoch}) exceeds the int32 step counter"
            )
        self.optimizer, self.schedule = make_optimizer(config, self.steps_per_epoch)
        limits.check_state_memory(config, self.initial_state, self.data.num_classes)  # before allocating it
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """A SHA-256 of the (normalised) train and test arrays: a resumed run must see the same data."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for array in (self.data.x_train, self.data.y_train, self.data.x_test, self.data.y_test):
                array = np.ascontiguousarray(array)
                digest.update(f"{array.dtype.str}{array.shape}".encode())
                digest.update(memoryview(array).cast("B"))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def initial_state(self) -> TrainState:
        """The state at step 0: one model, or an ensemble's K members (seeds ``seed .. seed + K - 1``) stacked."""
        return initial_state(self.config, self.model, self.optimizer, self.input_shape)

    def meta(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "input_shape": list(self.input_shape),
            "num_classes": self.data.num_classes,
            "model": self.config.model,
            "dataset": self.config.dataset,
            "steps_per_epoch": self.steps_per_epoch,
            "data_sha256": self.fingerprint,
            "config": self.config.to_dict(),
            "preprocess": Preprocess.of_dataset(self.data).to_dict(),  # what predict and eval do to new images
        }


def initial_state(config: Config, model: Any, optimizer: Any, input_shape: tuple[int, ...]) -> TrainState:
    if config.ensemble > 1:
        seeds = [config.seed + k for k in range(config.ensemble)]
        return parallel.create_ensemble_state(model, optimizer, seeds, input_shape)
    return create_train_state(model, optimizer, jax.random.key(config.seed), input_shape)


# -- the loop --------------------------------------------------------------------------------------------------


def fit(
    config: Config,
    workdir: str | os.PathLike | None = None,
    *,
    data: data_lib.Dataset | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = False,
    devices: int | None = None,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train ``config.model`` on ``config.dataset`` for ``config.epochs`` epochs, resuming ``workdir`` if it has
    a checkpoint.

    Each epoch shuffles the training set with the epoch's key, runs every batch (the last partial one too)
    through the jit-compiled step, evaluates on the test set, appends a line to ``metrics.jsonl`` and writes a
    checkpoint. Asking a finished run for more epochs extends it; asking for fewer returns it as it is.

    Data parallelism: with ``devices=N`` every step runs over a mesh of N devices (:mod:`jaxcnn.parallel`),
    each batch sharded across them and the state replicated; the result is the single-device run's up to the
    order of float additions. In a run over several processes (after :func:`jaxcnn.parallel.initialize`) every
    process calls ``fit`` with the same arguments: each feeds only its own rows of every batch, the first
    process alone writes ``config.json``, ``metrics.jsonl`` and the log, and each checkpoint is written once.

    Args:
      config: the run's :class:`Config`.
      workdir: where ``config.json``, ``metrics.jsonl`` and the checkpoints go; None trains in memory only.
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
            mesh = parallel.data_mesh(devices)
        return _fit(config, Path(workdir) if workdir is not None else None, data, log, progress, mesh)


def _fit(
    config: Config,
    directory: Path | None,
    data: data_lib.Dataset | None,
    log: Callable[[str], None] | None,
    progress: bool,
    mesh: Any,
) -> tuple[TrainState, list[dict[str, Any]]]:
    primary = jax.process_index() == 0  # the process that writes the workdir's files and the log
    say = log if log is not None and primary else (lambda line: None)
    if directory is not None and directory.is_dir() and jax.process_count() == 1:
        WorkdirLock(directory).acquire_and_release()  # another run writing it: say so before anything else
    resuming = directory is not None and _check_workdir(directory, config)
    run = Run(config, data)
    for warning in run.warnings:
        if primary:
            warnings.warn(warning, stacklevel=3)
    state = run.initial_state()
    _stop_if_interrupted("while starting, before any step; nothing was written", collective=True)
    history: list[dict[str, Any]] = []
    checkpointer = None
    lock = None
    first_epoch = 1
    try:
        if directory is not None:
            lock = _lock_workdir(directory, primary)  # held to the end: a second writer is refused from here on
            resuming = _check_workdir(directory, config)  # again: another run may have written it meanwhile
            # an early-stopped run keeps its best checkpoint (lowest test loss) too
            best = "test_loss" if config.early_stopping is not None else None
            checkpointer = Checkpointer(directory / CHECKPOINT_DIR, keep=config.keep, best=best)
            say(f"workdir: {directory}")
            if checkpointer.latest_step() is not None:
                state, meta = checkpointer.restore(state)
                _check_meta(meta, run, checkpointer)
                first_epoch = int(meta["epoch"]) + 1
                history = [r for r in read_metrics(directory) if r["epoch"] <= meta["epoch"]]
                say(f"resuming {directory} from epoch {meta['epoch']} (step {step_number(state)})")
            _stop_if_interrupted(f"while starting, before any step; {_kept(checkpointer)}", collective=True)
            _barrier("jaxcnn-fit-start")  # every process has read the workdir before the first one writes to it
            if primary:
                write_atomically(directory / METRICS_FILE, metrics_text(history))
            if not resuming and primary:
                write_atomically(directory / CONFIG_FILE, config.to_json())
            # a resumed run's new config replaces the saved one only once its first epoch has gone well: a
            # resume that fails (bad flags, divergence) leaves the run's config as it was
        driver = _Ensemble(run) if config.ensemble > 1 else _Replicas(run, mesh)
        state = _train(run, driver, state, history, first_epoch, directory, checkpointer, say, progress and primary)
    finally:
        if checkpointer is not None:
            checkpointer.close()
        if lock is not None:
            lock.release()
    return state, history


def _lock_workdir(directory: Path, primary: bool) -> WorkdirLock | None:
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


def _kept(checkpointer: Checkpointer | None) -> str:
    """What an interrupted run leaves: its last checkpoint, or nothing."""
    latest = checkpointer.latest_step() if checkpointer is not None else None
    if latest is None:
        return "no checkpoint was written"
    return f"the last checkpoint (step {latest}) is kept; run the same command to resume"


def _stop_if_interrupted(where: str | Callable[[], str], *, collective: bool) -> None:
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


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _check_workdir(directory: Path, config: Config) -> bool:
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


def _check_meta(meta: dict[str, Any], run: Run, checkpointer: Checkpointer) -> None:
    where = checkpointer.path(int(meta["step"]))
    if meta.get("input_shape") != list(run.input_shape) or meta.get("num_classes") != run.data.num_classes:
        raise ValueError(
            f"checkpoint {where} was trained on images {tuple(meta.get('input_shape', ()))} with "
            f"{meta.get('num_classes')} classes, but the data now has {run.input_shape} and {run.data.num_classes}"
        )
    if meta.get("data_sha256", run.fingerprint) != run.fingerprint:
        raise ValueError(
            f"the {run.config.dataset} data differ from those checkpoint {where} was trained on (other files, or "
            "normalisation switched); resume with the same data, or use a new workdir"
        )


class _Replicas:
    """One model's steps, on the default device or (with a mesh) data-parallel over the mesh's devices."""

    def __init__(self, run: Run, mesh: Any):
        self.run, self.mesh = run, mesh
        self.train_step, self.eval_step = _compiled_steps(run, mesh)
        self.order_key: jax.Array | None = None

    def place(self, state: TrainState) -> TrainState:
        self.order_key = data_key(state.key)
        return state if self.mesh is None else parallel.replicate(state, self.mesh)

    def batches(self, epoch: int):
        x, y = self.run.data.train
        key = jax.random.fold_in(self.order_key, epoch)
        if self.mesh is None:
            return data_lib.batches(x, y, self.run.config.batch_size, key=key)
        return parallel.sharded_batches(x, y, self.run.config.batch_size, self.mesh, key=key)

    def evaluate(self, state: TrainState) -> dict[str, Any]:
        x, y = self.run.data.test
        return evaluate(self.run.model, state.params, state.model_state, x, y, eval_step=self.eval_step, mesh=self.mesh)


class _Ensemble:
    """K models in one vmapped step, member ``k`` fed the batches of the run with seed ``seed + k``."""

    def __init__(self, run: Run):
        self.run = run
        self.train_step, self.eval_step = _compiled_steps(run, None)
        self.order_keys: list[jax.Array] = []

    def place(self, state: TrainState) -> TrainState:
        self.order_keys = [data_key(state.key[k]) for k in range(state.key.shape[0])]
        return state

    def batches(self, epoch: int):
        x, y = self.run.data.train
        keys = [jax.random.fold_in(key, epoch) for key in self.order_keys]
        return parallel.ensemble_batches(x, y, self.run.config.batch_size, keys)

    def evaluate(self, state: TrainState) -> dict[str, Any]:
        x, y = self.run.data.test
        return parallel.evaluate_ensemble(
            self.run.model, state.params, state.model_state, x, y, eval_step=self.eval_step
        )


def _train(
    run: Run,
    driver: _Replicas | _Ensemble,
    state: TrainState,
    history: list[dict[str, Any]],
    first_epoch: int,
    directory: Path | None,
    checkpointer: Checkpointer | None,
    say: Callable[[str], None],
    progress: bool,
) -> TrainState:
    config = run.config
    state = driver.place(state)
    bar = _ProgressBar(progress)
    order = layer_order(run.model)
    stopped = early_stopping_epoch([r.get("test_loss") for r in history], config.early_stopping)
    if stopped is not None and first_epoch <= config.epochs:
        say(f"early stopping: the run already stopped at epoch {stopped}; nothing more to train")
        return state
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            started = time.perf_counter()
            losses = _LossWatch(epoch, step_number(state), checkpointer)
            bar.start(epoch, config.epochs, run.steps_per_epoch)
            for x, y in driver.batches(epoch):
                state, metrics = driver.train_step(state, x, y)  # the first call compiles
                losses.add(metrics)
                if losses.pending >= CHECK_EVERY:
                    bar.update(losses.check())
                else:
                    bar.advance()
                _stop_if_interrupted(
                    lambda epoch=epoch, losses=losses: (
                        f"at epoch {epoch}, step {losses.step + losses.pending}; {_kept(checkpointer)}"
                    ),
                    collective=losses.pending == 0,
                )
            train = losses.finish()
            bar.stop()
            _stop_if_interrupted(
                lambda epoch=epoch, losses=losses: f"at epoch {epoch}, step {losses.step}; {_kept(checkpointer)}",
                collective=True,
            )  # a signal from here on lets the epoch finish: it is evaluated and checkpointed, then the run stops
            if not all_finite((state.params, state.model_state, state.opt_state)):
                losses.fail(f"the parameters or optimizer state turned non-finite in epoch {epoch}", step_number(state))
            test = driver.evaluate(state)
            step = step_number(state)
            record = {
                "epoch": epoch,
                "step": step,
                "train_loss": _json_number(_mean(train["loss"])),
                "train_accuracy": _json_number(_mean(train.get("accuracy"))),
                "test_loss": _json_number(test["loss"]),
                "test_accuracy": _json_number(test.get("accuracy")),
                "learning_rate": _json_number(float(run.schedule(step - 1))),
                "seconds": round(time.perf_counter() - started, 3),
            }
            for kind in ("grad_norms", "update_ratios"):
                if kind in train:
                    values = train[kind]
                    names = [n for n in order if n in values] + sorted(set(values) - set(order))
                    record[kind] = {name: _json_number(values[name]) for name in names}
            if "members" in test:
                record["members"] = [
                    {
                        "train_loss": _json_number(float(train["loss"][k])),
                        "train_accuracy": _json_number(float(train["accuracy"][k]) if "accuracy" in train else None),
                        "test_loss": _json_number(member["loss"]),
                        "test_accuracy": _json_number(member["accuracy"]),
                    }
                    for k, member in enumerate(test["members"])
                ]
            history.append(record)
            if directory is not None:
                if jax.process_index() == 0:
                    append_line(directory / METRICS_FILE, json.dumps(record) + "\n", metrics_text(history))
                    if epoch == first_epoch:  # the first good epoch of this invocation: its config becomes the run's
                        write_atomically(directory / CONFIG_FILE, config.to_json())
                # every process takes part; orbax writes it once
                checkpointer.save(state, run.meta(epoch), metrics={"test_loss": record["test_loss"]})
            say(_summary(record, config.epochs))
            stopped = early_stopping_epoch([r.get("test_loss") for r in history], config.early_stopping)
            if stopped is not None:
                best = min(range(len(history)), key=lambda i: _loss_or_inf(history[i].get("test_loss")))
                say(
                    f"early stopping at epoch {epoch}: the test loss has not improved for {config.early_stopping} "
                    f"epochs (best {history[best]['test_loss']:.4f} at epoch {history[best]['epoch']}"
                    + ("; its checkpoint is kept, and eval and predict read it" if directory is not None else "")
                    + ")"
                )
                break
            _stop_if_interrupted(lambda epoch=epoch: f"after epoch {epoch}; {_kept(checkpointer)}", collective=True)
    finally:
        bar.stop()
    return state


_STEPS: dict[tuple, tuple[Callable, Callable]] = {}
_STEPS_KEPT = 8


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


def augmentation_of(config: Config) -> dict[str, Any]:
    """The augmentation options ``config`` asks for (only those switched on; ``{}`` for none)."""
    options = {"translate": config.augment_translate, "flip": config.augment_flip, "noise": config.augment_noise}
    options.update(rotate=config.augment_rotate, scale=config.augment_scale)
    return {name: value for name, value in options.items() if value}


def _mean(value: Any) -> float | None:
    return None if value is None else float(np.mean(value))


def _compiled_steps(run: Run, mesh: Any) -> tuple[Callable, Callable]:
    """The jitted train and eval steps of ``run``, shared by every ``fit`` with the same model, optimizer,
    gradient mode, ensemble size and mesh in this process (so a resumed or repeated run compiles nothing again)."""
    config = run.config
    horizon = (config.schedule_epochs or config.epochs) if config.schedule in ("cosine", "warmup_cosine") else None
    optimizer_fields = (config.optimizer, config.learning_rate, config.momentum, config.weight_decay)
    schedule_fields = (config.schedule, config.decay_rate, config.warmup_epochs, horizon, run.steps_per_epoch)
    augmentation = tuple(sorted(augmentation_of(config).items()))
    options = (config.gradients, config.dtype, config.remat, config.log_grad_norms, augmentation, config.ensemble, mesh)
    key = (run.model, options, optimizer_fields, schedule_fields)
    if key not in _STEPS:
        if len(_STEPS) >= _STEPS_KEPT:
            _STEPS.pop(next(iter(_STEPS)))
        kwargs = {
            "gradients": config.gradients,
            "dtype": config.dtype,
            "remat": config.remat,
            "log_grad_norms": config.log_grad_norms,
            "augmentation": augmentation_of(config),
        }
        if config.ensemble > 1:
            steps = (
                parallel.make_ensemble_train_step(run.model, run.optimizer, **kwargs),
                parallel.make_ensemble_eval_step(run.model),
            )
        elif mesh is not None:
            steps = (
                parallel.make_data_parallel_train_step(run.model, run.optimizer, mesh, **kwargs),
                parallel.make_data_parallel_eval_step(run.model, mesh),
            )
        else:
            steps = (make_train_step(run.model, run.optimizer, **kwargs), make_eval_step(run.model))
        _STEPS[key] = steps
    return _STEPS[key]


def _summary(record: dict[str, Any], epochs: int) -> str:
    def number(name: str, digits: int = 4) -> str:
        value = record.get(name)
        return "n/a" if value is None else f"{value:.{digits}f}"

    members = ""
    if "members" in record:
        accuracies = ["n/a" if m["test_accuracy"] is None else f"{m['test_accuracy']:.4f}" for m in record["members"]]
        members = f" (ensemble; members {' '.join(accuracies)})"
    return (
        f"epoch {record['epoch']}/{epochs}  step {record['step']}  train loss {number('train_loss')} "
        f"acc {number('train_accuracy')}  test loss {number('test_loss')} acc {number('test_accuracy')}{members}  "
        f"lr {record['learning_rate']:.3g}  {record['seconds']:.1f}s"
    )


class _LossWatch:
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

    def check(self) -> float | None:
        """Read the pending metrics back; raise NonFiniteError at the first non-finite loss. Returns the last loss."""
        values = jax.device_get(self._pending)
        self._pending = []
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
        kept = "no checkpoint was written"
        if self.checkpointer is not None and self.checkpointer.latest_step() is not None:
            kept = f"the last good checkpoint (step {self.checkpointer.latest_step()}) is kept"
        raise NonFiniteError(f"training diverged: {what}; stopped, {kept}", self.epoch, step)


class _ProgressBar:
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


# -- reading a run back: moved to jaxcnn.train.restored, still importable from here ---------------------------

_MOVED = ("restore", "restore_run", "evaluate_workdir", "load_model")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from jaxcnn.train import restored

        return getattr(restored, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
