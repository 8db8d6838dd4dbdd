"""The :class:`Dataset` container, :class:`DataError`, the checks every loader shares, and :func:`standardize`."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# rows processed at a time by :func:`standardize`, so that no float64 copy of a whole image set is made
_CHUNK = 4096


class DataError(ValueError):
    """A data set that cannot be loaded or used as given: a missing or malformed file, or bad values.

    The message is always a single line naming the problem and the file or directory involved (line breaks
    in a wrapped message, e.g. one from :mod:`gzip` or :mod:`numpy`, are folded into spaces).
    """

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """An image classification data set held on the host as NumPy arrays.

    Attributes:
        name: The data set's name (one of :data:`jaxcnn.data.DATASETS`).
        x_train: Training images, ``(N, H, W, C)`` float32 with ``C >= 1`` (NHWC).
        y_train: Training labels, ``(N,)`` int32 in ``[0, num_classes)``.
        x_test: Test images, ``(M, H, W, C)`` float32, the same ``(H, W, C)`` as ``x_train``.
        y_test: Test labels, ``(M,)`` int32 in ``[0, num_classes)``.
        num_classes: The number of classes.
        raw_scale: The raw value of full intensity that the loader divided the images by to bring them to
            ``[0, 1]``: 16 for ``digits`` (values 0..16), 255 for 8-bit sources (MNIST, CIFAR-10, uint8 npz
            images), 1 for images that were already floating point. Predicting on new raw images divides
            them by the same value (:func:`jaxcnn.train.load_model`).
        mean: The per-channel means ``(C,)`` that :func:`standardize` subtracted (in the ``[0, 1]`` units), or
            None if the images were not standardized.
        std: The per-channel standard deviations ``(C,)`` that :func:`standardize` divided by, or None.

    Equality is identity (comparing arrays elementwise has no single truth value), and the ``repr`` shows
    shapes only, never the arrays.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    raw_scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x_train, y_train)``: images ``(N, H, W, C)`` and labels ``(N,)``."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x_test, y_test)``: images ``(M, H, W, C)`` and labels ``(M,)``."""
        return self.x_test, self.y_test

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape ``(H, W, C)`` of one image."""
        height, width, channels = self.x_train.shape[1:]
        return int(height), int(width), int(channels)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"num_classes={self.num_classes})"
        )


def _check_split(source: str, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """Structure of one split: ranks, sizes, non-emptiness, label dtype."""
    if x.ndim != 4 or min(x.shape[1:]) < 1:
        raise DataError(f"{source}: x_{split} has shape {x.shape}; expected (N, H, W, C) with H, W, C >= 1")
    if y.ndim != 1:
        raise DataError(f"{source}: y_{split} has shape {y.shape}; expected (N,)")
    if len(x) != len(y):
        raise DataError(f"{source}: x_{split} holds {len(x)} images but y_{split} holds {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{source}: the {split} set is empty")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: y_{split} has dtype {y.dtype}; labels must be integers")


def check_labels(labels: object, num_classes: int, *, what: str = "labels") -> np.ndarray:
    """Integer class labels ``(N,)`` on the host, each in ``[0, num_classes)``; the check a train or eval entry
    point makes before its jit-compiled step, which cannot check them without a host sync (there, a label of
    -5 wraps around to a plausible loss and one of ``num_classes`` or more gives NaN).

    Args:
        labels: ``(N,)`` integer labels (any array-like; a device array is copied to the host).
        num_classes: The number of classes, e.g. the model's number of outputs.
        what: What the labels are, for the message (``"y_train"``, ``"test labels"``).

    Returns:
        ``labels`` as a NumPy array.

    Raises:
        DataError: Labels that are not integers of shape ``(N,)``, or the first label out of range, naming it,
            its index and the valid range.
    """
    values = np.asarray(labels)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{what} must be integer class indices of shape (N,), got {values.dtype} {values.shape}")
    if values.size:
        low, high = values.min(), values.max()
        if low < 0 or high >= num_classes:
            index = int(np.argmin(values)) if low < 0 else int(np.argmax(values))
            raise DataError(
                f"{what} must lie in [0, {num_classes}) (the model's {num_classes} outputs); "
                f"found {values[index]} at index {index}"
            )
    return values


def _check_values(source: str, split: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    """Values of one split: labels in ``[0, num_classes)``, images finite."""
    if y.min() < 0:
        index = int(np.argmin(y))
        raise DataError(f"{source}: y_{split} holds a negative label {y[index]} (at index {index})")
    if y.max() >= num_classes:
        index = int(np.argmax(y))
        raise DataError(
            f"{source}: y_{split} holds label {y[index]} (at index {index}), not below num_classes={num_classes}"
        )
    finite = np.isfinite(x)
    if not finite.all():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), x.shape))
        raise DataError(f"{source}: x_{split} holds NaN or Inf values (first at index {first})")


def _validate(
    name: str,
    source: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> Dataset:
    """The checks every loader ends with; builds the :class:`Dataset`.

    Args:
        name: The data set's name, stored in the result.
        source: What the data came from (a data set name, a file or directory), prefixed to error messages.
        x_train: Training images ``(N, H, W, C)``, floating point (cast to float32 here) or uint8 (kept).
        y_train: Training labels ``(N,)``, any integer dtype (range-checked before the cast to int32).
        x_test: Test images ``(M, H, W, C)``, floating point.
        y_test: Test labels ``(M,)``, any integer dtype.
        num_classes: The number of classes, a positive integer.

    Returns:
        The data set, images float32 and labels int32, C-contiguous.

    Raises:
        DataError: Bad ranks or sizes, an empty split, image and label counts that differ, non-integer or
            out-of-range labels, NaN or Inf in the images (also from a float64 value too large for float32),
            or train and test images of different ``(H, W, C)``.
    """
    splits = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y)
        _check_split(source, split, x, y)
        if x.dtype == np.uint8:  # 8-bit pixels kept as they are (load(..., uint8=True))
            x = np.ascontiguousarray(x)
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                x = np.ascontiguousarray(x, dtype=np.float32)
        splits[split] = x, y
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise DataError(f"{source}: num_classes must be a positive integer, got {num_classes!r}")
    for split, (x, y) in splits.items():
        _check_values(source, split, x, y, int(num_classes))
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{source}: train images are {x_train.shape[1:]} (H, W, C) but test images are {x_test.shape[1:]}"
        )
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=np.ascontiguousarray(y_train, dtype=np.int32),
        x_test=x_test,
        y_test=np.ascontiguousarray(y_test, dtype=np.int32),
        num_classes=int(num_classes),
    )


def with_stats(dataset: Dataset) -> Dataset:
    """A uint8 data set with the per-channel ``mean`` and ``std`` (in ``[0, 1]`` units, of the training images
    divided by 255) recorded but not applied: the consumer standardises, e.g. a train step on the device."""
    mean, std = channel_stats(dataset.x_train)
    return dataclasses.replace(
        dataset, mean=tuple(float(v) for v in mean / 255), std=tuple(float(v) for v in std / 255)
    )


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of ``x`` ``(N, H, W, C)``, accumulated in float64.

    A constant channel gets its value as the mean (exactly) and a standard deviation of 1, so that it
    standardizes to exact zeros. Returns two ``(C,)`` float64 arrays.
    """
    channels = x.shape[-1]
    count = x.size // channels
    if count == 0:
        raise DataError("cannot standardize: the training set is empty")
    total = np.zeros(channels)
    low = np.full(channels, np.inf)
    high = np.full(channels, -np.inf)
    for start in range(0, len(x), _CHUNK):
        chunk = x[start : start + _CHUNK]
        total += chunk.sum(axis=(0, 1, 2), dtype=np.float64)
        low = np.minimum(low, chunk.min(axis=(0, 1, 2)))
        high = np.maximum(high, chunk.max(axis=(0, 1, 2)))
    constant = low == high
    mean = np.where(constant, low, total / count)
    squares = np.zeros(channels)
    for start in range(0, len(x), _CHUNK):
        deviation = x[start : start + _CHUNK].astype(np.float64) - mean
        squares += (deviation * deviation).sum(axis=(0, 1, 2))
    std = np.sqrt(squares / count)
    std = np.where(constant | (std == 0), 1.0, std)
    return mean, std


def standardize_with(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per channel, in float64, stored as float32; ``x`` ``(N, H, W, C)``."""
    out = np.empty(x.shape, np.float32)
    for start in range(0, len(x), _CHUNK):
        out[start : start + _CHUNK] = (x[start : start + _CHUNK].astype(np.float64) - mean) / std
    return out


def standardize(dataset: Dataset) -> Dataset:
    """Standardizes each channel to mean 0 and standard deviation 1, using statistics of the training images.

    The per-channel mean and (population) standard deviation are computed over the training images
    ``(N, H, W, C)`` with float64 accumulation, then applied to both the training and the test images.
    A constant channel (standard deviation 0) is only centred, to exact zeros, never divided by zero.

    The statistics are recorded in the result's ``mean`` and ``std`` (composed with earlier ones when
    ``dataset`` was standardized already), so that a trained model can be fed new images the same way.

    Args:
        dataset: The data set; its labels are passed through unchanged.

    Returns:
        A new :class:`Dataset` with float32 images of the same shapes.
    """
    mean, std = channel_stats(dataset.x_train)
    total_mean, total_std = mean, std
    if dataset.mean is not None and dataset.std is not None:  # ((x - m1) / s1 - m2) / s2 = (x - m1 - s1 m2) / (s1 s2)
        first_mean, first_std = np.asarray(dataset.mean, np.float64), np.asarray(dataset.std, np.float64)
        total_mean, total_std = first_mean + first_std * mean, first_std * std
    return dataclasses.replace(
        dataset,
        x_train=standardize_with(dataset.x_train, mean, std),
        x_test=standardize_with(dataset.x_test, mean, std),
        mean=tuple(float(value) for value in total_mean),
        std=tuple(float(value) for value in total_std),
    )
