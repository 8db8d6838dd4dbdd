"""A run assembled from its config: data, model, optimizer, schedule, initial state and the compiled steps.

The model is the one ``config.model`` names (a registered name or ``package.module:factory``), or a
:class:`jaxcnn.nn.Layer` object given to ``fit(..., model=...)``. Compiled steps are shared by every run in this
process whose configuration compiles alike (:func:`compiled_steps`), so a repeated or resumed run compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxcnn import data as data_lib
from jaxcnn import models
from jaxcnn.nn.layer import Layer
from jaxcnn.train import limits
from jaxcnn.train.config import Config, make_loss, make_optimizer
from jaxcnn.train.evaluate import make_eval_step
from jaxcnn.train.preprocess import Preprocess
from jaxcnn.train.state import TrainState, create_train_state
from jaxcnn.train.step import InputScaling, StepOptions, make_train_step

USER_MODEL = "user model"  # what a checkpoint's metadata says of a model object given to fit(model=...)


def load_data(config: Config, log: Callable[[str], None] | None = None) -> Any:
    """The data set ``config`` names (synthetic data is seeded by ``config.seed``): a :class:`jaxcnn.data.Dataset`,
    or for ``"folder"`` an indexed :class:`jaxcnn.data.folder.ImageFolder` (its files are read as the run goes)."""
    if config.dataset == "folder":
        from jaxcnn.data.folder import image_folder

        return image_folder(
            config.data_dir,
            image_size=config.image_size,
            skip_bad_files=config.skip_bad_files,
            normalize=config.normalize,
            log=log,
        )
    return data_lib.load(
        config.dataset,
        data_dir=config.data_dir,
        data_path=config.data_path,
        normalize=config.normalize,
        seed=config.seed,
        uint8=True,  # 8-bit sources stay uint8 on the host; the steps scale and standardise them on the device
    )


def build_model(config: Config, input_shape: tuple[int, ...], num_classes: int, model: Layer | None = None) -> Layer:
    """The run's model, checked against ``input_shape``: ``model`` when given (a user's object), else the one
    ``config.model`` names (a registered name or ``package.module:factory``) with ``num_classes`` outputs; with
    ``config.dropout`` a Dropout layer goes before the last layer of a Sequential."""
    label = config.model if model is None else model_label(model)
    if model is None:
        model = models.build(config.model, num_classes)
    elif not isinstance(model, Layer):
        raise ValueError(f"model must be a jaxcnn.nn.Layer, got {type(model).__name__}")
    if config.dropout > 0:
        from jaxcnn import nn

        if not isinstance(model, nn.Sequential):
            raise ValueError(f"dropout goes before the last layer of a Sequential model; {label} is not one")
        model = nn.Sequential([*model.layers[:-1], nn.Dropout(config.dropout), model.layers[-1]])
    try:
        model.output_shape(tuple(input_shape))
    except ValueError as error:
        shape = tuple(input_shape)
        raise ValueError(f"model {label} cannot take {config.dataset} images of shape {shape}: {error}") from None
    return model


def model_label(model: Layer) -> str:
    """How messages name a model object given to ``fit``: ``"Sequential (a user model)"``."""
    return f"{type(model).__name__} ({USER_MODEL})"


def param_signature(model: Layer, input_shape: tuple[int, ...]) -> list[str]:
    """The model's parameter and state structure, one ``"path shape dtype"`` line per array (nothing runs:
    ``jax.eval_shape``), saved with every checkpoint so that a resumed or restored run can name the first
    difference when another model is given."""
    shapes = jax.eval_shape(lambda key: model.init(key, tuple(input_shape)), jax.random.key(0))
    lines = []
    for part, tree in zip(("params", "state"), shapes, strict=True):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = "/".join(str(getattr(entry, "key", getattr(entry, "idx", entry))) for entry in path)
            lines.append(f"{part}/{name} {tuple(leaf.shape)} {leaf.dtype}")
    return lines


def check_signature(saved: list[str] | None, model: Layer, input_shape: tuple[int, ...], where: str) -> None:
    """Raise ValueError naming the first difference between a checkpoint's :func:`param_signature` and
    ``model``'s (a checkpoint without one, from jaxcnn 0.1, is left to the restore's own leaf check)."""
    if saved is None:
        return
    current = param_signature(model, input_shape)
    if current == list(saved):
        return
    pairs = enumerate(zip(saved, current, strict=False))
    index = next((i for i, (old, new) in pairs if old != new), min(len(saved), len(current)))
    old = saved[index] if index < len(saved) else "nothing"
    new = current[index] if index < len(current) else "nothing"
    raise ValueError(
        f"the model does not match {where}: its parameters differ at array {index} (checkpoint: {old}; model: {new}); "
        "pass the model the run was trained with, or use a new workdir"
    )


def check_labels(dataset: data_lib.Dataset, num_outputs: int) -> None:
    """Both splits' labels: integers in ``[0, num_outputs)`` (the jitted steps cannot check them)."""
    for split, labels in (("train", dataset.y_train), ("test", dataset.y_test)):
        data_lib.check_labels(labels, num_outputs, what=f"{split} labels")


class Run:
    """A run's parts, built from its config: data, model, optimizer, schedule, the initial state and the
    compiled steps."""

    def __init__(
        self,
        config: Config,
        dataset: Any = None,
        model: Layer | None = None,
        log: Callable[[str], None] | None = None,
    ):
        from jaxcnn.data.folder import ImageFolder

        self.config = config
        self.user_model = model is not None
        self.data = dataset if dataset is not None else load_data(config, log)
        self.streamed = isinstance(self.data, ImageFolder)  # read from files through Grain as the run goes
        if self.streamed and config.ensemble > 1:
            raise ValueError("an ensemble trains on a data set held in memory, not on a streamed image folder")
        self.input_shape = tuple(self.data.input_shape)
        self.model = build_model(config, self.input_shape, self.data.num_classes, model)
        check_labels(self.data, self.model.output_shape(self.input_shape)[-1])
        self.warnings = limits.check_augmentation(config, self.input_shape)  # refuses, or warnings for fit
        if self.streamed:
            from jaxcnn.data.stream import train_steps

            self.steps_per_epoch = train_steps(len(self.data.train), config.batch_size)
        else:
            self.steps_per_epoch = data_lib.num_batches(len(self.data.y_train), config.batch_size)
        if config.epochs * self.steps_per_epoch >= 2**31:
            raise ValueError(
                f"epochs ({config.epochs}) x steps per epoch ({self.steps_per_epoch}) exceeds the int32 step counter"
            )
        self.privacy = None  # a DP run's plan (jaxcnn.train.dp_run): its step, sampling and ledger
        if config.dp_clip is not None:
            from jaxcnn.train import dp_run

            dp_run.check_model(self.signature, config.model if model is None else model_label(self.model))
            self.privacy = dp_run.plan_of(config, len(self.data.y_train), self.steps_per_epoch)
        self.optimizer, self.schedule = cached_optimizer(config, self.steps_per_epoch)
        limits.check_state_memory(config, self.initial_state, self.data.num_classes)  # before allocating it
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """A SHA-256 of the (normalised) train and test arrays, or of an image folder's file index: a resumed run
        must see the same data."""
        if self._fingerprint is None and self.streamed:
            self._fingerprint = self.data.digest()
        if self._fingerprint is None:
            self._fingerprint = _digest_arrays(self.data.x_train, self.data.y_train, self.data.x_test, self.data.y_test)
        return self._fingerprint

    def matches_data(self, digest: str) -> bool:
        """Whether a checkpoint's ``data_sha256`` is this run's data: its :attr:`fingerprint`, or for an 8-bit
        set now held as uint8, the fingerprint jaxcnn 0.1 took of the same set divided and standardised on the
        host (loaded again only to check a checkpoint written that way)."""
        if digest == self.fingerprint:
            return True
        if self.streamed or self.data.x_train.dtype != np.uint8:
            return False
        legacy = data_lib.load(
            self.config.dataset,
            data_dir=self.config.data_dir,
            data_path=self.config.data_path,
            normalize=self.config.normalize,
            seed=self.config.seed,
        )
        return digest == _digest_arrays(legacy.x_train, legacy.y_train, legacy.x_test, legacy.y_test)

    @functools.cached_property
    def input_scaling(self) -> InputScaling | None:
        """How the steps turn the host's uint8 batches into the model's input (an image folder, or an 8-bit data
        set held as uint8), or None for floating-point images."""
        if not self.streamed and self.data.x_train.dtype != np.uint8:
            return None
        return InputScaling(self.data.raw_scale, self.data.mean, self.data.std)

    @functools.cached_property
    def signature(self) -> list[str]:
        """The model's :func:`param_signature`, computed once (every checkpoint records it)."""
        return param_signature(self.model, self.input_shape)

    def initial_state(self) -> TrainState:
        """The state at step 0: one model, or an ensemble's K members (seeds ``seed .. seed + K - 1``) stacked."""
        return initial_state(self.config, self.model, self.optimizer, self.input_shape)

    def meta(self, epoch: int) -> dict[str, Any]:
        """The JSON record saved with the checkpoint of ``epoch``."""
        return {
            "epoch": epoch,
            "input_shape": list(self.input_shape),
            "num_classes": self.data.num_classes,
            "model": model_label(self.model) if self.user_model else self.config.model,
            "params": self.signature,
            "dataset": self.config.dataset,
            "steps_per_epoch": self.steps_per_epoch,
            "data_sha256": self.fingerprint,
            "config": self.config.to_dict(),
            "preprocess": Preprocess.of_dataset(self.data).to_dict(),  # what predict and eval do to new images
        }


def _digest_arrays(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def initial_state(config: Config, model: Layer, optimizer: Any, input_shape: tuple[int, ...]) -> TrainState:
    """The state at step 0 of ``config``'s run (an ensemble's members stacked along a leading axis)."""
    if config.ensemble > 1:
        from jaxcnn.train.ensemble import create_ensemble_state

        seeds = [config.seed + k for k in range(config.ensemble)]
        return create_ensemble_state(model, optimizer, seeds, input_shape)
    return create_train_state(model, optimizer, jax.random.key(config.seed), input_shape)


def augmentation_of(config: Config) -> dict[str, Any]:
    """The augmentation options ``config`` asks for (only those switched on; ``{}`` for none)."""
    options = {"translate": config.augment_translate, "flip": config.augment_flip, "noise": config.augment_noise}
    options.update(rotate=config.augment_rotate, scale=config.augment_scale)
    return {name: value for name, value in options.items() if value}


def step_options(config: Config, input_scaling: InputScaling | None = None) -> StepOptions:
    """The :class:`StepOptions` of ``config``'s train step (``input_scaling`` for uint8 batches)."""
    dtype = None if config.dtype == "float32" else config.dtype
    return StepOptions(
        loss_fn=make_loss(config),
        gradients=config.gradients,
        dtype=dtype,
        remat=config.remat,
        log_grad_norms=config.log_grad_norms,
        augmentation=augmentation_of(config),
        input_scaling=input_scaling,
    )


# -- compiled steps shared across runs ----------------------------------------------------------------------

# Config fields that do not change what a step compiles to: blanked in the cache key. Every other field, and any
# field added later, is part of the key, so a new option can never reuse a step compiled without it. (epochs
# sets a cosine schedule's horizon, which the key carries separately; the model's name stands for the model
# object, which the key holds itself.)
NONCOMPILING = (
    "model",
    "dataset",
    "data_dir",
    "data_path",
    "normalize",
    "seed",
    "epochs",
    "schedule_epochs",
    "early_stopping",
    "keep",
    "data_workers",
    "skip_bad_files",
    "checkpoint_every",
    # a DP run's step depends on its resolved plan, which compiled_steps' key carries (PrivatePlan.step_key: the
    # noise a target epsilon chose too), not on how its flags gave it
    "dp_clip",
    "dp_noise",
    "dp_target_epsilon",
    "dp_delta",
    "dp_method",
    "dp_sampling",
    "dp_accountant",
)
_CACHE: dict[tuple, Any] = {}
_CACHE_KEPT = 8


def compile_key(config: Config, model: Layer, steps_per_epoch: int, mesh: Any = None) -> tuple:
    """The key under which ``config``'s optimizer and compiled steps are shared in this process: the whole
    config with the :data:`NONCOMPILING` fields blanked, the schedule's horizon, the steps per epoch, the model
    (by value when hashable, else by identity) and the mesh."""
    horizon = (config.schedule_epochs or config.epochs) if config.schedule in ("cosine", "warmup_cosine") else None
    blank = dataclasses.replace(config, **{name: getattr(Config, name) for name in NONCOMPILING})
    try:
        hash(model)
        model_key: Any = model
    except TypeError:
        model_key = ("id", id(model))
    return (tuple(sorted(blank.to_dict().items(), key=lambda item: item[0])), horizon, steps_per_epoch, model_key, mesh)


def _cached(key: tuple, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_KEPT:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = make()
    return _CACHE[key]


def cached_optimizer(config: Config, steps_per_epoch: int) -> tuple[Any, Any]:
    """``make_optimizer(config, steps_per_epoch)``, the same objects for configs that compile alike: the state
    carries its optimizer as part of its tree structure, so an equal one keeps the compiled steps valid."""
    key = ("optimizer", *compile_key(config, None, steps_per_epoch))
    return _cached(key, lambda: make_optimizer(config, steps_per_epoch))


def compiled_steps(run: Run, mesh: Any) -> tuple[Callable, Callable]:
    """The jitted train and eval steps of ``run``, shared by every run in this process with the same
    :func:`compile_key` (so a resumed or repeated run compiles nothing again)."""
    key = ("steps", *compile_key(run.config, run.model, run.steps_per_epoch, mesh), run.input_scaling)
    key += (run.privacy.step_key,) if run.privacy is not None else ()
    return _cached(key, lambda: _make_steps(run, mesh))


def _make_steps(run: Run, mesh: Any) -> tuple[Callable, Callable]:
    options = step_options(run.config, run.input_scaling)
    loss_fn = options.loss_fn  # the test loss is the training loss (label smoothing included)
    if run.privacy is not None:  # one device, one model (dp_run.check_config, fit)
        evaluation = make_eval_step(run.model, loss_fn=loss_fn, input_scaling=run.input_scaling)
        return run.privacy.train_step(run.model, options), evaluation
    if run.config.ensemble > 1:
        from jaxcnn.train.ensemble import make_ensemble_eval_step, make_ensemble_train_step

        evaluation = make_ensemble_eval_step(run.model, loss_fn=loss_fn, input_scaling=run.input_scaling)
        return make_ensemble_train_step(run.model, options), evaluation
    if mesh is not None:
        from jaxcnn.train.data_parallel import make_data_parallel_eval_step, make_data_parallel_train_step

        evaluation = make_data_parallel_eval_step(
            run.model, mesh, loss_fn=loss_fn, input_scaling=run.input_scaling, masked=run.streamed
        )
        return make_data_parallel_train_step(run.model, mesh, options), evaluation
    return make_train_step(run.model, options), make_eval_step(
        run.model, loss_fn=loss_fn, input_scaling=run.input_scaling, masked=run.streamed
    )
