"""jaxcnn.data: every loader on small files written here, every bad input, standardize, and batching."""

import gzip
import zipfile
from collections import Counter

import jax
import numpy as np
import pytest

from data_files import (
    IDX_STEMS,
    cifar_arrays,
    cifar_bytes,
    idx_bytes,
    idx_name,
    mnist_arrays,
    npz_arrays,
    write,
    write_cifar,
    write_mnist,
    write_npz,
)
from jaxcnn import data
from jaxcnn.data import (
    DATASETS,
    DataError,
    Dataset,
    batches,
    epoch_order,
    load,
    num_batches,
    standardize,
    standardize_with,
)

# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dotted", [False, True], ids=["dash", "dot"])
def test_idx_round_trip(tmp_path, name, gz, dotted):
    arrays = write_mnist(tmp_path, gz=gz, dotted=dotted)
    ds = load(name, data_dir=tmp_path, normalize=False)
    assert isinstance(ds, Dataset) and ds.name == name and ds.num_classes == 10
    assert ds.x_train.shape == (5, 4, 3, 1) and ds.x_test.shape == (3, 4, 3, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train, (arrays["train_x"].astype(np.float32) / 255)[..., None])
    np.testing.assert_array_equal(ds.x_test, (arrays["test_x"].astype(np.float32) / 255)[..., None])
    np.testing.assert_array_equal(ds.y_train, arrays["train_y"])
    np.testing.assert_array_equal(ds.y_test, arrays["test_y"])
    assert ds.input_shape == (4, 3, 1)


def test_idx_mixed_names_and_compression(tmp_path):
    arrays = mnist_arrays(seed=3)
    for i, (key, stem) in enumerate(IDX_STEMS.items()):
        gz, dotted = bool(i % 2), bool(i // 2)
        write(tmp_path / idx_name(stem, gz=gz, dotted=dotted), idx_bytes(arrays[key]), gz=gz)
    ds = load("mnist", data_dir=str(tmp_path), normalize=False)
    np.testing.assert_array_equal(ds.x_test[..., 0] * 255, arrays["test_x"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, arrays["train_y"])


def test_idx_extreme_pixels_scale_to_unit_interval(tmp_path):
    arrays = mnist_arrays()
    arrays["train_x"][0] = 0
    arrays["train_x"][1] = 255
    write_mnist(tmp_path, arrays)
    ds = load("mnist", data_dir=tmp_path, normalize=False)
    assert ds.x_train[0].max() == 0.0 and ds.x_train[1].min() == 1.0
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


# ---------------------------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-bin"])
def test_cifar_round_trip(tmp_path, subdir):
    written = write_cifar(tmp_path / subdir if subdir else tmp_path, train_counts=(7, 3))
    ds = load("cifar10", data_dir=tmp_path, normalize=False)
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32 and ds.num_classes == 10
    train_x = np.concatenate([written[1][0], written[2][0]])
    train_y = np.concatenate([written[1][1], written[2][1]])
    np.testing.assert_array_equal(ds.x_train, train_x.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_train, train_y)
    np.testing.assert_array_equal(ds.x_test, written["test"][0].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_test, written["test"][1])


def test_cifar_channel_order_is_rgb_nhwc(tmp_path):
    """Build the record bytes by hand (independently of cifar_bytes): distinct R, G and B planes."""
    red = np.arange(1024, dtype=np.uint32).reshape(32, 32) % 251  # varies along rows and columns
    record = bytes([3]) + (red % 256).astype(np.uint8).tobytes() + bytes([20] * 1024) + bytes([200] * 1024)
    write(tmp_path / "data_batch_1.bin", record * 2)
    write(tmp_path / "test_batch.bin", record)
    ds = load("cifar10", data_dir=tmp_path, normalize=False)
    x = np.rint(ds.x_train * 255).astype(np.int64)
    np.testing.assert_array_equal(x[0, :, :, 0], red)
    assert x[0, 0, 1, 0] == 1 and x[0, 1, 0, 0] == 32  # row-major plane
    assert (x[:, :, :, 1] == 20).all() and (x[:, :, :, 2] == 200).all()
    np.testing.assert_array_equal(ds.y_train, [3, 3])


def test_cifar_batches_sorted_numerically(tmp_path):
    written = write_cifar(tmp_path, train_counts=(2, 5), numbers=[10, 2])
    ds = load("cifar10", data_dir=tmp_path, normalize=False)
    np.testing.assert_array_equal(ds.y_train, np.concatenate([written[2][1], written[10][1]]))


# ---------------------------------------------------------------------------------------------- npz

NPZ_CASES = {
    # id: (overrides, expected num_classes)
    "uint8-NHW": ({}, 3),
    "float-NHWC-with-num_classes": (
        {
            "x_train": np.linspace(-1, 2, 6 * 4 * 4 * 2).reshape(6, 4, 4, 2),
            "x_test": np.linspace(0, 1, 3 * 4 * 4 * 2, dtype=np.float32).reshape(3, 4, 4, 2),
            "num_classes": np.array(7),
        },
        7,
    ),
    "labels-N1": ({"y_train": np.array([[0], [1], [2], [0], [1], [2]]), "y_test": np.array([[2], [1], [0]])}, 3),
    "integral-float-labels": ({"y_train": np.array([0.0, 1, 2, 0, 1, 2]), "y_test": np.array([2.0, 1, 0])}, 3),
    "max-label-in-test": ({"y_test": np.array([5, 1, 0], dtype=np.uint8)}, 6),
    "num_classes-int-one-element": ({"num_classes": np.array([4], dtype=np.int16)}, 4),
}


@pytest.mark.parametrize("overrides,expected_classes", NPZ_CASES.values(), ids=NPZ_CASES.keys())
def test_npz_round_trip(tmp_path, overrides, expected_classes):
    path = write_npz(tmp_path / "set.npz", **overrides)
    arrays = npz_arrays(**overrides)
    ds = load("npz", data_path=path, normalize=False)
    assert ds.num_classes == expected_classes and ds.name == "npz"
    for split in ("train", "test"):
        x, y = getattr(ds, split)
        raw_x, raw_y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        assert x.dtype == np.float32 and y.dtype == np.int32 and x.ndim == 4
        expected = raw_x.astype(np.float32) / 255 if raw_x.dtype == np.uint8 else raw_x.astype(np.float32)
        if raw_x.ndim == 3:
            expected = expected[..., None]
        np.testing.assert_array_equal(x, expected)
        np.testing.assert_array_equal(y, np.asarray(raw_y).reshape(-1))


def test_npz_accepts_str_path(tmp_path):
    path = write_npz(tmp_path / "set.npz")
    assert load("npz", data_path=str(path), normalize=False).input_shape == (4, 4, 1)


# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_raw():
    return load("digits", normalize=False)


def test_digits_shapes_and_values(digits_raw):
    ds = digits_raw
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_test.shape[1:] == (8, 8, 1)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == 360 and len(ds.x_train) == 1437
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32 and ds.num_classes == 10
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0 and 0.0 <= ds.x_test.min() <= ds.x_test.max() <= 1.0
    # stratified: every class in the test set, in about its 20% share
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38


def test_digits_are_scikit_learns_without_importing_it():
    """The file is read directly (scikit-learn takes a second to import): the same numbers as load_digits, and
    the fallback through load_digits gives them too."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from jaxcnn.data import _loaders

    pixels, labels = _loaders._digits_arrays()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data) and np.array_equal(labels, bunch.target)
    code = "import sys; from jaxcnn.data import _loaders; _loaders._digits_arrays(); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_loaders.importlib.util, "find_spec", lambda name: None)
        fallback = _loaders._digits_arrays()
    assert np.array_equal(fallback[0], bunch.data) and np.array_equal(fallback[1], bunch.target)


def test_digits_split_is_fixed_and_disjoint(digits_raw):
    again = load("digits", normalize=False, seed=123)
    np.testing.assert_array_equal(again.x_test, digits_raw.x_test)
    np.testing.assert_array_equal(again.y_test, digits_raw.y_test)
    np.testing.assert_array_equal(again.x_train, digits_raw.x_train)
    # train and test partition the full set: together they hold each of its images exactly as often as it does,
    # and an image is in both only when the full set holds duplicates of it
    from sklearn.datasets import load_digits

    def counts(images):
        return Counter(row.tobytes() for row in np.asarray(images, np.float32).reshape(-1, 64))

    full = counts(load_digits().images / 16)
    train, test = counts(digits_raw.x_train), counts(digits_raw.x_test)
    assert train + test == full
    assert all(full[row] > 1 for row in train.keys() & test.keys())


def test_digits_normalized(digits_raw):
    ds = load("digits")
    assert ds.x_train.dtype == np.float32
    # standardized in float64, stored as float32: each value rounds by up to 6e-8 relative
    assert abs(float(ds.x_train.mean(dtype=np.float64))) < 1e-5
    assert abs(float(ds.x_train.std(dtype=np.float64)) - 1) < 1e-5
    np.testing.assert_array_equal(ds.y_train, digits_raw.y_train)


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_seeded():
    kwargs = dict(shape=(6, 5, 2), num_classes=4, sizes=(40, 12))
    a, b = load("synthetic", seed=1, **kwargs), load("synthetic", seed=1, **kwargs)
    c = load("synthetic", seed=2, **kwargs)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (40, 6, 5, 2) and a.x_test.shape == (12, 6, 5, 2) and a.num_classes == 4
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    assert set(a.y_train.tolist()) == set(range(4)) and set(a.y_test.tolist()) == set(range(4))


@pytest.fixture(scope="module")
def synthetic_default():
    return load("synthetic", normalize=False)


def test_synthetic_defaults_and_range(synthetic_default):
    ds = synthetic_default
    assert ds.x_train.shape == (1024, 28, 28, 1) and ds.x_test.shape == (256, 28, 28, 1) and ds.num_classes == 10
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(ds.y_train), [103] * 4 + [102] * 6)
    assert 0.2 < ds.x_train.mean() < 0.8


def test_synthetic_is_learnable(synthetic_default):
    """A nearest-class-mean classifier fitted on the training set is almost perfect on the test set."""
    ds = synthetic_default
    x_train, x_test = ds.x_train.reshape(len(ds.x_train), -1), ds.x_test.reshape(len(ds.x_test), -1)
    means = np.stack([x_train[ds.y_train == k].mean(axis=0) for k in range(ds.num_classes)])
    distances = (x_test**2).sum(axis=1)[:, None] - 2 * x_test @ means.T + (means**2).sum(axis=1)[None, :]
    assert (distances.argmin(axis=1) == ds.y_test).mean() > 0.9


# ---------------------------------------------------------------------------------------------- bad inputs


def mnist_with(**raw):
    def setup(tmp_path):
        write_mnist(tmp_path, raw=raw)
        return "mnist", {"data_dir": tmp_path}

    return setup


def mnist_arrays_with(**changes):
    def setup(tmp_path):
        arrays = mnist_arrays()
        arrays.update(changes)
        write_mnist(tmp_path, arrays)
        return "mnist", {"data_dir": tmp_path}

    return setup


def mnist_missing(key):
    def setup(tmp_path):
        write_mnist(tmp_path)
        (tmp_path / IDX_STEMS[key]).unlink()
        return "mnist", {"data_dir": tmp_path}

    return setup


def mnist_gz(content_of):
    def setup(tmp_path):
        write_mnist(tmp_path)
        (tmp_path / IDX_STEMS["train_x"]).unlink()
        good = gzip.compress(idx_bytes(mnist_arrays()["train_x"]))
        write(tmp_path / f"{IDX_STEMS['train_x']}.gz", content_of(good))
        return "mnist", {"data_dir": tmp_path}

    return setup


def cifar_with(**files):
    """A valid CIFAR-10 directory, then the given files (name -> bytes, or None to delete) written over it."""

    def setup(tmp_path):
        write_cifar(tmp_path)
        for name, content in files.items():
            if content is None:
                (tmp_path / name).unlink()
            else:
                write(tmp_path / name, content)
        return "cifar10", {"data_dir": tmp_path}

    return setup


def cifar_pickled(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    write(tmp_path / "cifar-10-batches-py" / "data_batch_1", b"\x80\x04pickle")
    return "cifar10", {"data_dir": tmp_path}


def npz_with(**overrides):
    def setup(tmp_path):
        return "npz", {"data_path": write_npz(tmp_path / "set.npz", **overrides)}

    return setup


def npz_file(content: bytes):
    def setup(tmp_path):
        return "npz", {"data_path": write(tmp_path / "set.npz", content)}

    return setup


def npz_raw_member(tmp_path):
    with zipfile.ZipFile(write_npz(tmp_path / "set.npz")) as source, zipfile.ZipFile(tmp_path / "raw.npz", "w") as out:
        for name in ("x_train", "y_train", "x_test"):
            out.writestr(f"{name}.npy", source.read(f"{name}.npy"))
        out.writestr("y_test", b"not an npy array")
    return "npz", {"data_path": tmp_path / "raw.npz"}


def npz_garbled_member(tmp_path):
    with zipfile.ZipFile(tmp_path / "set.npz", "w") as archive:
        for name in ("x_train", "y_train", "x_test", "y_test"):
            archive.writestr(f"{name}.npy", b"\x93NUMPY\x01\x00garbage")
    return "npz", {"data_path": tmp_path / "set.npz"}


def plain(name, **kwargs):
    return lambda tmp_path: (name, kwargs)


def in_tmp(name, key, relative):
    return lambda tmp_path: (name, {key: tmp_path / relative})


def a_file_as_dir(tmp_path):
    return "mnist", {"data_dir": write(tmp_path / "file", b"x")}


NAN_IMAGES = np.zeros((6, 4, 4), np.float32)
NAN_IMAGES[1, 2, 3] = np.nan
INF_IMAGES = np.zeros((3, 4, 4, 1))
INF_IMAGES[2, 0, 1, 0] = -np.inf
BIG_IMAGES = np.zeros((3, 4, 4))
BIG_IMAGES[0, 0, 0] = 1e300  # finite in float64, Inf in float32

BAD_INPUTS = {
    # id: (setup(tmp_path) -> (name, kwargs), distinctive substring of the message)
    "unknown-name": (
        plain("foo"),
        "unknown data set 'foo'; known: cifar10, digits, fashion_mnist, mnist, npz, synthetic",
    ),
    "name-not-a-string": (plain(None), "unknown data set None"),
    "mnist-no-data_dir": (plain("mnist"), "mnist needs data_dir"),
    "fashion-no-data_dir": (plain("fashion_mnist"), "fashion_mnist needs data_dir"),
    "mnist-dir-does-not-exist": (in_tmp("mnist", "data_dir", "nowhere"), "nowhere' does not exist"),
    "mnist-dir-is-a-file": (a_file_as_dir, "is not a directory"),
    "mnist-missing-test-labels": (mnist_missing("test_y"), "missing t10k-labels-idx1-ubyte in"),
    "mnist-missing-train-images": (mnist_missing("train_x"), "train-images.idx3-ubyte.gz)"),
    "idx-bad-magic": (
        mnist_with(train_x=b"\x01\x02" + idx_bytes(np.zeros((2, 2, 2)))[2:]),
        "is not a valid IDX file: the magic number starts with 0x0102",
    ),
    "idx-bad-dtype": (
        mnist_with(train_x=idx_bytes(np.zeros((2, 2, 2)), magic=bytes([0, 0, 0x0D, 3]))),
        "element type 0x0d, expected 0x08",
    ),
    "idx-labels-with-3-dims": (mnist_with(train_y=idx_bytes(np.zeros((5, 1, 1)))), "3 dimensions, expected 1"),
    "idx-images-with-1-dim": (mnist_with(test_x=idx_bytes(np.zeros(3))), "1 dimensions, expected 3"),
    "idx-truncated-payload": (
        mnist_with(train_x=idx_bytes(mnist_arrays()["train_x"])[:-1]),
        "dimensions (5, 4, 3) need 60 bytes of data, found 59",
    ),
    "idx-trailing-bytes": (
        mnist_with(test_y=idx_bytes(mnist_arrays()["test_y"]) + b"\x00"),
        "dimensions (3,) need 3 bytes of data, found 4",
    ),
    "idx-truncated-header": (mnist_with(train_y=bytes([0, 0, 8, 1, 0])), "the header is truncated"),
    "idx-empty-file": (mnist_with(train_y=b""), "too short for the 4-byte magic number"),
    "idx-count-mismatch": (
        mnist_arrays_with(train_y=np.zeros(4, np.uint8)),
        "holds 5 images but",
    ),
    "idx-label-10": (
        mnist_arrays_with(test_y=np.array([1, 10, 2], np.uint8)),
        "y_test holds label 10 (at index 1), not below num_classes=10",
    ),
    "gz-corrupt": (mnist_gz(lambda good: good[:10] + b"\xff" * 20 + good[30:]), "(corrupt or truncated gzip file)"),
    "gz-truncated": (mnist_gz(lambda good: good[: len(good) // 2]), "(corrupt or truncated gzip file)"),
    "gz-not-gzip": (mnist_gz(lambda good: b"plain bytes, not gzip"), "(corrupt or truncated gzip file)"),
    "cifar-no-data_dir": (plain("cifar10"), "cifar10 needs data_dir"),
    "cifar-dir-does-not-exist": (in_tmp("cifar10", "data_dir", "nope"), "nope' does not exist"),
    "cifar-wrong-size": (
        cifar_with(**{"data_batch_2.bin": cifar_bytes(*cifar_arrays(2, 0)) + b"\x00"}),
        "data_batch_2.bin' is not a CIFAR-10 binary batch: its size, 6147 bytes, is not a positive multiple",
    ),
    "cifar-empty-test": (cifar_with(**{"test_batch.bin": b""}), "its size, 0 bytes"),
    "cifar-bad-label": (
        cifar_with(**{"test_batch.bin": cifar_bytes(cifar_arrays(3, 0)[0], [1, 2, 10])}),
        "test_batch.bin' holds label 10 in record 2; CIFAR-10 labels are 0..9",
    ),
    "cifar-missing-test": (cifar_with(**{"test_batch.bin": None}), "cifar10: missing test_batch.bin in"),
    "cifar-no-train": (
        cifar_with(**{"data_batch_1.bin": None, "data_batch_2.bin": None}),
        "no training file data_batch_K.bin in",
    ),
    "cifar-pickled-only": (cifar_pickled, "python (pickled) version of CIFAR-10"),
    "npz-no-data_path": (plain("npz"), "npz needs data_path"),
    "npz-missing-file": (in_tmp("npz", "data_path", "absent.npz"), "absent.npz' does not exist"),
    "npz-is-a-directory": (lambda tmp_path: ("npz", {"data_path": tmp_path}), "is not a file"),
    "npz-not-a-zip": (npz_file(b"this is not a zip archive"), "is not an .npz archive (not a zip file)"),
    "npz-npy-not-npz": (npz_file(b"\x93NUMPY\x01\x00"), "is not an .npz archive (not a zip file)"),
    "npz-missing-keys": (
        npz_with(y_train=None, x_test=None),
        "is missing array(s) y_train, x_test (it holds: x_train, y_test)",
    ),
    "npz-object-array": (
        npz_with(y_train=np.array([0, "a", None, 1, 2, 0], dtype=object)),
        "array 'y_train' is an object array",
    ),
    "npz-raw-member": (npz_raw_member, "member 'y_test' is not a .npy array"),
    "npz-garbled-member": (npz_garbled_member, "array 'x_train' cannot be read"),
    "npz-rank-2": (npz_with(x_train=np.zeros((6, 16), np.uint8)), "x_train has shape (6, 16); expected (N, H, W)"),
    "npz-rank-5": (npz_with(x_test=np.zeros((3, 4, 4, 1, 1))), "x_test has shape (3, 4, 4, 1, 1)"),
    "npz-zero-channels": (
        npz_with(x_train=np.zeros((6, 4, 4, 0)), x_test=np.zeros((3, 4, 4, 0))),
        "expected (N, H, W, C) with H, W, C >= 1",
    ),
    "npz-int-images": (npz_with(x_train=np.zeros((6, 4, 4), np.int64)), "x_train has dtype int64; images must be"),
    "npz-bool-images": (npz_with(x_test=np.zeros((3, 4, 4), bool)), "x_test has dtype bool"),
    "npz-shape-mismatch": (
        npz_with(x_test=np.zeros((3, 5, 4), np.uint8)),
        "train images are (4, 4, 1) (H, W, C) but test images are (5, 4, 1)",
    ),
    "npz-channel-mismatch": (
        npz_with(x_test=np.zeros((3, 4, 4, 3), np.float32)),
        "but test images are (4, 4, 3)",
    ),
    "nan": (npz_with(x_train=NAN_IMAGES), "x_train holds NaN or Inf values (first at index (1, 2, 3, 0))"),
    "inf": (npz_with(x_test=INF_IMAGES), "x_test holds NaN or Inf values (first at index (2, 0, 1, 0))"),
    "float64-overflow": (npz_with(x_test=BIG_IMAGES), "x_test holds NaN or Inf values (first at index (0, 0, 0, 0))"),
    "negative-label": (npz_with(y_test=np.array([0, -1, 2])), "y_test holds a negative label -1 (at index 1)"),
    "label-at-num_classes": (
        npz_with(num_classes=np.array(3), y_train=np.array([0, 1, 2, 3, 1, 2])),
        "y_train holds label 3 (at index 3), not below num_classes=3",
    ),
    "huge-uint64-label": (
        npz_with(num_classes=np.array(3), y_test=np.array([0, 2**63, 1], np.uint64)),
        f"y_test holds label {2**63} (at index 1)",
    ),
    "count-mismatch": (npz_with(y_train=np.array([0, 1, 2, 0])), "x_train holds 6 images but y_train holds 4 labels"),
    "empty-train": (
        npz_with(x_train=np.zeros((0, 4, 4), np.uint8), y_train=np.zeros(0, np.int64)),
        "the train set is empty",
    ),
    "empty-test": (npz_with(x_test=np.zeros((0, 4, 4)), y_test=np.zeros((0, 1))), "the test set is empty"),
    "non-integral-labels": (
        npz_with(y_train=np.array([0, 1.5, 2, 0, 1, 2])),
        "y_train holds the non-integral or out-of-range label 1.5 at index 1",
    ),
    "nan-labels": (npz_with(y_test=np.array([0, 1, np.nan])), "non-integral or out-of-range label nan at index 2"),
    "bool-labels": (npz_with(y_test=np.array([True, False, True])), "y_test has dtype bool; labels must be integers"),
    "labels-2d": (npz_with(y_train=np.zeros((6, 2), np.int64)), "y_train has shape (6, 2); expected (N,) or (N, 1)"),
    "num_classes-zero": (npz_with(num_classes=np.array(0)), "num_classes must be a positive integer scalar"),
    "num_classes-fraction": (npz_with(num_classes=np.array(2.5)), "num_classes must be a positive integer scalar"),
    "num_classes-vector": (npz_with(num_classes=np.array([3, 4])), "num_classes must be a positive integer scalar"),
    "synthetic-shape-zero": (plain("synthetic", shape=(0, 4, 1)), "shape must be three positive integers"),
    "synthetic-shape-rank": (plain("synthetic", shape=(4, 4)), "shape must be three positive integers"),
    "synthetic-one-class": (plain("synthetic", num_classes=1), "num_classes must be an integer >= 2"),
    "synthetic-size-zero": (plain("synthetic", sizes=(0, 5)), "sizes must be two positive integers"),
    "synthetic-sizes-rank": (plain("synthetic", sizes=(5,)), "sizes must be two positive integers"),
    "synthetic-bad-seed": (plain("synthetic", seed="1"), "seed must be an integer"),
}


@pytest.mark.parametrize("setup,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_one_line_data_error(tmp_path, setup, message):
    name, kwargs = setup(tmp_path)
    with pytest.raises(DataError) as info:
        load(name, normalize=False, **kwargs)
    text = str(info.value)
    assert "\n" not in text, text
    assert message in text, text
    assert isinstance(info.value, ValueError)
    if "data_dir" in kwargs and "does not exist" not in message and name != "cifar10":
        assert str(tmp_path) in text, text  # the file or directory is named


def test_data_error_folds_line_breaks():
    assert str(DataError("first line\n  second line\n")) == "first line second line"


# ---------------------------------------------------------------------------------------------- Dataset


def small_dataset(x_train, x_test, name="t"):
    return Dataset(
        name=name,
        x_train=np.asarray(x_train, np.float32),
        y_train=np.zeros(len(x_train), np.int32),
        x_test=np.asarray(x_test, np.float32),
        y_test=np.zeros(len(x_test), np.int32),
        num_classes=2,
    )


def test_dataset_properties_and_repr(synthetic_default):
    ds = small_dataset(np.zeros((5, 3, 2, 4)), np.ones((2, 3, 2, 4)), name="tiny")
    assert ds.train[0] is ds.x_train and ds.train[1] is ds.y_train
    assert ds.test[0] is ds.x_test and ds.test[1] is ds.y_test
    assert ds.input_shape == (3, 2, 4) and all(type(s) is int for s in ds.input_shape)
    assert repr(ds) == "Dataset(name='tiny', train=(5, 3, 2, 4), test=(2, 3, 2, 4), num_classes=2)"
    expected = "Dataset(name='synthetic', train=(1024, 28, 28, 1), test=(256, 28, 28, 1), num_classes=10)"
    assert repr(synthetic_default) == expected
    with pytest.raises(AttributeError):
        ds.name = "other"  # frozen


def test_datasets_constant():
    assert DATASETS == ("digits", "mnist", "fashion_mnist", "cifar10", "npz", "synthetic")
    assert sorted(data.__all__) == sorted(
        [
            "BadFilesError",
            "Batches",
            "FolderIndex",
            "ImageFolder",
            "StreamSpec",
            "image_folder",
            "DATASETS",
            "DataError",
            "Dataset",
            "ahead",
            "augment",
            "batches",
            "channel_stats",
            "check_labels",
            "epoch_order",
            "load",
            "num_batches",
            "standardize",
            "standardize_with",
        ]
    )


# ---------------------------------------------------------------------------------------------- standardize


def test_standardize_uses_train_statistics():
    rng = np.random.default_rng(0)
    x_train = rng.normal([1.0, -3.0, 10.0], [2.0, 0.5, 4.0], (50, 4, 3, 3))
    x_test = rng.normal(0.0, 1.0, (7, 4, 3, 3))
    ds = small_dataset(x_train, x_test)
    out = standardize(ds)
    assert out.x_train.dtype == np.float32 and out.x_test.dtype == np.float32
    assert out.y_train is ds.y_train and out.num_classes == ds.num_classes and out.name == ds.name
    mean = ds.x_train.astype(np.float64).mean(axis=(0, 1, 2))
    std = ds.x_train.astype(np.float64).std(axis=(0, 1, 2))
    np.testing.assert_allclose(out.x_train, (ds.x_train - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.x_test, (ds.x_test - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.x_train.mean(axis=(0, 1, 2), dtype=np.float64), 0, atol=1e-6)
    np.testing.assert_allclose(out.x_train.std(axis=(0, 1, 2), dtype=np.float64), 1, atol=1e-6)
    assert ds.x_train.dtype == np.float32 and not np.shares_memory(out.x_train, ds.x_train)
    # the two public halves of standardize: the training set's statistics, applied to any images
    stats = data.channel_stats(ds.x_train)
    np.testing.assert_allclose(stats, (mean, std), rtol=1e-12)
    assert np.array_equal(data.standardize_with(ds.x_test, *stats), out.x_test)


@pytest.mark.parametrize("value", [0.0, 0.7, 1e6])
def test_standardize_constant_channel(value):
    rng = np.random.default_rng(1)
    x_train = np.stack([np.full((9, 3, 3), value), rng.random((9, 3, 3))], axis=-1)
    x_test = np.stack([np.full((2, 3, 3), value + 1), rng.random((2, 3, 3))], axis=-1)
    out = standardize(small_dataset(x_train, x_test))
    assert np.isfinite(out.x_train).all() and np.isfinite(out.x_test).all()
    assert (out.x_train[..., 0] == 0).all()
    np.testing.assert_allclose(out.x_test[..., 0], np.float32(value + 1) - np.float32(value))
    np.testing.assert_allclose(out.x_train[..., 1].std(dtype=np.float64), 1, atol=1e-6)


def test_load_normalize_matches_standardize(tmp_path):
    write_mnist(tmp_path)
    raw = load("mnist", data_dir=tmp_path, normalize=False)
    normalized = load("mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(normalized.x_train, standardize(raw).x_train)
    np.testing.assert_array_equal(normalized.x_test, standardize(raw).x_test)


# ---------------------------------------------------------------------------------------------- batching

BATCH_SIZES = {
    # (n, batch_size): sizes of the batches
    (10, 4): [4, 4, 2],
    (8, 4): [4, 4],
    (3, 5): [3],
    (1, 1): [1],
    (7, 1): [1] * 7,
    (0, 3): [],
}


@pytest.mark.parametrize("n,batch_size", BATCH_SIZES.keys())
def test_num_batches(n, batch_size):
    assert num_batches(n, batch_size) == len(BATCH_SIZES[n, batch_size])


@pytest.mark.parametrize("n,batch_size", BATCH_SIZES.keys())
@pytest.mark.parametrize("prefetch", [0, 1, 2, 5])
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_batches_cover_each_index_once(n, batch_size, prefetch, shuffle):
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
    y = np.arange(n, dtype=np.int32)
    key = jax.random.key(3) if shuffle else None
    got = list(batches(x, y, batch_size, key=key, prefetch=prefetch))
    assert [len(yb) for _, yb in got] == BATCH_SIZES[n, batch_size]
    assert all(isinstance(xb, jax.Array) and isinstance(yb, jax.Array) for xb, yb in got)
    assert all(xb.shape[1:] == (2, 2, 1) and xb.dtype == np.float32 and yb.dtype == np.int32 for xb, yb in got)
    seen = np.concatenate([np.asarray(yb) for _, yb in got]) if got else np.zeros(0, np.int64)
    for xb, yb in got:  # images stay with their labels
        np.testing.assert_array_equal(np.asarray(xb)[:, 0, 0, 0], np.asarray(yb))
    expected = epoch_order(key, n) if shuffle else np.arange(n)
    np.testing.assert_array_equal(seen, expected)
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))


def test_epoch_order():
    a, b, c = epoch_order(jax.random.key(0), 50), epoch_order(jax.random.key(0), 50), epoch_order(jax.random.key(1), 50)
    assert isinstance(a, np.ndarray) and a.shape == (50,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    np.testing.assert_array_equal(a, np.asarray(jax.random.permutation(jax.random.key(0), 50)))


def test_batches_same_key_same_order_other_key_other_order():
    x, y = np.zeros((40, 1), np.float32), np.arange(40, dtype=np.int32)

    def order(key):
        return np.concatenate([np.asarray(yb) for _, yb in batches(x, y, 16, key=key)])

    np.testing.assert_array_equal(order(jax.random.key(5)), order(jax.random.key(5)))
    assert not np.array_equal(order(jax.random.key(5)), order(jax.random.key(6)))
    assert not np.array_equal(order(jax.random.key(5)), np.arange(40))
    np.testing.assert_array_equal(order(None), np.arange(40))


def test_batches_on_device():
    device = jax.devices()[0]
    xb, yb = next(iter(batches(np.ones((3, 2), np.float32), np.zeros(3, np.int32), 2, device=device)))
    assert xb.devices() == {device} and yb.devices() == {device}


@pytest.mark.parametrize("prefetch,puts_before_first", [(0, 1), (1, 2), (2, 3), (10, 4)])
def test_batches_prefetch_transfers_ahead(monkeypatch, prefetch, puts_before_first):
    puts = []
    real_put = jax.device_put

    def counting_put(value, device=None):
        puts.append(len(value))
        return real_put(value, device)

    monkeypatch.setattr(jax, "device_put", counting_put)
    iterator = batches(np.zeros((10, 1), np.float32), np.zeros(10, np.int32), 3, prefetch=prefetch)
    assert puts == []  # nothing sent before the first request
    next(iterator)
    assert len(puts) == 2 * puts_before_first  # x and y of the current batch and of those ahead
    rest = list(iterator)
    assert len(rest) == 3 and len(puts) == 8 and puts[-2:] == [1, 1]


BAD_BATCHING = {
    "batch-size-zero": (lambda: batches(np.zeros((4, 1)), np.zeros(4), 0), "batch_size must be an integer >= 1"),
    "batch-size-float": (lambda: batches(np.zeros((4, 1)), np.zeros(4), 2.0), "batch_size must be an integer"),
    "prefetch-negative": (
        lambda: batches(np.zeros((4, 1)), np.zeros(4), 2, prefetch=-1),
        "prefetch must be an integer >= 0",
    ),
    "length-mismatch": (
        lambda: batches(np.zeros((4, 1)), np.zeros(3), 2),
        "x has shape (4, 1) but y has shape (3,)",
    ),
    "scalar-x": (lambda: batches(np.float32(1), np.zeros(1), 1), "they need the same length"),
    "num-batches-zero-size": (lambda: num_batches(10, 0), "batch_size must be an integer >= 1"),
    "num-batches-negative-n": (lambda: num_batches(-1, 2), "n must be an integer >= 0"),
}


@pytest.mark.parametrize("call,message", BAD_BATCHING.values(), ids=BAD_BATCHING.keys())
def test_bad_batching_raises_eagerly(call, message):
    with pytest.raises(DataError) as info:
        call()  # raised at the call, before any iteration
    assert message in str(info.value) and "\n" not in str(info.value)


def test_8_bit_sets_can_stay_uint8_with_their_statistics_recorded(tmp_path):
    path = write_npz(tmp_path / "bytes.npz")
    floats = load("npz", data_path=path)
    raw = load("npz", data_path=path, uint8=True)
    assert raw.x_train.dtype == np.uint8 and raw.raw_scale == 255.0
    assert raw.mean == pytest.approx(floats.mean, rel=1e-6) and raw.std == pytest.approx(floats.std, rel=1e-6)
    standardized = standardize_with(raw.x_train / np.float32(255), np.asarray(raw.mean), np.asarray(raw.std))
    np.testing.assert_allclose(standardized, floats.x_train, atol=1e-5)
    plain = load("npz", data_path=path, uint8=True, normalize=False)
    assert plain.mean is None and np.array_equal(plain.x_test, raw.x_test)
    assert load("digits", uint8=True).x_train.dtype == np.float32  # 0..16: not 8-bit pixels


def test_batches_can_leave_out_the_first_batches_of_an_epoch():
    x, y = np.arange(10.0)[:, None], np.arange(10)
    key = jax.random.key(3)
    whole = [np.asarray(b) for _, b in batches(x, y, 3, key=key)]
    tail = [np.asarray(b) for _, b in batches(x, y, 3, key=key, skip=2)]
    assert len(tail) == 2 and all(np.array_equal(a, b) for a, b in zip(tail, whole[2:], strict=True))
    with pytest.raises(DataError, match="skip must be an integer >= 0"):
        batches(x, y, 3, skip=-1)
