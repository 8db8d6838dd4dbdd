"""Readers for the on-disk formats: IDX (MNIST, Fashion-MNIST), CIFAR-10 binary batches and ``.npz`` archives.

Each reader checks the file's structure and raises :class:`DataError` naming the file; the values (label
ranges, NaN) are checked afterwards by the loader's common ``_validate``. Nothing is ever unpickled.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxcnn._memory import format_bytes, host_bytes, too_large
from jaxcnn.data._dataset import DataError

IDX_UBYTE = 0x08  # the IDX element-type code of unsigned bytes, the only one MNIST-style files use
CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE  # one label byte, then the red, green and blue planes
CIFAR_SUBDIR = "cifar-10-batches-bin"
_CIFAR_TRAIN = re.compile(r"data_batch_(\d+)\.bin")


def read_bytes(path: Path) -> bytes:
    """The whole content of ``path``, decompressed when its name ends in ``.gz``.

    Raises:
        DataError: The file cannot be read, or is a corrupt or truncated gzip stream.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        what = " (corrupt or truncated gzip file)" if path.suffix == ".gz" else ""
        raise DataError(f"cannot read '{path}'{what}: {error}") from error


def check_directory(dataset: str, data_dir: str | Path | None, needs: str) -> Path:
    """``data_dir`` as a :class:`Path` to an existing directory.

    Args:
        dataset: The data set's name, for the message.
        data_dir: The directory given by the caller, or None.
        needs: What the directory must hold, for the message when it is missing.

    Raises:
        DataError: ``data_dir`` is None, does not exist, or is not a directory.
    """
    if data_dir is None:
        raise DataError(f"{dataset} needs data_dir: a directory holding {needs}")
    directory = Path(data_dir)
    if not directory.exists():
        raise DataError(f"{dataset}: data_dir '{directory}' does not exist")
    if not directory.is_dir():
        raise DataError(f"{dataset}: data_dir '{directory}' is not a directory")
    return directory


def find_idx(dataset: str, directory: Path, stem: str) -> Path:
    """The IDX file ``stem`` in ``directory``: raw or ``.gz``, ``-idx3-`` or ``.idx3-`` in the name.

    Raises:
        DataError: None of the four variants is there.
    """
    dotted = stem.replace("-idx", ".idx")
    names = [stem, f"{stem}.gz", dotted, f"{dotted}.gz"]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{dataset}: missing {stem} in '{directory}' (looked for {', '.join(names)})")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parses an IDX file of unsigned bytes.

    The format: two zero bytes, the element-type byte (``0x08``, unsigned byte), the number of dimensions,
    then one big-endian uint32 per dimension, then exactly ``prod(dims)`` bytes of data, row-major.

    Args:
        path: The file (raw, or gzip-compressed when the name ends in ``.gz``).
        ndim: The number of dimensions required (3 for images ``(N, H, W)``, 1 for labels ``(N,)``).

    Returns:
        A read-only uint8 array of the dimensions in the header.

    Raises:
        DataError: A bad magic number, element type or rank, or a payload that does not match the header.
    """
    data = read_bytes(path)

    def invalid(why: str) -> DataError:
        return DataError(f"'{path}' is not a valid IDX file: {why}")

    if len(data) < 4:
        raise invalid(f"{len(data)} bytes, too short for the 4-byte magic number")
    if data[0] != 0 or data[1] != 0:
        raise invalid(f"the magic number starts with 0x{data[0]:02x}{data[1]:02x}, not 0x0000")
    if data[2] != IDX_UBYTE:
        raise invalid(f"element type 0x{data[2]:02x}, expected 0x{IDX_UBYTE:02x} (unsigned byte)")
    if data[3] != ndim:
        raise invalid(f"{data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise invalid(f"the header is truncated ({len(data)} bytes, needs {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = math.prod(dims)
    if len(data) - header != size:
        raise invalid(f"dimensions {dims} need {size} bytes of data, found {len(data) - header}")
    return np.frombuffer(data, np.uint8, count=size, offset=header).reshape(dims)


def find_cifar_dir(directory: Path) -> Path:
    """The directory holding ``test_batch.bin``: ``directory`` itself or ``directory/cifar-10-batches-bin``.

    Raises:
        DataError: Neither holds it (saying so specifically when only the pickled python version is there).
    """
    candidates = (directory, directory / CIFAR_SUBDIR)
    for candidate in candidates:
        if (candidate / "test_batch.bin").is_file():
            return candidate
    for candidate in (*candidates, directory / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() or (candidate / "test_batch").is_file():
            raise DataError(
                f"cifar10: '{candidate}' holds the python (pickled) version of CIFAR-10, which is never "
                "unpickled here; use the binary version (cifar-10-binary.tar.gz, data_batch_K.bin files)"
            )
    raise DataError(f"cifar10: missing test_batch.bin in '{directory}' and in '{directory / CIFAR_SUBDIR}'")


def cifar_train_files(directory: Path) -> list[Path]:
    """The ``data_batch_K.bin`` files in ``directory``, sorted by ``K`` numerically.

    Raises:
        DataError: There is none.
    """
    numbered = []
    for path in directory.iterdir():
        match = _CIFAR_TRAIN.fullmatch(path.name)
        if match and path.is_file():
            numbered.append((int(match.group(1)), path))
    if not numbered:
        raise DataError(f"cifar10: no training file data_batch_K.bin in '{directory}'")
    return [path for _, path in sorted(numbered)]


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parses one CIFAR-10 binary batch.

    Each record is 3,073 bytes: the label, then 3,072 pixels -- 1,024 red, 1,024 green, 1,024 blue, each
    plane 32x32 row-major.

    Args:
        path: The ``.bin`` file.

    Returns:
        ``(images, labels)``: uint8 ``(N, 32, 32, 3)`` (NHWC) and uint8 ``(N,)`` in ``[0, 10)``.

    Raises:
        DataError: The size is not a positive multiple of 3,073 bytes, or a label is 10 or more.
    """
    data = read_bytes(path)
    if not data or len(data) % CIFAR_RECORD:
        raise DataError(
            f"'{path}' is not a CIFAR-10 binary batch: its size, {len(data)} bytes, "
            f"is not a positive multiple of the {CIFAR_RECORD}-byte record"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0]
    if labels.max() >= 10:
        index = int(np.argmax(labels))
        raise DataError(f"'{path}' holds label {labels[index]} in record {index}; CIFAR-10 labels are 0..9")
    planes = records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels


def read_npz(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Reads the named arrays of an ``.npz`` archive, never unpickling (``allow_pickle=False``).

    Args:
        path: The archive.
        required: Names of arrays that must be present.
        optional: Names of arrays read when present.

    Returns:
        The arrays found, by name.

    Raises:
        DataError: The file is missing, not a zip archive, lacks a required array (all missing ones are
            listed), holds an object array (which would need unpickling) or a member that is not a ``.npy``
            array, or cannot be read.
    """
    if not path.is_file():
        problem = "does not exist" if not path.exists() else "is not a file"
        raise DataError(f"npz file '{path}' {problem}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"'{path}' is not an .npz archive (not a zip file)")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"'{path}' is not an .npz archive")
            names = set(archive.files)
            missing = [name for name in required if name not in names]
            if missing:
                raise DataError(
                    f"'{path}' is missing array(s) {', '.join(missing)} "
                    f"(it holds: {', '.join(sorted(names)) or 'nothing'})"
                )
            for name in (*required, *optional):
                if name not in names:
                    continue
                _check_npy_header(path, archive.zip, name)
                try:
                    value = archive[name]
                except ValueError as error:
                    if "allow_pickle" in str(error):
                        why = "is an object array, which cannot be loaded without unpickling"
                    else:
                        why = f"cannot be read: {error}"
                    raise DataError(f"'{path}': array '{name}' {why}") from error
                if not isinstance(value, np.ndarray):
                    raise DataError(f"'{path}': member '{name}' is not a .npy array")
                arrays[name] = value
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"cannot read '{path}' as an .npz archive: {error}") from error
    return arrays


def _check_npy_header(path: Path, archive: zipfile.ZipFile, name: str) -> None:
    """Reads the ``.npy`` header of member ``name`` alone, before its data: the shape and dtype it declares must
    match the bytes the archive holds for it and fit in memory (an image array also as a float32 copy).

    Raises:
        DataError: naming the file and the array, for a malformed header, a declared size the member does not
            hold, or one too large for this machine's memory.
    """
    member = f"{name}.npy"
    if member not in archive.namelist():
        return  # not a .npy member: refused as such when it is read
    stored = archive.getinfo(member).file_size
    try:
        with archive.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
            stored -= stream.tell()
    except (OSError, EOFError, ValueError, SyntaxError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"'{path}': array '{name}' cannot be read: a malformed .npy header ({error})") from error
    if dtype.hasobject:
        return  # an object array: refused when it is read (it would need unpickling)
    count = math.prod(shape)
    declared = count * dtype.itemsize
    if declared != stored:
        raise DataError(
            f"'{path}': array '{name}' declares shape {shape} of {dtype} ({format_bytes(declared)}) "
            f"but the file holds {format_bytes(stored)} of data for it"
        )
    needed = declared + (4 * count if name.startswith("x_") else 0)  # images are also copied as float32
    problem = too_large(needed, host_bytes())
    if problem:
        raise DataError(f"'{path}': array '{name}' of shape {shape} ({dtype}) {problem}")
