"""Reading a run back: ``restore``, ``restore_run``, ``load_model`` and ``evaluate_workdir``.

Which checkpoint: ``step=None`` reads the best one (lowest test loss) of a run trained with early stopping and
the latest one of any other run; ``step="best"``, ``step="latest"`` or a step number pick one explicitly. Every
result says which it read (:func:`describe`: "checkpoint of epoch 6 (best test loss), step 90").

The model and optimizer are rebuilt from the config and data shape saved with the checkpoint, so restoring does
not read the data set (a run trained with a model object, ``fit(config, workdir, model=m)``, is read back with
``model=m``: its structure is checked against the checkpoint's); the preprocessing (raw scale and per-channel
standardisation) is saved there too and comes back as a :class:`~jaxcnn.train.preprocess.Preprocess`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcnn import data as data_lib
from jaxcnn.data import channel_stats
from jaxcnn.nn.layer import Layer
from jaxcnn.train.checkpoint import Checkpointer, CheckpointError, step_number
from jaxcnn.train.config import Config, make_loss, make_optimizer
from jaxcnn.train.evaluate import evaluate
from jaxcnn.train.preprocess import Preprocess
from jaxcnn.train.run import USER_MODEL, build_model, check_labels, check_signature, initial_state
from jaxcnn.train.state import TrainState
from jaxcnn.train.workdir import CHECKPOINT_DIR, read_config

BEST_METRIC = "test_loss"  # the metric an early-stopped run's checkpoints are ranked by
# data sets read from a directory (--data-dir), and the one read from a file (--data-path)
DIRECTORY_DATASETS = ("mnist", "fashion_mnist", "cifar10")


def restore(workdir: str | os.PathLike, *, model: Layer | None = None, step: int | str | None = None) -> TrainState:
    """The :class:`TrainState` of one of ``workdir``'s checkpoints.

    Args:
      workdir: a training workdir.
      model: the model the run was trained with, when it was given to ``fit`` as an object (needed then; its
        parameter structure must match the checkpoint's); None rebuilds the model the run's config names.
      step: None for the default checkpoint (the best by test loss for a run trained with early stopping, else
        the latest), ``"best"``, ``"latest"``, or a step number.

    Raises:
      FileNotFoundError: ``workdir`` holds no run; CheckpointError: no such checkpoint, or a corrupt one;
      ValueError: a user model's run without ``model``, or a ``model`` of another structure.
    """
    return restore_run(workdir, model=model, step=step)[1]


def restore_run(
    workdir: str | os.PathLike, *, model: Layer | None = None, step: int | str | None = None
) -> tuple[Config, TrainState, Any, dict]:
    """``(config, state, model, meta)`` of one of ``workdir``'s checkpoints (``model`` and ``step`` as in
    :func:`restore`).

    ``config`` is the config the checkpoint was trained with, ``model`` the :mod:`jaxcnn.nn` model rebuilt from
    it, ``meta`` the JSON record saved with the checkpoint (``epoch``, ``step``, ``input_shape``,
    ``num_classes``, ``preprocess`` ...) plus ``"chosen"``: why this checkpoint (``"best test loss"``;
    ``"latest"`` when asked for by name; None for a step number, or the latest of a run without early stopping).
    For the model ready for use (with the preprocessing of new images) see :func:`load_model`.
    """
    with jax.enable_x64(False):
        return _restore_run(Path(workdir), model, step)


def load_model(
    workdir: str | os.PathLike, *, model: Layer | None = None, step: int | str | None = None
) -> tuple[Any, Any, Any, Preprocess]:
    """A trained model ready for use: ``(model, params, model_state, preprocess)``.

    ``model.apply(params, model_state, preprocess(images), train=False)[0]`` gives the logits ``(N, classes)``
    of raw ``images`` ``(N, H, W, C)``: uint8 pixels (0..255), or numbers on the training data's raw scale
    (``preprocess.raw_scale``: 0..16 for the digits). For an ensemble run (``--ensemble K``) ``params`` and
    ``model_state`` carry a leading member axis: use :func:`jaxcnn.train.ensemble.ensemble_predictions`, or
    :func:`jaxcnn.train.predict.predict`, which handles both.

    Args:
      workdir: a training workdir.
      model: the model object the run was trained with, as in :func:`restore` (None: the config's).
      step: which checkpoint, as in :func:`restore` (default: the best of an early-stopped run, else the latest).

    Raises:
      FileNotFoundError: ``workdir`` holds no run; CheckpointError: no such checkpoint, or a corrupt one.
    """
    config, state, model, meta = restore_run(workdir, model=model, step=step)
    return model, state.params, state.model_state, preprocess_of(config, meta)


def describe(meta: dict[str, Any]) -> str:
    """``"checkpoint of epoch 6 (best test loss), step 90"``: which checkpoint :func:`restore_run` read."""
    chosen = meta.get("chosen")
    return f"checkpoint of epoch {meta.get('epoch')}{f' ({chosen})' if chosen else ''}, step {meta.get('step')}"


def choose_step(checkpointer: Checkpointer, config: Config, step: int | str | None) -> tuple[int, str | None]:
    """``(step, chosen)``: the checkpoint ``step`` asks for among ``checkpointer``'s (see :func:`restore`), and
    the reason :func:`describe` shows (None: no reason worth showing)."""
    where = checkpointer.directory
    steps = checkpointer.steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {where}")
    if step is None or step == "best":
        best = checkpointer.best_step()
        if best is not None and (step == "best" or config.early_stopping is not None):
            return best, f"best {BEST_METRIC.replace('_', ' ')}"
        if step == "best":
            raise CheckpointError(
                f"no checkpoint in {where} is ranked by {BEST_METRIC.replace('_', ' ')} (only runs trained with early "
                f"stopping keep their best); kept steps: {', '.join(map(str, steps))}"
            )
        return steps[-1], None  # a run without early stopping: the latest, as always
    if step == "latest":
        return steps[-1], "latest"
    if isinstance(step, bool) or not isinstance(step, int | np.integer):
        raise ValueError(f"step must be a step number, 'best' or 'latest', got {step!r}")
    if int(step) not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {where}; kept steps: {', '.join(map(str, steps))}")
    return int(step), None


def _restore_run(directory: Path, model: Layer | None, step: int | str | None) -> tuple[Config, TrainState, Any, dict]:
    if not directory.exists():
        raise FileNotFoundError(f"workdir {directory} does not exist")
    config = read_config(directory)
    with Checkpointer(directory / CHECKPOINT_DIR, keep=config.keep, best=BEST_METRIC, read_only=True) as checkpointer:
        step, chosen = choose_step(checkpointer, config, step)
        meta = checkpointer.read_meta(step)
        input_shape = tuple(meta.get("input_shape", ()))
        num_classes = meta.get("num_classes")
        if not input_shape or not isinstance(num_classes, int):
            raise CheckpointError(f"checkpoint {checkpointer.path(step)} is corrupt: its metadata is incomplete")
        if isinstance(meta.get("config"), dict):  # the config this checkpoint was trained with
            try:
                config = Config.from_dict(meta["config"])
            except ValueError as error:
                where = checkpointer.path(step)
                raise CheckpointError(f"checkpoint {where} holds an invalid config: {error}") from None
        model = _model_of(config, meta, input_shape, num_classes, model, checkpointer.path(step))
        optimizer, _ = make_optimizer(config, int(meta.get("steps_per_epoch", 1)))
        template = initial_state(config, model, optimizer, input_shape)
        state, meta = checkpointer.restore(template, step)
        if "preprocess" in meta:
            try:
                Preprocess.from_dict(meta["preprocess"])
            except ValueError as error:
                raise CheckpointError(f"checkpoint {checkpointer.path(step)} is corrupt: {error}") from None
    return config, state, model, dict(meta, chosen=chosen)


def _model_of(
    config: Config, meta: dict[str, Any], input_shape: tuple[int, ...], classes: int, model: Layer | None, where: Any
) -> Layer:
    """The checkpoint's model: ``model`` (checked against the saved parameter structure), or the config's."""
    if model is None and str(meta.get("model", "")).endswith(f"({USER_MODEL})"):
        raise ValueError(
            f"checkpoint {where} was trained with a model object ({meta['model']}); pass it: "
            "restore(workdir, model=...) or load_model(workdir, model=...)"
        )
    built = build_model(config, input_shape, classes, model)
    check_signature(meta.get("params"), built, input_shape, f"checkpoint {where}")
    return built


def preprocess_of(config: Config, meta: dict[str, Any]) -> Preprocess:
    """The :class:`Preprocess` saved with a checkpoint; for a checkpoint of jaxcnn 0.1 (which saved none), the
    one its config implies, recomputed from the training data."""
    if "preprocess" in meta:
        return Preprocess.from_dict(meta["preprocess"])
    dataset = _load(config.dataset, config.data_dir, config.data_path, config.seed)
    mean = std = None
    if config.normalize:
        mean, std = (tuple(float(v) for v in stats) for stats in channel_stats(dataset.x_train))
    return Preprocess(tuple(dataset.input_shape), float(dataset.raw_scale), mean, std)


def _load(name: str, data_dir: str | None, data_path: str | None, seed: int) -> data_lib.Dataset:
    return data_lib.load(name, data_dir=data_dir, data_path=data_path, normalize=False, seed=seed)


def evaluate_workdir(
    workdir: str | os.PathLike,
    *,
    split: str = "test",
    batch_size: int = 256,
    step: int | str | None = None,
    dataset: str | None = None,
    data_path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate one of ``workdir``'s checkpoints on its data set's ``split``, or on other data.

    The images go through the preprocessing saved with the checkpoint (the training set's raw scale and
    standardisation), whatever data set they come from.

    Args:
      workdir: a training workdir.
      split: ``"test"`` or ``"train"``.
      batch_size: images per compiled call.
      step: which checkpoint, as in :func:`restore`.
      dataset: another data set (:data:`jaxcnn.data.DATASETS`) of the same image shape; None: the run's own
        (or ``"npz"`` when only ``data_path`` is given).
      data_path: the ``.npz`` file of ``dataset="npz"``.
      data_dir: the directory of an MNIST / Fashion-MNIST / CIFAR-10 data set (the run's own set read from
        another directory when ``dataset`` is None).

    Returns:
      ``{"loss", "accuracy", "count", "epoch", "step", "split", "chosen", "dataset"}`` (and ``"members"`` for
      an ensemble).

    Raises:
      ValueError: a bad split, a data option that does not apply, images of another shape, labels beyond the
        model's classes; CheckpointError: no such checkpoint.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    config, state, model, meta = restore_run(workdir, step=step)
    with jax.enable_x64(False):
        preprocess = preprocess_of(config, meta)
        if config.dataset == "folder" and dataset in (None, "folder") and data_path is None:
            result = _evaluate_folder(config, state, model, preprocess, split, batch_size, data_dir)
            return dict(result, epoch=meta["epoch"], step=step_number(state), split=split, chosen=meta["chosen"])
        name, other = _other_data(config, dataset, data_path, data_dir)
        if list(other.input_shape) != list(meta["input_shape"]):
            raise ValueError(
                f"the {name} images have shape {tuple(other.input_shape)}, "
                f"the checkpoint was trained on {tuple(meta['input_shape'])}"
            )
        check_labels(other, model.output_shape(tuple(other.input_shape))[-1])
        x, y = other.test if split == "test" else other.train
        x = preprocess.standardize(x)
        loss_fn = make_loss(config)  # the run's loss (label smoothing included), as its test loss was
        if config.ensemble > 1:
            from jaxcnn.train.ensemble import evaluate_ensemble, make_ensemble_eval_step

            members = make_ensemble_eval_step(model, loss_fn=loss_fn)
            result = evaluate_ensemble(
                model, state.params, state.model_state, x, y, batch_size=batch_size, eval_step=members
            )
        else:
            y = np.asarray(y)
            result = evaluate(model, state.params, state.model_state, x, y, batch_size=batch_size, loss_fn=loss_fn)
    return dict(result, epoch=meta["epoch"], step=step_number(state), split=split, chosen=meta["chosen"], dataset=name)


def _evaluate_folder(
    config: Config,
    state: Any,
    model: Any,
    preprocess: Preprocess,
    split: str,
    batch_size: int,
    data_dir: str | os.PathLike | None,
) -> dict[str, Any]:
    """A folder run's checkpoint on the folder's ``val`` (split ``"test"``) or ``train`` files, streamed through
    Grain with the evaluation transform and the checkpoint's standardisation, on the device."""
    from jaxcnn.data.folder import image_folder
    from jaxcnn.data.stream import Batches, StreamSpec, default_workers
    from jaxcnn.train.evaluate import make_eval_step
    from jaxcnn.train.feed import evaluate_stream
    from jaxcnn.train.step import InputScaling

    root = str(data_dir) if data_dir is not None else config.data_dir
    folder = image_folder(root, image_size=config.image_size, skip_bad_files=config.skip_bad_files, normalize=False)
    index = folder.val if split == "test" else folder.train
    scaling = InputScaling(255.0, preprocess.mean, preprocess.std)
    spec = StreamSpec(config.image_size, batch_size, config.seed, skip_bad_files=config.skip_bad_files)
    workers = config.data_workers if config.data_workers is not None else default_workers()
    stream = Batches(index, spec, train=False, epochs=1, workers=workers)
    try:
        step = make_eval_step(model, input_scaling=scaling, masked=True)
        result = evaluate_stream(step, state.params, state.model_state, stream)
    finally:
        stream.close()
    return dict(result, dataset="folder")


def _other_data(
    config: Config, dataset: str | None, data_path: str | os.PathLike | None, data_dir: str | os.PathLike | None
) -> tuple[str, data_lib.Dataset]:
    """``(name, data set)`` to evaluate on, loaded without standardisation (the checkpoint's is applied)."""
    if dataset is None and data_path is None and data_dir is None:
        return config.dataset, _load(config.dataset, config.data_dir, config.data_path, config.seed)
    name = dataset if dataset is not None else ("npz" if data_path is not None else config.dataset)
    if name not in data_lib.DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(data_lib.DATASETS))}")
    if data_path is not None and name != "npz":
        raise ValueError(f"data_path applies to the npz data set only, not {name}")
    if data_dir is not None and name not in DIRECTORY_DATASETS:
        raise ValueError(f"data_dir applies to {', '.join(DIRECTORY_DATASETS)} only, not {name}")
    if name == "npz" and data_path is None:
        raise ValueError("the npz data set needs data_path (an .npz file with x_train, y_train, x_test, y_test)")
    if name in DIRECTORY_DATASETS and data_dir is None:
        if name != config.dataset or not config.data_dir:
            raise ValueError(f"the {name} data set needs data_dir (the directory of its files)")
        data_dir = config.data_dir
    return name, _load(name, None if data_dir is None else str(data_dir), data_path, config.seed)
