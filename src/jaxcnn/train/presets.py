"""Named recipes: ``jaxcnn train --preset NAME`` lays a set of :class:`~jaxcnn.train.Config` values under the
flags given (a flag given wins), over the defaults. A preset only starts runs: a resumed run keeps its saved
config (see :func:`jaxcnn._train_flags.resolve`).

In Python, ``PRESETS["imagenet-resnet50"].config(data_dir="/data/imagenet")`` is the run's config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxcnn._validate import is_int
from jaxcnn.train.config import Config


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named set of :class:`Config` values.

    Attributes:
      name: what ``--preset`` takes.
      summary: one line for ``jaxcnn train --help``.
      values: field -> value; fields not named keep their defaults.
      reference_batch: when set, the learning rate follows the linear scaling rule (Goyal et al. 2017):
        ``values["learning_rate"] * batch_size / reference_batch`` for whatever batch size the run has, unless
        the learning rate is given.
    """

    name: str
    summary: str
    values: Mapping[str, Any]
    reference_batch: int | None = None

    def fields(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The preset's field values with ``given`` (field -> value) over them, the learning rate scaled to the
        batch size by :attr:`reference_batch` when ``given`` sets no learning rate."""
        fields = {**self.values, **given}
        batch = fields.get("batch_size", Config.batch_size)
        scaled = self.reference_batch is not None and "learning_rate" not in given
        if scaled and is_int(batch) and batch >= 1:  # a bad batch size is the Config's to refuse
            fields["learning_rate"] = self.scaled_learning_rate(batch)
        return fields

    def scaled_learning_rate(self, batch_size: int) -> float:
        """The preset's learning rate for ``batch_size``: ``learning_rate * batch_size / reference_batch`` (its
        ``learning_rate`` as it is without a :attr:`reference_batch`)."""
        rate = self.values.get("learning_rate", Config.learning_rate)
        if self.reference_batch is None:
            return rate
        return rate * batch_size / self.reference_batch

    def config(self, **given: Any) -> Config:
        """The run's :class:`Config`: the preset's values with ``given`` over them (and the scaled rate)."""
        return Config(**self.fields(given))


IMAGENET_RESNET50 = Preset(
    name="imagenet-resnet50",
    summary="ResNet-50 on an image folder at 224, bf16, SGD Nesterov lr 0.1 x batch/256, 5 warm-up epochs then "
    "cosine, label smoothing 0.1, weight decay 1e-4 on kernels only, 90 epochs",
    values={
        "model": "resnet50",
        "dataset": "folder",
        "image_size": 224,
        "batch_size": 256,
        "epochs": 90,
        "optimizer": "nesterov",
        "momentum": 0.9,
        "learning_rate": 0.1,
        "schedule": "warmup_cosine",
        "warmup_epochs": 5,
        "label_smoothing": 0.1,
        "weight_decay": 1e-4,
        "decay_norms_and_biases": False,
        "dtype": "bfloat16",
    },
    reference_batch=256,
)

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (IMAGENET_RESNET50,)}


def get(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
