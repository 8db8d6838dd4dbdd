"""The loaders behind :func:`load`, one per data set name."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn._memory import device_bytes, too_large
from jaxcnn.data import _formats
from jaxcnn.data._dataset import DataError, Dataset, _validate, standardize, with_stats

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "cifar10", "npz", "synthetic")

DIGITS_TEST_SIZE = 360  # of 1,797 images: ~20%, a fixed stratified split
SYNTHETIC_NOISE = 0.3  # standard deviation of the Gaussian noise around each class prototype
MAX_LABEL = 2**31 - 1  # labels are int32 in [0, num_classes), so num_classes <= 2**31 - 1

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def load(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
    normalize: bool = True,
    seed: int = 0,
    shape: tuple[int, int, int] = (28, 28, 1),
    num_classes: int = 10,
    sizes: tuple[int, int] = (1024, 256),
    uint8: bool = False,
) -> Dataset:
    """Loads a data set by name, from local files or from data shipped with scikit-learn; never the network.

    Images come out float32 in ``[0, 1]`` (bytes divided by 255, ``digits``' 0..16 by 16; ``npz`` float
    images as they are), then, when ``normalize``, standardized per channel with :func:`standardize`.
    Labels come out int32 in ``[0, num_classes)``.

    Args:
        name: One of :data:`DATASETS`:

            * ``"digits"`` -- scikit-learn's 1,797 8x8 digit images ``(N, 8, 8, 1)``, a fixed stratified
              split of 1,437 training and 360 test images (the same whatever ``seed``).
            * ``"mnist"``, ``"fashion_mnist"`` -- the four IDX files in ``data_dir``
              (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
              ``t10k-labels-idx1-ubyte``; raw or ``.gz``; ``.idx3-`` also accepted for ``-idx3-``):
              ``(N, H, W, 1)``, 28x28 for the real sets.
            * ``"cifar10"`` -- the binary version: ``data_batch_K.bin`` (those present, at least one) and
              ``test_batch.bin`` in ``data_dir`` or ``data_dir/cifar-10-batches-bin``: ``(N, 32, 32, 3)``.
            * ``"npz"`` -- the ``.npz`` file ``data_path`` with arrays ``x_train``, ``y_train``, ``x_test``,
              ``y_test`` and optionally a scalar ``num_classes``. Images ``(N, H, W)`` (given a channel axis)
              or ``(N, H, W, C)``, uint8 (divided by 255) or floating (kept); labels ``(N,)`` or ``(N, 1)``,
              integers or integral floats. Without ``num_classes``, the largest label plus one.
            * ``"synthetic"`` -- random but learnable images: one fixed random prototype per class plus
              Gaussian noise, clipped to ``[0, 1]``; deterministic for ``seed``.
        data_dir: The directory of the IDX or CIFAR-10 files.
        data_path: The ``.npz`` file.
        normalize: Whether to standardize the images with the training set's per-channel statistics.
        seed: Seed of the ``synthetic`` set (the other sets do not depend on it).
        shape: Image shape ``(H, W, C)`` of the ``synthetic`` set.
        num_classes: Number of classes of the ``synthetic`` set (at least 2).
        sizes: ``(n_train, n_test)`` of the ``synthetic`` set.
        uint8: keep 8-bit images (MNIST, Fashion-MNIST, CIFAR-10, uint8 npz) as uint8 ``0..255``, a quarter of
            the memory: nothing is divided or standardized on the host, ``raw_scale`` is 255 and, with
            ``normalize``, ``mean`` and ``std`` hold the statistics (in ``[0, 1]`` units) for the consumer to
            apply: ``(x / 255 - mean) / std`` (what :class:`jaxcnn.train.step.InputScaling` does in a train
            step). Other images come out as without it.

    Returns:
        The :class:`Dataset`.

    Raises:
        DataError: An unknown name, a missing or malformed file, or bad values (see the module docstring).
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    if name == "digits":
        dataset = _load_digits()
    elif name in ("mnist", "fashion_mnist"):
        dataset = _load_idx(name, data_dir, uint8)
    elif name == "cifar10":
        dataset = _load_cifar10(data_dir, uint8)
    elif name == "npz":
        dataset = _load_npz(data_path, uint8)
    else:
        dataset = _load_synthetic(seed, shape, num_classes, sizes)
    if dataset.x_train.dtype == np.uint8:
        return with_stats(dataset) if normalize else dataset
    return standardize(dataset) if normalize else dataset


def _stratified_test_indices(labels: np.ndarray, test_size: int, seed: int) -> np.ndarray:
    """Sorted indices of a test set of ``test_size`` drawn per class, in proportion to each class's count.

    Quotas are rounded by largest remainder, so that they sum to ``test_size`` exactly; within each class
    the members are drawn by a ``np.random.default_rng(seed)`` permutation.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * test_size / len(labels)
    take = np.floor(quotas).astype(int)
    by_remainder = np.argsort(-(quotas - take), kind="stable")
    take[by_remainder[: test_size - take.sum()]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(chosen))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits: pixels ``(1797, 64)`` float64 in 0..16 and labels ``(1797,)`` int.

    Read straight from the file scikit-learn ships (what ``load_digits`` reads), without importing scikit-learn,
    which takes about a second; through ``load_digits`` where the file is not where it used to be.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def _load_digits() -> Dataset:
    pixels, labels = _digits_arrays()
    images = pixels.reshape(-1, 8, 8, 1) / 16.0
    labels = np.asarray(labels)
    test = _stratified_test_indices(labels, DIGITS_TEST_SIZE, seed=0)
    train = np.setdiff1d(np.arange(len(labels)), test)
    dataset = _validate("digits", "digits", images[train], labels[train], images[test], labels[test], 10)
    return dataclasses.replace(dataset, raw_scale=16.0)


def _load_idx(name: str, data_dir: str | os.PathLike | None, uint8: bool = False) -> Dataset:
    needs = "the four IDX files (raw or .gz): " + ", ".join(f for pair in _IDX_FILES.values() for f in pair)
    directory = _formats.check_directory(name, data_dir, needs)
    splits = {}
    for split, (images_stem, labels_stem) in _IDX_FILES.items():
        images_path = _formats.find_idx(name, directory, images_stem)
        labels_path = _formats.find_idx(name, directory, labels_stem)
        images = _formats.read_idx(images_path, ndim=3)
        labels = _formats.read_idx(labels_path, ndim=1)
        if len(images) != len(labels):
            raise DataError(
                f"{name}: '{images_path}' holds {len(images)} images but '{labels_path}' holds {len(labels)} labels"
            )
        splits[split] = (images[..., None] if uint8 else images[..., None].astype(np.float32) / 255), labels
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    return dataclasses.replace(
        _validate(name, f"{name} in '{directory}'", x_train, y_train, x_test, y_test, 10), raw_scale=255.0
    )


def _load_cifar10(data_dir: str | os.PathLike | None, uint8: bool = False) -> Dataset:
    directory = _formats.check_directory(
        "cifar10", data_dir, f"data_batch_K.bin and test_batch.bin (or a {_formats.CIFAR_SUBDIR} subdirectory)"
    )
    directory = _formats.find_cifar_dir(directory)
    parts = [_formats.read_cifar_batch(path) for path in _formats.cifar_train_files(directory)]
    x_train = np.concatenate([images for images, _ in parts])
    y_train = np.concatenate([labels for _, labels in parts])
    x_test, y_test = _formats.read_cifar_batch(directory / "test_batch.bin")
    if not uint8:
        x_train, x_test = x_train.astype(np.float32) / 255, x_test.astype(np.float32) / 255
    dataset = _validate("cifar10", f"cifar10 in '{directory}'", x_train, y_train, x_test, y_test, 10)
    return dataclasses.replace(dataset, raw_scale=255.0)


def _npz_images(path: Path, key: str, x: np.ndarray, uint8: bool = False) -> np.ndarray:
    """``(N, H, W)`` or ``(N, H, W, C)`` uint8 or floating images as float32 ``(N, H, W, C)`` (uint8 kept with
    ``uint8``)."""
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim != 4:
        raise DataError(f"'{path}': {key} has shape {x.shape}; expected (N, H, W) or (N, H, W, C)")
    if x.dtype == np.uint8:
        return x if uint8 else x.astype(np.float32) / 255
    if np.issubdtype(x.dtype, np.floating):
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes Inf, reported by _validate
            return x.astype(np.float32)
    raise DataError(
        f"'{path}': {key} has dtype {x.dtype}; images must be uint8 (divided by 255) or floating point (kept)"
    )


def _npz_labels(path: Path, key: str, y: np.ndarray) -> np.ndarray:
    """``(N,)`` or ``(N, 1)`` integer or integral float labels as an ``(N,)`` integer array."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"'{path}': {key} has shape {y.shape}; expected (N,) or (N, 1)")
    if np.issubdtype(y.dtype, np.integer):
        if y.size and y.max() >= MAX_LABEL:  # exact for every integer dtype (uint64 too); negatives: _validate
            index = int(np.argmax(y))
            raise DataError(
                f"'{path}': {key} holds label {y[index]} (at index {index}); labels are int32, below 2**31 - 1"
            )
        return y
    if not np.issubdtype(y.dtype, np.floating):
        raise DataError(f"'{path}': {key} has dtype {y.dtype}; labels must be integers (or integral floats)")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(y) | (y != np.round(y)) | (y < 0) | (y >= MAX_LABEL)
    if bad.any():
        index = int(np.argmax(bad))
        raise DataError(f"'{path}': {key} holds the non-integral or out-of-range label {y[index]} at index {index}")
    return y.astype(np.int64)


def _npz_num_classes(path: Path, value: np.ndarray) -> int:
    """The ``num_classes`` array of an ``.npz``: a positive integral scalar (or one-element array)."""
    integral = np.issubdtype(value.dtype, np.integer) or (
        np.issubdtype(value.dtype, np.floating) and value.size == 1 and float(value.flat[0]).is_integer()
    )
    if value.size != 1 or not integral or not 1 <= value.flat[0] <= MAX_LABEL:
        raise DataError(f"'{path}': num_classes must be a positive integer scalar below 2**31, got {value!r}")
    return int(value.flat[0])


def _load_npz(data_path: str | os.PathLike | None, uint8: bool = False) -> Dataset:
    if data_path is None:
        raise DataError("npz needs data_path: an .npz file with arrays x_train, y_train, x_test, y_test")
    path = Path(data_path)
    arrays = _formats.read_npz(path, _NPZ_ARRAYS, optional=("num_classes",))
    if arrays["x_train"].dtype != arrays["x_test"].dtype:
        uint8 = False  # one split of bytes and one of floats: both as float32
    x_train, x_test = (_npz_images(path, key, arrays[key], uint8) for key in ("x_train", "x_test"))
    y_train, y_test = (_npz_labels(path, key, arrays[key]) for key in ("y_train", "y_test"))
    if "num_classes" in arrays:
        num_classes = _npz_num_classes(path, arrays["num_classes"])
    else:
        num_classes = max(int(y.max(initial=0)) + 1 for y in (y_train, y_test))
    dataset = _validate("npz", f"npz file '{path}'", x_train, y_train, x_test, y_test, num_classes)
    return dataclasses.replace(dataset, raw_scale=255.0 if arrays["x_train"].dtype == np.uint8 else 1.0)


def _positive_ints(value: object, length: int) -> bool:
    return (
        isinstance(value, tuple | list)
        and len(value) == length
        and all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in value)
    )


@functools.partial(jax.jit, static_argnames=("shape", "num_classes", "sizes"))
def _synthetic_arrays(
    key: jax.Array, shape: tuple[int, int, int], num_classes: int, sizes: tuple[int, int]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(x_train, y_train, x_test, y_test)``: images ``(n, *shape)`` float32, labels ``(n,)`` int32.

    One compiled function (random-number kernels are slow to compile one by one), cached per configuration.
    """
    prototypes = jax.random.uniform(jax.random.fold_in(key, 0), (num_classes, *shape), dtype=jnp.float32)
    arrays = []
    for fold, n in enumerate(sizes, start=1):
        label_key, noise_key = jax.random.split(jax.random.fold_in(key, fold))
        labels = jax.random.permutation(label_key, jnp.arange(n, dtype=jnp.int32) % num_classes)
        noise = jax.random.normal(noise_key, (n, *shape), dtype=jnp.float32)
        arrays += [jnp.clip(prototypes[labels] + SYNTHETIC_NOISE * noise, 0.0, 1.0), labels]
    return tuple(arrays)


def _load_synthetic(seed: int, shape: tuple[int, int, int], num_classes: int, sizes: tuple[int, int]) -> Dataset:
    """Class ``k``'s images are ``clip(prototype_k + 0.3 * noise, 0, 1)``, prototypes uniform on ``[0, 1]``.

    Prototypes, training and test draws use keys folded from ``jax.random.key(seed)`` (0, 1 and 2); labels
    are balanced (``arange(n) % num_classes``, shuffled), so every class appears once ``n >= num_classes``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise DataError(f"synthetic: seed must be an integer, got {seed!r}")
    if not _positive_ints(shape, 3):
        raise DataError(f"synthetic: shape must be three positive integers (H, W, C), got {shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 2:
        raise DataError(f"synthetic: num_classes must be an integer >= 2, got {num_classes!r}")
    if not _positive_ints(sizes, 2):
        raise DataError(f"synthetic: sizes must be two positive integers (n_train, n_test), got {sizes!r}")
    _check_synthetic_memory(tuple(int(s) for s in shape), int(num_classes), (int(sizes[0]), int(sizes[1])))
    arrays = _synthetic_arrays(
        jax.random.key(int(seed)), tuple(int(s) for s in shape), int(num_classes), (int(sizes[0]), int(sizes[1]))
    )
    x_train, y_train, x_test, y_test = (np.asarray(a) for a in arrays)
    return _validate("synthetic", "synthetic", x_train, y_train, x_test, y_test, int(num_classes))


def _check_synthetic_memory(shape: tuple[int, int, int], num_classes: int, sizes: tuple[int, int]) -> None:
    """Refuses, before anything is allocated, sizes whose float32 arrays would not fit in memory (or whose
    labels or counts would overflow int32), naming the argument."""
    limit = device_bytes()  # the arrays are drawn on the default device, then copied to the host
    image = 4 * math.prod(shape)
    counts = {"sizes[0] (n_train)": sizes[0], "sizes[1] (n_test)": sizes[1], "num_classes": num_classes}
    for name, count in counts.items():
        problem = too_large(count * image, limit)
        if problem:
            what = "prototypes" if name == "num_classes" else "images"
            raise DataError(f"synthetic: {name} = {count} {what} of shape {shape} as float32 {problem}")
    for name, count in counts.items():
        if count > MAX_LABEL:  # int32 labels and counts
            raise DataError(f"synthetic: {name} = {count}; at most 2**31 - 1")
