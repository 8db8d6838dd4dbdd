"""Small data files written for the tests: IDX (MNIST layout), CIFAR-10 binary batches and npz archives."""

import gzip
from pathlib import Path

import numpy as np

IDX_STEMS = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray, *, magic: bytes | None = None) -> bytes:
    """An IDX file of uint8 ``array``: two zero bytes, 0x08, ndim, big-endian uint32 dims, the data."""
    array = np.asarray(array, np.uint8)
    head = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    return head + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()


def write(path: Path, content: bytes, *, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(content) if gz else content)
    return path


def idx_name(stem: str, *, gz: bool = False, dotted: bool = False) -> str:
    name = stem.replace("-idx", ".idx") if dotted else stem
    return f"{name}.gz" if gz else name


def mnist_arrays(seed: int = 0, n_train: int = 5, n_test: int = 3, height: int = 4, width: int = 3):
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, (n_train, height, width), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, height, width), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_mnist(directory: Path, arrays=None, *, gz=False, dotted=False, raw=None) -> dict:
    """Writes the four IDX files; ``raw`` maps a key of IDX_STEMS to bytes written instead (uncompressed name)."""
    arrays = mnist_arrays() if arrays is None else arrays
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_STEMS.items():
        if raw is not None and key in raw:
            write(directory / stem, raw[key])
        else:
            write(directory / idx_name(stem, gz=gz, dotted=dotted), idx_bytes(arrays[key]), gz=gz)
    return arrays


def cifar_bytes(images: np.ndarray, labels) -> bytes:
    """CIFAR-10 binary records of NHWC uint8 ``images`` ``(N, 32, 32, 3)``: label, R plane, G plane, B plane."""
    planes = np.asarray(images, np.uint8).transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([np.asarray(labels, np.uint8)[:, None], planes], axis=1).tobytes()


def cifar_arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_cifar(directory: Path, train_counts=(7, 3), test_count=4, numbers=None) -> dict:
    """Writes data_batch_K.bin (K = numbers, default 1, 2, ...) and test_batch.bin; returns what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    numbers = numbers or list(range(1, len(train_counts) + 1))
    written = {}
    for seed, (k, n) in enumerate(zip(numbers, train_counts, strict=True)):
        written[k] = cifar_arrays(n, seed)
        write(directory / f"data_batch_{k}.bin", cifar_bytes(*written[k]))
    written["test"] = cifar_arrays(test_count, 99)
    write(directory / "test_batch.bin", cifar_bytes(*written["test"]))
    return written


def npz_arrays(**overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 4, 4), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 0, 1, 2]),
        "x_test": rng.integers(0, 256, (3, 4, 4), dtype=np.uint8),
        "y_test": np.array([2, 1, 0]),
    }
    arrays.update(overrides)
    return {k: v for k, v in arrays.items() if v is not None}


def write_npz(path: Path, **overrides) -> Path:
    np.savez(path, **npz_arrays(**overrides))
    return path
