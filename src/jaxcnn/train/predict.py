"""Predicting with a trained model: images from files, the class and its probability per image.

:func:`read_images` reads PNG / JPEG (any 8-bit image Pillow reads), ``.npy`` and ``.npz`` files as raw
images of a model's input shape; :func:`predict` gives class probabilities; :func:`predict_files` does both
for a workdir (what ``jaxcnn predict`` runs), and :func:`write_predictions` saves the result as CSV or JSON.

Raw values: an image file and a uint8 array hold 8-bit pixels, 0..255; any other array holds numbers on the
training data's raw scale (``Preprocess.raw_scale``: 0..16 for the digits, 0..255 for MNIST and CIFAR-10, 1 for
floating-point npz images), unless ``max_value`` says otherwise. The images must look like the training ones
(the digits and MNIST are bright strokes on a black background).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcnn.train.checkpoint import _first_line
from jaxcnn.train.preprocess import Preprocess
from jaxcnn.train.restored import describe, preprocess_of, restore_run
from jaxcnn.train.workdir import write_atomically

ARRAY_SUFFIXES = (".npy", ".npz")


def read_images(
    path: str | os.PathLike, input_shape: Sequence[int], *, resize: bool = False, center_crop: bool = False
) -> list[tuple[str, np.ndarray, bool]]:
    """The raw images in one file, as ``[(name, images (n, H, W, C), indexed), ...]``.

    An image file gives one entry ``(path, (1, H, W, C) uint8, False)``, converted to grayscale or RGB for a
    model of 1 or 3 channels (and, with ``resize``, scaled to ``H x W``; with ``center_crop``, for a model
    trained on an image folder, any size goes through the folder's evaluation transform,
    :func:`jaxcnn.data.images.eval_image`: the shorter side to ``H / 0.875``, the centre ``H x H``).
    A ``.npy`` file gives one entry, an
    ``.npz`` one per array (named ``path:key``; ``path.npz:key`` reads that array alone). An array of shape
    ``(H, W, C)`` (or ``(H, W)`` for one channel) is a single image (``indexed`` False); ``(N, H, W, C)`` (or
    ``(N, H, W)``) holds N images (``indexed`` True: they are named by their index).

    Raises:
      ValueError: a missing, unreadable or corrupt file, or images of another shape, one line naming the file
        and the expected shape.
    """
    height, width, channels = (int(v) for v in input_shape)
    path = Path(path)
    key = None
    if not path.exists() and ":" in path.name:  # FILE.npz:KEY
        name, key = path.name.rsplit(":", 1)
        path = path.with_name(name)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not an image or array file")
    suffix = path.suffix.lower()
    if key is not None and suffix != ".npz":
        raise ValueError(f"{path}:{key}: only an .npz file has named arrays")
    if suffix == ".npy":
        return [_as_images(str(path), _load_npy(path), (height, width, channels))]
    if suffix == ".npz":
        return [_as_images(name, array, (height, width, channels)) for name, array in _load_npz(path, key)]
    if center_crop:
        return [(str(path), _center_crop(path, height)[None], False)]
    return [(str(path), _load_image(path, (height, width, channels), resize)[None], False)]


def _center_crop(path: Path, size: int) -> np.ndarray:
    """An image file through an image folder's evaluation transform: ``(size, size, 3)`` uint8."""
    from jaxcnn.data import images

    try:
        return images.eval_image(path.read_bytes(), size, path=path)
    except images.BadImageError as error:
        raise ValueError(str(error)) from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from None


def _load_npy(path: Path) -> np.ndarray:
    try:  # memory-mapped: the shape is checked before the data are read
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, OSError, EOFError ... for a corrupt file
        raise ValueError(f"{path}: not a readable .npy file ({_first_line(error)})") from None


def _load_npz(path: Path, key: str | None) -> list[tuple[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            if key is not None and key not in keys:
                raise KeyError(key)
            return [(f"{path}:{name}", np.asarray(archive[name])) for name in ([key] if key else keys)]
    except KeyError:
        raise ValueError(f"{path}: has no array {key!r} (it has: {', '.join(keys) or 'none'})") from None
    except Exception as error:
        raise ValueError(f"{path}: not a readable .npz file ({_first_line(error)})") from None


def _as_images(name: str, array: np.ndarray, shape: tuple[int, int, int]) -> tuple[str, np.ndarray, bool]:
    """``array`` as ``(n, H, W, C)`` images (see :func:`read_images`), its dtype and values checked."""
    height, width, channels = shape
    dims = tuple(array.shape)
    if dims == shape or (channels == 1 and dims == (height, width)):
        images, indexed = array.reshape(1, *shape), False
    elif len(dims) == 4 and dims[1:] == shape or (channels == 1 and len(dims) == 3 and dims[1:] == (height, width)):
        images, indexed = array.reshape(dims[0], *shape), True
    else:
        one = f"({height}, {width}, {channels})" + (f" or ({height}, {width})" if channels == 1 else "")
        many = f"(N, {height}, {width}, {channels})" + (f" or (N, {height}, {width})" if channels == 1 else "")
        raise ValueError(f"{name}: array of shape {dims} does not fit the model: expected one image {one} or {many}")
    if len(images) == 0:
        raise ValueError(f"{name}: holds no images (shape {dims})")
    kind = images.dtype
    if kind == np.bool_ or not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
        raise ValueError(f"{name}: array of dtype {kind}; images must be uint8 pixels or numbers")
    images = np.asarray(images)
    if np.issubdtype(kind, np.floating) and not np.isfinite(images).all():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmin(np.isfinite(images))), images.shape))
        raise ValueError(f"{name}: holds NaN or Inf values (first at index {first})")
    return name, images, indexed


def _load_image(path: Path, shape: tuple[int, int, int], resize: bool) -> np.ndarray:
    """One image file as ``(H, W, C)`` uint8."""
    from PIL import Image

    height, width, channels = shape
    if channels not in (1, 3):
        raise ValueError(f"{path}: the model takes {channels}-channel images; image files give 1 (gray) or 3 (RGB)")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(f"{path}: a {image.mode} (16-bit or float) image; save it as 8-bit, or as .npy")
            image = image.convert("L" if channels == 1 else "RGB")
    except ValueError:
        raise
    except Exception as error:  # UnidentifiedImageError, truncated files, decompression bombs ...
        raise ValueError(f"{path}: not a readable image file ({_first_line(error)})") from None
    if image.size != (width, height):
        if not resize:
            raise ValueError(
                f"{path}: the image is {image.width}x{image.height} (width x height), the model takes "
                f"{width}x{height}; resize it (--resize)"
            )
        shrink = image.width >= width and image.height >= height
        image = image.resize((width, height), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.asarray(image, np.uint8).reshape(height, width, channels)


def predict(
    model: Any, params: Any, model_state: Any, x: Any, *, ensemble: bool = False, batch_size: int = 256
) -> np.ndarray:
    """Class probabilities ``(N, classes)`` float32 of the model's input ``x`` ``(N, H, W, C)`` (already
    preprocessed), in inference mode; an ensemble (``params`` with a leading member axis) averages its
    members' probabilities."""
    x = np.asarray(x, np.float32)
    forward = _forward(model, ensemble)
    size = max(1, min(batch_size, len(x)))
    out = []
    for start in range(0, len(x), size):  # one shape for every call: the last batch is padded
        batch = x[start : start + size]
        padded = np.concatenate([batch, np.zeros((size - len(batch), *x.shape[1:]), np.float32)])
        out.append(np.asarray(forward(params, model_state, padded), np.float32)[: len(batch)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@functools.lru_cache(maxsize=8)
def _forward(model: Any, ensemble: bool) -> Any:
    """The jitted probabilities of ``model`` (kept per model: a second call compiles nothing)."""
    if ensemble:
        from jaxcnn.train.ensemble import ensemble_predictions

        return jax.jit(lambda p, s, batch: ensemble_predictions(model, p, s, batch)[1])
    return jax.jit(lambda p, s, batch: jax.nn.softmax(model.apply(p, s, batch, train=False)[0], axis=-1))


def predict_files(
    workdir: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    *,
    step: int | str | None = None,
    top: int = 1,
    resize: bool = False,
    max_value: float | None = None,
    batch_size: int = 256,
) -> tuple[list[dict[str, Any]], str]:
    """Predict the class of every image in ``paths`` with a checkpoint of ``workdir``.

    Args:
      workdir: a training workdir.
      paths: image files (PNG, JPEG ...), ``.npy`` and ``.npz`` files (see :func:`read_images`).
      step: which checkpoint (see :func:`jaxcnn.train.restore`; default: an early-stopped run's best).
      top: how many of the most probable classes to report per image (1..classes).
      resize: scale image files of another size to the model's (a run on an image folder takes files of any
        size through its evaluation transform, resize or not).
      max_value: the raw value of full intensity of non-uint8 arrays (default: the training data's raw scale).
      batch_size: images per compiled call.

    Returns:
      ``(rows, checkpoint)``: one dict per image, in the order of ``paths`` (``input``: the file, or ``file:key``
      for an npz array; ``index``: the image's index in an array of several, else None; ``class`` and
      ``probability``: the most probable class; ``top``: ``[{"class", "probability"}, ...]``, ``top`` long),
      and which checkpoint was used (``"checkpoint of epoch 6 (best test loss), step 90"``).
    """
    if not paths:
        raise ValueError("no input files")
    config, state, model, meta = restore_run(workdir, step=step)
    with jax.enable_x64(False):
        preprocess = preprocess_of(config, meta)
        classes = int(meta["num_classes"])
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= classes:
            raise ValueError(f"top must be in 1..{classes} (the model's classes), got {top!r}")
        crop = config.dataset == "folder"  # image files of any size, as the run evaluated its val images
        shape = preprocess.input_shape
        entries = [entry for path in paths for entry in read_images(path, shape, resize=resize, center_crop=crop)]
        x = np.concatenate([_model_input(preprocess, name, images, max_value) for name, images, _ in entries])
        probabilities = predict(
            model, state.params, state.model_state, x, ensemble=config.ensemble > 1, batch_size=batch_size
        )
    rows = []
    ids = [(name, i if indexed else None) for name, images, indexed in entries for i in range(len(images))]
    for (name, index), p in zip(ids, probabilities, strict=True):
        order = np.argsort(-p, kind="stable")[:top]
        best = [{"class": int(c), "probability": float(p[c])} for c in order]
        rows.append({"input": name, "index": index, **best[0], "top": best})
    return rows, describe(meta)


def _model_input(preprocess: Preprocess, name: str, images: np.ndarray, max_value: float | None) -> np.ndarray:
    try:
        return preprocess.standardize(preprocess.scale(images, max_value=max_value))  # uint8: always / 255
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def label(row: dict[str, Any]) -> str:
    """``file`` or ``file[index]``: the name of a prediction's image."""
    return row["input"] if row["index"] is None else f"{row['input']}[{row['index']}]"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The predictions as aligned text: ``input  class  probability`` (and ``next`` classes with ``top`` > 1)."""
    names = [label(row) for row in rows]
    width = max([len("input"), *map(len, names)])
    more = any(len(row["top"]) > 1 for row in rows)
    lines = [f"{'input':<{width}}  class  probability" + ("  next" if more else "")]
    for name, row in zip(names, rows, strict=True):
        rest = "  ".join(f"{t['class']} ({t['probability']:.4f})" for t in row["top"][1:])
        lines.append(f"{name:<{width}}  {row['class']:>5}  {row['probability']:>11.4f}" + (f"  {rest}" if rest else ""))
    return "\n".join(lines) + "\n"


def write_predictions(rows: Sequence[dict[str, Any]], output: str | os.PathLike, *, checkpoint: str = "") -> Path:
    """Write the predictions to ``output``, a ``.csv`` (columns ``input, index, class, probability`` and
    ``class_K, probability_K`` for K = 2..top) or a ``.json`` file (``{"checkpoint", "predictions": rows}``),
    atomically: a reader sees the old file or the whole new one."""
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"{output}: the output must be a .csv or a .json file")
    if not output.parent.is_dir():
        raise ValueError(f"{output}: the directory {output.parent} does not exist")
    if output.is_dir():
        raise ValueError(f"{output}: is a directory")
    if suffix == ".json":
        text = json.dumps({"checkpoint": checkpoint, "predictions": list(rows)}, indent=1) + "\n"
    else:
        top = max((len(row["top"]) for row in rows), default=1)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        header = ["input", "index", "class", "probability"]
        writer.writerow(header + [f"{kind}_{k}" for k in range(2, top + 1) for kind in ("class", "probability")])
        for row in rows:
            rest = [v for t in row["top"][1:] for v in (t["class"], repr(t["probability"]))]
            index = "" if row["index"] is None else row["index"]
            writer.writerow([row["input"], index, row["class"], repr(row["probability"]), *rest])
        text = buffer.getvalue()
    write_atomically(output, text)
    return output
