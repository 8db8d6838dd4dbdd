"""Image folders: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (the ImageFolder convention), indexed once.

:func:`image_folder` scans both splits and checks every file's header (in threads, no full decode), and returns an
:class:`ImageFolder`: the class names (the sorted folder names of ``train``; ``val`` reuses that mapping) and one
:class:`FolderIndex` per split. An index holds its files as NumPy arrays, not Python objects: the relative paths
as one UTF-8 byte buffer with offsets, the labels as int32, the sizes as int64. 1.28 million ImageNet files take
about 60 MB, and the arrays pickle as a few buffers into every worker process of the stream
(:mod:`jaxcnn.data.stream`).

Every file in a class folder (and its subfolders) counts, except hidden ones (a name starting with ``.``): a
stray ``notes.txt`` is reported as "not an image" rather than silently skipped. A bad file (unreadable, empty,
not an image, a corrupt header, a truncated JPEG or PNG) makes :func:`image_folder` raise :class:`BadFilesError`
naming how many and the first few with their reasons, unless ``skip_bad_files`` leaves them out (they are then
listed in :attr:`ImageFolder.bad_files`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxcnn.data._dataset import DataError

SPLITS = ("train", "val")
SHOWN_BAD = 5  # how many bad files an error message names
STATS_SAMPLE = 256  # images decoded (evaluation transform) to estimate the channel statistics
ANNOUNCED = 10_000  # a split at least this large is announced before its header check (about 1 s per 10,000 files)


class BadFilesError(DataError):
    """Files in an image folder that cannot be used: ``bad`` lists each as ``(path, reason)``."""

    def __init__(self, bad: Sequence[tuple[str, str]], *, hint: str = "pass --skip-bad-files to leave them out"):
        self.bad = list(bad)
        shown = "; ".join(f"{path}: {reason}" for path, reason in self.bad[:SHOWN_BAD])
        more = f"; and {len(self.bad) - SHOWN_BAD} more" if len(self.bad) > SHOWN_BAD else ""
        count = f"{len(self.bad)} bad image file{'s' if len(self.bad) != 1 else ''}"
        super().__init__(f"{count} ({hint}): {shown}{more}")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class FolderIndex:
    """The files of one split, as arrays.

    Attributes:
      root: the split's directory (``ROOT/train``).
      offsets: ``(N + 1,)`` int64: file ``i``'s relative path is ``blob[offsets[i]:offsets[i + 1]]``.
      blob: ``(B,)`` uint8: the relative paths (``"<class>/<name>"``), UTF-8 (undecodable bytes escaped).
      labels: ``(N,)`` int32 class ids.
      sizes: ``(N,)`` int64 file sizes in bytes.
    """

    root: Path
    offsets: np.ndarray
    blob: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def relative(self, i: int) -> str:
        """File ``i``'s path relative to :attr:`root`."""
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.blob[start:stop].tobytes().decode("utf-8", "surrogateescape")

    def path(self, i: int) -> str:
        """File ``i``'s full path."""
        return os.path.join(self.root, self.relative(i))

    def read(self, i: int) -> bytes:
        """File ``i``'s bytes."""
        with open(self.path(i), "rb") as file:
            return file.read()

    def digest(self) -> str:
        """A SHA-256 of the index (relative paths, labels, sizes): the same files in the same classes give the
        same digest wherever the folder lives."""
        digest = hashlib.sha256()
        for array in (self.offsets, self.blob, self.labels, self.sizes):
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def class_counts(self, num_classes: int) -> np.ndarray:
        """``(num_classes,)`` int64: the number of files of each class."""
        return np.bincount(self.labels, minlength=num_classes)

    def __repr__(self) -> str:
        return f"FolderIndex({str(self.root)!r}, {len(self)} files)"

    @classmethod
    def of(cls, root: Path, files: Sequence[tuple[str, int, int]]) -> FolderIndex:
        """An index of ``files`` given as ``(relative path, label, size)`` triples."""
        encoded = [name.encode("utf-8", "surrogateescape") for name, _, _ in files]
        offsets = np.zeros(len(files) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), np.uint8).copy()
        labels = np.asarray([label for _, label, _ in files], np.int32)
        sizes = np.asarray([size for _, _, size in files], np.int64)
        return cls(Path(root), offsets, blob, labels, sizes)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ImageFolder:
    """An image folder data set: both splits indexed, read and decoded only when streamed.

    Attributes:
      root: the folder (holding ``train`` and ``val``).
      classes: the class names, sorted; class id ``k`` is ``classes[k]``.
      train, val: the :class:`FolderIndex` of each split.
      image_size: the side of the square images the stream produces (``(S, S, 3)`` uint8).
      bad_files: ``(path, reason)`` of every file left out (with ``skip_bad_files``).
      mean, std: per-channel ``(3,)`` statistics in ``[0, 1]`` units, estimated from up to 256 training images
        (evenly spaced in the index, evaluation transform): the device standardises every batch with them; None
        when not standardising.
    """

    root: Path
    classes: tuple[str, ...]
    train: FolderIndex
    val: FolderIndex
    image_size: int
    bad_files: tuple[tuple[str, str], ...] = ()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    name = "folder"
    raw_scale = 255.0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def y_train(self) -> np.ndarray:
        """``(N,)`` int32: the training labels."""
        return self.train.labels

    @property
    def y_test(self) -> np.ndarray:
        """``(M,)`` int32: the ``val`` labels (the run's test split)."""
        return self.val.labels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(S, S, 3)``: every image comes out RGB at ``image_size``."""
        return self.image_size, self.image_size, 3

    def digest(self) -> str:
        """A SHA-256 of both indexes and the class names (a resumed run must see the same files)."""
        digest = hashlib.sha256("\n".join(self.classes).encode("utf-8", "surrogateescape"))
        digest.update(self.train.digest().encode())
        digest.update(self.val.digest().encode())
        return digest.hexdigest()

    def with_stats(self, normalize: bool) -> ImageFolder:
        """This folder with :attr:`mean` and :attr:`std` estimated (``normalize``) or cleared."""
        if not normalize:
            return dataclasses.replace(self, mean=None, std=None)
        mean, std = sample_stats(self.train, self.image_size)
        return dataclasses.replace(self, mean=mean, std=std)

    def __repr__(self) -> str:
        return (
            f"ImageFolder({str(self.root)!r}, {self.num_classes} classes, train={len(self.train)}, "
            f"val={len(self.val)}, image_size={self.image_size})"
        )


def image_folder(
    root: str | os.PathLike,
    *,
    image_size: int = 224,
    skip_bad_files: bool = False,
    normalize: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> ImageFolder:
    """Index ``root/train/<class>/*`` and ``root/val/<class>/*`` and check every file's header.

    Args:
      root: the folder holding ``train`` (required) and ``val`` (required too: it is what the run is evaluated on).
      image_size: the side of the square RGB images the stream makes, ``(S, S, 3)`` uint8 (>= 8).
      skip_bad_files: leave out files that fail the header check (listed in ``bad_files``, said through
        ``log``) instead of raising :class:`BadFilesError`.
      normalize: estimate per-channel mean and std from a sample of training images (see :class:`ImageFolder`).
      threads: threads for the header check (default: 4 per CPU, at most 32).
      log: called with a line about skipped files, and before the header check of a split of 10,000 files or more.

    Returns:
      an :class:`ImageFolder`.

    Raises:
      DataError: a missing root, no ``train`` or ``val`` folder, no class folders, an empty class, a ``val``
        class that ``train`` lacks, no images at all; :class:`BadFilesError` for bad files without
        ``skip_bad_files``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 8:
        raise DataError(f"image_size must be an int >= 8, got {image_size!r}")
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"image folder {base} does not exist" if not base.exists() else f"{base} is not a directory")
    splits = {split: _class_folders(base / split) for split in SPLITS}
    classes = tuple(sorted(splits["train"]))
    unknown = sorted(set(splits["val"]) - set(classes))
    if unknown:
        raise DataError(
            f"{base / 'val'} has class folder {unknown[0]!r} that {base / 'train'} lacks "
            f"({len(unknown)} such); val must use the training classes"
        )
    label_of = {name: k for k, name in enumerate(classes)}
    indexes, bad = {}, []
    for split in SPLITS:
        files = _list_files(base / split, sorted(splits[split]), label_of)
        if log is not None and len(files) >= ANNOUNCED:  # minutes for a million files: say what is going on
            log(f"indexing {base / split}: checking the headers of {len(files):,} files")
        good, bad_here = _check_headers(base / split, files, threads)
        bad.extend(bad_here)
        indexes[split] = FolderIndex.of(base / split, good)
    if bad and not skip_bad_files:
        raise BadFilesError(bad)
    if bad and log is not None:
        log(f"skipping {len(bad)} bad image file{'s' if len(bad) != 1 else ''} (first: {bad[0][0]}: {bad[0][1]})")
    _check_nonempty(base, classes, indexes, splits["val"])
    folder = ImageFolder(base, classes, indexes["train"], indexes["val"], int(image_size), tuple(bad))
    return folder.with_stats(normalize)


def _class_folders(directory: Path) -> list[str]:
    if not directory.is_dir():
        raise DataError(f"image folder {directory.parent} has no {directory.name} folder ({directory} is missing)")
    try:
        names = [entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith(".")]
    except OSError as error:
        raise DataError(f"cannot read {directory}: {error.strerror or error}") from None
    if not names:
        raise DataError(f"{directory} has no class folders (expected {directory}/<class>/<image files>)")
    return names


def _list_files(directory: Path, classes: list[str], label_of: dict[str, int]) -> list[tuple[str, int]]:
    """``(relative path, label)`` of every non-hidden file under each class folder, sorted within a class."""
    files = []
    for name in classes:
        found = []
        for parent, folders, names in os.walk(directory / name, onerror=_raise_walk_error, followlinks=True):
            folders[:] = sorted(f for f in folders if not f.startswith("."))
            rel = os.path.relpath(parent, directory)
            found.extend(os.path.join(rel, n) for n in names if not n.startswith("."))
        files.extend((path, label_of[name]) for path in sorted(found))
    return files


def _raise_walk_error(error: OSError) -> None:
    raise DataError(f"cannot read {error.filename}: {error.strerror or error}")


def _check_headers(
    directory: Path, files: list[tuple[str, int]], threads: int | None
) -> tuple[list[tuple[str, int, int]], list[tuple[str, str]]]:
    """The files that pass :func:`jaxcnn.data.images.probe` as ``(path, label, size)``, and the others as
    ``(full path, reason)``."""
    from jaxcnn.data import images

    paths = [os.path.join(directory, path) for path, _ in files]
    results = images.probe_many(paths, threads=threads)
    good, bad = [], []
    for (path, label), full, result in zip(files, paths, results, strict=True):
        if isinstance(result, images.BadImageError):
            bad.append((full, result.reason))
        else:
            good.append((path, label, os.path.getsize(full)))
    return good, bad


def _check_nonempty(base: Path, classes: tuple[str, ...], indexes: dict[str, FolderIndex], val: list[str]) -> None:
    counts = indexes["train"].class_counts(len(classes))
    if counts.sum() == 0:
        raise DataError(f"{base / 'train'} holds no images")
    empty = [name for name, count in zip(classes, counts, strict=True) if count == 0]
    if empty:
        raise DataError(f"class folder {base / 'train' / empty[0]} has no images ({len(empty)} empty class(es))")
    if len(indexes["val"]) == 0:
        raise DataError(f"{base / 'val'} holds no images")


def sample_stats(index: FolderIndex, image_size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std ``((3,), (3,))`` in ``[0, 1]`` units of up to :data:`STATS_SAMPLE` images evenly
    spaced over ``index``, each through the evaluation transform (deterministic: no randomness involved)."""
    from jaxcnn.data import images

    picks = np.unique(np.linspace(0, len(index) - 1, min(STATS_SAMPLE, len(index))).round().astype(np.int64))
    sums, squares, count = np.zeros(3), np.zeros(3), 0
    for i in picks:
        try:
            pixels = images.eval_image(index.read(int(i)), image_size, path=index.path(int(i)))
        except (OSError, images.BadImageError):
            continue  # a file that fails to decode is the stream's to report, with the run's policy
        values = pixels.reshape(-1, 3).astype(np.float64) / 255
        sums += values.sum(0)
        squares += np.square(values).sum(0)
        count += len(values)
    if count == 0:
        raise DataError(f"none of the {len(picks)} sampled images of {index.root} could be decoded")
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    std = np.where(std > 1e-3, std, 1.0)  # a constant channel (grayscale photos' copies are not constant)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
