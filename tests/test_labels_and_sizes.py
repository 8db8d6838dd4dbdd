"""Labels and sizes (issue 13, defect 5): labels are checked where data enters (the npz loader, evaluate, the
ensemble's evaluate, fit), never wrapped around; absurd sizes (synthetic sets, npz headers, ensembles, train
states) are refused before anything is allocated, with one line naming the file or argument and the field."""

import io
import time
import zipfile

import jax
import numpy as np
import pytest

import jaxcnn as jc
from data_files import npz_arrays, write_npz
from jaxcnn import nn, train
from jaxcnn.data import DataError
from jaxcnn.train.ensemble import evaluate_ensemble

# -- labels in .npz files ----------------------------------------------------------------------------------

# labels beyond int32 (which used to wrap: uint64 2**63 loaded as 0, with num_classes 2**63 + 1), negative ones
# and non-integral ones, in every integer width and as floats
BAD_LABELS = {
    "uint64 2**63": (np.uint64(2**63), "9223372036854775808"),
    "uint64 2**32": (np.uint64(2**32), "4294967296"),
    "uint32 2**31": (np.uint32(2**31), "2147483648"),
    "int64 2**31": (np.int64(2**31), "2147483648"),
    "int64 2**62": (np.int64(2**62), "4611686018427387904"),
    "int64 -1": (np.int64(-1), "-1"),
    "int64 -2**40": (np.int64(-(2**40)), "-1099511627776"),
    "int8 -5": (np.int8(-5), "-5"),
    "float 1.5": (np.float64(1.5), "1.5"),
    "float -1": (np.float64(-1.0), "-1.0"),
    "float 2**31": (np.float64(2**31), "2147483648.0"),
    "float nan": (np.float64(np.nan), "nan"),
}


@pytest.mark.parametrize("field", ["y_train", "y_test"])
@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_npz_labels_out_of_int32_range_are_refused_naming_file_and_field(case, field, tmp_path):
    value, shown = BAD_LABELS[case]
    labels = npz_arrays()[field].astype(value.dtype)
    labels[1] = value
    path = write_npz(tmp_path / "labels.npz", **{field: labels})
    with pytest.raises(DataError) as error:
        jc.data.load("npz", data_path=path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and field in message and shown in message, message


def test_npz_labels_of_every_integer_width_load_unchanged(tmp_path):
    for dtype in (np.uint8, np.int16, np.uint32, np.int64, np.uint64):
        path = write_npz(tmp_path / "ok.npz", y_train=np.array([0, 1, 2, 0, 1, 2], dtype))
        data = jc.data.load("npz", data_path=path)
        assert data.y_train.tolist() == [0, 1, 2, 0, 1, 2] and data.num_classes == 3


@pytest.mark.parametrize("num_classes", [2**31, 2**32 + 3, np.uint64(2**63)])
def test_npz_num_classes_beyond_int32_is_refused(num_classes, tmp_path):
    path = write_npz(tmp_path / "classes.npz", num_classes=np.array(num_classes))
    with pytest.raises(DataError, match="num_classes must be a positive integer scalar below 2\\*\\*31") as error:
        jc.data.load("npz", data_path=path)
    assert str(path) in str(error.value)


# -- npz headers -------------------------------------------------------------------------------------------


def npy_member(shape, descr="|u1", payload=b"\0" * 64) -> bytes:
    """A .npy file whose header declares ``shape`` of ``descr`` but which holds only ``payload``."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue() + payload


def write_raw_npz(path, **members) -> str:
    """An .npz of npz_arrays() in which ``members`` (name -> raw .npy bytes) replace the arrays."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in npz_arrays().items():
            if name not in members:
                stream = io.BytesIO()
                np.save(stream, array)
                members[name] = stream.getvalue()
            archive.writestr(f"{name}.npy", members[name])
    return str(path)


EXTREME_HEADERS = {
    "x_train": npy_member((10**12, 28, 28)),
    "x_test": npy_member((2**40, 4, 4), "<f4"),
    "y_train": npy_member((2**62,), "<i8"),
    "y_test": npy_member((10**15,), "<u8"),
}


@pytest.mark.parametrize("field", sorted(EXTREME_HEADERS))
def test_npz_headers_declaring_huge_shapes_are_refused_before_allocating(field, tmp_path):
    path = write_raw_npz(tmp_path / "header.npz", **{field: EXTREME_HEADERS[field]})
    with pytest.raises(DataError) as error:  # it used to be a MemoryError naming neither file nor field
        jc.data.load("npz", data_path=path)
    message = str(error.value)
    assert "\n" not in message and path in message and f"'{field}'" in message and "64 B" in message, message


def test_npz_header_shorter_than_its_data_and_arrays_beyond_memory_are_refused(tmp_path, monkeypatch):
    path = write_raw_npz(tmp_path / "short.npz", x_train=npy_member((2, 4, 4), payload=b"\0" * 100))
    with pytest.raises(DataError, match=r"array 'x_train' declares shape \(2, 4, 4\) of uint8 \(32 B\) but the file"):
        jc.data.load("npz", data_path=path)
    # a well-formed file too large for this machine's memory: refused by name, not by a MemoryError
    monkeypatch.setattr(jc.data._formats, "host_bytes", lambda: 400)
    path = write_npz(tmp_path / "big.npz")
    with pytest.raises(DataError, match=r"array 'x_train' of shape \(6, 4, 4\) \(uint8\) would need 480 B, more"):
        jc.data.load("npz", data_path=path)


# -- synthetic sizes ---------------------------------------------------------------------------------------


def test_synthetic_sizes_beyond_memory_are_refused_at_once(monkeypatch):
    monkeypatch.setattr(jc.data._loaders, "device_bytes", lambda: 10**6)  # 1 MB: a 28x28 image is 3,136 B
    cases = {
        "sizes[0] (n_train) = 1000 images": {"sizes": (1000, 10)},
        "sizes[1] (n_test) = 400 images": {"sizes": (10, 400)},
        "num_classes = 400 prototypes": {"num_classes": 400, "sizes": (10, 10)},
    }
    for expected, kwargs in cases.items():
        with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            jc.data.load("synthetic", **kwargs)
    monkeypatch.undo()
    start = time.perf_counter()
    huge = {
        "sizes[0] (n_train) = 10000000000000 images of shape (28, 28, 1) as float32 would need 31,360 TB": {
            "sizes": (10**13, 1)
        },
        "sizes[1] (n_test) = 10000000000000 images": {"sizes": (1, 10**13)},
        "1024 images of shape (1000000, 1000000, 1) as float32 would need 4,096 TB": {"shape": (10**6, 10**6, 1)},
        "num_classes = 100000000000 prototypes": {"num_classes": 10**11},
        "sizes[0] (n_train) = 2147483648; at most 2**31 - 1": {"sizes": (2**31, 1), "shape": (1, 1, 1)},
    }
    for expected, kwargs in huge.items():  # (10**13, 1) used to hang
        with pytest.raises(DataError) as error:
            jc.data.load("synthetic", **kwargs)
        assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert time.perf_counter() - start < 5


# -- labels at evaluate and fit ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """A 10-class linear model on 4x4 images, with 6 images."""
    model = nn.Sequential([nn.Flatten(), nn.Dense(10)])
    params, state = model.init(jax.random.key(0), (4, 4, 1))
    x = np.random.default_rng(0).standard_normal((6, 4, 4, 1)).astype(np.float32)
    return model, params, state, x


@pytest.mark.parametrize("bad", [-5, -1, 10, 11, 2**40])
def test_evaluate_refuses_out_of_range_labels_naming_value_and_range(tiny, bad):
    model, params, state, x = tiny
    y = np.array([0, 1, bad, 3, 4, 5])
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 10\) .*found {bad} at index 2"):
        train.evaluate(model, params, state, x, y)  # used to give a plausible loss for -5 and nan for 11
    with pytest.raises(ValueError, match=rf"found {bad} at index 2"):
        train.evaluate(model, params, state, x, jax.numpy.asarray(y))  # device labels too


def test_evaluate_refuses_float_labels_and_accepts_good_ones(tiny):
    model, params, state, x = tiny
    with pytest.raises(ValueError, match="labels must be integer class indices of shape \\(N,\\), got float"):
        train.evaluate(model, params, state, x, np.arange(6.0))
    result = train.evaluate(model, params, state, x, np.array([0, 9, 2, 3, 4, 5]))
    assert result["count"] == 6 and np.isfinite(result["loss"])


def test_evaluate_ensemble_refuses_out_of_range_labels(tiny):
    model, params, state, x = tiny
    members = jax.tree.map(lambda a: np.stack([a, a]), params)  # two members, as create_ensemble_state stacks them
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) .*found 11 at index 2"):
        evaluate_ensemble(model, members, state, x, np.array([0, 1, 11, 3, 4, 5]))


def small_dataset(**changes):
    rng = np.random.default_rng(0)
    fields = {
        "name": "synthetic",
        "x_train": rng.standard_normal((8, 8, 8, 1)).astype(np.float32),
        "y_train": np.arange(8, dtype=np.int32) % 10,
        "x_test": rng.standard_normal((4, 8, 8, 1)).astype(np.float32),
        "y_test": np.arange(4, dtype=np.int32),
        "num_classes": 10,
    }
    return jc.data.Dataset(**{**fields, **changes})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"y_train": np.array([0, 1, 2, -5, 4, 5, 6, 7])}, r"train labels must lie in \[0, 10\) .*found -5 at index 3"),
        ({"y_test": np.array([0, 11, 2, 3])}, r"test labels must lie in \[0, 10\) .*found 11 at index 1"),
        ({"y_train": np.arange(8.0)}, "train labels must be integer class indices of shape \\(N,\\), got float"),
    ],
)
def test_fit_refuses_bad_labels_before_writing_the_workdir(change, message, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train.fit(train.Config(epochs=1), workdir, data=small_dataset(**change), log=None)
    assert not workdir.exists()


# -- ensembles and train states ----------------------------------------------------------------------------


def test_an_absurd_ensemble_is_refused_at_once():
    with pytest.raises(train.config.ConfigError, match="ensemble must be at most 1024, got 20000") as error:
        train.Config(ensemble=20000)
    assert "--ensemble must be at most 1024" in error.value.with_flags()
    assert train.Config(ensemble=1024).ensemble == 1024


def test_a_train_state_beyond_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    from jaxcnn.train import limits

    monkeypatch.setattr(limits, "device_bytes", lambda: 10**6)  # 1 MB; mnist_cnn on 8x8 images is about 0.4 MB
    workdir = tmp_path / "run"
    with pytest.raises(train.config.ConfigError, match="ensemble 4: the train state and gradients of 4 mnist_cnn"):
        train.fit(train.Config(ensemble=4, epochs=1), workdir, data=small_dataset(), log=None)
    assert not workdir.exists()
    monkeypatch.setattr(limits, "device_bytes", lambda: 10**5)
    with pytest.raises(ValueError, match="mnist_cnn with 10 classes: its train state and gradients would need 1"):
        train.fit(train.Config(epochs=1), workdir, data=small_dataset(), log=None)
    assert not workdir.exists()


def test_augment_refuses_a_translation_as_large_as_the_image():
    x = np.zeros((2, 8, 6, 1), np.float32)
    for translate in (6, 8, 20, 10**12):
        with pytest.raises(DataError, match=f"augment translate must be below the image size 8x6, got {translate}"):
            jc.data.augment(jax.random.key(0), x, translate=translate)
