"""The run configuration: one frozen dataclass, validated on creation, saved as ``config.json`` in a workdir.

Every field has a ``jaxcnn train`` flag of the same name (``learning_rate`` is ``--learning-rate``).
:func:`make_optimizer` turns a config into an optax transform and its learning-rate schedule, :func:`make_loss`
into its loss (both in :mod:`jaxcnn.train.optimizer`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxcnn._validate import is_int
from jaxcnn.backprop import GRADIENTS
from jaxcnn.train.dp_run import DP_ACCOUNTANTS, DP_FIXED, DP_METHODS, DP_SAMPLINGS, check_config  # noqa: F401

# the optimizer, schedule and loss a config makes, importable from here as before they moved
from jaxcnn.train.optimizer import decayed_leaves, make_loss, make_optimizer, make_schedule  # noqa: F401

OPTIMIZERS = ("adam", "adamw", "momentum", "nesterov", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine", "exponential", "warmup_cosine")
DTYPES = ("float32", "bfloat16")
DATASETS = ("cifar10", "digits", "fashion_mnist", "folder", "mnist", "npz", "synthetic")

# Fields a resumed run must share with the run it continues: its checkpoints hold this model's parameters for
# this data set, in this optimizer's state; its random stream comes from this seed, and its data order and
# per-epoch schedule from this batch size; an ensemble's checkpoints hold its K members; a DP run's privacy
# ledger counts steps of one mechanism (DP_FIXED). Everything else (more
# epochs, a new learning rate or schedule, another gradient mode, the devices it runs on) may change on resume;
# the data themselves are checked by fingerprint.
RESUME_FIXED = ("model", "dataset", "optimizer", "seed", "batch_size", "ensemble", *DP_FIXED)

# Each step of an ensemble trains every member (K runs' work per step, K copies of the state): beyond this, train
# the members as several runs (seeds SEED, SEED + K, ...), which is the same computation.
MAX_ENSEMBLE = 1024

# the data sets read from a directory (data_dir) and from a file (data_path)
DIRECTORY_DATASETS = ("cifar10", "fashion_mnist", "folder", "mnist")
STREAMED_DATASETS = ("folder",)  # read from files as the run goes (jaxcnn.data.stream), not held in memory
FILE_DATASETS = ("npz",)


class _NamesFields:
    """A message that names :class:`Config` fields (``fields``); :meth:`with_flags` names them as the
    ``jaxcnn train`` flags instead (``--augment-translate``)."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields

    def with_flags(self) -> str:
        """The message with each field named as its flag (values in quotes are left alone)."""
        text = str(self)
        for field in self.fields:
            text = re.sub(rf"(?<![\w'-]){field}(?![\w'])", flag_of(field), text)
        return text


class ConfigError(_NamesFields, ValueError):
    """An invalid :class:`Config` value. The message names the fields involved (``fields``) by their names;
    :meth:`with_flags` names them as the ``jaxcnn train`` flags instead (``--augment-translate``)."""


class ConfigWarning(_NamesFields, UserWarning):
    """A :class:`Config` value that is allowed but likely harmful (issued through :mod:`warnings` by ``fit``)."""


def flag_of(field: str) -> str:
    """The ``jaxcnn train`` flag of a :class:`Config` field: ``"augment_translate"`` -> ``"--augment-translate"``."""
    return "--" + field.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Invalid values raise :class:`ConfigError` (a ``ValueError``) on creation.

    The defaults train ``mnist_cnn`` on scikit-learn's 8x8 digits to about 98% test accuracy (97.8-98.6% over
    seeds 0-6) in about 10-15 seconds on two CPU cores. Their learning rate decays by ``decay_rate`` each epoch, a
    schedule with no horizon: extending a finished run continues it exactly as a longer run would have gone.

    Attributes:
      model: a classifier's name from :func:`jaxcnn.models.names` (its class count follows the data set), or a
        user's factory as ``"package.module:factory"`` (imported on creation; called with ``num_classes=`` when
        it takes it; see :func:`jaxcnn.models.build`). ``fit(config, model=...)`` trains a model object instead.
      dataset: ``"digits"``, ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"npz"``, ``"synthetic"``, or
        ``"folder"``: an image folder ``data_dir/train/<class>/*``, ``data_dir/val/<class>/*`` streamed from disk
        through Grain (see :mod:`jaxcnn.data.folder` and :mod:`jaxcnn.data.stream`).
      data_dir: the directory holding the MNIST / Fashion-MNIST IDX files, the CIFAR-10 ``.bin`` batches, or
        the image folder.
      data_path: the ``.npz`` file of the ``"npz"`` data set.
      optimizer: ``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"`` (optax).
      learning_rate: the peak learning rate, finite and positive.
      momentum: the momentum of ``"momentum"``, ``"nesterov"`` and ``"rmsprop"``, in [0, 1).
      schedule: ``"constant"``, ``"exponential"`` (times ``decay_rate`` after every epoch), ``"cosine"`` (decay to
        0 over ``epochs``) or ``"warmup_cosine"`` (linear warm-up over ``warmup_epochs``, then cosine decay to 0).
        The cosine schedules span ``schedule_epochs`` (default: ``epochs``): extending such a run without it
        changes the rest of its schedule.
      warmup_epochs: the warm-up length of ``"warmup_cosine"``, in epochs (>= 0).
      schedule_epochs: the horizon of the cosine schedules, in epochs; None means ``epochs``. Set it to train a
        cosine run in stages (``epochs=3``, then 6, with ``schedule_epochs=6``) bit for bit like one of 6 epochs.
      decay_rate: the per-epoch factor of ``"exponential"``, in (0, 1].
      weight_decay: L2 weight decay; decoupled (AdamW-style) for ``"adamw"``, added to the gradient otherwise.
      decay_norms_and_biases: apply ``weight_decay`` to every parameter; False leaves out the parameters of
        fewer than 2 dimensions (biases and the scales and offsets of BatchNorm, GroupNorm and LayerNorm) and
        decays only kernels (see :func:`decayed_leaves`).
      batch_size: examples per step (>= 1); the last batch of an epoch holds the remainder.
      epochs: passes over the training set (>= 1).
      seed: seeds initialisation, data order and every random draw (an int in [0, 2**32)).
      gradients: ``"autodiff"`` (jax.grad), ``"manual"`` (hand rules through jax.custom_vjp) or ``"engine"``
        (the explicit reverse pass of :mod:`jaxcnn.backprop`).
      dtype: the compute dtype of the train step: ``"float32"``, or ``"bfloat16"`` for mixed precision (bf16
        forward and backward; float32 master weights, loss, optimizer state and evaluation).
      remat: recompute each block's activations in the backward pass (``jax.checkpoint`` per child of the
        model) to save memory; needs ``gradients`` ``"autodiff"`` or ``"manual"``.
      ensemble: train this many models at once (>= 1) in one vmapped step; member ``k`` is the run with seed
        ``seed + k`` (its own initialisation, data order and dropout), and the ensemble predicts with the mean
        of the members' probabilities.
      dropout: insert dropout of this rate before the model's last layer (its classifier), in [0, 1); 0 adds
        none. The parameters keep their names, so a checkpoint does not depend on it.
      label_smoothing: train on the targets ``(1 - e) onehot + e / classes`` with ``e`` this, in [0, 1) (the
        softmax cross-entropy's ``label_smoothing``, which has a hand-derived VJP); the test loss is the same
        smoothed loss; 0 is plain cross-entropy.
      augment_translate: shift each training image by up to this many pixels (pad with zeros and crop at a
        random offset), on the device inside the train step; 0 is off.
      augment_flip: mirror training images left-right with probability 1/2.
      augment_noise: add Gaussian noise of this standard deviation to training images; 0 is off.
      augment_rotate: rotate each training image about its centre by a random angle in [-r, r] degrees (r in
        [0, 180); bilinear, zeros outside), before any translation; 0 is off.
      augment_scale: zoom each training image about its centre by a random factor in [1 - s, 1 + s] (s in
        [0, 1)), in the same warp as the rotation; 0 is off.
      early_stopping: stop once the test loss has not improved for this many epochs in a row (>= 1); None
        trains every epoch. The digits and the other built-in sets have no validation split, so the test set
        stands in for one: the stopping epoch is chosen on it.
      log_grad_norms: record each layer's gradient norm and update-to-weight ratio (the norm of the optimizer's
        update over the norm of the weights), averaged over each epoch's steps, in ``metrics.jsonl``.
      keep: how many of the latest checkpoints a workdir keeps (>= 1).
      normalize: standardise images per channel with the training set's mean and standard deviation (an image
        folder's estimated from a sample of 256 training images).
      image_size: the side of the square RGB images an image folder is cropped and resized to (>= 8).
      data_workers: processes decoding an image folder's files (0: in the training process); None: one per CPU
        but one.
      skip_bad_files: leave out image files that fail the header check or do not decode (counted in the log and
        in ``metrics.jsonl``) instead of refusing the run.
      checkpoint_every: also write a checkpoint every this many steps (>= 1) within an epoch, with the data
        stream's position, so that a run stopped or killed mid-epoch resumes exactly where it was; None writes
        one at the end of each epoch only.
      dp_clip: train by DP-SGD, each example's gradient clipped to this L2 norm (> 0); None: no privacy. With
        ``dp_noise`` (the noise multiplier sigma > 0) or ``dp_target_epsilon`` (the epsilon > 0 to spend over
        ``epochs``, which chooses sigma); ``dp_delta`` in (0, 1) (None: 1/N rounded down to a power of ten);
        ``dp_method`` ``"ghost"`` (the hand reverse pass; ``gradients`` unused) or ``"vmap"``; ``dp_sampling``
        ``"shuffle"`` (the loop's batches, a proven bound) or ``"poisson"`` (padded masked batches, exact);
        ``dp_accountant`` ``"rdp"`` or ``"pld"``. What each means and what it excludes: :mod:`jaxcnn.train.dp_run`.
    """

    model: str = "mnist_cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    data_path: str | None = None
    optimizer: str = "nesterov"
    learning_rate: float = 0.1
    momentum: float = 0.9
    schedule: str = "exponential"
    warmup_epochs: int = 1
    schedule_epochs: int | None = None
    decay_rate: float = 0.9
    weight_decay: float = 5e-4
    decay_norms_and_biases: bool = True
    batch_size: int = 32
    epochs: int = 40
    seed: int = 0
    gradients: str = "manual"
    dtype: str = "float32"
    remat: bool = False
    ensemble: int = 1
    dropout: float = 0.0
    label_smoothing: float = 0.0
    augment_translate: int = 0
    augment_flip: bool = False
    augment_noise: float = 0.0
    augment_rotate: float = 0.0
    augment_scale: float = 0.0
    early_stopping: int | None = None
    log_grad_norms: bool = False
    keep: int = 3
    normalize: bool = True
    image_size: int = 224
    data_workers: int | None = None
    skip_bad_files: bool = False
    checkpoint_every: int | None = None
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_delta: float | None = None
    dp_target_epsilon: float | None = None
    dp_method: str = "ghost"
    dp_sampling: str = "shuffle"
    dp_accountant: str = "rdp"

    def __post_init__(self) -> None:
        # numpy scalars (np.int64(3)) are accepted and stored as Python numbers, so the config stays JSON-able
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.integer):
                object.__setattr__(self, field.name, int(value))
            elif isinstance(value, np.floating):
                object.__setattr__(self, field.name, float(value))
            elif isinstance(value, np.bool_):
                object.__setattr__(self, field.name, bool(value))
        self._check_values()
        self._check_combinations()

    def _check_values(self) -> None:
        """Each field on its own: a known choice, a number in range, a bool."""
        _check_model(self.model)
        _choice("dataset", self.dataset, DATASETS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("gradients", self.gradients, GRADIENTS)
        _choice("dtype", self.dtype, DTYPES)
        for name in ("data_dir", "data_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a non-empty path string or None, got {value!r}", name)
        _number("learning_rate", self.learning_rate, "a finite positive number", lambda v: v > 0)
        _number("momentum", self.momentum, "a number in [0, 1)", lambda v: 0 <= v < 1)
        _number("decay_rate", self.decay_rate, "a number in (0, 1]", lambda v: 0 < v <= 1)
        _number("weight_decay", self.weight_decay, "a finite number >= 0", lambda v: v >= 0)
        _integer("batch_size", self.batch_size, 1)
        _integer("epochs", self.epochs, 1)
        _integer("warmup_epochs", self.warmup_epochs, 0)
        _integer("keep", self.keep, 1)
        _integer("ensemble", self.ensemble, 1)
        if self.ensemble > MAX_ENSEMBLE:
            raise ConfigError(
                f"ensemble must be at most {MAX_ENSEMBLE}, got {self.ensemble}: every step trains every member, so "
                f"{self.ensemble} members are {self.ensemble} runs' work per step; train them as several runs",
                "ensemble",
            )
        if self.schedule_epochs is not None:
            _integer("schedule_epochs", self.schedule_epochs, 1)
        _number("dropout", self.dropout, "a number in [0, 1)", lambda v: 0 <= v < 1)
        _number("label_smoothing", self.label_smoothing, "a number in [0, 1)", lambda v: 0 <= v < 1)
        _integer("augment_translate", self.augment_translate, 0)
        _number("augment_noise", self.augment_noise, "a finite number >= 0", lambda v: v >= 0)
        _number("augment_rotate", self.augment_rotate, "a number of degrees in [0, 180)", lambda v: 0 <= v < 180)
        _number("augment_scale", self.augment_scale, "a number in [0, 1)", lambda v: 0 <= v < 1)
        if self.early_stopping is not None:
            _integer("early_stopping", self.early_stopping, 1)
        _integer("image_size", self.image_size, 8)
        if self.data_workers is not None:
            _integer("data_workers", self.data_workers, 0)
        if self.checkpoint_every is not None:
            _integer("checkpoint_every", self.checkpoint_every, 1)
        _integer("seed", self.seed, 0)
        if self.seed >= 2**32:
            raise ConfigError(f"seed must be an int in [0, 2**32), got {self.seed}", "seed")
        if self.seed + self.ensemble > 2**32:
            raise ConfigError(
                f"ensemble {self.ensemble} from seed {self.seed} needs seeds past 2**32 - 1", "ensemble", "seed"
            )
        check_config(self)
        switches = ("normalize", "remat", "log_grad_norms", "augment_flip", "skip_bad_files", "decay_norms_and_biases")
        for name in switches:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}", name)

    def _check_combinations(self) -> None:
        """Fields that are valid alone but not together."""
        if self.remat and self.gradients == "engine":
            raise ConfigError(
                "remat needs gradients 'autodiff' or 'manual' (the engine keeps every residual)", "remat", "gradients"
            )
        if self.optimizer in ("momentum", "nesterov") and self.momentum == 0:
            raise ConfigError(
                f"optimizer {self.optimizer!r} needs momentum > 0 (or use optimizer 'sgd')", "optimizer", "momentum"
            )
        if self.dataset == "npz" and self.data_path is None:
            raise ConfigError("dataset 'npz' needs data_path (an .npz file)", "dataset", "data_path")
        if self.dataset in DIRECTORY_DATASETS and self.data_dir is None:
            raise ConfigError(f"dataset {self.dataset!r} needs data_dir (a directory)", "dataset", "data_dir")
        if self.dataset in STREAMED_DATASETS and self.ensemble > 1:
            raise ConfigError(
                "an ensemble trains on a data set held in memory; an image folder streams one model's batches",
                "ensemble",
                "dataset",
            )
        if self.checkpoint_every is not None and self.ensemble > 1:
            raise ConfigError(
                "checkpoint_every writes mid-epoch checkpoints of one model; an ensemble checkpoints after each epoch",
                "checkpoint_every",
                "ensemble",
            )

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """Build a config from a mapping, rejecting unknown fields by name."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a config must be a JSON object, got {type(values).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Config:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON ({error})") from None
        return cls.from_dict(values)

    def resume_conflicts(self, saved: Config) -> list[str]:
        """The fields in :data:`RESUME_FIXED` where this config differs from ``saved`` (``"model: a -> b"``)."""
        conflicts = [
            f"{name}: {getattr(saved, name)!r} -> {getattr(self, name)!r}"
            for name in RESUME_FIXED
            if getattr(saved, name) != getattr(self, name)
        ]
        if self.dp_target_epsilon is not None and saved.epochs != self.epochs:  # its noise was chosen for them
            conflicts.append(f"epochs: {saved.epochs} -> {self.epochs} (dp_target_epsilon chose the noise for them)")
        return conflicts


def _check_model(model: Any) -> None:
    """A registered classifier's name, or an importable ``package.module:factory``; ConfigError otherwise."""
    from jaxcnn import models

    if isinstance(model, str) and models.is_factory_path(model):
        try:
            models.import_factory(model)
        except ValueError as error:
            raise ConfigError(str(error), "model") from None
        return
    if not isinstance(model, str) or model not in models.names():
        raise ConfigError(
            f"unknown model {model!r}; known: {', '.join(models.names())}, or package.module:factory for your own",
            "model",
        )
    if models.spec(model).task != "classification":
        raise ConfigError(
            f"model {model!r} reconstructs its input (mean squared error); jaxcnn train trains "
            f"classifiers: {', '.join(models.classifiers())}",
            "model",
        )


def _choice(name: str, value: Any, known: Any) -> None:
    if value not in known:
        raise ConfigError(f"unknown {name} {value!r}; known: {', '.join(sorted(known))}", name)


def _number(name: str, value: Any, what: str, ok: Callable[[float], bool]) -> None:
    try:
        good = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and ok(value)
    except OverflowError:  # an int too large for a float
        good = False
    if not good:
        raise ConfigError(f"{name} must be {what}, got {value!r}"[:200], name)


def _integer(name: str, value: Any, minimum: int) -> None:
    if not is_int(value) or operator.index(value) < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}", name)


def ignored_fields(config: Config) -> dict[str, str]:
    """The fields whose values this config's run never reads, each mapped to the field that makes it so:
    ``{"momentum": "optimizer"}`` for Adam (see :func:`make_optimizer`, :func:`make_schedule` and
    :func:`jaxcnn.train.loop.load_data`). Every field has a value, so these hold defaults or saved values too."""
    ignored = {}
    if config.dataset not in FILE_DATASETS:
        ignored["data_path"] = "dataset"
    if config.dataset not in DIRECTORY_DATASETS:
        ignored["data_dir"] = "dataset"
    if config.optimizer not in ("momentum", "nesterov", "rmsprop"):
        ignored["momentum"] = "optimizer"
    if config.schedule != "warmup_cosine":
        ignored["warmup_epochs"] = "schedule"
    if config.schedule not in ("cosine", "warmup_cosine"):
        ignored["schedule_epochs"] = "schedule"
    if config.schedule != "exponential":
        ignored["decay_rate"] = "schedule"
    if config.weight_decay == 0:
        ignored["decay_norms_and_biases"] = "weight_decay"
    if config.dp_clip is not None:  # per-layer norms of a DP run's gradients would leak what the noise hides
        ignored["log_grad_norms"] = "dp_clip"
    if config.dataset not in STREAMED_DATASETS:
        ignored.update(dict.fromkeys(("image_size", "data_workers", "skip_bad_files"), "dataset"))
    return ignored
