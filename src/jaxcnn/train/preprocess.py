"""What a trained model expects of its input: the image shape, the raw scale and the standardisation.

A run's loader brought its images to ``[0, 1]`` by dividing them by a raw scale (16 for the 8x8 digits, whose
values are 0..16; 255 for 8-bit sources; 1 for floating-point npz images) and, with ``normalize`` on,
standardized each channel with the training set's mean and standard deviation. :class:`Preprocess` records
those numbers (saved in every checkpoint's metadata) and applies them to new images, so that a model in use
sees its inputs exactly as it saw them in training: the same bits for the same images.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxcnn.data import Dataset, standardize_with


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Maps raw images to a trained model's input: ``preprocess(images) -> (N, H, W, C) float32``.

    Attributes:
      input_shape: the model's image shape ``(H, W, C)``.
      raw_scale: the raw value of full intensity of the training images: float (and non-uint8 integer) inputs
        are divided by it. uint8 inputs are 8-bit pixels and always divided by 255, so a PNG of a digit in
        0..255 maps onto the digits' 0..16 scale.
      mean, std: per-channel ``(C,)`` statistics in the ``[0, 1]`` units, subtracted and divided by; None when
        the run did not standardize its images.
    """

    input_shape: tuple[int, int, int]
    raw_scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, images: Any, *, max_value: float | None = None) -> np.ndarray:
        """The model's input for raw ``images``.

        Args:
          images: ``(N, H, W, C)`` (or ``(N, H, W)`` for a one-channel model), uint8 pixels (0..255) or numbers on
            the training data's raw scale (``raw_scale``: 0..16 for the digits, 0..255 for MNIST and CIFAR-10).
          max_value: the raw value of full intensity of non-uint8 ``images``, instead of ``raw_scale`` (e.g. 1.0
            for float images in ``[0, 1]``).

        Returns:
          ``(N, H, W, C)`` float32, scaled to ``[0, 1]`` and standardized as in training.

        Raises:
          ValueError: a shape that does not fit ``input_shape``, a non-numeric dtype, a bad ``max_value``.
        """
        x = np.asarray(images)
        height, width, channels = self.input_shape
        if x.ndim == 3 and channels == 1:
            x = x[..., None]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(
                f"images of shape {tuple(x.shape)} do not fit the model: expected (N, {height}, {width}, {channels})"
                + (f" or (N, {height}, {width})" if channels == 1 else "")
            )
        return self.standardize(self.scale(x, max_value=max_value))

    def scale(self, images: np.ndarray, *, max_value: float | None = None) -> np.ndarray:
        """Raw ``images`` (any shape) as float32 in ``[0, 1]``: uint8 divided by 255, other numbers by
        ``max_value`` (default ``raw_scale``), the way the loaders do it (bit for bit). ValueError for a
        non-numeric dtype or a ``max_value`` that is not a positive number."""
        x = np.asarray(images)
        if x.dtype == np.uint8:
            return x.astype(np.float32) / 255
        if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise ValueError(f"images of dtype {x.dtype} cannot be scaled: expected uint8 pixels or numbers")
        scale = self.raw_scale if max_value is None else max_value
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"max_value must be a positive number, got {scale!r}")
        if scale == 1:
            return x.astype(np.float32)
        with np.errstate(over="ignore"):
            return (x.astype(np.float64) / float(scale)).astype(np.float32)

    def standardize(self, images: np.ndarray) -> np.ndarray:
        """``(N, H, W, C)`` images in ``[0, 1]`` units standardized with the training statistics (float32)."""
        x = np.asarray(images, np.float32)
        if self.mean is None or self.std is None:
            return x
        return standardize_with(x, np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (saved in the checkpoint metadata under ``"preprocess"``)."""
        return {
            "input_shape": list(self.input_shape),
            "raw_scale": self.raw_scale,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    @classmethod
    def from_dict(cls, record: Any) -> Preprocess:
        """The :class:`Preprocess` of a :meth:`to_dict` record; ValueError names what is malformed."""
        if not isinstance(record, dict):
            raise ValueError("the preprocess record is not an object")
        shape = record.get("input_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(_positive_int(v) for v in shape)):
            raise ValueError(f"the preprocess input_shape {shape!r} is not three positive integers")
        scale = record.get("raw_scale")
        if not _positive_number(scale):
            raise ValueError(f"the preprocess raw_scale {scale!r} is not a positive number")
        stats = {}
        for name in ("mean", "std"):
            value = record.get(name)
            if value is not None and not (
                isinstance(value, list)
                and len(value) == shape[-1]
                and all(_number(v) and (name == "mean" or v > 0) for v in value)
            ):
                raise ValueError(f"the preprocess {name} {value!r} is not {shape[-1]} finite numbers")
            stats[name] = None if value is None else tuple(float(v) for v in value)
        if (stats["mean"] is None) != (stats["std"] is None):
            raise ValueError("the preprocess record has a mean without a std, or a std without a mean")
        return cls(tuple(int(v) for v in shape), float(scale), stats["mean"], stats["std"])

    @classmethod
    def of_dataset(cls, dataset: Dataset) -> Preprocess:
        """The preprocessing that gave ``dataset`` its images (a loader's raw scale, :func:`standardize`'s stats)."""
        return cls(tuple(dataset.input_shape), float(dataset.raw_scale), dataset.mean, dataset.std)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_number(value: Any) -> bool:
    return _number(value) and value > 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
